//! New output vectors written chunk by chunk on rayon's threads, without a zero fill of the
//! whole vector first.
//!
//! `vec![0f32; n]` zeroes the vector on the calling thread before the parallel pass that
//! overwrites it: mimalloc hands back reused memory, which `calloc` semantics must clear with a
//! serial `memset` (2.4 % of a default training run's samples, from the normalisation, softmax
//! and activation kernels here, `perf` on `glip train --config configs/shapes.toml`), the other
//! threads waiting. [`par_zeroed`] gives the same result (each chunk zeroed, then written by
//! `f`), but each chunk is zeroed by the thread that writes it, just before, while it sits in
//! that core's cache.

#![allow(unsafe_code, reason = "a vector's spare capacity, each element zeroed before it is read")]

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// # Safety
/// Every element of `s` must be initialised.
pub(crate) unsafe fn assume_init(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout; the caller vouches for the values.
    unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<f32>]>(s) as *mut [f32]) }
}

/// `vec![0f32; len]` (with room for `spare` more values) whose `i`-th chunk of `chunk` values
/// (the last one shorter where `chunk` does not divide `len`; a `chunk` of 0 counts as 1) is
/// then passed to `f(i, ..)` on rayon's threads; returns the vector and what `f` returned for
/// each chunk, in order.
pub(crate) fn par_zeroed_map<R, F>(
    len: usize,
    spare: usize,
    chunk: usize,
    f: F,
) -> (Vec<f32>, Vec<R>)
where
    R: Send,
    F: Fn(usize, &mut [f32]) -> R + Sync + Send,
{
    let mut v: Vec<f32> = Vec::with_capacity(len + spare);
    let out = v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| {
            c.fill(MaybeUninit::new(0.0));
            // SAFETY: every element of `c` was written just above.
            f(i, unsafe { assume_init(c) })
        })
        .collect();
    // SAFETY: the chunks cover `..len` and each was zeroed in full (`f` may only have written
    // values over the zeros); if `f` panicked we never get here.
    unsafe { v.set_len(len) };
    (v, out)
}

/// [`par_zeroed_map`] for an `f` that returns nothing, without room for more.
pub(crate) fn par_zeroed(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    par_zeroed_map(len, 0, chunk, f).0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against its definition, `vec![0.0; len]` then `par_chunks_mut`: every value (including
    /// those `f` leaves alone, which must be zero), the chunks' indices and lengths, and the
    /// spare capacity; in pools of 1, 2 and 3 threads, with lengths a chunk divides and does not,
    /// and the empty vector.
    #[test]
    fn same_as_zeros_then_chunks() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for (len, chunk) in [(0, 4), (1, 4), (12, 4), (13, 4), (1000, 7), (5, 0), (3, 10)] {
                // Writes every other value of each chunk, from the chunk's index and length.
                let write = |i: usize, c: &mut [f32]| {
                    for (j, v) in c.iter_mut().enumerate().step_by(2) {
                        *v = (i * 1000 + j) as f32 + 0.5;
                    }
                    (i, c.len())
                };
                // Memory a previous vector of the same size left behind, for the allocator
                // to hand back: values that are not zero.
                drop(vec![f32::NAN; len + 3]);
                let (got, parts) = pool.install(|| par_zeroed_map(len, 3, chunk, write));
                let mut want = vec![0f32; len];
                let want_parts: Vec<_> =
                    want.chunks_mut(chunk.max(1)).enumerate().map(|(i, c)| write(i, c)).collect();
                let what = format!("len {len}, chunk {chunk}, {threads} threads");
                assert_eq!(got.len(), len, "{what}");
                assert!(got.capacity() >= len + 3, "{what}: capacity {}", got.capacity());
                assert_eq!(parts, want_parts, "{what}");
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(g.to_bits() == w.to_bits(), "{what} at {k}: {g} against {w}");
                }
            }
        }
    }
}
