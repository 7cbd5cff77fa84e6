//! The optimiser's in-place passes ([`crate::optim`]) on CUDA: AdamW's moment update, its
//! weight update and the EMA, each one kernel launch per parameter.
//!
//! candle's composition of one AdamW step is about sixteen element-wise kernels per parameter,
//! each allocating its result; on a GPU with a few hundred parameter tensors that is thousands
//! of launches a step (at several microseconds each) besides the memory traffic. The kernels are
//! CUDA C (`crate::cuda_source::OPTIM`, compiled once per process with NVRTC: `cuda_launch`),
//! grid-stride loops over `n` elements, the same arithmetic as the CPU passes (NVRTC
//! may fuse a multiply and an add into one FMA, one rounding fewer).
//!
//! Nothing here has run on a GPU in the session that wrote it (none was lent): glip-train's
//! `tests/cuda.rs` compares these passes with the CPU's on a GPU machine.

#![allow(
    unsafe_code,
    reason = "kernel launches through cudarc: the arguments are checked against the kernels' \
              signatures and the buffers' lengths here"
)]

use crate::cuda_launch::{elementwise, OPTIM};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, Layout, Result};

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

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed, only libnvrtc) and the PTX has all three.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = crate::cuda_launch::OPTIM.ptx().unwrap();
        for name in ["glip_adamw_moments", "glip_adamw_apply", "glip_ema"] {
            assert!(ptx.contains(&format!(".entry {name}")), "{name} missing from the PTX");
        }
    }
}
