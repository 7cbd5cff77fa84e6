//! Loading and launching this crate's NVRTC kernels ([`crate::cuda_source`]): each module's
//! source compiled to PTX once per process (NVRTC's defaults: IEEE division and square root;
//! it may contract a multiply and an add into one FMA), loaded once per device by candle, and
//! the checks every launch makes on its operands.

#![allow(
    unsafe_code,
    reason = "outputs allocated uninitialised, for kernels that write them whole"
)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{Layout, Result, WithDType};
use std::sync::OnceLock;

/// A CUDA C module: its name (candle caches the loaded module under it), source and PTX.
pub(crate) struct Module {
    name: &'static str,
    what: &'static str,
    source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Module {
    pub(crate) const fn new(name: &'static str, what: &'static str, source: &'static str) -> Self {
        Module { name, what, source, ptx: OnceLock::new() }
    }

    /// The PTX, compiled on first use.
    pub(crate) fn ptx(&self) -> Result<&str> {
        self.ptx.get_or_init(|| cudarc_nvrtc(self.source)).as_deref().map_err(|e| {
            candle_core::Error::Msg(format!("NVRTC could not compile {}: {e}", self.what))
        })
    }

    /// Kernel `name` of this module on `dev` (launched on `dev.cuda_stream()`).
    pub(crate) fn func(&self, dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        Ok(dev.get_or_load_custom_func(name, self.name, self.ptx()?)?.into_cuda_function())
    }
}

fn cudarc_nvrtc(source: &str) -> std::result::Result<String, String> {
    candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source)
        .map(|p| p.to_src())
        .map_err(|e| format!("{e:?}"))
}

/// The optimiser's kernels ([`crate::cuda_optim`]).
pub(crate) static OPTIM: Module =
    Module::new("glip_optim", "glip's optimiser kernels", crate::cuda_source::OPTIM);
/// Softmax, layer norm and batch norm ([`crate::cuda_layers`]).
pub(crate) static NORM: Module =
    Module::new("glip_norm", "glip's normalisation kernels", crate::cuda_source::NORM);

/// The stem's max-pool ([`crate::cuda_layers`]'s pool launches).
pub(crate) static POOL: Module =
    Module::new("glip_pool", "glip's max-pool kernels", crate::cuda_source::POOL);

/// `Linear`'s bf16 casts, bias prefill and bias gradient ([`crate::cuda_linear`]).
pub(crate) static LINEAR: Module =
    Module::new("glip_linear", "glip's linear-layer kernels", crate::cuda_source::LINEAR);

/// Dropout and the activations' gradients ([`crate::cuda_layers`]' element-wise launches).
pub(crate) static ELEMENTWISE: Module =
    Module::new("glip_elementwise", "glip's element-wise kernels", crate::cuda_source::ELEMENTWISE);

/// Each row's best `k` ([`crate::cuda_layers::top_k`]).
pub(crate) static TOP_K: Module =
    Module::new("glip_top_k", "glip's top-k kernel", crate::cuda_source::TOP_K);

/// Multi-head attention for inference ([`crate::cuda_layers::attention`]).
pub(crate) static ATTENTION: Module =
    Module::new("glip_attention", "glip's attention kernel", crate::cuda_source::ATTENTION);

pub(crate) static DEFORMABLE: Module = Module::new(
    "glip_deformable",
    "glip's deformable sampling kernels",
    crate::cuda_source::DEFORMABLE,
);

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
