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
}

/// A kernel as data, for the tests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelInfo {
    pub(crate) name: &'static str,
    pub(crate) module: Module,
    pub(crate) threads: Threads,
    pub(crate) params: &'static [Param],
}

/// Declares each kernel as a type named as the kernel (`glip_softmax`, with no values),
/// implementing [`Kernel`] (its block sizes after `=>`, [`Threads::Any`] where none are
/// given), and lists them all in [`ALL`].
macro_rules! kernels {
    ($($module:ident { $($name:ident($($p:ty),+ $(,)?) $(=> $threads:expr)?;)+ })+) => {
        $($(
            #[allow(non_camel_case_types, reason = "named as the kernel's symbol")]
            pub(crate) enum $name {}

            impl Kernel for $name {
                const NAME: &'static str = stringify!($name);
                const MODULE: Module = Module::$module;
                const THREADS: Threads = threads!($($threads)?);
                type Params = ($($p,)+);
            }
        )+)+

        /// Every kernel, module by module.
        pub(crate) const ALL: &[KernelInfo] = &[$($(KernelInfo {
            name: stringify!($name),
            module: Module::$module,
            threads: threads!($($threads)?),
            params: <($($p,)+) as Params>::LIST,
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

kernels! {
    Optim {
        glip_adamw_moments(Write<f32>, Read<f32>, u64, f32, f32, f32, f32, f32);
        glip_adamw_apply(Write<f32>, Read<f32>, u64, f32, f32, f32, f32);
        glip_ema(Write<f32>, Read<f32>, u64, f32, f32);
        glip_sum_squares_all(Read<u64>, u32, u64, u64, Write<f64>) => REDUCE;
        glip_adamw_all(Read<u64>, u32, u64, u64);
        glip_sum_f64(Read<f64>, u64, Write<f64>) => REDUCE;
    }
    Norm {
        glip_softmax(Read<f32>, Write<f32>, u32, u32) => REDUCE;
        glip_softmax_backward(Read<f32>, Read<f32>, Write<f32>, u32, u32) => REDUCE;
        glip_layer_norm(Read<f32>, Read<f32>, Read<f32>, Write<f32>, u32, u32, f32) => REDUCE;
        glip_add_layer_norm(
            Read<f32>, Read<f32>, Read<f32>, Read<f32>, Write<f32>, u32, u32, f32,
        ) => REDUCE;
        glip_layer_norm_backward(
            Read<f32>, Read<f32>, Read<f32>, Write<f32>, Write<f32>, u32, u32, f32,
        ) => REDUCE;
        glip_layer_norm_params(Read<f32>, Read<f32>, Read<f32>, Write<f32>, u32, u32, u32);
        glip_sum_parts(Read<f32>, Write<f32>, u32, u32);
        glip_batch_norm_stats(Read<f32>, Write<f32>, u32, u32, u32, f64) => REDUCE;
        glip_batch_norm(Read<f32>, Read<f32>, Write<f32>, u64, u32, u32);
        glip_batch_norm_sums(Read<f32>, Read<f32>, Read<f32>, Write<f32>, u32, u32, u32) => REDUCE;
        glip_batch_norm_backward(
            Read<f32>, Read<f32>, Read<f32>, Write<f32>, u64, u32, u32, f32,
        );
        glip_bn_constants(Read<f32>, Read<f32>, Read<f32>, Read<f32>, Write<f32>, u32, f32);
        glip_affine_f32(Read<f32>, Read<f32>, Read<f32>, Write<f32>, u64, u32, u32, u32);
        glip_affine_bf16(Read<bf16>, Read<f32>, Read<bf16>, Write<bf16>, u64, u32, u32, u32);
        glip_affine_backward_f32(
            Read<f32>, Read<f32>, Read<f32>, Write<f32>, u64, u32, u32, u32,
        );
        glip_affine_backward_bf16(
            Read<bf16>, Read<bf16>, Read<f32>, Write<bf16>, u64, u32, u32, u32,
        );
    }
    Pool {
        glip_max_pool_f32(Read<f32>, Write<f32>, u64, u32, u32, u32, u32);
        glip_max_pool_bf16(Read<bf16>, Write<bf16>, u64, u32, u32, u32, u32);
        glip_max_pool_backward_f32(Read<f32>, Read<f32>, Write<f32>, u64, u32, u32, u32, u32);
        glip_max_pool_backward_bf16(
            Read<bf16>, Read<bf16>, Write<bf16>, u64, u32, u32, u32, u32,
        );
    }
    Linear {
        glip_bf16_cast_fill(Read<f32>, Write<bf16>, u64, Read<f32>, Write<f32>, u64, u32);
    }
    Elementwise {
        glip_dropout_mask(Write<f32>, u64, u64, f32, f32);
        glip_dropout(Read<f32>, Write<f32>, u64, u64, f32, f32);
        glip_relu_backward(Read<f32>, Read<f32>, Write<f32>, u64);
        glip_gelu_erf_backward(Read<f32>, Read<f32>, Write<f32>, u64);
    }
    TopK {
        glip_top_k(Read<f32>, Write<u32>, u32, u32) => Threads::UpTo(super::THREADS);
    }
    Attention {
        glip_attention(
            Read<f32>, Read<f32>, Read<f32>, Read<u8>, Write<f32>,
            u32, u32, u32, u32, u32, u32, u32, f32, u32,
        ) => Threads::Exactly(super::ATTENTION_THREADS);
    }
    Deformable {
        glip_deformable_sample(
            Read<f32>, Read<f32>, Levels, Write<f32>, u32, u32, u32, u32, u64,
        );
        glip_deformable_value_grad(
            Read<f32>, Read<f32>, Levels, Write<f32>, u32, u32, u32, u32, u64,
        );
        glip_deformable_sample_grad(
            Read<f32>, Read<f32>, Read<f32>, Levels, Write<f32>, u32, u32, u32, u32, u64,
        );
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
