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
    reason = "kernel launches through cudarc: each checks the operands' lengths against what \
              the kernel reads and writes"
)]

use crate::cuda_launch::{elementwise, output, per_row, view, DROPOUT, NORM, POOL, TOP_K};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Whether the fused kernels are used (unless `GLIP_CUDA_COMPOSED` is set to anything but `0`,
/// read once).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLIP_CUDA_COMPOSED").map_or(true, |v| v == "0"))
}

/// `n` as a kernel's `unsigned`, or an error naming `what`.
fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what}: {n} is over 2^32")))
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

/// Launches kernel `$name` of `$module` on `$dev`'s stream with `$cfg` and the arguments in
/// the kernel's order.
macro_rules! launch {
    ($module:expr, $dev:expr, $name:literal, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let f = $module.func(&$dev, $name)?;
        let stream = $dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        $(b.arg($arg);)*
        run(&mut b, $cfg)
    }};
}

fn run(b: &mut LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: every caller pushed the arguments of its kernel's signature in order, with
    // buffers of the lengths the kernel indexes (checked or allocated by the caller).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(candle_core::Error::wrap)
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        candle_core::bail!("{what}: {got} elements where {want} were expected")
    }
    Ok(())
}

/// `softmax(x)` over the last axis.
pub(crate) fn softmax(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let x = view(s, l, "softmax")?;
    let (r, d) = rows(l, "softmax")?;
    let dev = s.device().clone();
    // Written in full by glip_softmax (every row of d).
    let mut y = output(&dev, x.len())?;
    launch!(NORM, dev, "glip_softmax", per_row(r as usize, d as usize), [&x, &mut y, &r, &d])?;
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
    launch!(
        NORM,
        dev,
        "glip_softmax_backward",
        per_row(r as usize, d as usize),
        [&y, &dy, &mut dx, &r, &d]
    )?;
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
    launch!(
        NORM,
        dev,
        "glip_layer_norm",
        per_row(r as usize, d as usize),
        [&x, &w, &bias, &mut y, &r, &d, &eps]
    )?;
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
        launch!(
            NORM,
            dev,
            "glip_layer_norm_backward",
            per_row(r as usize, du),
            [&x, &w, &dy, &mut dx, &mut stats, &r, &d, &eps]
        )?;
    }
    {
        let chunk_u = u32_of(chunk, "layer norm backward")?;
        let cfg = LaunchConfig {
            grid_dim: (d.div_ceil(128), parts as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            NORM,
            dev,
            "glip_layer_norm_params",
            cfg,
            [&x, &dy, &stats, &mut part, &r, &d, &chunk_u]
        )?;
    }
    {
        let (parts_u, m) = (parts as u32, 2 * d);
        let mut sums = out.slice_mut(n..n + 2 * du);
        launch!(
            NORM,
            dev,
            "glip_sum_parts",
            elementwise(2 * du),
            [&part, &mut sums, &parts_u, &m]
        )?;
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
    launch!(
        NORM,
        dev,
        "glip_batch_norm_stats",
        per_row(c as usize, bs as usize * hw as usize),
        [&x, &mut p, &bs, &c, &hw, &eps]
    )?;
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
    launch!(NORM, dev, "glip_batch_norm", elementwise(x.len()), [&x, &p, &mut y, &total, &c, &hw])?;
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
        launch!(
            NORM,
            dev,
            "glip_batch_norm_sums",
            per_row(cu, bs as usize * hw as usize),
            [&x, &p, &dy, &mut sums, &bs, &c, &hw]
        )?;
    }
    {
        let (total, count) = (n as u64, (bs as usize * hw as usize).max(1) as f32);
        launch!(
            NORM,
            dev,
            "glip_batch_norm_backward",
            elementwise(n),
            [&x, &p, &dy, &mut out, &total, &c, &hw, &count]
        )?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n + 2 * cu)))
}

/// `relu(x s + t (+ r))` with `ss (2, c)` = `[s; t]`.
pub(crate) fn affine_relu(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let (x, ss) = (view(s1, l1, "affine-relu")?, view(s2, l2, "affine-relu constants")?);
    let (_, c, hw) = planes(l1)?;
    check_len("affine-relu constants", ss.len(), 2 * c as usize)?;
    let r = match residual {
        Some((s, l)) => {
            let r = view(s, l, "affine-add-relu residual")?;
            check_len("affine-add-relu residual", r.len(), x.len())?;
            Some(r)
        }
        None => None,
    };
    let dev = s1.device().clone();
    let (total, with_r) = (x.len() as u64, u32::from(r.is_some()));
    // Written in full by glip_affine_relu.
    let mut y = output(&dev, x.len())?;
    // Without a residual the kernel does not read `r`; `x` stands in for the pointer.
    let r = r.as_ref().unwrap_or(&x);
    launch!(
        NORM,
        dev,
        "glip_affine_relu",
        elementwise(x.len()),
        [&x, &ss, r, &mut y, &total, &c, &hw, &with_r]
    )?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
}

/// `(y, dy, ss)` -> `dx` (`n`), or with `with_residual` `[dx; dresidual]` (`2 n`).
pub(crate) fn affine_relu_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    with_residual: bool,
) -> Result<(CudaStorage, Shape)> {
    let y = view(s1, l1, "affine-relu backward")?;
    let dy = view(s2, l2, "affine-relu backward")?;
    let ss = view(s3, l3, "affine-relu backward constants")?;
    let (_, c, hw) = planes(l1)?;
    check_len("affine-relu backward", dy.len(), y.len())?;
    check_len("affine-relu backward constants", ss.len(), 2 * c as usize)?;
    let n = y.len();
    let len = if with_residual { 2 * n } else { n };
    let dev = s1.device().clone();
    let (total, with_r) = (n as u64, u32::from(with_residual));
    // Written in full by glip_affine_relu_backward (dx, and dr with a residual).
    let mut out = output(&dev, len)?;
    launch!(
        NORM,
        dev,
        "glip_affine_relu_backward",
        elementwise(n),
        [&y, &dy, &ss, &mut out, &total, &c, &hw, &with_r]
    )?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
}

/// `(planes, h, w, oh, ow)` of the stem pool's input `l`.
fn pool_dims(l: &Layout) -> Result<(u64, u32, u32, u32, u32)> {
    let (b, c, h, w) = l.shape().dims4()?;
    let (oh, ow) = crate::pool::out_dims(h, w);
    let u = |n| u32_of(n, "max pool");
    Ok(((b * c) as u64, u(h)?, u(w)?, u(oh)?, u(ow)?))
}

/// The stem's max-pool of `x (b, c, h, w)`.
pub(crate) fn max_pool(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let x = view(s, l, "max pool")?;
    let (planes, h, w, oh, ow) = pool_dims(l)?;
    let n = planes as usize * oh as usize * ow as usize;
    let dev = s.device().clone();
    // Written in full (one thread per output) by glip_max_pool.
    let mut y = output(&dev, n)?;
    launch!(POOL, dev, "glip_max_pool", elementwise(n), [&x, &mut y, &planes, &h, &w, &oh, &ow])?;
    let (bs, c, _, _) = l.shape().dims4()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((bs, c, oh as usize, ow as usize))))
}

/// The stem pool's input gradient from `x` and the output gradient `g`.
pub(crate) fn max_pool_backward(
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (x, g) = (view(s1, l1, "max pool backward")?, view(s2, l2, "max pool backward")?);
    let (planes, h, w, oh, ow) = pool_dims(l1)?;
    check_len("max pool backward", g.len(), planes as usize * oh as usize * ow as usize)?;
    let dev = s1.device().clone();
    // Written in full (one thread per input) by glip_max_pool_backward.
    let mut dx = output(&dev, x.len())?;
    launch!(
        POOL,
        dev,
        "glip_max_pool_backward",
        elementwise(x.len()),
        [&x, &g, &mut dx, &planes, &h, &w, &oh, &ow]
    )?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev), l1.shape().clone()))
}

/// A dropout mask of `l`'s shape (`scale` kept, 0 dropped) drawn on the device from `seed`
/// ([`crate::cuda_source::DROPOUT`]); `s` only names the device.
pub(crate) fn dropout_mask(
    s: &CudaStorage,
    l: &Layout,
    seed: u64,
    p: f32,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let n = l.shape().elem_count();
    let dev = s.device().clone();
    // Written in full by glip_dropout_mask.
    let mut mask = output(&dev, n)?;
    let n64 = n as u64;
    launch!(
        DROPOUT,
        dev,
        "glip_dropout_mask",
        elementwise(n),
        [&mut mask, &n64, &seed, &p, &scale]
    )?;
    Ok((CudaStorage::wrap_cuda_slice(mask, dev), l.shape().clone()))
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
    launch!(TOP_K, dev, "glip_top_k", cfg, [&x, &mut out, &len32, &k32])?;
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, k))))
}

/// The most rows of a launch over `(blocks, rows)`: CUDA's limit on `gridDim.y`.
const MAX_GRID_Y: usize = 65_535;

/// Implements a candle custom op that runs only on CUDA: `cpu_fwd` is an error naming it,
/// `cuda_fwd` is `$fwd` over the operands as `(storage, layout)` pairs (with `$me` for the op),
/// and `bwd`, where given, is `$bwd`.
macro_rules! cuda_op {
    (CustomOp1 for $ty:ty, $name:literal, |$me:ident, $a:ident| $fwd:expr
     $(, bwd |$ba:ident, $by:ident, $bg:ident| $bwd:expr)?) => {
        impl CustomOp1 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                Err(cuda_only($name))
            }

            cuda_fwd!(|$me, $a| $fwd);

            $(fn bwd(&self, $ba: &Tensor, $by: &Tensor, $bg: &Tensor) -> Result<Option<Tensor>> {
                $bwd
            })?
        }
    };
    (CustomOp2 for $ty:ty, $name:literal, |$me:ident, $a:ident, $b:ident| $fwd:expr
     $(, bwd |$ba:ident, $bb:ident, $by:ident, $bg:ident| $bwd:expr)?) => {
        impl CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                Err(cuda_only($name))
            }

            cuda_fwd!(|$me, $a, $b| $fwd);

            $(fn bwd(
                &self,
                $ba: &Tensor,
                $bb: &Tensor,
                $by: &Tensor,
                $bg: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                $bwd
            })?
        }
    };
    (CustomOp3 for $ty:ty, $name:literal, |$me:ident, $a:ident, $b:ident, $c:ident| $fwd:expr
     $(, bwd |$ba:ident, $bb:ident, $bc:ident, $by:ident, $bg:ident| $bwd:expr)?) => {
        impl CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                Err(cuda_only($name))
            }

            cuda_fwd!(|$me, $a, $b, $c| $fwd);

            $(fn bwd(
                &self,
                $ba: &Tensor,
                $bb: &Tensor,
                $bc: &Tensor,
                $by: &Tensor,
                $bg: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                $bwd
            })?
        }
    };
}

fn cuda_only(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name} runs on CUDA only (its CPU path is another op)"))
}

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

/// `relu(x s + t)` with the constants `ss = [s; t]` `(2c,)` ([`crate::affine::affine_relu`]);
/// no gradient for the constants.
pub(crate) struct AffineRelu;

cuda_op!(CustomOp2 for AffineRelu, "glip-affine-relu-cuda", |_me, x, ss| affine_relu(x, ss, None),
bwd |_x, ss, y, dy| {
    let dx = y.apply_op3_no_bwd(&dy.contiguous()?, ss, &AffineBackward { residual: false })?;
    Ok((Some(dx.reshape(y.shape())?), None))
});

/// `relu(x s + t + r)`, the same with a residual.
pub(crate) struct AffineAddRelu;

cuda_op!(CustomOp3 for AffineAddRelu, "glip-affine-add-relu-cuda",
|_me, x, ss, r| {
    if x.1.dims() != r.1.dims() {
        candle_core::bail!("affine-add-relu: {:?} against {:?}", x.1.dims(), r.1.dims());
    }
    affine_relu(x, ss, Some(r))
},
bwd |_x, ss, _r, y, dy| {
    let both = y.apply_op3_no_bwd(&dy.contiguous()?, ss, &AffineBackward { residual: true })?;
    let both = both.reshape((2, ()))?;
    let part = |i: usize| both.get(i)?.reshape(y.shape());
    Ok((Some(part(0)?), None, Some(part(1)?)))
});

struct AffineBackward {
    residual: bool,
}

cuda_op!(CustomOp3 for AffineBackward, "glip-affine-relu-backward-cuda", |me, y, dy, ss| {
    affine_relu_backward(y, dy, ss, me.residual)
});

/// A dropout mask of its input's shape drawn on the device ([`crate::nn::dropout`]).
pub(crate) struct DropoutMask {
    pub(crate) seed: u64,
    pub(crate) p: f32,
    pub(crate) scale: f32,
}

cuda_op!(CustomOp1 for DropoutMask, "glip-dropout-mask-cuda", |me, x| {
    dropout_mask(x.0, x.1, me.seed, me.p, me.scale)
});

/// Each row's best `k` indices on the device ([`crate::topk::top_k_indices`]).
pub(crate) struct TopK {
    pub(crate) k: usize,
}

cuda_op!(CustomOp1 for TopK, "glip-top-k-cuda", |me, x| top_k(x.0, x.1, me.k));

#[cfg(test)]
mod tests {
    /// NVRTC compiles the kernels (no GPU needed, only libnvrtc) and the PTX has every entry.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = super::NORM.ptx().unwrap();
        for name in [
            "glip_softmax",
            "glip_softmax_backward",
            "glip_layer_norm",
            "glip_layer_norm_backward",
            "glip_layer_norm_params",
            "glip_sum_parts",
            "glip_batch_norm_stats",
            "glip_batch_norm",
            "glip_batch_norm_sums",
            "glip_batch_norm_backward",
            "glip_affine_relu",
            "glip_affine_relu_backward",
        ] {
            assert!(ptx.contains(&format!(".entry {name}")), "{name} missing from the PTX");
        }
        assert!(super::DROPOUT.ptx().unwrap().contains(".entry glip_dropout_mask"));
        assert!(super::TOP_K.ptx().unwrap().contains(".entry glip_top_k"));
        let ptx = super::POOL.ptx().unwrap();
        for name in ["glip_max_pool", "glip_max_pool_backward"] {
            assert!(ptx.contains(&format!(".entry {name}")), "{name} missing from the PTX");
        }
    }
}
