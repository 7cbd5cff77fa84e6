//! `glip train`: one experiment config, trained and evaluated.

use anyhow::{anyhow, Result};
use clap::Args;
use glip_train::experiment::{load_config, resolve_paths, run_experiment, ExperimentConfig};
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
}

/// Applies `key.path=value` overrides to a TOML document.
pub fn apply_sets(doc: &mut toml::Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (key, value) =
            s.split_once('=').ok_or_else(|| anyhow!("--set {s:?}: expected key.path=value"))?;
        let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t.remove("v").expect("parsed"),
            Err(_) => toml::Value::String(value.to_string()),
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        let mut t = &mut *doc;
        for p in &parts[..parts.len() - 1] {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| anyhow!("--set {key}: {p} is not a table"))?;
        }
        t.insert(parts[parts.len() - 1].to_string(), value);
    }
    Ok(())
}

/// Reads a config with overrides, relative paths resolved against its folder.
pub fn read_config(path: &std::path::Path, sets: &[String]) -> Result<ExperimentConfig> {
    load_config(path).map_err(|e| anyhow!(e))?; // validates the file as written, naming it
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(path)?)?;
    apply_sets(&mut doc, sets)?;
    let mut cfg: ExperimentConfig = toml::Value::Table(doc)
        .try_into()
        .map_err(|e| anyhow!("{} with --set overrides: {e}", path.display()))?;
    resolve_paths(&mut cfg, path.parent().unwrap_or(std::path::Path::new(".")));
    Ok(cfg)
}

/// Runs `glip train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = read_config(&a.config, &a.sets)?;
    let name = if cfg.name.is_empty() {
        a.config.file_stem().unwrap_or_default().to_string_lossy().to_string()
    } else {
        cfg.name.clone()
    };
    let dir = a.out.unwrap_or_else(|| PathBuf::from("runs").join(name));
    eprintln!("training into {}", dir.display());
    let points =
        run_experiment(&cfg, &dir, a.resume, |m| eprintln!("{m}")).map_err(|e| anyhow!(e))?;
    if let Some(p) = points.last() {
        println!(
            "{}",
            serde_json::json!({"step": p.step, "val": {"AP": p.val.get("AP"), "AP50": p.val.get("AP50")}, "heldout": {"AP50": p.heldout_ap50}, "train_minutes": p.train_minutes})
        );
    }
    Ok(())
}
