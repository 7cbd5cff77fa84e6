//! Multi-scale deformable attention's sampling (Deformable DETR's `ms_deform_attn_core`) on the
//! CPU in f32, forward and backward: each sample reads the four tokens around it in its level,
//! weighted by its bilinear weights (zero outside the level: `grid_sample`'s zero padding) times
//! its attention weight, and a query's output is the sum over its samples.
//!
//! candle's ops make the same sum as a row copy (`index_select` of `queries x levels x points x
//! 4` value rows per image and head) and a batched product of one row of weights with them; over
//! the shapes task's 320 tokens (d 256, 8 heads, 300 queries, batch 2, 4 points) that was 2.3-2.7x
//! the time of global attention in a training step: some 30 small element-wise ops making the
//! indices and the weights, a 20 MB copy of rows and its scatter back (`index_add`), 4,800 one-row
//! products and their backward (`perf` on `cargo bench -p glip-benches --bench models --
//! decoder_image_attention`). Here one pass reads each sample's four rows in place, and one pass
//! of the backward gives the values', the locations' and the attention weights' gradients. On
//! CUDA (a `cuda` build) the same sums are three kernels of glip's own (one thread per output
//! element; the values' gradient added with atomics, as Deformable DETR's kernel does; one
//! thread per sample for its gradients). [`takes`] says where the op applies; the caller keeps
//! candle's composition for the rest (values in bf16, determinism asked for on CUDA).

use crate::conv::contiguous_f32;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// One level of the value rows: `h` rows of `w` tokens, row-major, from row `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub h: usize,
    pub w: usize,
    pub start: usize,
}

/// Calls `f(value row, wy, wx, sy, sx)` for each of the (up to) four tokens around the sample
/// at column `x`, row `y` of `level` that lie inside it: `wy * wx` is the token's bilinear
/// weight and `sy`, `sx` (-1 or 1) the sign of its weight's derivative in `y`, `x`. The same
/// arithmetic as the composition it replaces: `floor`, the fraction past it, `1 - f` and `f`,
/// the neighbours' coordinates compared in f32 with the level's last column and row.
#[inline(always)]
fn corners(level: &Level, x: f32, y: f32, mut f: impl FnMut(usize, f32, f32, f32, f32)) {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let (last_col, last_row) = ((level.w - 1) as f32, (level.h - 1) as f32);
    for (dy, wy, sy) in [(0.0, 1.0 - fy, -1.0), (1.0, fy, 1.0)] {
        let row = y0 + dy;
        if !(row >= 0.0 && row <= last_row) {
            continue;
        }
        for (dx, wx, sx) in [(0.0, 1.0 - fx, -1.0), (1.0, fx, 1.0)] {
            let col = x0 + dx;
            if col >= 0.0 && col <= last_col {
                f(level.start + row as usize * level.w + col as usize, wy, wx, sy, sx);
            }
        }
    }
}

/// The shapes of a call: `value (bh, s, dh)`, `samples (bh, q, levels, points, 3)`.
pub(crate) struct Dims {
    pub(crate) bh: usize,
    pub(crate) s: usize,
    pub(crate) dh: usize,
    pub(crate) q: usize,
    pub(crate) points: usize,
}

fn dims(levels: &[Level], value: &Layout, samples: &Layout) -> Result<Dims> {
    let (bh, s, dh) = value.shape().dims3()?;
    let (bh2, q, nl, points, three) = samples.shape().dims5()?;
    // The levels tile the value rows in order, none empty.
    let mut tokens = 0;
    let mut tiled = true;
    for l in levels {
        tiled &= l.start == tokens && l.h > 0 && l.w > 0;
        tokens += l.h * l.w;
    }
    if bh2 != bh || three != 3 || nl != levels.len() || tokens != s || !tiled {
        candle_core::bail!(
            "deformable sampling: values {:?}, samples {:?} (x, y, weight last), levels {levels:?}",
            value.dims(),
            samples.dims()
        );
    }
    Ok(Dims { bh, s, dh, q, points })
}

/// [`dims`] of the backward's operands, the output's gradient `(bh, q, dh)` checked too.
fn backward_dims(
    levels: &[Level],
    value: &Layout,
    samples: &Layout,
    grad: &Layout,
) -> Result<Dims> {
    let d = dims(levels, value, samples)?;
    if grad.dims() != [d.bh, d.q, d.dh] {
        candle_core::bail!(
            "deformable sampling backward: gradient {:?} for values {:?}",
            grad.dims(),
            value.dims()
        );
    }
    Ok(d)
}

/// `(value (bh, s, dh), samples (bh, q, levels, points, 3))` -> `(bh, q, dh)`. A sample is its
/// column, its row (in its level's units: column `j` is centred on `j`) and its attention weight.
struct Sample {
    levels: Vec<Level>,
}

impl CustomOp2 for Sample {
    fn name(&self) -> &'static str {
        "glip-deformable-sample"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let value = contiguous_f32(s1, l1, "deformable sampling")?;
        let samples = contiguous_f32(s2, l2, "deformable sampling")?;
        let Dims { bh, s, dh, q, points } = dims(&self.levels, l1, l2)?;
        let per_query = self.levels.len() * points * 3;
        let mut out = vec![0f32; bh * q * dh];
        if dh > 0 {
            out.par_chunks_mut(dh).enumerate().for_each(|(row, o)| {
                let v = &value[row / q.max(1) * s * dh..][..s * dh];
                let query = &samples[row * per_query..][..per_query];
                for (at, smp) in query.chunks_exact(3).enumerate() {
                    let (x, y, a) = (smp[0], smp[1], smp[2]);
                    // candle's composition carries a non-finite location or weight into the
                    // output as NaN (`inf - inf`, `0 * NaN`); so does this.
                    if !(x.is_finite() && y.is_finite() && a.is_finite()) {
                        o.fill(f32::NAN);
                        continue;
                    }
                    let level = &self.levels[at / points];
                    corners(level, x, y, |token, wy, wx, _, _| {
                        let w = wy * wx * a;
                        for (o, &v) in o.iter_mut().zip(&v[token * dh..][..dh]) {
                            *o += w * v;
                        }
                    });
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((bh, q, dh))))
    }

    cuda_fwd!(|me, value, samples| {
        let d = dims(&me.levels, value.1, samples.1)?;
        crate::cuda_layers::deformable_sample(value, samples, &me.levels, &d)
    });

    fn bwd(
        &self,
        value: &Tensor,
        samples: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = SampleBackward { levels: self.levels.clone() };
        let both = value.apply_op3_no_bwd(samples, &grad.contiguous()?, &op)?;
        let (nv, ns) = (value.elem_count(), samples.elem_count());
        let grad_value = both.narrow(0, 0, nv)?.reshape(value.shape())?;
        let grad_samples = both.narrow(0, nv, ns)?.reshape(samples.shape())?;
        Ok((Some(grad_value), Some(grad_samples)))
    }
}

/// `(value, samples, grad of the output)` -> the gradients of the values and of the samples,
/// flattened one after the other (one op, one output).
struct SampleBackward {
    levels: Vec<Level>,
}

impl CustomOp3 for SampleBackward {
    fn name(&self) -> &'static str {
        "glip-deformable-sample-backward"
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
        let value = contiguous_f32(s1, l1, "deformable sampling backward")?;
        let samples = contiguous_f32(s2, l2, "deformable sampling backward")?;
        let grad = contiguous_f32(s3, l3, "deformable sampling backward")?;
        let Dims { bh, s, dh, q, points } = backward_dims(&self.levels, l1, l2, l3)?;
        let per_query = self.levels.len() * points * 3;
        let (nv, ns) = (bh * s * dh, bh * q * per_query);
        let mut out = vec![0f32; nv + ns];
        let (grad_value, grad_samples) = out.split_at_mut(nv);
        // One task per image and head: it owns its values' gradient rows, which every query of
        // it adds to.
        if bh > 0 {
            grad_value
                .par_chunks_mut((s * dh).max(1))
                .zip(grad_samples.par_chunks_mut((q * per_query).max(1)))
                .enumerate()
                .for_each(|(i, (gv, gs))| {
                    let v = &value[i * s * dh..][..s * dh];
                    for qi in 0..q {
                        let g = &grad[(i * q + qi) * dh..][..dh];
                        let query = &samples[(i * q + qi) * per_query..][..per_query];
                        let gq = &mut gs[qi * per_query..][..per_query];
                        for (at, (smp, gsmp)) in
                            query.chunks_exact(3).zip(gq.chunks_exact_mut(3)).enumerate()
                        {
                            let (x, y, a) = (smp[0], smp[1], smp[2]);
                            if !(x.is_finite() && y.is_finite() && a.is_finite()) {
                                gsmp.fill(f32::NAN);
                                continue;
                            }
                            let (mut gx, mut gy, mut ga) = (0f32, 0f32, 0f32);
                            corners(&self.levels[at / points], x, y, |token, wy, wx, sy, sx| {
                                let row = token * dh..(token + 1) * dh;
                                let dot: f32 =
                                    crate::reduce::sum_zip_by(&v[row.clone()], g, |v, g| v * g);
                                let w = wy * wx * a;
                                for (gv, &g) in gv[row].iter_mut().zip(g) {
                                    *gv += w * g;
                                }
                                ga += wy * wx * dot;
                                gx += sx * wy * dot;
                                gy += sy * wx * dot;
                            });
                            gsmp.copy_from_slice(&[a * gx, a * gy, ga]);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(nv + ns)))
    }

    cuda_fwd!(|me, value, samples, grad| {
        let d = backward_dims(&me.levels, value.1, samples.1, grad.1)?;
        crate::cuda_layers::deformable_sample_backward(value, samples, grad, &me.levels, &d)
    });
}

/// Deformable sampling of `value (bh, s, dh)` (each image's and head's rows of every level,
/// `levels` in order) at `samples (bh, q, levels, points, 3)`: per sample its column and row in
/// its level (column `j` centred on `j`: a normalised `x` is `x * w - 0.5`) and its attention
/// weight; `(bh, q, dh)`, each query's weighted sum of its samples' bilinear reads (zero outside
/// the level). Differentiable in both inputs (the locations through the bilinear weights, not
/// through which tokens they read). f32, on the CPU or (a `cuda` build) on CUDA with up to
/// [`CUDA_MAX_LEVELS`] levels; [`takes`] says whether a caller should use it.
pub fn sample(value: &Tensor, samples: &Tensor, levels: &[Level]) -> Result<Tensor> {
    let on = value.device();
    if !(on.is_cpu() || on.is_cuda()) || value.dtype() != candle_core::DType::F32 {
        candle_core::bail!(
            "deformable sampling runs on the CPU or CUDA in f32, not {:?} {:?}",
            on.location(),
            value.dtype()
        );
    }
    value.contiguous()?.apply_op2(&samples.contiguous()?, Sample { levels: levels.to_vec() })
}

/// The most levels [`sample`] takes on CUDA (its kernels get them by value).
pub const CUDA_MAX_LEVELS: usize = crate::cuda_source::DEFORMABLE_MAX_LEVELS;

/// Whether [`sample`] should compute deformable sampling of `value` (f32) over `levels`
/// levels: always on the CPU; on CUDA in a `cuda` build with glip's own kernels on (not
/// `GLIP_CUDA_COMPOSED=1`, nor `GLIP_CUDA_DEFORMABLE=composed`, which keeps the composition
/// for this op alone, to compare), at most [`CUDA_MAX_LEVELS`] levels, and convolution-style
/// determinism not asked for ([`crate::cuda::deterministic`]: the values' gradient adds with
/// atomics there, in an order that varies from run to run). Otherwise the caller composes the
/// sampling from candle's ops, whose sums have a fixed order.
pub fn takes(value: &Tensor, levels: usize) -> bool {
    if value.dtype() != candle_core::DType::F32 {
        return false;
    }
    value.device().is_cpu()
        || (crate::cuda::own_kernels(value)
            && cuda_enabled()
            && levels <= CUDA_MAX_LEVELS
            && !crate::cuda::deterministic())
}

/// Whether the CUDA kernels may run: unless `GLIP_CUDA_DEFORMABLE` is `composed` (read once).
fn cuda_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLIP_CUDA_DEFORMABLE").map_or(true, |v| v != "composed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use glip_testing::lcg_values;

    /// The samples' gradient against central differences of `sum(out * r)`, step 0.1: the
    /// output is linear in each coordinate between integers (no sample here is within 0.1 of
    /// one) and in the weight, so the difference is exact up to the f32 rounding of the two
    /// losses: each output a sum of at most 16 terms (2 levels x 2 points x 4 neighbours) of
    /// |weight x value| < 0.7 x 2, so within 16 x 2^-24 x 16 x 1.4 = 2.1e-5, times |r| <= 1
    /// over 30 outputs, twice, over the step 0.2: 6.4e-3 at worst. The gradients are O(1): a
    /// wrong sign, a missing factor or a token read from the wrong row is off by more.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let levels = [Level { h: 3, w: 4, start: 0 }, Level { h: 2, w: 2, start: 12 }];
        let (bh, q, points, dh) = (2, 3, 2, 5);
        let value = Var::from_vec(lcg_values(bh * 16 * dh, 1), (bh, 16, dh), &dev)?;
        // Coordinates in [-1.5, 4.5): inside, on the border and outside, none near an integer.
        let n = bh * q * 2 * points;
        let mut smp = Vec::with_capacity(n * 3);
        for i in 0..n {
            let x = -1.5 + ((i * 7) % 12) as f32 * 0.5 + 0.13;
            let y = -1.0 + ((i * 5) % 9) as f32 * 0.5 + 0.29;
            smp.extend([x, y, 0.1 + (i % 4) as f32 * 0.2]);
        }
        let samples = Var::from_vec(smp.clone(), (bh, q, 2, points, 3), &dev)?;
        let r = Tensor::from_vec(lcg_values(bh * q * dh, 2), (bh, q, dh), &dev)? * 0.5;
        let r = r?;
        let loss = |v: &Tensor, s: &Tensor| -> Result<f64> {
            let out = sample(v, s, &levels)?;
            out.to_dtype(candle_core::DType::F64)?
                .mul(&r.to_dtype(candle_core::DType::F64)?)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let out = sample(value.as_tensor(), samples.as_tensor(), &levels)?;
        let grads = (out * &r)?.sum_all()?.backward()?;
        let gs: Vec<f32> = grads.get(&samples).unwrap().flatten_all()?.to_vec1()?;
        let h = 0.1f32;
        for k in 0..smp.len() {
            let mut up = smp.clone();
            up[k] += h;
            let mut down = smp.clone();
            down[k] -= h;
            let fd = (loss(value.as_tensor(), &Tensor::from_vec(up, samples.shape(), &dev)?)?
                - loss(value.as_tensor(), &Tensor::from_vec(down, samples.shape(), &dev)?)?)
                / (2.0 * h as f64);
            assert!((fd - gs[k] as f64).abs() < 6.4e-3, "sample value {k}: {fd} against {}", gs[k]);
        }
        Ok(())
    }

    /// The op and both gradients against exact values (glip-testing's `deformable_reference`,
    /// f64 from the same f32 operands) within the bound derived there for any f32 evaluation:
    /// two levels, samples inside, on the border, outside and on whole numbers, one NaN.
    #[test]
    fn sampling_and_its_gradients_match_exact_values_within_their_bound() -> Result<()> {
        use glip_testing::{check_deformable_op, DeformableCase, DeformableShape};
        let levels = [(3, 4, 0), (2, 3, 12)];
        let shape = DeformableShape { bh: 3, q: 5, points: 3, dh: 7, levels: &levels };
        let kernel_levels: Vec<Level> =
            levels.iter().map(|&(h, w, start)| Level { h, w, start }).collect();
        check_deformable_op(&DeformableCase::new(shape, 41), &Device::Cpu, |v, s| {
            sample(v, s, &kernel_levels)
        })?;
        Ok(())
    }

    /// Where the op applies: f32 on the CPU, whatever the number of levels (the limit is the
    /// CUDA kernels'); values in another dtype go to the caller's composition, and the op itself
    /// refuses them with an error naming it.
    #[test]
    fn the_op_takes_f32_values_and_refuses_others() -> Result<()> {
        let dev = Device::Cpu;
        let value = Tensor::from_vec(lcg_values(4 * 3, 5), (1, 4, 3), &dev)?;
        assert!(takes(&value, 1) && takes(&value, CUDA_MAX_LEVELS + 1));
        let samples = Tensor::zeros((1, 2, 1, 1, 3), candle_core::DType::F32, &dev)?;
        let levels = [Level { h: 2, w: 2, start: 0 }];
        for dtype in [candle_core::DType::BF16, candle_core::DType::F64] {
            let v = value.to_dtype(dtype)?;
            assert!(!takes(&v, 1), "{dtype:?}");
            let err = sample(&v, &samples, &levels).unwrap_err().to_string();
            assert!(err.contains("deformable sampling") && err.contains("f32"), "{err}");
        }
        Ok(())
    }

    /// A non-finite location or weight makes its query's output NaN (as candle's composition
    /// does: `inf - inf`, `0 * NaN`), the other queries' stay finite; levels that do not tile
    /// the values are an error, not a panic.
    #[test]
    fn non_finite_samples_give_nan_and_bad_levels_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let levels = [Level { h: 2, w: 2, start: 0 }];
        let value = Tensor::from_vec(lcg_values(4 * 3, 3), (1, 4, 3), &dev)?;
        for bad in [f32::NAN, f32::INFINITY] {
            for at in 0..3 {
                // Three queries of one sample each; the second's `at` entry is `bad`.
                let mut smp = vec![0.5f32, 0.5, 1.0, 0.2, 0.7, 0.5, 1.0, 0.0, 0.3];
                smp[3 + at] = bad;
                let samples = Tensor::from_vec(smp, (1, 3, 1, 1, 3), &dev)?;
                let out = sample(&value, &samples, &levels)?.to_vec3::<f32>()?;
                assert!(out[0][1].iter().all(|v| v.is_nan()), "{bad} at {at}: {:?}", out[0][1]);
                assert!(out[0][0].iter().chain(&out[0][2]).all(|v| v.is_finite()));
            }
        }
        let samples = Tensor::zeros((1, 3, 1, 1, 3), candle_core::DType::F32, &dev)?;
        for levels in [vec![Level { h: 2, w: 3, start: 0 }], vec![Level { h: 2, w: 2, start: 1 }]] {
            let err = sample(&value, &samples, &levels).unwrap_err().to_string();
            assert!(err.contains("deformable sampling"), "{err}");
        }
        Ok(())
    }
}
