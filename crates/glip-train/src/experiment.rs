//! A whole run from one TOML file: model, data, loss, optimiser, loop; training with periodic
//! evaluation on the validation split (COCO AP and the held-out pairs' AP50).

use crate::config::{ModelConfig, Registry};
use crate::infer::{evaluate_shapes, model_from_weights, Predictor};
pub use crate::results::{EvalPoint, ExperimentResult, Progress};
pub use crate::run_config::{
    apply_overrides, config_from_table, load_config, read_config_doc, resolve_paths,
    resolve_paths_set, CocoDataConfig, ConfigDoc, DataConfig, EvalData, ExperimentConfig,
    MixSource, OdvgDataConfig, RunConfig, MAX_BASE_DEPTH,
};
use crate::trainer::{LogLine, Trainer};
use crate::{write_atomic, Error, GlipModel};
use candle_core::Device;
use glip_data::{CocoDataset, Dataset, ErrorPolicy, Loader, OdvgDataset, ShapesDataset, Split};
use std::path::Path;
use std::sync::Arc;

/// A subset of a dataset (its first `n` samples).
struct Subset(Arc<dyn Dataset>, usize);

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.1.min(self.0.len())
    }
    fn categories(&self) -> &[String] {
        self.0.categories()
    }
    fn get(
        &self,
        i: usize,
        rng: &mut glip_core::rng::Rng,
    ) -> Result<glip_data::Sample, glip_data::DataError> {
        self.0.get(i, rng)
    }
}

/// Trains and evaluates with the built-in components; writes `dir/config.resolved.toml`,
/// `inference.json`, `tokenizer.json`, `log.jsonl`, `eval.jsonl`, checkpoints and
/// `results.json`.
pub fn run_experiment(
    cfg: &ExperimentConfig,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<ExperimentResult, Error> {
    run_experiment_with(&Registry::new(), cfg, dir, resume, progress)
}

/// Writes the criterion of `model`'s detector into `cfg` when the config names none, so that
/// the resolved config (`config.resolved.toml`, `glip inspect --resolved`) says it.
pub fn write_default_criterion(cfg: &mut ExperimentConfig, model: &GlipModel) -> Result<(), Error> {
    if cfg.loss.criterion.is_none() {
        let kind = model.detector.default_criterion();
        cfg.loss.criterion = Some(
            serde_json::from_value(serde_json::json!({ "type": kind }))
                .map_err(|e| Error::Config { key: "loss.criterion".into(), msg: e.to_string() })?,
        );
    }
    Ok(())
}

/// Keeps the lines of a JSON-lines file whose `step` is at most `step` (a resumed run
/// continues from its checkpoint: what was logged after it is logged again).
fn truncate_jsonl_after(path: &Path, step: u64) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// [`run_experiment`] with a registry that knows a researcher's own components (registered
/// with [`Registry::register_criterion`] and friends).
pub fn run_experiment_with(
    registry: &Registry,
    cfg: &ExperimentConfig,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<ExperimentResult, Error> {
    let wall = std::time::Instant::now();
    let mut cfg = cfg.clone();
    cfg.check(registry)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let (dev, note) = cfg.run.device.resolve_noted()?;
    let why = note.map(|why| format!(" ({why})")).unwrap_or_default();
    progress.message(&format!("device: {}{why}", crate::device::describe(&dev)));
    let varmap = candle_nn::VarMap::new();
    let model = registry.build_trainable(&cfg.model, &varmap, cfg.run.seed, &dev)?;
    let rule = cfg.model.freeze_rule();
    if !rule.is_empty() {
        let (mut frozen, mut all) = (0usize, 0usize);
        for (name, var) in crate::trainer::trainable_vars(&varmap) {
            let n = var.as_tensor().elem_count();
            all += n;
            frozen += if rule.frozen(&name) { n } else { 0 };
        }
        // Counted by name: a backbone's `freeze_at` or a text encoder's `frozen` come on top.
        progress.message(&format!(
            "model.freeze / model.trainable: {frozen} of the model's {all} parameters frozen, {} \
             not",
            all - frozen
        ));
    }
    if cfg.model.prompt_positions > 0 && !cfg.data.prompts.all_categories {
        progress.message(
            "warning: model.prompt_positions: the prompt offsets are per token position, and the \
             training prompts sample and shuffle each image's categories (data.prompts.\
             all_categories = false), so a position is no category: tuned alone, the offsets \
             learnt no new category on the synthetic task (docs/results, \"Freezing and prompt \
             tuning\"); GLIP tunes a fixed prompt: data.prompts.all_categories = true",
        );
    }
    write_default_criterion(&mut cfg, &model)?;
    let cfg = &cfg;
    let tok_path = cfg.model.tokenizer().ok_or_else(|| Error::Config {
        key: "model.text.tokenizer".into(),
        msg: "training needs a tokenizer".into(),
    })?;
    let tok = Arc::new(glip_text::Tokenizer::from_file(&tok_path)?);
    let caption_tok: Arc<dyn glip_core::prompt::CaptionTokenizer> = tok.clone();
    let (full, source) = training_data(cfg, caption_tok, progress)?;
    let eval_target = cfg.eval_data()?;
    check_eval_data(cfg, &eval_target, &tok)?;
    let resolved = toml::to_string(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    let n_train = cfg.data.train_subset.unwrap_or(full.len()).min(full.len());
    if n_train < cfg.data.batch_size {
        return Err(Error::Invalid(glip_core::validate::Problems(vec![
            glip_core::validate::Problem {
                key: "data.batch_size".into(),
                value: Some(cfg.data.batch_size.to_string()),
                rule: format!("must hold at most the {n_train} training images of {source}"),
            },
        ])));
    }
    let train: Arc<dyn Dataset> = Arc::new(Subset(full, n_train));
    let mut loader = Loader::new(train, tok.clone(), cfg.data.batch_size, dev.clone());
    loader.transforms = cfg.data.transforms.clone();
    loader.shuffle = true;
    loader.seed = cfg.run.seed;
    loader.prefetch = cfg.data.prefetch;
    let crit = registry.build_criterion(&cfg.loss, &cfg.model, &model, &dev)?;
    let spec = cfg.inference_spec(&model)?;
    let resolved_json = serde_json::to_value(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    let mut result = ExperimentResult {
        name: cfg.name.clone(),
        steps: 0,
        wall_s: 0.0,
        train_minutes: 0.0,
        evals: Vec::new(),
        held_out: cfg.held_out().to_vec(),
    };
    let total = cfg.run.train.steps;
    let eval_every = if cfg.run.eval_every == 0 { total } else { cfg.run.eval_every };
    let mut trained_s = 0f64;
    let mut step = 0u64;
    let progress = std::cell::RefCell::new(progress);
    let mut trainer = Trainer::new(
        &model,
        &varmap,
        crit.as_ref(),
        &loader,
        cfg.optim.clone(),
        cfg.run.train.clone(),
        dir,
        resolved_json,
        dev.clone(),
    )?;
    let (precision, why) = crate::resolve_precision(cfg.run.precision, &dev);
    if let Some(why) = why {
        eprintln!("warning: run.precision = \"{}\": {why}", cfg.run.precision);
    }
    trainer.precision = precision;
    glip_kernels::cuda::set_tf32(cfg.run.tf32 && dev.is_cuda());
    if cfg.run.deterministic {
        glip_kernels::cuda::set_deterministic(true);
    }
    // Evaluation runs the same weights without a backprop graph (detached views that follow
    // the optimiser's in-place updates).
    let eval_model = crate::infer::inference_model(registry, &cfg.model, &varmap, &dev)?;
    let eval_log = dir.join("eval.jsonl");
    if resume && dir.join("checkpoint.safetensors").exists() {
        trainer.resume()?;
        step = trainer.step();
        truncate_jsonl_after(&dir.join("log.jsonl"), step)?;
        truncate_jsonl_after(&eval_log, step)?;
        if let Ok(text) = std::fs::read_to_string(&eval_log) {
            result.evals = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            trained_s = result.evals.last().map_or(0.0, |p| p.train_minutes * 60.0);
        }
    }
    // The config, its data and (resumed) the checkpoint are good: only now does the run take
    // over the folder, so that a run refused for any of them leaves the folder as it was.
    if !resume {
        // A fresh run: nothing of an earlier run in the folder may pass for this one's (the
        // checkpoint is overwritten at the first save).
        for f in ["log.jsonl", "eval.jsonl", "best.safetensors", "best.json"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    write_atomic(&dir.join("config.resolved.toml"), resolved.as_bytes())?;
    spec.save(dir)?;
    // A run that `run.patience` stopped stays stopped when resumed, as a finished one does.
    let stopped = step < total && stalled(&result.evals, cfg.run.patience).is_some();
    if stopped {
        progress.borrow_mut().message(&format!(
            "step {step}: stopped there by run.patience, not resumed (raise it to train on)"
        ));
    }
    while step < total && !stopped {
        let target = (((step / eval_every) + 1) * eval_every).min(total);
        trainer.config.steps = target;
        progress.borrow_mut().segment(step, target, total);
        let t0 = std::time::Instant::now();
        trainer.deadline = cfg
            .run
            .time_budget_min
            .map(|b| t0 + std::time::Duration::from_secs_f64((b * 60.0 - trained_s).max(0.0)));
        trainer.on_log = Some(Box::new(|l: &LogLine| progress.borrow_mut().log(l)));
        trainer.on_step = Some(Box::new(|s, l| progress.borrow_mut().step(s, l)));
        let done = trainer.run();
        trainer.on_log = None;
        trainer.on_step = None;
        done?;
        trained_s += t0.elapsed().as_secs_f64();
        step = trainer.step();
        // With an EMA of the weights, evaluation (like detection) uses it.
        let ema_model = match cfg.optim.ema_decay {
            Some(_) => Some(ema_model(registry, &cfg.model, &varmap, &trainer, &dev)?),
            None => None,
        };
        let p = Predictor {
            model: ema_model.as_ref().unwrap_or(&eval_model),
            spec: &spec,
            tokenizer: &tok,
            device: &dev,
            precision,
            graphs: None,
        };
        // One scope for the evaluation: its weights do not change until it ends.
        let (ev, caption) = crate::autocast(precision, || -> Result<_, Error> {
            let ev = match &eval_target {
                EvalData::Shapes(ds, n) => evaluate_shapes(&p, ds, *n, dir)?,
                EvalData::Coco(ann, images) => {
                    let mut ev = p.evaluate_coco_folder(ann, images, &spec.post, |_, _| {})?;
                    ev.heldout_ap50 = cfg.heldout_ap50(&ev.coco);
                    ev
                }
            };
            let caption = match &cfg.data.val_grounding {
                Some(g) => Some(p.evaluate_grounding(&g.odvg, &g.images, &spec.post, |_, _| {})?),
                None => None,
            };
            Ok((ev, caption))
        })?;
        let p = EvalPoint {
            step,
            train_minutes: trained_s / 60.0,
            val: ev.coco,
            heldout_ap50: ev.heldout_ap50,
            recall: ev.recall,
            caption,
        };
        let caption = match &p.caption {
            Some(c) => format!(", caption R@1 {:.3}", c.recall[0]),
            None => String::new(),
        };
        // COCO's -1: no held-out pairs (`data.shapes.held_out = []`, or a COCO folder).
        let heldout = match p.heldout_ap50 {
            v if v >= 0.0 => format!(", held-out AP50 {v:.3}"),
            _ => String::new(),
        };
        progress.borrow_mut().message(&format!(
            "step {step}: val AP50 {:.3}, AP {:.3}{heldout}, R@1 {:.3}{caption} ({:.1} min of training)",
            p.val.get("AP50"),
            p.val.get("AP"),
            p.recall[0],
            p.train_minutes,
        ));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&eval_log)
            .map_err(|e| Error::file(&eval_log, e))?;
        use std::io::Write;
        writeln!(f, "{}", serde_json::to_string(&p).expect("json"))
            .map_err(|e| Error::file(&eval_log, e))?;
        result.evals.push(p);
        // The best evaluation so far is this one: keep its weights (a tie keeps the later).
        if let Some(b) = result.best().filter(|b| cfg.run.keep_best && b.step == step) {
            trainer.save_weights(&dir.join("best.safetensors"))?;
            let meta = serde_json::json!({
                "step": b.step,
                "train_minutes": b.train_minutes,
                "AP50": b.val.get("AP50"),
                "AP": b.val.get("AP"),
                "heldout_AP50": b.heldout_ap50,
                "ema": cfg.optim.ema_decay.is_some(),
            });
            let text = serde_json::to_string_pretty(&meta).expect("json");
            write_atomic(&dir.join("best.json"), text.as_bytes())?;
        }
        if let Some(n) = stalled(&result.evals, cfg.run.patience) {
            let best = result.evals.iter().map(|p| p.val.get("AP50")).fold(f64::MIN, f64::max);
            progress.borrow_mut().message(&format!(
                "no better validation AP50 than {best:.3} in {n} evaluations (run.patience): stopped at step {step}"
            ));
            break;
        }
        if let Some(b) = cfg.run.time_budget_min.filter(|&b| trained_s / 60.0 >= b) {
            progress.borrow_mut().message(&format!("time budget ({b} min) reached at step {step}"));
            break;
        }
    }
    result.steps = step;
    result.train_minutes = trained_s / 60.0;
    result.wall_s = wall.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&result.to_json()).expect("json");
    write_atomic(&dir.join("results.json"), json.as_bytes())?;
    Ok(result)
}

/// `Some(patience)` when the last `patience` evaluations (0: never) each failed to raise the
/// best validation AP50 of those before them; ties do not raise it.
fn stalled(evals: &[EvalPoint], patience: u64) -> Option<u64> {
    let n = usize::try_from(patience).ok().filter(|&n| n > 0 && evals.len() > n)?;
    let (before, last) = evals.split_at(evals.len() - n);
    let best = before.iter().map(|p| p.val.get("AP50")).fold(f64::MIN, f64::max);
    last.iter().all(|p| p.val.get("AP50") <= best).then_some(patience)
}

/// The training images of `cfg` (a COCO folder, ODVG records or the synthetic task), prompted
/// through `tok`, and how to name them in a message.
fn training_data(
    cfg: &ExperimentConfig,
    tok: Arc<dyn glip_core::prompt::CaptionTokenizer>,
    progress: &mut dyn Progress,
) -> Result<(Arc<dyn Dataset>, String), Error> {
    let (main, source) = main_training_data(cfg, tok.clone(), progress)?;
    if cfg.data.mix.is_empty() {
        return Ok((main, source));
    }
    let main_len = main.len();
    let mut parts = vec![(main, 1)];
    let mut sizes = vec![format!("{main_len} from {source}")];
    // What the run holds out of training, a mixed-in source's detection records leave out.
    let held_out = cfg.held_out();
    for m in &cfg.data.mix {
        let (ds, file): (Arc<dyn Dataset>, &Path) = match (&m.odvg, &m.coco) {
            (Some(odvg), _) => {
                let ds = odvg_training_data(OdvgFiles::mix(odvg, m), cfg, tok.clone(), progress)?;
                (Arc::new(ds.without_any_of(held_out)), odvg)
            }
            (None, Some(ann)) => {
                let files = (&**ann, &*m.images, m.skip_bad_records);
                let ds = coco_training_data(files, held_out, false, cfg, tok.clone(), progress)?;
                (Arc::new(ds), ann)
            }
            (None, None) => {
                return Err(Error::Config {
                    key: "data.mix".into(),
                    msg: "give `odvg` or `coco`".into(),
                })
            }
        };
        sizes.push(format!("{} x {} from {}", ds.len(), m.repeat, file.display()));
        parts.push((ds, m.repeat));
    }
    let all = glip_data::Concat::new(parts)?;
    progress.message(&format!("training on {} samples a pass: {}", all.len(), sizes.join(", ")));
    Ok((Arc::new(all), format!("{source} and data.mix")))
}

/// An ODVG training source's files (`data.odvg`'s or a `data.mix` entry's): the records, the
/// images folder, the label map, and whether bad records are skipped.
struct OdvgFiles<'a>(&'a Path, &'a Path, Option<&'a Path>, bool);

impl<'a> OdvgFiles<'a> {
    fn train(o: &'a crate::run_config::OdvgDataConfig) -> Self {
        Self(&o.train, &o.train_images, o.label_map.as_deref(), o.skip_bad_records)
    }

    fn mix(odvg: &'a Path, m: &'a crate::run_config::MixSource) -> Self {
        Self(odvg, &m.images, m.label_map.as_deref(), m.skip_bad_records)
    }
}

/// An ODVG source's records prompted and checked for training, its problems and record kinds
/// reported.
fn odvg_training_data(
    f: OdvgFiles<'_>,
    cfg: &ExperimentConfig,
    tok: Arc<dyn glip_core::prompt::CaptionTokenizer>,
    progress: &mut dyn Progress,
) -> Result<OdvgDataset, Error> {
    let OdvgFiles(records, images, label_map, skip) = f;
    let policy = if skip { ErrorPolicy::Skip } else { ErrorPolicy::Fail };
    let ds = OdvgDataset::open(records, images, label_map, policy)?
        .with_prompts(cfg.data.prompts.clone(), Some(tok))
        .check_captions(policy)?
        .without_missing_files(policy)?;
    if !ds.report.problems.is_empty() {
        progress.message(&ds.report.summary());
    }
    let (det, grounding) = ds.record_kinds();
    progress.message(&format!(
        "{}: {det} detection and {grounding} grounding records",
        records.display()
    ));
    Ok(ds)
}

/// A COCO file's images for training (annotations, images folder, whether bad records are
/// skipped): missing files looked for, the categories `held_out` names left out (a name the
/// file lacks is an error when `strict`: the run's own data, not a mixed-in source), prompted.
fn coco_training_data(
    (ann, images, skip): (&Path, &Path, bool),
    held_out: &[String],
    strict: bool,
    cfg: &ExperimentConfig,
    tok: Arc<dyn glip_core::prompt::CaptionTokenizer>,
    progress: &mut dyn Progress,
) -> Result<glip_data::CocoDataset, Error> {
    let policy = if skip { ErrorPolicy::Skip } else { ErrorPolicy::Fail };
    let ds = CocoDataset::open(ann, images, policy)?.without_missing_files(policy)?;
    let ds = if strict { ds.without_categories(held_out)? } else { ds.without_any_of(held_out) };
    if ds.categories.is_empty() {
        return Err(Error::file(
            ann,
            "no categories (or every one held out): prompts are made of category names, so there \
             is nothing to ground",
        ));
    }
    if !ds.report.problems.is_empty() {
        progress.message(&ds.report.summary());
    }
    Ok(ds.with_prompts(cfg.data.prompts.clone(), Some(tok)))
}

/// The training data of `data.coco`, `data.odvg` or the synthetic task, and its name.
fn main_training_data(
    cfg: &ExperimentConfig,
    tok: Arc<dyn glip_core::prompt::CaptionTokenizer>,
    progress: &mut dyn Progress,
) -> Result<(Arc<dyn Dataset>, String), Error> {
    if let Some(c) = &cfg.data.coco {
        let files = (&*c.train_annotations, &*c.train_images, c.skip_bad_records);
        let ds = coco_training_data(files, &c.held_out, true, cfg, tok, progress)?;
        return Ok((Arc::new(ds), c.train_annotations.display().to_string()));
    }
    if let Some(o) = &cfg.data.odvg {
        let ds = odvg_training_data(OdvgFiles::train(o), cfg, tok, progress)?
            .without_categories(&o.held_out)?;
        if !o.held_out.is_empty() && ds.categories().is_empty() && ds.record_kinds().1 == 0 {
            return Err(Error::file(
                &o.train,
                "data.odvg.held_out holds out every category of the label map, and there is no \
                 grounding record: nothing is left to ground",
            ));
        }
        return Ok((Arc::new(ds), o.train.display().to_string()));
    }
    let train = ShapesDataset::new(cfg.data.shapes.clone(), Split::Train)?
        .with_prompts(cfg.data.prompts.clone(), Some(tok));
    Ok((Arc::new(train), "the synthetic task".into()))
}

/// Reads the run's validation data once before training, as its evaluations will (the COCO
/// split's records and image files, the `data.val_grounding` captions against the tokenizer):
/// a fault in it stops the run now, not at its first evaluation `run.eval_every` steps later.
fn check_eval_data(
    cfg: &ExperimentConfig,
    target: &EvalData,
    tok: &glip_text::Tokenizer,
) -> Result<(), Error> {
    if let EvalData::Coco(ann, images) = target {
        CocoDataset::open(ann, images, ErrorPolicy::Fail)?
            .without_missing_files(ErrorPolicy::Fail)?;
        crate::eval::check_ground_truth(ann)?;
    }
    if let Some(g) = &cfg.data.val_grounding {
        crate::infer::grounding_records(&g.odvg, &g.images, tok)?;
    }
    Ok(())
}

/// The model with the optimizer's EMA of every parameter (batch-norm statistics as they are).
fn ema_model(
    registry: &Registry,
    cfg: &ModelConfig,
    varmap: &candle_nn::VarMap,
    trainer: &Trainer<'_>,
    dev: &Device,
) -> Result<GlipModel, Error> {
    let mut weights: std::collections::HashMap<String, candle_core::Tensor> =
        crate::trainer::named_vars(varmap)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
    weights.extend(trainer.optimizer.ema()?);
    model_from_weights(registry, cfg, weights, dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evals(ap50: &[f64]) -> Vec<EvalPoint> {
        let val = |v: f64| crate::eval::CocoMetrics {
            stats: [("AP50".to_string(), v)].into_iter().collect(),
            per_category_ap: Default::default(),
            per_category_ap50: Default::default(),
            category_names: Default::default(),
        };
        ap50.iter()
            .enumerate()
            .map(|(i, &v)| EvalPoint {
                step: i as u64 + 1,
                train_minutes: 0.0,
                val: val(v),
                heldout_ap50: -1.0,
                recall: [0.0; 3],
                caption: None,
            })
            .collect()
    }

    /// `run.patience`: stop after that many evaluations in a row without a higher AP50 than
    /// every one before them; an equal one is no higher; the first evaluation always counts
    /// as one that raised it; 0 never stops.
    #[test]
    fn patience_counts_evaluations_that_did_not_raise_the_best() {
        assert_eq!(stalled(&evals(&[0.1, 0.3, 0.2, 0.25]), 2), Some(2));
        assert_eq!(stalled(&evals(&[0.1, 0.3, 0.2, 0.3]), 2), Some(2), "a tie is not a rise");
        assert_eq!(stalled(&evals(&[0.1, 0.3, 0.2, 0.31]), 2), None);
        assert_eq!(stalled(&evals(&[0.1, 0.3, 0.4, 0.2]), 2), None, "0.4 rose within the two");
        assert_eq!(stalled(&evals(&[0.1, 0.1]), 2), None, "no evaluation before the two");
        assert_eq!(stalled(&evals(&[0.0, 0.0, 0.0]), 2), Some(2));
        assert_eq!(stalled(&evals(&[0.5, 0.1, 0.1, 0.1]), 0), None);
    }
}
