//! The exact values of multi-scale deformable attention's sampling (glip-kernels'
//! `deformable::sample`: Deformable DETR's `ms_deform_attn_core`) and its gradients, with the
//! error bound of any f32 evaluation: shared by the CPU op's test, the CUDA kernels' test under
//! the CPU emulation and their test on the GPU.

use crate::attention::gamma;
use candle_core::{Device, Result, Tensor, Var};

/// The shapes of a call: `value (bh, s, dh)` over `levels`, `samples (bh, q, levels, points,
/// [x, y, weight])`, the output's gradient `(bh, q, dh)`.
#[derive(Debug, Clone, Copy)]
pub struct DeformableShape<'a> {
    /// Images times heads.
    pub bh: usize,
    /// Queries.
    pub q: usize,
    /// Samples per query and level.
    pub points: usize,
    /// Head width.
    pub dh: usize,
    /// `(h, w, first token)` of each level, tiling the value rows in order.
    pub levels: &'a [(usize, usize, usize)],
}

/// Exact values and, per element, the bound on an f32 evaluation's error.
#[derive(Debug, Clone)]
pub struct Exact {
    pub value: Vec<f64>,
    pub bound: Vec<f64>,
}

/// The sampling's output and the gradients of `sum(out * grad)` with respect to the values and
/// to the samples.
#[derive(Debug, Clone)]
pub struct DeformableExact {
    pub out: Exact,
    pub grad_value: Exact,
    pub grad_samples: Exact,
}

/// The sampling in f64 from the f32 operands: each sample reads the (up to) four tokens around
/// `(x, y)` that lie inside its level with bilinear weights `wy wx` (`wy = 1 - fy` or `fy`,
/// `fy` the fraction of `y` past its floor), times its weight `a`; a sample whose location or
/// weight is not finite makes its query's output and its own gradients NaN and adds nothing to
/// the values' gradient.
///
/// The bound: every output and gradient is a sum of `m` terms, each a product of a few factors
/// of which at most five are rounded in f32 (`x - floor x`, `1 - f`, `wy wx`, times `a`, times
/// the value or gradient; a dot product of `dh` terms inside the samples' gradients), so an f32
/// evaluation in any order (the GPU's atomic additions' order varies; FMA only removes
/// roundings) is within `gamma(m + 10) sum |terms|` of the exact value (`gamma(n) = n u / (1 -
/// n u)`), with `m` the query's `4 levels points` neighbours for an output, that times the
/// queries for a value's gradient, `4 dh` for a sample's.
pub fn deformable_reference(
    value: &[f32],
    samples: &[f32],
    grad: &[f32],
    shape: DeformableShape<'_>,
) -> DeformableExact {
    let DeformableShape { bh, q, points, dh, levels } = shape;
    let tokens: usize = levels.iter().map(|(h, w, _)| h * w).sum();
    let per_query = levels.len() * points;
    assert_eq!(value.len(), bh * tokens * dh, "values");
    assert_eq!(samples.len(), bh * q * per_query * 3, "samples");
    assert_eq!(grad.len(), bh * q * dh, "output gradient");
    let zeros = |n: usize| (vec![0.0f64; n], vec![0.0f64; n]);
    let mut out = zeros(bh * q * dh);
    let mut gv = zeros(value.len());
    let mut gs = zeros(samples.len());
    for row in 0..bh * q {
        let i = row / q;
        let g = &grad[row * dh..][..dh];
        for k in 0..per_query {
            let e = row * per_query + k;
            let smp = &samples[3 * e..3 * e + 3];
            if !smp.iter().all(|v| v.is_finite()) {
                out.0[row * dh..][..dh].fill(f64::NAN);
                gs.0[3 * e..3 * e + 3].fill(f64::NAN);
                continue;
            }
            let (h, w, start) = levels[k / points];
            let (x, y, a) = (f64::from(smp[0]), f64::from(smp[1]), f64::from(smp[2]));
            let (x0, y0) = (x.floor(), y.floor());
            let (fx, fy) = (x - x0, y - y0);
            let (mut g3, mut m3) = ([0.0f64; 3], [0.0f64; 3]);
            for (dy, wy, sy) in [(0.0, 1.0 - fy, -1.0), (1.0, fy, 1.0)] {
                for (dx, wx, sx) in [(0.0, 1.0 - fx, -1.0), (1.0, fx, 1.0)] {
                    let (r, c) = (y0 + dy, x0 + dx);
                    if !(r >= 0.0 && r < h as f64 && c >= 0.0 && c < w as f64) {
                        continue;
                    }
                    let token = i * tokens + start + r as usize * w + c as usize;
                    let v = &value[token * dh..][..dh];
                    let (mut dot, mut mag) = (0.0f64, 0.0f64);
                    for ch in 0..dh {
                        let (vc, gc) = (f64::from(v[ch]), f64::from(g[ch]));
                        let (to_out, to_value) = (wy * wx * a * vc, wy * wx * a * gc);
                        out.0[row * dh + ch] += to_out;
                        out.1[row * dh + ch] += to_out.abs();
                        gv.0[token * dh + ch] += to_value;
                        gv.1[token * dh + ch] += to_value.abs();
                        dot += vc * gc;
                        mag += (vc * gc).abs();
                    }
                    g3[0] += a * sx * wy * dot;
                    m3[0] += (a * wy).abs() * mag;
                    g3[1] += a * sy * wx * dot;
                    m3[1] += (a * wx).abs() * mag;
                    g3[2] += wy * wx * dot;
                    m3[2] += wy * wx * mag;
                }
            }
            gs.0[3 * e..3 * e + 3].copy_from_slice(&g3);
            gs.1[3 * e..3 * e + 3].copy_from_slice(&m3);
        }
    }
    let exact = |(value, mag): (Vec<f64>, Vec<f64>), m: usize| Exact {
        bound: mag.iter().map(|s| gamma(m + 10) * s).collect(),
        value,
    };
    DeformableExact {
        out: exact(out, 4 * per_query),
        grad_value: exact(gv, 4 * per_query * q),
        grad_samples: exact(gs, 4 * dh),
    }
}

/// `got` (f32, from the op under test) against `exact`: each element within its bound, NaN
/// exactly where the exact value is NaN; panics naming `name` and the element otherwise.
/// Returns the largest error over its bound.
pub fn assert_within_bound(name: &str, got: &[f32], exact: &Exact) -> f64 {
    assert_eq!(got.len(), exact.value.len(), "{name}: length");
    let mut margin = 0.0f64;
    for (e, ((&g, &w), &bound)) in got.iter().zip(&exact.value).zip(&exact.bound).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{name}[{e}]: {g}, expected NaN");
            continue;
        }
        let err = (f64::from(g) - w).abs();
        assert!(err <= bound, "{name}[{e}]: {g} against {w}, bound {bound:e}");
        if bound > 0.0 {
            margin = margin.max(err / bound);
        }
    }
    margin
}

/// Test inputs for [`deformable_reference`]: samples from 1.5 outside to 1.5 past each level
/// (inside, on the border and outside), one in four on whole numbers (on a token, on the last
/// row or column), attention weights in (0, 1); `draws` place them, two per sample (any real
/// numbers, e.g. `lcg_values`).
pub fn deformable_samples(shape: DeformableShape<'_>, draws: &[f32]) -> Vec<f32> {
    let per_query = shape.levels.len() * shape.points;
    let n = shape.bh * shape.q * per_query;
    assert!(draws.len() >= 2 * n, "two draws per sample");
    let mut samples = Vec::with_capacity(n * 3);
    for (e, r) in draws.chunks(2).take(n).enumerate() {
        let (h, w, _) = shape.levels[e % per_query / shape.points];
        let spread = |r: f32, n: usize| (r.tanh() + 1.0) / 2.0 * (n as f32 + 2.0) - 1.5;
        let (mut x, mut y) = (spread(r[0], w), spread(r[1], h));
        if e % 4 == 0 {
            (x, y) = (x.round(), y.round());
        }
        samples.extend([x, y, 0.05 + (e % 10) as f32 * 0.1]);
    }
    samples
}

/// The operands of a check: values and the output's gradient from `lcg_values`, samples from
/// [`deformable_samples`], the third sample of the second query with a NaN location.
#[derive(Debug, Clone)]
pub struct DeformableCase<'a> {
    pub shape: DeformableShape<'a>,
    pub value: Vec<f32>,
    pub samples: Vec<f32>,
    pub grad: Vec<f32>,
}

impl<'a> DeformableCase<'a> {
    /// Operands of `shape` drawn from `seed` (and the two seeds after it).
    pub fn new(shape: DeformableShape<'a>, seed: u32) -> Self {
        let DeformableShape { bh, q, points, dh, levels } = shape;
        let tokens: usize = levels.iter().map(|(h, w, _)| h * w).sum();
        let per_query = levels.len() * points;
        assert!(q >= 2 && per_query >= 3, "a second query with a third sample");
        let mut samples =
            deformable_samples(shape, &crate::lcg_values(bh * q * per_query * 2, seed + 2));
        samples[3 * (per_query + 2)] = f32::NAN;
        DeformableCase {
            shape,
            value: crate::lcg_values(bh * tokens * dh, seed),
            samples,
            grad: crate::lcg_values(bh * q * dh, seed + 1),
        }
    }

    /// The exact values and bounds of this case ([`deformable_reference`]).
    pub fn exact(&self) -> DeformableExact {
        deformable_reference(&self.value, &self.samples, &self.grad, self.shape)
    }
}

/// `op(value (bh, s, dh), samples (bh, q, levels, points, 3))`, an implementation of the
/// sampling giving `(bh, q, dh)` on `device`, and its gradients of `sum(out * grad)` with
/// respect to both operands, each element within its bound of [`DeformableCase::exact`] (NaN
/// where it is NaN); panics naming the first that is not. Returns the largest error over bound
/// of the output, the values' gradient and the samples' gradient.
pub fn check_deformable_op(
    case: &DeformableCase<'_>,
    device: &Device,
    op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<[f64; 3]> {
    let DeformableShape { bh, q, points, dh, levels } = case.shape;
    let tokens: usize = levels.iter().map(|(h, w, _)| h * w).sum();
    let v = Var::from_vec(case.value.clone(), (bh, tokens, dh), device)?;
    let s = Var::from_vec(case.samples.clone(), (bh, q, levels.len(), points, 3), device)?;
    let out = op(v.as_tensor(), s.as_tensor())?;
    assert!(out.device().same_device(device), "computed on {:?}", out.device());
    let g = Tensor::from_vec(case.grad.clone(), (bh, q, dh), device)?;
    let grads = (&out * &g)?.sum_all()?.backward()?;
    let exact = case.exact();
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let gv = grads.get(&v).expect("values' gradient");
    let gs = grads.get(&s).expect("samples' gradient");
    Ok([
        assert_within_bound("output", &flat(&out)?, &exact.out),
        assert_within_bound("values' gradient", &flat(gv)?, &exact.grad_value),
        assert_within_bound("samples' gradient", &flat(gs)?, &exact.grad_samples),
    ])
}
