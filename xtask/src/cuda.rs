//! `cargo xtask cuda-env [--cudnn] [--compute-cap N] [--toolkit wheels|system]`: what building
//! glip's `cuda` (or `cudnn`) feature needs on a machine with no GPU and no CUDA install, from
//! pinned PyPI wheels (CUDA 13.0, the lent GPUs' driver): nvcc, nvvm, the runtime, cuBLAS,
//! cuRAND, NVRTC (and cuDNN 9), in a venv in the cache folder; a folder of unversioned `lib*.so`
//! links and a stub `libcuda.so` (the real one comes with the driver) to link against. Prints
//! `export` lines for the build and for running what it builds (`LD_LIBRARY_PATH`):
//!
//! ```sh
//! eval "$(cargo xtask cuda-env)"
//! cargo build --release -p glip-cli --features cuda
//! ```
//!
//! A driver older than CUDA 13.0 (R580) loads no PTX that CUDA 13 writes, and PyPI has no CUDA
//! 12 compiler (the `-cu12` nvcc wheels hold ptxas and libnvvm, not nvcc): `--toolkit system`
//! builds with the toolkit installed on the machine instead (`$CUDA_HOME/bin/nvcc`, else the
//! `nvcc` on PATH, else `/usr/local/cuda`; CUDA 12.0 or newer), cuDNN from its pinned wheel.
//!
//! Progress goes to stderr; only the exports go to stdout.

use crate::fetch::cache_dir;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// CUDA 13.0 wheels: nvvm pinned too (unpinned it brings PTX newer than the 13.0 driver takes).
const CUDA_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
];
/// cuDNN 9 for CUDA 13 (the version PyTorch 2.11+cu130 pins).
const CUDNN_WHEEL: &str = "nvidia-cudnn-cu13==9.19.0.56";
/// CUPTI for CUDA 13.0: the GPU tracer's headers and library (`--cupti`).
const CUPTI_WHEEL: &str = "nvidia-cuda-cupti==13.0.85";

/// The libraries the build links against, by their unversioned names.
const LINKED: &[&str] =
    &["libcublas.so", "libcublasLt.so", "libcudart.so", "libnvrtc.so", "libcurand.so"];

/// The venv `venv` (in the cache folder) with `wheels` installed (with their dependencies unless
/// `no_deps`); its `site-packages/nvidia` folder. The stamp file lists the wheels installed so
/// far: only the missing ones are installed (a pin changed replaces its package's line).
fn install(venv: &str, wheels: &[&str], no_deps: bool) -> Result<PathBuf> {
    let venv = cache_dir().join(venv);
    let stamp = venv.join(".glip-wheels");
    let python = venv.join("bin/python");
    let installed: Vec<String> = if python.exists() {
        std::fs::read_to_string(&stamp)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    } else {
        Vec::new()
    };
    let missing: Vec<&str> =
        wheels.iter().copied().filter(|w| !installed.iter().any(|i| i == w)).collect();
    if !missing.is_empty() {
        eprintln!("cuda-env: installing {} wheels into {}", missing.len(), venv.display());
        let host = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        if !python.exists() {
            let s = Command::new(&host).args(["-m", "venv"]).arg(&venv).status()?;
            if !s.success() {
                bail!("python3 -m venv {} failed", venv.display());
            }
        }
        let s = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(no_deps.then_some("--no-deps"))
            .args(&missing)
            .stdout(std::process::Stdio::null())
            .status()?;
        if !s.success() {
            bail!("pip install of the CUDA wheels failed: {}", missing.join(" "));
        }
        let package = |w: &str| w.split("==").next().unwrap_or(w).to_owned();
        let mut now: Vec<String> = installed
            .into_iter()
            .filter(|i| missing.iter().all(|m| package(m) != package(i)))
            .collect();
        now.extend(missing.iter().map(|m| m.to_string()));
        std::fs::write(&stamp, now.join(" "))?;
    }
    let lib = std::fs::read_dir(venv.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia"))
        .find(|p| p.exists())
        .with_context(|| format!("no site-packages/nvidia in {}", venv.display()))?;
    Ok(lib)
}

/// The first file in `dir` whose name is `name` followed by a version (`libcublas.so.13`).
fn versioned(dir: &Path, name: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.strip_prefix(name).is_some_and(|v| v.starts_with('.')))
        })
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| format!("no {name}.N in {}", dir.display()))
}

fn link(target: &Path, at: &Path) -> Result<()> {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at)
        .with_context(|| format!("linking {} -> {}", at.display(), target.display()))
}

/// cudarc's package in `cargo metadata` of the `cuda` feature (its manifest and features).
fn cudarc_package() -> Result<serde_json::Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--features", "glip-cli/cuda"])
        .current_dir(crate::fixtures::workspace_root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = meta["packages"].as_array_mut().map(std::mem::take).unwrap_or_default();
    packages
        .into_iter()
        .find(|p| p["name"] == "cudarc")
        .context("cudarc is not among the cuda feature's packages")
}

/// The driver functions cudarc declares, from its source (`fn cuXxx(`).
fn driver_functions() -> Result<Vec<String>> {
    let cudarc = cudarc_package()?;
    let manifest = cudarc["manifest_path"].as_str().context("cudarc has no manifest_path")?;
    let src = Path::new(manifest).with_file_name("src/driver/sys/mod.rs");
    let text =
        std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    let mut names: Vec<String> = text
        .split("fn ")
        .skip(1)
        .filter_map(|rest| {
            let name: String =
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            (name.starts_with("cu") && rest[name.len()..].starts_with('(')).then_some(name)
        })
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Builds the link folder `name` in the cache folder: `lib/` with unversioned links to the
/// toolkit's libraries in `libs` (and cuDNN's in `cudnn`), and `lib/stubs/libcuda.so`.
fn link_root(name: &str, libs: &Path, cudnn: Option<&Path>) -> Result<PathBuf> {
    let root = cache_dir().join(name);
    let lib = root.join("lib");
    std::fs::create_dir_all(lib.join("stubs"))?;
    for name in LINKED {
        link(&versioned(libs, name)?, &lib.join(name))?;
    }
    if let Some(dir) = cudnn {
        link(&versioned(dir, "libcudnn.so")?, &lib.join("libcudnn.so"))?;
    }
    let stub = lib.join("stubs/libcuda.so");
    if !stub.exists() {
        let functions = driver_functions()?;
        let c: String = functions.iter().map(|f| format!("void {f}(void) {{}}\n")).collect();
        let src = root.join("libcuda_stub.c");
        std::fs::write(&src, c)?;
        let s = Command::new("gcc")
            .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(&stub)
            .arg(&src)
            .status()
            .context("running gcc for the libcuda stub")?;
        if !s.success() {
            bail!("gcc could not build the libcuda stub");
        }
        eprintln!("cuda-env: libcuda stub with {} driver functions", functions.len());
    }
    link(&stub, &lib.join("libcuda.so"))?;
    Ok(root)
}

/// Where the CUDA toolkit comes from (`--toolkit`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The pinned CUDA 13.0 wheels from PyPI: nothing to install first; the GPU's driver must run
    /// CUDA 13.0 or newer.
    #[default]
    Wheels,
    /// The toolkit installed here (`$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH, else
    /// /usr/local/cuda; CUDA 12.0 or newer), for a driver older than CUDA 13.0.
    System,
}

/// An installed toolkit's folders.
#[derive(Debug, Clone, PartialEq)]
struct Installed {
    /// Its root (`CUDA_HOME`): `bin/nvcc`, `include/`.
    home: PathBuf,
    /// The folder of its shared libraries (`libcudart.so.12`, `libcublas.so.12`, ...).
    libs: PathBuf,
}

/// The CUDA toolkit a build uses: the pinned wheels or one installed here.
#[derive(Debug, Clone, PartialEq)]
pub struct Toolkit {
    /// Its CUDA version, `(12, 4)`.
    version: (u32, u32),
    /// The oldest and the newest compute capability it builds for (`nvcc --list-gpu-arch`),
    /// `(75, 121)`.
    caps: (u32, u32),
    /// `None` for the pinned wheels.
    installed: Option<Installed>,
}

/// The pinned wheels' toolkit: CUDA 13.0, which builds for Turing (7.5) up to 12.1 (its `nvcc
/// --list-gpu-arch`: compute_75 to compute_121).
const PINNED: Toolkit = Toolkit { version: (13, 0), caps: (75, 121), installed: None };

impl Toolkit {
    /// The toolkit of `source`; an installed one is found and asked its version (and refused if
    /// older than 12.0: the pinned cuDNN 9.19 has wheels for CUDA 12 and 13 only, its CUDA 11
    /// ones stop at 9.10, and nothing here was built with CUDA 11).
    pub fn find(source: Source) -> Result<Self> {
        match source {
            Source::Wheels => Ok(PINNED),
            Source::System => {
                let (home, path) = (std::env::var_os("CUDA_HOME"), std::env::var_os("PATH"));
                Self::installed(home.as_deref(), path.as_deref())
            }
        }
    }

    /// The toolkit installed here, found from `$CUDA_HOME` and `$PATH` ([`find_nvcc`]).
    fn installed(
        cuda_home: Option<&std::ffi::OsStr>,
        path: Option<&std::ffi::OsStr>,
    ) -> Result<Self> {
        let nvcc = find_nvcc(cuda_home, path).context(
            "--toolkit system: no nvcc ($CUDA_HOME/bin/nvcc where CUDA_HOME is set, else nvcc on \
             PATH or /usr/local/cuda/bin/nvcc): install a CUDA toolkit (or load its module), or \
             leave out --toolkit for the pinned wheels",
        )?;
        let ask = |arg: &str| -> Result<String> {
            let out = Command::new(&nvcc)
                .arg(arg)
                .output()
                .with_context(|| format!("running {} {arg}", nvcc.display()))?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let version = parse_nvcc_version(&ask("--version")?)
            .with_context(|| format!("{} --version names no release", nvcc.display()))?;
        if version < (12, 0) {
            bail!(
                "--toolkit system: {} is CUDA {}.{}; glip builds with CUDA 12.0 or newer (the \
                 pinned cuDNN 9.19 has no CUDA 11 wheel)",
                nvcc.display(),
                version.0,
                version.1
            );
        }
        // An nvcc that lists no architectures leaves the bounds to itself: it refuses one it
        // lacks when it builds candle's kernels.
        let caps = arch_range(&ask("--list-gpu-arch").unwrap_or_default());
        let home = nvcc
            .canonicalize()
            .with_context(|| format!("resolving {}", nvcc.display()))?
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .with_context(|| format!("{} has no root folder", nvcc.display()))?;
        let libs = library_dir(&home)?;
        Ok(Toolkit {
            version,
            caps: caps.unwrap_or((0, u32::MAX)),
            installed: Some(Installed { home, libs }),
        })
    }

    /// What it is, for progress lines.
    pub fn describe(&self) -> String {
        match &self.installed {
            None => "the CUDA 13.0 toolkit from pinned wheels".into(),
            Some(i) => format!("the CUDA {} toolkit at {}", self.version_text(), i.home.display()),
        }
    }

    fn version_text(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    /// The folder under `target/` a build with it goes to: `cuda` for the wheels, `cuda-12.4` for
    /// an installed toolkit (cargo's fingerprints do not follow a toolkit switch).
    pub fn target_folder(&self) -> String {
        match self.installed {
            None => "cuda".into(),
            Some(_) => format!("cuda-{}", self.version_text()),
        }
    }

    /// Why its binaries cannot run under a driver for CUDA `driver` (from nvidia-smi; `None`
    /// says nothing): the driver loads no PTX of a newer toolkit, and candle's kernels are PTX.
    pub fn driver_too_old(&self, driver: Option<(u32, u32)>) -> Option<String> {
        let (major, minor) = driver?;
        if (major, minor) >= self.version {
            return None;
        }
        let has = format!("this machine's NVIDIA driver runs CUDA {major}.{minor} (nvidia-smi)");
        Some(match &self.installed {
            None if major >= 12 => format!(
                "{has}, and the pinned toolkit is CUDA 13.0, whose binaries need a driver for \
                 CUDA 13.0 or newer: update the driver, or build with a CUDA toolkit of \
                 {major}.{minor} or older installed here (--toolkit system)"
            ),
            None => format!(
                "{has}, and the pinned toolkit is CUDA 13.0, whose binaries need a driver for \
                 CUDA 13.0 or newer: update the driver (to CUDA 12.0 at least for a toolkit \
                 installed here, --toolkit system)"
            ),
            Some(i) => format!(
                "{has}, and the toolkit at {} is CUDA {}, whose PTX that driver cannot load: \
                 set CUDA_HOME to a toolkit of CUDA {major}.{minor} or older, or update the driver",
                i.home.display(),
                self.version_text()
            ),
        })
    }
}

/// The nvcc of an installed toolkit: `$CUDA_HOME/bin/nvcc` where CUDA_HOME is set, else the
/// first on `path`, else /usr/local/cuda's.
fn find_nvcc(
    cuda_home: Option<&std::ffi::OsStr>,
    path: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    if let Some(home) = cuda_home.filter(|h| !h.is_empty()) {
        return Some(Path::new(home).join("bin/nvcc")).filter(|n| n.is_file());
    }
    let on_path = path.into_iter().flat_map(std::env::split_paths).map(|d| d.join("nvcc"));
    on_path.chain([PathBuf::from("/usr/local/cuda/bin/nvcc")]).find(|n| n.is_file())
}

/// `(12, 4)` from `nvcc --version`'s `Cuda compilation tools, release 12.4, V12.4.131`.
fn parse_nvcc_version(text: &str) -> Option<(u32, u32)> {
    let release = text.split("release ").nth(1)?;
    let version = release.split(|c: char| c == ',' || c.is_whitespace()).next()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The oldest and the newest of `nvcc --list-gpu-arch`'s `compute_NN` lines (`compute_90a`
/// counts as 90).
fn arch_range(text: &str) -> Option<(u32, u32)> {
    let caps = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("compute_"))
        .filter_map(|n| n.trim_end_matches(|c: char| c.is_ascii_alphabetic()).parse::<u32>().ok());
    caps.fold(None, |range, c| match range {
        None => Some((c, c)),
        Some((lo, hi)) => Some((lo.min(c), hi.max(c))),
    })
}

/// The folder of an installed toolkit's shared libraries: the first of `lib64`,
/// `targets/x86_64-linux/lib`, `lib/x86_64-linux-gnu` (Debian's packages) and `lib` under
/// `home` that holds `libcudart.so.N`.
fn library_dir(home: &Path) -> Result<PathBuf> {
    let tried = ["lib64", "targets/x86_64-linux/lib", "lib/x86_64-linux-gnu", "lib"];
    tried
        .iter()
        .map(|d| home.join(d))
        .find(|d| versioned(d, "libcudart.so").is_ok())
        .with_context(|| format!("no libcudart.so.N in {} ({})", home.display(), tried.join(", ")))
}

/// The headers candle's kernels include that a partial toolkit lacks, of: the runtime's
/// `cuda_fp16.h`, and CCCL's `nv/target` (libcu++, which `cuda_fp16.h` includes) and
/// `thrust/device_ptr.h` (its static MoE kernels). Looked for in `include/` (NVIDIA's installer;
/// Debian's `/usr/include`) and `targets/x86_64-linux/include/` (conda), and their `cccl/`
/// (where CUDA 13 keeps CCCL). A warning, not a refusal: nvcc's profile may name other folders.
fn missing_headers(home: &Path) -> Vec<&'static str> {
    const DIRS: [&str; 4] = [
        "include",
        "include/cccl",
        "targets/x86_64-linux/include",
        "targets/x86_64-linux/include/cccl",
    ];
    ["cuda_fp16.h", "nv/target", "thrust/device_ptr.h"]
        .into_iter()
        .filter(|h| !DIRS.iter().any(|d| home.join(d).join(h).is_file()))
        .collect()
}

/// The newest of cudarc's bindings (`supported`, as `12040` for 12.4) for a toolkit of
/// `version`: its own, else the newest of its major version cudarc has (a toolkit keeps the
/// functions of the ones before it).
fn cudarc_version(version: (u32, u32), supported: &[u32]) -> Result<u32> {
    let want = version.0 * 1000 + version.1 * 10;
    supported.iter().copied().filter(|&v| v <= want && v / 1000 == version.0).max().with_context(
        || {
            let mut known = supported.to_vec();
            known.sort_unstable();
            let name = |v: &u32| format!("{}.{}", v / 1000, v % 1000 / 10);
            format!(
                "cudarc has no bindings for CUDA {}.{} (it knows {} to {})",
                version.0,
                version.1,
                known.first().map(name).unwrap_or_default(),
                known.last().map(name).unwrap_or_default()
            )
        },
    )
}

/// The CUDA versions cudarc has bindings for (its features `cuda-12040`, ...).
fn cudarc_versions() -> Result<Vec<u32>> {
    let cudarc = cudarc_package()?;
    let features = cudarc["features"].as_object().context("cudarc has no features")?;
    Ok(features
        .keys()
        .filter_map(|f| f.strip_prefix("cuda-").and_then(|v| v.parse::<u32>().ok()))
        .collect())
}

/// The lent GPUs' (H100, H200): what a machine without `nvidia-smi` builds for.
const DEFAULT_CAP: u32 = 90;

/// Parses a compute capability written `86`, `8.6` or `sm_86` (as nvidia-smi, candle's
/// `CUDA_COMPUTE_CAP` and nvcc write it) into `86`; refuses what `toolkit` cannot build for.
fn parse_cap(text: &str, toolkit: &Toolkit) -> Result<u32> {
    let t = text.trim();
    let t = t.strip_prefix("sm_").unwrap_or(t);
    let cap = match t.split_once('.') {
        Some((major, minor)) if !major.is_empty() && minor.len() == 1 => {
            major.parse::<u32>().ok().zip(minor.parse::<u32>().ok()).map(|(a, b)| 10 * a + b)
        }
        Some(_) => None,
        None if t.len() >= 2 => t.parse::<u32>().ok(),
        None => None,
    };
    let cap = cap.with_context(|| {
        format!("{text:?} is not a compute capability (write it as 86, 8.6 or sm_86)")
    })?;
    let (oldest, newest) = toolkit.caps;
    if cap < oldest {
        bail!(
            "compute capability {}.{} is older than CUDA {} supports ({}.{} and newer); \
             {} cannot build for it",
            cap / 10,
            cap % 10,
            toolkit.version_text(),
            oldest / 10,
            oldest % 10,
            toolkit.describe()
        );
    }
    // Checked here, not left to nvcc: it would refuse the architecture only after minutes of
    // building, in the middle of candle-kernels' build script output.
    if cap > newest {
        let newer = match toolkit.installed {
            Some(_) => {
                "a newer toolkit, or the pinned CUDA 13.0 wheels (leave out --toolkit system) \
                        where the GPU's driver runs CUDA 13.0 or newer"
            }
            None => "a toolkit installed here that knows it (--toolkit system)",
        };
        bail!(
            "compute capability {}.{} is newer than {} builds for (up to {}.{}): build with {newer}",
            cap / 10,
            cap % 10,
            toolkit.describe(),
            newest / 10,
            newest % 10,
        );
    }
    Ok(cap)
}

/// The compute capability to build candle's kernels for, and where it came from: the flag, then
/// `CUDA_COMPUTE_CAP` (what candle's build reads), then the lowest of the GPUs `nvidia-smi`
/// lists (`--query-gpu=compute_cap`, one line a GPU: PTX for the lowest runs on the others),
/// then the lent GPUs' 90. A bad value names where it came from.
fn compute_cap(
    flag: Option<&str>,
    env: Option<&str>,
    smi: Option<&str>,
    toolkit: &Toolkit,
) -> Result<(u32, &'static str)> {
    let parse_cap = |text: &str| parse_cap(text, toolkit);
    if let Some(f) = flag {
        return Ok((parse_cap(f).context("--compute-cap")?, "--compute-cap"));
    }
    if let Some(e) = env.filter(|e| !e.trim().is_empty()) {
        return Ok((parse_cap(e).context("$CUDA_COMPUTE_CAP")?, "$CUDA_COMPUTE_CAP"));
    }
    let listed: Vec<&str> = smi.unwrap_or("").lines().filter(|l| !l.trim().is_empty()).collect();
    if !listed.is_empty() {
        let caps = listed
            .iter()
            .map(|l| parse_cap(l))
            .collect::<Result<Vec<u32>>>()
            .context("nvidia-smi --query-gpu=compute_cap")?;
        return Ok((caps.into_iter().min().expect("one line at least"), "nvidia-smi"));
    }
    Ok((DEFAULT_CAP, "default: H100 / H200, no nvidia-smi here; --compute-cap N for another GPU"))
}

/// What `nvidia-smi` says of this machine's GPUs' compute capabilities, if it runs.
fn nvidia_smi_caps() -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The CUDA version this machine's NVIDIA driver runs, from `nvidia-smi`'s header
/// (`CUDA Version: 12.4`), if nvidia-smi runs.
pub fn driver_cuda_version() -> Option<(u32, u32)> {
    let out = Command::new("nvidia-smi").output().ok()?;
    parse_driver_cuda(&String::from_utf8_lossy(&out.stdout))
}

/// `(12, 4)` from a header saying `CUDA Version: 12.4`.
fn parse_driver_cuda(header: &str) -> Option<(u32, u32)> {
    let version = header.split("CUDA Version:").nth(1)?.split_whitespace().next()?;
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// One variable of a CUDA build's environment.
pub struct EnvVar {
    /// Its name.
    pub name: &'static str,
    /// Its value, or (`prepend`) what goes before the present value, `:`-separated.
    pub value: String,
    /// Whether `value` goes before the present value (a search path) instead of replacing it.
    pub prepend: bool,
    /// Why, for the printed `export` line.
    pub note: Option<String>,
}

impl EnvVar {
    pub(crate) fn set(name: &'static str, value: impl ToString) -> Self {
        Self { name, value: value.to_string(), prepend: false, note: None }
    }

    fn prepend(name: &'static str, value: impl ToString) -> Self {
        Self { prepend: true, ..Self::set(name, value) }
    }

    /// The value with `present` (the variable's value now, if set) after a prepended one.
    pub fn resolved(&self, present: Option<&str>) -> String {
        match present.filter(|p| self.prepend && !p.is_empty()) {
            Some(p) => format!("{}:{p}", self.value),
            None => self.value.clone(),
        }
    }

    /// The shell's `export` line, expanding the present value at `eval` time.
    fn export_line(&self) -> String {
        let value = if self.prepend {
            format!("\"{}${{{n}:+:${n}}}\"", self.value, n = self.name)
        } else {
            format!("\"{}\"", self.value)
        };
        match &self.note {
            Some(note) => format!("export {}={value}  # {note}", self.name),
            None => format!("export {}={value}", self.name),
        }
    }
}

/// A CUDA build's environment and where it builds.
pub struct CudaEnv {
    /// The variables: for the build, and `LD_LIBRARY_PATH` for running what it builds.
    pub vars: Vec<EnvVar>,
    /// Its folder under `target/` ([`Toolkit::target_folder`]).
    pub target: String,
}

/// cuDNN 9 for an installed toolkit of CUDA `major`: the same release as [`CUDNN_WHEEL`], built
/// for that major version; and the venv it goes to (the wheels' own for 13).
fn cudnn_for(major: u32) -> (String, &'static str) {
    let wheel = CUDNN_WHEEL.replace("-cu13==", &format!("-cu{major}=="));
    (wheel, if major == 13 { "cuda-venv" } else { "cuda12-venv" })
}

/// The environment for a CUDA build with `toolkit` (the pinned wheels installed first where
/// missing), with cuDNN and CUPTI as asked; `cap_flag` is `--compute-cap`.
pub fn environment(
    toolkit: &Toolkit,
    cudnn: bool,
    cupti: bool,
    cap_flag: Option<&str>,
) -> Result<CudaEnv> {
    let env_cap = std::env::var("CUDA_COMPUTE_CAP").ok();
    let (cap, from) =
        compute_cap(cap_flag, env_cap.as_deref(), nvidia_smi_caps().as_deref(), toolkit)?;
    // The toolkit's root, its libraries' folder, cuDNN's and CUPTI's, the link folder's name and
    // cudarc's bindings.
    let (home, libs, cudnn_lib, cupti_root, root_name, cudarc) = match &toolkit.installed {
        None => {
            let mut wheels: Vec<&str> = CUDA_WHEELS.to_vec();
            wheels.extend(cudnn.then_some(CUDNN_WHEEL));
            wheels.extend(cupti.then_some(CUPTI_WHEEL));
            let nvidia = install("cuda-venv", &wheels, false)?;
            let home = nvidia.join("cu13");
            let cudnn_lib = cudnn.then(|| nvidia.join("cudnn/lib"));
            let cupti_root = cupti.then(|| home.clone());
            (home.clone(), home.join("lib"), cudnn_lib, cupti_root, "cuda-root", 13000)
        }
        Some(Installed { home, libs }) => {
            let missing = missing_headers(home);
            if !missing.is_empty() {
                eprintln!(
                    "cuda-env: warning: {} has no {} under include/ (nor \
                     targets/x86_64-linux/include/): candle's kernels include them, so their \
                     build would stop there. A toolkit from NVIDIA's installer has them; a \
                     partial one needs the runtime's headers and CCCL's (thrust, cub, libcu++: \
                     Debian's libthrust-dev, libcub-dev and libcu++-dev; conda's cuda-cudart-dev \
                     and cuda-cccl)",
                    toolkit.describe(),
                    missing.join(", ")
                );
            }
            if cupti {
                bail!("--cupti comes with the pinned wheels only (leave out --toolkit system)");
            }
            let cudnn_lib = if cudnn {
                let (wheel, venv) = cudnn_for(toolkit.version.0);
                // Without its dependencies: cuBLAS comes from the installed toolkit.
                Some(install(venv, &[wheel.as_str()], true)?.join("cudnn/lib"))
            } else {
                None
            };
            let cudarc = cudarc_version(toolkit.version, &cudarc_versions()?)?;
            (home.clone(), libs.clone(), cudnn_lib, None, "cuda-root-system", cudarc)
        }
    };
    let root = link_root(root_name, &libs, cudnn_lib.as_deref())?;
    let mut vars = vec![
        EnvVar::prepend("PATH", home.join("bin").display()),
        EnvVar::set("CUDA_HOME", home.display()),
        EnvVar::set("CUDA_ROOT", root.display()),
        EnvVar { note: Some(from.into()), ..EnvVar::set("CUDA_COMPUTE_CAP", cap) },
        EnvVar::set("CUDARC_CUDA_VERSION", cudarc),
        EnvVar::prepend(
            "LIBRARY_PATH",
            format!("{}:{}", root.join("lib").display(), root.join("lib/stubs").display()),
        ),
    ];
    // What the binary loads at start-up (cuBLAS, cuRAND, NVRTC, the runtime, cuDNN): linked by
    // name, found through the loader's path, so the shell (or the run) that starts the binary
    // needs it too. The driver's libcuda.so.1 comes with the NVIDIA driver.
    let runtime: Vec<String> = [Some(&libs), cudnn_lib.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .collect();
    vars.push(EnvVar {
        note: Some(format!("for running the binary: cuBLAS, NVRTC, ... of {}", toolkit.describe())),
        ..EnvVar::prepend("LD_LIBRARY_PATH", runtime.join(":"))
    });
    if cudnn {
        vars.push(EnvVar::set("CUDNN_LIB", root.display()));
    }
    if let Some(c) = cupti_root {
        // The tracer's build reads these (scripts/gpu-pack.sh).
        vars.push(EnvVar::set("GLIP_CUPTI", c.display()));
    }
    Ok(CudaEnv { vars, target: toolkit.target_folder() })
}

/// Prints the environment for a CUDA build.
pub fn run(cudnn: bool, cupti: bool, cap_flag: Option<&str>, source: Source) -> Result<()> {
    let toolkit = Toolkit::find(source)?;
    eprintln!("cuda-env: {}", toolkit.describe());
    if let Some(why) = toolkit.driver_too_old(driver_cuda_version()) {
        eprintln!("cuda-env: warning: {why} (a binary built here runs only on another machine)");
    }
    for v in environment(&toolkit, cudnn, cupti, cap_flag)?.vars {
        println!("{}", v.export_line());
    }
    eprintln!(
        "cuda-env: ready; eval these exports, then cargo build --release -p glip-cli --features {}",
        if cudnn { "cudnn" } else { "cuda" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn search_paths_are_prepended_and_other_variables_replaced() {
        let path = EnvVar::prepend("PATH", "/cuda/bin");
        assert_eq!(path.resolved(Some("/usr/bin")), "/cuda/bin:/usr/bin");
        assert_eq!(path.resolved(Some("")), "/cuda/bin");
        assert_eq!(path.resolved(None), "/cuda/bin");
        assert_eq!(path.export_line(), "export PATH=\"/cuda/bin${PATH:+:$PATH}\"");
        let cap = EnvVar { note: Some("nvidia-smi".into()), ..EnvVar::set("CUDA_COMPUTE_CAP", 86) };
        assert_eq!(cap.resolved(Some("90")), "86");
        assert_eq!(cap.export_line(), "export CUDA_COMPUTE_CAP=\"86\"  # nvidia-smi");
    }

    /// An installed CUDA 12.4 toolkit at `/opt/cuda-12.4` (not on disk).
    fn cuda_12_4() -> Toolkit {
        let home = PathBuf::from("/opt/cuda-12.4");
        Toolkit {
            version: (12, 4),
            caps: (50, 90),
            installed: Some(Installed { libs: home.join("lib64"), home }),
        }
    }

    #[test]
    fn a_driver_older_than_the_toolkit_is_named() {
        let header =
            "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |";
        assert_eq!(parse_driver_cuda(header), Some((12, 4)));
        let why = PINNED.driver_too_old(parse_driver_cuda(header)).expect("12.4 < 13.0");
        assert!(why.contains("runs CUDA 12.4") && why.contains("CUDA 13.0 or newer"), "{why}");
        assert!(why.contains("--toolkit system"), "the way out for a driver one cannot update");
        let why = PINNED.driver_too_old(Some((11, 8))).expect("11.8 < 13.0");
        assert!(why.contains("update the driver (to CUDA 12.0 at least"), "{why}");
        for ok in ["CUDA Version: 13.0", "CUDA Version: 13.1 |", "CUDA Version: 14.0"] {
            assert_eq!(PINNED.driver_too_old(parse_driver_cuda(ok)), None, "{ok}");
        }
        for unknown in ["", "NVIDIA-SMI has failed", "CUDA Version: N/A"] {
            assert_eq!(parse_driver_cuda(unknown), None, "{unknown:?}");
        }
        assert_eq!(PINNED.driver_too_old(None), None, "no nvidia-smi: nothing to say");

        // An installed toolkit: its own version against the driver's.
        let t = cuda_12_4();
        for ok in [(12, 4), (12, 8), (13, 0)] {
            assert_eq!(t.driver_too_old(Some(ok)), None, "{ok:?}");
        }
        let why = t.driver_too_old(Some((12, 2))).expect("12.2 < 12.4");
        assert!(
            why.contains("runs CUDA 12.2")
                && why.contains("/opt/cuda-12.4 is CUDA 12.4")
                && why.contains("CUDA_HOME"),
            "{why}"
        );
    }

    #[test]
    fn an_installed_toolkit_builds_into_its_own_target_folder() {
        assert_eq!(PINNED.target_folder(), "cuda", "gpu-pack.sh's and CI's folder");
        assert_eq!(cuda_12_4().target_folder(), "cuda-12.4");
        assert_eq!(cuda_12_4().describe(), "the CUDA 12.4 toolkit at /opt/cuda-12.4");
        let (wheel, venv) = cudnn_for(12);
        assert_eq!(wheel, "nvidia-cudnn-cu12==9.19.0.56");
        assert_eq!(venv, "cuda12-venv", "apart from the cu13 wheels: both install nvidia/cudnn");
        assert_eq!(cudnn_for(13), (CUDNN_WHEEL.to_string(), "cuda-venv"));
    }

    #[test]
    fn nvcc_says_its_version_and_architectures() {
        // `nvcc --version` of the pinned wheel (13.0.88) and of a CUDA 12.4 install.
        let v13 = "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA \
                   Corporation\nBuilt on Wed_Aug_20_01:58:59_PM_PDT_2025\nCuda compilation \
                   tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n";
        assert_eq!(parse_nvcc_version(v13), Some((13, 0)));
        let v12 = "Cuda compilation tools, release 12.4, V12.4.131\nBuild cuda_12.4.r12.4/\n";
        assert_eq!(parse_nvcc_version(v12), Some((12, 4)));
        for bad in ["", "nvcc: command not found", "release twelve, V12"] {
            assert_eq!(parse_nvcc_version(bad), None, "{bad:?}");
        }
        // `nvcc --list-gpu-arch` of the pinned wheel (13.0.88) and of NVIDIA's CUDA 12.4 nvcc
        // (12.4.131, from Debian's packages), as they print it; an `a` suffix counts as its number.
        let a13 = "compute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_88\ncompute_89\n\
                   compute_90\ncompute_100\ncompute_110\ncompute_103\ncompute_120\ncompute_121\n";
        assert_eq!(arch_range(a13), Some(PINNED.caps));
        let a12 = "compute_50\ncompute_52\ncompute_53\ncompute_60\ncompute_61\ncompute_62\n\
                   compute_70\ncompute_72\ncompute_75\ncompute_80\ncompute_86\ncompute_87\n\
                   compute_89\ncompute_90\n";
        assert_eq!(arch_range(a12), Some(cuda_12_4().caps));
        assert_eq!(arch_range("compute_90a\ncompute_50\ncompute_52\n"), Some((50, 90)));
        assert_eq!(arch_range("nvcc fatal   : Unknown option"), None);
    }

    #[test]
    fn cudarc_bindings_are_the_toolkits_or_the_newest_of_its_major_version() {
        let known = [12000, 12010, 12020, 12040, 12060, 12080, 12090, 13000, 13040];
        assert_eq!(cudarc_version((12, 4), &known).unwrap(), 12040);
        assert_eq!(cudarc_version((12, 5), &known).unwrap(), 12040, "none for 12.5 here");
        assert_eq!(cudarc_version((13, 5), &known).unwrap(), 13040);
        assert_eq!(cudarc_version((13, 0), &known).unwrap(), 13000);
        for v in [(11, 8), (14, 0)] {
            let err = cudarc_version(v, &known).unwrap_err().to_string();
            assert!(err.contains(&format!("CUDA {}.{}", v.0, v.1)), "{err}");
            assert!(err.contains("12.0 to 13.4"), "{err}");
        }
    }

    /// The headers a partial toolkit lacks are named (`environment` warns of them); NVIDIA's
    /// layout, conda's and CUDA 13's `cccl/` folder each hold them.
    #[test]
    fn headers_a_partial_toolkit_lacks_are_named() {
        let s = Scratch::new("headers");
        let all = ["cuda_fp16.h", "nv/target", "thrust/device_ptr.h"];
        assert_eq!(missing_headers(&s.0.join("none")), all);
        s.file("nvidia/include/cuda_fp16.h", "", false);
        assert_eq!(missing_headers(&s.0.join("nvidia")), all[1..], "no CCCL (Debian without it)");
        s.file("nvidia/include/nv/target", "", false);
        s.file("nvidia/include/thrust/device_ptr.h", "", false);
        assert_eq!(missing_headers(&s.0.join("nvidia")), [""; 0]);
        // The CUDA 13 wheels' layout (`nvidia/cu13/include/cccl/`), and conda's.
        for (home, dir) in [("cu13", "include"), ("conda", "targets/x86_64-linux/include")] {
            for h in ["cuda_fp16.h", "cccl/nv/target", "cccl/thrust/device_ptr.h"] {
                s.file(&format!("{home}/{dir}/{h}"), "", false);
            }
            assert_eq!(missing_headers(&s.0.join(home)), [""; 0], "{home}");
        }
    }

    #[test]
    fn an_installed_toolkit_is_found_from_cuda_home_or_path() {
        let s = Scratch::new("toolkit");
        let nvcc = "#!/bin/sh\ncase $1 in\n  --version) echo 'Cuda compilation tools, release \
                    12.4, V12.4.131';;\n  --list-gpu-arch) printf \
                    'compute_50\\ncompute_90a\\n';;\nesac\n";
        s.file("cuda-12.4/bin/nvcc", nvcc, true);
        s.file("cuda-12.4/targets/x86_64-linux/lib/libcudart.so.12", "", false);
        let home = s.0.join("cuda-12.4").canonicalize().unwrap();
        let want = Toolkit {
            version: (12, 4),
            caps: (50, 90),
            installed: Some(Installed {
                libs: home.join("targets/x86_64-linux/lib"),
                home: home.clone(),
            }),
        };
        let path = std::env::join_paths([s.0.join("none"), home.join("bin")]).unwrap();
        assert_eq!(Toolkit::installed(None, Some(&path)).unwrap(), want, "from PATH");
        assert_eq!(Toolkit::installed(Some(home.as_os_str()), None).unwrap(), want, "CUDA_HOME");

        // CUDA_HOME set wins over PATH, and says so when it holds no nvcc.
        let empty = s.0.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        if Path::new("/usr/local/cuda/bin/nvcc").exists() {
            eprintln!("skipped the not-found cases: this machine has /usr/local/cuda");
            return;
        }
        let err =
            format!("{:#}", Toolkit::installed(Some(empty.as_os_str()), Some(&path)).unwrap_err());
        assert!(err.contains("$CUDA_HOME/bin/nvcc"), "{err}");
        let err = format!("{:#}", Toolkit::installed(None, Some(empty.as_os_str())).unwrap_err());
        assert!(err.contains("no nvcc") && err.contains("pinned wheels"), "{err}");

        // Too old, and no libraries beside it.
        s.file("old/bin/nvcc", "#!/bin/sh\necho 'release 11.8, V11.8.89'\n", true);
        let err = format!(
            "{:#}",
            Toolkit::installed(Some(s.0.join("old").as_os_str()), None).unwrap_err()
        );
        assert!(err.contains("is CUDA 11.8; glip builds with CUDA 12.0 or newer"), "{err}");
        s.file("bare/bin/nvcc", nvcc, true);
        let err = format!(
            "{:#}",
            Toolkit::installed(Some(s.0.join("bare").as_os_str()), None).unwrap_err()
        );
        assert!(err.contains("no libcudart.so.N in") && err.contains("lib64"), "{err}");
    }

    #[test]
    fn compute_capabilities_parse_in_each_spelling() {
        for (text, want) in [("90", 90), ("8.6", 86), ("sm_89", 89), (" 9.0\n", 90), ("12.0", 120)]
        {
            assert_eq!(parse_cap(text, &PINNED).unwrap(), want, "{text:?}");
        }
        for bad in ["", "9", "nine", "9.", ".9", "8.65", "sm_", "-80"] {
            let err = format!("{:#}", parse_cap(bad, &PINNED).unwrap_err());
            assert!(err.contains("not a compute capability"), "{bad:?}: {err}");
        }
        let err = format!("{:#}", parse_cap("7.0", &PINNED).unwrap_err());
        assert!(err.contains("7.0 is older than CUDA 13.0 supports (7.5"), "{err}");
        assert_eq!(parse_cap("7.0", &cuda_12_4()).unwrap(), 70, "CUDA 12.4 builds for a V100");
        // Newer than the toolkit knows: a B200 (10.0) with CUDA 12.4, and past the pinned 13.0.
        assert_eq!(parse_cap("12.1", &PINNED).unwrap(), 121);
        let err = format!("{:#}", parse_cap("10.0", &cuda_12_4()).unwrap_err());
        assert!(
            err.contains(
                "10.0 is newer than the CUDA 12.4 toolkit at /opt/cuda-12.4 builds for (up to 9.0)"
            ) && err.contains("leave out --toolkit system"),
            "{err}"
        );
        let err = format!("{:#}", parse_cap("13.0", &PINNED).unwrap_err());
        assert!(err.contains("(up to 12.1)") && err.contains("--toolkit system"), "{err}");
    }

    #[test]
    fn the_flag_then_the_environment_then_nvidia_smi_then_the_lent_gpus() {
        let smi = Some("9.0\n8.6\n");
        assert_eq!(
            compute_cap(Some("80"), Some("89"), smi, &PINNED).unwrap(),
            (80, "--compute-cap")
        );
        assert_eq!(compute_cap(None, Some("89"), smi, &PINNED).unwrap(), (89, "$CUDA_COMPUTE_CAP"));
        assert_eq!(
            compute_cap(None, Some(" "), smi, &PINNED).unwrap(),
            (86, "nvidia-smi"),
            "the lowest"
        );
        assert_eq!(compute_cap(None, None, Some("\n"), &PINNED).unwrap().0, DEFAULT_CAP);
        assert_eq!(compute_cap(None, None, None, &PINNED).unwrap().0, DEFAULT_CAP);
        for (flag, env, smi, named) in [
            (Some("x"), None, None, "--compute-cap"),
            (None, Some("6.1"), None, "$CUDA_COMPUTE_CAP"),
            (None, None, Some("9.0\n[N/A]\n"), "nvidia-smi"),
        ] {
            let err = format!("{:#}", compute_cap(flag, env, smi, &PINNED).unwrap_err());
            assert!(err.starts_with(named), "{err}");
        }
        let smi = Some("7.0\n");
        assert_eq!(compute_cap(None, None, smi, &cuda_12_4()).unwrap(), (70, "nvidia-smi"));
    }
}
