//! A per-channel affine map followed by ReLU, optionally with a residual added before the ReLU,
//! as one pass forward and one backward: what a frozen batch norm (constant scale and shift)
//! and its activation cost in a ResNet.
//!
//! `y = relu(x * scale[c] + shift[c] (+ residual))` over `(b, c, h, w)`; the backward is
//! `g = dy * (y > 0)`, `dx = g * scale[c]`, `dresidual = g`. `scale` and `shift` are constants
//! (no gradient). candle's composition is four or five element-wise passes forward and as many
//! backward (a `perf` profile of `glip bench --preset seed-r18 --mode train --batch 8 --size
//! 128` had 20 % of its samples in candle's element-wise maps). On CUDA (the `cuda` feature)
//! the same maps are this crate's kernels (`cuda_layers`); other devices and dtypes use the
//! composition; the tests compare the two, values and gradients.

use crate::conv::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-channel constants.
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl Affine {
    /// `(b, c, h, w)` of a layout, checked against the constants.
    fn plane(&self, l: &Layout) -> Result<usize> {
        let d = l.dims();
        if d.len() != 4 || d[1] != self.scale.len() {
            candle_core::bail!("channel affine: {d:?} against {} channels", self.scale.len());
        }
        Ok(d[2] * d[3])
    }

    /// `y = relu(x * s + t (+ r))`, one task per (image, channel) plane.
    fn forward(&self, x: &[f32], r: Option<&[f32]>, hw: usize) -> Vec<f32> {
        let c = self.scale.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw).enumerate().for_each(|(p, yo)| {
            let (s, t) = (self.scale[p % c], self.shift[p % c]);
            let xi = &x[p * hw..(p + 1) * hw];
            match r {
                Some(r) => {
                    let ri = &r[p * hw..(p + 1) * hw];
                    for ((o, &v), &q) in yo.iter_mut().zip(xi).zip(ri) {
                        *o = (v * s + t + q).max(0.0);
                    }
                }
                None => {
                    for (o, &v) in yo.iter_mut().zip(xi) {
                        *o = (v * s + t).max(0.0);
                    }
                }
            }
        });
        y
    }
}

struct AffineRelu(Affine);

impl CustomOp1 for AffineRelu {
    fn name(&self) -> &'static str {
        "glip-affine-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hw = self.0.plane(l)?;
        let x = contiguous_f32(s, l, "affine-relu")?;
        Ok((CpuStorage::F32(self.0.forward(x, None, hw)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let g = masked(y, dy)?;
        Ok(Some(g.broadcast_mul(&channels(&self.0.scale, y)?)?))
    }
}

struct AffineAddRelu(Affine);

impl CustomOp2 for AffineAddRelu {
    fn name(&self) -> &'static str {
        "glip-affine-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hw = self.0.plane(l1)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("affine-add-relu: {:?} against {:?}", l1.dims(), l2.dims());
        }
        let x = contiguous_f32(s1, l1, "affine-add-relu")?;
        let r = contiguous_f32(s2, l2, "affine-add-relu")?;
        Ok((CpuStorage::F32(self.0.forward(x, Some(r), hw)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = masked(y, dy)?;
        let dx = g.broadcast_mul(&channels(&self.0.scale, y)?)?;
        Ok((Some(dx), Some(g)))
    }
}

/// `dy * (y > 0)`.
fn masked(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    dy.mul(&y.gt(0f32)?.to_dtype(dy.dtype())?)
}

/// `(1, c, 1, 1)` of the constants, on `like`'s device.
fn channels(v: &[f32], like: &Tensor) -> Result<Tensor> {
    Tensor::from_slice(v, (1, v.len(), 1, 1), like.device())
}

fn constants(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// `relu(x * scale[c] + shift[c] (+ residual))` for `x (b, c, h, w)`; `scale` and `shift` `(c,)`
/// are constants. One pass in f32 on the CPU and on CUDA ([`crate::cuda::own_kernels`]),
/// candle's composition elsewhere.
pub fn affine_relu(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && x.dtype() == DType::F32
        && residual.is_none_or(|r| r.dtype() == DType::F32);
    #[cfg(feature = "cuda")]
    if crate::cuda::own_kernels(x)
        && [Some(x), Some(scale), Some(shift), residual]
            .iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32)
    {
        let ss = Tensor::cat(&[scale.flatten_all()?, shift.flatten_all()?], 0)?.detach();
        return match residual {
            Some(r) => {
                x.contiguous()?.apply_op3(&ss, &r.contiguous()?, crate::cuda_layers::AffineAddRelu)
            }
            None => x.contiguous()?.apply_op2(&ss, crate::cuda_layers::AffineRelu),
        };
    }
    if !fused {
        return reference(x, scale, shift, residual);
    }
    let op = Affine { scale: constants(scale)?, shift: constants(shift)? };
    match residual {
        Some(r) => x.apply_op2(r, AffineAddRelu(op)),
        None => x.apply_op1(AffineRelu(op)),
    }
}

/// The composition: `relu(x * scale + shift (+ residual))`.
pub fn reference(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let per = |t: &Tensor| t.reshape((1, (), 1, 1));
    let y = x.broadcast_mul(&per(scale)?)?.broadcast_add(&per(shift)?)?;
    match residual {
        Some(r) => (y + r)?.relu(),
        None => y.relu(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and both gradients against autograd through the composition: equal up to f32
    /// round-off of one multiply-add (|a - b| <= 1e-6 * max(1, max|b|)); the gradients are
    /// exact products of the same factors.
    #[test]
    fn fused_affine_relu_matches_the_composition_values_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        let r = Var::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        let scale = Tensor::new(&[0.5f32, -1.5, 2.0], &dev).unwrap();
        let shift = Tensor::new(&[0.1f32, 0.0, -0.3], &dev).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        for residual in [None, Some(r.as_tensor())] {
            let ours = affine_relu(&x, &scale, &shift, residual).unwrap();
            let theirs = reference(&x, &scale, &shift, residual).unwrap();
            let close = |a: &Tensor, b: &Tensor| {
                let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
                let d =
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-6 * m, "{d} > 1e-6 * {m}");
            };
            close(&ours, &theirs);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            close(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            if let Some(r) = residual {
                close(g1.get(r).unwrap(), g2.get(r).unwrap());
            }
        }
    }

    #[test]
    fn a_channel_count_that_does_not_match_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap();
        let s = Tensor::ones(3, DType::F32, &dev).unwrap();
        let e = affine_relu(&x, &s, &s, None).unwrap_err().to_string();
        assert!(e.contains("3 channels"), "{e}");
    }
}
