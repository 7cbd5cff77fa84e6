//! `glip eval`: a trained run on its own validation data (the synthetic task's split, with AP
//! and the held-out pairs' AP50, or the COCO split it trained against), or on a COCO folder
//! (every image prompted with every category name).

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
    /// COCO annotations to evaluate on instead of the run's validation data (the synthetic
    /// task's split, or the COCO split named in its config).
    #[arg(long, requires = "images")]
    coco: Option<PathBuf>,
    /// The COCO images folder.
    #[arg(long, requires = "coco")]
    images: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    compute: crate::Compute,
    /// On CUDA, replay passes as CUDA graphs: a pass whose batch shape, padding and prompt were
    /// seen before is recorded (second time) and then replayed in one launch. Pays off when
    /// images share a size; a summary goes to stderr. No effect on the CPU.
    #[arg(long)]
    cuda_graph: bool,
}

/// Runs `glip eval`.
pub fn run(registry: &glip_train::config::Registry, a: EvalArgs) -> Result<()> {
    let (dev, precision) = a.compute.resolve()?;
    let mut det = Detector::load_with(registry, &a.run, &dev)?;
    det.precision = precision;
    let graphs = crate::graphs_on(a.cuda_graph, &dev);
    let p = glip_train::infer::Predictor { graphs: graphs.as_ref(), ..det.predictor() };
    use glip_train::experiment::EvalData;
    let data = match (&a.coco, &a.images) {
        (Some(ann), Some(images)) => EvalData::Coco(ann.clone(), images.clone()),
        _ => {
            // The run's own evaluation data, as its config says: the COCO validation split it
            // trained against, or the synthetic task's.
            let dir = if a.run.is_dir() { a.run.clone() } else { a.run.with_file_name("") };
            let cfg_path = dir.join("config.resolved.toml");
            let cfg = glip_train::experiment::load_config(&cfg_path).map_err(|e| {
                anyhow!("{e} (the run's validation data is named there; give --coco and --images to evaluate on a COCO folder)")
            })?;
            let data = cfg.eval_data()?;
            if let EvalData::Coco(ann, _) = &data {
                eprintln!("evaluating on {} (the run's validation split)", ann.display());
            }
            data
        }
    };
    // One bf16 scope for the whole evaluation: each convolution's weight is packed once.
    let ev = glip_train::autocast(det.precision, || -> Result<_> {
        Ok(match &data {
            EvalData::Coco(ann, images) => {
                p.evaluate_coco_folder(ann, images, &det.spec.post, |i, n| {
                    eprintln!("{i}/{n} images");
                })?
            }
            EvalData::Shapes(ds, n) => {
                let scratch =
                    std::env::temp_dir().join(format!("glip-eval-{}", std::process::id()));
                let r = glip_train::infer::evaluate_shapes(&p, ds, *n, &scratch);
                std::fs::remove_dir_all(&scratch).ok();
                r?
            }
        })
    })?;
    crate::report_graphs(graphs.as_ref());
    let mut obj: serde_json::Map<String, serde_json::Value> = COCO_STAT_NAMES
        .iter()
        .map(|n| (n.to_string(), serde_json::json!(ev.coco.get(n))))
        .collect();
    if ev.heldout_ap50 >= 0.0 {
        obj.insert("heldout_AP50".into(), serde_json::json!(ev.heldout_ap50));
    }
    for (k, r) in glip_train::infer::RECALL_KS.iter().zip(ev.recall) {
        obj.insert(format!("R@{k}"), serde_json::json!(r));
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
