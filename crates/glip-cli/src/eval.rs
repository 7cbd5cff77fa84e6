//! `glip eval`: a trained run on the synthetic validation split (AP and the held-out pairs'
//! AP50), or on a COCO folder (every image prompted with every category name).

use anyhow::{anyhow, Result};
use clap::Args;
use glip_train::eval::COCO_STAT_NAMES;
use glip_train::infer::Detector;
use std::path::PathBuf;

/// `glip eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A run folder (`config.resolved.toml` + `checkpoint.safetensors`) or a checkpoint file.
    #[arg(long)]
    run: PathBuf,
    /// COCO annotations to evaluate on instead of the synthetic validation split.
    #[arg(long, requires = "images")]
    coco: Option<PathBuf>,
    /// The COCO images folder.
    #[arg(long, requires = "coco")]
    images: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs `glip eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let det = Detector::load(&a.run, &dev).map_err(|e| anyhow!(e))?;
    let (metrics, heldout) = match (&a.coco, &a.images) {
        (Some(ann), Some(images)) => {
            let m = det
                .predictor()
                .evaluate_coco_folder(ann, images, &det.model.postprocess(), |i, n| {
                    if i % 50 == 0 || i == n {
                        eprintln!("{i}/{n} images");
                    }
                })
                .map_err(|e| anyhow!(e))?;
            (m, None)
        }
        _ => {
            let cfg = &det.config;
            let ds = glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val)?;
            let n = glip_data::Dataset::len(&ds);
            let scratch = std::env::temp_dir().join(format!("glip-eval-{}", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            let r = glip_train::experiment::evaluate_shapes(
                &det.model,
                &ds,
                n,
                &det.tokenizer,
                &cfg.model.head,
                &scratch,
            );
            std::fs::remove_dir_all(&scratch).ok();
            let (m, h) = r.map_err(|e| anyhow!(e))?;
            (m, Some(h))
        }
    };
    let mut obj: serde_json::Map<String, serde_json::Value> = COCO_STAT_NAMES
        .iter()
        .map(|n| (n.to_string(), serde_json::json!(metrics.get(n))))
        .collect();
    if let Some(h) = heldout {
        obj.insert("heldout_AP50".into(), serde_json::json!(h));
    }
    if a.json {
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for (k, v) in &obj {
            println!("{k:>13} {:.4}", v.as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok(())
}
