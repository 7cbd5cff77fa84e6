//! The optimiser's in-place passes ([`crate::optim`]) on CUDA: AdamW's moment update, its
//! weight update and the EMA, each one kernel launch per parameter; and the gradient norm's sum
//! of squares over every gradient, one launch per tensor and one for the total.
//!
//! candle's composition of one AdamW step is about sixteen element-wise kernels per parameter,
//! each allocating its result; on a GPU with a few hundred parameter tensors that is thousands
//! of launches a step (at several microseconds each) besides the memory traffic. The kernels are
//! CUDA C (`crate::cuda_source::OPTIM`, compiled once per process with NVRTC: `cuda_launch`),
//! grid-stride loops over `n` elements, the same arithmetic as the CPU passes (NVRTC
//! may fuse a multiply and an add into one FMA, one rounding fewer).
//!
//! Checked on the H200 (2026-12-04): glip-train's `tests/cuda.rs` holds these passes and the
//! sum of squares against the CPU's; `glip bench --phases` timed the optimiser phase of a
//! seed-r50 step (batch 8, 512 px) at 0.116 s with candle's sum of squares, 0.0072 s with
//! [`sum_squares_all`].

#![allow(
    unsafe_code,
    reason = "kernel launches through cudarc: the arguments are checked against the kernels' \
              signatures and the buffers' lengths here"
)]

use crate::cuda_launch::{elementwise, per_row, view, OPTIM};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Storage, Tensor};

/// Runs kernel `name` with `dst` (written in place, `ratio.0` parts) and `src` (`ratio.1` parts)
/// of `n` elements per part, then the scalars.
fn launch(
    name: &str,
    (s1, l1): (&mut CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    ratio: (usize, usize),
    scalars: &[f32],
) -> Result<()> {
    if s1.dtype() != DType::F32 || s2.dtype() != DType::F32 {
        candle_core::bail!("{name}: f32 only")
    }
    let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
    else {
        candle_core::bail!("{name}: both operands must be contiguous")
    };
    let (dst_len, src_len) = (b1 - a1, b2 - a2);
    if dst_len * ratio.1 != src_len * ratio.0 || dst_len % ratio.0 != 0 {
        candle_core::bail!("{name}: {dst_len} elements against {src_len}")
    }
    let n = (dst_len / ratio.0) as u64;
    let dev: CudaDevice = s1.device().clone();
    let func = OPTIM.func(&dev, name)?;
    let src = s2.as_cuda_slice::<f32>()?.slice(a2..b2);
    let mut dst = s1.as_cuda_slice_mut::<f32>()?.slice_mut(a1..b1);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&mut dst);
    b.arg(&src);
    b.arg(&n);
    for s in scalars {
        b.arg(s);
    }
    // SAFETY: every kernel above takes (float *dst, const float *src, unsigned long long n,
    // then `scalars.len()` floats), reads `src[0..ratio.1 n]` and writes `dst[0..ratio.0 n]`:
    // the views' lengths, checked above.
    unsafe { b.launch(elementwise(dst_len / ratio.0)) }.map_err(candle_core::Error::wrap)?;
    Ok(())
}

/// `m = b1 m + (1 - b1) c g`, `v = b2 v + (1 - b2) (c g)^2` over `mv = [m; v]`.
pub(crate) fn moments(
    mv: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    h: &crate::optim::AdamWStep,
) -> Result<()> {
    let s = [h.clip, h.b1, 1.0 - h.b1, h.b2, 1.0 - h.b2].map(|v| v as f32);
    launch("glip_adamw_moments", mv, g, (2, 1), &s)
}

/// `w = w (1 - lr wd) - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)`.
pub(crate) fn apply(
    w: (&mut CudaStorage, &Layout),
    mv: (&CudaStorage, &Layout),
    h: &crate::optim::AdamWStep,
) -> Result<()> {
    let s =
        [1.0 - h.lr * h.weight_decay, h.lr / h.bc1, 1.0 / h.bc2.sqrt(), h.eps].map(|v| v as f32);
    launch("glip_adamw_apply", w, mv, (1, 2), &s)
}

/// `e = d e + (1 - d) w`.
pub(crate) fn ema(
    e: (&mut CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    d: f64,
) -> Result<()> {
    launch("glip_ema", e, w, (1, 1), &[d as f32, (1.0 - d) as f32])
}

/// At most this many blocks (partial sums) per tensor in [`sum_squares_all`].
const MAX_PARTS: usize = 256;

/// The sum of the squares of every element of `xs` (f32 tensors on `dev`), accumulated in f64,
/// as a scalar f64 tensor on `dev`; nothing is read back.
///
/// candle's composition (`to_dtype(F64)`, `sqr`, `sum_all` per tensor, then a stack and a sum)
/// is five kernels and three allocations per tensor, and candle reduces a `sum_all` in a
/// single block, one multiprocessor reading the whole tensor: on the H200 the gradient norm of
/// seed-r50's 135 M parameters made most of the optimiser phase's 0.116 s
/// (`glip bench --phases`). Here each tensor is one launch of up to [`MAX_PARTS`] blocks of
/// grid-stride partial sums (a block per 1,024 elements at least), written side by side into
/// one buffer, then one block adds the buffer. The order of every sum depends on the sizes only.
pub(crate) fn sum_squares_all(xs: &[&Tensor], dev: &CudaDevice) -> Result<Tensor> {
    let threads = crate::cuda_source::THREADS as usize;
    let blocks: Vec<usize> =
        xs.iter().map(|x| x.elem_count().div_ceil(4 * threads).clamp(1, MAX_PARTS)).collect();
    let total: usize = blocks.iter().sum();
    // SAFETY: every one of the `total` partials is written by the block of its tensor below
    // (a block with no elements writes 0) before `glip_sum_f64` reads them.
    let mut parts = unsafe { dev.alloc::<f64>(total.max(1)) }?;
    let stream = dev.cuda_stream();
    let func = OPTIM.func(dev, "glip_sum_squares")?;
    let mut at = 0;
    for (x, &nb) in xs.iter().zip(&blocks) {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("sum of squares: a tensor is not on the GPU")
        };
        if s.device().id() != dev.id() {
            candle_core::bail!("sum of squares: the tensors are on different GPUs")
        }
        let src = view(s, layout, "sum of squares")?;
        let n = src.len() as u64;
        let mut dst = parts.slice_mut(at..at + nb);
        let mut b = stream.launch_builder(&func);
        b.arg(&src);
        b.arg(&n);
        b.arg(&mut dst);
        // `nb` blocks of `THREADS` (the kernels' shared arrays hold one value per thread).
        let cfg = per_row(nb, threads);
        // SAFETY: `glip_sum_squares(const float *x, unsigned long long n, double *parts)`
        // reads `x[0..n]` (the view's length) and writes `parts[blockIdx.x]` for the `nb`
        // blocks of this launch: `dst`'s length.
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        at += nb;
    }
    // SAFETY: `glip_sum_f64` writes its one element.
    let mut out = unsafe { dev.alloc::<f64>(1) }?;
    let func = OPTIM.func(dev, "glip_sum_f64")?;
    let n = total as u64;
    let mut b = stream.launch_builder(&func);
    b.arg(&parts);
    b.arg(&n);
    b.arg(&mut out);
    let cfg = per_row(1, threads);
    // SAFETY: `glip_sum_f64(const double *parts, unsigned long long n, double *out)` reads
    // `parts[0..n]` (`total` of them, all written above) and writes `out[0]`.
    unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Ok(Tensor::from_storage(storage, (), BackpropOp::none(), false))
}

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed, only libnvrtc) and the PTX has all five.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = crate::cuda_launch::OPTIM.ptx().unwrap();
        let names = ["glip_adamw_moments", "glip_adamw_apply", "glip_ema", "glip_sum_squares"];
        for name in names.into_iter().chain(["glip_sum_f64"]) {
            assert!(ptx.contains(&format!(".entry {name}")), "{name} missing from the PTX");
        }
    }
}
