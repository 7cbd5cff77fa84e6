//! Loading and launching this crate's NVRTC kernels ([`crate::cuda_source`]): each module's
//! source compiled to PTX once per process (NVRTC's defaults: IEEE division and square root;
//! it may contract a multiply and an add into one FMA), loaded once per device by candle; every
//! launch through [`launch`], its arguments typed by the kernel's declared parameters
//! ([`crate::cuda_source::kernels`]); and the checks every launch makes on its operands.

#![allow(
    unsafe_code,
    reason = "kernel launches, their arguments typed by the kernels' declarations; outputs \
              allocated uninitialised, for kernels that write them whole"
)]

use crate::cuda_source::kernels::{self, Kernel, Launch, Module, Read, Value, Write, MAX_PARAMS};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{Layout, Result, WithDType};
use std::sync::OnceLock;

/// Each module's PTX (at its index, [`Module::ALL`]'s order), compiled on first use.
static PTX: [OnceLock<std::result::Result<String, String>>; Module::ALL.len()] =
    [const { OnceLock::new() }; Module::ALL.len()];

/// `module`'s PTX, compiled on first use.
fn ptx(module: Module) -> Result<&'static str> {
    PTX[module as usize].get_or_init(|| cudarc_nvrtc(module.source())).as_deref().map_err(|e| {
        candle_core::Error::Msg(format!(
            "NVRTC could not compile glip's CUDA module {}: {e}",
            module.name()
        ))
    })
}

fn cudarc_nvrtc(source: &str) -> std::result::Result<String, String> {
    candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source)
        .map(|p| p.to_src())
        .map_err(|e| format!("{e:?}"))
}

/// Kernel `K` on `dev` (its module loaded once per device by candle, under the module's name).
fn func<K: Kernel>(dev: &CudaDevice) -> Result<CudaFunction> {
    let ptx = ptx(K::MODULE)?;
    Ok(dev.get_or_load_custom_func(K::NAME, K::MODULE.name(), ptx)?.into_cuda_function())
}

/// Launches kernel `K` on `dev`'s stream with `cfg` and `args`, a tuple of its arguments in
/// order: rustc checks each against the parameter `K` declares ([`Arg`]), and
/// `cuda_source::kernels`' tests hold those declarations against the CUDA C and NVRTC's PTX.
/// Before anything is launched, blocks of a size `K` does not take (`K::THREADS`: a
/// reduction's shared array holds 256 values) are an error, and so is a launch outside `K`'s
/// contract: a buffer shorter than the elements `K` may touch at these scalars and this grid, a
/// null one where it touches any, or scalars breaking its conditions (a max-pool's output
/// sides, deformable sampling's levels inside its values).
///
/// # Safety
/// `K`'s contract in `cuda_source::kernels` is what `K` reads and writes: the contracts are
/// held to the CUDA C by running every kernel on the CPU with buffers exactly that long, under
/// AddressSanitizer in CI (`cuda_source::emulation_contracts`), over sampled arguments, not by
/// proof. Buffers the kernel reaches through a table of addresses (the optimiser's many-tensor
/// kernels) are the caller's to size.
pub(crate) unsafe fn launch<K: Kernel>(
    dev: &CudaDevice,
    cfg: LaunchConfig,
    mut args: impl Args<K::Params>,
) -> Result<()> {
    if !K::THREADS.admits(cfg.block_dim) {
        candle_core::bail!(
            "{}: launched with blocks of {:?} threads; it takes {:?}",
            K::NAME,
            cfg.block_dim,
            K::THREADS
        )
    }
    let mut values = [Value::Int(0); MAX_PARAMS];
    let n = args.values(&mut values);
    kernels::check::<K>(&values[..n], Launch::new(cfg.grid_dim, cfg.block_dim))
        .map_err(candle_core::Error::Msg)?;
    let f = func::<K>(dev)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    args.push_all(&mut b);
    // SAFETY: the arguments are of the kernel's parameter types, in its order, and the buffers
    // as long as its contract says it indexes (both checked above; the contract's truth and a
    // table's entries are this function's callers' promise).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(candle_core::Error::wrap)
}

/// An argument that can stand for a kernel parameter of type `P` ([`Read`], [`Write`],
/// [`Levels`](crate::cuda_source::kernels::Levels) or a scalar): pushed onto a launch as
/// cudarc pushes it (a buffer's reads and writes ordered on the stream by cudarc's events).
pub(crate) trait Arg<P> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>);
    /// The argument as the kernel's contract reads it (a buffer's length, a scalar's value).
    fn value(&self) -> Value;
}

/// A tuple of [`Arg`]s for a kernel's parameters `P` (a tuple of the same length).
pub(crate) trait Args<P> {
    fn push_all<'a>(&'a mut self, b: &mut LaunchArgs<'a>);
    /// Writes the arguments' [`Value`]s into `out`, in order; returns how many.
    fn values(&self, out: &mut [Value; MAX_PARAMS]) -> usize;
}

macro_rules! args_tuples {
    ($(($($p:ident $a:ident $x:ident),+))*) => {
        $(impl<$($p, $a: Arg<$p>),+> Args<($($p,)+)> for ($($a,)+) {
            fn push_all<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
                let ($($x,)+) = self;
                $($x.push(b);)+
            }

            fn values(&self, out: &mut [Value; MAX_PARAMS]) -> usize {
                let ($($x,)+) = self;
                let mut n = 0;
                $(
                    out[n] = $x.value();
                    n += 1;
                )+
                n
            }
        })*
    };
}
args_tuples! {
    (P0 A0 x0)
    (P0 A0 x0, P1 A1 x1)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7)
    (P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7, P8 A8 x8)
    (
        P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7,
        P8 A8 x8, P9 A9 x9
    )
    (
        P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7,
        P8 A8 x8, P9 A9 x9, P10 A10 x10
    )
    (
        P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7,
        P8 A8 x8, P9 A9 x9, P10 A10 x10, P11 A11 x11
    )
    (
        P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7,
        P8 A8 x8, P9 A9 x9, P10 A10 x10, P11 A11 x11, P12 A12 x12
    )
    (
        P0 A0 x0, P1 A1 x1, P2 A2 x2, P3 A3 x3, P4 A4 x4, P5 A5 x5, P6 A6 x6, P7 A7 x7,
        P8 A8 x8, P9 A9 x9, P10 A10 x10, P11 A11 x11, P12 A12 x12, P13 A13 x13
    )
}

/// The null pointer of an optional buffer the kernel does not touch.
static NULL: u64 = 0;

impl<T> Arg<Read<T>> for &CudaView<'_, T> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        b.arg(*self);
    }

    fn value(&self) -> Value {
        Value::Buffer(Some(self.len() as u64))
    }
}

impl<T> Arg<Read<T>> for &CudaSlice<T> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        b.arg(*self);
    }

    fn value(&self) -> Value {
        Value::Buffer(Some(self.len() as u64))
    }
}

/// A buffer the kernel does not read where this is `None` (it says when), passed as null.
impl<T> Arg<Read<T>> for Option<&CudaView<'_, T>> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        match self {
            Some(v) => b.arg(*v),
            None => b.arg(&NULL),
        };
    }

    fn value(&self) -> Value {
        Value::Buffer(self.map(|v| v.len() as u64))
    }
}

impl<T> Arg<Write<T>> for &mut CudaSlice<T> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        b.arg(&mut **self);
    }

    fn value(&self) -> Value {
        Value::Buffer(Some(self.len() as u64))
    }
}

impl<T> Arg<Write<T>> for &mut CudaViewMut<'_, T> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        b.arg(&mut **self);
    }

    fn value(&self) -> Value {
        Value::Buffer(Some(self.len() as u64))
    }
}

/// A buffer the kernel does not write where this is `None` (it says when), passed as null.
impl<T> Arg<Write<T>> for Option<&mut CudaSlice<T>> {
    fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
        match self {
            Some(v) => b.arg(&mut **v),
            None => b.arg(&NULL),
        };
    }

    fn value(&self) -> Value {
        Value::Buffer(self.as_ref().map(|v| v.len() as u64))
    }
}

macro_rules! scalar_args {
    ($($t:ty => $variant:ident),*) => {
        $(impl Arg<$t> for $t {
            fn push<'a>(&'a mut self, b: &mut LaunchArgs<'a>) {
                b.arg(&*self);
            }

            fn value(&self) -> Value {
                Value::$variant((*self).into())
            }
        })*
    };
}
scalar_args!(f32 => Float, f64 => Float, u32 => Int, u64 => Int);

/// At most this many blocks in a grid-stride launch (the loops stride over the rest).
const MAX_BLOCKS: usize = 4096;
/// At most this many blocks of rows or channels (grid-stride over the rest).
const MAX_ROW_BLOCKS: usize = 65_535;

/// One thread per element, at most [`MAX_BLOCKS`] blocks of [`crate::cuda_source::THREADS`].
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let t = crate::cuda_source::THREADS;
    let blocks = n.div_ceil(t as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (t, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row (or channel) of `len` elements, reduced in shared memory.
pub(crate) fn per_row(rows: usize, len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_ROW_BLOCKS) as u32, 1, 1),
        block_dim: (crate::cuda_source::block_threads(len), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` as a kernel's `unsigned`, or an error naming `what`.
pub(crate) fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what}: {n} is over 2^32")))
}

/// `got == want` elements, or an error naming `what`.
pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        candle_core::bail!("{what}: {got} elements where {want} were expected")
    }
    Ok(())
}

/// The contiguous f32 elements of an operand, or an error naming `what`.
pub(crate) fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    view_of::<f32>(s, l, what)
}

/// The contiguous elements of an operand of element type `T`, or an error naming `what`.
pub(crate) fn view_of<'a, T: CudaDType + DeviceRepr + WithDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    if s.dtype() != T::DTYPE {
        candle_core::bail!("{what}: expected {:?}, got {:?}", T::DTYPE, s.dtype())
    }
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the operand must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `n` uninitialised elements of `T` on `dev`, for a kernel (or a cuBLAS product with
/// `beta = 0`) that writes every one.
pub(crate) fn output_of<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers launch kernels (or cuBLAS products with beta = 0) that write all `n`
    // elements before anything reads them (each says which).
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// `n` uninitialised f32 on `dev`, for a kernel that writes every element.
pub(crate) fn output(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    output_of::<f32>(dev, n)
}
