//! Softmax over the last axis and layer normalisation as fused CPU operations with closed-form
//! backwards.
//!
//! candle's own fused versions pass no gradient (CANDLE-NOTES.md), and the differentiable
//! compositions of element-wise ops cost a dozen passes forward and more backward, with
//! broadcast reductions candle runs single-threaded. In a transformer encoder over 320 image
//! tokens (batch 8, width 128) the backward took 3.4x the forward, most of it in those ops
//! (timed around `Transformer::encode` and its backward). Here each is one parallel pass over
//! rows forward and one backward:
//!
//! softmax: `dx = y * (dy - sum(dy * y))`;
//! layer norm: `dx = invstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * weight`,
//! `dweight = sum(dy * xhat)`, `dbias = sum(dy)`;
//!
//! checked against autograd through the compositions in this module's tests. On CUDA (the
//! `cuda` feature) the same ops run this crate's kernels (`cuda_layers`: one block per row);
//! other devices and dtypes use the compositions.

use crate::conv::contiguous_f32;
use crate::reduce::{self, Pair};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Rows per parallel task: enough work per task to amortise rayon's overhead.
fn rows_per_task(d: usize) -> usize {
    (4096 / d).max(1)
}

/// Whether the fused ops take `x`: f32 on the CPU, or on CUDA with this crate's kernels.
fn fused(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && (x.device().is_cpu() || crate::cuda::own_kernels(x))
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "glip-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "softmax")?;
        let d = last_dim(l);
        let rt = rows_per_task(d);
        let y = crate::buf::par_zeroed(x.len(), d * rt, |t, yo| {
            let xi = &x[t * d * rt..][..yo.len()];
            for (yr, xr) in yo.chunks_mut(d).zip(xi.chunks(d)) {
                let m = reduce::max(xr);
                if m == f32::INFINITY {
                    // Some `v - 0` may be positive: glibc's `expf` (the row gives NaN anyway).
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = v.exp();
                    }
                } else {
                    // Every `v - m <= 0` or NaN (`m` is -inf only for a row of -inf and NaN).
                    let m = if m.is_finite() { m } else { 0.0 };
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = crate::exp::exp_le0(v - m);
                    }
                }
                let inv = 1.0 / reduce::sum(yr);
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    cuda_fwd!(|_me, x| crate::cuda_layers::softmax(x.0, x.1));

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBackward)?))
    }
}

struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "glip-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "softmax backward")?;
        let dy = contiguous_f32(s2, l2, "softmax backward")?;
        let d = last_dim(l1);
        let rt = rows_per_task(d);
        let dx = crate::buf::par_zeroed(y.len(), d * rt, |t, o| {
            let base = t * d * rt;
            for (r, orow) in o.chunks_mut(d).enumerate() {
                let yr = &y[base + r * d..][..d];
                let gr = &dy[base + r * d..][..d];
                let dot: f32 = reduce::sum_zip_by(yr, gr, |a, b| a * b);
                for ((o, &yv), &g) in orow.iter_mut().zip(yr).zip(gr) {
                    *o = yv * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    cuda_fwd!(|_me, y, dy| crate::cuda_layers::softmax_backward(y, dy));
}

/// Softmax over the last axis, differentiable (unlike `candle_nn::ops::softmax_last_dim`).
/// A row of only `-inf` gives NaN, as in PyTorch.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        softmax_last_composed(x)
    }
}

/// [`softmax_last`] from candle element-wise ops (other devices and dtypes, CUDA with
/// `GLIP_CUDA_COMPOSED=1`; the tests' reference).
pub fn softmax_last_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct LayerNormOp {
    eps: f32,
}

/// Mean and inverse standard deviation of a row.
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = reduce::sum(r) / n;
    let var = reduce::sum_by(r, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "glip-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm")?;
        let w = contiguous_f32(s2, l2, "layer norm weight")?;
        let b = contiguous_f32(s3, l3, "layer norm bias")?;
        let d = last_dim(l1);
        if w.len() != d || b.len() != d {
            candle_core::bail!("layer norm: weight {} and bias {} for width {d}", w.len(), b.len());
        }
        let rt = rows_per_task(d);
        let y = crate::buf::par_zeroed(x.len(), d * rt, |t, yo| {
            let xi = &x[t * d * rt..][..yo.len()];
            for (yr, xr) in yo.chunks_mut(d).zip(xi.chunks(d)) {
                let (mean, inv) = row_stats(xr, self.eps);
                for (k, o) in yr.iter_mut().enumerate() {
                    *o = (xr[k] - mean) * inv * w[k] + b[k];
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    cuda_fwd!(|me, x, w, b| crate::cuda_layers::layer_norm(x, w, b, me.eps));

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let n = x.elem_count();
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &dy.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?;
        let db = packed.narrow(0, n + d, d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, dy)` -> `[dx (flattened), dweight (d), dbias (d)]` in one buffer.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "glip-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer norm backward")?;
        let w = contiguous_f32(s2, l2, "layer norm backward")?;
        let dy = contiguous_f32(s3, l3, "layer norm backward")?;
        let d = last_dim(l1);
        let n = x.len();
        let rt = rows_per_task(d);
        // Per task: dx of its rows, and its partial sums of dweight and dbias (appended to dx
        // after the tasks, in the room left for them).
        let (dx, partial) = crate::buf::par_zeroed_map(n, 2 * d, d * rt, |t, o| {
            let mut acc = vec![0f32; 2 * d];
            let base = t * d * rt;
            for (r, orow) in o.chunks_mut(d).enumerate() {
                let xr = &x[base + r * d..][..d];
                let gr = &dy[base + r * d..][..d];
                let (mean, inv) = row_stats(xr, self.eps);
                let Pair(mg, mgx) = reduce::sum_indexed(d, |k| {
                    let xhat = (xr[k] - mean) * inv;
                    let g = gr[k] * w[k];
                    acc[k] += gr[k] * xhat;
                    acc[d + k] += gr[k];
                    Pair(g, g * xhat)
                });
                let (mg, mgx) = (mg / d as f32, mgx / d as f32);
                for k in 0..d {
                    let xhat = (xr[k] - mean) * inv;
                    orow[k] = inv * (gr[k] * w[k] - mg - xhat * mgx);
                }
            }
            acc
        });
        let mut out = dx;
        let mut sums = vec![0f32; 2 * d];
        for p in &partial {
            for (s, v) in sums.iter_mut().zip(p) {
                *s += v;
            }
        }
        out.extend_from_slice(&sums);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }

    cuda_fwd!(|me, x, w, dy| crate::cuda_layers::layer_norm_backward(x, w, dy, me.eps));
}

/// Layer normalisation of `x (..., d)` with `weight`, `bias` `(d,)`, differentiable in all
/// three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) && weight.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        )
    } else {
        layer_norm_composed(x, weight, bias, eps)
    }
}

/// `layer_norm(x + r)` (a residual sum, then the norm). Inference on CUDA (f32, contiguous,
/// nothing tracking a gradient) is one launch, bit for bit the composition's result; elsewhere
/// `x + r` then [`layer_norm`].
pub fn layer_norm_residual(
    x: &Tensor,
    r: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let operands = [x, r, weight, bias];
        if crate::cuda::own_kernels(x)
            && x.dims() == r.dims()
            && operands.iter().all(|t| {
                t.dtype() == DType::F32
                    && t.is_contiguous()
                    && !t.track_op()
                    && t.device().same_device(x.device())
            })
        {
            return crate::cuda_layers::add_layer_norm(x, r, weight, bias, eps as f32);
        }
    }
    layer_norm(&(x + r)?, weight, bias, eps)
}

/// [`layer_norm`] from candle element-wise ops (other devices and dtypes, CUDA with
/// `GLIP_CUDA_COMPOSED=1`; the tests' reference).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}

/// An activation whose gradient is one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Relu,
    GeluErf,
}

impl Activation {
    /// The gradient `dy * act'(x)`: ReLU's as candle's (`dy * 1` where `x >= 0`, else
    /// `dy * 0`), GELU's (erf form) as PyTorch's, `dy * (Phi(x) + x phi(x))`.
    fn grad(self, x: f32, dy: f32) -> f32 {
        match self {
            Activation::Relu => dy * if x >= 0.0 { 1.0 } else { 0.0 },
            Activation::GeluErf => {
                let cdf = 0.5
                    * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
                dy * (cdf + x * pdf)
            }
        }
    }

    /// The activation of `x` by candle's own kernel on either device (the values of
    /// `Tensor::relu` / `gelu_erf`).
    fn forward<S: candle_core::backend::BackendStorage>(self, s: &S, l: &Layout) -> Result<S> {
        match self {
            Activation::Relu => s.unary_impl::<candle_core::op::Relu>(l),
            Activation::GeluErf => s.unary_impl::<candle_core::op::GeluErf>(l),
        }
    }
}

/// The activation forward: candle's own kernels (the same values as `Tensor::relu` /
/// `gelu_erf`), with [`ActivationBackward`] as its gradient.
struct Activate(Activation);

impl CustomOp1 for Activate {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Relu => "glip-relu",
            Activation::GeluErf => "glip-gelu-erf",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.0.forward(s, l)?, l.shape().clone()))
    }

    cuda_fwd!(|me, x| Ok((me.0.forward(x.0, x.1)?, x.1.shape().clone())));

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx =
            x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &ActivationBackward(self.0))?;
        Ok(Some(dx))
    }
}

/// `dx = dy * act'(x)` from `(x, dy)`, one pass.
struct ActivationBackward(Activation);

impl CustomOp2 for ActivationBackward {
    fn name(&self) -> &'static str {
        "glip-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "activation backward")?;
        let dy = contiguous_f32(s2, l2, "activation backward")?;
        if x.len() != dy.len() {
            candle_core::bail!("activation backward: {} gradients for {} inputs", dy.len(), x.len())
        }
        const CHUNK: usize = 1 << 14;
        let dx = crate::buf::par_zeroed(x.len(), CHUNK, |i, o| {
            let (x, dy) = (&x[i * CHUNK..][..o.len()], &dy[i * CHUNK..][..o.len()]);
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(dy) {
                *o = self.0.grad(x, g);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    cuda_fwd!(|me, x, dy| crate::cuda_layers::activation_backward(me.0 == Activation::Relu, x, dy));
}

/// `x`'s activation through [`Activate`] where the fused ops take it (f32 on the CPU or on
/// CUDA with this crate's kernels), else candle's `fallback`.
fn activate(
    x: &Tensor,
    act: Activation,
    fallback: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if fused(x) {
        x.apply_op1(Activate(act))
    } else {
        fallback(x)
    }
}

/// ReLU with candle's values forward and backward (`Tensor::relu`), its gradient one pass
/// (candle's backward: a tensor of zeros, a comparison, a cast and a product).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    activate(x, Activation::Relu, Tensor::relu)
}

/// GELU, erf form (`Tensor::gelu_erf`, PyTorch's default `nn.GELU`), its gradient one pass with
/// PyTorch's formula (candle's backward: a dozen element-wise passes).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    activate(x, Activation::GeluErf, Tensor::gelu_erf)
}

/// Checks `dx`, GELU's (erf form) gradient at `x` for `dy`, against the exact derivative
/// `dy (Phi(x) + x phi(x))` in f64, within `16 u ((1 + |erf|) / 2 + |x phi|) |dy| + (x^2 / 2) u
/// |x phi dy|`: about ten f32 roundings and `erff` / `expf` (within 2 ulp) each relative to its
/// term (`Phi = (1 + erf) / 2`, whose sum cancels for negative `x`, so its error is relative to
/// its terms, not to `Phi`), and the exponent's own rounding carried through `exp`;
/// `u = 2^-24`. The CPU op's test and the CUDA kernel's emulation use it.
#[cfg(test)]
pub(crate) fn check_gelu_erf_gradient(x: &[f32], dy: &[f32], dx: &[f32]) {
    let u = f64::from(f32::EPSILON) / 2.0;
    for i in 0..x.len() {
        let (v, g) = (f64::from(x[i]), f64::from(dy[i]));
        let erf = candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2);
        let xpdf = v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let want = g * (0.5 * (1.0 + erf) + xpdf);
        let bound = (16.0 * u * (0.5 * (1.0 + erf.abs()) + xpdf.abs())
            + 0.5 * v * v * u * xpdf.abs())
            * g.abs();
        let err = (f64::from(dx[i]) - want).abs();
        assert!(err <= bound, "element {i} (x {v}): {} vs {want}, error {err} > {bound}", dx[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    // Reference: autograd through the element-wise compositions. Tolerance 1e-5, relative to
    // the gradient's size where it sums over rows (f32 round-off of other summation orders).
    #[test]
    fn softmax_matches_the_composition_in_value_and_gradient() {
        let dev = Device::Cpu;
        for shape in [(3usize, 7usize), (2, 50), (1, 1)] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, shape, &dev).unwrap())).unwrap();
            let wgt = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            let a = softmax_last(x.as_tensor()).unwrap();
            let b = softmax_last_composed(x.as_tensor()).unwrap();
            assert!(max_diff(&a, &b) < 1e-6);
            let ga = (a * &wgt).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (b * &wgt).unwrap().sum_all().unwrap().backward().unwrap();
            let d = max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap());
            assert!(d < 1e-5, "{shape:?}: gradient differs by {d}");
        }
    }

    #[test]
    fn softmax_masks_minus_infinity_and_handles_strided_input() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, f32::NEG_INFINITY, 2.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        let y = softmax_last(&x.t().unwrap()).unwrap();
        let r = softmax_last_composed(&x.t().unwrap()).unwrap();
        assert!(max_diff(&y, &r) < 1e-6);
        let y: Vec<Vec<f32>> = softmax_last(&x).unwrap().to_vec2().unwrap();
        assert_eq!(y[0][1], 0.0);
    }

    #[test]
    fn layer_norm_matches_the_composition_in_value_and_gradients() {
        let dev = Device::Cpu;
        for (rows, d) in [(5usize, 8usize), (300, 33), (1, 4)] {
            let x = Var::from_tensor(&Tensor::randn(1f32, 2.0, (rows, d), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, d, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, d, &dev).unwrap()).unwrap();
            let wgt = Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap();
            let a = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            let c = layer_norm_composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            assert!(max_diff(&a, &c) < 1e-5);
            let ga = (a * &wgt).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (c * &wgt).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (fa, fc) = (ga.get(v).unwrap(), gc.get(v).unwrap());
                let diff = max_diff(fa, fc);
                let scale: f32 =
                    fc.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                // Relative to the gradient's size (dweight sums over up to 300 rows).
                assert!(diff <= 1e-5 * scale.max(1.0), "({rows}, {d}) d{name}: differs by {diff}");
            }
        }
    }

    /// Values in about `[-4, 4]` with exact zeros (ReLU's kink) among them, as a variable.
    fn activation_input(n: usize) -> Var {
        let mut rng = glip_core::rng::Rng::new(11);
        let v: Vec<f32> =
            (0..n).map(|i| if i % 13 == 0 { 0.0 } else { 8.0 * rng.uniform() - 4.0 }).collect();
        Var::from_tensor(&Tensor::from_vec(v, (n / 50, 50), &Device::Cpu).unwrap()).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// [`relu`] against candle's `Tensor::relu` and its backward: the same values and
    /// gradients bit for bit (the same products, `dy * 1` or `dy * 0`), zeros included.
    #[test]
    fn relu_matches_candles_values_and_gradient_bit_for_bit() {
        let x = activation_input(5_000);
        let r = Tensor::randn(0f32, 1.0, x.shape(), &Device::Cpu).unwrap();
        let ours = relu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().relu().unwrap();
        assert_eq!(bits(&ours), bits(&theirs));
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(bits(g1.get(&x).unwrap()), bits(g2.get(&x).unwrap()));
    }

    /// [`gelu_erf`]: the values bit for bit as `Tensor::gelu_erf` (candle's kernel runs them);
    /// the gradient against the exact derivative within [`check_gelu_erf_gradient`]'s bound.
    #[test]
    fn gelu_erf_gradient_matches_the_exact_derivative() {
        let x = activation_input(5_000);
        let dy = Tensor::randn(0f32, 1.0, x.shape(), &Device::Cpu).unwrap();
        let ours = gelu_erf(x.as_tensor()).unwrap();
        assert_eq!(bits(&ours), bits(&x.as_tensor().gelu_erf().unwrap()));
        let g = (&ours * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let xs: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let dys: Vec<f32> = dy.flatten_all().unwrap().to_vec1().unwrap();
        check_gelu_erf_gradient(&xs, &dys, &dx);
    }

    /// An activation of a gradient-free tensor records no backward, and a non-f32 input takes
    /// candle's op.
    #[test]
    fn activations_of_constants_and_other_dtypes() {
        let x = Tensor::new(&[-1f32, 0.0, 2.0], &Device::Cpu).unwrap();
        assert!(!relu(&x).unwrap().track_op());
        let h = x.to_dtype(DType::F64).unwrap();
        assert_eq!(relu(&h).unwrap().to_vec1::<f64>().unwrap(), vec![0.0, 0.0, 2.0]);
    }
}
