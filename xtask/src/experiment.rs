//! `cargo xtask experiment [CONFIG] [--set key.path=value ...] [--out DIR] [--resume]
//! [--bin NAME]`: builds `glip` (or another binary of the workspace built on
//! `glip_cli::main_with`, such as the example's `custom-glip`) in release mode and runs its
//! `experiment` on CONFIG, by default the shapes task of `configs/shapes.toml` (embedded data,
//! no download). Build and run times are printed apart.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
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
    /// The binary to build and run: `glip`, or a workspace binary built on
    /// `glip_cli::main_with` with your own components (e.g. `custom-glip` of
    /// examples/custom-loss).
    #[arg(long, default_value = "glip")]
    bin: String,
}

/// Runs the experiment.
pub fn run(a: Args) -> Result<()> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t0 = Instant::now();
    let status = Command::new(&cargo)
        .args(["build", "--release", "--bin", &a.bin])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release --bin {} failed", a.bin);
    }
    let build_s = t0.elapsed().as_secs_f64();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let glip = target.join("release").join(format!("{}{}", a.bin, std::env::consts::EXE_SUFFIX));
    let config = a.config.unwrap_or_else(|| root.join("configs").join("shapes.toml"));
    let mut cmd = Command::new(&glip);
    cmd.arg("experiment").arg(&config);
    for s in &a.sets {
        cmd.arg("--set").arg(s);
    }
    if let Some(o) = &a.out {
        cmd.arg("--out").arg(o);
    }
    if a.resume {
        cmd.arg("--resume");
    }
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
        bail!("{} experiment failed ({status})", a.bin);
    }
    Ok(())
}
