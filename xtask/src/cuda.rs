//! `cargo xtask cuda-env [--cudnn] [--compute-cap N]`: what building glip's `cuda` (or `cudnn`)
//! feature needs on a machine with no GPU and no CUDA install, from pinned PyPI wheels (CUDA
//! 13.0, the lent GPUs' driver): nvcc, nvvm, the runtime, cuBLAS, cuRAND, NVRTC (and cuDNN 9),
//! in a venv in the cache folder; a folder of unversioned `lib*.so` links and a stub
//! `libcuda.so` (the real one comes with the driver) to link against. Prints `export` lines for
//! the build and for running what it builds (`LD_LIBRARY_PATH`):
//!
//! ```sh
//! eval "$(cargo xtask cuda-env)"
//! cargo build --release -p glip-cli --features cuda
//! ```
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

/// The venv's `site-packages/nvidia` folder, with the wheels installed. The stamp file lists
/// the wheels installed so far: only the missing ones are installed (a pin changed replaces
/// its package's line).
fn install(cudnn: bool, cupti: bool) -> Result<PathBuf> {
    let venv = cache_dir().join("cuda-venv");
    let mut wheels: Vec<&str> = CUDA_WHEELS.to_vec();
    if cudnn {
        wheels.push(CUDNN_WHEEL);
    }
    if cupti {
        wheels.push(CUPTI_WHEEL);
    }
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
        .context("no site-packages/nvidia in the CUDA venv")?;
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

/// The driver functions cudarc declares, from its source (`fn cuXxx(`).
fn driver_functions() -> Result<Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--features", "glip-cli/cuda"])
        .current_dir(crate::fixtures::workspace_root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not among the cuda feature's packages")?;
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

/// Builds the link folder (`lib/` with unversioned links and `lib/stubs/libcuda.so`).
fn link_root(nvidia: &Path, cudnn: bool) -> Result<PathBuf> {
    let root = cache_dir().join("cuda-root");
    let lib = root.join("lib");
    std::fs::create_dir_all(lib.join("stubs"))?;
    let cu13 = nvidia.join("cu13/lib");
    for name in LINKED {
        link(&versioned(&cu13, name)?, &lib.join(name))?;
    }
    if cudnn {
        let dir = nvidia.join("cudnn/lib");
        link(&versioned(&dir, "libcudnn.so")?, &lib.join("libcudnn.so"))?;
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

/// The oldest compute capability the pinned CUDA 13.0 toolkit builds for (Turing, sm_75).
const OLDEST_CAP: u32 = 75;
/// The lent GPUs' (H100, H200): what a machine without `nvidia-smi` builds for.
const DEFAULT_CAP: u32 = 90;

/// Parses a compute capability written `86`, `8.6` or `sm_86` (as nvidia-smi, candle's
/// `CUDA_COMPUTE_CAP` and nvcc write it) into `86`; refuses what CUDA 13.0 cannot build for.
fn parse_cap(text: &str) -> Result<u32> {
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
    if cap < OLDEST_CAP {
        bail!(
            "compute capability {}.{} is older than CUDA 13.0 supports ({}.{} and newer); \
             the pinned wheels cannot build for it",
            cap / 10,
            cap % 10,
            OLDEST_CAP / 10,
            OLDEST_CAP % 10
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
) -> Result<(u32, &'static str)> {
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

/// Why binaries of the pinned toolkit (CUDA 13.0) cannot run under a driver for CUDA `driver`:
/// the driver loads no PTX of a newer toolkit.
pub fn driver_too_old(driver: Option<(u32, u32)>) -> Option<String> {
    let (major, minor) = driver?;
    ((major, minor) < (13, 0)).then(|| {
        format!(
            "this machine's NVIDIA driver runs CUDA {major}.{minor} (nvidia-smi), and the pinned \
             toolkit is CUDA 13.0, whose binaries need a driver for CUDA 13.0 or newer: update \
             the driver"
        )
    })
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

/// The environment for a CUDA build from the pinned wheels (installed first where missing),
/// with cuDNN and CUPTI as asked; `cap_flag` is `--compute-cap`.
pub fn environment(cudnn: bool, cupti: bool, cap_flag: Option<&str>) -> Result<Vec<EnvVar>> {
    let env_cap = std::env::var("CUDA_COMPUTE_CAP").ok();
    let (cap, from) = compute_cap(cap_flag, env_cap.as_deref(), nvidia_smi_caps().as_deref())?;
    let nvidia = install(cudnn, cupti)?;
    let root = link_root(&nvidia, cudnn)?;
    let w = nvidia.join("cu13");
    let mut vars = vec![
        EnvVar::prepend("PATH", w.join("bin").display()),
        EnvVar::set("CUDA_HOME", w.display()),
        EnvVar::set("CUDA_ROOT", root.display()),
        EnvVar { note: Some(from.into()), ..EnvVar::set("CUDA_COMPUTE_CAP", cap) },
        EnvVar::set("CUDARC_CUDA_VERSION", "13000"),
        EnvVar::prepend(
            "LIBRARY_PATH",
            format!("{}:{}", root.join("lib").display(), root.join("lib/stubs").display()),
        ),
    ];
    // What the binary loads at start-up (cuBLAS, cuRAND, NVRTC, the runtime, cuDNN): linked by
    // name, found through the loader's path, so the shell (or the run) that starts the binary
    // needs it too. The driver's libcuda.so.1 comes with the NVIDIA driver.
    let mut runtime = vec![w.join("lib")];
    if cudnn {
        runtime.push(nvidia.join("cudnn/lib"));
    }
    let runtime: Vec<String> = runtime.iter().map(|p| p.display().to_string()).collect();
    vars.push(EnvVar {
        note: Some("for running the binary: cuBLAS, NVRTC, ... of the wheels".into()),
        ..EnvVar::prepend("LD_LIBRARY_PATH", runtime.join(":"))
    });
    if cudnn {
        vars.push(EnvVar::set("CUDNN_LIB", root.display()));
    }
    if cupti {
        // The tracer's build reads these (scripts/gpu-pack.sh).
        vars.push(EnvVar::set("GLIP_CUPTI", w.display()));
    }
    Ok(vars)
}

/// Prints the environment for a CUDA build.
pub fn run(cudnn: bool, cupti: bool, cap_flag: Option<&str>) -> Result<()> {
    if let Some(why) = driver_too_old(driver_cuda_version()) {
        eprintln!("cuda-env: warning: {why} (a binary built here runs only on another machine)");
    }
    for v in environment(cudnn, cupti, cap_flag)? {
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

    #[test]
    fn a_driver_older_than_the_toolkit_is_named() {
        let header =
            "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |";
        assert_eq!(parse_driver_cuda(header), Some((12, 4)));
        let why = driver_too_old(parse_driver_cuda(header)).expect("12.4 < 13.0");
        assert!(why.contains("runs CUDA 12.4") && why.contains("CUDA 13.0 or newer"), "{why}");
        for ok in ["CUDA Version: 13.0", "CUDA Version: 13.1 |", "CUDA Version: 14.0"] {
            assert_eq!(driver_too_old(parse_driver_cuda(ok)), None, "{ok}");
        }
        for unknown in ["", "NVIDIA-SMI has failed", "CUDA Version: N/A"] {
            assert_eq!(parse_driver_cuda(unknown), None, "{unknown:?}");
        }
        assert_eq!(driver_too_old(None), None, "no nvidia-smi: nothing to say");
    }

    #[test]
    fn compute_capabilities_parse_in_each_spelling() {
        for (text, want) in [("90", 90), ("8.6", 86), ("sm_89", 89), (" 9.0\n", 90), ("12.0", 120)]
        {
            assert_eq!(parse_cap(text).unwrap(), want, "{text:?}");
        }
        for bad in ["", "9", "nine", "9.", ".9", "8.65", "sm_", "-80"] {
            let err = format!("{:#}", parse_cap(bad).unwrap_err());
            assert!(err.contains("not a compute capability"), "{bad:?}: {err}");
        }
        let err = format!("{:#}", parse_cap("7.0").unwrap_err());
        assert!(err.contains("7.0 is older than CUDA 13.0 supports (7.5"), "{err}");
    }

    #[test]
    fn the_flag_then_the_environment_then_nvidia_smi_then_the_lent_gpus() {
        let smi = Some("9.0\n8.6\n");
        assert_eq!(compute_cap(Some("80"), Some("89"), smi).unwrap(), (80, "--compute-cap"));
        assert_eq!(compute_cap(None, Some("89"), smi).unwrap(), (89, "$CUDA_COMPUTE_CAP"));
        assert_eq!(compute_cap(None, Some(" "), smi).unwrap(), (86, "nvidia-smi"), "the lowest");
        assert_eq!(compute_cap(None, None, Some("\n")).unwrap().0, DEFAULT_CAP);
        assert_eq!(compute_cap(None, None, None).unwrap().0, DEFAULT_CAP);
        for (flag, env, smi, named) in [
            (Some("x"), None, None, "--compute-cap"),
            (None, Some("6.1"), None, "$CUDA_COMPUTE_CAP"),
            (None, None, Some("9.0\n[N/A]\n"), "nvidia-smi"),
        ] {
            let err = format!("{:#}", compute_cap(flag, env, smi).unwrap_err());
            assert!(err.starts_with(named), "{err}");
        }
    }
}
