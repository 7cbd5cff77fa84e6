//! A bf16 matrix product with f32 accumulation for the CPU's AVX-512 BF16 instructions, and
//! the autocast scope that routes convolutions (forward and backward) and gradient-free linear
//! layers through it.
//!
//! candle 0.11.1 has no bf16 gemm on the CPU (its bf16 matmul widens both operands to f32), and
//! neither has the `gemm` crate (its f16 kernels widen too), so bf16 would only add conversions.
//! `vdpbf16ps` (AVX512_BF16: Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) multiplies
//! 32 bf16 pairs and adds them into 16 f32 lanes per instruction, twice the multiply-adds of an
//! f32 FMA of the same width; this module is the smallest gemm that uses it, in the BLIS
//! arrangement:
//!
//! * `A (m, k)` (the weights) is packed into panels of [`MR`] rows, `B (k, n)` (the im2col
//!   columns) into panels of [`NR`] columns, both as bf16 pairs `(x[k], x[k + 1])` in one `u32`
//!   (rounded to nearest even), zero-padded to whole panels and an even `k`;
//! * the micro-kernel keeps an `MR x NR` tile of f32 sums in 24 registers: per pair of `k` it
//!   loads three vectors of `B`, broadcasts eight pairs of `A` and issues 24 `vdpbf16ps`;
//! * `k` is cut into blocks of [`KC`] so a panel of `B` (24 KiB) stays in L1 while every panel
//!   of `A` in a block of [`MC`] rows passes over it; rayon splits the `(m, n)` blocks.
//!
//! On CPUs with AMX (Intel Sapphire Rapids on) the same packed `B` feeds AMX's tile
//! instructions instead ([`Kernel::Amx`]): `tdpbf16ps` multiplies a 16 x 32 bf16 tile of `A` by
//! a 32 x 16 tile of `B` into 16 x 16 f32 sums, 8,192 multiply-adds per instruction. There
//! `vdpbf16ps` is no faster than an f32 FMA (one port against two), and the AVX-512 kernel lost
//! to candle's f32 gemm by 1.3-2x (`benches/benches/gemm.rs` on a 2-core Intel Xeon with AMX,
//! 2026-12-05); the AMX kernel is what makes bf16 pay there. `A` is packed as rows of pairs for
//! it, and `k` padded with zeros to whole tiles (32) in both operands.
//!
//! Every product of two bf16 numbers is exact in f32, so the only errors are the roundings of
//! the inputs to bf16 (8 significant bits: relative `2^-8` each) and f32 summation: for
//! `c = sum_k a_k b_k`, `|c - c_exact| <= (2^-7 + 2^-16 + gamma_k) * sum_k |a_k b_k|` with `gamma_k = k 2^-24 /
//! (1 - k 2^-24)`, the bound the tests check against an f64 product, for every kernel the CPU
//! has. CPUs without AVX512_BF16 get [`Kernel::Portable`] (the same sums, one scalar at a time,
//! possibly in another order within a pair, and without the instructions' flushing of
//! subnormals), used by the tests there; callers use [`available`] to choose f32 instead, which
//! is faster on such CPUs.

#![allow(
    unsafe_code,
    reason = "SIMD intrinsics and AMX instructions (inline assembly: Rust has no stable AMX \
              intrinsics) behind a run-time CPU check, and one output buffer written by rayon's \
              tasks in disjoint tiles; the only other unsafe code in glip-kernels is `gemm`"
)]

use candle_core::{DType, Result, Tensor, TensorId};
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Rows of the micro-kernel's tile (rows of `A`).
pub const MR: usize = 8;
/// Columns of the micro-kernel's tile (columns of `B`): three vectors of 16 f32 lanes.
pub const NR: usize = 48;
/// Depth of one block of `k` (an even number).
pub const KC: usize = 256;
/// Rows of `A` per parallel block.
pub const MC: usize = 256;
/// Columns of `B` per parallel block.
pub const NC: usize = 8 * NR;

/// The precision convolutions compute in (`"f32"` or `"bf16"` in configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Inputs and weights rounded to bf16, products summed in f32, outputs f32.
    Bf16,
}

impl Precision {
    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision {other:?} (f32 or bf16)")),
        }
    }
}

/// Why `precision` cannot take effect on `device` (it would run in f32), or `None` when it
/// does: bf16 exists on CUDA GPUs of compute capability 8.0 (Ampere) and newer (convolutions
/// and `Linear`, see [`crate::cuda`]) and on CPUs with AVX512_BF16.
pub fn fallback_reason(precision: Precision, device: &candle_core::Device) -> Option<String> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 if device.is_cuda() => gpu_fallback_reason(cuda_capability(device)),
        Precision::Bf16 if !device.is_cpu() => {
            Some(format!("bf16 is not implemented on {device:?} yet: computing in f32"))
        }
        Precision::Bf16 if !available() => Some(
            "this CPU has no AVX512_BF16 (bf16 would be slower than f32 here): computing in f32"
                .into(),
        ),
        Precision::Bf16 => None,
    }
}

/// Why bf16 cannot run on a GPU of compute capability `cap` (`None` when it can, or when the
/// driver did not say): candle-kernels compiles its bf16 kernels for 8.0 (Ampere) and newer
/// only (`#if __CUDA_ARCH__ >= 800`), so on a Turing GPU (7.5: a T4, an RTX 20x0) it has no
/// bf16 cast or map to launch.
fn gpu_fallback_reason(cap: Option<(i32, i32)>) -> Option<String> {
    let (major, minor) = cap?;
    ((major, minor) < (8, 0)).then(|| {
        format!(
            "this GPU (compute capability {major}.{minor}) has no bf16 kernels (8.0, Ampere, and \
             newer have): computing in f32"
        )
    })
}

/// The compute capability of a CUDA device, as its driver reports it.
#[cfg(feature = "cuda")]
fn cuda_capability(device: &candle_core::Device) -> Option<(i32, i32)> {
    match device {
        candle_core::Device::Cuda(d) => d.cuda_stream().context().compute_capability().ok(),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_capability(_: &candle_core::Device) -> Option<(i32, i32)> {
    None
}

/// The precision that takes effect for `precision` on `device`, and why it differs when it
/// does (to warn with).
pub fn resolve(precision: Precision, device: &candle_core::Device) -> (Precision, Option<String>) {
    match fallback_reason(precision, device) {
        Some(why) => (Precision::F32, Some(why)),
        None => (precision, None),
    }
}

thread_local! {
    static PRECISION: Cell<Precision> = const { Cell::new(Precision::F32) };
    /// The weights packed inside the current bf16 scope, by tensor.
    static PACKED: RefCell<HashMap<TensorId, Arc<PackedA>>> = RefCell::new(HashMap::new());
    /// The transposed linear weights packed inside the current bf16 scope, by tensor.
    static PACKED_T: RefCell<HashMap<TensorId, Arc<PackedB>>> = RefCell::new(HashMap::new());
    /// What [`scope_cached`] made inside the current bf16 scope from gradient-free tensors (the
    /// bf16 copies of weights, batch norms' constants), by tensor and kind.
    static DERIVED: RefCell<HashMap<(TensorId, &'static str), Tensor>> =
        RefCell::new(HashMap::new());
}

/// The precision in force on this thread (f32 unless inside [`autocast`]).
pub fn precision() -> Precision {
    PRECISION.with(|p| p.get())
}

/// Runs `f` with this thread's CPU convolutions and gradient-free `Linear` layers computing
/// their forward products in `precision` (as PyTorch's `torch.autocast`), then restores the
/// previous setting. A convolution made inside the scope computes its gradients' products in
/// the same precision when the backward runs (after the scope, as a training step's does);
/// a trainable `Linear` stays f32. Where the CPU has no AVX512_BF16, `Bf16` is f32 (see
/// [`available`]).
///
/// Like `torch.autocast`'s weight-cast cache, a bf16 scope packs each gradient-free weight once
/// and reuses it until the outermost bf16 scope ends: such weights must not change inside it
/// (one scope per training step, or around a whole evaluation; trainable weights, which the
/// optimiser changes, are packed afresh at every use).
pub fn autocast<T>(precision: Precision, f: impl FnOnce() -> T) -> T {
    struct Restore(Precision, Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|p| p.set(self.0));
            if self.0 != self.1 {
                PACKED.with(|c| c.borrow_mut().clear());
                PACKED_T.with(|c| c.borrow_mut().clear());
                DERIVED.with(|c| c.borrow_mut().clear());
            }
        }
    }
    let _restore = Restore(PRECISION.with(|p| p.replace(precision)), precision);
    f()
}

type Cache<T> = std::thread::LocalKey<RefCell<HashMap<TensorId, Arc<T>>>>;

/// `make(w's values)` for the weight `w`, from `cache` when it holds one that `fits`; a
/// gradient-free weight's is cached until the outermost bf16 scope ends, a trainable one's
/// (the optimiser changes it every step) never.
fn packed<T>(
    cache: &'static Cache<T>,
    w: &Tensor,
    fits: impl Fn(&T) -> bool,
    make: impl FnOnce(Vec<f32>) -> Result<T>,
) -> Result<Arc<T>> {
    if let Some(p) = cache.with(|c| c.borrow().get(&w.id()).cloned()).filter(|p| fits(p)) {
        return Ok(p);
    }
    let p = Arc::new(make(w.detach().flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)?);
    if precision() == Precision::Bf16 && !w.track_op() {
        cache.with(|c| c.borrow_mut().insert(w.id(), p.clone()));
    }
    Ok(p)
}

/// The packed bf16 form of `w` (a weight viewed as `(rows, cols)`), from the current scope's
/// cache, or packed now (and cached, if `w` has no gradient, until the outermost bf16 scope
/// ends).
pub fn packed_weight(w: &Tensor, rows: usize, cols: usize) -> Result<Arc<PackedA>> {
    packed(
        &PACKED,
        w,
        |a| a.m == rows && a.k == cols,
        |v| {
            if v.len() != rows * cols {
                candle_core::bail!("bf16 weight: {} values for ({rows}, {cols})", v.len());
            }
            Ok(PackedA::new(&v, rows, cols))
        },
    )
}

/// `w` cast to bf16 for a product on a GPU. Inside a bf16 [`autocast`] the copy of a
/// gradient-free weight (inference, a frozen layer) is made once and reused until the outermost
/// bf16 scope ends, as `torch.autocast`'s weight-cast cache: one scope around an evaluation casts
/// each weight once instead of once per batch. Trainable weights (the optimiser changes them)
/// are cast at every use. The same rule as the CPU's packed weights: such weights must not
/// change inside the scope.
pub fn bf16_weight(w: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 {
        return Ok(w.clone());
    }
    scope_cached(w, "bf16 copy", || w.to_dtype(DType::BF16))
}

/// `make()`, a value computed from `key` (and other tensors that belong to it, such as a batch
/// norm's parameters beside its running variance), made once and reused until the outermost
/// bf16 [`autocast`] scope ends when `key` has no gradient, as [`bf16_weight`]'s casts: such
/// tensors must not change inside the scope. Outside a bf16 scope, or for a tensor that tracks
/// a gradient, made at every call. `what` names the kind of value (one tensor may key several).
pub fn scope_cached(
    key: &Tensor,
    what: &'static str,
    make: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let cache = precision() == Precision::Bf16 && !key.track_op();
    if cache {
        if let Some(c) = DERIVED.with(|c| c.borrow().get(&(key.id(), what)).cloned()) {
            return Ok(c);
        }
    }
    let c = make()?;
    if cache {
        DERIVED.with(|m| m.borrow_mut().insert((key.id(), what), c.clone()));
    }
    Ok(c)
}

/// Every tensor [`scope_cached`] holds now (for a CUDA graph recorded inside the scope, which
/// reads them at every replay and so keeps them alive past the scope:
/// [`crate::graph::capture`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "used by the CUDA capture"))]
pub(crate) fn scope_tensors() -> Vec<Tensor> {
    DERIVED.with(|c| c.borrow().values().cloned().collect())
}

thread_local! {
    /// Whether [`with_bf16_activations`] asked for bf16 activations on every device.
    static FORCE_ACTIVATIONS: Cell<bool> = const { Cell::new(false) };
}

/// The dtype a backbone keeps its activations in for the input `x`: bf16 inside a bf16
/// [`autocast`] on CUDA where this crate's kernels take bf16 activations (a `cuda` build;
/// [`crate::cuda::own_kernels`]), unless `GLIP_BF16_ACTIVATIONS=0` keeps them f32 (to compare
/// the two); f32 otherwise (on the CPU a bf16 scope computes the products in bf16 and keeps
/// f32 activations). With bf16 activations a convolution reads and writes bf16 (its weight cast
/// to bf16 once per use, its sums f32) and the frozen batch norms, ReLUs, residual sums and the
/// stem pool run on bf16 in f32 arithmetic: no cast around every convolution, half the memory
/// traffic. The backbone's caller casts what it takes back to f32. An input that is not f32 keeps
/// its dtype.
pub fn activation_dtype(x: &Tensor) -> DType {
    if x.dtype() != DType::F32 {
        return x.dtype();
    }
    if FORCE_ACTIVATIONS.with(Cell::get) {
        return DType::BF16;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("GLIP_BF16_ACTIVATIONS").map_or(true, |v| v != "0"));
    if on && precision() == Precision::Bf16 && x.device().is_cuda() && crate::cuda::own_kernels(x) {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Runs `f` with [`activation_dtype`] bf16 on every device, the CPU included (there candle's
/// generic bf16 operations, slow): for tests of a model's bf16 data flow on a machine without a
/// GPU. Restores the previous setting.
pub fn with_bf16_activations<T>(f: impl FnOnce() -> T) -> T {
    crate::with_flag_set(&FORCE_ACTIVATIONS, f)
}

/// Whether a product of `x` with the weight `w` runs in bf16 here: inside a bf16 [`autocast`]
/// on a CPU with AVX512_BF16, both f32 on the CPU, neither part of a backward graph.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    precision() == Precision::Bf16
        && available()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && !(x.track_op() || w.track_op())
}

/// `x (rows, in) @ w^T` for a linear layer's `w (out, in)`, in bf16 with f32 sums: `w^T` is
/// packed once per bf16 scope, `x` per call.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out, din) = w.dims2()?;
    if x.dim(1)? != din {
        candle_core::bail!("bf16 linear: input of width {} for a weight {:?}", x.dim(1)?, w.dims());
    }
    let b = packed(
        &PACKED_T,
        w,
        |b| b.k == din && b.n == out,
        |v| {
            // Column j of `w^T` is row j of `w`.
            Ok(PackedB::from_panels(din, out, |j0, width, scratch| {
                for jj in 0..width {
                    for (r, &x) in v[(j0 + jj) * din..][..din].iter().enumerate() {
                        scratch[r * NR + jj] = x;
                    }
                }
            }))
        },
    )?;
    x.contiguous()?.apply_op1_no_bwd(&Bf16Linear(b))
}

/// `x (rows, k)` times a packed `(k, n)`: `(rows, n)` f32.
struct Bf16Linear(Arc<PackedB>);

impl candle_core::CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "glip-linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = crate::conv::contiguous_f32(s, l, "linear-bf16")?;
        let (rows, k) = l.shape().dims2()?;
        let a = PackedA::new(x, rows, k);
        let y = gemm(&a, &self.0);
        Ok((candle_core::CpuStorage::F32(y), candle_core::Shape::from((rows, self.0.n))))
    }
}

/// Whether this CPU runs the AVX512_BF16 kernel (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bound on `|c - c_exact| / sum_k |a_k b_k|` of one output of a bf16 product over `terms`
/// products (module doc): `2^-7 + 2^-16 + gamma_terms`, `gamma_n = n u / (1 - n u)`, `u = 2^-24`.
pub fn relative_error_bound(terms: usize) -> f64 {
    let nu = terms as f64 * 2f64.powi(-24);
    2f64.powi(-7) + 2f64.powi(-16) + nu / (1.0 - nu)
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits; NaN stays NaN.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// The f32 value of bf16 bits.
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// The micro-kernels of [`gemm`](fn@gemm), and the packing each reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// One scalar multiply-add at a time: every CPU (the tests' reference where nothing else
    /// runs; callers compute in f32 instead, see [`available`]).
    Portable,
    /// `vdpbf16ps` on an `MR x NR` tile of sums in AVX-512 registers (AVX512_BF16).
    Avx512,
    /// AMX's `tdpbf16ps` on three 16 x 16 tiles of sums (AMX-BF16, with Linux's permission to
    /// use the tile registers). `A` rows of pairs, `k` padded to whole tiles.
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (checked once): AMX, else AVX512_BF16, else portable.
    /// `GLIP_BF16_KERNEL=avx512` or `=portable` picks a slower one that the CPU also runs (to
    /// compare them); an unknown or unavailable name is ignored.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let asked = std::env::var("GLIP_BF16_KERNEL").ok().and_then(|v| match v.as_str() {
                "amx" => Some(Kernel::Amx),
                "avx512" => Some(Kernel::Avx512),
                "portable" => Some(Kernel::Portable),
                _ => None,
            });
            match asked {
                Some(k) if k.runs_here() => k,
                _ => [Kernel::Amx, Kernel::Avx512, Kernel::Portable]
                    .into_iter()
                    .find(|k| k.runs_here())
                    .unwrap_or(Kernel::Portable),
            }
        })
    }

    /// Whether this CPU (and OS) runs the kernel.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx512 => available(),
            Kernel::Amx => available() && amx_enabled(),
        }
    }

    /// Pairs of `k` a packing for this kernel stores (the AMX kernel reads whole tiles of 16).
    fn pairs(self, k: usize) -> usize {
        match self {
            Kernel::Amx => k.div_ceil(2 * AMX_K) * AMX_K,
            Kernel::Portable | Kernel::Avx512 => k.div_ceil(2),
        }
    }
}

/// Pairs of `k` in one AMX tile of `A` (a row of 64 bytes) or of `B` (its 16 rows).
const AMX_K: usize = 16;
/// Rows of an AMX tile of `A` and of sums, columns of a tile of `B` and of sums.
const AMX_ROWS: usize = 16;

/// Whether AMX-BF16 is there and Linux lets this process use the tile registers (asked once:
/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16 on).
fn amx_enabled() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(amx::enable)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// `A (m, k)` as bf16 pairs, for its [`Kernel`]: for [`Kernel::Avx512`] and
/// [`Kernel::Portable`] in panels of [`MR`] rows (panel `p`, pair `q`, row `i` at `(p * kq + q)
/// * MR + i`), for [`Kernel::Amx`] as rows of pairs (row `i`, pair `q` at `i * kq + q`, rows
/// padded to a multiple of 16); `kq` pairs per row ([`Kernel::pairs`]), zeros past `k`.
#[derive(Debug, Clone)]
pub struct PackedA {
    kernel: Kernel,
    m: usize,
    k: usize,
    kq: usize,
    data: Vec<u32>,
}

/// `B (k, n)` as bf16 pairs in panels of [`NR`] columns: panel `p`, pair `q`, column `j` at
/// `(p * kq + q) * NR + j`, `kq` pairs per panel as its [`Kernel`] reads (`Kernel::pairs`),
/// zeros past `k` and `n`.
#[derive(Debug, Clone)]
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    kq: usize,
    data: Vec<u32>,
}

impl PackedA {
    /// Packs the row-major `a` of `m` rows and `k` columns for [`Kernel::best`].
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        Self::for_kernel(Kernel::best(), a, m, k)
    }

    /// Packs the row-major `a` of `m` rows and `k` columns for `kernel`.
    pub fn for_kernel(kernel: Kernel, a: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "PackedA: {} values for ({m}, {k})", a.len());
        Self::from_rows_for(kernel, m, k, |i, row| row.copy_from_slice(&a[i * k..][..k]))
    }

    /// Packs an `(m, k)` matrix whose rows `row(i, dst)` writes (all `k` values of `dst`), for
    /// [`Kernel::best`]: for an `A` that is not one row-major matrix (a gradient gathered from
    /// a batch), packed without an f32 copy of it first.
    ///
    /// The packing goes into the memory of a dropped packing, as
    /// [`PackedB::from_panels_reusing`]'s (for packings made and dropped at every call: not for
    /// one that is kept).
    pub fn from_rows(m: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        Self::from_row_blocks_for(Kernel::best(), m, k, PANELS.take(), rows_filler(k, row))
    }

    /// Packs the transpose of the row-major `a` of `k` rows and `m` columns (a weight's
    /// transpose), for [`Kernel::best`]: read in blocks of rows of `A` (a column of `a` at a
    /// time would read one value per cache line). Into reused memory, as
    /// [`PackedA::from_rows`].
    pub fn transposed(a: &[f32], k: usize, m: usize) -> Self {
        Self::transposed_for(Kernel::best(), a, k, m)
    }

    /// [`PackedA::transposed`] for `kernel`.
    pub fn transposed_for(kernel: Kernel, a: &[f32], k: usize, m: usize) -> Self {
        assert_eq!(a.len(), m * k, "PackedA: {} values for ({k}, {m}) transposed", a.len());
        Self::from_row_blocks_for(kernel, m, k, PANELS.take(), |i0, rows, ld| {
            let count = rows.len().div_ceil(ld);
            for (j, src) in a.chunks_exact(m).enumerate() {
                for (r, &v) in src[i0..][..count].iter().enumerate() {
                    rows[r * ld + j] = v;
                }
            }
        })
    }

    /// [`PackedA::from_rows`] for `kernel`.
    pub fn from_rows_for(
        kernel: Kernel,
        m: usize,
        k: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        Self::from_row_blocks_for(kernel, m, k, Vec::new(), rows_filler(k, row))
    }

    /// The packing, into `data`'s memory: `fill(i0, rows, ld)` writes rows `i0..` of `A` (as
    /// many as `rows` holds, each the first `k` of `ld` values: row `r` at `rows[r * ld..][..k]`)
    /// for one block of rows (a tile of 16 for AMX, a panel of [`MR`] else), in parallel over
    /// blocks; the values past `k` in each row and the rows past `m` are zeros here.
    fn from_row_blocks_for(
        kernel: Kernel,
        m: usize,
        k: usize,
        mut data: Vec<u32>,
        fill: impl Fn(usize, &mut [f32], usize) + Sync,
    ) -> Self {
        let kq = kernel.pairs(k);
        let (block, ld) = (if kernel == Kernel::Amx { AMX_ROWS } else { MR }, 2 * kq);
        let len = m.div_ceil(block) * block * kq;
        data.clear();
        data.reserve_exact(len);
        if kq > 0 {
            let spare = &mut data.spare_capacity_mut()[..len];
            spare.par_chunks_mut(block * kq).enumerate().for_each(|(b, out)| {
                with_scratch(block * ld, |s| {
                    let (i0, count) = (b * block, block.min(m.saturating_sub(b * block)));
                    fill(i0, &mut s[..count * ld], ld);
                    for row in s[..count * ld].chunks_exact_mut(ld) {
                        row[k..].fill(0.0);
                    }
                    s[count * ld..].fill(0.0);
                    if kernel == Kernel::Amx {
                        pack_pairs(s, out);
                    } else {
                        for (q, pairs) in out.chunks_exact_mut(MR).enumerate() {
                            for (r, d) in pairs.iter_mut().enumerate() {
                                let v = &s[r * ld + 2 * q..];
                                d.write(pair(v[0], v[1]));
                            }
                        }
                    }
                })
            });
        }
        // SAFETY: every block of `len` was written above (every pair of it: `pack_pairs`, or
        // the loop over all `MR` rows of `kq` pairs); with `kq == 0`, `len` is 0.
        unsafe { data.set_len(len) };
        Self { kernel, m, k, kq, data }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }
}

impl PackedB {
    /// Packs the row-major `b` of `k` rows and `n` columns for [`Kernel::best`].
    pub fn new(b: &[f32], k: usize, n: usize) -> Self {
        Self::for_kernel(Kernel::best(), b, k, n)
    }

    /// Packs the row-major `b` of `k` rows and `n` columns for `kernel`.
    pub fn for_kernel(kernel: Kernel, b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "PackedB: {} values for ({k}, {n})", b.len());
        Self::from_panels_for(kernel, k, n, copy_rows(b, n))
    }

    /// [`PackedB::new`] into the memory of a dropped one, as [`PackedB::from_panels_reusing`].
    pub fn new_reusing(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "PackedB: {} values for ({k}, {n})", b.len());
        Self::from_panels_reusing(k, n, copy_rows(b, n))
    }

    /// Packs a `(k, n)` matrix that `fill` writes one panel at a time, for [`Kernel::best`]:
    /// `fill(j0, width, scratch)` writes columns `j0..j0 + width` into the first `width`
    /// entries of each of the `k` rows of [`NR`] f32 in `scratch`, every one of them, zeros
    /// included (the scratch is reused from panel to panel without clearing; the columns past
    /// `width` and the padding rows past `k` are made zeros here). Panels run in parallel, each
    /// with its own scratch, small enough to stay in cache between `fill` and the conversion,
    /// so a caller that makes `B` (im2col) never writes it out in f32.
    pub fn from_panels(k: usize, n: usize, fill: impl Fn(usize, usize, &mut [f32]) + Sync) -> Self {
        Self::from_panels_for(Kernel::best(), k, n, fill)
    }

    /// [`PackedB::from_panels`] for `kernel`.
    pub fn from_panels_for(
        kernel: Kernel,
        k: usize,
        n: usize,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        Self::pack(kernel, k, n, Vec::new(), fill)
    }

    /// [`PackedB::from_panels`] into the memory of the largest `PackedB` dropped on this thread
    /// before (up to 64 MiB): for the columns of a convolution, made and dropped at every call.
    /// Fresh memory from the OS is faulted in and cleared by the kernel page by page: most of
    /// the 18 % of a bf16 ResNet-50 inference (AMX) that went to page clearing. (Not for a
    /// `PackedB` that is kept: it would hold that memory.)
    pub fn from_panels_reusing(
        k: usize,
        n: usize,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        Self::pack(Kernel::best(), k, n, PANELS.take(), fill)
    }

    /// The packing of `from_panels*` into `data`'s memory.
    fn pack(
        kernel: Kernel,
        k: usize,
        n: usize,
        mut data: Vec<u32>,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        let kq = kernel.pairs(k);
        let len = n.div_ceil(NR) * kq * NR;
        // Not zeroed first: `pack_panel` writes every pair of every panel (for large `B`s,
        // zeroing cost as much as the product on AMX).
        data.clear();
        data.reserve_exact(len);
        data.spare_capacity_mut()[..len].par_chunks_mut((kq * NR).max(1)).enumerate().for_each(
            |(p, panel)| {
                with_scratch(2 * kq * NR, |scratch| {
                    let (j0, rows) = (p * NR, &mut scratch[..k * NR]);
                    let width = NR.min(n - j0);
                    fill(j0, width, rows);
                    if width < NR {
                        rows.chunks_exact_mut(NR).for_each(|r| r[width..].fill(0.0));
                    }
                    // Rows `k..2 * kq`, the padding `fill` never sees.
                    scratch[k * NR..].fill(0.0);
                    pack_panel(scratch, panel);
                })
            },
        );
        // SAFETY: the `len` values were written above, one panel by each task.
        unsafe { data.set_len(len) };
        Self { kernel, k, n, kq, data }
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.n
    }
}

/// The block filler of [`PackedA::from_row_blocks_for`] from a filler of single rows.
fn rows_filler(
    k: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> impl Fn(usize, &mut [f32], usize) + Sync {
    move |i0, rows, ld| {
        for (r, dst) in rows.chunks_mut(ld).enumerate() {
            row(i0 + r, &mut dst[..k]);
        }
    }
}

thread_local! {
    /// Each thread's f32 scratch for the packings (their values are whatever the last use
    /// left), kept between calls: made afresh per task, the scratch of a weight gradient's
    /// packing (a panel of 48 columns by every pixel of the batch) was fresh memory cleared by
    /// the kernel page by page, a tenth of a bf16 training step.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Calls `f` with `n` values of this thread's scratch ([`crate::conv::with_kept`]).
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    crate::conv::with_kept(&SCRATCH, n, f)
}

/// The panel filler of a row-major `b` of `n` columns.
fn copy_rows(b: &[f32], n: usize) -> impl Fn(usize, usize, &mut [f32]) + Sync + '_ {
    move |j0, width, scratch| {
        for (r, row) in scratch.chunks_exact_mut(NR).enumerate() {
            row[..width].copy_from_slice(&b[r * n + j0..][..width]);
        }
    }
}

thread_local! {
    /// The buffer of the largest [`PackedB`] dropped on this thread (up to [`KEEP_PANELS`]),
    /// for the next one made here (every value is rewritten).
    static PANELS: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// The largest packed buffer a thread keeps: the f32 convolution's cap (16 Mi values, 64 MiB);
/// larger ones go back to the allocator.
const KEEP_PANELS: usize = crate::conv::KEEP_COLUMNS;

/// Keeps `data` for the next [`PackedB`] made on this thread if it is larger than the buffer
/// kept now and not over [`KEEP_PANELS`].
fn keep_panels(data: Vec<u32>) {
    let kept = PANELS.take();
    PANELS.set(if data.capacity() <= KEEP_PANELS && data.capacity() > kept.capacity() {
        data
    } else {
        kept
    });
}

impl Drop for PackedB {
    fn drop(&mut self) {
        keep_panels(std::mem::take(&mut self.data));
    }
}

impl Drop for PackedA {
    fn drop(&mut self) {
        keep_panels(std::mem::take(&mut self.data));
    }
}

/// Rows `2q, 2q + 1` of `scratch` (`2 * kp` rows of [`NR`]) into pairs `q` of `panel`, every
/// one of its values written.
fn pack_panel(scratch: &[f32], panel: &mut [MaybeUninit<u32>]) {
    assert_eq!(2 * panel.len(), scratch.len(), "a panel of pairs from twice as many rows");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the instructions; both slices hold `kp` pairs of rows.
        return unsafe { avx512::pack_panel(scratch, panel) };
    }
    pack_panel_portable(scratch, panel);
}

/// Consecutive values of `src` as bf16 pairs `(src[2q], src[2q + 1])` into `dst` (`src` holds
/// twice as many values): rows of AMX's `A`.
fn pack_pairs(src: &[f32], dst: &mut [MaybeUninit<u32>]) {
    assert_eq!(src.len(), 2 * dst.len(), "pairs from twice as many values");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the instructions; `src` holds `2 * dst.len()` values.
        done = unsafe { avx512::pack_pairs(src, dst) };
    }
    for (d, v) in dst[done..].iter_mut().zip(src[2 * done..].chunks_exact(2)) {
        d.write(pair(v[0], v[1]));
    }
}

/// [`pack_panel`] one value at a time.
fn pack_panel_portable(scratch: &[f32], panel: &mut [MaybeUninit<u32>]) {
    for (pairs, rows) in panel.chunks_exact_mut(NR).zip(scratch.chunks_exact(2 * NR)) {
        let (lo, hi) = rows.split_at(NR);
        for ((d, &l), &h) in pairs.iter_mut().zip(lo).zip(hi) {
            d.write(pair(l, h));
        }
    }
}

/// A raw pointer to the output that rayon's tasks share; each writes a disjoint tile.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint `(row block, column block)` tiles of one buffer that outlives
// them (see `gemm_with`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the whole `Out`, which is `Send`).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// One micro-kernel call: `kp` pairs of the `A` panel at `a` and the `B` panel at `b` into the
/// `mr x nr` corner of the tile at `c` (row stride `ldc`), added to it when `add`.
type MicroKernel = unsafe fn(usize, *const u32, *const u32, *mut f32, usize, usize, usize, bool);

/// `A @ B` as a row-major `(m, n)` f32 matrix, with the kernel both are packed for.
///
/// # Panics
/// If `A` has not as many columns as `B` rows, or the two are packed for different kernels
/// (the packings of one [`Kernel::best`] always match).
pub fn gemm(a: &PackedA, b: &PackedB) -> Vec<f32> {
    gemm_each(a, 1, b.n, |_| b)
}

/// `count` products `A @ B_i` one after the other in one `(count, m, n)` row-major buffer,
/// `B_i` made by `make(i)` just before its product (so that one kept buffer serves them in
/// turn, [`PackedB::from_panels_reusing`]), each `n` columns wide: a convolution image by image
/// writes `(batch, channels, pixels)` with no transposing copy after.
///
/// # Panics
/// As [`gemm`](fn@gemm), and if a `B_i` is not `n` columns wide.
pub fn gemm_each<B: std::borrow::Borrow<PackedB>>(
    a: &PackedA,
    count: usize,
    n: usize,
    make: impl Fn(usize) -> B,
) -> Vec<f32> {
    let part = a.m * n;
    let mut c: Vec<f32> = Vec::with_capacity(count * part);
    for (i, out) in c.spare_capacity_mut()[..count * part].chunks_mut(part.max(1)).enumerate() {
        let b = make(i);
        let b = b.borrow();
        assert_eq!(b.n, n, "bf16 gemm: B_{i} has {} columns, not {n}", b.n);
        gemm_into(a, b, out);
    }
    // SAFETY: `gemm_into` wrote every value of each of the `count` parts.
    unsafe { c.set_len(count * part) };
    c
}

/// `A @ B` into the row-major `c` of `a.rows() * b.cols()` values.
pub(crate) fn gemm_to(a: &PackedA, b: &PackedB, c: &mut [f32]) {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and `gemm_into` writes only f32 values (an
    // initialised slice stays initialised).
    let c = unsafe { &mut *(std::ptr::from_mut::<[f32]>(c) as *mut [MaybeUninit<f32>]) };
    gemm_into(a, b, c);
}

/// `A @ B` into `c`, `a.rows() * b.cols()` values, every one written.
pub(crate) fn gemm_into(a: &PackedA, b: &PackedB, c: &mut [MaybeUninit<f32>]) {
    assert_eq!(a.k, b.k, "bf16 gemm: A has {} columns, B {} rows", a.k, b.k);
    assert_eq!(a.kernel, b.kernel, "bf16 gemm: A and B packed for different kernels");
    debug_assert_eq!(a.kq, b.kq, "one kernel and one k store as many pairs");
    assert_eq!(c.len(), a.m * b.n, "bf16 gemm: an output of {} values", c.len());
    match a.kernel {
        Kernel::Portable => gemm_with(a, b, c, portable_kernel),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if available() => gemm_with(a, b, c, avx512::kernel),
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Kernel::Amx if amx_enabled() => gemm_amx(a, b, c),
        // Packed by `for_kernel` for a kernel this CPU does not run.
        kernel => panic!("bf16 gemm: this CPU does not run the {kernel:?} kernel"),
    }
}

/// The `(m, n)` product into `c` that `task` writes in tiles ([`tiles`]), each on one of rayon's
/// threads as `task(i0..i1, j0..j1, out)`, `out` pointing at `c`. Every task must write every
/// value of its tile (`c` is not zeroed first: for the large outputs of early convolutions,
/// zeroing cost a tenth of a bf16 inference on AMX).
fn product(
    m: usize,
    n: usize,
    c: &mut [MaybeUninit<f32>],
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, Out) + Sync,
) {
    assert_eq!(c.len(), m * n);
    if c.is_empty() {
        return;
    }
    let out = Out(c.as_mut_ptr().cast());
    let (mc, nc) = tiles(m, n, rayon::current_num_threads());
    let (mb, nb) = (m.div_ceil(mc), n.div_ceil(nc));
    (0..mb * nb).into_par_iter().for_each(|t| {
        let (i0, j0) = ((t / nb) * mc, (t % nb) * nc);
        task(i0..(i0 + mc).min(m), j0..(j0 + nc).min(n), out);
    });
}

/// The tile of an `(m, n)` product each task writes: [`MC`] x [`NC`], halved (the larger side
/// first, in whole tiles of every kernel: multiples of 16 rows and of [`NR`] columns) until there
/// are two tiles per thread where the product has that many. A weight gradient is a small
/// `(m, n)` with a long `k` (a channel count by a kernel's inputs, summed over the batch's
/// pixels): in `MC x NC` tiles a 64 x 576 one was two tasks and a 64 x 64 one, one thread's work.
fn tiles(m: usize, n: usize, threads: usize) -> (usize, usize) {
    // In units of 16 rows and NR columns, no more than the product has.
    let (mut mu, mut nu) =
        ((MC / AMX_ROWS).min(m.div_ceil(AMX_ROWS)), (NC / NR).min(n.div_ceil(NR)));
    let count = |mu: usize, nu: usize| m.div_ceil(mu * AMX_ROWS) * n.div_ceil(nu * NR);
    while count(mu, nu) < 2 * threads {
        let rows = mu > 1 && count(mu.div_ceil(2), nu) > count(mu, nu);
        let cols = nu > 1 && count(mu, nu.div_ceil(2)) > count(mu, nu);
        match (rows, cols) {
            (true, true) if mu * AMX_ROWS >= nu * NR => mu = mu.div_ceil(2),
            (_, true) => nu = nu.div_ceil(2),
            (true, false) => mu = mu.div_ceil(2),
            (false, false) => break,
        }
    }
    (mu.max(1) * AMX_ROWS, nu.max(1) * NR)
}

fn gemm_with(a: &PackedA, b: &PackedB, c: &mut [MaybeUninit<f32>], kernel: MicroKernel) {
    let (m, n, kq) = (a.m, b.n, a.kq);
    if kq == 0 {
        // No sums: the micro-kernel, which writes its tile at the first block of `k`, never
        // runs.
        c.fill(MaybeUninit::new(0.0));
        return;
    }
    product(m, n, c, |is, js, out| {
        for q0 in (0..kq).step_by(KC / 2) {
            let qn = (KC / 2).min(kq - q0);
            for j in js.clone().step_by(NR) {
                let bp = &b.data[((j / NR) * kq + q0) * NR..];
                for i in is.clone().step_by(MR) {
                    let ap = &a.data[((i / MR) * kq + q0) * MR..];
                    // SAFETY: the panels hold `qn` pairs from `q0` on (both are padded to
                    // whole panels); the tile `(i.., j..)` of `mr x nr` lies inside `c`, and
                    // no other task writes it.
                    unsafe {
                        kernel(
                            qn,
                            ap.as_ptr(),
                            bp.as_ptr(),
                            out.at(i * n + j),
                            n,
                            MR.min(is.end - i),
                            NR.min(js.end - j),
                            q0 > 0,
                        );
                    }
                }
            }
        }
    })
}

/// [`gemm`] with AMX: per task, for each panel of `B`, each 16 rows of `A` against its three
/// 16-column tiles over the whole of `k`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn gemm_amx(a: &PackedA, b: &PackedB, c: &mut [MaybeUninit<f32>]) {
    product(a.m, b.n, c, |is, js, out| {
        // SAFETY: `amx_enabled()` (checked by `gemm`); `A` holds whole tiles of rows and pairs
        // (`Kernel::Amx`'s packing) and `B` whole panels of `kq` pairs; rows `is` and columns
        // `js` of the output (`n` a row) are this task's alone, and `block` writes every value
        // of them (the sums are zeroed in the tiles, so `kq == 0` writes zeros).
        unsafe { amx::block(&a.data, &b.data, a.kq, out.at(0), b.n, is, js) }
    })
}

/// The scalar micro-kernel (same contract as the AVX-512 one).
///
/// # Safety
/// `a` holds `kp * MR` and `b` `kp * NR` values; `c` has `mr` rows of `nr` writable values at
/// stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_kernel(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    add: bool,
) {
    let (a, b) =
        unsafe { (std::slice::from_raw_parts(a, kp * MR), std::slice::from_raw_parts(b, kp * NR)) };
    for i in 0..mr {
        for j in 0..nr {
            // SAFETY: inside the caller's tile (written, not read, when `!add`: the output
            // may be uninitialised then).
            let cij = unsafe { c.add(i * ldc + j) };
            let mut s = if add { unsafe { *cij } } else { 0.0 };
            for q in 0..kp {
                let (x, y) = (a[q * MR + i], b[q * NR + j]);
                s += from_bf16((x >> 16) as u16) * from_bf16((y >> 16) as u16);
                s += from_bf16(x as u16) * from_bf16(y as u16);
            }
            unsafe { *cij = s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// [`super::pack_panel`]: 16 columns of two rows per conversion of 32 values
    /// (`vcvtne2ps2bf16` rounds to nearest even), then one permutation into `(lo, hi)` pairs.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512_BF16; `scratch` holds `2 * panel.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_panel(scratch: &[f32], panel: &mut [MaybeUninit<u32>]) {
        // Lane 2j takes element j (the low row), lane 2j + 1 element 16 + j (the high row).
        let idx: [i16; 32] = std::array::from_fn(|l| ((l % 2) * 16 + l / 2) as i16);
        // SAFETY: 32 values.
        let idx = unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) };
        for (pairs, rows) in panel.chunks_exact_mut(NR).zip(scratch.chunks_exact(2 * NR)) {
            for v in 0..NR / 16 {
                // SAFETY: 16 values from `16 * v` lie inside both rows and `pairs` (NR each).
                unsafe {
                    let l = _mm512_loadu_ps(rows.as_ptr().add(16 * v));
                    let h = _mm512_loadu_ps(rows.as_ptr().add(NR + 16 * v));
                    let x: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                    let y = _mm512_permutexvar_epi16(idx, x);
                    _mm512_storeu_si512(pairs.as_mut_ptr().add(16 * v).cast(), y);
                }
            }
        }
    }

    /// [`super::pack_pairs`] for the whole blocks of 16 pairs (`vcvtne2ps2bf16` on 32
    /// consecutive values writes their bf16 in order: 16 pairs); returns the pairs written.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512_BF16; `src` holds `2 * dst.len()` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pack_pairs(src: &[f32], dst: &mut [MaybeUninit<u32>]) -> usize {
        let whole = dst.len() / 16 * 16;
        for (d, v) in dst[..whole].chunks_exact_mut(16).zip(src.chunks_exact(32)) {
            // SAFETY: 32 values read, 16 pairs written.
            unsafe {
                let l = _mm512_loadu_ps(v.as_ptr());
                let h = _mm512_loadu_ps(v.as_ptr().add(16));
                let x: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
                _mm512_storeu_si512(d.as_mut_ptr().cast(), x);
            }
        }
        whole
    }

    /// The AVX512_BF16 micro-kernel: see the module doc.
    ///
    /// # Safety
    /// As [`super::portable_kernel`], and the CPU has AVX512F and AVX512_BF16.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        add: bool,
    ) {
        unsafe { tile(kp, a, b, c, ldc, mr, nr, add) }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        add: bool,
    ) {
        const V: usize = NR / 16;
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for q in 0..kp {
            // SAFETY (whole block): `q < kp`, within the panels; the tile's corner is the
            // caller's.
            unsafe {
                let bq = b.add(q * NR);
                let bv: [__m512bh; V] = std::array::from_fn(|v| {
                    std::mem::transmute(_mm512_loadu_si512(bq.add(16 * v).cast()))
                });
                let aq = a.add(q * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(i) as i32));
                    for (s, &bj) in row.iter_mut().zip(&bv) {
                        *s = _mm512_dpbf16_ps(*s, ai, bj);
                    }
                }
            }
        }
        unsafe {
            if mr == MR && nr == NR {
                for (i, row) in acc.iter().enumerate() {
                    for (v, &s) in row.iter().enumerate() {
                        let p = c.add(i * ldc + 16 * v);
                        let s = if add { _mm512_add_ps(s, _mm512_loadu_ps(p)) } else { s };
                        _mm512_storeu_ps(p, s);
                    }
                }
            } else {
                let mut buf = [[0f32; NR]; MR];
                for (i, row) in acc.iter().enumerate() {
                    for (v, &s) in row.iter().enumerate() {
                        _mm512_storeu_ps(buf[i].as_mut_ptr().add(16 * v), s);
                    }
                }
                for (i, row) in buf.iter().enumerate().take(mr) {
                    for (j, &s) in row.iter().enumerate().take(nr) {
                        let p = c.add(i * ldc + j);
                        *p = if add { *p + s } else { s };
                    }
                }
            }
        }
    }
}

/// The AMX kernel: tile registers through inline assembly (Rust's AMX intrinsics and target
/// features are unstable; the assembler knows the instructions whatever the target features).
/// No Rust code touches the tile registers, so they keep their values between the `asm!`
/// blocks of one call.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::{AMX_K, AMX_ROWS, NR};
    use std::arch::asm;
    use std::ops::Range;

    /// `ldtilecfg`'s 64-byte operand: palette 1, bytes per row and rows of each tile.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) and Linux
    /// grants this process the tile data state (`ARCH_REQ_XCOMP_PERM`; refused by kernels
    /// before 5.16 and where the hypervisor hides it).
    pub(super) fn enable() -> bool {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; no memory is passed.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    /// Rows `rows` and columns `cols` of `C = A @ B` into `c` (row stride `ldc`): `a` in
    /// rows of `kq` pairs (rows padded to whole tiles), `b` in panels of [`NR`] columns of `kq`
    /// pairs, `kq` a multiple of [`AMX_K`]. Tiles 0-2 hold the sums of 16 rows by 48 columns,
    /// tile 3 the rows of `A`, tiles 4-6 the three column tiles of a panel of `B`.
    ///
    /// # Safety
    /// [`enable`] returned true; `rows.start` is a multiple of 16 and `cols.start` of [`NR`];
    /// `a` holds the tiles of `rows` and `b` the panels of `cols`; `c` has `rows.end` rows of
    /// `ldc >= cols.end` writable values that no other thread touches meanwhile. Every value of
    /// `rows` x `cols` is written (zeros when `kq == 0`).
    pub(super) unsafe fn block(
        a: &[u32],
        b: &[u32],
        kq: usize,
        c: *mut f32,
        ldc: usize,
        rows: Range<usize>,
        cols: Range<usize>,
    ) {
        debug_assert!(
            kq.is_multiple_of(AMX_K)
                && rows.start.is_multiple_of(AMX_ROWS)
                && cols.start.is_multiple_of(NR)
        );
        let cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        // A tile of sums that is not whole inside `c` goes through here.
        let mut edge = [0f32; AMX_ROWS * 16];
        // SAFETY (whole block): the tiles read lie inside `a` and `b` (asserted per panel and
        // row tile), the sums go to this task's part of `c` or to `edge`.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
            for j in cols.clone().step_by(NR) {
                let panel = &b[(j / NR) * kq * NR..][..kq * NR];
                for i in rows.clone().step_by(AMX_ROWS) {
                    let tiles = &a[i * kq..][..AMX_ROWS * kq];
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        options(nostack, nomem)
                    );
                    for q in (0..kq).step_by(AMX_K) {
                        asm!(
                            "tileloadd tmm3, [{a} + {lda}]",
                            "tileloadd tmm4, [{b} + {ldb}]",
                            "tileloadd tmm5, [{b} + {ldb} + 64]",
                            "tileloadd tmm6, [{b} + {ldb} + 128]",
                            "tdpbf16ps tmm0, tmm3, tmm4",
                            "tdpbf16ps tmm1, tmm3, tmm5",
                            "tdpbf16ps tmm2, tmm3, tmm6",
                            a = in(reg) tiles.as_ptr().add(q),
                            lda = in(reg) kq * 4,
                            b = in(reg) panel.as_ptr().add(q * NR),
                            ldb = in(reg) NR * 4,
                            options(nostack, readonly),
                        );
                    }
                    let mr = AMX_ROWS.min(rows.end - i);
                    for t in 0..NR / 16 {
                        let jt = j + 16 * t;
                        if jt >= cols.end {
                            break;
                        }
                        let nr = 16.min(cols.end - jt);
                        let whole = mr == AMX_ROWS && nr == 16;
                        let (dst, stride) = if whole {
                            (c.add(i * ldc + jt), ldc * 4)
                        } else {
                            (edge.as_mut_ptr(), 64)
                        };
                        match t {
                            0 => {
                                asm!("tilestored [{} + {}], tmm0", in(reg) dst, in(reg) stride, options(nostack))
                            }
                            1 => {
                                asm!("tilestored [{} + {}], tmm1", in(reg) dst, in(reg) stride, options(nostack))
                            }
                            _ => {
                                asm!("tilestored [{} + {}], tmm2", in(reg) dst, in(reg) stride, options(nostack))
                            }
                        }
                        if !whole {
                            for r in 0..mr {
                                std::ptr::copy_nonoverlapping(
                                    edge.as_ptr().add(r * 16),
                                    c.add((i + r) * ldc + jt),
                                    nr,
                                );
                            }
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_falls_back_to_f32_on_gpus_before_ampere_only() {
        for cap in [(7, 5), (7, 0), (6, 1)] {
            let why = gpu_fallback_reason(Some(cap)).expect("no bf16 before 8.0");
            assert!(why.contains(&format!("compute capability {}.{}", cap.0, cap.1)), "{why}");
            assert!(why.ends_with("computing in f32"), "{why}");
        }
        for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(gpu_fallback_reason(Some(cap)), None, "{cap:?}");
        }
        assert_eq!(gpu_fallback_reason(None), None, "a driver that does not say is not refused");
        // Off CUDA nothing asks a driver.
        assert_eq!(cuda_capability(&candle_core::Device::Cpu), None);
    }

    /// A deterministic stream of values in [-1, 1) with a few exact zeros and large entries.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32) / (1u64 << 24) as f32 * 2.0 - 1.0;
                if i % 97 == 0 {
                    0.0
                } else if i % 89 == 0 {
                    u * 300.0
                } else {
                    u
                }
            })
            .collect()
    }

    /// Checks the `(m, n)` product `got` of `a(i, q)` and `b(q, j)` over `k` terms against the
    /// f64 product of the unrounded inputs, entry by entry, within [`relative_error_bound`] (plus
    /// a flushed subnormal per term).
    fn assert_within_bound(
        got: &[f32],
        (m, k, n): (usize, usize, usize),
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) {
        assert_eq!(got.len(), m * n);
        let rel = relative_error_bound(k);
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut mag) = (0f64, 0f64);
                for q in 0..k {
                    let p = a(i, q) as f64 * b(q, j) as f64;
                    exact += p;
                    mag += p.abs();
                }
                let c = got[i * n + j] as f64;
                let bound = rel * mag + (k + 1) as f64 * f64::from(f32::MIN_POSITIVE);
                assert!(
                    (c - exact).abs() <= bound,
                    "({m}, {k}, {n}) at ({i}, {j}): {c} against {exact} (bound {bound})"
                );
            }
        }
    }

    /// `gemm(A, B)` with both packed for `kernel`, within the module doc's bound.
    fn check(m: usize, k: usize, n: usize, kernel: Kernel) {
        let (a, b) = (values(m * k, 1 + m as u64), values(k * n, 7 + n as u64));
        let c =
            gemm(&PackedA::for_kernel(kernel, &a, m, k), &PackedB::for_kernel(kernel, &b, k, n));
        assert_within_bound(&c, (m, k, n), |i, q| a[i * k + q], |q, j| b[q * n + j]);
    }

    /// Shapes with tails in every dimension (odd `k`, `m` not a multiple of `MR` nor of 16,
    /// `n` not of `NR` nor of 16), several `KC` blocks with a short last one, several parallel
    /// blocks (`MC`, `NC`), `k` of exactly one and of several AMX tiles, and no `k` at all
    /// (zeros).
    const SHAPES: [(usize, usize, usize); 11] = [
        (5, 0, 7),
        (1, 1, 1),
        (3, 5, 7),
        (8, 2, 48),
        (13, 27, 50),
        (64, 576, 100),
        (300, 9, 400),
        (20, 1001, 97),
        (16, 32, 16),
        (33, 64, 50),
        (270, 96, 800),
    ];

    /// Each kernel this CPU runs, within the bound on every shape; says which it skipped.
    fn check_kernel(kernel: Kernel) {
        if !kernel.runs_here() {
            eprintln!("skipped: this CPU (or OS) does not run the {kernel:?} kernel");
            return;
        }
        for &(m, k, n) in &SHAPES {
            check(m, k, n, kernel);
        }
    }

    #[test]
    fn portable_kernel_is_within_the_bf16_bound() {
        check_kernel(Kernel::Portable);
    }

    #[test]
    fn avx512_kernel_is_within_the_bf16_bound() {
        check_kernel(Kernel::Avx512);
    }

    #[test]
    fn amx_kernel_is_within_the_bf16_bound() {
        check_kernel(Kernel::Amx);
    }

    /// The AMX and AVX-512 kernels sum the same bf16 products: where both run, their results
    /// differ by no more than the two summation orders allow (`2 gamma_k sum |a b|` over the
    /// rounded inputs, plus the flushed subnormals), far inside the bf16 bound each meets.
    #[test]
    fn amx_and_avx512_kernels_agree_within_summation_error() {
        if !(Kernel::Amx.runs_here() && Kernel::Avx512.runs_here()) {
            eprintln!("skipped: this CPU does not run both the AMX and the AVX-512 kernel");
            return;
        }
        let (m, k, n) = (40, 700, 130);
        let (a, b) = (values(m * k, 11), values(k * n, 13));
        let run = |kernel| {
            gemm(&PackedA::for_kernel(kernel, &a, m, k), &PackedB::for_kernel(kernel, &b, k, n))
        };
        let (x, y) = (run(Kernel::Amx), run(Kernel::Avx512));
        let u = 2f64.powi(-24);
        let gamma = k as f64 * u / (1.0 - k as f64 * u);
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        for i in 0..m {
            for j in 0..n {
                let mag: f64 = (0..k).map(|q| (r(a[i * k + q]) * r(b[q * n + j])).abs()).sum();
                let bound = 2.0 * gamma * mag + (k + 1) as f64 * f64::from(f32::MIN_POSITIVE);
                let d = (x[i * n + j] as f64 - y[i * n + j] as f64).abs();
                assert!(
                    d <= bound,
                    "at ({i}, {j}): AMX {} AVX-512 {} (bound {bound})",
                    x[i * n + j],
                    y[i * n + j]
                );
            }
        }
    }

    /// The tiles rayon's tasks take: whole tiles of every kernel (multiples of 16 rows, of `NR`
    /// columns), at most `MC x NC`, covering the product, and at least two per thread where
    /// the product has that many tiles of 16 x `NR`.
    #[test]
    fn product_tiles_are_whole_and_enough_for_every_thread() {
        for threads in [1, 2, 4, 16] {
            for (m, n) in
                [(1, 1), (2, 196), (64, 64), (64, 576), (512, 4608), (577, 1025), (3000, 48)]
            {
                let (mc, nc) = tiles(m, n, threads);
                assert!(
                    mc.is_multiple_of(16) && mc.is_multiple_of(MR) && mc <= MC,
                    "{m}x{n}: {mc}"
                );
                assert!(nc.is_multiple_of(NR) && nc <= NC, "{m}x{n}: {nc}");
                let count = m.div_ceil(mc) * n.div_ceil(nc);
                let most = m.div_ceil(16) * n.div_ceil(NR);
                assert!(count >= (2 * threads).min(most), "{m}x{n} on {threads}: {count} tiles");
            }
        }
    }

    /// `A`'s packing for `kernel` written out one value at a time from its layout (the doc of
    /// `PackedA`): zeros past `k` and past `m`.
    fn layout_a(kernel: Kernel, a: &[f32], m: usize, k: usize) -> Vec<u32> {
        let kq = kernel.pairs(k);
        let at = |i: usize, j: usize| if i < m && j < k { a[i * k + j] } else { 0.0 };
        let pq = |i: usize, q: usize| pair(at(i, 2 * q), at(i, 2 * q + 1));
        if kernel == Kernel::Amx {
            (0..m.div_ceil(16) * 16).flat_map(|i| (0..kq).map(move |q| pq(i, q))).collect()
        } else {
            (0..m.div_ceil(MR))
                .flat_map(|p| (0..kq).flat_map(move |q| (0..MR).map(move |r| pq(p * MR + r, q))))
                .collect()
        }
    }

    /// `B`'s packing for `kernel` written out one value at a time (the doc of `PackedB`).
    fn layout_b(kernel: Kernel, b: &[f32], k: usize, n: usize) -> Vec<u32> {
        let kq = kernel.pairs(k);
        let at = |i: usize, j: usize| if i < k && j < n { b[i * n + j] } else { 0.0 };
        (0..n.div_ceil(NR))
            .flat_map(|p| {
                (0..kq).flat_map(move |q| {
                    (0..NR).map(move |j| pair(at(2 * q, p * NR + j), at(2 * q + 1, p * NR + j)))
                })
            })
            .collect()
    }

    /// Every packing equals its layout written out value by value, for every kernel's layout,
    /// with this thread's kept scratch and packing buffer full of NaNs (and all-ones bits)
    /// beforehand: the padding past `k`, `m` and `n` is written, not inherited. On a one-thread
    /// pool, so that the packings' tasks run where the poison is.
    #[test]
    fn packings_are_their_layouts_whatever_the_kept_memory_held() {
        let (m, k, n) = (37, 45, 53);
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let poison = || {
            SCRATCH.set(vec![f32::NAN; 1 << 16]);
            PANELS.set(vec![u32::MAX; 1 << 16]);
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            for kernel in [Kernel::Portable, Kernel::Avx512, Kernel::Amx] {
                let want_a = layout_a(kernel, &a, m, k);
                poison();
                let rows = PackedA::from_rows_for(kernel, m, k, |i, r| {
                    r.copy_from_slice(&a[i * k..][..k]);
                });
                assert_eq!(rows.data, want_a, "{kernel:?}: from_rows");
                poison();
                assert_eq!(PackedA::transposed_for(kernel, &at, k, m).data, want_a, "{kernel:?}");
                poison();
                let packed = PackedB::for_kernel(kernel, &b, k, n);
                assert_eq!(packed.data, layout_b(kernel, &b, k, n), "{kernel:?}: B");
            }
            // The kept-memory packings, for this CPU's kernel.
            poison();
            let reused = PackedB::new_reusing(&b, k, n);
            assert_eq!(reused.data, layout_b(Kernel::best(), &b, k, n), "B into kept memory");
            poison();
            let reused = PackedA::from_rows(m, k, |i, r| r.copy_from_slice(&a[i * k..][..k]));
            assert_eq!(reused.data, layout_a(Kernel::best(), &a, m, k), "A into kept memory");
        });
    }

    /// The AVX-512 packing (`vcvtne2ps2bf16` and a permutation) writes the same bits as the
    /// scalar rounding, infinities and a signed zero included.
    #[test]
    fn simd_packing_equals_scalar_packing() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let mut scratch = values(6 * NR, 3);
        scratch[5] = f32::INFINITY;
        scratch[NR + 7] = f32::NEG_INFINITY;
        scratch[2 * NR + 1] = 1.0 + 2f32.powi(-8);
        scratch[3 * NR] = -0.0;
        let (mut simd, mut scalar) =
            ([MaybeUninit::new(0u32); 3 * NR], [MaybeUninit::new(1); 3 * NR]);
        pack_panel(&scratch, &mut simd);
        pack_panel_portable(&scratch, &mut scalar);
        // SAFETY: both arrays were initialised when made.
        let bits = |p: [MaybeUninit<u32>; 3 * NR]| p.map(|v| unsafe { v.assume_init() });
        assert_eq!(bits(simd), bits(scalar));
        // Rows of pairs (AMX's `A`): whole blocks of 16 pairs by the instruction, the rest one
        // at a time; 37 pairs cover both.
        let mut pairs = [MaybeUninit::new(0u32); 37];
        pack_pairs(&scratch[..74], &mut pairs);
        // SAFETY: initialised when made.
        let pairs: Vec<u32> = pairs.iter().map(|p| unsafe { p.assume_init() }).collect();
        let one_by_one: Vec<u32> =
            scratch[..74].chunks_exact(2).map(|v| pair(v[0], v[1])).collect();
        assert_eq!(pairs, one_by_one);
    }

    /// `gemm_each` lays the products side by side exactly as separate `gemm`s compute them.
    #[test]
    fn gemm_each_concatenates_the_products() {
        let (m, k, n) = (20, 70, 33);
        let a = PackedA::new(&values(m * k, 4), m, k);
        let bs: Vec<Vec<f32>> = (0..3).map(|i| values(k * n, 20 + i)).collect();
        let all = gemm_each(&a, 3, n, |i| {
            PackedB::from_panels_reusing(k, n, |j0, width, s| {
                for (r, row) in s.chunks_exact_mut(NR).enumerate() {
                    row[..width].copy_from_slice(&bs[i][r * n + j0..][..width]);
                }
            })
        });
        let parts: Vec<f32> = bs.iter().flat_map(|b| gemm(&a, &PackedB::new(b, k, n))).collect();
        assert_eq!(all, parts);
        assert!(gemm_each(&a, 0, n, |_| PackedB::new(&bs[0], k, n)).is_empty());
    }

    /// A dropped `PackedB`'s memory serves the next `from_panels_reusing` on the thread; a
    /// smaller one does not displace it, one over the cap is not kept, and the reused memory's
    /// old values (NaNs here) do not show through.
    #[test]
    fn packed_column_buffers_are_reused_up_to_a_cap() {
        let (k, n) = (64, 100);
        let b = values(k * n, 2);
        let first = PackedB::for_kernel(Kernel::Portable, &b, k, n);
        let at = first.data.as_ptr();
        drop(first);
        keep_panels(Vec::with_capacity(10));
        keep_panels(Vec::with_capacity(KEEP_PANELS + 1));
        let again = PackedB::from_panels_reusing(k, n, |_, _, s| s.fill(f32::NAN));
        assert_eq!(again.data.as_ptr(), at, "the kept buffer was displaced or not reused");
        drop(again);
        let fill = |j0: usize, width: usize, scratch: &mut [f32]| {
            for (r, row) in scratch.chunks_exact_mut(NR).enumerate() {
                row[..width].copy_from_slice(&b[r * n + j0..][..width]);
            }
        };
        let other = PackedB::from_panels_reusing(k, n, fill);
        assert_eq!(other.data.as_ptr(), at, "a dropped PackedB's buffer was not kept");
        assert!(PANELS.take().capacity() == 0, "the buffer is in use");
        let kernel = Kernel::best();
        let reference = PackedB::for_kernel(kernel, &b, k, n);
        assert_eq!(other.data, reference.data, "the reused buffer's old values showed through");
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one, 1.
        assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to 1 + 2^-6.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2f32.powi(-6));
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// `Linear` inside a bf16 scope: within the bf16 bound of the f64 product per output (`x`
    /// of rank 3, widths that leave tails), the packed `w^T` reused by a second call; with a
    /// gradient to track it stays f32 (equal to the f32 product bit for bit).
    #[test]
    fn linear_in_bf16_is_within_the_bound_and_leaves_gradients_alone() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let dev = candle_core::Device::Cpu;
        let (rows, din, dout) = (2 * 37, 123, 50);
        let x = Tensor::new(values(rows * din, 5), &dev).unwrap().reshape((2, 37, din)).unwrap();
        let w = Tensor::new(values(dout * din, 9), &dev).unwrap().reshape((dout, din)).unwrap();
        let lin = crate::nn::Linear::from_tensors(w.clone(), None);
        let (y, again) =
            autocast(Precision::Bf16, || (lin.forward(&x).unwrap(), lin.forward(&x).unwrap()));
        assert_eq!(y.dims(), &[2, 37, dout]);
        let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let av: Vec<f32> = again.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(yv, av);
        let (xv, wv) = (values(rows * din, 5), values(dout * din, 9));
        let (x_at, w_at) = (|i, k| xv[i * din + k], |k, j| wv[j * din + k]);
        assert_within_bound(&yv, (rows, din, dout), x_at, w_at);
        let xt = candle_core::Var::from_tensor(&x).unwrap();
        let tracked = autocast(Precision::Bf16, || lin.forward(xt.as_tensor()).unwrap());
        let plain = lin.forward(&x).unwrap();
        let pv: Vec<f32> = plain.flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(yv, pv, "the bf16 scope computed in f32");
        let diff = (tracked - plain).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "a tracked input went through bf16");
    }

    /// A weight is packed once per outermost bf16 scope (the same `Arc` inside it, nested
    /// scopes included) and packed afresh in the next scope.
    #[test]
    fn a_scope_packs_each_weight_once() {
        let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &candle_core::Device::Cpu).unwrap();
        let (a, b, c) = autocast(Precision::Bf16, || {
            let a = packed_weight(&w, 2, 3).unwrap();
            let b = autocast(Precision::Bf16, || packed_weight(&w, 2, 3).unwrap());
            let c = packed_weight(&w, 2, 3).unwrap();
            (a, b, c)
        });
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c));
        let d = autocast(Precision::Bf16, || packed_weight(&w, 2, 3).unwrap());
        assert!(!Arc::ptr_eq(&a, &d), "the cache outlived its scope");
        assert!(packed_weight(&w, 3, 3).is_err());
    }

    #[test]
    fn bf16_weight_casts_a_frozen_weight_once_per_scope_and_a_trainable_one_every_time() {
        let dev = candle_core::Device::Cpu;
        let frozen = Tensor::new(&[1.0f32, 1.0 + 2f32.powi(-8), -3.0], &dev).unwrap();
        let var = candle_core::Var::new(&[0.5f32, 2.0], &dev).unwrap();
        let (a, b, v1, v2) = autocast(Precision::Bf16, || {
            let a = bf16_weight(&frozen).unwrap();
            let b = bf16_weight(&frozen).unwrap();
            (a, b, bf16_weight(var.as_tensor()).unwrap(), bf16_weight(var.as_tensor()).unwrap())
        });
        assert_eq!(a.dtype(), DType::BF16);
        // 1 + 2^-8 is halfway between the bf16 values 1 and 1 + 2^-7: ties to even, 1.
        assert_eq!(a.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), [1.0, 1.0, -3.0]);
        assert_eq!(a.id(), b.id(), "the frozen weight was cast twice in one scope");
        assert_ne!(v1.id(), v2.id(), "a trainable weight's copy was reused");
        let again = autocast(Precision::Bf16, || bf16_weight(&frozen).unwrap());
        assert_ne!(again.id(), a.id(), "the copy outlived its scope");
        let outside = bf16_weight(&frozen).unwrap();
        assert_ne!(outside.id(), again.id(), "a copy was cached outside a bf16 scope");
    }

    #[test]
    fn autocast_restores_the_previous_precision() {
        assert_eq!(precision(), Precision::F32);
        let inner = autocast(Precision::Bf16, || {
            assert_eq!(precision(), Precision::Bf16);
            autocast(Precision::F32, precision)
        });
        assert_eq!(inner, Precision::F32);
        assert_eq!(precision(), Precision::F32);
    }
}
