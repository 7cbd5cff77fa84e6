//! 2-D convolution on CUDA through cuDNN: forward, input gradient (cuDNN's backward-data) and
//! weight gradient (backward-filter), in f32 or bf16 (f32 sums), grouped or not.
//!
//! candle 0.11.1 with its `cudnn` feature has the forward only, and builds its descriptors,
//! asks cuDNN's heuristics for an algorithm and allocates (and zeroes) a workspace on every call;
//! its autograd computes the input gradient with its own `conv_transpose2d` kernel and the weight
//! gradient as another convolution over transposed tensors. Measured on the H200
//! (`../shared/docs/CUDA.md`): 3-7x slower than PyTorch forward, 10-45x with the backward. Here:
//!
//! * the descriptors and the algorithm of each direction are made once per shape, dtype and math
//!   mode (a thread's plan cache) with cuDNN's heuristics (`cudnnGetConvolution*Algorithm_v7`,
//!   the first ranked algorithm, as PyTorch does by default: `torch.backends.cudnn.benchmark` is
//!   off);
//! * one workspace per thread and device, grown when a plan needs more, never zeroed (cuDNN
//!   does not read it before writing);
//! * outputs are allocated uninitialised: with `beta = 0` cuDNN writes every element;
//! * the backward is [`CudnnConv`]'s `bwd`: the input gradient only when the input is part of
//!   the graph (not for the stem's image), the weight gradient only when the weight is.
//!
//! f32 convolutions use FMA math (exact f32 sums, for the parity suite) unless
//! [`crate::cuda::set_tf32`] allows TF32 tensor cores (PyTorch's default for convolutions);
//! bf16 ones compute in f32 on tensor cores (cuDNN's "pseudo bf16" configuration).
//!
//! Backward-data and backward-filter pick the heuristics' first algorithm unless
//! [`crate::cuda::set_deterministic`] asks for gradients that repeat bit for bit (then the
//! atomics-based ones are replaced). `GLIP_CUDNN_LOG=1` prints each choice.
//!
//! Checked on the H200 (2026-12-04, `scripts/gpu-check.sh`): every direction of five shapes
//! (3x3, strided non-square, 1x1, the 7x7 stem, depthwise) against exact values in f32 and bf16
//! (glip-train's `tests/cuda.rs`), and the ResNet-50 and MobileNetV2 parity fixtures.

#![allow(
    unsafe_code,
    reason = "cuDNN calls through cudarc: launching needs the descriptors to match the buffers \
              (checked here against the layouts) and outputs are allocated uninitialised for \
              cuDNN to write whole (beta = 0)"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// One convolution's shape: input `(b, ci, h, w)`, weight `(co, ci / groups, k, k)`, and
/// whether its tensors are stored NHWC (input, output and their gradients `(b, h, w, c)`, the
/// weight and its gradient `(co, k, k, ci / groups)`; [`crate::layout`]) or NCHW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Geometry {
    x: [i32; 4],
    w: [i32; 4],
    stride: i32,
    pad: i32,
    groups: i32,
    nhwc: bool,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize, groups: usize) -> Result<Self> {
        let (&[b, ci, h, wd], &[co, cig, kh, kw]) = (x, w) else {
            candle_core::bail!("cudnn conv2d: 4-D input and weight, got {x:?} and {w:?}")
        };
        if groups == 0 || ci != cig * groups || co % groups != 0 {
            candle_core::bail!(
                "cudnn conv2d: input {x:?}, weight {w:?} and {groups} groups disagree"
            )
        }
        if stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            candle_core::bail!("cudnn conv2d: kernel {kh}x{kw} over {h}x{wd} padded by {pad}")
        }
        let i = |v: usize| -> Result<i32> {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("cudnn conv2d: {v} too large")))
        };
        Ok(Self {
            x: [i(b)?, i(ci)?, i(h)?, i(wd)?],
            w: [i(co)?, i(cig)?, i(kh)?, i(kw)?],
            stride: i(stride)?,
            pad: i(pad)?,
            groups: i(groups)?,
            nhwc: false,
        })
    }

    /// The same convolution on tensors stored NHWC.
    fn channels_last(self) -> Self {
        Self { nhwc: true, ..self }
    }

    /// cuDNN's name for the storage order of every tensor of the convolution.
    fn format(&self) -> sys::cudnnTensorFormat_t {
        if self.nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        }
    }

    /// The dims `(n, c, h, w)` of one of its tensors in storage order: `(n, h, w, c)` in NHWC.
    fn stored(&self, [n, c, h, w]: [i32; 4]) -> [i32; 4] {
        if self.nhwc {
            [n, h, w, c]
        } else {
            [n, c, h, w]
        }
    }

    fn y(&self) -> [i32; 4] {
        let o = |len: i32, k: i32| (len + 2 * self.pad - k) / self.stride + 1;
        [self.x[0], self.w[0], o(self.x[2], self.w[2]), o(self.x[3], self.w[3])]
    }

    fn dims(d: [i32; 4]) -> Shape {
        Shape::from(d.map(|v| v as usize).to_vec())
    }
}

/// The element types cuDNN computes in here, each with its thread's plan cache.
trait Elem: DeviceRepr + ValidAsZeroBits + CudnnDataType + CudaDType + WithDType {
    /// The plans of this element type, by shape, math mode and device.
    fn plans() -> &'static std::thread::LocalKey<RefCell<HashMap<PlanKey, Rc<Plan<Self>>>>>;
    /// The math mode of this element type's convolutions (they all sum in f32).
    fn math(tf32: bool) -> sys::cudnnMathType_t;
}

/// The convolution descriptor: f32 compute for every element type, `math` mode.
fn make_conv(
    c: &Arc<Cudnn>,
    g: &Geometry,
    math: sys::cudnnMathType_t,
) -> Result<ConvDescriptor<f32>> {
    let mut d = c
        .create_conv2d::<f32>(
            [g.pad, g.pad],
            [g.stride, g.stride],
            [1, 1],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(wrap)?;
    d.set_math_type(math).map_err(wrap)?;
    if g.groups > 1 {
        d.set_group_count(g.groups).map_err(wrap)?;
    }
    Ok(d)
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
    static PLANS_F32: RefCell<HashMap<PlanKey, Rc<Plan<f32>>>> = RefCell::new(HashMap::new());
    static PLANS_BF16: RefCell<HashMap<PlanKey, Rc<Plan<bf16>>>> = RefCell::new(HashMap::new());
}

impl Elem for f32 {
    fn plans() -> &'static std::thread::LocalKey<RefCell<HashMap<PlanKey, Rc<Plan<Self>>>>> {
        &PLANS_F32
    }
    fn math(tf32: bool) -> sys::cudnnMathType_t {
        // PyTorch's choice: default math (TF32 allowed on Ampere and later) when TF32 is on, FMA
        // (exact f32) when it is off.
        if tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        }
    }
}

impl Elem for bf16 {
    fn plans() -> &'static std::thread::LocalKey<RefCell<HashMap<PlanKey, Rc<Plan<Self>>>>> {
        &PLANS_BF16
    }
    fn math(_tf32: bool) -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// This thread's cuDNN handle on `dev` (on `dev`'s stream).
fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(wrap)?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    g: Geometry,
    tf32: bool,
    deterministic: bool,
    device: DeviceId,
}

/// The descriptors of one convolution and, once asked for, each direction's algorithm with its
/// workspace size.
struct Plan<T> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    deterministic: bool,
    fwd: RefCell<Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>>,
    bwd_data: RefCell<Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>>,
    bwd_filter: RefCell<Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>>,
}

impl<T: Elem> Plan<T> {
    fn get(dev: &CudaDevice, g: Geometry) -> Result<Rc<Self>> {
        let key = PlanKey {
            g,
            tf32: crate::cuda::tf32(),
            deterministic: crate::cuda::deterministic(),
            device: dev.id(),
        };
        if let Some(p) = T::plans().with(|p| p.borrow().get(&key).cloned()) {
            return Ok(p);
        }
        let c = handle(dev)?;
        // The descriptors take the logical (n, c, h, w) dims and the storage order apart.
        let format = g.format();
        let plan = Rc::new(Plan {
            conv: make_conv(&c, &g, T::math(key.tf32))?,
            x: c.create_4d_tensor::<T>(format, g.x).map_err(wrap)?,
            w: c.create_4d_filter::<T>(format, g.w).map_err(wrap)?,
            y: c.create_4d_tensor::<T>(format, g.y()).map_err(wrap)?,
            deterministic: key.deterministic,
            fwd: RefCell::new(None),
            bwd_data: RefCell::new(None),
            bwd_filter: RefCell::new(None),
        });
        T::plans().with(|p| p.borrow_mut().insert(key, plan.clone()));
        Ok(plan)
    }

    fn forward(&self) -> ConvForward<'_, T, f32, T> {
        ConvForward { conv: &self.conv, x: &self.x, w: &self.w, y: &self.y }
    }

    fn backward_data(&self) -> ConvBackwardData<'_, T, f32, T> {
        ConvBackwardData { conv: &self.conv, dx: &self.x, w: &self.w, dy: &self.y }
    }

    fn backward_filter(&self) -> ConvBackwardFilter<'_, T, f32, T> {
        ConvBackwardFilter { conv: &self.conv, x: &self.x, dw: &self.w, dy: &self.y }
    }
}

/// `cell`'s algorithm and workspace size, chosen by `pick` (and sized by `size`) on first use;
/// with `GLIP_CUDNN_LOG=1` each choice is printed to stderr with `what` made it for.
fn chosen<A: Copy + std::fmt::Debug>(
    cell: &RefCell<Option<(A, usize)>>,
    what: (Direction, &Geometry),
    pick: impl FnOnce() -> std::result::Result<A, cudarc::cudnn::CudnnError>,
    size: impl FnOnce(A) -> std::result::Result<usize, cudarc::cudnn::CudnnError>,
) -> Result<(A, usize)> {
    if let Some(c) = *cell.borrow() {
        return Ok(c);
    }
    let algo = pick().map_err(wrap)?;
    let c = (algo, size(algo).map_err(wrap)?);
    *cell.borrow_mut() = Some(c);
    static LOG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *LOG.get_or_init(|| std::env::var("GLIP_CUDNN_LOG").is_ok_and(|v| v != "0")) {
        let (dir, g) = what;
        eprintln!(
            "cudnn {dir:?} x {:?} w {:?} stride {} pad {} groups {} {}: {algo:?}, workspace {} B",
            g.x,
            g.w,
            g.stride,
            g.pad,
            g.groups,
            if g.nhwc { "NHWC" } else { "NCHW" },
            c.1
        );
    }
    Ok(c)
}

/// Runs `f` with this thread's workspace on `dev`, at least `bytes` long (`None` for none).
fn with_workspace<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> Result<R>,
) -> Result<R> {
    if bytes == 0 {
        return f(None);
    }
    if crate::graph::capturing() {
        // Recorded into a CUDA graph: a workspace of the graph's own (allocated and freed by
        // it), as the thread's may grow later and free the buffer the graph would read.
        // SAFETY: as below.
        let mut ws = unsafe { dev.alloc::<u8>(bytes) }?;
        return f(Some(&mut ws));
    }
    let mut ws = WORKSPACES.with(|w| w.borrow_mut().remove(&dev.id()));
    if ws.as_ref().is_none_or(|w| w.len() < bytes) {
        drop(ws.take());
        // SAFETY: cuDNN's workspace is scratch space it writes before reading.
        ws = Some(unsafe { dev.alloc::<u8>(bytes) }?);
    }
    let mut ws = ws.expect("allocated above");
    let r = f(Some(&mut ws));
    WORKSPACES.with(|w| w.borrow_mut().insert(dev.id(), ws));
    r
}

/// The contiguous view of `s` under `l` holding `shape`'s elements (its dims in storage
/// order), or an error naming `what`.
fn view<'a, T: Elem>(
    s: &'a CudaStorage,
    l: &Layout,
    shape: [i32; 4],
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cudnn conv2d: the {what} must be contiguous")
    };
    let want: usize = shape.iter().map(|&v| v as usize).product();
    let same = l.dims().len() == 4 && l.dims().iter().zip(shape).all(|(&d, s)| d == s as usize);
    if b - a != want || !same {
        candle_core::bail!("cudnn conv2d: {what} of shape {:?}, expected {shape:?}", l.dims())
    }
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// An uninitialised buffer for `shape`, for cuDNN to write whole (`beta = 0`).
fn output<T: Elem>(dev: &CudaDevice, shape: [i32; 4]) -> Result<CudaSlice<T>> {
    let n: usize = shape.iter().map(|&v| v as usize).product();
    // SAFETY: every caller passes it to a cuDNN call with beta = 0, which writes every element
    // (of the shape its descriptor names, which is `shape`) before anything reads it.
    unsafe { dev.alloc::<T>(n) }
}

fn scale<T: Elem>() -> (T, T) {
    (T::from_f64(1.0), T::from_f64(0.0))
}

/// Which tensors the op reads and which it writes: `(a, b) -> out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `(x, w) -> y`.
    Forward,
    /// `(dy, w) -> dx`.
    BackwardData,
    /// `(x, dy) -> dw`.
    BackwardFilter,
}

/// A convolution of one [`Geometry`] in one [`Direction`] as a candle op; only the forward has
/// a backward (the other two directions make it).
#[derive(Debug, Clone, Copy)]
struct CudnnConv {
    g: Geometry,
    dir: Direction,
}

impl CudnnConv {
    fn run<T: Elem>(
        &self,
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = a.0.device().clone();
        let g = self.g;
        let plan = Plan::<T>::get(&dev, g)?;
        let one_zero = scale::<T>();
        let (out_shape, out) = match self.dir {
            Direction::Forward => {
                let x = view::<T>(a.0, a.1, g.stored(g.x), "input")?;
                let w = view::<T>(b.0, b.1, g.stored(g.w), "weight")?;
                let op = plan.forward();
                let (algo, bytes) = chosen(
                    &plan.fwd,
                    (self.dir, &g),
                    || op.pick_algorithm(),
                    |a| op.get_workspace_size(a),
                )?;
                let mut y = output::<T>(&dev, g.y())?;
                with_workspace(&dev, bytes, |ws| {
                    // SAFETY: x, w and y hold exactly the elements of the plan's descriptors
                    // (checked by `view` and `output`), in the descriptors' dtype and order.
                    unsafe { op.launch(algo, ws, one_zero, &x, &w, &mut y) }.map_err(wrap)
                })?;
                (g.y(), y)
            }
            Direction::BackwardData => {
                let dy = view::<T>(a.0, a.1, g.stored(g.y()), "output gradient")?;
                let w = view::<T>(b.0, b.1, g.stored(g.w), "weight")?;
                let op = plan.backward_data();
                let pick = || {
                    use sys::cudnnConvolutionBwdDataAlgo_t as A;
                    op.pick_algorithm().map(|a| match a {
                        A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 if plan.deterministic => {
                            A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1
                        }
                        a => a,
                    })
                };
                let (algo, bytes) =
                    chosen(&plan.bwd_data, (self.dir, &g), pick, |a| op.get_workspace_size(a))?;
                let mut dx = output::<T>(&dev, g.x)?;
                with_workspace(&dev, bytes, |ws| {
                    // SAFETY: as for the forward, with dx for x and dy for y.
                    unsafe { op.launch(algo, ws, one_zero, &mut dx, &w, &dy) }.map_err(wrap)
                })?;
                (g.x, dx)
            }
            Direction::BackwardFilter => {
                let x = view::<T>(a.0, a.1, g.stored(g.x), "input")?;
                let dy = view::<T>(b.0, b.1, g.stored(g.y()), "output gradient")?;
                let op = plan.backward_filter();
                let pick = || {
                    use sys::cudnnConvolutionBwdFilterAlgo_t as A;
                    op.pick_algorithm().map(|a| match a {
                        A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0
                        | A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3
                            if plan.deterministic =>
                        {
                            A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1
                        }
                        a => a,
                    })
                };
                let (algo, bytes) =
                    chosen(&plan.bwd_filter, (self.dir, &g), pick, |a| op.get_workspace_size(a))?;
                let mut dw = output::<T>(&dev, g.w)?;
                with_workspace(&dev, bytes, |ws| {
                    // SAFETY: as for the forward, with dw for w and dy for y.
                    unsafe { op.launch(algo, ws, one_zero, &x, &mut dw, &dy) }.map_err(wrap)
                })?;
                (g.w, dw)
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Geometry::dims(g.stored(out_shape))))
    }
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        match self.dir {
            Direction::Forward => "cudnn-conv2d",
            Direction::BackwardData => "cudnn-conv2d-backward-data",
            Direction::BackwardFilter => "cudnn-conv2d-backward-filter",
        }
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!(
            "{}: CUDA tensors only (glip_kernels::conv::conv2d picks the CPU path)",
            self.name()
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match (s1.dtype(), s2.dtype()) {
            (DType::F32, DType::F32) => self.run::<f32>((s1, l1), (s2, l2)),
            (DType::BF16, DType::BF16) => self.run::<bf16>((s1, l1), (s2, l2)),
            (a, b) => {
                candle_core::bail!("{}: f32 or bf16 (both alike), got {a:?} and {b:?}", self.name())
            }
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.dir != Direction::Forward {
            candle_core::bail!("{}: no second-order gradients", self.name())
        }
        let grad = grad.contiguous()?;
        let dir = |dir| CudnnConv { g: self.g, dir };
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &dir(Direction::BackwardData))?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &dir(Direction::BackwardFilter))?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// `conv2d(x (b, ci, h, w), w (co, ci / groups, k, k))` on CUDA with cuDNN, zero padding `pad`
/// and stride `stride` on both axes; `x` and `w` both f32 or both bf16. Differentiable in both.
/// A channels-last `x` ([`crate::layout::is_channels_last`]) computes in NHWC, without
/// cuDNN's transposes around its bf16 kernels, and gives a channels-last result (the weight
/// stored `(co, k, k, ci)`: a gradient-free one once per bf16 scope).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize, groups: usize) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.dims(), stride, pad, groups)?;
    if crate::layout::is_channels_last(x) {
        let krsc = crate::bf16::scope_cached(w, "channels-last weight", || {
            crate::layout::nhwc_view(w)?.contiguous()
        })?;
        let op = CudnnConv { g: g.channels_last(), dir: Direction::Forward };
        let y = crate::layout::nhwc_view(x)?.apply_op2(&krsc, op)?;
        return y.permute((0, 3, 1, 2));
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, CudnnConv { g, dir: Direction::Forward })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_checks_shapes_and_sizes_outputs() {
        let g = Geometry::new(&[2, 8, 9, 7], &[4, 8, 3, 3], 2, 1, 1).unwrap();
        assert_eq!(g.y(), [2, 4, 5, 4]);
        let dw = Geometry::new(&[1, 6, 5, 5], &[6, 1, 3, 3], 1, 1, 6).unwrap();
        assert_eq!(dw.y(), [1, 6, 5, 5]);
        assert!(Geometry::new(&[1, 6, 5, 5], &[6, 2, 3, 3], 1, 1, 6).is_err());
        assert!(Geometry::new(&[1, 3, 2, 2], &[4, 3, 5, 5], 1, 1, 1).is_err());
        assert!(Geometry::new(&[1, 3, 8, 8], &[4, 3, 3, 3], 0, 1, 1).is_err());
        assert!(Geometry::new(&[1, 3, 8], &[4, 3, 3, 3], 1, 1, 1).is_err());
        // Channels-last: the same logical dims (cuDNN's descriptors take them with the
        // format), another plan, tensors stored (n, h, w, c) and the weight (co, k, k, ci).
        let cl = g.channels_last();
        assert_ne!(cl, g);
        assert_eq!((cl.x, cl.w, cl.y()), (g.x, g.w, g.y()));
        assert_eq!((g.stored(g.x), g.stored(g.w)), (g.x, g.w));
        assert_eq!(cl.stored(cl.x), [2, 9, 7, 8]);
        assert_eq!(cl.stored(cl.w), [4, 3, 3, 8]);
        assert_eq!(cl.stored(cl.y()), [2, 5, 4, 4]);
        assert_eq!(cl.format(), sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC);
    }
}
