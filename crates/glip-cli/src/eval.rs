//! `glip eval`: a trained run on its own validation data (the synthetic task's split, with AP
//! and the held-out pairs' AP50, or the COCO split it trained against, and the captions of
//! `data.val_grounding`), on a COCO folder (every image prompted with every category name), or
//! on ODVG captions (phrase grounding, Recall@k).

use anyhow::{anyhow, Result};
use clap::Args;
use glip_train::eval::COCO_STAT_NAMES;
use glip_train::infer::Detector;
use std::path::PathBuf;

/// `glip eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A run folder (`inference.json`, `tokenizer.json` and `checkpoint.safetensors`, as training
    /// writes them) or a checkpoint file in one (`best.safetensors`).
    #[arg(long)]
    run: PathBuf,
    /// COCO annotations to evaluate on instead of the run's validation data (the synthetic
    /// task's split, or the COCO split named in its config).
    #[arg(long, requires = "images", conflicts_with = "odvg")]
    coco: Option<PathBuf>,
    /// ODVG grounding records to evaluate phrase grounding on instead (each image grounded with
    /// its own caption: Recall@1, @5, @10 of its phrases).
    #[arg(long, requires = "images")]
    odvg: Option<PathBuf>,
    /// The images folder of `--coco` or `--odvg`.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also print AP and AP50 per category (in the JSON: `per_category`, always).
    #[arg(long)]
    per_category: bool,
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
    // What to evaluate on: a COCO folder, ODVG captions, or the run's own validation data.
    let mut run_cfg = None;
    let (data, captions) = match (&a.coco, &a.odvg, &a.images) {
        (Some(ann), None, Some(images)) => {
            (Some(EvalData::Coco(ann.clone(), images.clone())), None)
        }
        (None, Some(odvg), Some(images)) => (None, Some((odvg.clone(), images.clone()))),
        (None, None, Some(_)) => {
            return Err(anyhow!("--images names the images of --coco or --odvg: give one of them"))
        }
        _ => {
            // The run's own evaluation data, as its config says: the COCO validation split it
            // trained against, or the synthetic task's, and its captions (`data.val_grounding`).
            let dir = if a.run.is_dir() { a.run.clone() } else { a.run.with_file_name("") };
            let cfg_path = dir.join("config.resolved.toml");
            let cfg = glip_train::experiment::load_config(&cfg_path).map_err(|e| {
                anyhow!("{e} (the run's validation data is named there; give --coco and --images to evaluate on a COCO folder)")
            })?;
            let data = cfg.eval_data()?;
            if let EvalData::Coco(ann, _) = &data {
                eprintln!("evaluating on {} (the run's validation split)", ann.display());
            }
            let captions = cfg.data.val_grounding.clone().map(|g| (g.odvg, g.images));
            run_cfg = Some(cfg);
            (Some(data), captions)
        }
    };
    // One bf16 scope for the whole evaluation: each convolution's weight is packed once.
    let (ev, caption) = glip_train::autocast(det.precision, || -> Result<_> {
        let ev = match &data {
            Some(EvalData::Coco(ann, images)) => {
                let mut ev = p.evaluate_coco_folder(ann, images, &det.spec.post, |i, n| {
                    eprintln!("{i}/{n} images");
                })?;
                // The run's held-out categories (`data.coco.held_out`), on its own split.
                if let Some(cfg) = &run_cfg {
                    ev.heldout_ap50 = cfg.heldout_ap50(&ev.coco);
                }
                Some(ev)
            }
            Some(EvalData::Shapes(ds, n)) => {
                let scratch =
                    std::env::temp_dir().join(format!("glip-eval-{}", std::process::id()));
                let r = glip_train::infer::evaluate_shapes(&p, ds, *n, &scratch);
                std::fs::remove_dir_all(&scratch).ok();
                Some(r?)
            }
            None => None,
        };
        let caption = match &captions {
            Some((odvg, images)) => {
                eprintln!("grounding the captions of {}", odvg.display());
                Some(p.evaluate_grounding(odvg, images, &det.spec.post, |i, n| {
                    eprintln!("{i}/{n} captions");
                })?)
            }
            None => None,
        };
        Ok((ev, caption))
    })?;
    crate::report_graphs(graphs.as_ref());
    let mut obj = serde_json::Map::new();
    if let Some(ev) = &ev {
        for n in COCO_STAT_NAMES {
            obj.insert(n.to_string(), serde_json::json!(ev.coco.get(n)));
        }
        if ev.heldout_ap50 >= 0.0 {
            obj.insert("heldout_AP50".into(), serde_json::json!(ev.heldout_ap50));
        }
        for (k, r) in glip_train::infer::RECALL_KS.iter().zip(ev.recall) {
            obj.insert(format!("R@{k}"), serde_json::json!(r));
        }
    }
    if let Some(c) = &caption {
        for (k, r) in glip_train::infer::RECALL_KS.iter().zip(c.recall) {
            obj.insert(format!("caption_R@{k}"), serde_json::json!(r));
        }
        obj.insert("caption_phrases".into(), serde_json::json!(c.phrases));
        obj.insert("captions".into(), serde_json::json!(c.captions));
    }
    // The run's held-out categories, marked in the per-category table and JSON when it is
    // evaluated on its own data.
    let held_out = run_cfg.as_ref().map_or(&[][..], |c| c.held_out());
    if a.json {
        if let Some(ev) = &ev {
            let cats: Vec<serde_json::Value> = ev
                .coco
                .per_category()
                .into_iter()
                .map(|(id, name, ap, ap50)| {
                    let h = held_out.iter().any(|h| h == name);
                    serde_json::json!({"id": id, "name": name, "AP": ap, "AP50": ap50, "held_out": h})
                })
                .collect();
            obj.insert("per_category".into(), cats.into());
        }
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for (k, v) in &obj {
            match v.as_u64() {
                Some(count) => println!("{k:>15} {count}"),
                None => println!("{k:>15} {:.4}", v.as_f64().unwrap_or(f64::NAN)),
            }
        }
        if let Some(ev) = ev.as_ref().filter(|_| a.per_category) {
            println!();
            print!("{}", crate::report::per_category_table(&ev.coco, held_out));
        }
    }
    Ok(())
}
