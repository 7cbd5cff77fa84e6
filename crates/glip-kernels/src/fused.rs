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
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

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
        let mut y = vec![0f32; x.len()];
        let rt = rows_per_task(d);
        y.par_chunks_mut(d * rt).zip(x.par_chunks(d * rt)).for_each(|(yo, xi)| {
            for (yr, xr) in yo.chunks_mut(d).zip(xi.chunks(d)) {
                let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let m = if m.is_finite() { m } else { 0.0 };
                let mut sum = 0f32;
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - m).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
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
        let mut dx = vec![0f32; y.len()];
        let rt = rows_per_task(d);
        dx.par_chunks_mut(d * rt).enumerate().for_each(|(t, o)| {
            let base = t * d * rt;
            for (r, orow) in o.chunks_mut(d).enumerate() {
                let yr = &y[base + r * d..][..d];
                let gr = &dy[base + r * d..][..d];
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
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
    let mean = r.iter().sum::<f32>() / n;
    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
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
        let mut y = vec![0f32; x.len()];
        let rt = rows_per_task(d);
        y.par_chunks_mut(d * rt).zip(x.par_chunks(d * rt)).for_each(|(yo, xi)| {
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
        let mut dx = vec![0f32; n];
        // Per task: dx of its rows, and its partial sums of dweight and dbias.
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * rt)
            .enumerate()
            .map(|(t, o)| {
                let mut acc = vec![0f32; 2 * d];
                let base = t * d * rt;
                for (r, orow) in o.chunks_mut(d).enumerate() {
                    let xr = &x[base + r * d..][..d];
                    let gr = &dy[base + r * d..][..d];
                    let (mean, inv) = row_stats(xr, self.eps);
                    let (mut mg, mut mgx) = (0f32, 0f32);
                    for k in 0..d {
                        let xhat = (xr[k] - mean) * inv;
                        let g = gr[k] * w[k];
                        mg += g;
                        mgx += g * xhat;
                        acc[k] += gr[k] * xhat;
                        acc[d + k] += gr[k];
                    }
                    let (mg, mgx) = (mg / d as f32, mgx / d as f32);
                    for k in 0..d {
                        let xhat = (xr[k] - mean) * inv;
                        orow[k] = inv * (gr[k] * w[k] - mg - xhat * mgx);
                    }
                }
                acc
            })
            .collect();
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

/// [`layer_norm`] from candle element-wise ops (other devices and dtypes, CUDA with
/// `GLIP_CUDA_COMPOSED=1`; the tests' reference).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
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
}
