//! Every kernel of the CUDA C modules above, with its parameters as Rust types: the one list
//! that the `cuda` build launches through (`cuda_launch::launch::<K>`, whose argument types rustc
//! checks against `K`'s parameters at every call), that NVRTC's test compiles module by module,
//! and that the tests below hold against the CUDA C itself, parameter by parameter (and, with a
//! toolkit, against the PTX NVRTC makes of it: `nvrtc`).
//!
//! A kernel's arguments go to the driver as untyped bytes: a launch with an argument of the
//! wrong width or kind (a `u64` where the kernel reads an `unsigned`, a buffer where it takes a
//! float) is not an error anywhere but wrong results, or a fault, on a GPU. Here every such
//! mismatch is a compile error or a failing test on the CPU.
//!
//! Each declaration also states the kernel's contract: how many elements it may read or write
//! through each pointer, from its scalar arguments and its grid, and what must hold of those for
//! it to stay inside them (a max-pool's output size, deformable sampling's levels inside the
//! values). `cuda_launch::launch` checks every launch against it before launching (an error
//! naming the kernel and the buffer, not a fault or a silent read past a buffer on the GPU);
//! the `emulation_contracts` test runs every kernel (but the two that reach their tensors
//! through a table of addresses) on the CPU with buffers exactly that long, each ending at an
//! inaccessible page, and under AddressSanitizer in CI, so a contract that admits a launch
//! reaching past its buffers fails there.

#![cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "the parameters as data (`ALL`, `Param`) are read by the tests; the `cuda` \
                  build launches through the types"
    )
)]

use std::marker::PhantomData;

/// A pointer the kernel only reads: `const T *`.
pub(crate) struct Read<T>(PhantomData<T>);
/// A pointer the kernel writes, or reads and writes: `T *`.
pub(crate) struct Write<T>(PhantomData<T>);
/// [`super::DEFORMABLE`]'s `GlipLevels`, passed by value.
pub(crate) struct Levels;

/// The type of an element or a scalar, as its CUDA C spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    Bf16,
    F64,
    U8,
    U32,
    U64,
}

/// One parameter of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    Read(Elem),
    Write(Elem),
    Scalar(Elem),
    Levels,
}

/// The block sizes a kernel may be launched with (`blockDim.x`; every kernel's blocks are
/// one-dimensional).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Any (no shared memory: each thread on its own elements).
    Any,
    /// A power of two, at most this many (a tree reduction over a `__shared__` array this
    /// long, one value per thread).
    PowerOfTwoUpTo(u32),
    /// At most this many (a `__shared__` array this long, one element per thread).
    UpTo(u32),
    /// Exactly this many (tiles in shared memory laid out for them).
    Exactly(u32),
}

impl Threads {
    /// Whether a launch with blocks of `block` threads (`(x, y, z)`) is one of these: `y` and
    /// `z` 1, `x` at least one and at most CUDA's 1,024.
    pub(crate) const fn admits(self, block: (u32, u32, u32)) -> bool {
        let (x, y, z) = block;
        if y != 1 || z != 1 || x == 0 || x > 1024 {
            return false;
        }
        match self {
            Threads::Any => true,
            Threads::PowerOfTwoUpTo(most) => x.is_power_of_two() && x <= most,
            Threads::UpTo(most) => x <= most,
            Threads::Exactly(n) => x == n,
        }
    }

    /// The most threads a block may have.
    pub(crate) const fn most(self) -> u32 {
        match self {
            Threads::Any => 1024,
            Threads::PowerOfTwoUpTo(most) | Threads::UpTo(most) | Threads::Exactly(most) => most,
        }
    }
}

/// A Rust element type and its [`Elem`].
pub(crate) trait ElemType {
    const ELEM: Elem;
}

macro_rules! elem_types {
    ($($t:ty => $e:ident),* $(,)?) => {
        $(impl ElemType for $t {
            const ELEM: Elem = Elem::$e;
        })*
    };
}
elem_types!(f32 => F32, half::bf16 => Bf16, f64 => F64, u8 => U8, u32 => U32, u64 => U64);

/// A parameter's Rust type ([`Read`], [`Write`], [`Levels`] or a scalar) and its [`Param`].
pub(crate) trait ParamType {
    const PARAM: Param;
}

impl<T: ElemType> ParamType for Read<T> {
    const PARAM: Param = Param::Read(T::ELEM);
}

impl<T: ElemType> ParamType for Write<T> {
    const PARAM: Param = Param::Write(T::ELEM);
}

impl ParamType for Levels {
    const PARAM: Param = Param::Levels;
}

macro_rules! scalar_params {
    ($($t:ty),*) => {
        $(impl ParamType for $t {
            const PARAM: Param = Param::Scalar(<$t as ElemType>::ELEM);
        })*
    };
}
scalar_params!(f32, f64, u32, u64);

/// A kernel's parameters: a tuple of [`ParamType`]s, in order.
pub(crate) trait Params {
    const LIST: &'static [Param];
}

macro_rules! params_tuples {
    ($(($($p:ident),+))*) => {
        $(impl<$($p: ParamType),+> Params for ($($p,)+) {
            const LIST: &'static [Param] = &[$($p::PARAM),+];
        })*
    };
}
params_tuples! {
    (A)
    (A, B)
    (A, B, C)
    (A, B, C, D)
    (A, B, C, D, E)
    (A, B, C, D, E, F)
    (A, B, C, D, E, F, G)
    (A, B, C, D, E, F, G, H)
    (A, B, C, D, E, F, G, H, I)
    (A, B, C, D, E, F, G, H, I, J)
    (A, B, C, D, E, F, G, H, I, J, K)
    (A, B, C, D, E, F, G, H, I, J, K, L)
    (A, B, C, D, E, F, G, H, I, J, K, L, M)
    (A, B, C, D, E, F, G, H, I, J, K, L, M, N)
}

/// One of the CUDA C modules, each compiled by NVRTC as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Module {
    Optim,
    Norm,
    Pool,
    Linear,
    Elementwise,
    TopK,
    Attention,
    Deformable,
}

impl Module {
    /// Every module, each at its discriminant.
    pub(crate) const ALL: [Module; 8] = [
        Module::Optim,
        Module::Norm,
        Module::Pool,
        Module::Linear,
        Module::Elementwise,
        Module::TopK,
        Module::Attention,
        Module::Deformable,
    ];

    /// Its name: what candle caches the loaded module under, and NVRTC's name for it.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Module::Optim => "glip_optim",
            Module::Norm => "glip_norm",
            Module::Pool => "glip_pool",
            Module::Linear => "glip_linear",
            Module::Elementwise => "glip_elementwise",
            Module::TopK => "glip_top_k",
            Module::Attention => "glip_attention",
            Module::Deformable => "glip_deformable",
        }
    }

    /// Its CUDA C.
    pub(crate) const fn source(self) -> &'static str {
        match self {
            Module::Optim => super::OPTIM,
            Module::Norm => super::NORM,
            Module::Pool => super::POOL,
            Module::Linear => super::LINEAR,
            Module::Elementwise => super::ELEMENTWISE,
            Module::TopK => super::TOP_K,
            Module::Attention => super::ATTENTION,
            Module::Deformable => super::DEFORMABLE,
        }
    }

    /// The names of its kernels, in [`ALL`]'s order.
    pub(crate) fn kernels(self) -> impl Iterator<Item = &'static str> {
        ALL.iter().filter(move |k| k.module == self).map(|k| k.name)
    }
}

/// A kernel: its name (the `extern "C"` symbol), its module, its block sizes and its parameters.
pub(crate) trait Kernel {
    const NAME: &'static str;
    const MODULE: Module;
    /// The block sizes it may be launched with (`cuda_launch::launch` refuses others).
    const THREADS: Threads;
    type Params: Params;
    /// What a launch with these arguments (in order: [`Value`]s) and `launch`'s grid needs:
    /// each buffer's elements, or an `Err` naming the condition of the contract it breaks.
    fn needs(args: &[Value], launch: Launch) -> Result<Needs, String>;
}

/// A launch's argument as the contracts read it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value {
    /// A buffer of this many elements; `None`, a null pointer.
    Buffer(Option<u64>),
    /// An integer scalar.
    Int(u64),
    /// A floating-point scalar.
    Float(f64),
    /// Deformable sampling's levels.
    Levels(GlipLevels),
}

/// [`super::DEFORMABLE`]'s `GlipLevels`, passed by value (the `cuda` build pushes this very
/// struct): how many levels, then the height, width and first token of each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GlipLevels {
    pub(crate) n: u32,
    pub(crate) hws: [u32; 3 * super::DEFORMABLE_MAX_LEVELS],
}

impl GlipLevels {
    /// How many levels, for the contracts' arithmetic.
    pub(crate) fn count(&self) -> Count {
        Count(self.n.into())
    }

    /// Whether every level lies inside `s` value rows and is not empty (a level of height or
    /// width 0 would make the kernels' last row or column wrap around), at most
    /// [`super::DEFORMABLE_MAX_LEVELS`] of them.
    pub(crate) fn inside(&self, s: Count) -> bool {
        let n = self.n as usize;
        n <= super::DEFORMABLE_MAX_LEVELS
            && self.hws.chunks(3).take(n).all(|l| {
                let (h, w, start) = (u128::from(l[0]), u128::from(l[1]), u128::from(l[2]));
                h > 0 && w > 0 && start + h * w <= s.0
            })
    }
}

/// A launch's grid and blocks, for the contracts' arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Launch {
    pub(crate) grid: Dim,
    pub(crate) block: Dim,
}

/// One of [`Launch`]'s sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dim {
    pub(crate) x: Count,
    pub(crate) y: Count,
    pub(crate) z: Count,
}

impl Launch {
    /// `grid` blocks of `block` threads (`(x, y, z)`, as CUDA's launch configurations).
    pub(crate) fn new(grid: (u32, u32, u32), block: (u32, u32, u32)) -> Launch {
        let c = |n: u32| Count(n.into());
        let dim = |(x, y, z): (u32, u32, u32)| Dim { x: c(x), y: c(y), z: c(z) };
        Launch { grid: dim(grid), block: dim(block) }
    }
}

/// A buffer argument in a contract: how long it is, or null.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    len: Option<u64>,
}

impl Buf {
    /// Whether it is a null pointer (which a kernel that tests for one skips).
    pub(crate) fn is_null(&self) -> bool {
        self.len.is_none()
    }
}

/// An integer in a contract: a scalar argument, a grid size or a count of elements. Its
/// arithmetic saturates at `u128::MAX` (no product of the kernels' 32- and 64-bit sizes wraps
/// around to a small count, and none panics) and a division by zero is zero (the contracts
/// require a divisor non-zero before dividing by it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Count(pub(crate) u128);

impl std::fmt::Debug for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Count {
    /// `self / d` rounded up (zero for `d` zero).
    pub(crate) fn div_ceil(self, d: Count) -> Count {
        Count(if d.0 == 0 { 0 } else { self.0.div_ceil(d.0) })
    }
}

macro_rules! count_ops {
    ($($tr:ident $f:ident $how:expr;)*) => {
        $(impl std::ops::$tr for Count {
            type Output = Count;
            fn $f(self, o: Count) -> Count {
                Count($how(self.0, o.0))
            }
        }
        impl std::ops::$tr<u128> for Count {
            type Output = Count;
            fn $f(self, o: u128) -> Count {
                Count($how(self.0, o))
            }
        })*
    };
}
count_ops! {
    Mul mul u128::saturating_mul;
    Add add u128::saturating_add;
    Div div |a: u128, b: u128| a.checked_div(b).unwrap_or(0);
    Rem rem |a: u128, b: u128| a.checked_rem(b).unwrap_or(0);
    BitAnd bitand |a: u128, b: u128| a & b;
}

impl PartialEq<u128> for Count {
    fn eq(&self, o: &u128) -> bool {
        self.0 == *o
    }
}

impl PartialOrd<u128> for Count {
    fn partial_cmp(&self, o: &u128) -> Option<std::cmp::Ordering> {
        self.0.partial_cmp(o)
    }
}

/// `n` where `cond` holds, else zero.
pub(crate) fn when(cond: bool, n: Count) -> Count {
    if cond {
        n
    } else {
        Count(0)
    }
}

/// A parameter type as a contract binds it: buffers as [`Buf`], integers as [`Count`],
/// floats as `f64`, the levels as [`GlipLevels`].
pub(crate) trait Bind {
    type Bound;
    fn bind(v: &Value) -> Option<Self::Bound>;
}

impl<T> Bind for Read<T> {
    type Bound = Buf;
    fn bind(v: &Value) -> Option<Buf> {
        match *v {
            Value::Buffer(len) => Some(Buf { len }),
            _ => None,
        }
    }
}

impl<T> Bind for Write<T> {
    type Bound = Buf;
    fn bind(v: &Value) -> Option<Buf> {
        <Read<T> as Bind>::bind(v)
    }
}

/// [`Bind`] for the levels and the scalars: the [`Value`] each takes, and what it binds.
macro_rules! binds {
    ($($t:ty => $bound:ty, $pat:pat $(if $guard:expr)? => $out:expr;)*) => {
        $(impl Bind for $t {
            type Bound = $bound;
            fn bind(v: &Value) -> Option<$bound> {
                match *v {
                    $pat $(if $guard)? => Some($out),
                    _ => None,
                }
            }
        })*
    };
}
binds! {
    Levels => GlipLevels, Value::Levels(l) => l;
    u32 => Count, Value::Int(x) if u32::try_from(x).is_ok() => Count(x.into());
    u64 => Count, Value::Int(x) => Count(x.into());
    f32 => f64, Value::Float(x) => x;
    f64 => f64, Value::Float(x) => x;
}

/// The most parameters a kernel has.
pub(crate) const MAX_PARAMS: usize = 14;

/// What one buffer of a launch needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Need {
    /// The parameter's name (the CUDA C's).
    pub(crate) name: &'static str,
    /// Its elements, `None` for a null pointer.
    pub(crate) len: Option<u64>,
    /// The elements the kernel may read or write through it.
    pub(crate) elements: Count,
    /// Whether the kernel tests it for null (and then leaves it alone).
    pub(crate) may_be_null: bool,
}

/// What every buffer of a launch needs, in parameter order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Needs {
    list: [Option<Need>; MAX_PARAMS],
    count: usize,
}

impl Needs {
    fn add(&mut self, name: &'static str, buf: Buf, elements: Count) {
        if let Some(slot) = self.list.get_mut(self.count) {
            *slot = Some(Need { name, len: buf.len, elements, may_be_null: false });
            self.count += 1;
        }
    }

    fn may_be_null(&mut self, name: &str) {
        for need in self.list.iter_mut().flatten() {
            if need.name == name {
                need.may_be_null = true;
            }
        }
    }

    /// Each buffer's need, in the order the contract lists them.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Need> {
        self.list.iter().flatten()
    }

    /// `Ok` if every buffer holds what the kernel may touch (a null pointer only where the
    /// kernel touches nothing through it or tests for null); else the first that does not.
    pub(crate) fn check(&self) -> Result<(), String> {
        for n in self.iter() {
            match n.len {
                None if n.elements > 0 && !n.may_be_null => {
                    return Err(format!(
                        "`{}` is null where {:?} elements are used",
                        n.name, n.elements
                    ))
                }
                Some(len) if n.elements > u128::from(len) => {
                    return Err(format!(
                        "`{}` holds {len} elements where {:?} are used",
                        n.name, n.elements
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Checks a launch of `K` with `args` on `launch` against `K`'s contract.
pub(crate) fn check<K: Kernel>(args: &[Value], launch: Launch) -> Result<(), String> {
    K::needs(args, launch).and_then(|needs| needs.check()).map_err(|e| format!("{}: {e}", K::NAME))
}

/// The elements of a strided operand: `rows` rows `ld` elements apart, `width` read from each.
pub(crate) fn strided(rows: Count, ld: Count, width: Count) -> Count {
    if rows == 0 {
        Count(0)
    } else {
        Count(rows.0 - 1) * ld + width
    }
}

/// The ResNet stem pool's output size along a side of `n` (kernel 3, stride 2, padding 1).
pub(crate) fn pooled(n: Count) -> Count {
    if n == 0 {
        Count(0)
    } else {
        Count((n.0 - 1) / 2 + 1)
    }
}

/// A kernel as data, for the tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelInfo {
    pub(crate) name: &'static str,
    pub(crate) module: Module,
    pub(crate) threads: Threads,
    pub(crate) params: &'static [Param],
    /// The parameters' names, as the CUDA C's.
    pub(crate) names: &'static [&'static str],
    /// The buffers the contract lists, in its order.
    pub(crate) listed: &'static [&'static str],
    /// [`Kernel::needs`].
    pub(crate) needs: fn(&[Value], Launch) -> Result<Needs, String>,
}

/// Declares each kernel as a type named as the kernel (`glip_softmax`, with no values),
/// implementing [`Kernel`], and lists them all in [`ALL`]. Each declaration is
///
/// ```text
/// name(param: Type, ...) |grid| { buffer: elements, ... } may_be_null(buffer, ...)
///     if [condition, ...] => threads;
/// ```
///
/// its parameters named as the CUDA C names them; after them its contract: the elements each
/// buffer may be read or written at, in the scalars' names and the launch's (`grid`, a
/// [`Launch`]), every buffer listed; the buffers the kernel tests for null; the conditions the
/// scalars must meet for those counts to hold (checked first, so the counts may divide by what
/// they require non-zero); then its block sizes ([`Threads::Any`] where none are given).
macro_rules! kernels {
    ($($module:ident { $(
        $name:ident($($pn:ident: $p:ty),+ $(,)?)
            |$g:pat_param| { $($buf:ident: $need:expr),+ $(,)? }
            $(may_be_null($($nb:ident),+))?
            $(if [$($cond:expr),+ $(,)?])?
            $(=> $threads:expr)?;
    )+ })+) => {
        $($(
            #[allow(non_camel_case_types, reason = "named as the kernel's symbol")]
            pub(crate) enum $name {}

            impl Kernel for $name {
                const NAME: &'static str = stringify!($name);
                const MODULE: Module = Module::$module;
                const THREADS: Threads = threads!($($threads)?);
                type Params = ($($p,)+);

                #[allow(unused_variables, reason = "a contract reads the parameters it needs")]
                fn needs(args: &[Value], launch: Launch) -> Result<Needs, String> {
                    let mut args = args.iter();
                    $(let $pn = args.next().and_then(<$p as Bind>::bind).ok_or_else(|| {
                        format!("argument `{}` is not a {}", stringify!($pn), stringify!($p))
                    })?;)+
                    if args.next().is_some() {
                        return Err("more arguments than parameters".into());
                    }
                    let $g = launch;
                    let values = || [$(format!("{} = {:?}", stringify!($pn), $pn)),+].join(", ");
                    $($(if !($cond) {
                        return Err(format!("`{}` does not hold ({})", stringify!($cond), values()));
                    })+)?
                    let mut needs = Needs::default();
                    $(needs.add(stringify!($buf), $buf, $need);)+
                    $($(needs.may_be_null(stringify!($nb));)+)?
                    Ok(needs)
                }
            }
        )+)+

        /// Every kernel, module by module.
        pub(crate) const ALL: &[KernelInfo] = &[$($(KernelInfo {
            name: stringify!($name),
            module: Module::$module,
            threads: threads!($($threads)?),
            params: <($($p,)+) as Params>::LIST,
            names: &[$(stringify!($pn)),+],
            listed: &[$(stringify!($buf)),+],
            needs: <$name as Kernel>::needs,
        },)+)+];
    };
}

/// A kernel's [`Threads`], [`Threads::Any`] where none are given.
macro_rules! threads {
    () => {
        Threads::Any
    };
    ($threads:expr) => {
        $threads
    };
}

/// The reductions' block sizes: a power of two up to [`super::THREADS`], the length of their
/// `__shared__` arrays ([`super::block_threads`] gives these).
const REDUCE: Threads = Threads::PowerOfTwoUpTo(super::THREADS);

use half::bf16;

/// [`super::OPTIM`]'s table entry flags and sizes: the entries' own buffers (a tensor's
/// weight, moments and gradient) are the table builder's to size (`cuda_optim`), not checked
/// here.
const TABLE_WORDS: u128 = super::TABLE_WORDS as u128;
/// [`super::NORM`]'s `GLIP_ADD` and `GLIP_RELU` flags.
const ADD: u128 = 1;
const RELU: u128 = 2;
/// [`super::ATTENTION`]'s widest head.
const MAX_HEAD: Count = Count(super::ATTENTION_MAX_HEAD as u128);

kernels! {
    Optim {
        glip_adamw_moments(
            mv: Write<f32>, g: Read<f32>, n: u64, c: f32, b1: f32, a1: f32, b2: f32, a2: f32,
        ) |_| { mv: n * 2, g: n };
        glip_adamw_apply(
            w: Write<f32>, mv: Read<f32>, n: u64, keep: f32, step: f32, inv_root_bc2: f32,
            eps: f32,
        ) |_| { w: n, mv: n * 2 };
        glip_ema(e: Write<f32>, w: Read<f32>, n: u64, d: f32, a: f32) |_| { e: n, w: n };
        glip_sum_squares_all(
            table: Read<u64>, tensors: u32, chunk: u64, chunks: u64, parts: Write<f64>,
        ) |g| { table: tensors * TABLE_WORDS, parts: g.grid.x }
            if [chunks == 0 || tensors > 0] => REDUCE;
        glip_adamw_all(table: Read<u64>, tensors: u32, chunk: u64, chunks: u64)
            |_| { table: tensors * TABLE_WORDS } if [chunks == 0 || tensors > 0];
        glip_sum_f64(parts: Read<f64>, n: u64, out: Write<f64>) |_| { parts: n, out: Count(1) }
            => REDUCE;
    }
    Norm {
        glip_softmax(x: Read<f32>, y: Write<f32>, rows: u32, d: u32)
            |_| { x: rows * d, y: rows * d } => REDUCE;
        glip_softmax_backward(y: Read<f32>, dy: Read<f32>, dx: Write<f32>, rows: u32, d: u32)
            |_| { y: rows * d, dy: rows * d, dx: rows * d } => REDUCE;
        glip_layer_norm(
            x: Read<f32>, w: Read<f32>, b: Read<f32>, y: Write<f32>, rows: u32, d: u32, eps: f32,
        ) |_| { x: rows * d, w: d, b: d, y: rows * d } => REDUCE;
        glip_add_layer_norm(
            x: Read<f32>, res: Read<f32>, w: Read<f32>, b: Read<f32>, y: Write<f32>, rows: u32,
            d: u32, eps: f32,
        ) |_| { x: rows * d, res: rows * d, w: d, b: d, y: rows * d } => REDUCE;
        glip_layer_norm_backward(
            x: Read<f32>, w: Read<f32>, dy: Read<f32>, dx: Write<f32>, stats: Write<f32>,
            rows: u32, d: u32, eps: f32,
        ) |_| { x: rows * d, w: d, dy: rows * d, dx: rows * d, stats: rows * 2 } => REDUCE;
        // A `(columns, chunks)` grid: chunk `grid.y` writes its row of `part`.
        glip_layer_norm_params(
            x: Read<f32>, dy: Read<f32>, stats: Read<f32>, part: Write<f32>, rows: u32, d: u32,
            chunk: u32,
        ) |g| { x: rows * d, dy: rows * d, stats: rows * 2, part: d * 2 * g.grid.y };
        glip_sum_parts(part: Read<f32>, out: Write<f32>, parts: u32, m: u32)
            |_| { part: parts * m, out: m };
        glip_batch_norm_stats(x: Read<f32>, p: Write<f32>, b: u32, c: u32, hw: u32, eps: f64)
            |_| { x: b * c * hw, p: c * 3 } => REDUCE;
        glip_batch_norm(x: Read<f32>, p: Read<f32>, y: Write<f32>, total: u64, c: u32, hw: u32)
            |_| { x: total, p: c * 5, y: total } if [total == 0 || (c > 0 && hw > 0)];
        glip_batch_norm_sums(
            x: Read<f32>, p: Read<f32>, dy: Read<f32>, sums: Write<f32>, b: u32, c: u32, hw: u32,
        ) |_| { x: b * c * hw, p: c * 3, dy: b * c * hw, sums: c * 2 } => REDUCE;
        // `out` is dx, then the two sums it reads.
        glip_batch_norm_backward(
            x: Read<f32>, p: Read<f32>, dy: Read<f32>, out: Write<f32>, total: u64, c: u32,
            hw: u32, n: f32,
        ) |_| { x: total, p: c * 4, dy: total, out: total + c * 2 }
            if [total == 0 || (c > 0 && hw > 0)];
        glip_bn_constants(
            w: Read<f32>, b: Read<f32>, rm: Read<f32>, rv: Read<f32>, ss: Write<f32>, c: u32,
            eps: f32,
        ) |_| { w: c, b: c, rm: c, rv: c, ss: c * 2 };
        glip_affine_f32(
            x: Read<f32>, ss: Read<f32>, r: Read<f32>, y: Write<f32>, total: u64, c: u32, hw: u32,
            flags: u32,
        ) |_| { x: total, ss: c * 2, r: when(flags & ADD != 0, total), y: total }
            if [total == 0 || (c > 0 && hw > 0)];
        glip_affine_bf16(
            x: Read<bf16>, ss: Read<f32>, r: Read<bf16>, y: Write<bf16>, total: u64, c: u32,
            hw: u32, flags: u32,
        ) |_| { x: total, ss: c * 2, r: when(flags & ADD != 0, total), y: total }
            if [total == 0 || (c > 0 && hw > 0)];
        // `out` is dx, then with `GLIP_ADD` the residual's gradient.
        glip_affine_backward_f32(
            y: Read<f32>, dy: Read<f32>, ss: Read<f32>, out: Write<f32>, total: u64, c: u32,
            hw: u32, flags: u32,
        ) |_| {
            y: when(flags & RELU != 0, total),
            dy: total,
            ss: c * 2,
            out: if flags & ADD != 0 { total * 2 } else { total },
        } if [total == 0 || (c > 0 && hw > 0)];
        glip_affine_backward_bf16(
            y: Read<bf16>, dy: Read<bf16>, ss: Read<f32>, out: Write<bf16>, total: u64, c: u32,
            hw: u32, flags: u32,
        ) |_| {
            y: when(flags & RELU != 0, total),
            dy: total,
            ss: c * 2,
            out: if flags & ADD != 0 { total * 2 } else { total },
        } if [total == 0 || (c > 0 && hw > 0)];
    }
    // The stem's pool: a window reaching no input would read outside its plane, so the output
    // sides must be the pool's.
    Pool {
        glip_max_pool_f32(
            x: Read<f32>, y: Write<f32>, planes: u64, h: u32, w: u32, oh: u32, ow: u32,
        ) |_| { x: planes * h * w, y: planes * oh * ow } if [oh == pooled(h), ow == pooled(w)];
        glip_max_pool_bf16(
            x: Read<bf16>, y: Write<bf16>, planes: u64, h: u32, w: u32, oh: u32, ow: u32,
        ) |_| { x: planes * h * w, y: planes * oh * ow } if [oh == pooled(h), ow == pooled(w)];
        glip_max_pool_backward_f32(
            x: Read<f32>, g: Read<f32>, dx: Write<f32>, planes: u64, h: u32, w: u32, oh: u32,
            ow: u32,
        ) |_| { x: planes * h * w, g: planes * oh * ow, dx: planes * h * w }
            if [oh == pooled(h), ow == pooled(w)];
        glip_max_pool_backward_bf16(
            x: Read<bf16>, g: Read<bf16>, dx: Write<bf16>, planes: u64, h: u32, w: u32, oh: u32,
            ow: u32,
        ) |_| { x: planes * h * w, g: planes * oh * ow, dx: planes * h * w }
            if [oh == pooled(h), ow == pooled(w)];
    }
    Linear {
        // Without a bias (null), `y` is left alone.
        glip_bf16_cast_fill(
            x: Read<f32>, xb: Write<bf16>, n: u64, bias: Read<f32>, y: Write<f32>, rows: u64,
            cols: u32,
        ) |_| {
            x: n,
            xb: n,
            bias: when(rows * cols > 0, cols),
            y: when(!bias.is_null(), rows * cols),
        } may_be_null(bias);
    }
    Elementwise {
        glip_dropout_mask(mask: Write<f32>, n: u64, seed: u64, p: f32, scale: f32)
            |_| { mask: n };
        glip_dropout(x: Read<f32>, y: Write<f32>, n: u64, seed: u64, p: f32, scale: f32)
            |_| { x: n, y: n };
        glip_relu_backward(x: Read<f32>, dy: Read<f32>, dx: Write<f32>, n: u64)
            |_| { x: n, dy: n, dx: n };
        glip_gelu_erf_backward(x: Read<f32>, dy: Read<f32>, dx: Write<f32>, n: u64)
            |_| { x: n, dy: n, dx: n };
    }
    TopK {
        // Row `grid.y`.
        glip_top_k(x: Read<f32>, out: Write<u32>, s: u32, k: u32)
            |g| { x: g.grid.y * s, out: g.grid.y * k } => Threads::UpTo(super::THREADS);
    }
    Attention {
        // Grid `(query tiles, b heads)`; `q`, `k`, `v` rows `ld*` apart, a head's `dh` columns
        // at `h dh`; the mask `(b, lk)`, or null.
        glip_attention(
            q: Read<f32>, k: Read<f32>, v: Read<f32>, mask: Read<u8>, out: Write<f32>,
            heads: u32, lq: u32, lk: u32, dh: u32, ldq: u32, ldk: u32, ldv: u32, scale: f32,
            scale_scores: u32,
        ) |g| {
            q: strided(g.grid.y / heads * lq, ldq, heads * dh),
            k: strided(g.grid.y / heads * lk, ldk, heads * dh),
            v: strided(g.grid.y / heads * lk, ldv, heads * dh),
            mask: g.grid.y / heads * lk,
            out: g.grid.y * lq * dh,
        } may_be_null(mask)
            if [
                heads > 0,
                g.grid.y % heads == 0,
                dh <= MAX_HEAD,
                heads * dh <= ldq && heads * dh <= ldk && heads * dh <= ldv,
            ] => Threads::Exactly(super::ATTENTION_THREADS);
    }
    // Outputs `(bh, q, dh)`, `n` of them (the values' gradient: `n` of the output's gradient);
    // values `(bh, s, dh)`; samples `(bh, q, levels, points, 3)` (their gradient: `n` samples).
    Deformable {
        glip_deformable_sample(
            value: Read<f32>, samples: Read<f32>, lv: Levels, out: Write<f32>, s: u32, dh: u32,
            q: u32, points: u32, n: u64,
        ) |_| {
            value: n.div_ceil(dh * q) * s * dh,
            samples: n.div_ceil(dh) * lv.count() * points * 3,
            out: n,
        } if [n == 0 || (dh > 0 && q > 0), lv.inside(s)];
        glip_deformable_value_grad(
            samples: Read<f32>, grad: Read<f32>, lv: Levels, grad_value: Write<f32>, s: u32,
            dh: u32, q: u32, points: u32, n: u64,
        ) |_| {
            samples: n.div_ceil(dh) * lv.count() * points * 3,
            grad: n,
            grad_value: n.div_ceil(dh * q) * s * dh,
        } if [n == 0 || (dh > 0 && q > 0), lv.inside(s)];
        glip_deformable_sample_grad(
            value: Read<f32>, samples: Read<f32>, grad: Read<f32>, lv: Levels,
            grad_samples: Write<f32>, s: u32, dh: u32, q: u32, points: u32, n: u64,
        ) |_| {
            value: n.div_ceil(lv.count() * points).div_ceil(q) * s * dh,
            samples: n * 3,
            grad: n.div_ceil(lv.count() * points) * dh,
            grad_samples: n * 3,
        } if [n == 0 || (lv.count() * points > 0 && q > 0), lv.inside(s)];
    }
}

/// Each kernel definition in `text` (`extern "C" __global__ void NAME(PARAMS) { .. }`): its
/// name, and the text after the name up to the next definition (its parameter list and body,
/// and whatever follows before the next kernel).
pub(crate) fn definitions(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split("extern \"C\" __global__ void ").skip(1).map(|rest| {
        let name = rest.split('(').next().unwrap_or_default();
        (name.trim(), &rest[name.len()..])
    })
}

/// The kernels `source` defines ([`definitions`]), each with its parameters read from the
/// CUDA C: pointers to `const` are [`Param::Read`], other pointers [`Param::Write`],
/// `GlipLevels` [`Param::Levels`], the rest scalars. An `Err` names a parameter type this list
/// does not know.
pub(crate) fn declared(source: &str) -> Result<Vec<(String, Vec<Param>)>, String> {
    let mut found = Vec::new();
    for (name, rest) in definitions(source) {
        let rest = rest.strip_prefix('(').ok_or_else(|| format!("{name}: no parameters"))?;
        let (list, _) = rest.split_once(')').ok_or_else(|| format!("{name}: no `)`"))?;
        let params = list
            .split(',')
            .map(|p| c_param(p).map_err(|e| format!("{name}: {e}")))
            .collect::<Result<_, _>>()?;
        found.push((name.to_owned(), params));
    }
    Ok(found)
}

/// One C parameter declaration (`const float *__restrict__ x`, `unsigned n`) as a [`Param`].
fn c_param(decl: &str) -> Result<Param, String> {
    let words: Vec<&str> = decl
        .split(|c: char| c.is_whitespace() || c == '*')
        .filter(|w| !w.is_empty() && *w != "__restrict__")
        .collect();
    // The last word is the parameter's name.
    let Some((_, ty)) = words.split_last() else {
        return Err(format!("an empty parameter in `{decl}`"));
    };
    let pointer = match decl.matches('*').count() {
        0 => false,
        1 => true,
        _ => return Err(format!("a pointer to a pointer in `{}`", decl.trim())),
    };
    let constant = ty.first() == Some(&"const");
    let base = ty.iter().skip(usize::from(constant)).copied().collect::<Vec<_>>().join(" ");
    let elem = match base.as_str() {
        "float" => Elem::F32,
        "glip_bf16" => Elem::Bf16,
        "double" => Elem::F64,
        "unsigned char" => Elem::U8,
        "unsigned" | "unsigned int" => Elem::U32,
        "unsigned long long" => Elem::U64,
        "GlipLevels" if !pointer && !constant => return Ok(Param::Levels),
        other => return Err(format!("parameter type `{other}` in `{}`", decl.trim())),
    };
    Ok(match (pointer, constant) {
        (true, true) => Param::Read(elem),
        (true, false) => Param::Write(elem),
        (false, false) => Param::Scalar(elem),
        (false, true) => return Err(format!("a `const` scalar in `{}`", decl.trim())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each module's kernels, as its CUDA C declares them, are exactly [`ALL`]'s of that
    /// module, with the same parameters in the same order: the Rust types the launches are
    /// checked against are those of the C. (Which module a kernel is in matters: the `cuda`
    /// build looks it up in that module's PTX.)
    #[test]
    fn every_kernel_is_declared_as_its_cuda_c_takes_it() {
        let mut problems = Vec::new();
        for module in Module::ALL {
            let declared = declared(module.source()).unwrap_or_else(|e| panic!("{e}"));
            let listed: Vec<&KernelInfo> = ALL.iter().filter(|k| k.module == module).collect();
            for (name, params) in &declared {
                match listed.iter().find(|k| k.name == name) {
                    None => problems.push(format!("{name} ({module:?}) is not in ALL")),
                    Some(k) if k.params != params.as_slice() => problems
                        .push(format!("{name}: the C takes {params:?}, ALL says {:?}", k.params)),
                    Some(_) => {}
                }
            }
            for k in &listed {
                if declared.iter().filter(|(name, _)| name == k.name).count() != 1 {
                    problems.push(format!("{} is not defined once in {module:?}", k.name));
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
        let mut names: Vec<&str> = ALL.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a kernel listed twice in ALL");
    }

    /// A kernel with `__shared__` memory declares the block sizes it takes, and no more threads
    /// than its one-dimensional `__shared__` arrays of a numeric length hold (one element per
    /// thread); a kernel without declares [`Threads::Any`].
    #[test]
    fn block_sizes_fit_the_shared_memory() {
        let mut problems = Vec::new();
        for module in Module::ALL {
            for (name, body) in definitions(module.source()) {
                let Some(info) = ALL.iter().find(|i| i.name == name) else {
                    problems.push(format!("{name} is not declared"));
                    continue;
                };
                let shared: Vec<&str> = body.split("__shared__").skip(1).collect();
                if shared.is_empty() != (info.threads == Threads::Any) {
                    problems.push(format!(
                        "{name}: {} __shared__ declarations, threads {:?}",
                        shared.len(),
                        info.threads
                    ));
                }
                // `__shared__ float sh[256];`: a length of digits, one dimension.
                for decl in shared {
                    let decl = decl.split(';').next().unwrap_or_default();
                    let dims: Vec<&str> =
                        decl.split('[').skip(1).filter_map(|d| d.split(']').next()).collect();
                    if let [len] = dims[..] {
                        if let Ok(len) = len.trim().parse::<u32>() {
                            if info.threads.most() > len {
                                problems.push(format!(
                                    "{name}: up to {} threads for `{}`",
                                    info.threads.most(),
                                    decl.trim()
                                ));
                            }
                        }
                    }
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    /// The reductions' launches (`cuda_launch::per_row`: [`super::super::block_threads`] of the
    /// row's length) are block sizes the reductions take, for any length; the element-wise
    /// launches' [`super::super::THREADS`] and attention's are what those kernels declare.
    #[test]
    fn the_launches_block_sizes_are_the_declared_ones() {
        for n in (0..5000).chain([65_535, 1 << 20, usize::MAX >> 1]) {
            let t = super::super::block_threads(n);
            assert!(REDUCE.admits((t, 1, 1)), "{n} elements: {t} threads");
        }
        assert!(Threads::Any.admits((super::super::THREADS, 1, 1)));
        assert!(glip_attention::THREADS.admits((super::super::ATTENTION_THREADS, 1, 1)));
        assert!(glip_top_k::THREADS.admits((super::super::THREADS, 1, 1)));
        // What `admits` refuses.
        for (threads, block) in [
            (REDUCE, (384, 1, 1)),
            (REDUCE, (512, 1, 1)),
            (Threads::UpTo(256), (257, 1, 1)),
            (Threads::Exactly(128), (64, 1, 1)),
            (Threads::Any, (2048, 1, 1)),
            (Threads::Any, (32, 2, 1)),
            (Threads::Any, (0, 1, 1)),
        ] {
            assert!(!threads.admits(block), "{threads:?} admitted {block:?}");
        }
    }

    /// Every kernel `cuda_source.rs` defines (`extern "C" __global__ void NAME(`, in any of its
    /// texts, a module of [`Module::ALL`] or not) is in [`ALL`]: a kernel or a whole module
    /// added there is declared, compiled by NVRTC's test and checked above.
    #[test]
    fn every_kernel_of_the_sources_is_listed() {
        let text = include_str!("../cuda_source.rs");
        let mut defined: Vec<&str> = definitions(text).map(|(name, _)| name).collect();
        defined.sort_unstable();
        let mut listed: Vec<&str> = ALL.iter().map(|k| k.name).collect();
        listed.sort_unstable();
        assert_eq!(listed, defined, "the kernels ALL lists against those cuda_source.rs defines");
    }

    /// Nothing but `cuda_launch::launch` builds a launch (with cudarc's launch builder), so every
    /// kernel launch of the crate has its arguments checked against a declaration here.
    #[test]
    fn kernels_are_launched_only_through_the_typed_launch() {
        let needle = concat!("launch", "_builder");
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.clone()];
        let mut using = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                let entries = std::fs::read_dir(&path).expect("the crate's sources");
                files.extend(entries.map(|e| e.expect("a directory entry").path()));
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                let count = text.matches(needle).count();
                if count > 0 {
                    using.push((
                        path.strip_prefix(&src).unwrap_or(&path).display().to_string(),
                        count,
                    ));
                }
            }
        }
        assert_eq!(using, [("cuda_launch.rs".to_owned(), 1)], "files building launches");
    }

    /// The C reader takes each kind of declaration the sources use, and refuses what it does
    /// not know (so a new parameter type fails the test above instead of passing unread).
    #[test]
    fn c_parameters_read_as_their_kinds() {
        let cases = [
            ("const float *__restrict__ x", Param::Read(Elem::F32)),
            ("float *y", Param::Write(Elem::F32)),
            ("const glip_bf16 *__restrict__ x", Param::Read(Elem::Bf16)),
            ("glip_bf16 *y", Param::Write(Elem::Bf16)),
            ("const unsigned long long *table", Param::Read(Elem::U64)),
            ("double *parts", Param::Write(Elem::F64)),
            ("unsigned *out", Param::Write(Elem::U32)),
            ("const unsigned char *__restrict__ mask", Param::Read(Elem::U8)),
            ("unsigned n", Param::Scalar(Elem::U32)),
            ("unsigned int tensors", Param::Scalar(Elem::U32)),
            ("unsigned long long n", Param::Scalar(Elem::U64)),
            (" float eps", Param::Scalar(Elem::F32)),
            ("double eps", Param::Scalar(Elem::F64)),
            ("GlipLevels lv", Param::Levels),
        ];
        for (decl, want) in cases {
            assert_eq!(c_param(decl), Ok(want), "{decl}");
        }
        for bad in
            ["int n", "const float eps", "half *x", "size_t n", "GlipLevels *lv", "float **p", "x"]
        {
            assert!(c_param(bad).is_err(), "{bad} was read as {:?}", c_param(bad));
        }
        let two = "extern \"C\" __global__ void glip_a(const float *x, unsigned n) {}\n\
                   extern \"C\" __global__ void glip_b(float *y) {}";
        assert_eq!(
            declared(two),
            Ok(vec![
                ("glip_a".to_owned(), vec![Param::Read(Elem::F32), Param::Scalar(Elem::U32)]),
                ("glip_b".to_owned(), vec![Param::Write(Elem::F32)]),
            ])
        );
    }

    /// Each declaration names its parameters as the CUDA C does, and its contract lists every
    /// buffer parameter once, in the parameters' order (and nothing else).
    #[test]
    fn contracts_name_the_c_parameters_and_list_every_buffer() {
        let mut problems = Vec::new();
        for module in Module::ALL {
            for (name, rest) in definitions(module.source()) {
                let Some(info) = ALL.iter().find(|i| i.name == name) else { continue };
                let list = rest.trim_start_matches('(').split(')').next().unwrap_or_default();
                let c_names: Vec<&str> = list
                    .split(',')
                    .filter_map(|p| p.split(|c: char| c.is_whitespace() || c == '*').next_back())
                    .collect();
                if c_names != info.names {
                    problems.push(format!("{name}: the C names {c_names:?}, ALL {:?}", info.names));
                }
                let buffers: Vec<&str> = info
                    .params
                    .iter()
                    .zip(info.names)
                    .filter(|(p, _)| matches!(p, Param::Read(_) | Param::Write(_)))
                    .map(|(_, n)| *n)
                    .collect();
                if buffers != info.listed {
                    problems.push(format!(
                        "{name}: buffers {buffers:?}, the contract lists {:?}",
                        info.listed
                    ));
                }
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    /// Launches as the host makes them pass their contracts; a buffer one element short, a
    /// null buffer, scalars breaking a condition, or arguments of the wrong kind or number
    /// do not, each refused with what it broke.
    #[test]
    fn contracts_refuse_what_the_kernels_cannot_take() {
        let buf = |n: u64| Value::Buffer(Some(n));
        let int = Value::Int;
        let one_block = |threads: u32| Launch::new((1, 1, 1), (threads, 1, 1));
        // Softmax over 3 rows of 5.
        let softmax = |x: u64, y: Option<u64>| {
            check::<glip_softmax>(&[buf(x), Value::Buffer(y), int(3), int(5)], one_block(32))
        };
        assert_eq!(softmax(15, Some(15)), Ok(()));
        assert_eq!(softmax(16, Some(100)), Ok(()));
        let short = softmax(15, Some(14)).unwrap_err();
        assert!(short.contains("glip_softmax") && short.contains("`y` holds 14"), "{short}");
        let null = softmax(15, None).unwrap_err();
        assert!(null.contains("`y` is null"), "{null}");
        // Wrong kinds and counts of arguments.
        let kind =
            check::<glip_softmax>(&[buf(15), buf(15), Value::Float(3.0), int(5)], one_block(32));
        assert!(kind.unwrap_err().contains("argument `rows`"));
        let wide = check::<glip_softmax>(&[buf(15), buf(15), int(1 << 32), int(5)], one_block(32));
        assert!(wide.unwrap_err().contains("argument `rows`"));
        let many =
            check::<glip_softmax>(&[buf(15), buf(15), int(3), int(5), int(0)], one_block(32));
        assert!(many.unwrap_err().contains("more arguments"));
        // The stem pool: a 9 x 8 plane pools to 5 x 4; a side more reads outside the plane.
        let pool = |oh: u64, ow: u64| {
            check::<glip_max_pool_f32>(
                &[buf(72), buf(oh * ow), int(1), int(9), int(8), int(oh), int(ow)],
                one_block(256),
            )
        };
        assert_eq!(pool(5, 4), Ok(()));
        let e = pool(6, 4).unwrap_err();
        assert!(e.contains("`oh == pooled(h)` does not hold") && e.contains("oh = 6"), "{e}");
        // A frozen batch norm's residual is read only with GLIP_ADD: null without it.
        let affine = |r: Option<u64>, flags: u64| {
            check::<glip_affine_f32>(
                &[buf(24), buf(4), Value::Buffer(r), buf(24), int(24), int(2), int(12), int(flags)],
                one_block(256),
            )
        };
        assert_eq!(affine(None, RELU as u64), Ok(()));
        assert!(affine(None, (ADD | RELU) as u64).unwrap_err().contains("`r` is null"));
        assert_eq!(affine(Some(24), ADD as u64), Ok(()));
        // The cast's bias may be null (the kernel tests it), and then `y` is left alone.
        let cast = |bias: Option<u64>, y: Option<u64>| {
            check::<glip_bf16_cast_fill>(
                &[buf(12), buf(12), int(12), Value::Buffer(bias), Value::Buffer(y), int(3), int(4)],
                one_block(256),
            )
        };
        assert_eq!(cast(None, None), Ok(()));
        assert_eq!(cast(Some(4), Some(12)), Ok(()));
        assert!(cast(Some(4), None).unwrap_err().contains("`y` is null"));
        // Attention: 2 images, 4 heads of 8 (the grid's y is b heads), q, k, v side by side
        // in rows of 96; the mask may be null.
        let attention = |ldq: u64, grid_y: u32, mask: Option<u64>, out: u64| {
            let rows = |l: u64, ld: u64| (2 * l - 1) * ld + 32;
            check::<glip_attention>(
                &[
                    buf(rows(10, ldq)),
                    buf(rows(7, 96)),
                    buf(rows(7, 96)),
                    Value::Buffer(mask),
                    buf(out),
                    int(4),
                    int(10),
                    int(7),
                    int(8),
                    int(ldq),
                    int(96),
                    int(96),
                    Value::Float(0.35),
                    int(0),
                ],
                Launch::new((1, grid_y, 1), (128, 1, 1)),
            )
        };
        assert_eq!(attention(96, 8, None, 2 * 10 * 32), Ok(()));
        assert_eq!(attention(96, 8, Some(14), 2 * 10 * 32), Ok(()));
        assert!(attention(96, 8, Some(13), 640).unwrap_err().contains("`mask` holds 13"));
        assert!(attention(96, 8, None, 639).unwrap_err().contains("`out` holds 639"));
        assert!(attention(31, 8, None, 640).unwrap_err().contains("heads * dh <= ldq"));
        assert!(attention(96, 7, None, 640).unwrap_err().contains("g.grid.y % heads == 0"));
        // Deformable sampling: levels 2 x 3 from token 0 and 1 x 2 from token 6, in 8 rows.
        let mut lv = GlipLevels { n: 2, hws: [0; 3 * super::super::DEFORMABLE_MAX_LEVELS] };
        lv.hws[..6].copy_from_slice(&[2, 3, 0, 1, 2, 6]);
        let sample = |lv: GlipLevels, s: u64| {
            // 1 image-head, 3 queries, 4 channels, 2 points a level.
            check::<glip_deformable_sample>(
                &[
                    buf(s * 4),
                    buf(3 * 2 * 2 * 3),
                    Value::Levels(lv),
                    buf(12),
                    int(s),
                    int(4),
                    int(3),
                    int(2),
                    int(12),
                ],
                one_block(256),
            )
        };
        assert_eq!(sample(lv, 8), Ok(()));
        assert!(sample(lv, 7).unwrap_err().contains("lv.inside(s)"));
        let mut empty = lv;
        empty.hws[3] = 0;
        assert!(sample(empty, 8).unwrap_err().contains("lv.inside(s)"));
        // Counts saturate instead of wrapping around to a small one.
        let huge = check::<glip_max_pool_f32>(
            &[buf(72), buf(20), int(u64::MAX), int(9), int(8), int(5), int(4)],
            one_block(256),
        );
        assert!(huge.unwrap_err().contains("`x` holds 72"));
    }

    /// A kernel's Rust parameters are the types it was declared with.
    #[test]
    fn a_declared_kernel_lists_its_parameter_types() {
        assert_eq!(glip_softmax::NAME, "glip_softmax");
        assert_eq!(glip_softmax::MODULE, Module::Norm);
        assert_eq!(
            <glip_softmax as Kernel>::Params::LIST,
            [
                Param::Read(Elem::F32),
                Param::Write(Elem::F32),
                Param::Scalar(Elem::U32),
                Param::Scalar(Elem::U32)
            ]
        );
        assert_eq!(Module::TopK.kernels().collect::<Vec<_>>(), ["glip_top_k"]);
        // `cuda_launch` keeps each module's PTX at `module as usize`.
        for (i, module) in Module::ALL.into_iter().enumerate() {
            assert_eq!(module as usize, i, "{module:?}");
        }
    }
}
