//! `glip experiment`: one config, or an ablation file (a base config and a grid of overrides)
//! whose every cell is trained and evaluated, then compared in one table and one plot.
//!
//! An ablation file:
//!
//! ```toml
//! [ablation]
//! name = "query-generator"
//! base = "../shapes.toml"              # relative to this file
//! set = ["run.time_budget_min=4"]      # applied to every cell (optional)
//!
//! [ablation.grid]                      # the cartesian product of these values
//! "model.query_generator.type" = ["seed", "learned", "text-attend"]
//!
//! [[ablation.cells]]                   # and/or explicit cells (optional)
//! name = "text-attend-8-heads"
//! set = ['model.query_generator={type="text-attend", heads=8}']
//! ```
//!
//! `seeds = [0, 1, 2]` in `[ablation]` runs every cell once per seed (`run.seed`: the model's
//! initial weights, the order of the data, the dropout masks), into `<cell>/seed-<k>`; the table
//! gives each cell's mean and standard deviation over them.

use crate::report::{self, Cell};
use crate::train::{
    config_origin, default_dir, read_config, read_config_set, run_single, summary_line,
};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use glip_train::config::Registry;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `glip experiment`.
#[derive(Args, Debug)]
pub struct ExperimentArgs {
    /// An experiment config, or an ablation file (with an `[ablation]` table).
    config: PathBuf,
    /// Override a value of the config (of every cell, for an ablation): `key.path=value`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Output folder (default `runs/<name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue runs (cells) from their checkpoints; finished cells are read back, not rerun.
    #[arg(long)]
    resume: bool,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, value_parser = crate::parse_device)]
    device: Option<glip_train::device::DeviceSpec>,
    /// Run the config (every cell of an ablation, in place of its `seeds`) once with each of
    /// these `run.seed`s, `--seeds 0,1,2`, into `seed-<k>` folders, and tabulate the mean and
    /// standard deviation over them (`ablation.md`).
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
}

/// The `[ablation]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ablation {
    #[serde(default)]
    name: String,
    base: PathBuf,
    #[serde(default)]
    set: Vec<String>,
    #[serde(default)]
    grid: toml::Table,
    #[serde(default)]
    cells: Vec<ExplicitCell>,
    /// Run every cell once with each of these `run.seed`s (default: once, with the config's).
    #[serde(default)]
    seeds: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplicitCell {
    name: String,
    #[serde(default)]
    set: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AblationFile {
    ablation: Ablation,
}

/// A short, folder-safe name for one grid value.
fn value_name(v: &toml::Value) -> String {
    let raw = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Table(t) => match t.get("type") {
            Some(toml::Value::String(s)) => {
                let rest: Vec<String> = t
                    .iter()
                    .filter(|(k, _)| k.as_str() != "type")
                    .map(|(_, v)| value_name(v))
                    .collect();
                std::iter::once(s.clone()).chain(rest).collect::<Vec<_>>().join("-")
            }
            _ => v.to_string(),
        },
        other => other.to_string(),
    };
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect()
}

/// Every cell of the grid (cartesian product, in file order) followed by the explicit cells.
fn expand(ab: &Ablation) -> Result<Vec<(String, Vec<String>)>> {
    let mut cells: Vec<(Vec<String>, Vec<String>)> = vec![(Vec::new(), Vec::new())];
    for (key, values) in &ab.grid {
        let toml::Value::Array(values) = values else {
            bail!("ablation.grid.{key:?}: expected a list of values")
        };
        if values.is_empty() {
            bail!("ablation.grid.{key:?}: no values");
        }
        cells = cells
            .into_iter()
            .flat_map(|(names, sets)| {
                values.iter().map(move |v| {
                    let mut n = names.clone();
                    n.push(value_name(v));
                    let mut s = sets.clone();
                    s.push(format!("{key}={v}"));
                    (n, s)
                })
            })
            .collect();
    }
    let mut out: Vec<(String, Vec<String>)> = if ab.grid.is_empty() {
        Vec::new()
    } else {
        cells.into_iter().map(|(n, s)| (n.join("_"), s)).collect()
    };
    for c in &ab.cells {
        out.push((c.name.clone(), c.set.clone()));
    }
    if out.is_empty() {
        bail!("the ablation has no cells: give [ablation.grid] or [[ablation.cells]]");
    }
    let mut seen = std::collections::HashSet::new();
    for (n, _) in &out {
        if !seen.insert(n) {
            bail!("two ablation cells are both named {n:?}");
        }
    }
    Ok(out)
}

/// An ablation cell's overrides, each with the folder its relative paths resolve against: the
/// ablation file's for the file's `set`s (common and the cell's), the working directory for the
/// command line's.
fn ablation_sets(
    file: &Path,
    common: &[String],
    cell: &[String],
    cli: &[String],
) -> Vec<(String, PathBuf)> {
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let in_file = common.iter().chain(cell).map(|s| (s.clone(), dir.clone()));
    in_file.chain(cli.iter().map(|s| (s.clone(), PathBuf::from(".")))).collect()
}

/// Runs `glip experiment`.
pub fn run(registry: &Registry, a: ExperimentArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.config).with_context(|| a.config.display().to_string())?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", a.config.display()))?;
    if !doc.contains_key("ablation") {
        let mut cfg = read_config(&a.config, &a.sets)?;
        cfg.run.device = cfg.run.device.or(a.device);
        cfg.check(registry).with_context(|| config_origin(&a.config, &a.sets))?;
        let dir = a.out.clone().unwrap_or_else(|| default_dir(&cfg, &a.config));
        if a.seeds.is_empty() {
            let r = run_single(registry, &cfg, &dir, a.resume, "")?;
            eprintln!("results: {}", dir.join("results.md").display());
            println!("{}", summary_line(&r));
            return Ok(());
        }
        // Over seeds: one cell, the config itself, its runs in `dir/seed-<k>`.
        let seeds = seeds(&a.seeds).context("--seeds")?;
        let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        let grid = Grid { base: &a.config, common: &[], cells: vec![(String::new(), Vec::new())] };
        return run_grid(registry, &a, &grid, &name, &seeds, &dir);
    }
    let ab: AblationFile = toml::from_str(&text).with_context(|| a.config.display().to_string())?;
    let ab = ab.ablation;
    let base = a.config.parent().unwrap_or(Path::new(".")).join(&ab.base);
    let cells = expand(&ab).with_context(|| a.config.display().to_string())?;
    let name = if ab.name.is_empty() {
        a.config.file_stem().unwrap_or_default().to_string_lossy().to_string()
    } else {
        ab.name.clone()
    };
    let dir = a.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&name));
    let seeds = match a.seeds.is_empty() {
        true => seeds(&ab.seeds).with_context(|| format!("{}: ablation", a.config.display()))?,
        false => seeds(&a.seeds).context("--seeds")?,
    };
    let grid = Grid { base: &base, common: &ab.set, cells };
    run_grid(registry, &a, &grid, &name, &seeds, &dir)
}

/// What an ablation runs: the base config, the overrides of every cell, and each cell's name
/// (empty: the base alone, its runs directly in the output folder) and overrides.
struct Grid<'a> {
    base: &'a Path,
    common: &'a [String],
    cells: Vec<(String, Vec<String>)>,
}

/// Runs every cell of `grid` once per seed into `dir` and writes the table and plot.
fn run_grid(
    registry: &Registry,
    a: &ExperimentArgs,
    grid: &Grid<'_>,
    name: &str,
    seeds: &[Option<u64>],
    dir: &Path,
) -> Result<()> {
    crate::check_out_folder(dir, "the runs of every cell and seed")?;
    let cells = &grid.cells;
    // Every run's config is read (and so checked) before the first one trains.
    let mut runs = Vec::with_capacity(cells.len() * seeds.len());
    for (cell, sets) in cells {
        for &seed in seeds {
            let mut all = ablation_sets(&a.config, grid.common, sets, &a.sets);
            // The seed last: it is what tells the runs of a cell apart.
            let (label, folder) = match seed {
                None => (cell.clone(), dir.join(cell)),
                Some(k) => {
                    all.push((format!("run.seed={k}"), PathBuf::from(".")));
                    let seed_dir = format!("seed-{k}");
                    match cell.as_str() {
                        "" => (seed_dir.clone(), dir.join(seed_dir)),
                        _ => (format!("{cell}/{seed_dir}"), dir.join(cell).join(seed_dir)),
                    }
                }
            };
            let mut cfg = read_config_set(grid.base, &all)
                .with_context(|| format!("ablation cell {label}"))?;
            cfg.check(registry).with_context(|| format!("ablation cell {label}"))?;
            cfg.run.device = cfg.run.device.or(a.device);
            cfg.name = format!("{name}/{label}");
            // A run of the config alone is named by the config in the table.
            let cell = if cell.is_empty() { name } else { cell.as_str() };
            runs.push((cell, sets, seed, label, folder, cfg));
        }
    }
    let alone = cells.len() == 1 && cells[0].0.is_empty();
    match seeds.len() {
        n if alone => eprintln!("{name}: {n} seeds into {}", dir.display()),
        1 => eprintln!("ablation {name}: {} cells into {}", cells.len(), dir.display()),
        n => eprintln!(
            "ablation {name}: {} cells x {n} seeds = {} runs into {}",
            cells.len(),
            runs.len(),
            dir.display()
        ),
    }
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (cell, sets, seed, label, folder, cfg) in &runs {
        match run_single(registry, cfg, folder, a.resume, label) {
            Ok(r) => {
                println!("{}", summary_line(&r));
                done.push(Cell {
                    name: cell.to_string(),
                    sets: sets.to_vec(),
                    seed: *seed,
                    result: r,
                });
            }
            Err(e) => {
                eprintln!("[{label}] failed: {}", crate::error_chain(&e));
                failed.push(label.clone());
            }
        }
        // The table and the plot are rewritten after every cell, so a long ablation can be
        // read while it runs.
        report::write_ablation(dir, name, &done)?;
    }
    eprintln!("table: {}", dir.join("ablation.md").display());
    if !failed.is_empty() {
        return Err(anyhow!(
            "{} of {} {} failed: {}",
            failed.len(),
            runs.len(),
            if seeds.len() == 1 { "cells" } else { "runs" },
            failed.join(", ")
        ));
    }
    Ok(())
}

/// The seeds each cell runs with (`[ablation] seeds` or `--seeds`): `None` once (the config's
/// own) when none are listed.
fn seeds(listed: &[u64]) -> Result<Vec<Option<u64>>> {
    if listed.is_empty() {
        return Ok(vec![None]);
    }
    for (i, s) in listed.iter().enumerate() {
        if listed[..i].contains(s) {
            bail!("seeds: {s} is listed twice (its runs would overwrite each other)");
        }
    }
    Ok(listed.iter().map(|&s| Some(s)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ablation(text: &str) -> Ablation {
        toml::from_str::<AblationFile>(text).unwrap().ablation
    }

    #[test]
    fn a_grid_expands_to_its_cartesian_product_in_file_order() {
        let ab = ablation(
            r#"
            [ablation]
            base = "b.toml"
            [ablation.grid]
            "loss.matcher" = ["ordered", "hungarian"]
            "model.head" = [{type = "token"}, {type = "class", num_classes = 20}]
            "#,
        );
        let cells = expand(&ab).unwrap();
        let names: Vec<&str> = cells.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            names,
            ["ordered_token", "ordered_class-20", "hungarian_token", "hungarian_class-20"]
        );
        assert_eq!(cells[1].1[0], r#"loss.matcher="ordered""#);
        let head: toml::Table =
            toml::from_str(&format!("v = {}", &cells[1].1[1]["model.head=".len()..])).unwrap();
        assert_eq!(head["v"]["num_classes"].as_integer(), Some(20));
    }

    #[test]
    fn seeds_run_each_cell_once_each_and_must_differ() {
        let base = "[ablation]\nbase = \"b.toml\"\n[ablation.grid]\n\"x.y\" = [1]\n";
        assert_eq!(seeds(&ablation(base).seeds).unwrap(), [None]);
        let two = ablation(&base.replace("[ablation.grid]", "seeds = [7, 0]\n[ablation.grid]"));
        assert_eq!(seeds(&two.seeds).unwrap(), [Some(7), Some(0)]);
        let twice =
            ablation(&base.replace("[ablation.grid]", "seeds = [1, 2, 1]\n[ablation.grid]"));
        let err = seeds(&twice.seeds).unwrap_err().to_string();
        assert!(err.contains("seeds: 1 is listed twice"), "{err}");
    }

    #[test]
    fn explicit_cells_follow_the_grid_and_names_must_differ() {
        let ab = ablation(
            r#"
            [ablation]
            base = "b.toml"
            [ablation.grid]
            "x.y" = [1, 2]
            [[ablation.cells]]
            name = "2"
            set = ["x.y=3"]
            "#,
        );
        let err = expand(&ab).unwrap_err().to_string();
        assert!(err.contains("both named \"2\""), "{err}");
    }

    /// Every ablation file shipped in configs/ablations expands, and every cell's config (base
    /// + overrides) reads as a valid experiment config and builds.
    #[test]
    fn the_shipped_ablations_expand_into_valid_configs() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/ablations");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let ab = toml::from_str::<AblationFile>(&text).unwrap().ablation;
            let base = dir.join(&ab.base);
            let cells = expand(&ab).unwrap();
            assert!(cells.len() >= 2, "{}", path.display());
            seeds(&ab.seeds).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            for (name, sets) in &cells {
                let all = ablation_sets(&path, &ab.set, sets, &[]);
                let cfg = read_config_set(&base, &all)
                    .unwrap_or_else(|e| panic!("{}: {name}: {e:#}", path.display()));
                // Component parameters are checked when the model is built.
                Registry::new()
                    .build_trainable(
                        &cfg.model,
                        &candle_nn::VarMap::new(),
                        0,
                        &candle_core::Device::Cpu,
                    )
                    .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
            }
            n += 1;
        }
        assert_eq!(
            n, 12,
            "design, query-generator, loss-head, fusion, accumulate, mix-captions, denoising, \
             grounding-decoder, deformable, feature-enhancer, sub-sentence, grounding-dino"
        );
    }

    #[test]
    fn an_empty_ablation_is_an_error() {
        let ab = ablation("[ablation]\nbase = \"b.toml\"\n");
        assert!(expand(&ab).unwrap_err().to_string().contains("no cells"));
    }
}
