//! The CUDA C of every module compiled by NVRTC, the way the `cuda` build compiles it at run time
//! (`cuda_launch`: cudarc's `compile_ptx`, no options), and the PTX assembled by `ptxas` for the
//! lent GPUs' architecture and two older ones (what the driver's JIT does when it loads a
//! module): in every build, without a GPU and without building candle's CUDA backend. The
//! emulation (the other tests of `cuda_source`) checks what the kernels compute; this checks
//! that CUDA's own compiler takes them, which g++ cannot show (CUDA's keywords and intrinsics
//! are macros there).
//!
//! The toolkit: `$CUDA_HOME` (`lib64/` or `lib/`, `bin/ptxas`), else the pinned wheels that
//! `cargo xtask cuda-env` installs into the cache folder (`$GLIP_CACHE_DIR`, else
//! `~/.cache/glip-rs`: `cuda-root/lib/libnvrtc.so`). Without one, or with one older than the
//! CUDA 12.0 the `cuda` build needs, the test says so and skips; `GLIP_REQUIRE_NVRTC=1` (CI,
//! after `cuda-env`) makes that a failure.

#![allow(unsafe_code, reason = "NVRTC's C API, loaded with dlopen")]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::kernels::{self, Elem, Module, Param};

/// `nvrtcResult` is an `int`, 0 for success.
type Status = c_int;
type Program = *mut c_void;

/// The entry points of NVRTC this test calls (the C API, `nvrtc.h`).
struct Nvrtc {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
}

impl Nvrtc {
    /// The library at `path` (kept loaded for the rest of the process). NVRTC opens its
    /// builtins (`libnvrtc-builtins.so.X.Y`) by name when it compiles, which the loader finds
    /// through `LD_LIBRARY_PATH` (as the `cuda` binary's run does) or, loaded first from the
    /// library's own folder, as a library already loaded.
    fn open(path: &Path) -> Result<Nvrtc, String> {
        let folder = path.canonicalize().ok().and_then(|p| Some(p.parent()?.to_owned()));
        let builtins = folder.as_deref().and_then(|f| {
            let mut found: Vec<PathBuf> = std::fs::read_dir(f)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so."))
                })
                .collect();
            found.sort();
            found.pop()
        });
        if let Some(builtins) = builtins {
            dl_open(&builtins)?;
        }
        let lib = dl_open(path)?;
        // SAFETY: each field's type spells the C signature of the function of that name in
        // nvrtc.h.
        unsafe {
            Ok(Nvrtc {
                version: symbol(lib, path, "nvrtcVersion")?,
                error_string: symbol(lib, path, "nvrtcGetErrorString")?,
                create: symbol(lib, path, "nvrtcCreateProgram")?,
                compile: symbol(lib, path, "nvrtcCompileProgram")?,
                log_size: symbol(lib, path, "nvrtcGetProgramLogSize")?,
                log: symbol(lib, path, "nvrtcGetProgramLog")?,
                ptx_size: symbol(lib, path, "nvrtcGetPTXSize")?,
                ptx: symbol(lib, path, "nvrtcGetPTX")?,
                destroy: symbol(lib, path, "nvrtcDestroyProgram")?,
            })
        }
    }

    fn check(&self, status: Status, what: &str) -> Result<(), String> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static C string for any status.
        let text = unsafe { CStr::from_ptr((self.error_string)(status)) };
        Err(format!("{what}: {}", text.to_string_lossy()))
    }

    /// NVRTC's version, `(major, minor)`.
    fn version(&self) -> Result<(i32, i32), String> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-pointers to live integers.
        self.check(unsafe { (self.version)(&mut major, &mut minor) }, "nvrtcVersion")?;
        Ok((major, minor))
    }

    /// `source`'s PTX with no options (as cudarc's `compile_ptx`), or NVRTC's log.
    fn compile(&self, name: &str, source: &str) -> Result<String, String> {
        let c_source = CString::new(source).map_err(|_| format!("{name} holds a NUL byte"))?;
        let c_name = CString::new(format!("{name}.cu")).expect("module names hold no NUL");
        let mut program: Program = std::ptr::null_mut();
        // SAFETY: C strings that outlive the program; no headers.
        let created = unsafe {
            (self.create)(
                &mut program,
                c_source.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check(created, "nvrtcCreateProgram")?;
        let result = self.compile_program(program, name);
        // SAFETY: the program created above, destroyed once.
        let destroyed = unsafe { (self.destroy)(&mut program) };
        let ptx = result?;
        self.check(destroyed, "nvrtcDestroyProgram")?;
        Ok(ptx)
    }

    fn compile_program(&self, program: Program, name: &str) -> Result<String, String> {
        // SAFETY: a live program; no options.
        let compiled = unsafe { (self.compile)(program, 0, std::ptr::null()) };
        if compiled != 0 {
            let log = self.text(program, self.log_size, self.log, "nvrtcGetProgramLog")?;
            return Err(format!(
                "NVRTC could not compile {name}: {}\n{log}",
                self.check(compiled, "nvrtcCompileProgram").unwrap_err(),
            ));
        }
        self.text(program, self.ptx_size, self.ptx, "nvrtcGetPTX")
    }

    /// One of a program's texts (its log or its PTX) through NVRTC's pair of calls: its size
    /// (with the terminating NUL), then the text into a buffer of that size.
    fn text(
        &self,
        program: Program,
        size_of: unsafe extern "C" fn(Program, *mut usize) -> Status,
        get: unsafe extern "C" fn(Program, *mut c_char) -> Status,
        what: &str,
    ) -> Result<String, String> {
        let mut size = 0;
        // SAFETY: a live program and an out-pointer; then a buffer of the size it gave.
        let bytes = unsafe {
            self.check(size_of(program, &mut size), what)?;
            let mut bytes = vec![0u8; size.max(1)];
            self.check(get(program, bytes.as_mut_ptr().cast()), what)?;
            bytes
        };
        CStr::from_bytes_until_nul(&bytes)
            .map(|t| t.to_string_lossy().into_owned())
            .map_err(|_| format!("{what}: no terminating NUL"))
    }
}

/// `dlopen(path)`, never closed (so the symbols it gives stay valid).
fn dl_open(path: &Path) -> Result<*mut c_void, String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} holds a NUL byte", path.display()))?;
    // SAFETY: a C string.
    let lib = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        Err(format!("dlopen {}: {}", path.display(), dl_error()))
    } else {
        Ok(lib)
    }
}

/// Symbol `name` of the library `lib` (loaded from `path`) as a function pointer `F`.
///
/// # Safety
/// `F` must be an `extern "C"` function pointer type matching the symbol's C signature.
unsafe fn symbol<F: Copy>(lib: *mut c_void, path: &Path, name: &str) -> Result<F, String> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    let c_name = CString::new(name).expect("symbol names hold no NUL");
    // SAFETY: `lib` is a live handle and `c_name` a C string.
    let f = unsafe { libc::dlsym(lib, c_name.as_ptr()) };
    if f.is_null() {
        return Err(format!("{name} not in {}: {}", path.display(), dl_error()));
    }
    // SAFETY: a non-null address of a function of type `F` (the caller's promise), and `F` a
    // pointer-sized function pointer.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&f) })
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a C string valid until the next dl* call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "no error text".into()
    } else {
        // SAFETY: non-null, a C string (above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// The toolkit's NVRTC library and `ptxas` (`None` where it has none), or why there is none.
fn toolkit() -> Result<(PathBuf, Option<PathBuf>), String> {
    let home = std::env::var_os("CUDA_HOME").map(PathBuf::from);
    let cache = std::env::var_os("GLIP_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/glip-rs")
    });
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(home) = &home {
        candidates.extend(["lib64", "lib"].map(|d| home.join(d).join("libnvrtc.so")));
    }
    candidates.push(cache.join("cuda-root/lib/libnvrtc.so"));
    let Some(lib) = candidates.iter().find(|p| p.exists()) else {
        return Err(format!(
            "no NVRTC library at {}; `cargo xtask cuda-env` installs the pinned one",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    };
    // ptxas: `$CUDA_HOME/bin`, else beside the folder that holds the library itself (the
    // wheels' `nvidia/cu13/{lib,bin}`, which `cuda-root`'s link points into).
    let mut ptxas: Vec<PathBuf> = home.iter().map(|h| h.join("bin/ptxas")).collect();
    if let Some(root) = lib.canonicalize().ok().as_deref().and_then(|l| l.parent()?.parent()) {
        ptxas.push(root.join("bin/ptxas"));
    }
    Ok((lib.clone(), ptxas.into_iter().find(|p| p.exists())))
}

/// The kernels a PTX module defines (`.entry NAME(`), sorted.
fn entries(ptx: &str) -> Vec<&str> {
    let mut names: Vec<&str> = ptx
        .lines()
        .filter_map(|l| l.split(".entry ").nth(1))
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect();
    names.sort_unstable();
    names
}

/// The parameters of kernel `name` in `ptx`, each as its state space and type (`.u64`, `.u32`,
/// `.f32`, `.f64`, or an aligned byte array `.align 4 .b8 [100]` for a struct by value), the
/// name dropped; empty where `ptx` has no such entry.
fn ptx_params(ptx: &str, name: &str) -> Vec<String> {
    let Some(start) = ptx.find(&format!(".entry {name}(")) else { return Vec::new() };
    let rest = &ptx[start..];
    let list = rest.split_once('(').map_or("", |(_, r)| r.split(')').next().unwrap_or(""));
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let words: Vec<&str> = p.split_whitespace().filter(|w| *w != ".param").collect();
            match words.split_last() {
                // `.b8 NAME[100]`: the array's size stays, the name goes.
                Some((last, ty)) if last.contains('[') => {
                    format!("{} [{}", ty.join(" "), last.split_once('[').map_or("", |(_, n)| n))
                }
                Some((_, ty)) => ty.join(" "),
                None => String::new(),
            }
        })
        .collect()
}

/// The PTX NVRTC makes of a [`Param`]: pointers are 64-bit addresses (NVRTC may mark them
/// `.ptr` with a state space and an alignment, which this drops), scalars their own type, and
/// `GlipLevels` its bytes (a count and three `unsigned`s per level, 4-byte aligned).
fn ptx_param(p: Param) -> String {
    let scalar = |e: Elem| match e {
        Elem::F32 => ".f32",
        Elem::F64 => ".f64",
        Elem::U32 => ".u32",
        Elem::U64 => ".u64",
        Elem::U8 => ".u8",
        Elem::Bf16 => ".b16",
    };
    match p {
        Param::Read(_) | Param::Write(_) => ".u64".into(),
        Param::Scalar(e) => scalar(e).into(),
        Param::Levels => {
            format!(".align 4 .b8 [{}]", 4 * (1 + 3 * super::DEFORMABLE_MAX_LEVELS))
        }
    }
}

/// `ptxas -arch=sm_CAP -v` on `ptx`: its report (registers, shared memory, spills per kernel).
fn assemble(ptxas: &Path, name: &str, ptx: &str, cap: &str) -> Result<String, String> {
    let dir = std::env::temp_dir();
    let stem = format!("glip-nvrtc-{}-{name}", std::process::id());
    let (input, output) = (dir.join(format!("{stem}.ptx")), dir.join(format!("{stem}.cubin")));
    std::fs::write(&input, ptx).map_err(|e| format!("writing {}: {e}", input.display()))?;
    let run = Command::new(ptxas)
        .arg(format!("-arch=sm_{cap}"))
        .args(["-v", "--warn-on-spills", "-o"])
        .arg(&output)
        .arg(&input)
        .output();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    let run = run.map_err(|e| format!("running {}: {e}", ptxas.display()))?;
    let report =
        String::from_utf8_lossy(&run.stderr).into_owned() + &String::from_utf8_lossy(&run.stdout);
    if run.status.success() {
        Ok(report)
    } else {
        Err(format!("ptxas -arch=sm_{cap} could not assemble {name} ({}):\n{report}", run.status))
    }
}

/// The architectures the PTX is assembled for: the oldest CUDA 13 builds for (Turing, 7.5; the
/// PTX NVRTC 13 writes targets it), the A100's 8.0 and the lent GPUs' 9.0, and
/// `$CUDA_COMPUTE_CAP` (as `cargo xtask cuda-env` exports it) where that is another.
fn architectures() -> Vec<String> {
    let mut caps: Vec<String> = ["75", "80", "90"].map(String::from).to_vec();
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        let cap = cap.replace('.', "");
        if !caps.contains(&cap) {
            caps.push(cap);
        }
    }
    caps
}

/// Every module compiles with NVRTC, holds exactly its kernels, and its PTX assembles for each
/// of [`architectures`] with no kernel using local memory.
#[test]
fn every_module_compiles_with_nvrtc_and_assembles_with_ptxas() {
    let required = std::env::var_os("GLIP_REQUIRE_NVRTC").is_some_and(|v| v == "1");
    let (lib, ptxas) = match toolkit() {
        Ok(found) => found,
        Err(why) if !required => {
            eprintln!("SKIP every_module_compiles_with_nvrtc_and_assembles_with_ptxas: {why}");
            return;
        }
        Err(why) => panic!("GLIP_REQUIRE_NVRTC=1 but {why}"),
    };
    let nvrtc = Nvrtc::open(&lib).unwrap_or_else(|e| panic!("{e}"));
    let (major, minor) = nvrtc.version().unwrap_or_else(|e| panic!("{e}"));
    // The `cuda` build takes CUDA 12.0 or newer (`cargo xtask cuda-env --toolkit system`).
    if major < 12 {
        let why =
            format!("NVRTC {major}.{minor} at {}: glip's CUDA needs 12.0 or newer", lib.display());
        assert!(!required, "GLIP_REQUIRE_NVRTC=1 but {why}");
        eprintln!("SKIP every_module_compiles_with_nvrtc_and_assembles_with_ptxas: {why}");
        return;
    }
    let caps = architectures();
    let targets = caps.iter().map(|c| format!("sm_{c}")).collect::<Vec<_>>().join(", ");
    eprintln!("NVRTC {major}.{minor} ({}), ptxas {ptxas:?} for {targets}", lib.display());
    if ptxas.is_none() && required {
        panic!("GLIP_REQUIRE_NVRTC=1 but no ptxas beside {}", lib.display());
    }
    for module in Module::ALL {
        let name = module.name();
        let ptx = nvrtc.compile(name, module.source()).unwrap_or_else(|e| panic!("{e}"));
        let mut want: Vec<&str> = module.kernels().collect();
        want.sort_unstable();
        assert_eq!(entries(&ptx), want, "{name}: the PTX's kernels");
        for k in kernels::ALL.iter().filter(|k| k.module == module) {
            let want: Vec<String> = k.params.iter().map(|&p| ptx_param(p)).collect();
            assert_eq!(ptx_params(&ptx, k.name), want, "{}: the PTX's parameters", k.name);
        }
        let Some(ptxas) = &ptxas else { continue };
        for cap in &caps {
            let report = assemble(ptxas, name, &ptx, cap).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("{name}, sm_{cap}:\n{report}");
            let local = local_memory(&report);
            assert_eq!(local.len(), want.len(), "{name}, sm_{cap}: ptxas's report of each kernel");
            let using: Vec<_> = local.iter().filter(|(_, bytes)| *bytes != [0; 3]).collect();
            assert!(
                using.is_empty(),
                "{name}, sm_{cap}: kernels using local memory (stack frame, spill stores, spill \
                 loads, in bytes): {using:?}"
            );
        }
    }
}

/// Per kernel of a `ptxas -v` report, its stack frame, spill stores and spill loads in bytes.
/// None of glip's kernels needs local memory (thread-private arrays indexed by a variable, or
/// more live values than registers); one that does is slower on every launch, so it is refused.
fn local_memory(report: &str) -> Vec<(String, [u64; 3])> {
    let mut kernel = None;
    let mut found = Vec::new();
    for line in report.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            kernel = Some(name.trim().to_owned());
        } else if line.contains("bytes stack frame") {
            let bytes: Vec<u64> = line
                .split(',')
                .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                .collect();
            let name = kernel.take().unwrap_or_default();
            match bytes[..] {
                [frame, stores, loads] => found.push((name, [frame, stores, loads])),
                _ => panic!("ptxas's line for {name} has not three sizes: {line}"),
            }
        }
    }
    found
}

/// The entries are read from PTX's `.entry` lines and the local memory from ptxas's report (the
/// lines the first test relies on), and compiling bad CUDA C fails with NVRTC's log naming the
/// error (so a broken source cannot pass).
#[test]
fn a_source_nvrtc_refuses_fails_with_its_log() {
    let ptx = ".visible .entry glip_b(\n\t.param .u64 x\n)\n.visible .entry glip_a(\n)\n";
    assert_eq!(entries(ptx), ["glip_a", "glip_b"]);
    let report = "ptxas info    : Function properties for glip_a\n    \
                  208 bytes stack frame, 0 bytes spill stores, 4 bytes spill loads\n";
    assert_eq!(local_memory(report), [("glip_a".to_owned(), [208, 0, 4])]);
    let ptx = ".visible .entry glip_c(\n\t.param .u64 .ptr .global .align 4 glip_c_param_0,\n\t\
               .param .align 4 .b8 glip_c_param_1[100],\n\t.param .f32 glip_c_param_2\n)\n";
    assert_eq!(
        ptx_params(ptx, "glip_c"),
        [".u64 .ptr .global .align 4", ".align 4 .b8 [100]", ".f32"]
    );
    assert!(ptx_params(ptx, "glip_d").is_empty());
    let Ok((lib, _)) = toolkit() else {
        eprintln!("SKIP a_source_nvrtc_refuses_fails_with_its_log: no NVRTC library");
        return;
    };
    let nvrtc = Nvrtc::open(&lib).unwrap_or_else(|e| panic!("{e}"));
    let bad = "extern \"C\" __global__ void glip_bad(float *x) { x[threadIdx.x] = undeclared; }";
    let err = nvrtc.compile("glip_bad", bad).unwrap_err();
    assert!(
        err.contains("NVRTC could not compile glip_bad") && err.contains("undeclared"),
        "{err}"
    );
}
