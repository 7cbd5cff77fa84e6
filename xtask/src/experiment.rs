//! `cargo xtask experiment [CONFIG] [--set key.path=value ...] [--out DIR] [--resume]
//! [--seeds 0,1,2] [--bin NAME] [--device D] [--cuda [--compute-cap N] [--toolkit T]]`:
//! builds `glip` (or another binary of the workspace built on `glip_cli::main_with`, such as
//! the example's `custom-glip`) in release mode and runs its `experiment` on CONFIG, by
//! default the shapes task of `configs/shapes.toml` (embedded data, no download). With
//! `--cuda` the binary is
//! built with CUDA and cuDNN from the pinned toolkit of `cargo xtask cuda-env` (into
//! `target/cuda`, beside the CPU build; with `--toolkit system`, the toolkit installed here, into
//! `target/cuda-12.4` for its version) and trains on the GPU. Build and run times are printed
//! apart.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::fixtures::workspace_root;

/// The arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An experiment config or an ablation file (default: configs/shapes.toml).
    config: Option<PathBuf>,
    /// Override a config value: `--set run.steps=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Output folder (default `runs/<name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from checkpoints.
    #[arg(long)]
    resume: bool,
    /// Run once per seed (`--seeds 0,1,2`), passed to `glip experiment --seeds`: the mean and
    /// standard deviation over them in `ablation.md`.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    /// The binary to build and run: `glip`, or a workspace binary built on
    /// `glip_cli::main_with` with your own components (e.g. `custom-glip` of
    /// examples/custom-loss).
    #[arg(long, default_value = "glip")]
    bin: String,
    /// Where to compute, passed to `glip experiment --device`: auto, cpu, cuda, cuda:N
    /// (default: the config's `run.device`; with --cuda, cuda).
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    #[command(flatten)]
    gpu: CudaBuild,
}

/// `--cuda [--compute-cap N] [--toolkit T]`: a build for the GPU (`experiment`,
/// `bench-vs-torch`).
#[derive(clap::Args, Debug)]
pub struct CudaBuild {
    /// Build with CUDA and cuDNN, from the pinned toolkit of `cargo xtask cuda-env --cudnn`
    /// (its wheels come from PyPI the first time), into `target/cuda`, and compute on the GPU.
    #[arg(long)]
    pub cuda: bool,
    /// With --cuda: the GPU's compute capability, as `cargo xtask cuda-env --compute-cap`
    /// (default: $CUDA_COMPUTE_CAP, else nvidia-smi's, else 9.0).
    #[arg(long, value_name = "N", requires = "cuda")]
    pub compute_cap: Option<String>,
    /// With --cuda: where the toolkit comes from, as `cargo xtask cuda-env --toolkit` (default:
    /// the pinned wheels; `system` for a driver older than CUDA 13.0).
    #[arg(long, value_enum, requires = "cuda")]
    pub toolkit: Option<crate::cuda::Source>,
}

impl CudaBuild {
    /// With `--cuda`, the toolkit's environment (`cargo xtask cuda-env --cudnn`) for a build
    /// whose binary runs on this machine: refused up front where the driver is too old to run
    /// it.
    pub fn environment(&self) -> Result<Option<crate::cuda::CudaEnv>> {
        if !self.cuda {
            return Ok(None);
        }
        let toolkit = crate::cuda::Toolkit::find(self.toolkit.unwrap_or_default())?;
        if let Some(why) = toolkit.driver_too_old(crate::cuda::driver_cuda_version()) {
            bail!("--cuda: {why}");
        }
        eprintln!("xtask: {}, as `cargo xtask cuda-env --cudnn`", toolkit.describe());
        crate::cuda::environment(&toolkit, true, false, self.compute_cap.as_deref()).map(Some)
    }
}

/// Runs the experiment.
pub fn run(a: Args) -> Result<()> {
    let root = workspace_root();
    let t0 = Instant::now();
    let cuda = a.gpu.environment()?;
    let glip = build(&root, &a.bin, cuda.as_ref())?;
    let build_s = t0.elapsed().as_secs_f64();
    let config = a.config.clone().unwrap_or_else(|| root.join("configs").join("shapes.toml"));
    let mut cmd = Command::new(&glip);
    cmd.args(experiment_args(&a, &config));
    // The binary loads the toolkit's libraries at start-up (LD_LIBRARY_PATH).
    set_env(&mut cmd, cuda.as_ref().map_or(&[], |c| &c.vars));
    eprintln!("xtask: {} experiment {} (build took {build_s:.0} s)", a.bin, config.display());
    let t1 = Instant::now();
    let status = cmd.status().with_context(|| format!("running {}", glip.display()))?;
    let run_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "xtask: build {:.1} min + experiment {:.1} min = {:.1} min",
        build_s / 60.0,
        run_s / 60.0,
        (build_s + run_s) / 60.0
    );
    if !status.success() {
        if a.gpu.cuda && status.code() == Some(127) {
            // The loader's exit status: a library it links was not found (said above).
            bail!(
                "{} could not start ({status}): the CUDA build needs the NVIDIA driver's \
                 libcuda.so.1 (`nvidia-smi` shows whether this machine has a driver and a GPU)",
                glip.display()
            );
        }
        bail!("{} experiment failed ({status})", a.bin);
    }
    Ok(())
}

/// Builds `bin` in release mode (given the CUDA toolkit's environment, with CUDA and cuDNN into
/// `target/cuda`: [`build_command`]) and returns the binary's path.
pub(crate) fn build(
    root: &Path,
    bin: &str,
    cuda: Option<&crate::cuda::CudaEnv>,
) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let (mut build, binary) = build_command(&cargo, root, &target, bin, cuda);
    if !build.status().context("running cargo build")?.success() {
        let args: Vec<_> = build.get_args().map(|s| s.to_string_lossy()).collect();
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(binary)
}

/// The `cargo build` of `bin` into `target`, or, given the CUDA toolkit's environment, with
/// CUDA and cuDNN into its folder under `target` (`cuda`: apart from the CPU build, as candle
/// built with CUDA would replace it at every switch); and the binary it makes.
fn build_command(
    cargo: &str,
    root: &Path,
    target: &Path,
    bin: &str,
    cuda: Option<&crate::cuda::CudaEnv>,
) -> (Command, PathBuf) {
    let mut build = Command::new(cargo);
    build.args(["build", "--release", "--bin", bin]).current_dir(root);
    let mut target = target.to_path_buf();
    if let Some(env) = cuda {
        set_env(&mut build, &env.vars);
        target = target.join(&env.target);
        build.args(["--features", "glip-cli/cudnn"]).env("CARGO_TARGET_DIR", &target);
    }
    let binary = target.join("release").join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    (build, binary)
}

/// Sets `vars` on `cmd`, each from its value in this process's environment.
pub(crate) fn set_env(cmd: &mut Command, vars: &[crate::cuda::EnvVar]) {
    for v in vars {
        cmd.env(v.name, v.resolved(std::env::var(v.name).ok().as_deref()));
    }
}

/// `glip experiment`'s arguments: `--cuda` computes on the GPU unless `--device` says otherwise.
fn experiment_args(a: &Args, config: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["experiment".into(), config.into()];
    for s in &a.sets {
        args.extend(["--set".into(), s.into()]);
    }
    if let Some(o) = &a.out {
        args.extend(["--out".into(), o.into()]);
    }
    if a.resume {
        args.push("--resume".into());
    }
    if !a.seeds.is_empty() {
        let list: Vec<String> = a.seeds.iter().map(u64::to_string).collect();
        args.extend(["--seeds".into(), list.join(",").into()]);
    }
    if let Some(d) = a.device.as_deref().or(a.gpu.cuda.then_some("cuda")) {
        args.extend(["--device".into(), d.into()]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(line: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("experiment").chain(line.iter().copied()))
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
            .args
    }

    fn strings(v: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>) -> Vec<String> {
        v.into_iter().map(|s| s.as_ref().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn cuda_trains_on_the_gpu_unless_the_device_is_named() {
        let c = Path::new("c.toml");
        let tail = |a: &Args| strings(experiment_args(a, c))[2..].join(" ");
        assert_eq!(tail(&args(&[])), "");
        assert_eq!(tail(&args(&["--cuda"])), "--device cuda");
        assert_eq!(tail(&args(&["--cuda", "--device", "cuda:1"])), "--device cuda:1");
        assert_eq!(tail(&args(&["--device", "cpu"])), "--device cpu");
        assert_eq!(
            tail(&args(&["--set", "run.steps=9", "--out", "o", "--resume", "--cuda"])),
            "--set run.steps=9 --out o --resume --device cuda"
        );
        assert_eq!(tail(&args(&["--seeds", "0,1,2"])), "--seeds 0,1,2");
        for flag in [["--compute-cap", "86"], ["--toolkit", "system"]] {
            let err = Cli::try_parse_from(["experiment", flag[0], flag[1]]).err().unwrap();
            assert!(err.to_string().contains("--cuda"), "{} needs --cuda: {err}", flag[0]);
        }
        let a = args(&["--cuda", "--toolkit", "system"]);
        assert_eq!(a.gpu.toolkit, Some(crate::cuda::Source::System));
        assert_eq!(args(&["--cuda"]).gpu.toolkit, None, "the pinned wheels");
    }

    #[test]
    fn the_cuda_build_has_its_own_target_folder_features_and_toolkit() {
        let (root, target) = (Path::new("/ws"), Path::new("/ws/target"));
        let (cpu, bin) = build_command("cargo", root, target, "glip", None);
        assert_eq!(strings(cpu.get_args()), ["build", "--release", "--bin", "glip"]);
        assert_eq!(cpu.get_envs().count(), 0);
        assert_eq!(
            bin,
            target.join("release").join(format!("glip{}", std::env::consts::EXE_SUFFIX))
        );

        let env = crate::cuda::CudaEnv {
            vars: vec![crate::cuda::EnvVar::set("CUDA_COMPUTE_CAP", "86")],
            target: "cuda-12.4".into(),
        };
        let (gpu, bin) = build_command("cargo", root, target, "custom-glip", Some(&env));
        assert_eq!(
            strings(gpu.get_args()),
            ["build", "--release", "--bin", "custom-glip", "--features", "glip-cli/cudnn"]
        );
        let envs: Vec<(String, String)> = gpu
            .get_envs()
            .map(|(k, v)| (strings([k]).remove(0), strings([v.unwrap()]).remove(0)))
            .collect();
        let cuda_target = target.join("cuda-12.4");
        assert!(envs.contains(&("CUDA_COMPUTE_CAP".into(), "86".into())), "{envs:?}");
        assert!(envs.contains(&("CARGO_TARGET_DIR".into(), cuda_target.display().to_string())));
        assert_eq!(bin.parent().unwrap(), cuda_target.join("release"));
    }
}
