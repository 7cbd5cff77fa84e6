//! The GPU side of this crate's dispatch, compiled in every build (a CPU-only build never takes
//! it): TF32 for f32 products, bf16 autocast, and the convolution on CUDA.
//!
//! * [`set_tf32`]: f32 convolutions (cuDNN's default math) and f32 matrix products (candle's
//!   cuBLAS calls, `set_gemm_reduced_precision_f32`) may use TF32 tensor cores: 10-bit
//!   mantissas in the products, f32 sums. Off unless asked for (`run.tf32`): PyTorch's default
//!   is on for convolutions and off for matrix products; the parity suite needs it off.
//! * Inside [`crate::bf16::autocast`]`(Bf16, ..)`, f32 convolutions and `Linear` layers on CUDA
//!   cast their input and weight to bf16, compute in bf16 with f32 sums (cuDNN, cuBLAS) and cast
//!   the result back to f32, forward and backward (as `torch.autocast`): the weights stay f32
//!   (the optimiser's master copy), gradients reach them through the casts as f32, and the loss
//!   and its reductions stay f32. bf16 has f32's exponent range, so no loss scaling.
//! * The convolution: cuDNN with both gradients (the private `cudnn` module, the `cudnn`
//!   feature), else candle's `conv2d` (im2col and a cuBLAS product forward, its autograd
//!   backward).

use crate::bf16::{precision, Precision};
use candle_core::{DType, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static TF32: AtomicBool = AtomicBool::new(false);

/// Allows (or forbids) TF32 tensor cores for f32 convolutions and matrix products on CUDA, for
/// the whole process.
pub fn set_tf32(on: bool) {
    TF32.store(on, Ordering::Relaxed);
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
}

/// Whether f32 products on CUDA may use TF32 (see [`set_tf32`]).
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Asks for (or releases) convolution gradients on CUDA whose sums do not change from run to
/// run, for the whole process: cuDNN's heuristics may rank first an algorithm that adds with
/// atomics (backward-data algorithm 0, backward-filter 0 and 3), whose result changes in the
/// last bits from one run to the next; then algorithm 1 of that direction is used instead, as
/// `torch.backends.cudnn.deterministic` does; and deformable attention's sampling keeps
/// candle's composition, whose sums have a fixed order, instead of glip's kernel, whose values'
/// gradient adds with atomics ([`crate::deformable::takes`]). Off by default (PyTorch's default
/// too), unless `GLIP_CUDNN_DETERMINISTIC=1` is set; every other GPU kernel of a training step
/// already sums in a fixed order.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(on, Ordering::Relaxed);
}

/// Whether convolution gradients on CUDA avoid the algorithms that add with atomics (see
/// [`set_deterministic`]).
pub fn deterministic() -> bool {
    static FROM_ENV: std::sync::Once = std::sync::Once::new();
    FROM_ENV.call_once(|| {
        if std::env::var("GLIP_CUDNN_DETERMINISTIC").is_ok_and(|v| v != "0") {
            DETERMINISTIC.store(true, Ordering::Relaxed);
        }
    });
    DETERMINISTIC.load(Ordering::Relaxed)
}

/// CUDA device `ordinal` as glip computes on it. candle runs everything on one stream (the
/// calling thread's default stream), and cudarc's per-buffer events, which order a buffer's uses
/// across streams, are only consulted once a context has a second stream; yet with event
/// tracking on (cudarc's default) every allocation created and destroyed two of them: 97,260
/// `cuEventCreate` and as many `cuEventDestroy` calls in five seed-r50 training steps on the
/// H200 (`scripts/gpu-trace.cpp`), about 10 ms of host time a step. They are turned off here.
#[cfg_attr(feature = "cuda", allow(unsafe_code, reason = "cudarc's switch for its events"))]
pub fn new_device(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(c) = &device {
        // SAFETY: cudarc's condition for turning the events off is that the caller orders
        // uses across streams itself. glip computes on candle's stream alone; the one other
        // stream is the data loader's worker thread (its own default stream), which waits for
        // its host-to-device copy to finish before it hands a batch over (glip-data's
        // `Loader::for_steps`), so no buffer is used on two streams at once.
        unsafe { c.disable_event_tracking() };
    }
    Ok(device)
}

/// Marks the start (`on`) or the end of a region for a CUDA profiler attached to the process
/// (`cuProfilerStart` / `cuProfilerStop`): `nsys profile -c cudaProfilerApi`, or glip's own
/// tracer (`scripts/gpu-trace.cpp`), then look at that region only. `glip bench` marks its
/// timed iterations. Nothing happens on other devices, nor without a profiler.
pub fn profiler_range(device: &candle_core::Device, on: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver;
        let r = if on { driver::profiler_start() } else { driver::profiler_stop() };
        return r.map_err(|e| candle_core::Error::Msg(format!("cuProfiler: {e}")));
    }
    let _ = (device, on);
    Ok(())
}

/// Whether this build runs CUDA convolutions (and their gradients) through cuDNN.
pub const CUDNN: bool = cfg!(feature = "cudnn");

/// Whether this crate's own CUDA kernels (softmax, layer norm, batch norm, the frozen batch
/// norm's affine map and ReLU, the stem's max-pool) take `x`: a non-empty tensor on CUDA in a
/// `cuda` build, unless `GLIP_CUDA_COMPOSED=1` asks for candle's compositions (to compare the
/// two with `glip bench`).
pub fn own_kernels(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda() && x.elem_count() > 0 && crate::cuda_layers::enabled()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// `f(x, w)` in bf16 when both are f32 on CUDA inside a bf16 autocast scope (the result cast
/// back to f32); with a bf16 `x` (bf16 activations, [`crate::bf16::activation_dtype`]) in bf16
/// with `w` cast to bf16, the result left in bf16; as given otherwise. A gradient-free weight's
/// bf16 copy is made once per bf16 scope ([`crate::bf16::bf16_weight`]).
pub(crate) fn in_autocast(
    x: &Tensor,
    w: &Tensor,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let f32_pair = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if x.dtype() == DType::BF16 && w.dtype() == DType::F32 {
        f(x, &crate::bf16::bf16_weight(w)?)
    } else if precision() == Precision::Bf16 && f32_pair && x.device().is_cuda() {
        f(&x.to_dtype(DType::BF16)?, &crate::bf16::bf16_weight(w)?)?.to_dtype(DType::F32)
    } else {
        f(x, w)
    }
}

/// Whether `x (rows, in) @ w (out, in)^T (+ bias)` takes cuBLAS's bf16 product with an f32
/// result (`cuda_linear`): inside a bf16 autocast, `x`, `w` (and the bias) f32 on CUDA, in a
/// `cuda` build, unless `GLIP_BF16_LINEAR=candle`.
pub(crate) fn bf16_linear_applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    #[cfg(feature = "cuda")]
    {
        precision() == Precision::Bf16
            && x.device().is_cuda()
            && x.dtype() == DType::F32
            && w.dtype() == DType::F32
            && w.rank() == 2
            && bias.is_none_or(|b| b.dtype() == DType::F32 && b.rank() == 1)
            && crate::cuda_linear::enabled()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, bias);
        false
    }
}

/// `x (rows, in) @ w (out, in)^T (+ bias)` in bf16 with f32 sums and result, on CUDA (where
/// [`bf16_linear_applies`]).
pub(crate) fn bf16_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda_linear::linear(x, w, bias)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, bias);
        candle_core::bail!("bf16 linear on CUDA: this build has no `cuda` feature")
    }
}

/// A convolution off the CPU (`groups` of them side by side), in bf16 under autocast: cuDNN's,
/// forward and backward, where this build has it (in NHWC for a channels-last `x`,
/// [`crate::layout`]), else candle's (on an NCHW copy of a channels-last `x`). The result has
/// `x`'s layout.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
) -> Result<Tensor> {
    in_autocast(x, w, |x, w| {
        #[cfg(feature = "cudnn")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
            return crate::cudnn::conv2d(x, w, stride, pad, groups);
        }
        crate::layout::keeping_layout(x, |x| x.conv2d(w, pad, stride, 1, groups))
    })
}
