//! `glip train`: one experiment config, trained and evaluated.

use crate::progress::Reporter;
use crate::report;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use glip_train::config::Registry;
use glip_train::experiment::{
    apply_overrides, config_from_table, read_config_doc, resolve_paths_set, run_experiment_with,
    ExperimentConfig, ExperimentResult,
};
use std::path::PathBuf;

/// `glip train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Experiment config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Run folder (default `runs/<config name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the run folder's checkpoint.
    #[arg(long)]
    resume: bool,
    /// Override a config value: `--set run.steps=100` (TOML value syntax; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, value_parser = crate::parse_device)]
    device: Option<glip_train::device::DeviceSpec>,
}

/// Reads a config with command-line overrides: relative paths in the file resolve against its
/// folder, those in an override against the working directory (where the command was typed).
pub fn read_config(path: &std::path::Path, sets: &[String]) -> Result<ExperimentConfig> {
    let here = std::path::PathBuf::from(".");
    let sets: Vec<(String, PathBuf)> = sets.iter().map(|s| (s.clone(), here.clone())).collect();
    read_config_set(path, &sets)
}

/// [`read_config`] with each override's relative paths resolved against its own folder
/// (`glip_train::experiment::resolve_paths_set`).
pub fn read_config_set(
    path: &std::path::Path,
    sets: &[(String, PathBuf)],
) -> Result<ExperimentConfig> {
    let file = read_config_doc(path)?;
    file.to_config(path)?; // validates the file (and its bases) as written, naming the file
    let mut doc = file.doc.clone();
    let keys: Vec<String> = sets.iter().map(|(s, _)| s.clone()).collect();
    apply_overrides(&mut doc, &keys)?;
    let mut cfg = config_from_table(doc)
        .map_err(|e| anyhow!("{} with --set overrides: {e}", path.display()))?;
    let mut origins = file.origins();
    origins.extend_from_slice(sets);
    resolve_paths_set(&mut cfg, path.parent().unwrap_or(std::path::Path::new(".")), &origins);
    Ok(cfg)
}

/// Trains and evaluates one config into `dir`, then writes `results.md` and `curves.svg` beside
/// the run's `results.json`.
pub fn run_single(
    registry: &Registry,
    cfg: &ExperimentConfig,
    dir: &std::path::Path,
    resume: bool,
    label: &str,
) -> Result<ExperimentResult> {
    crate::check_out_folder(dir, "a run's files")?;
    eprintln!(
        "{}training into {}",
        if label.is_empty() { String::new() } else { format!("[{label}] ") },
        dir.display()
    );
    let mut reporter = Reporter::new(label);
    let r = run_experiment_with(registry, cfg, dir, resume, &mut reporter)?;
    drop(reporter);
    report::write_run_markdown(dir, &r)?;
    report::plot_run(dir, &r)?;
    Ok(r)
}

/// The default run folder of a config: `runs/<name or file stem>`.
pub fn default_dir(cfg: &ExperimentConfig, path: &std::path::Path) -> PathBuf {
    let name = if cfg.name.is_empty() {
        path.file_stem().unwrap_or_default().to_string_lossy().to_string()
    } else {
        cfg.name.clone()
    };
    PathBuf::from("runs").join(name)
}

/// One line of JSON with the final numbers (what scripts read).
pub fn summary_line(r: &ExperimentResult) -> serde_json::Value {
    let last = r.last();
    serde_json::json!({
        "name": r.name,
        "val": {"AP": last.map(|p| p.val.get("AP")), "AP50": last.map(|p| p.val.get("AP50"))},
        "heldout": {"AP50": last.map(|p| p.heldout_ap50)},
        "steps": r.steps,
        "wall_s": r.wall_s,
    })
}

/// How a config's errors name it: its file, and the `--set` overrides where there are any (a
/// value that came from an override is not in the file).
pub fn config_origin(path: &std::path::Path, sets: &[String]) -> String {
    if sets.is_empty() {
        path.display().to_string()
    } else {
        format!("{} with --set overrides", path.display())
    }
}

/// Runs `glip train`.
pub fn run(registry: &Registry, a: TrainArgs) -> Result<()> {
    let mut cfg = read_config(&a.config, &a.sets)?;
    cfg.run.device = cfg.run.device.or(a.device);
    cfg.check(registry).with_context(|| config_origin(&a.config, &a.sets))?;
    let dir = a.out.unwrap_or_else(|| default_dir(&cfg, &a.config));
    let r = run_single(registry, &cfg, &dir, a.resume, "")?;
    println!("{}", summary_line(&r));
    Ok(())
}
