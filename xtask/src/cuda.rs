//! `cargo xtask cuda-env [--cudnn]`: what building glip's `cuda` (or `cudnn`) feature needs on a
//! machine with no GPU and no CUDA install, from pinned PyPI wheels (CUDA 13.0, the lent
//! GPUs' driver): nvcc, nvvm, the runtime, cuBLAS, cuRAND, NVRTC (and cuDNN 9), in a venv in the
//! cache folder; a folder of unversioned `lib*.so` links and a stub `libcuda.so` (the real one
//! comes with the driver) to link against. Prints `export` lines for the build:
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

/// Prints the environment for a CUDA build.
pub fn run(cudnn: bool, cupti: bool) -> Result<()> {
    let nvidia = install(cudnn, cupti)?;
    let root = link_root(&nvidia, cudnn)?;
    let w = nvidia.join("cu13");
    println!("export PATH=\"{}:$PATH\"", w.join("bin").display());
    println!("export CUDA_HOME=\"{}\"", w.display());
    println!("export CUDA_ROOT=\"{}\"", root.display());
    println!("export CUDA_COMPUTE_CAP=90  # H100 / H200 (sm_90); no nvidia-smi here");
    println!("export CUDARC_CUDA_VERSION=13000");
    println!(
        "export LIBRARY_PATH=\"{}:{}${{LIBRARY_PATH:+:$LIBRARY_PATH}}\"",
        root.join("lib").display(),
        root.join("lib/stubs").display()
    );
    if cudnn {
        println!("export CUDNN_LIB=\"{}\"", root.display());
    }
    if cupti {
        // The tracer's build reads these (scripts/gpu-pack.sh).
        println!("export GLIP_CUPTI=\"{}\"", w.display());
    }
    eprintln!(
        "cuda-env: ready; eval these exports, then cargo build --release -p glip-cli --features {}",
        if cudnn { "cudnn" } else { "cuda" }
    );
    Ok(())
}
