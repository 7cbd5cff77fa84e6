//! f32 products straight into fresh, uninitialised output: the `gemm` crate (candle's own CPU
//! matmul) called without candle's zero-filled destination.
//!
//! candle's CPU matmul allocates `vec![0; m*n]` on the calling thread before the product (a
//! serial `memset` of every convolution's output: 3.8 % of a ResNet-18 forward's samples, all on
//! the main thread while the gemm threads wait, `perf` on `glip bench --preset seed-r18`), and
//! offers no way to write a product into part of a larger buffer. [`build`] hands out the chunks
//! of a new `Vec<f32>` as [`Uninit`]; the only way for a caller to finish a chunk is
//! [`Uninit::gemm`] (which writes every element of it: `read_dst = false`) or
//! [`Uninit::fill`], which return the [`Written`] proof `build` asks for, so the vector is fully
//! written before its length is set.

#![allow(
    unsafe_code,
    reason = "gemm's raw-pointer API, and the length of a vector whose chunks were each proven \
              written (Written)"
)]

use crate::buf::assume_init;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// A chunk of a vector being built: `len` elements not yet written.
pub(crate) struct Uninit<'a>(&'a mut [MaybeUninit<f32>], PhantomData<*mut &'a ()>);

/// Proof that the [`Uninit`] of the same lifetime was written in full; it hands the written
/// chunk back.
pub(crate) struct Written<'a>(&'a mut [f32]);

impl Written<'_> {
    pub(crate) fn as_mut(&mut self) -> &mut [f32] {
        self.0
    }
}

/// An f32 matrix view: `rows x cols`, element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let need = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1;
        assert!(self.data.len() >= need, "{what}: {} elements, {need} needed", self.data.len());
    }
}

/// `dst (a.rows x b.cols, contiguous) (+)= a @ b` through gemm: `read_dst` adds to `dst`, else
/// overwrites it without reading it.
///
/// # Safety
/// `dst` must be valid for writes of `a.rows * b.cols` elements, and for reads if `read_dst`.
unsafe fn product(dst: *mut f32, read_dst: bool, a: Mat<'_>, b: Mat<'_>, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions {k} and {}", b.rows);
    a.check("gemm lhs");
    b.check("gemm rhs");
    let threads = rayon::current_num_threads();
    let par = match parallel && threads > 1 {
        true => gemm::Parallelism::Rayon(threads),
        false => gemm::Parallelism::None,
    };
    // SAFETY: `a` and `b` hold every element gemm reads (checked above); `dst` is the
    // caller's. With `read_dst = false` gemm writes each element of `dst` once (`beta * a @ b`)
    // and never reads it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `dst = a @ b` for a contiguous row-major `dst` of `a.rows x b.cols` (its values unread).
pub(crate) fn set_product(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, parallel: bool) {
    into_slice(dst, false, a, b, parallel);
}

/// `dst += a @ b` for a contiguous row-major `dst` of `a.rows x b.cols`.
pub(crate) fn add_product(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, parallel: bool) {
    into_slice(dst, true, a, b, parallel);
}

fn into_slice(dst: &mut [f32], add: bool, a: Mat<'_>, b: Mat<'_>, parallel: bool) {
    let (m, n) = (a.rows, b.cols);
    assert_eq!(dst.len(), m * n, "gemm: output of {} for {m}x{n}", dst.len());
    if a.cols == 0 {
        if !add {
            dst.fill(0.0);
        }
        return;
    }
    // SAFETY: `dst` is an initialised slice of exactly the product's size.
    unsafe { product(dst.as_mut_ptr(), add, a, b, parallel) }
}

impl<'a> Uninit<'a> {
    /// `self (a.rows x b.cols, row-major, contiguous) = a @ b`, every element written; with
    /// `parallel`, on gemm's rayon threads, else on this one.
    pub(crate) fn gemm(self, a: Mat<'_>, b: Mat<'_>, parallel: bool) -> Written<'a> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        assert_eq!(self.0.len(), m * n, "gemm: output of {} for {m}x{n}", self.0.len());
        if k == 0 {
            return self.fill(|o| o.fill(0.0));
        }
        // SAFETY: `self` is valid for writes of its m*n elements; with `read_dst = false` they
        // are written, not read, so the chunk is initialised in full on return.
        unsafe { product(self.0.as_mut_ptr().cast::<f32>(), false, a, b, parallel) };
        // SAFETY: initialised just above.
        Written(unsafe { assume_init(self.0) })
    }

    /// Writes the chunk by `f` on a zero-initialised view (for the rare chunks no product
    /// writes).
    pub(crate) fn fill(self, f: impl FnOnce(&mut [f32])) -> Written<'a> {
        for v in self.0.iter_mut() {
            v.write(0.0);
        }
        // SAFETY: every element was written just above.
        let init = unsafe { assume_init(self.0) };
        f(init);
        Written(init)
    }
}

/// A new vector of `count * chunk` elements whose `i`-th chunk of `chunk` elements is written
/// by `f(i, ..)`: in parallel over chunks with `parallel`, else in order on this thread.
pub(crate) fn build<F>(count: usize, chunk: usize, parallel: bool, f: F) -> Vec<f32>
where
    F: for<'a> Fn(usize, Uninit<'a>) -> Written<'a> + Sync,
{
    let len = count * chunk;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    if chunk > 0 {
        let spare = &mut v.spare_capacity_mut()[..len];
        let run = |(i, c): (usize, &mut [MaybeUninit<f32>])| {
            let _: Written<'_> = f(i, Uninit(c, PhantomData));
        };
        if parallel {
            spare.par_chunks_mut(chunk).enumerate().for_each(run);
        } else {
            spare.chunks_mut(chunk).enumerate().for_each(run);
        }
    }
    // SAFETY: each of the `count` chunks was handed to `f` as an `Uninit`, whose only way to the
    // `Written` that `f` must return is writing all of it (`gemm` or `fill`); if `f` panicked
    // we never get here.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat<'_>, b: Mat<'_>) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    c[i * b.cols + j] +=
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
            }
        }
        c
    }

    /// Strided operands, serial and parallel, chunked output, against an f64 product: within
    /// f32 summation's `gamma_k * sum |a b|` (k terms, unit round-off 2^-24).
    #[test]
    fn products_into_chunks_match_f64() {
        let (m, k, n, count) = (37, 29, 53, 3);
        let a: Vec<f32> =
            (0..m * (k + 3)).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 25.0).collect();
        let b: Vec<f32> =
            (0..count * k * (n + 5)).map(|i| ((i * 104729 % 97) as f32 - 48.0) / 24.0).collect();
        let am = Mat { data: &a, rows: m, cols: k, rs: k + 3, cs: 1 };
        let bm = |i: usize| Mat { data: &b[i * k * (n + 5)..], rows: k, cols: n, rs: n + 5, cs: 1 };
        for parallel in [false, true] {
            let v = build(count, m * n, parallel, |i, out| out.gemm(am, bm(i), !parallel));
            for i in 0..count {
                let exact = naive(am, bm(i));
                let mag = naive(
                    Mat { data: &a.iter().map(|x| x.abs()).collect::<Vec<_>>(), ..am },
                    Mat {
                        data: &b[i * k * (n + 5)..].iter().map(|x| x.abs()).collect::<Vec<_>>(),
                        ..bm(i)
                    },
                );
                let gamma = k as f64 * 2f64.powi(-24) / (1.0 - k as f64 * 2f64.powi(-24));
                for (j, (&got, (&e, &s))) in
                    v[i * m * n..][..m * n].iter().zip(exact.iter().zip(&mag)).enumerate()
                {
                    assert!(
                        (got as f64 - e).abs() <= gamma * s,
                        "chunk {i} at {j}: {got} against {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_inner_dimension_writes_zeros() {
        let a = [0f32; 0];
        let v =
            build(2, 6, true, |_, out| out.gemm(Mat::rows(&a, 2, 0), Mat::rows(&a, 0, 3), false));
        assert_eq!(v, vec![0.0; 12]);
    }
}
