//! Softmax over the last axis, layer norm, training batch norm and the frozen batch norm's
//! affine map with its ReLU on CUDA, forward and backward: the launches of
//! [`crate::cuda_source::NORM`]'s kernels behind the `cuda_fwd` of [`crate::fused`]'s,
//! [`crate::norm`]'s and [`crate::affine`]'s ops (and [`crate::cuda_source::POOL`]'s, the
//! stem's max-pool, behind [`crate::pool`]'s), so that each is one API with a CPU and a CUDA
//! implementation; and dropout masks drawn on the device ([`crate::nn::dropout`]).
//!
//! candle's differentiable compositions of these (what the CUDA path ran before) are 5-12
//! kernels forward and about twice that backward, each a pass over the tensor and an
//! allocation; here the forward is one kernel (batch norm: two), the backward two or three.
//! Measured on the H200 (2026-12-04, `glip bench`, one call, medians of 10): an f32 training
//! step of seed-r50 (batch 8, 512 px) took 0.297 s with these kernels and 0.636 s with the
//! compositions (`GLIP_CUDA_COMPOSED=1`), seed-r18 (batch 32, 256 px) 0.120 s against 0.141 s.

#![allow(
    unsafe_code,
    reason = "kernel launches, each checking its operands' lengths against what the kernel reads \
              and writes; the deformable kernels' levels passed by value (`DeviceRepr`)"
)]

use crate::cuda_launch::{
    check_len, elementwise, launch, output, output_of, per_row, u32_of, view, view_of, Arg,
};
use crate::cuda_source::kernels::{self, GlipLevels, Kernel, Levels, Read, Value, Write};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{Layout, Result, Shape, Tensor, WithDType};

/// Whether the fused kernels are used (unless `GLIP_CUDA_COMPOSED` is set to anything but `0`,
/// read once).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLIP_CUDA_COMPOSED").map_or(true, |v| v == "0"))
}

/// `(rows, d)` of a tensor normalised over its last axis.
fn rows(l: &Layout, what: &str) -> Result<(u32, u32)> {
    let d = l.dims().last().copied().unwrap_or(1);
    let n = l.shape().elem_count();
    Ok((u32_of(n / d.max(1), what)?, u32_of(d, what)?))
}

/// `(b, c, h w)` of a batch norm's input.
fn planes(l: &Layout) -> Result<(u32, u32, u32)> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok((u32_of(b, "batch norm")?, u32_of(c, "batch norm")?, u32_of(h * w, "batch norm")?))
}

/// `softmax(x)` over the last axis.
pub(crate) fn softmax(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let x = view(s, l, "softmax")?;
    let (r, d) = rows(l, "softmax")?;
    let dev = s.device().clone();
    // Written in full by glip_softmax (every row of d).
    let mut y = output(&dev, x.len())?;
    // SAFETY: `x` is the r d elements of its layout, `y` as long: each block reads and writes its
    // rows' d elements.
    unsafe {
        launch::<kernels::glip_softmax>(&dev, per_row(r as usize, d as usize), (&x, &mut y, r, d))
    }?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

/// `dx = y (dy - sum(dy y))` per row.
pub(crate) fn softmax_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (y, dy) = (view(s1, l1, "softmax backward")?, view(s2, l2, "softmax backward")?);
    check_len("softmax backward", dy.len(), y.len())?;
    let (r, d) = rows(l1, "softmax backward")?;
    let dev = s1.device().clone();
    // Written in full by glip_softmax_backward.
    let mut dx = output(&dev, y.len())?;
    // SAFETY: `y`, `dy` (checked equal) and `dx` hold the r d elements the kernel reads and writes.
    unsafe {
        launch::<kernels::glip_softmax_backward>(
            &dev,
            per_row(r as usize, d as usize),
            (&y, &dy, &mut dx, r, d),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// Layer norm of `x (..., d)` with `w`, `b` `(d,)`.
pub(crate) fn layer_norm(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let x = view(s1, l1, "layer norm")?;
    let (w, bias) = (view(s2, l2, "layer norm weight")?, view(s3, l3, "layer norm bias")?);
    let (r, d) = rows(l1, "layer norm")?;
    check_len("layer norm weight", w.len(), d as usize)?;
    check_len("layer norm bias", bias.len(), d as usize)?;
    let dev = s1.device().clone();
    // Written in full by glip_layer_norm.
    let mut y = output(&dev, x.len())?;
    // SAFETY: `x` and `y` hold r d elements, `w` and `bias` d (checked): what the kernel indexes.
    unsafe {
        launch::<kernels::glip_layer_norm>(
            &dev,
            per_row(r as usize, d as usize),
            (&x, &w, &bias, &mut y, r, d, eps),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// `(x, w, dy)` -> `[dx (n); dweight (d); dbias (d)]`, as the CPU's layer norm backward.
pub(crate) fn layer_norm_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let x = view(s1, l1, "layer norm backward")?;
    let w = view(s2, l2, "layer norm backward")?;
    let dy = view(s3, l3, "layer norm backward")?;
    let (r, d) = rows(l1, "layer norm backward")?;
    check_len("layer norm backward weight", w.len(), d as usize)?;
    check_len("layer norm backward", dy.len(), x.len())?;
    let (n, du) = (x.len(), d as usize);
    let (chunk, parts) = crate::cuda_source::layer_norm_chunks(r as usize);
    let dev = s1.device().clone();
    // out[0..n] by glip_layer_norm_backward, out[n..n + 2d] by glip_sum_parts; stats (2 per
    // row) by the former, part (2d per chunk) by glip_layer_norm_params.
    let mut out = output(&dev, n + 2 * du)?;
    let mut stats = output(&dev, 2 * r as usize)?;
    let mut part = output(&dev, 2 * du * parts)?;
    {
        let mut dx = out.slice_mut(0..n);
        // SAFETY: `x`, `dy` (checked) and `dx` hold r d elements, `w` d (checked), `stats` 2 r:
        // what it indexes.
        unsafe {
            launch::<kernels::glip_layer_norm_backward>(
                &dev,
                per_row(r as usize, du),
                (&x, &w, &dy, &mut dx, &mut stats, r, d, eps),
            )
        }?;
    }
    {
        let chunk_u = u32_of(chunk, "layer norm backward")?;
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(128), parts as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `x`, `dy` r d elements, `stats` 2 r, `part` 2 d per chunk of rows, `parts`
        // chunks.
        unsafe {
            launch::<kernels::glip_layer_norm_params>(
                &dev,
                cfg,
                (&x, &dy, &stats, &mut part, r, d, chunk_u),
            )
        }?;
    }
    {
        let (parts_u, m) = (parts as u32, 2 * d);
        let mut sums = out.slice_mut(n..n + 2 * du);
        // SAFETY: `part` holds `parts` rows of 2 d sums, `sums` the 2 d it writes.
        unsafe {
            launch::<kernels::glip_sum_parts>(
                &dev,
                elementwise(2 * du),
                (&part, &mut sums, parts_u, m),
            )
        }?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n + 2 * du)))
}

/// `(3, c)`: the batch mean, biased variance and `1 / sqrt(var + eps)` of every channel of
/// `x (b, c, h, w)`.
pub(crate) fn batch_norm_stats(
    s: &CudaStorage,
    l: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let x = view(s, l, "batch norm")?;
    let (bs, c, hw) = planes(l)?;
    let dev = s.device().clone();
    // Written in full (3 per channel) by glip_batch_norm_stats.
    let mut p = output(&dev, 3 * c as usize)?;
    // SAFETY: `x` holds b c hw elements (its layout's dims), `p` the 3 c it writes.
    unsafe {
        launch::<kernels::glip_batch_norm_stats>(
            &dev,
            per_row(c as usize, bs as usize * hw as usize),
            (&x, &mut p, bs, c, hw, eps),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(p, dev), Shape::from((3, c as usize))))
}

/// `y = (x - mean) invstd weight + bias` with `p (5, c)`: mean, variance, invstd, weight, bias.
pub(crate) fn batch_norm(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (x, p) = (view(s1, l1, "batch norm")?, view(s2, l2, "batch norm parameters")?);
    let (_, c, hw) = planes(l1)?;
    check_len("batch norm parameters", p.len(), 5 * c as usize)?;
    let dev = s1.device().clone();
    let total = x.len() as u64;
    // Written in full by glip_batch_norm.
    let mut y = output(&dev, x.len())?;
    // SAFETY: `x` and `y` hold `total` elements, `p` 5 c (checked).
    unsafe {
        launch::<kernels::glip_batch_norm>(
            &dev,
            elementwise(x.len()),
            (&x, &p, &mut y, total, c, hw),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// `(x, p, dy)` -> `[dx (n); dgamma (c); dbeta (c)]`, as the CPU's batch norm backward.
pub(crate) fn batch_norm_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let x = view(s1, l1, "batch norm backward")?;
    let p = view(s2, l2, "batch norm backward parameters")?;
    let dy = view(s3, l3, "batch norm backward")?;
    let (bs, c, hw) = planes(l1)?;
    check_len("batch norm backward parameters", p.len(), 5 * c as usize)?;
    check_len("batch norm backward", dy.len(), x.len())?;
    let (n, cu) = (x.len(), c as usize);
    let dev = s1.device().clone();
    // out[n..n + 2c] by glip_batch_norm_sums, then out[0..n] by glip_batch_norm_backward.
    let mut out = output(&dev, n + 2 * cu)?;
    {
        let mut sums = out.slice_mut(n..n + 2 * cu);
        // SAFETY: `x`, `dy` hold b c hw elements, `p` 5 c (checked), `sums` the 2 c it writes.
        unsafe {
            launch::<kernels::glip_batch_norm_sums>(
                &dev,
                per_row(cu, bs as usize * hw as usize),
                (&x, &p, &dy, &mut sums, bs, c, hw),
            )
        }?;
    }
    {
        let (total, count) = (n as u64, (bs as usize * hw as usize).max(1) as f32);
        // SAFETY: `x` and `dy` hold `total` elements, `p` 5 c (checked), `out` total + 2 c: dx
        // written at [0, total), the sums above read at [total, total + 2 c).
        unsafe {
            launch::<kernels::glip_batch_norm_backward>(
                &dev,
                elementwise(n),
                (&x, &p, &dy, &mut out, total, c, hw, count),
            )
        }?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n + 2 * cu)))
}

/// The activations the affine and pool kernels read and write: f32 and bf16 (computed in f32),
/// with their kernels.
trait Act: CudaDType + DeviceRepr + WithDType {
    type Affine: Kernel<
        Params = (Read<Self>, Read<f32>, Read<Self>, Write<Self>, u64, u32, u32, u32),
    >;
    type AffineBackward: Kernel<
        Params = (Read<Self>, Read<Self>, Read<f32>, Write<Self>, u64, u32, u32, u32),
    >;
    type MaxPool: Kernel<Params = (Read<Self>, Write<Self>, u64, u32, u32, u32, u32)>;
    type MaxPoolBackward: Kernel<
        Params = (Read<Self>, Read<Self>, Write<Self>, u64, u32, u32, u32, u32),
    >;
}

impl Act for f32 {
    type Affine = kernels::glip_affine_f32;
    type AffineBackward = kernels::glip_affine_backward_f32;
    type MaxPool = kernels::glip_max_pool_f32;
    type MaxPoolBackward = kernels::glip_max_pool_backward_f32;
}

impl Act for half::bf16 {
    type Affine = kernels::glip_affine_bf16;
    type AffineBackward = kernels::glip_affine_backward_bf16;
    type MaxPool = kernels::glip_max_pool_bf16;
    type MaxPoolBackward = kernels::glip_max_pool_backward_bf16;
}

/// `f::<T>()` for the activation type of `dtype`, or an error naming `what`.
macro_rules! by_act {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            d => candle_core::bail!("{}: f32 or bf16 on CUDA, got {d:?}", $what),
        }
    };
}

/// The kernels' `flags`: `GLIP_ADD` (1) with a residual, `GLIP_RELU` (2) with the ReLU.
fn affine_flags(residual: bool, relu: bool) -> u32 {
    u32::from(residual) | (u32::from(relu) << 1)
}

/// `x s + t (+ r)`, then with `relu` the ReLU, with `ss (2, c)` = `[s; t]` (f32), in `x`'s
/// dtype (f32 or bf16; `r` the same).
pub(crate) fn affine(
    x: (&CudaStorage, &Layout),
    ss: (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    by_act!(x.0.dtype(), "channel affine", affine_of(x, ss, residual, relu))
}

fn affine_of<T: Act>(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    let x = view_of::<T>(s1, l1, "channel affine")?;
    let ss = view(s2, l2, "channel affine constants")?;
    let (_, c, hw) = planes(l1)?;
    check_len("channel affine constants", ss.len(), 2 * c as usize)?;
    let r = match residual {
        Some((s, l)) => {
            let r = view_of::<T>(s, l, "channel affine residual")?;
            check_len("channel affine residual", r.len(), x.len())?;
            Some(r)
        }
        None => None,
    };
    let dev = s1.device().clone();
    let (total, flags) = (x.len() as u64, affine_flags(r.is_some(), relu));
    // Written in full by glip_affine_*.
    let mut y = output_of::<T>(&dev, x.len())?;
    // Without a residual the kernel does not read `r`; `x` stands in for the pointer.
    let r = r.as_ref().unwrap_or(&x);
    // SAFETY: `x`, `r` (checked) and `y` hold `total` elements of c planes of hw, `ss` 2 c
    // (checked).
    unsafe {
        launch::<T::Affine>(&dev, elementwise(x.len()), (&x, &ss, r, &mut y, total, c, hw, flags))
    }?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// `(y, dy, ss)` -> `dx` (`n`), or with `residual` `[dx; dresidual]` (`2 n`), in `y`'s dtype;
/// with `relu` the gradient is masked by `y > 0`.
pub(crate) fn affine_backward(
    y: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
    ss: (&CudaStorage, &Layout),
    residual: bool,
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    by_act!(y.0.dtype(), "channel affine backward", affine_backward_of(y, dy, ss, residual, relu))
}

fn affine_backward_of<T: Act>(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    residual: bool,
    relu: bool,
) -> Result<(CudaStorage, Shape)> {
    let y = view_of::<T>(s1, l1, "channel affine backward")?;
    let dy = view_of::<T>(s2, l2, "channel affine backward")?;
    let ss = view(s3, l3, "channel affine backward constants")?;
    let (_, c, hw) = planes(l1)?;
    check_len("channel affine backward", dy.len(), y.len())?;
    check_len("channel affine backward constants", ss.len(), 2 * c as usize)?;
    let n = y.len();
    let len = if residual { 2 * n } else { n };
    let dev = s1.device().clone();
    let (total, flags) = (n as u64, affine_flags(residual, relu));
    // Written in full by glip_affine_backward_* (dx, and dr with a residual).
    let mut out = output_of::<T>(&dev, len)?;
    // SAFETY: `y`, `dy` (checked) hold `total` elements, `ss` 2 c (checked), `out` the n or 2 n it
    // writes.
    unsafe {
        launch::<T::AffineBackward>(
            &dev,
            elementwise(n),
            (&y, &dy, &ss, &mut out, total, c, hw, flags),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
}

/// Runs `f` on the GPU of `operands` with their contiguous f32 elements (named by `names` in
/// errors: not on the GPU, on different GPUs, not f32 or not contiguous), the operands'
/// storage read-locked meanwhile: for launches of gradient-free results made from tensors
/// (`bn_constants`, `add_layer_norm`).
fn with_f32_views<const N: usize, R>(
    what: &str,
    operands: [&Tensor; N],
    names: [&str; N],
    f: impl FnOnce(&CudaDevice, &[CudaView<'_, f32>]) -> Result<R>,
) -> Result<R> {
    with_storages(what, &operands, &names, |dev, storages| {
        let views = storages.iter().map(|(s, l)| view(s, l, what)).collect::<Result<Vec<_>>>()?;
        f(dev, &views)
    })
}

/// Runs `f` on the GPU of `operands` with their storages and layouts (read-locked meanwhile),
/// after checking that they are on one GPU (errors naming `what` and the operand's name).
fn with_storages<R>(
    what: &str,
    operands: &[&Tensor],
    names: &[&str],
    f: impl FnOnce(&CudaDevice, &[(&CudaStorage, &Layout)]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = operands.iter().map(|t| t.storage_and_layout()).collect();
    let mut storages = Vec::with_capacity(guards.len());
    let mut dev: Option<CudaDevice> = None;
    for (name, (storage, layout)) in names.iter().zip(guards.iter()) {
        let candle_core::Storage::Cuda(s) = &**storage else {
            candle_core::bail!("{what}: the {name} is not on the GPU")
        };
        if dev.as_ref().is_some_and(|d| d.id() != s.device().id()) {
            candle_core::bail!("{what}: the operands are on different GPUs")
        }
        dev = Some(s.device().clone());
        storages.push((s, *layout));
    }
    let Some(dev) = dev else { candle_core::bail!("{what}: no operands") };
    f(&dev, &storages)
}

/// The f32 rows of a `(b, l, w)` operand whose rows are evenly spaced and each contiguous (a
/// contiguous tensor, or a block of columns of one: q, k and v out of a packed projection),
/// from its first element, with the row stride; an error naming `what` otherwise.
fn row_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<(CudaView<'a, f32>, u32)> {
    let (b, rows, w) = l.shape().dims3()?;
    let Some(ld) = crate::attention::row_stride(l.dims(), l.stride()) else {
        candle_core::bail!("{what}: the rows are not evenly spaced and contiguous")
    };
    if s.dtype() != candle_core::DType::F32 {
        candle_core::bail!("{what}: expected F32, got {:?}", s.dtype())
    }
    let start = l.start_offset();
    let len = (b * rows - 1) * ld + w;
    Ok((s.as_cuda_slice::<f32>()?.slice(start..start + len), u32_of(ld, what)?))
}

/// `slice` as a gradient-free tensor of `shape` on `dev`.
fn tensor_of(slice: CudaSlice<f32>, dev: CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev));
    Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
}

/// A batch norm's constants outside training, `[s; t]` `(2, c)` with `s = w / sqrt(rv + eps)`
/// and `t = b - rm s`, in one launch (candle's composition is eight); no gradient.
pub(crate) fn bn_constants(
    w: &Tensor,
    b: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let c = w.elem_count();
    let names = ["weight", "bias", "running mean", "running variance"];
    with_f32_views("batch norm constants", [w, b, rm, rv], names, |dev, views| {
        for (name, v) in names.iter().zip(views) {
            if v.len() != c {
                candle_core::bail!(
                    "batch norm constants: the {name} has {} of {c} channels",
                    v.len()
                )
            }
        }
        let c32 = u32_of(c, "batch norm constants")?;
        // Written in full by glip_bn_constants (one thread per channel).
        let mut ss = output(dev, 2 * c)?;
        // SAFETY: the four vectors hold c elements each (checked), `ss` the 2 c it writes.
        unsafe {
            launch::<kernels::glip_bn_constants>(
                dev,
                elementwise(c),
                (&views[0], &views[1], &views[2], &views[3], &mut ss, c32, eps),
            )
        }?;
        Ok(tensor_of(ss, dev.clone(), (2, c)))
    })
}

/// `layer_norm(x + r)` over the last axis in one launch ([`crate::fused::layer_norm_residual`]
/// checks the operands): the sum rounded once, as candle's `add`, then `glip_layer_norm`'s
/// arithmetic, so the result is the composition's bit for bit; no gradient.
pub(crate) fn add_layer_norm(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let names = ["input", "residual", "weight", "bias"];
    with_f32_views("layer norm", [x, r, w, b], names, |dev, views| {
        let (rows, d) = rows(x.layout(), "layer norm")?;
        check_len("layer norm residual", views[1].len(), views[0].len())?;
        check_len("layer norm weight", views[2].len(), d as usize)?;
        check_len("layer norm bias", views[3].len(), d as usize)?;
        // Written in full by glip_add_layer_norm (every row of d).
        let mut y = output(dev, views[0].len())?;
        // SAFETY: `x`, the residual (checked) and `y` hold `rows` d elements, weight and bias d
        // (checked).
        unsafe {
            launch::<kernels::glip_add_layer_norm>(
                dev,
                per_row(rows as usize, d as usize),
                (&views[0], &views[1], &views[2], &views[3], &mut y, rows, d, eps),
            )
        }?;
        Ok(tensor_of(y, dev.clone(), x.shape()))
    })
}

/// `softmax(q k^T s + bias) v` per head in one launch ([`crate::attention::fused`], which checks
/// the shapes, dtypes and head width): `q (b, lq, d)`, `k`, `v (b, lk, d)` f32 on one GPU, each
/// row contiguous and the rows evenly spaced ([`row_view`]: contiguous, or column blocks of a
/// packed projection), `mask (b, lk)` u8; `(b, lq, d)` contiguous, no gradient.
pub(crate) fn attention(
    [q, k, v]: [&Tensor; 3],
    mask: Option<&Tensor>,
    heads: usize,
    scale: f32,
    scale_scores: bool,
) -> Result<Tensor> {
    let (b, lq, d) = q.dims3()?;
    let lk = k.dim(1)?;
    // The key mask, where given, is the fourth operand.
    let operands: Vec<&Tensor> = [q, k, v].into_iter().chain(mask).collect();
    let names = ["query", "key", "value", "key mask"];
    with_storages("attention", &operands, &names, |dev, storages| {
        let views = storages[..3]
            .iter()
            .map(|(s, l)| row_view(s, l, "attention"))
            .collect::<Result<Vec<_>>>()?;
        let mask_view = match storages.get(3) {
            Some((s, l)) => {
                let m = view_of::<u8>(s, l, "attention key mask")?;
                check_len("attention key mask", m.len(), b * lk)?;
                Some(m)
            }
            None => None,
        };
        let u = |n: usize| u32_of(n, "attention");
        let (hu, dh) = (u(heads)?, u(d / heads)?);
        let (lq32, lk32) = (u(lq)?, u(lk)?);
        let qt = crate::cuda_source::ATTENTION_QUERY_TILE;
        let cfg = LaunchConfig {
            grid_dim: (u(lq.div_ceil(qt))?, u(b * heads)?, 1),
            block_dim: (crate::cuda_source::ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let flag = u32::from(scale_scores);
        // Written in full by glip_attention (every query row of every head, all dh columns).
        let mut out = output(dev, b * lq * d)?;
        let [(q, q_ld), (k, k_ld), (v, v_ld)] = [&views[0], &views[1], &views[2]];
        // SAFETY: the row views span the b lq (or lk) rows at their strides, the mask b lk
        // (checked), `out` the b lq d it writes.
        unsafe {
            launch::<kernels::glip_attention>(
                dev,
                cfg,
                (
                    q,
                    k,
                    v,
                    mask_view.as_ref(),
                    &mut out,
                    hu,
                    lq32,
                    lk32,
                    dh,
                    *q_ld,
                    *k_ld,
                    *v_ld,
                    scale,
                    flag,
                ),
            )
        }?;
        Ok(tensor_of(out, dev.clone(), (b, lq, d)))
    })
}

// SAFETY: a plain `#[repr(C)]` struct of u32s, laid out as the kernels' `GlipLevels` (an
// unsigned count and an array of unsigneds: 4-byte aligned, no padding).
unsafe impl DeviceRepr for GlipLevels {}

impl Arg<Levels> for GlipLevels {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        b.arg(&*self);
    }

    fn value(&self) -> Value {
        Value::Levels(*self)
    }
}

fn deform_levels(levels: &[crate::deformable::Level]) -> Result<GlipLevels> {
    let max = crate::cuda_source::DEFORMABLE_MAX_LEVELS;
    if levels.len() > max {
        candle_core::bail!("deformable sampling on CUDA: {} levels, at most {max}", levels.len())
    }
    let mut hws = [0u32; 3 * crate::cuda_source::DEFORMABLE_MAX_LEVELS];
    for (l, level) in levels.iter().enumerate() {
        for (k, n) in [level.h, level.w, level.start].into_iter().enumerate() {
            hws[3 * l + k] = u32_of(n, "deformable sampling")?;
        }
    }
    Ok(GlipLevels { n: levels.len() as u32, hws })
}

/// `[s, dh, q, points]` of a call, as the kernels take them.
fn deform_dims(d: &crate::deformable::Dims) -> Result<[u32; 4]> {
    let u = |n: usize| u32_of(n, "deformable sampling");
    Ok([u(d.s)?, u(d.dh)?, u(d.q)?, u(d.points)?])
}

/// Deformable sampling ([`crate::deformable`]) on CUDA: `value (bh, s, dh)` and `samples (bh, q,
/// levels, points, 3)` contiguous f32 (shapes checked by the caller: `d`) -> `(bh, q, dh)`.
pub(crate) fn deformable_sample(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    levels: &[crate::deformable::Level],
    d: &crate::deformable::Dims,
) -> Result<(CudaStorage, Shape)> {
    let value = view(s1, l1, "deformable sampling")?;
    let samples = view(s2, l2, "deformable sampling")?;
    let per_query = levels.len() * d.points;
    check_len("deformable sampling values", value.len(), d.bh * d.s * d.dh)?;
    check_len("deformable sampling samples", samples.len(), d.bh * d.q * per_query * 3)?;
    let lv = deform_levels(levels)?;
    let [s, dh, q, points] = deform_dims(d)?;
    let n = d.bh * d.q * d.dh;
    let n64 = n as u64;
    let dev = s1.device().clone();
    // Written whole by glip_deformable_sample (one thread per element, grid-stride).
    let mut out = output(&dev, n)?;
    // SAFETY: `value` and `samples` hold what `d` says (checked), `out` the n it writes; the
    // kernel reads only neighbours inside a level, and the levels tile the s value rows
    // (`deformable::dims`).
    unsafe {
        launch::<kernels::glip_deformable_sample>(
            &dev,
            elementwise(n),
            (&value, &samples, lv, &mut out, s, dh, q, points, n64),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((d.bh, d.q, d.dh))))
}

/// Deformable sampling's backward on CUDA: `(value, samples, grad (bh, q, dh))` -> the values'
/// gradient then the samples', flattened one after the other (the CPU op's packing).
pub(crate) fn deformable_sample_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    levels: &[crate::deformable::Level],
    d: &crate::deformable::Dims,
) -> Result<(CudaStorage, Shape)> {
    let what = "deformable sampling backward";
    let value = view(s1, l1, what)?;
    let samples = view(s2, l2, what)?;
    let grad = view(s3, l3, what)?;
    let per_query = levels.len() * d.points;
    let (nv, ns) = (d.bh * d.s * d.dh, d.bh * d.q * per_query * 3);
    check_len("deformable sampling backward values", value.len(), nv)?;
    check_len("deformable sampling backward samples", samples.len(), ns)?;
    check_len("deformable sampling backward gradient", grad.len(), d.bh * d.q * d.dh)?;
    let lv = deform_levels(levels)?;
    let [s, dh, q, points] = deform_dims(d)?;
    let dev = s1.device().clone();
    // The values' gradient is added into (atomically): zeros first. The samples' part is
    // written whole.
    let mut out = dev.alloc_zeros::<f32>((nv + ns).max(1))?;
    {
        let n = d.bh * d.q * d.dh;
        let n64 = n as u64;
        let mut gv = out.slice_mut(0..nv);
        // SAFETY: `samples` and `grad` hold what `d` says (checked), `gv` the value's nv
        // elements, written only at neighbours inside a level (the levels tile the s rows).
        unsafe {
            launch::<kernels::glip_deformable_value_grad>(
                &dev,
                elementwise(n),
                (&samples, &grad, lv, &mut gv, s, dh, q, points, n64),
            )
        }?;
    }
    {
        let n = d.bh * d.q * per_query;
        let n64 = n as u64;
        let mut gs = out.slice_mut(nv..nv + ns);
        // SAFETY: `value`, `samples`, `grad` hold what `d` says (checked), `gs` the samples' ns
        // elements; values are read only inside a level (the levels tile the s rows).
        unsafe {
            launch::<kernels::glip_deformable_sample_grad>(
                &dev,
                elementwise(n),
                (&value, &samples, &grad, lv, &mut gs, s, dh, q, points, n64),
            )
        }?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(nv + ns)))
}

/// `(planes, h, w, oh, ow)` of the stem pool's input `l`.
fn pool_dims(l: &Layout) -> Result<(u64, u32, u32, u32, u32)> {
    let (b, c, h, w) = l.shape().dims4()?;
    let (oh, ow) = crate::pool::out_dims(h, w);
    let u = |n| u32_of(n, "max pool");
    Ok(((b * c) as u64, u(h)?, u(w)?, u(oh)?, u(ow)?))
}

/// The stem's max-pool of `x (b, c, h, w)`, f32 or bf16.
pub(crate) fn max_pool(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    by_act!(s.dtype(), "max pool", max_pool_of(s, l))
}

fn max_pool_of<T: Act>(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let x = view_of::<T>(s, l, "max pool")?;
    let (planes, h, w, oh, ow) = pool_dims(l)?;
    let n = planes as usize * oh as usize * ow as usize;
    let dev = s.device().clone();
    // Written in full (one thread per output) by glip_max_pool_*.
    let mut y = output_of::<T>(&dev, n)?;
    // SAFETY: `x` holds planes h w elements (its dims), `y` the planes oh ow it writes.
    unsafe { launch::<T::MaxPool>(&dev, elementwise(n), (&x, &mut y, planes, h, w, oh, ow)) }?;
    let (bs, c, _, _) = l.shape().dims4()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((bs, c, oh as usize, ow as usize))))
}

/// The stem pool's input gradient from `x` and the output gradient `g` (both f32 or both bf16).
pub(crate) fn max_pool_backward(
    x: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    by_act!(x.0.dtype(), "max pool backward", max_pool_backward_of(x, g))
}

fn max_pool_backward_of<T: Act>(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let x = view_of::<T>(s1, l1, "max pool backward")?;
    let g = view_of::<T>(s2, l2, "max pool backward")?;
    let (planes, h, w, oh, ow) = pool_dims(l1)?;
    check_len("max pool backward", g.len(), planes as usize * oh as usize * ow as usize)?;
    let dev = s1.device().clone();
    // Written in full (one thread per input) by glip_max_pool_backward_*.
    let mut dx = output_of::<T>(&dev, x.len())?;
    // SAFETY: `x` and `dx` hold planes h w elements, `g` planes oh ow (checked).
    unsafe {
        launch::<T::MaxPoolBackward>(
            &dev,
            elementwise(x.len()),
            (&x, &g, &mut dx, planes, h, w, oh, ow),
        )
    }?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// Dropout applied to `x` (`x * mask`, the mask `scale` kept and 0 dropped, drawn from
/// `seed` in the same pass: [`crate::cuda_source::ELEMENTWISE`]).
pub(crate) fn dropout(
    s: &CudaStorage,
    l: &Layout,
    seed: u64,
    p: f32,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let x = view(s, l, "dropout")?;
    let n = x.len();
    let dev = s.device().clone();
    // Written in full by glip_dropout.
    let mut y = output(&dev, n)?;
    let n64 = n as u64;
    // SAFETY: `x` and `y` hold the n elements the kernel reads and writes.
    unsafe {
        launch::<kernels::glip_dropout>(&dev, elementwise(n), (&x, &mut y, n64, seed, p, scale))
    }?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}

/// An activation's gradient `dx` from its input `x` and output gradient `dy`: with `relu`
/// ReLU's (`glip_relu_backward` of [`crate::cuda_source::ELEMENTWISE`]), else GELU's
/// (`glip_gelu_erf_backward`).
pub(crate) fn activation_backward(
    relu: bool,
    x: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    if relu {
        activation_backward_of::<kernels::glip_relu_backward>(x, dy)
    } else {
        activation_backward_of::<kernels::glip_gelu_erf_backward>(x, dy)
    }
}

fn activation_backward_of<K: Kernel<Params = (Read<f32>, Read<f32>, Write<f32>, u64)>>(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (x, dy) = (view(s1, l1, K::NAME)?, view(s2, l2, K::NAME)?);
    check_len(K::NAME, dy.len(), x.len())?;
    let n = x.len();
    let dev = s1.device().clone();
    // Written in full by the kernel.
    let mut dx = output(&dev, n)?;
    // SAFETY: `x`, `dy` (checked) and `dx` hold the n elements the kernel reads and writes.
    unsafe { launch::<K>(&dev, elementwise(n), (&x, &dy, &mut dx, n as u64)) }?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// Each row's `k` best indices, best first, `(rows, s)` f32 -> `(rows, k)` u32
/// ([`crate::cuda_source::TOP_K`]; `0 < k <= s`).
pub(crate) fn top_k(s: &CudaStorage, l: &Layout, k: usize) -> Result<(CudaStorage, Shape)> {
    let x = view(s, l, "top-k")?;
    let (rows, len) = l.shape().dims2()?;
    if k == 0 || k > len || rows > MAX_GRID_Y {
        candle_core::bail!("top-k: {k} of rows of {len}, {rows} rows (at most {MAX_GRID_Y})")
    }
    let dev = s.device().clone();
    // SAFETY: glip_top_k writes each row's k outputs once each (the ranks of a row's elements
    // are 0..len, distinct, and those under k write).
    let mut out = unsafe { dev.alloc::<u32>(rows * k) }?;
    let (len32, k32) = (u32_of(len, "top-k")?, u32_of(k, "top-k")?);
    let t = crate::cuda_source::THREADS;
    let cfg = LaunchConfig {
        grid_dim: (u32_of(len.div_ceil(t as usize), "top-k")?, rows as u32, 1),
        block_dim: (t, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `x` holds rows of len, `out` the rows k it writes (k <= len checked).
    unsafe { launch::<kernels::glip_top_k>(&dev, cfg, (&x, &mut out, len32, k32)) }?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, k))))
}

/// The most rows of a launch over `(blocks, rows)`: CUDA's limit on `gridDim.y`.
const MAX_GRID_Y: usize = 65_535;

/// Batch norm's statistics `(3, c)` on the device: mean, biased variance, inverse standard
/// deviation ([`crate::norm::batch_norm_train`]).
pub(crate) struct BnStats {
    pub(crate) eps: f64,
}

cuda_op!(CustomOp1 for BnStats, "glip-bn-stats-cuda", |me, x| batch_norm_stats(x.0, x.1, me.eps));

/// `y` of a training batch norm from `x` and `p (5, c)` = `[stats; weight; bias]`; the
/// backward gives `dx`, and `[0; 0; 0; dweight; dbias]` for `p`.
pub(crate) struct BnNormalize;

cuda_op!(CustomOp2 for BnNormalize, "glip-bn-cuda", |_me, x, p| batch_norm(x, p),
bwd |x, p, _y, dy| {
    let (n, c) = (x.elem_count(), p.dim(1)?);
    let packed = x.apply_op3_no_bwd(p, &dy.contiguous()?, &BnBackward)?;
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let dwb = packed.narrow(0, n, 2 * c)?.reshape((2, c))?;
    let dp = Tensor::cat(&[&Tensor::zeros((3, c), p.dtype(), p.device())?, &dwb], 0)?;
    Ok((Some(dx), Some(dp)))
});

struct BnBackward;

cuda_op!(CustomOp3 for BnBackward, "glip-bn-backward-cuda", |_me, x, p, dy| {
    batch_norm_backward(x, p, dy)
});

/// `x s + t`, with `relu` its ReLU, with the constants `ss = [s; t]` `(2, c)`
/// ([`crate::affine::channel_affine`]); no gradient for the constants.
pub(crate) struct Affine {
    pub(crate) relu: bool,
}

cuda_op!(CustomOp2 for Affine, "glip-channel-affine-cuda",
|me, x, ss| affine(x, ss, None, me.relu),
bwd |_x, ss, y, dy| {
    let op = AffineBackward { residual: false, relu: me.relu };
    let dx = y.apply_op3_no_bwd(&dy.contiguous()?, ss, &op)?;
    Ok((Some(dx.reshape(y.shape())?), None))
});

/// `x s + t + r`, the same with a residual.
pub(crate) struct AffineAdd {
    pub(crate) relu: bool,
}

cuda_op!(CustomOp3 for AffineAdd, "glip-channel-affine-add-cuda",
|me, x, ss, r| {
    if x.1.dims() != r.1.dims() {
        candle_core::bail!("channel affine: {:?} against a residual {:?}", x.1.dims(), r.1.dims());
    }
    affine(x, ss, Some(r), me.relu)
},
bwd |_x, ss, _r, y, dy| {
    let op = AffineBackward { residual: true, relu: me.relu };
    let both = y.apply_op3_no_bwd(&dy.contiguous()?, ss, &op)?;
    let both = both.reshape((2, ()))?;
    let part = |i: usize| both.get(i)?.reshape(y.shape());
    Ok((Some(part(0)?), None, Some(part(1)?)))
});

struct AffineBackward {
    residual: bool,
    relu: bool,
}

cuda_op!(CustomOp3 for AffineBackward, "glip-channel-affine-backward-cuda", |me, y, dy, ss| {
    affine_backward(y, dy, ss, me.residual, me.relu)
});

/// Each row's best `k` indices on the device ([`crate::topk::top_k_indices`]).
pub(crate) struct TopK {
    pub(crate) k: usize,
}

cuda_op!(CustomOp1 for TopK, "glip-top-k-cuda", |me, x| top_k(x.0, x.1, me.k));
