//! Sums and maxima over a slice in interleaved partial results, for the CPU kernels' rows and
//! planes.
//!
//! A plain `iter().sum()` (or a `fold`) is one chain of dependent additions: the compiler may
//! not reorder floating-point sums, so it runs one addition per 4 cycles or so, scalar (`perf`
//! of the default training run: batch norm's statistics and gradient sums, layer norm's row
//! statistics, softmax's maximum and sums). Here [`LANES`] partial results are kept side by
//! side, element `i` going to partial `i % LANES`, and added pairwise at the end: independent
//! chains, which the core overlaps (and the compiler may put in vector registers; batch norm's
//! backward f64 sums are eight scalar chains in the SSE2 build). The order of the sums changes,
//! not their accuracy class: a sum of `n` terms in any order is within `gamma_(n-1) sum |t_i|`
//! of the exact one, `gamma_m = m u / (1 - m u)` with `u` the unit roundoff of its accumulator
//! (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 4.2).

use std::ops::Add;

/// Partial results kept side by side: 8 f32 sums fill an AVX register (two SSE2 ones).
pub(crate) const LANES: usize = 8;

/// Two sums carried together (batch norm's backward needs `sum(dy)` and `sum(dy * xhat)`).
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub(crate) struct Pair<T>(pub T, pub T);

impl<T: Add<Output = T>> Add for Pair<T> {
    type Output = Pair<T>;
    fn add(self, o: Pair<T>) -> Pair<T> {
        Pair(self.0 + o.0, self.1 + o.1)
    }
}

/// The partial results added pairwise, then the tail's sum.
#[inline(always)]
fn finish<T: Copy + Add<Output = T>>(mut acc: [T; LANES], tail: T) -> T {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] = acc[l] + acc[l + w];
        }
    }
    acc[0] + tail
}

/// `sum f(a_i)` in `LANES` interleaved partial sums of `T`.
#[inline(always)]
pub(crate) fn sum_by<T, F>(a: &[f32], f: F) -> T
where
    T: Copy + Default + Add<Output = T>,
    F: Fn(f32) -> T,
{
    let mut acc = [T::default(); LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(T::default(), |s, &v| s + f(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l] + f(c[l]);
        }
    }
    finish(acc, tail)
}

/// `sum f(a_i, b_i)` over the shorter of `a` and `b`, in `LANES` interleaved partial sums.
#[inline(always)]
pub(crate) fn sum_zip_by<T, F>(a: &[f32], b: &[f32], f: F) -> T
where
    T: Copy + Default + Add<Output = T>,
    F: Fn(f32, f32) -> T,
{
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::default(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail =
        ca.remainder().iter().zip(cb.remainder()).fold(T::default(), |s, (&x, &y)| s + f(x, y));
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = acc[l] + f(x[l], y[l]);
        }
    }
    finish(acc, tail)
}

/// `sum f(i)` for `i` in `0..n`, in `LANES` interleaved partial sums; `f` is called for each
/// `i` in increasing order (it may have effects of its own, as layer norm's backward has).
#[inline(always)]
pub(crate) fn sum_indexed<T, F>(n: usize, mut f: F) -> T
where
    T: Copy + Default + Add<Output = T>,
    F: FnMut(usize) -> T,
{
    let mut acc = [T::default(); LANES];
    let full = n - n % LANES;
    for c in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = *a + f(c + l);
        }
    }
    let tail = (full..n).fold(T::default(), |s, i| s + f(i));
    finish(acc, tail)
}

/// `sum a_i` in f32.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    sum_by(a, |v| v)
}

/// The largest value of `a`, ignoring NaN as `f32::max` does; `-inf` for an empty slice or
/// one of NaN only. The same value as `a.iter().fold(f32::NEG_INFINITY, f32::max)` (a maximum
/// does not depend on the order, up to the sign of a zero).
#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    // `v > m` is false for a NaN `v`, so NaN is passed over, as `f32::max` does; written as
    // a comparison (not `f32::max`, whose NaN rule the compiler keeps scalar) it is `maxps`.
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] = larger(acc[l], c[l]);
        }
    }
    acc.iter().fold(tail, |m, &v| larger(m, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use glip_testing::lcg_values as values;

    /// `gamma_(n-1)` for a sum of `n` terms with unit roundoff `u`.
    fn gamma(n: usize, u: f64) -> f64 {
        let m = n.saturating_sub(1) as f64;
        m * u / (1.0 - m * u)
    }

    const U32: f64 = f32::EPSILON as f64 / 2.0;
    const U64: f64 = f64::EPSILON / 2.0;

    /// `got` against `terms` summed: within the summation bound of `got`'s precision `u`,
    /// plus that of the in-order f64 reference (`U64`).
    fn assert_sum(what: &str, got: f64, terms: &[f64], u: f64) {
        let exact: f64 = terms.iter().sum();
        let abs: f64 = terms.iter().map(|t| t.abs()).sum();
        let bound = (gamma(terms.len(), u) + gamma(terms.len(), U64)) * abs;
        assert!((got - exact).abs() <= bound, "{what}: {got} against {exact} (bound {bound})");
    }

    /// Against the terms summed in f64: every length from 0 to 40 (each tail length, with and
    /// without full chunks) and a few long ones; f32 sums, a dot product (its terms the f32
    /// products) and two f64 sums carried together.
    #[test]
    fn sums_are_within_the_summation_bound() {
        for n in (0..=40).chain([255, 256, 1000, 4099]) {
            let (a, b) = (values(n, 7 + n as u32), values(n, 9000 + n as u32));
            let wide: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
            let products: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| f64::from(x * y)).collect();
            assert_sum(&format!("sum of {n}"), f64::from(sum(&a)), &wide, U32);
            let dot: f32 = sum_zip_by(&a, &b, |x, y| x * y);
            assert_sum(&format!("dot of {n}"), f64::from(dot), &products, U32);
            let pair: Pair<f64> = sum_zip_by(&a, &b, |x, y| Pair(f64::from(x), f64::from(x * y)));
            assert_sum(&format!("f64 sum of {n}"), pair.0, &wide, U64);
            assert_sum(&format!("f64 dot of {n}"), pair.1, &products, U64);
        }
    }

    /// `sum_indexed` calls `f` once for each index, in order, and sums what it returns within
    /// the bound above.
    #[test]
    fn indexed_sums_visit_each_index_in_order() {
        for n in (0..=40).chain([1000]) {
            let a = values(n, 77 + n as u32);
            let mut seen = Vec::new();
            let got: f32 = sum_indexed(n, |i| {
                seen.push(i);
                a[i]
            });
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "indices of {n}");
            let wide: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
            assert_sum(&format!("indexed sum of {n}"), f64::from(got), &wide, U32);
        }
    }

    /// The maximum is exactly the sequential fold's, NaN ignored, at any position and length.
    #[test]
    fn max_is_the_folds_maximum() {
        for n in (0..=40).chain([257]) {
            let mut a = values(n, 31 + n as u32);
            let want = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a).to_bits(), want.to_bits(), "max of {n}");
            for at in [0, n / 2, n.saturating_sub(1)] {
                if n > 0 {
                    a[at] = f32::NAN;
                    let want = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    assert_eq!(max(&a).to_bits(), want.to_bits(), "max of {n}, NaN at {at}");
                    a[at] = 7.5; // the largest, at every position
                    assert_eq!(max(&a), 7.5, "max of {n}, largest at {at}");
                }
            }
        }
        assert_eq!(max(&[f32::NAN; 9]), f32::NEG_INFINITY);
    }
}
