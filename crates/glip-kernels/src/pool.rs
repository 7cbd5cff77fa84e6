//! The ResNet stem's max-pool (kernel 3, stride 2, padding 1) on the CPU in f32, forward and
//! backward, one task per `(image, channel)` plane; on CUDA the same rule as this crate's
//! kernels (`cuda_source::POOL`).
//!
//! candle 0.11.1's `max_pool2d` takes no padding, has no backward when kernel != stride
//! (CANDLE-NOTES.md) and runs on one thread: with the padding copies in front of it, the pool was
//! 5 % of a ResNet-18 forward's samples, all on the main thread while the others waited (`perf`
//! on `glip bench --preset seed-r18`). PyTorch's rule: each output is the first maximum of its
//! window in row-major order (a NaN wins), and its gradient goes to that one input.

use crate::conv::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `(h, w)` -> the pooled `(oh, ow)`.
pub(crate) fn out_dims(h: usize, w: usize) -> (usize, usize) {
    ((h.max(1) - 1) / 2 + 1, (w.max(1) - 1) / 2 + 1)
}

/// For each output of one `(h, w)` plane, calls `f(output index, input index of its maximum)`.
fn argmax(plane: &[f32], h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
    let (oh, ow) = out_dims(h, w);
    for oy in 0..oh {
        let (y0, y1) = ((2 * oy).saturating_sub(1), (2 * oy + 2).min(h));
        for ox in 0..ow {
            let (x0, x1) = ((2 * ox).saturating_sub(1), (2 * ox + 2).min(w));
            let (mut best, mut at) = (f32::NEG_INFINITY, y0 * w + x0);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let v = plane[iy * w + ix];
                    if v > best || (v.is_nan() && !best.is_nan()) {
                        (best, at) = (v, iy * w + ix);
                    }
                }
            }
            f(oy * ow + ox, at);
        }
    }
}

/// `(b, c, h, w)` -> `(b, c, oh, ow)`.
struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "glip-max-pool-3x3-s2-p1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "max pool")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = out_dims(h, w);
        let y = crate::buf::par_zeroed(b * c * oh * ow, oh * ow, |p, out| {
            if h * w > 0 {
                let plane = &x[p * h * w..][..h * w];
                argmax(plane, h, w, |o, i| out[o] = plane[i]);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, c, oh, ow))))
    }

    cuda_fwd!(|_me, x| crate::cuda_layers::max_pool(x.0, x.1));

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolGrad)?))
    }
}

/// `(x, grad of the pooled output)` -> the gradient of `x`: each output's gradient onto its
/// maximum.
struct MaxPoolGrad;

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "glip-max-pool-3x3-s2-p1-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "max pool backward")?;
        let g = contiguous_f32(s2, l2, "max pool backward")?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (oh, ow) = out_dims(h, w);
        if l2.dims() != [b, c, oh, ow] {
            candle_core::bail!(
                "max pool backward: gradient {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let mut gx = vec![0f32; b * c * h * w];
        if h * w > 0 {
            gx.par_chunks_mut(h * w).enumerate().for_each(|(p, out)| {
                let grad = &g[p * oh * ow..][..oh * ow];
                argmax(&x[p * h * w..][..h * w], h, w, |o, i| out[i] += grad[o]);
            });
        }
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }

    cuda_fwd!(|_me, x, g| crate::cuda_layers::max_pool_backward(x, g));
}

/// Max-pool with kernel 3, stride 2 and padding 1 (padding never wins) of a contiguous-able
/// f32 tensor `(b, c, h, w)`, differentiable: on the CPU, or on CUDA where
/// [`crate::cuda::own_kernels`] takes it (this crate's kernels); the caller keeps other devices
/// and dtypes.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    // candle records no backward for an untracked input.
    x.contiguous()?.apply_op1(MaxPool)
}
