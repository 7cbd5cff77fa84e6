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
                    // Selects, not a branch: which value wins is data, and mispredicted
                    // branches on it were most of this loop's time.
                    let wins = v > best || (v.is_nan() && !best.is_nan());
                    best = if wins { v } else { best };
                    at = if wins { iy * w + ix } else { at };
                }
            }
            f(oy * ow + ox, at);
        }
    }
}

/// `v` where [`argmax`] would take it over `m` (larger, or the first NaN), else `m`: a select,
/// no branch on the data.
#[inline(always)]
fn pick(m: f32, v: f32) -> f32 {
    if v > m || (v.is_nan() && !m.is_nan()) {
        v
    } else {
        m
    }
}

/// The pooled `(oh, ow)` values of one `(h, w)` plane (`h, w > 0`) into `out`: for each
/// output the value [`argmax`] picks, bit for bit. First each input row's window maxima along
/// the row (`rows`, `h x ow` scratch), then each output row's 2-3 of those rows element by
/// element, selects without branches. The first pick in row-major order survives both steps:
/// within a row the leftmost, across rows the topmost; so do ties between `-0.0` and `0.0` and
/// NaN payloads.
fn pooled(plane: &[f32], h: usize, w: usize, out: &mut [f32], rows: &mut [f32]) {
    let (oh, ow) = out_dims(h, w);
    // Windows `2 ox - 1 ..= 2 ox + 1`: the first (`ox = 0`) and, where `w` is even, the last
    // are cut by the padding; those between hold three values each, a loop without bounds to
    // compute, which the compiler makes 4-lane SSE code (the row de-interleaved by `shufps`, as
    // seen in the disassembly). Each window's own bounds and fold, as before, were 10 % of the
    // samples of `glip bench --preset seed-r18 --batch 4 --size 256` (`perf`); now 1.6 %.
    let full = (w - 1) / 2; // windows `1..full` lie inside the row (`2 ox + 1 <= w - 1`)
    let window = |r: &[f32], ox: usize| {
        let (x0, x1) = ((2 * ox).saturating_sub(1), (2 * ox + 2).min(w));
        r[x0 + 1..x1].iter().fold(r[x0], |m, &v| pick(m, v))
    };
    for (r, m) in plane.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
        m[0] = window(r, 0);
        if full > 1 {
            let inner = &r[1..2 * full + 1];
            for (m, t) in
                m[1..full].iter_mut().zip(inner.chunks_exact(2).zip(inner[2..].chunks_exact(2)))
            {
                let ((a, b), c) = ((t.0[0], t.0[1]), t.1[0]);
                *m = pick(pick(a, b), c);
            }
        }
        let tail = full.max(1);
        for (ox, m) in m[tail..].iter_mut().enumerate() {
            *m = window(r, tail + ox);
        }
    }
    for (oy, o) in out[..oh * ow].chunks_exact_mut(ow).enumerate() {
        let (y0, y1) = ((2 * oy).saturating_sub(1), (2 * oy + 2).min(h));
        o.copy_from_slice(&rows[y0 * ow..][..ow]);
        for iy in y0 + 1..y1 {
            for (m, &v) in o.iter_mut().zip(&rows[iy * ow..][..ow]) {
                *m = pick(*m, v);
            }
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
                pooled(&x[p * h * w..][..h * w], h, w, out, &mut vec![0.0; h * ow]);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward's values are the values `argmax` picks (which the backward routes the
    /// gradient to), bit for bit: every plane size from 1 x 1 to 9 x 9, values drawn from a
    /// few levels (ties, signed zeros), NaNs and infinities mixed in after the first round.
    #[test]
    fn pooled_values_are_the_argmax_picks() {
        // Ties between -0.0 and 0.0, and two NaNs of other payloads (the pick is the first).
        let nan2 = f32::from_bits(f32::NAN.to_bits() | 1);
        let levels = [-1.5, 0.0, -0.0, 2.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -nan2];
        let mut s = 12345u32;
        for h in 1..=9 {
            for w in 1..=9 {
                for round in 0..4 {
                    // Round 0: no NaN or infinity; later rounds draw from all the levels.
                    let plane: Vec<f32> = (0..h * w)
                        .map(|_| {
                            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                            let n = if round == 0 { 4 } else { levels.len() };
                            levels[(s >> 16) as usize % n]
                        })
                        .collect();
                    let (oh, ow) = out_dims(h, w);
                    let mut got = vec![0f32; oh * ow];
                    pooled(&plane, h, w, &mut got, &mut vec![0.0; h * ow]);
                    let mut want = vec![0f32; oh * ow];
                    argmax(&plane, h, w, |o, i| want[o] = plane[i]);
                    for (o, (g, w_)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            g.to_bits() == w_.to_bits(),
                            "{h} x {w}, round {round}, output {o}: {g} against {w_} (bits {:#x}, {:#x})",
                            g.to_bits(),
                            w_.to_bits()
                        );
                    }
                }
            }
        }
    }
}
