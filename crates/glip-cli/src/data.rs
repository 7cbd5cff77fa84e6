//! `glip data ...`: validate datasets and export the synthetic task.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use glip_data::{
    CocoDataset, Dataset, ErrorPolicy, OdvgDataset, Problem, ShapesConfig, ShapesDataset, Split,
};
use std::path::PathBuf;

/// Dataset tools.
#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Validate a dataset: list every problem with its record; exit non-zero if there is any.
    Check(CheckArgs),
    /// Write the synthetic shapes task to disk (COCO json + PNG, and/or ODVG).
    ExportShapes(ExportArgs),
}

/// `glip data check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// A COCO detection json.
    #[arg(long, conflicts_with = "odvg")]
    coco: Option<PathBuf>,
    /// An ODVG jsonl file.
    #[arg(long)]
    odvg: Option<PathBuf>,
    /// The label map of the ODVG file's detection records.
    #[arg(long, requires = "odvg")]
    label_map: Option<PathBuf>,
    /// A tokenizer.json to check the ODVG file's captions with: each within the token budget,
    /// each phrase covering a token (as training checks them).
    #[arg(long, requires = "odvg")]
    tokenizer: Option<PathBuf>,
    /// The images folder.
    #[arg(long)]
    images: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Coco,
    Odvg,
    Both,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SplitArg {
    Train,
    Val,
    Both,
}

/// `glip data export-shapes`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Output folder (created); each split goes to `OUT/train`, `OUT/val`.
    #[arg(long)]
    out: PathBuf,
    /// Which splits.
    #[arg(long, value_enum, default_value = "both")]
    split: SplitArg,
    /// Which formats.
    #[arg(long, value_enum, default_value = "coco")]
    format: Format,
    /// ODVG as grounding records, the kind of data GLIP pre-trains on: per image a caption
    /// naming its objects ("a red circle left of a blue square") and each box's phrase in it,
    /// instead of detection records with a label map.
    #[arg(long)]
    grounding: bool,
    /// Training images.
    #[arg(long, default_value_t = 256, value_parser = crate::count(0, glip_core::validate::limits::IMAGES as u64))]
    train_images: usize,
    /// Validation images.
    #[arg(long, default_value_t = 64, value_parser = crate::count(0, glip_core::validate::limits::IMAGES as u64))]
    val_images: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(16..=glip_core::validate::limits::IMAGE_SIDE as i64))]
    size: u32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn report(problems: &[Problem], what: &str, records: usize) -> Result<()> {
    for p in problems {
        println!("{p}");
    }
    if problems.is_empty() {
        println!("{what}: {records} records, no problem found");
        Ok(())
    } else {
        bail!("{what}: {} problem(s) in {records} records", problems.len())
    }
}

/// Runs a `glip data` subcommand.
pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Check(a) => {
            if let Some(coco) = a.coco {
                let ds = CocoDataset::open(&coco, &a.images, ErrorPolicy::Skip)?;
                let mut problems = ds.report.problems.clone();
                problems.extend(ds.check_images());
                report(&problems, &coco.display().to_string(), ds.len())
            } else if let Some(odvg) = a.odvg {
                let mut ds =
                    OdvgDataset::open(&odvg, &a.images, a.label_map.as_deref(), ErrorPolicy::Skip)?;
                if let Some(t) = &a.tokenizer {
                    let tok = glip_text::Tokenizer::from_file(t)?;
                    let tok: std::sync::Arc<dyn glip_core::prompt::CaptionTokenizer> =
                        std::sync::Arc::new(tok);
                    ds = ds.with_prompts(Default::default(), Some(tok));
                    ds = ds.check_captions(ErrorPolicy::Skip)?;
                }
                let mut problems = ds.report.problems.clone();
                // Records left out count among those read (one or more problems each).
                let skipped: std::collections::HashSet<&str> =
                    problems.iter().map(|p| p.record.as_str()).collect();
                let records = ds.len() + skipped.len();
                problems.extend(ds.check_images());
                report(&problems, &odvg.display().to_string(), records)
            } else {
                bail!("give --coco GT.json or --odvg FILE.jsonl")
            }
        }
        DataCmd::ExportShapes(a) => {
            if a.grounding && a.format == Format::Coco {
                bail!("--grounding writes ODVG grounding records: add --format odvg (or both)");
            }
            let cfg = ShapesConfig {
                train_images: a.train_images,
                val_images: a.val_images,
                image_size: a.size,
                seed: a.seed,
                ..Default::default()
            };
            let splits: &[(Split, &str)] = match a.split {
                SplitArg::Train => &[(Split::Train, "train")],
                SplitArg::Val => &[(Split::Val, "val")],
                SplitArg::Both => &[(Split::Train, "train"), (Split::Val, "val")],
            };
            for &(split, name) in splits {
                let ds = ShapesDataset::new(cfg.clone(), split)?;
                let dir = a.out.join(name);
                if matches!(a.format, Format::Coco | Format::Both) {
                    ds.export_coco(&dir).with_context(|| format!("exporting {name} as COCO"))?;
                    println!(
                        "{name}: {} images as COCO in {}",
                        ds.len(),
                        dir.join("annotations.json").display()
                    );
                }
                if matches!(a.format, Format::Odvg | Format::Both) {
                    let (kind, r) = match a.grounding {
                        true => ("grounding", ds.export_odvg_grounding(&dir)),
                        false => ("detection", ds.export_odvg(&dir)),
                    };
                    r.with_context(|| format!("exporting {name} as ODVG"))?;
                    println!(
                        "{name}: {} images as ODVG {kind} records in {}",
                        ds.len(),
                        dir.join("odvg.jsonl").display()
                    );
                }
            }
            Ok(())
        }
    }
}
