//! `Linear` inside a bf16 autocast on CUDA: bf16 operands, f32 sums and **f32 results**, one
//! cuBLAS `GemmEx` per product.
//!
//! candle's bf16 product writes bf16, so the composition was: cast `x` and `w` to bf16, the
//! product, cast `y` back to f32, add the bias (copying its broadcast layout to the device);
//! and backward: cast `dy` to bf16, two products, cast `dx` and `dw` back to f32, sum the bias's
//! gradient: about a dozen launches and as many allocations per layer and step, most of them
//! casts (the profile of a seed-r50 bf16 training step on the H200 counted about a thousand
//! casts a step, `docs/results`). cuBLAS takes bf16 operands with an f32 output (`CUDA_R_16BF`
//! x `CUDA_R_16BF` -> `CUDA_R_32F`, compute `CUBLAS_COMPUTE_32F`, as `torch.autocast`
//! computes): here the forward is one pass casting `x` (kept for the backward) and prefilling
//! the output with the bias (`crate::cuda_source::LINEAR`), the weight's bf16 copy (cached per
//! bf16 scope when gradient-free, [`crate::bf16::bf16_weight`]) and one product adding onto the
//! bias (`beta = 1`); the backward one cast of `dy`, one product per gradient written in f32,
//! and the bias's gradient (the column sums of `dy`). The values: every product reads two
//! bf16-rounded operands and sums in f32, as before, without the rounding of the result to
//! bf16; the bias is added in f32 (one rounding, as the separate sum did).
//!
//! The column-major arguments of the three products for row-major buffers are
//! `crate::linear_plan`'s (tested on the CPU against BLAS's definition).
//!
//! `GLIP_BF16_LINEAR=candle` keeps candle's composition (to compare the two).

#![allow(
    unsafe_code,
    reason = "cuBLAS calls and a kernel launch through cudarc: the dimensions and leading \
              dimensions are derived from the checked shapes of the buffers passed, and outputs \
              are allocated uninitialised for the kernel or cuBLAS to write whole"
)]

use crate::cuda_launch::{check_len, launch, output_of, u32_of, view};
use crate::cuda_source::kernels;
use crate::linear_plan::{plan, ColMajor, Operand, Product};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use std::sync::Mutex;

/// Whether [`linear`] is used (unless `GLIP_BF16_LINEAR=candle`, read once).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GLIP_BF16_LINEAR").map_or(true, |v| v != "candle"))
}

fn i32_of(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what}: {n} is over 2^31")))
}

/// A linear layer's bf16 operands, those a product needs.
#[derive(Default)]
struct Operands<'a, 'b> {
    x: Option<&'a CudaView<'b, bf16>>,
    w: Option<&'a CudaView<'b, bf16>>,
    dy: Option<&'a CudaView<'b, bf16>>,
}

impl<'a, 'b> Operands<'a, 'b> {
    fn get(&self, o: Operand) -> Result<&'a CudaView<'b, bf16>> {
        let v = match o {
            Operand::X => self.x,
            Operand::W => self.w,
            Operand::Dy => self.dy,
        };
        v.ok_or_else(|| candle_core::Error::Msg(format!("bf16 linear: no {o:?} operand")))
    }
}

/// `product`'s column-major call (`crate::linear_plan`) with cuBLAS for `x (m, k)`, `w (n, k)`,
/// `dy (m, n)`: bf16 operands from `ops`, f32 sums, the f32 result written to `c` (`(buffer,
/// len)`; `beta = 0`), or added to it (`beta = 1`).
fn gemm(
    dev: &CudaDevice,
    product: Product,
    (m, n, k): (usize, usize, usize),
    ops: &Operands<'_, '_>,
    (c, c_len): (&mut impl DevicePtrMut<f32>, usize),
    beta: f32,
) -> Result<()> {
    let plan: ColMajor = plan(product, m, n, k);
    let (a, b) = (ops.get(plan.a)?, ops.get(plan.b)?);
    let (ta, tb, lda, ldb) = (plan.transpose_a, plan.transpose_b, plan.lda, plan.ldb);
    let (m, n, k) = (plan.rows, plan.cols, plan.inner);
    let (a_len, b_len) = (a.len(), b.len());
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    // What cuBLAS reads and writes, checked against the buffers: op(a) is m' x k' (stored
    // k' x m' when transposed), op(b) k' x n' (stored n' x k' when transposed).
    let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
    if lda < a_rows || ldb < b_rows || a_len < lda * a_cols || b_len < ldb * b_cols {
        candle_core::bail!("bf16 linear: operands too short for a ({m}, {n}, {k}) product")
    }
    if c_len < m * n {
        candle_core::bail!("bf16 linear: an output of {c_len} for ({m}, {n})")
    }
    let what = "bf16 linear";
    let (mi, ni, ki) = (i32_of(m, what)?, i32_of(n, what)?, i32_of(k, what)?);
    let (ldai, ldbi) = (i32_of(lda, what)?, i32_of(ldb, what)?);
    let alpha = 1f32;
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (pa, _ga) = a.device_ptr(&stream);
    let (pb, _gb) = b.device_ptr(&stream);
    let (pc, _gc) = c.device_ptr_mut(&stream);
    // SAFETY: `a` holds `lda * a_cols` bf16 and `b` `ldb * b_cols` (checked above) for the
    // column-major operands of `op(a) (m x k)` and `op(b) (k x n)`; `c` holds the `m * n` f32 of
    // the result (ldc = m), written whole (beta = 0) or read first where the caller filled it
    // (beta = 1); alpha and beta are f32 host scalars, as
    // CUBLAS_COMPUTE_32F takes them; the handle works on the device's stream, where the buffers
    // are ordered.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            op(ta),
            op(tb),
            mi,
            ni,
            ki,
            (&alpha) as *const f32 as *const _,
            pa as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            ldai,
            pb as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            ldbi,
            (&beta) as *const f32 as *const _,
            pc as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            mi,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(candle_core::Error::wrap)
}

/// An operand in bf16: the storage's own contiguous bf16 elements, or a cast of an f32 one.
enum Bf16<'a> {
    View(CudaView<'a, bf16>),
    Cast(CudaSlice<bf16>),
}

impl Bf16<'_> {
    /// `(storage, layout)` (f32 or bf16) as `len` contiguous bf16 elements, or an error naming
    /// `what`.
    fn of<'a>(s: &'a CudaStorage, l: &Layout, len: usize, what: &str) -> Result<Bf16<'a>> {
        if l.shape().elem_count() != len {
            candle_core::bail!(
                "{what}: {} elements where {len} were expected",
                l.shape().elem_count()
            )
        }
        match (s.dtype(), l.contiguous_offsets()) {
            (DType::BF16, Some((a, b))) => Ok(Bf16::View(s.as_cuda_slice::<bf16>()?.slice(a..b))),
            (DType::F32 | DType::BF16, _) => match s.to_dtype(l, DType::BF16)?.slice {
                CudaStorageSlice::BF16(c) => Ok(Bf16::Cast(c)),
                _ => candle_core::bail!("{what}: the cast to bf16 gave another dtype"),
            },
            (d, _) => candle_core::bail!("{what}: f32 or bf16, got {d:?}"),
        }
    }

    /// The elements.
    fn view(&self) -> CudaView<'_, bf16> {
        match self {
            Bf16::View(v) => v.slice(0..v.len()),
            Bf16::Cast(c) => c.slice(0..c.len()),
        }
    }
}

/// `x (m, k) @ w (n, k)^T (+ bias (n,)) -> (m, n)` f32 from f32 `x`, `w` and bias, with `w`'s
/// bf16 copy `wb` (detached); gradients for `x`, `w` and the bias, in f32.
struct LinearBf16 {
    wb: Tensor,
    /// `x` in bf16, made by the forward for the weight's gradient.
    saved: Mutex<Option<CudaSlice<bf16>>>,
}

cuda_op!(CustomOp2 for LinearBf16, "glip-linear-bf16-cuda",
|me, x, w| me.forward(x, w, None),
bwd |x, w, _y, grad| {
    let (dx, dw, _) = me.backward(x, w, None, grad)?;
    Ok((dx, dw))
});

/// The same with a bias, as a three-operand op.
struct LinearBf16Bias(LinearBf16);

cuda_op!(CustomOp3 for LinearBf16Bias, "glip-linear-bf16-bias-cuda",
|me, x, w, b| me.0.forward(x, w, Some(b)),
bwd |x, w, b, _y, grad| me.0.backward(x, w, Some(b), grad));

impl LinearBf16 {
    fn forward(
        &self,
        (xs, xl): (&CudaStorage, &Layout),
        (_, wl): (&CudaStorage, &Layout),
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let ((m, k), (n, kw)) = (xl.shape().dims2()?, wl.shape().dims2()?);
        if k != kw || self.wb.dims() != wl.dims() {
            candle_core::bail!(
                "bf16 linear: input {:?}, weight {:?}, bf16 weight {:?}",
                xl.dims(),
                wl.dims(),
                self.wb.dims()
            )
        }
        let dev = xs.device().clone();
        let x = view(xs, xl, "bf16 linear input")?;
        check_len("bf16 linear input", x.len(), m * k)?;
        let (rows, cols) = (m as u64, u32_of(n, "bf16 linear")?);
        // Written in full: xb by the cast below, y by its bias prefill or the product (beta 0).
        let mut xb = output_of::<bf16>(&dev, m * k)?;
        let mut y = output_of::<f32>(&dev, m * n)?;
        let b = match bias {
            Some((bs, bl)) => {
                let b = view(bs, bl, "bf16 linear bias")?;
                check_len("bf16 linear bias", b.len(), n)?;
                Some(b)
            }
            None => None,
        };
        // One launch: x to bf16, and y prefilled with the bias for the product to add onto;
        // without a bias, null pointers (the kernel skips the fill), no rows, no columns.
        // glip_bf16_cast_fill reads x[0..n] and writes xb[0..n] (both m k long), and with a
        // bias reads bias[0..cols] (checked n long) and writes y[0..rows cols] (m n long).
        let (fill_rows, fill_cols) = if b.is_some() { (rows, cols) } else { (0, 0) };
        // SAFETY: `x` and `xb` hold m k elements (checked), the bias n (checked) and `y` m n, where
        // given.
        unsafe {
            launch::<kernels::glip_bf16_cast_fill>(
                &dev,
                crate::cuda_launch::elementwise((m * k).max(m * n)),
                (
                    &x,
                    &mut xb,
                    (m * k) as u64,
                    b.as_ref(),
                    b.is_some().then_some(&mut y),
                    fill_rows,
                    fill_cols,
                ),
            )
        }?;
        let product = {
            let (ws, wbl) = self.wb.storage_and_layout();
            let Storage::Cuda(ws) = &*ws else {
                candle_core::bail!("bf16 linear: the bf16 weight is not on the GPU")
            };
            let wb = Bf16::of(ws, wbl, n * k, "bf16 linear weight")?;
            let xv = xb.slice(0..m * k);
            let wv = wb.view();
            let ops = Operands { x: Some(&xv), w: Some(&wv), dy: None };
            let beta = if b.is_some() { 1.0 } else { 0.0 };
            gemm(&dev, Product::Forward, (m, n, k), &ops, (&mut y, m * n), beta)
        };
        product?;
        *self.saved.lock().expect("saved input") = Some(xb);
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, n))))
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_b = bias.is_some_and(|b| b.track_op());
        // The bias's gradient: the output gradient's column sums, in f32.
        let db = if want_b { Some(grad.sum(0)?) } else { None };
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !(want_x || want_w) {
            return Ok((None, None, db));
        }
        let (m, k) = x.dims2()?;
        let n = w.dim(0)?;
        // The forward's bf16 input, or (a second backward of the same graph) a fresh cast.
        let xb = match self.saved.lock().expect("saved input").take() {
            Some(s) => {
                let Storage::Cuda(xs) = &*x.storage_and_layout().0 else {
                    candle_core::bail!("bf16 linear: the input left the GPU")
                };
                let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, xs.device().clone()));
                Tensor::from_storage(storage, (m, k), BackpropOp::none(), false)
            }
            None => x.detach().to_dtype(DType::BF16)?,
        };
        let op = LinearGrad { dx: want_x, dw: want_w };
        let both = grad.contiguous()?.apply_op3_no_bwd(&self.wb, &xb, &op)?;
        let dx = want_x.then(|| both.narrow(0, 0, m * k)?.reshape((m, k))).transpose()?;
        let at = if want_x { m * k } else { 0 };
        let dw = want_w.then(|| both.narrow(0, at, n * k)?.reshape((n, k))).transpose()?;
        Ok((dx, dw, db))
    }
}

/// `(dy (m, n) f32, wb (n, k) bf16, xb (m, k) bf16)` -> `[dx (m k); dw (n k)]` f32, each part
/// only when asked for.
struct LinearGrad {
    dx: bool,
    dw: bool,
}

cuda_op!(CustomOp3 for LinearGrad, "glip-linear-bf16-backward-cuda",
|me, dy, wb, xb| me.run(dy, wb, xb));

impl LinearGrad {
    fn run(
        &self,
        (gs, gl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (xs, xl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let ((m, n), (nw, k), (mx, kx)) =
            (gl.shape().dims2()?, wl.shape().dims2()?, xl.shape().dims2()?);
        if n != nw || m != mx || k != kx {
            candle_core::bail!(
                "bf16 linear backward: gradient {:?}, weight {:?}, input {:?}",
                gl.dims(),
                wl.dims(),
                xl.dims()
            )
        }
        let dev = gs.device().clone();
        let gb = Bf16::of(gs, gl, m * n, "bf16 linear gradient")?;
        let len = usize::from(self.dx) * m * k + usize::from(self.dw) * n * k;
        // Written in full by the products below (beta 0), one part each.
        let mut out = output_of::<f32>(&dev, len)?;
        let mut at = 0;
        if self.dx {
            let wb = Bf16::of(ws, wl, n * k, "bf16 linear weight")?;
            let mut dx = out.slice_mut(0..m * k);
            let (wv, gv) = (wb.view(), gb.view());
            let ops = Operands { w: Some(&wv), dy: Some(&gv), ..Default::default() };
            gemm(&dev, Product::InputGrad, (m, n, k), &ops, (&mut dx, m * k), 0.0)?;
            at = m * k;
        }
        if self.dw {
            let xb = Bf16::of(xs, xl, m * k, "bf16 linear input")?;
            let mut dw = out.slice_mut(at..at + n * k);
            let (xv, gv) = (xb.view(), gb.view());
            let ops = Operands { x: Some(&xv), dy: Some(&gv), ..Default::default() };
            gemm(&dev, Product::WeightGrad, (m, n, k), &ops, (&mut dw, n * k), 0.0)?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(len)))
    }
}

/// `x (m, k) @ w (n, k)^T (+ bias)` in bf16 with f32 sums and an f32 result, differentiable in
/// `x`, `w` and the bias (f32 gradients): all f32 on CUDA, `w`'s bf16 copy from
/// [`crate::bf16::bf16_weight`].
pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let wb = crate::bf16::bf16_weight(w)?.detach();
    let op = LinearBf16 { wb, saved: Mutex::new(None) };
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(w, &b.contiguous()?, LinearBf16Bias(op)),
        None => x.apply_op2(w, op),
    }
}
