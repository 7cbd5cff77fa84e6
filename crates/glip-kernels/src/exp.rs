//! `e^x` for `x <= 0` in f32 arithmetic the compiler can put in vector registers: softmax's
//! exponentials (`x - max(row) <= 0`).
//!
//! glibc's `expf` is a call per value, which keeps the loop around it scalar: 2.9 % of the
//! default training run's samples (`perf`, `glip train --config configs/shapes.toml`), all of
//! them softmax's. This is Cephes' `expf` (S. L. Moshier) restricted to `x <= 0`, with the
//! rounding of `x log2(e)` and the scaling by `2^k` as integer and bit operations:
//!
//! * `k = round(x log2 e)`, `r = (x - k C1) - k C2` with `C1 + C2 = ln 2` to ~1e-11 (`C1 =
//!   0.693359375` has 9 significant bits, so `k C1` is exact for `|k| < 2^15`, and `x - k C1` is
//!   exact by Sterbenz's lemma); `|r| <= ln 2 / 2 + 110 u` (`x log2 e` is rounded before `k`
//!   is).
//! * `e^r = 1 + r + r^2 P(r)`, Cephes' degree-5 `P`, in Horner's scheme without fused
//!   multiply-adds (the same value on every x86-64 CPU).
//! * `e^x = e^r 2^(k + 64) 2^-64`: both factors normal for `-160 < k <= 0`; the last product
//!   rounds once where the result is subnormal.
//!
//! Error, relative to `e^x` (u = 2^-24): `r`'s rounding (`k C2` and the subtraction, `|k C2| <=
//! 0.034`, `|r| <= 0.35`; plus `|k| 1.3e-11` from `C2`'s f32 value) at most `0.43 u`; `r^2 P(r)`
//! (`<= 0.068`) within 4 roundings, `0.27 u` absolute, `0.38 u` relative to `e^r >= 0.707`; the sum
//! `r + r^2 P` `0.6 u`; the final `1 + ..` one rounding, `u`; `P`'s approximation error under
//! `0.1 u` on `|r| <= ln 2 / 2` (checked in f64 by the tests). In all under `2.6 u`; the tests
//! hold it to `3 u` over a million inputs spread over `[-110, 0]`, plus `2^-150` absolute for
//! results in the subnormal range. Inputs below `-110` give 0 (`e^-110 < 2^-150`), NaN gives
//! NaN, `-inf` gives 0.

/// `log2(e)`.
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` in two parts (Cephes).
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial, highest degree first (its last coefficient, 5.0000001201e-1, is
/// 0.5 in f32).
const P: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
/// `1.5 * 2^23`: added and subtracted, rounds a value of magnitude under `2^22` to an integer
/// (to nearest, ties to even) without a call to `roundf`.
const ROUND: f32 = 12_582_912.0;

/// `e^x` for `x <= 0` (or NaN), within `3 u` relative (`2^-150` absolute below `2^-126`); see
/// the module's doc. A positive `x` is a caller's error (its result is not `e^x`).
#[inline(always)]
pub(crate) fn exp_le0(x: f32) -> f32 {
    debug_assert!(x <= 0.0 || x.is_nan(), "exp_le0 of {x}");
    // A select that keeps NaN (a comparison with NaN is false).
    let x = if x < -110.0 { -110.0 } else { x };
    let kf = (x * LOG2E + ROUND) - ROUND;
    let r = (x - kf * C1) - kf * C2;
    let mut p = P[0];
    for &c in &P[1..] {
        p = p * r + c;
    }
    let er = p * (r * r) + r + 1.0;
    // `kf` is an integer in [-159, 0] (0 for NaN, by `as`).
    let k = kf as i32;
    let scale = f32::from_bits(((k + 64 + 127) as u32) << 23);
    er * scale * f32::from_bits((127 - 64) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: f64 = 1.0 / (1u64 << 24) as f64;

    /// Against f64's `exp` (within 1 ulp of f64, far below the bound), every 1024th f32 from
    /// -0 to -110 and the special values: relative `3 u`, plus `2^-150` absolute.
    #[test]
    fn within_three_units_of_roundoff() {
        let check = |x: f32| {
            let got = exp_le0(x) as f64;
            let want = (x as f64).exp();
            let tol = 3.0 * U * want + 2f64.powi(-150);
            assert!((got - want).abs() <= tol, "exp({x:e}) = {got:e}, want {want:e}");
        };
        let (lo, hi) = ((-0.0f32).to_bits(), (-110.0f32).to_bits());
        let mut worst = 0f64;
        for bits in (lo..=hi).step_by(1024) {
            let x = f32::from_bits(bits);
            check(x);
            let want = (x as f64).exp();
            if want >= f32::MIN_POSITIVE as f64 {
                worst = worst.max(((exp_le0(x) as f64) - want).abs() / want / U);
            }
        }
        // Around the ends of `r`'s range and of the normal results, densely.
        for centre in
            [-0.5 * std::f32::consts::LN_2, -1.5 * std::f32::consts::LN_2, -87.336, -103.3]
        {
            let b = centre.to_bits();
            (b - 2000..b + 2000).map(f32::from_bits).for_each(check);
        }
        println!("largest error over the normal results: {worst:.3} u");
        assert_eq!(exp_le0(0.0), 1.0);
        assert_eq!(exp_le0(-0.0), 1.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_le0(-1e30), 0.0);
        assert!(exp_le0(f32::NAN).is_nan());
    }

    /// Cephes' polynomial in f64 against `(e^r - 1 - r) / r^2` over `|r| <= ln 2 / 2 + 110 u`
    /// (`r`'s range): its approximation error, relative to `e^r`, under `0.1 u`, as the module's
    /// bound assumes.
    #[test]
    fn the_polynomial_approximates_within_a_tenth_of_a_unit() {
        let half = std::f64::consts::LN_2 / 2.0 + 110.0 * U;
        for i in -4000..=4000 {
            let r = half * i as f64 / 4000.0;
            let p = P.iter().fold(0.0, |p, &c| p * r + c as f64);
            let approx = 1.0 + r + r * r * p;
            let err = (approx - r.exp()).abs() / r.exp();
            assert!(err <= 0.1 * U, "r = {r}: {:.3} u", err / U);
        }
    }
}
