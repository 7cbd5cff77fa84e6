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
    reason = "kernel launches, their buffers' lengths checked here; the sums' partials allocated \
              uninitialised, for the kernels to write whole"
)]

use crate::cuda_launch::{elementwise, launch, per_row, view};
use crate::cuda_source::kernels::{self, Kernel};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Storage, Tensor};

/// The in-place passes' operands for kernel `name`: `dst` (written in place, `ratio.0` parts)
/// and `src` (`ratio.1` parts) of `n` elements per part, checked against each other, and `n`.
/// Each kernel reads `src[0..ratio.1 n]` and writes `dst[0..ratio.0 n]`: the views' lengths,
/// what the callers' launches rely on.
fn in_place<'a>(
    name: &str,
    (s1, l1): (&'a mut CudaStorage, &Layout),
    (s2, l2): (&'a CudaStorage, &Layout),
    ratio: (usize, usize),
) -> Result<(CudaDevice, CudaViewMut<'a, f32>, CudaView<'a, f32>, usize)> {
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
    let dev: CudaDevice = s1.device().clone();
    let src = s2.as_cuda_slice::<f32>()?.slice(a2..b2);
    let dst = s1.as_cuda_slice_mut::<f32>()?.slice_mut(a1..b1);
    Ok((dev, dst, src, dst_len / ratio.0))
}

/// `m = b1 m + (1 - b1) c g`, `v = b2 v + (1 - b2) (c g)^2` over `mv = [m; v]`.
pub(crate) fn moments(
    mv: (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    h: &crate::optim::AdamWStep,
) -> Result<()> {
    type K = kernels::glip_adamw_moments;
    let [c, b1, a1, b2, a2] = [h.clip, h.b1, 1.0 - h.b1, h.b2, 1.0 - h.b2].map(|v| v as f32);
    let (dev, mut dst, src, n) = in_place(K::NAME, mv, g, (2, 1))?;
    // SAFETY: `dst` holds 2 n elements, `src` n ([`in_place`]).
    unsafe { launch::<K>(&dev, elementwise(n), (&mut dst, &src, n as u64, c, b1, a1, b2, a2)) }
}

/// `w = w (1 - lr wd) - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)`.
pub(crate) fn apply(
    w: (&mut CudaStorage, &Layout),
    mv: (&CudaStorage, &Layout),
    h: &crate::optim::AdamWStep,
) -> Result<()> {
    type K = kernels::glip_adamw_apply;
    let [keep, step, r, eps] =
        [1.0 - h.lr * h.weight_decay, h.lr / h.bc1, 1.0 / h.bc2.sqrt(), h.eps].map(|v| v as f32);
    let (dev, mut dst, src, n) = in_place(K::NAME, w, mv, (1, 2))?;
    // SAFETY: `dst` holds n elements, `src` 2 n ([`in_place`]).
    unsafe { launch::<K>(&dev, elementwise(n), (&mut dst, &src, n as u64, keep, step, r, eps)) }
}

/// `e = d e + (1 - d) w`.
pub(crate) fn ema(
    e: (&mut CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    d: f64,
) -> Result<()> {
    type K = kernels::glip_ema;
    let (dev, mut dst, src, n) = in_place(K::NAME, e, w, (1, 1))?;
    let (keep, take) = (d as f32, (1.0 - d) as f32);
    // SAFETY: `dst` and `src` hold n elements each ([`in_place`]).
    unsafe { launch::<K>(&dev, elementwise(n), (&mut dst, &src, n as u64, keep, take)) }
}

/// Elements per block in the many-tensor kernels (`glip_sum_squares_all`, `glip_adamw_all`):
/// 128 per thread; a tensor of fewer takes one block.
const CHUNK: usize = 1 << 15;

/// One tensor's row of the many-tensor kernels' table (`crate::cuda_source::OPTIM`).
struct Row<'a> {
    w: Option<&'a Tensor>,
    mv: Option<&'a Tensor>,
    g: &'a Tensor,
    scalars: [f32; 9],
}

/// The table of `rows` on `dev` (uploaded in one copy) and the number of chunks (blocks). The
/// storages' read guards are held while the addresses are taken; the caller keeps the tensors
/// alive until its launch is queued (after that, candle's stream orders any later use or
/// release of their memory behind the kernel).
fn table(rows: &[Row<'_>], dev: &CudaDevice) -> Result<(CudaSlice<u64>, usize)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    let words = crate::cuda_source::TABLE_WORDS;
    // At least one word: an empty upload would be an allocation of zero bytes, which the
    // driver refuses.
    let mut t = vec![0u64; (rows.len() * words).max(1)];
    let mut chunks = 0usize;
    let address = |x: &Tensor, what: &str, len: usize| -> Result<u64> {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("{what}: a tensor is not on the GPU")
        };
        if s.device().id() != dev.id() {
            candle_core::bail!("{what}: the tensors are on different GPUs")
        }
        let v = view(s, layout, what)?;
        if v.len() != len {
            candle_core::bail!("{what}: {} elements where {len} were expected", v.len())
        }
        let (ptr, _record) = v.device_ptr(&stream);
        Ok(ptr)
    };
    for (row, e) in rows.iter().zip(t.chunks_mut(words)) {
        let n = row.g.elem_count();
        e[2] = address(row.g, "optimizer (gradient)", n)?;
        if let Some(w) = row.w {
            e[0] = address(w, "optimizer (weight)", n)?;
        }
        if let Some(mv) = row.mv {
            e[1] = address(mv, "optimizer (moments)", 2 * n)?;
        }
        e[3] = n as u64;
        e[4] = chunks as u64;
        for (k, pair) in row.scalars.chunks(2).enumerate() {
            let lo = pair[0].to_bits() as u64;
            let hi = pair.get(1).map_or(0, |v| v.to_bits() as u64);
            e[5 + k] = lo | (hi << 32);
        }
        chunks += n.div_ceil(CHUNK);
    }
    Ok((stream.clone_htod(&t).map_err(candle_core::Error::wrap)?, chunks))
}

/// The sum of the squares of every element of `xs` (f32 tensors on `dev`), accumulated in f64,
/// as a scalar f64 tensor on `dev`; nothing is read back.
///
/// candle's composition (`to_dtype(F64)`, `sqr`, `sum_all` per tensor, then a stack and a sum)
/// is five kernels and three allocations per tensor, and candle reduces a `sum_all` in a
/// single block, one multiprocessor reading the whole tensor: on the H200 the gradient norm of
/// seed-r50's 135 M parameters made most of the optimiser phase's 0.116 s
/// (`glip bench --phases`). Here one launch sums every tensor: a block per chunk of
/// [`CHUNK`] elements of one tensor (blocks stride over the chunks beyond 65,535) adds into its
/// partial sum, side by side in one buffer, then one block adds the buffer. The order of every
/// sum depends on the sizes only.
pub(crate) fn sum_squares_all(xs: &[&Tensor], dev: &CudaDevice) -> Result<Tensor> {
    let threads = crate::cuda_source::THREADS as usize;
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
    let rows: Vec<Row<'_>> =
        xs.iter().map(|g| Row { w: None, mv: None, g, scalars: [0.0; 9] }).collect();
    let (table, chunks) = table(&rows, dev)?;
    let cfg = per_row(chunks, threads);
    let total = if chunks == 0 { 0 } else { cfg.grid_dim.0 as usize };
    // SAFETY: every one of the `total` partials is written by its block below before
    // `glip_sum_f64` reads them.
    let mut parts = unsafe { dev.alloc::<f64>(total.max(1)) }?;
    if total > 0 {
        let (tensors, chunk, n_chunks) = (rows.len() as u32, CHUNK as u64, chunks as u64);
        // SAFETY: `table` holds `tensors` rows, each gradient's address and length checked
        // against its view; the blocks read the `chunks` chunks of them and block `b` writes
        // `parts[b]`: `total` blocks for the `total` partials.
        unsafe {
            launch::<kernels::glip_sum_squares_all>(
                dev,
                cfg,
                (&table, tensors, chunk, n_chunks, &mut parts),
            )
        }?;
    }
    // SAFETY: `glip_sum_f64` writes its one element.
    let mut out = unsafe { dev.alloc::<f64>(1) }?;
    // SAFETY: reads `parts[0..total]` (all written above) and writes `out[0]`.
    unsafe {
        launch::<kernels::glip_sum_f64>(dev, per_row(1, threads), (&parts, total as u64, &mut out))
    }?;
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Ok(Tensor::from_storage(storage, (), BackpropOp::none(), false))
}

/// AdamW's step ([`moments`] then [`apply`], the same arithmetic) of every `(weight, moments,
/// gradient, constants)` on `dev` in one launch: a block per chunk of [`CHUNK`] elements of
/// one tensor (striding over the chunks beyond 65,535). One AdamW step of seed-r50's 434
/// parameter tensors was 868 launches (and as many of the norm's); the launches, not the work,
/// made the optimiser's share of a step.
/// Weights and moments are written in place: the optimiser owns them, and candle's stream
/// orders the writes after every earlier use.
pub(crate) fn adamw_all(
    items: &[(&Tensor, &Tensor, &Tensor, crate::optim::AdamWStep)],
    dev: &CudaDevice,
) -> Result<()> {
    let rows: Vec<Row<'_>> = items
        .iter()
        .map(|(w, mv, g, h)| Row {
            w: Some(*w),
            mv: Some(*mv),
            g,
            scalars: [
                h.clip,
                h.b1,
                1.0 - h.b1,
                h.b2,
                1.0 - h.b2,
                1.0 - h.lr * h.weight_decay,
                h.lr / h.bc1,
                1.0 / h.bc2.sqrt(),
                h.eps,
            ]
            .map(|v| v as f32),
        })
        .collect();
    let (table, chunks) = table(&rows, dev)?;
    if chunks == 0 {
        return Ok(());
    }
    let (tensors, chunk, n_chunks) = (rows.len() as u32, CHUNK as u64, chunks as u64);
    // SAFETY: each row's weight (n), moments (2 n) and gradient (n) were checked against their
    // views' lengths; the blocks stride over the `chunks` chunks, each read and written by one
    // block.
    unsafe {
        launch::<kernels::glip_adamw_all>(
            dev,
            per_row(chunks, crate::cuda_source::THREADS as usize),
            (&table, tensors, chunk, n_chunks),
        )
    }?;
    Ok(())
}
