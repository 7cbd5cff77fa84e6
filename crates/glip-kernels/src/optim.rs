//! The optimiser's element-wise work as in-place passes: AdamW's moment update and weight update,
//! the EMA of the weights, and the squared norm of a gradient.
//!
//! Written as candle ops, one AdamW step is some fifteen element-wise passes per parameter, each
//! allocating its result (plus an f64 copy of every gradient for the norm): on ResNet-18's 11.7M
//! parameters about 2 GB of memory traffic a step. Here the moments of a parameter live in one
//! `(2, n)` tensor updated in place from the gradient, then the weight in place from the moments:
//! two passes, no allocation, split over rayon's threads for large tensors; on CUDA the same two
//! passes as one kernel each (the private `cuda_optim` module, the `cuda` feature). Other
//! devices and dtypes run [`adamw_composed`], the candle-op formulation the tests compare
//! against.

use crate::conv::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};
use rayon::prelude::*;

/// Elements per rayon task; below this a pass runs on the calling thread.
const CHUNK: usize = 1 << 15;

/// One AdamW step's constants for one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Factor on the gradient (global-norm clipping; 1 for none).
    pub clip: f64,
    /// Adam's betas.
    pub b1: f64,
    /// Second-moment decay.
    pub b2: f64,
    /// Bias corrections `1 - b1^t`, `1 - b2^t`.
    pub bc1: f64,
    /// Second-moment bias correction.
    pub bc2: f64,
    /// Learning rate of this parameter's group, scheduled.
    pub lr: f64,
    /// Decoupled weight decay (0 for none).
    pub weight_decay: f64,
    /// Adam's epsilon.
    pub eps: f64,
}

/// `(2, shape...)` zeros: the first and second moments of `w`, side by side.
pub fn moments_like(w: &Tensor) -> Result<Tensor> {
    let mut dims = vec![2];
    dims.extend_from_slice(w.dims());
    Tensor::zeros(dims, w.dtype(), w.device())
}

/// Whether the in-place passes apply: contiguous f32 tensors on the CPU, or on CUDA in a build
/// with this crate's `cuda` feature ([`crate::cuda_optim`]'s kernels).
fn in_place(ts: &[&Tensor]) -> bool {
    let here = |t: &Tensor| t.device().is_cpu() || (cfg!(feature = "cuda") && t.device().is_cuda());
    ts.iter().all(|t| here(t) && t.dtype() == DType::F32 && t.is_contiguous())
}

/// Whether the CPU's one-pass ops apply: contiguous f32 tensors on the CPU.
fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// Runs `f(offset, chunk)` over `dst` in chunks of [`CHUNK`], on rayon's threads when there is
/// more than one chunk. The loops inside index plain slices of one length, so they vectorise.
fn chunked(dst: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    if dst.len() <= CHUNK {
        return f(0, dst);
    }
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(k, d)| f(k * CHUNK, d));
}

/// The destination and source slices of an in-place pass, checked to hold `ratio` (dst, src)
/// elements in proportion (moments are two per weight).
fn operands<'a>(
    op: &str,
    (s1, l1): (&'a mut CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    ratio: (usize, usize),
) -> Result<(&'a mut [f32], &'a [f32])> {
    let CpuStorage::F32(v) = s1 else { candle_core::bail!("{op}: f32 only") };
    let Some((a, b)) = l1.contiguous_offsets() else {
        candle_core::bail!("{op}: the destination must be contiguous")
    };
    let (dst, src) = (&mut v[a..b], contiguous_f32(s2, l2, op)?);
    if dst.len() * ratio.1 != src.len() * ratio.0 {
        candle_core::bail!("{op}: {} elements against {}", dst.len(), src.len());
    }
    Ok((dst, src))
}

/// `m = b1 m + (1 - b1) c g`, `v = b2 v + (1 - b2) (c g)^2` over `moments = [m; v]`.
struct Moments(AdamWStep);

impl candle_core::InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "glip-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (mv, g) = operands(self.name(), (s1, l1), (s2, l2), (2, 1))?;
        let n = g.len();
        let h = &self.0;
        let (c, b1, b2) = (h.clip as f32, h.b1 as f32, h.b2 as f32);
        let (a1, a2) = ((1.0 - h.b1) as f32, (1.0 - h.b2) as f32);
        let (m, v) = mv.split_at_mut(n);
        // One pass over m, v and g: m's chunks drive, v's matching chunk is split off alongside.
        let one = |m: &mut [f32], v: &mut [f32], g: &[f32]| {
            let n = m.len();
            let (v, g) = (&mut v[..n], &g[..n]);
            for i in 0..n {
                let gi = c * g[i];
                m[i] = b1 * m[i] + a1 * gi;
                v[i] = b2 * v[i] + a2 * (gi * gi);
            }
        };
        if n <= CHUNK {
            one(m, v, g);
        } else {
            m.par_chunks_mut(CHUNK)
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|((m, v), g)| one(m, v, g));
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_optim::moments((s1, l1), (s2, l2), &self.0)
    }
}

/// `w = w (1 - lr wd) - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)` (torch's arrangement).
struct Apply(AdamWStep);

impl candle_core::InplaceOp2 for Apply {
    fn name(&self) -> &'static str {
        "glip-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (w, mv) = operands(self.name(), (s1, l1), (s2, l2), (1, 2))?;
        let n = w.len();
        let h = &self.0;
        let keep = (1.0 - h.lr * h.weight_decay) as f32;
        let (step, inv_root_bc2, eps) =
            ((h.lr / h.bc1) as f32, (1.0 / h.bc2.sqrt()) as f32, h.eps as f32);
        let (m, v) = mv.split_at(n);
        chunked(w, |lo, w| {
            let n = w.len();
            let (m, v) = (&m[lo..lo + n], &v[lo..lo + n]);
            for i in 0..n {
                w[i] = w[i] * keep - step * m[i] / (v[i].sqrt() * inv_root_bc2 + eps);
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_optim::apply((s1, l1), (s2, l2), &self.0)
    }
}

/// `e = d e + (1 - d) w`.
struct Ema(f64);

impl candle_core::InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "glip-ema"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (e, w) = operands(self.name(), (s1, l1), (s2, l2), (1, 1))?;
        let (d, a) = (self.0 as f32, (1.0 - self.0) as f32);
        chunked(e, |lo, e| {
            let w = &w[lo..lo + e.len()];
            for i in 0..e.len() {
                e[i] = d * e[i] + a * w[i];
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_optim::ema((s1, l1), (s2, l2), self.0)
    }
}

/// One AdamW step of `w` from its gradient `g`, with its `moments` (from [`moments_like`]):
/// in place in f32 on the CPU and on CUDA (the `cuda` feature), [`adamw_composed`] elsewhere.
pub fn adamw_update(w: &Var, moments: &mut Tensor, g: &Tensor, h: &AdamWStep) -> Result<()> {
    let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
    if in_place(&[w.as_tensor(), moments, &g]) {
        moments.inplace_op2(&g, &Moments(*h))?;
        return w.as_tensor().inplace_op2(moments, &Apply(*h));
    }
    let (new_w, new_moments) = adamw_composed(w.as_tensor(), moments, &g, h)?;
    *moments = new_moments;
    w.set(&new_w)
}

/// [`adamw_update`] of every `(weight, moments, gradient, constants)`: on CUDA (contiguous f32
/// tensors on one GPU, the `cuda` feature) one kernel launch for them all, the same arithmetic
/// per element (`cuda_optim`); elsewhere one [`adamw_update`] each, in order.
pub fn adamw_update_all(items: &mut [(&Var, &mut Tensor, &Tensor, AdamWStep)]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(Device::Cuda(dev)) = items.first().map(|i| i.0.device()) {
        let one_gpu = items.iter().all(|(w, mv, g, _)| {
            let ts = [w.as_tensor(), &**mv, *g];
            in_place(&ts) && ts.iter().all(|t| t.device().same_device(items[0].0.device()))
        });
        if one_gpu {
            let rows: Vec<(&Tensor, &Tensor, &Tensor, AdamWStep)> =
                items.iter().map(|(w, mv, g, h)| (w.as_tensor(), &**mv, *g, *h)).collect();
            return crate::cuda_optim::adamw_all(&rows, dev);
        }
    }
    for (w, mv, g, h) in items.iter_mut() {
        adamw_update(w, mv, g, h)?;
    }
    Ok(())
}

/// AdamW in candle ops (`torch.optim.AdamW`'s update): the new weight and moments.
pub fn adamw_composed(
    w: &Tensor,
    moments: &Tensor,
    g: &Tensor,
    h: &AdamWStep,
) -> Result<(Tensor, Tensor)> {
    let g = (g * h.clip)?;
    let m = ((moments.get(0)? * h.b1)? + (&g * (1.0 - h.b1))?)?;
    let v = ((moments.get(1)? * h.b2)? + (g.sqr()? * (1.0 - h.b2))?)?;
    let mut w = w.detach();
    if h.weight_decay > 0.0 {
        w = (&w * (1.0 - h.lr * h.weight_decay))?;
    }
    let denom = ((&v / h.bc2)?.sqrt()? + h.eps)?;
    let upd = ((&m / h.bc1)? / denom)?;
    let w = (w - (upd * h.lr)?)?;
    Ok((w, Tensor::stack(&[m, v], 0)?))
}

/// `ema = d ema + (1 - d) w`, in place in f32 on the CPU and on CUDA (the `cuda` feature).
pub fn ema_update(ema: &mut Tensor, w: &Tensor, d: f64) -> Result<()> {
    if in_place(&[ema, w]) {
        return ema.inplace_op2(w, &Ema(d));
    }
    *ema = ((&*ema * d)? + (w * (1.0 - d))?)?;
    Ok(())
}

/// `sum(x^2)` accumulated in f64 (as a scalar f64 tensor).
struct SumSquares;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "glip-sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        // In interleaved partial sums (`reduce`): one chain of dependent f64 additions, as a
        // plain `sum` is, was 7 % of a seed-r18 training step's samples (`perf`).
        let part = |c: &[f32]| crate::reduce::sum_by(c, |v| (v as f64) * (v as f64));
        let total = if x.len() <= CHUNK {
            part(x)
        } else {
            x.par_chunks(CHUNK).map(part).collect::<Vec<f64>>().iter().sum()
        };
        Ok((CpuStorage::F64(vec![total]), Shape::from(())))
    }
}

/// The sum of the squares of `x`'s elements, accumulated in f64: one pass on the CPU, candle's
/// ops in f64 elsewhere. The chunked sums are added in a fixed order, so the result does not
/// depend on the thread count.
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    sum_squares_tensor(x)?.to_scalar::<f64>()
}

/// [`sum_squares`] as a scalar f64 tensor on `x`'s device.
fn sum_squares_tensor(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x]) {
        return x.apply_op1_no_bwd(&SumSquares);
    }
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(dev), DType::F32) = (x.device(), x.dtype()) {
        return crate::cuda_optim::sum_squares_all(&[x], dev);
    }
    x.to_dtype(DType::F64)?.sqr()?.sum_all()
}

/// The sum of the squares of every element of `xs` (gradient clipping's global norm, squared),
/// accumulated in f64 in the order given. On a GPU the per-tensor sums stay on the device and
/// one copy brings the total back (one synchronisation per step, not one per tensor).
pub fn sum_squares_all(xs: &[&Tensor]) -> Result<f64> {
    let device = xs.first().map_or(Device::Cpu, |x| x.device().clone());
    sum_squares_all_on(xs, &device)?.to_scalar::<f64>()
}

/// [`sum_squares_all`] as a scalar f64 tensor on `device` (the tensors' device, or the CPU's
/// where they are all there), read by the caller with whatever else it reads: nothing here
/// waits for a GPU. On the CPU the same value as [`sum_squares_all`], bit for bit.
pub fn sum_squares_all_on(xs: &[&Tensor], device: &Device) -> Result<Tensor> {
    if xs.iter().all(|x| x.device().is_cpu()) {
        let total = xs
            .iter()
            .try_fold(0f64, |acc, x| Ok::<_, candle_core::Error>(acc + sum_squares(x)?))?;
        return Tensor::new(total, &Device::Cpu)?.to_device(device);
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        if xs.iter().all(|x| x.device().same_device(device) && x.dtype() == DType::F32) {
            return crate::cuda_optim::sum_squares_all(xs, dev);
        }
    }
    let parts = xs.iter().map(|x| sum_squares_tensor(x)).collect::<Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Tensor::new(0f64, device);
    }
    Tensor::stack(&parts, 0)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// f32's unit round-off.
    const U: f64 = f32::EPSILON as f64 / 2.0;

    fn ramp(n: usize, a: f32, b: f32) -> Vec<f32> {
        (0..n).map(|i| a * ((i as f32 * 0.37).sin()) + b * ((i % 7) as f32 - 3.0)).collect()
    }

    /// The in-place passes against the candle-op formulation over three steps, on a tensor
    /// that spans several rayon chunks and ends in a partial one, with clipping and decay. Each
    /// side rounds every one of its ~12 operations once, in another order: per step the weight
    /// differs by at most `4u|w|` from the decay and subtraction and `lr |upd| 32u` from the
    /// update (|upd| = |m^| / (sqrt(v^) + eps) <= 10 here), so after `k` steps by
    /// `k u (4|w| + 320 lr)`.
    #[test]
    fn in_place_adamw_matches_the_composed_update() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 1234;
        let w0 = Tensor::from_vec(ramp(n, 1.5, 0.1), (n / 2, 2), &dev)?;
        let w = Var::from_tensor(&w0)?;
        let mut mv = moments_like(&w0)?;
        let (mut w_ref, mut mv_ref) = (w0.copy()?, moments_like(&w0)?);
        let lr = 1e-2;
        for t in 1..=3 {
            let g = Tensor::from_vec(ramp(n, 0.8 / t as f32, -0.2), w0.dims(), &dev)?;
            let h = AdamWStep {
                clip: 0.7,
                b1: 0.9,
                b2: 0.999,
                bc1: 1.0 - 0.9f64.powi(t),
                bc2: 1.0 - 0.999f64.powi(t),
                lr,
                weight_decay: 0.05,
                eps: 1e-8,
            };
            adamw_update(&w, &mut mv, &g, &h)?;
            (w_ref, mv_ref) = adamw_composed(&w_ref, &mv_ref, &g, &h)?;
            let k = t as f64;
            let got = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let want = w_ref.flatten_all()?.to_vec1::<f32>()?;
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let tol = k * U * (4.0 * (*b as f64).abs() + 320.0 * lr);
                assert!(((a - b) as f64).abs() <= tol, "step {t}, {i}: {a} vs {b} (tol {tol:e})");
            }
        }
        Ok(())
    }

    /// A gradient that is a transposed view (as a matmul's backward gives) is read in its
    /// logical order.
    #[test]
    fn a_transposed_gradient_is_read_in_order() -> Result<()> {
        let dev = Device::Cpu;
        let w0 = Tensor::from_vec(ramp(12, 1.0, 0.0), (3, 4), &dev)?;
        let g = Tensor::from_vec(ramp(12, 0.5, 0.3), (4, 3), &dev)?.t()?;
        assert!(!g.is_contiguous());
        let h = AdamWStep {
            clip: 1.0,
            b1: 0.9,
            b2: 0.999,
            bc1: 0.1,
            bc2: 0.001,
            lr: 0.1,
            weight_decay: 0.0,
            eps: 1e-8,
        };
        let w = Var::from_tensor(&w0)?;
        adamw_update(&w, &mut moments_like(&w0)?, &g, &h)?;
        let (want, _) = adamw_composed(&w0, &moments_like(&w0)?, &g.contiguous()?, &h)?;
        let d = (w.as_tensor() - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        // One step from zero moments: |upd| = 1, so the bound above with k = 1 is 4u + 32u lr.
        assert!(d as f64 <= U * (4.0 * 1.6 + 32.0 * 0.1), "{d}");
        Ok(())
    }

    /// The EMA pass against its formula; the squared norm against an f64 sum, and the same to
    /// the bit on one thread and on several (the chunk sums are added in order).
    #[test]
    fn ema_and_squared_norm() -> Result<()> {
        let dev = Device::Cpu;
        let n = 2 * CHUNK + 77;
        let x = ramp(n, 2.0, 0.5);
        let t = Tensor::from_slice(&x, n, &dev)?;
        let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let many = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let a = one.install(|| sum_squares(&t))?;
        let b = many.install(|| sum_squares(&t))?;
        assert_eq!(a.to_bits(), b.to_bits());
        // f64 sums of n positive terms in two orders: n u64 relative at most.
        assert!((a - exact).abs() <= n as f64 * f64::EPSILON * exact, "{a} vs {exact}");
        let mut e = Tensor::from_vec(ramp(n, 1.0, -0.3), n, &dev)?;
        let want = ((&e * 0.99)? + (&t * 0.01)?)?.to_vec1::<f32>()?;
        ema_update(&mut e, &t, 0.99)?;
        for (a, b) in e.to_vec1::<f32>()?.iter().zip(&want) {
            // Two products and a sum, each rounded once on each side.
            assert!(((a - b) as f64).abs() <= 4.0 * U * (b.abs() as f64 + 1.0), "{a} vs {b}");
        }
        Ok(())
    }
}
