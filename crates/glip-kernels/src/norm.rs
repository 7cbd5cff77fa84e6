//! Batch normalisation with batch statistics (training mode) as one fused operation.
//!
//! Written with candle ops, a training-mode batch norm is a dozen element-wise passes plus
//! reductions over the batch and spatial axes, which candle runs single-threaded over strided
//! views; its backward doubles that. In a ResNet-18 training step at 128 px these were the
//! largest cost after the convolutions (measured with `perf`: `Map1::map`, the strided reduce,
//! 13 % of the step). Here the forward is two parallel passes (per-channel statistics, then the
//! affine map) and the backward is the closed form
//!
//! `dx = gamma * invstd / n * (n * dy - sum(dy) - xhat * sum(dy * xhat))`,
//! `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)`,
//!
//! checked against autograd through candle ops in this module's tests. On CUDA (the `cuda`
//! feature) the same closed forms run as this crate's kernels (`cuda_layers`: statistics one
//! block per channel in f64 as here, then element-wise passes).

use crate::conv::contiguous_f32;
use crate::reduce::{self, Pair};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;
use std::ops::Add;

/// Per channel of a `(b, c, h, w)` tensor: the sums of `f(plane index) -> (a, b)` over the `b`
/// planes of that channel (f64 accumulation), channels in parallel.
fn per_channel_sums(b: usize, c: usize, f: impl Fn(usize) -> Pair<f64> + Sync) -> Vec<Pair<f64>> {
    (0..c)
        .into_par_iter()
        .map(|ch| (0..b).map(|bi| f(bi * c + ch)).fold(Pair(0.0, 0.0), Add::add))
        .collect()
}

/// `(2, c)`: the batch mean and biased variance of every channel of `(b, c, h, w)`.
struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "glip-bn-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = contiguous_f32(s, l, "batch norm")?;
        let hw = h * w;
        let n = (b * hw).max(1) as f64;
        let plane = |p: usize| &x[p * hw..][..hw];
        let sums = per_channel_sums(b, c, |p| Pair(reduce::sum_by(plane(p), f64::from), 0.0));
        let means: Vec<f64> = sums.iter().map(|s| s.0 / n).collect();
        let sq = per_channel_sums(b, c, |p| {
            let m = means[p % c];
            Pair(reduce::sum_by(plane(p), |v| (f64::from(v) - m).powi(2)), 0.0)
        });
        let mut out: Vec<f32> = means.iter().map(|&m| m as f32).collect();
        out.extend(sq.iter().map(|s| (s.0 / n) as f32));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// `y = (x - mean) * invstd * gamma + beta` with the statistics given; its backward is the
/// closed form above.
struct Normalize {
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "glip-bn"
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
        let (_, c, h, w) = l1.shape().dims4()?;
        let x = contiguous_f32(s1, l1, "batch norm")?;
        let gamma = contiguous_f32(s2, l2, "batch norm weight")?;
        let beta = contiguous_f32(s3, l3, "batch norm bias")?;
        let hw = h * w;
        let y = crate::buf::par_zeroed(x.len(), hw, |p, out| {
            let ch = p % c;
            let scale = self.invstd[ch] * gamma[ch];
            let shift = beta[ch] - self.mean[ch] * scale;
            for (o, &v) in out.iter_mut().zip(&x[p * hw..][..hw]) {
                *o = v * scale + shift;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dims4()?.1;
        let n = x.elem_count();
        let packed = x.contiguous()?.apply_op2_no_bwd(
            &dy.contiguous()?,
            &NormalizeBackward {
                mean: self.mean.clone(),
                invstd: self.invstd.clone(),
                gamma: gamma.to_vec1()?,
            },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?;
        let dbeta = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), gamma.track_op().then_some(dgamma), Some(dbeta)))
    }
}

/// `(x, dy)` -> `[dx (flattened), dgamma (c), dbeta (c)]` in one buffer.
struct NormalizeBackward {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    gamma: Vec<f32>,
}

impl CustomOp2 for NormalizeBackward {
    fn name(&self) -> &'static str {
        "glip-bn-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let x = contiguous_f32(s1, l1, "batch norm backward")?;
        let dy = contiguous_f32(s2, l2, "batch norm backward")?;
        let hw = h * w;
        let n = (b * hw).max(1) as f32;
        let sums = per_channel_sums(b, c, |p| {
            let ch = p % c;
            let (m, is) = (self.mean[ch], self.invstd[ch]);
            reduce::sum_zip_by(&x[p * hw..][..hw], &dy[p * hw..][..hw], |xv, g| {
                Pair(f64::from(g), f64::from(g * (xv - m) * is))
            })
        });
        // dx, then (in the room left for them) dgamma and dbeta.
        let (mut out, _) = crate::buf::par_zeroed_map(x.len(), 2 * c, hw, |p, o| {
            let ch = p % c;
            let (m, is, g) = (self.mean[ch], self.invstd[ch], self.gamma[ch]);
            let (sdy, sdyx) = (sums[ch].0 as f32, sums[ch].1 as f32);
            let k = g * is / n;
            for ((o, &xv), &gy) in o.iter_mut().zip(&x[p * hw..][..hw]).zip(&dy[p * hw..][..hw]) {
                let xhat = (xv - m) * is;
                *o = k * (n * gy - sdy - xhat * sdyx);
            }
        });
        out.extend(sums.iter().map(|s| s.1 as f32));
        out.extend(sums.iter().map(|s| s.0 as f32));
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// Training-mode batch norm of `x (b, c, h, w)` with `weight`/`bias` `(c,)`: returns the output
/// and the batch `(mean, biased variance)`, each `(c,)` and detached (for running statistics).
/// In f32 one fused operation on the CPU, this crate's kernels on CUDA
/// ([`crate::cuda::own_kernels`]); elsewhere candle ops.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, c, _, _) = x.dims4()?;
    // On CUDA the statistics `(3, c)` (mean, variance, inverse standard deviation) stay on the
    // device, so the kernels take the parameters as one `(5, c)` tensor `[stats; weight; bias]`,
    // through which the gradient reaches weight and bias.
    #[cfg(feature = "cuda")]
    if crate::cuda::own_kernels(x) && [x, weight, bias].iter().all(|t| t.dtype() == DType::F32) {
        let stats =
            x.detach().contiguous()?.apply_op1_no_bwd(&crate::cuda_layers::BnStats { eps })?;
        let p = Tensor::cat(&[&stats, &weight.reshape((1, c))?, &bias.reshape((1, c))?], 0)?;
        let y = x.contiguous()?.apply_op2(&p, crate::cuda_layers::BnNormalize)?;
        return Ok((y, stats.get(0)?, stats.get(1)?));
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        let stats = x.detach().contiguous()?.apply_op1_no_bwd(&Stats)?;
        let (mean, var) = (stats.get(0)?, stats.get(1)?);
        let m: Vec<f32> = mean.to_vec1()?;
        let invstd: Vec<f32> =
            var.to_vec1::<f32>()?.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt() as f32).collect();
        let y = x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            Normalize { mean: m, invstd },
        )?;
        return Ok((y, mean, var));
    }
    let per = |t: &Tensor| t.reshape((1, c, 1, 1));
    let mean = x.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
    let y = xc.broadcast_div(&(var.clone() + eps)?.sqrt()?)?;
    let y = y.broadcast_mul(&per(weight)?)?.broadcast_add(&per(bias)?)?;
    Ok((y, mean.flatten_all()?.detach(), var.flatten_all()?.detach()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values, statistics and gradients of `sum(bn(x) * r)` against the same batch norm from
    /// candle ops (autograd), 1e-4 relative to the largest value.
    #[test]
    fn fused_batch_norm_matches_autograd_through_candle_ops() {
        let dev = Device::Cpu;
        for (b, c, h, w) in [(2, 3, 5, 4), (4, 8, 3, 3), (1, 2, 1, 7)] {
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., (b, c, h, w), &dev).unwrap() + 1.5).unwrap(),
            )
            .unwrap();
            let g = Var::randn(1f32, 0.3, c, &dev).unwrap();
            let be = Var::randn(0f32, 0.3, c, &dev).unwrap();
            let (y, mean, var) = batch_norm_train(&x, &g, &be, 1e-5).unwrap();
            let per = |t: &Tensor| t.reshape((1, c, 1, 1)).unwrap();
            let m = x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap().mean_keepdim(0).unwrap();
            let xc = x.broadcast_sub(&m).unwrap();
            let v = xc
                .sqr()
                .unwrap()
                .mean_keepdim(3)
                .unwrap()
                .mean_keepdim(2)
                .unwrap()
                .mean_keepdim(0)
                .unwrap();
            let want = xc.broadcast_div(&(v.clone() + 1e-5).unwrap().sqrt().unwrap()).unwrap();
            let want = want.broadcast_mul(&per(&g)).unwrap().broadcast_add(&per(&be)).unwrap();
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let scale =
                    b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
                let d =
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-4 * scale, "{what} ({b:?}): {d}");
            };
            close(&y, &want, "forward");
            close(&mean, &m.flatten_all().unwrap(), "mean");
            close(&var, &v.flatten_all().unwrap(), "variance");
            let r = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
            let g1 = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), "dx");
            close(g1.get(&g).unwrap(), g2.get(&g).unwrap(), "dgamma");
            close(g1.get(&be).unwrap(), g2.get(&be).unwrap(), "dbeta");
        }
    }
}
