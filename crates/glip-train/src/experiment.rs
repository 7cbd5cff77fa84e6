//! A whole run from one TOML file: model, data, loss, optimiser, loop; training with periodic
//! evaluation on the validation split (COCO AP and the held-out pairs' AP50).

use crate::config::{HeadConfig, ModelBuilder, ModelConfig};
use crate::eval::{evaluate_coco, CocoDetection, CocoMetrics};
use crate::optim::OptimConfig;
use crate::trainer::{LogLine, TrainConfig, Trainer};
use crate::GlipModel;
use candle_core::{Device, Tensor};
use glip_core::Criterion;
use glip_data::{
    CocoDataset, Dataset, ErrorPolicy, Loader, PromptConfig, ShapesConfig, ShapesDataset, Split,
    TransformConfig,
};
use glip_heads::postprocess::{class_scores, detections, token_scores};
use glip_loss::{
    DenseCriterion, DenseLossConfig, HungarianMatcher, LossConfig, OrderedMatcher, SetCriterion,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A COCO-format detection dataset on disk: train on one split, evaluate on the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocoDataConfig {
    /// Training annotations (COCO json).
    pub train_annotations: PathBuf,
    /// Training images folder.
    pub train_images: PathBuf,
    /// Validation annotations.
    pub val_annotations: PathBuf,
    /// Validation images folder.
    pub val_images: PathBuf,
    /// Skip (and count) bad records instead of stopping at the first. Default false.
    #[serde(default)]
    pub skip_bad_records: bool,
}

/// The data of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The synthetic task (the default, no files).
    #[serde(default)]
    pub shapes: ShapesConfig,
    /// A COCO folder instead of the synthetic task: every category name goes in the prompts,
    /// evaluation is COCO bbox AP on the validation annotations (no held-out pairs).
    #[serde(default)]
    pub coco: Option<CocoDataConfig>,
    /// Train on only the first this many training images (overfitting checks). Default all.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Evaluate on the training images instead of the validation split (overfitting checks).
    #[serde(default)]
    pub eval_on_train: bool,
    /// Training transforms.
    #[serde(default)]
    pub transforms: TransformConfig,
    /// Training prompts.
    #[serde(default)]
    pub prompts: PromptConfig,
    /// Images per batch. Default 8.
    #[serde(default = "eight")]
    pub batch_size: usize,
}

fn eight() -> usize {
    8
}

/// Which criterion, which matcher, and their weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriterionConfig {
    /// `set` (matched set prediction) or `dense` (FCOS/ATSS assignment for a dense head).
    /// Default: `dense` for `model.detector.type = "dense"`, `set` otherwise.
    #[serde(default)]
    pub criterion: Option<String>,
    /// `hungarian` (default) or `ordered` (the seed tutorial's pairing).
    #[serde(default = "hungarian")]
    pub matcher: String,
    /// The dense criterion's assignment and weights (`[loss.dense]`).
    #[serde(default)]
    pub dense: DenseLossConfig,
    /// Costs and weights.
    #[serde(flatten)]
    pub weights: LossConfig,
}

fn hungarian() -> String {
    "hungarian".into()
}

impl Default for CriterionConfig {
    fn default() -> Self {
        Self {
            criterion: None,
            matcher: hungarian(),
            dense: DenseLossConfig::default(),
            weights: LossConfig::default(),
        }
    }
}

/// Loop settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Steps, logging and checkpoints.
    #[serde(flatten)]
    pub train: TrainConfig,
    /// Evaluate every this many steps (0: at the end only). Default 500.
    #[serde(default = "five_hundred")]
    pub eval_every: u64,
    /// Seed of initialisation, data order and transforms. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many minutes of training (evaluation time excluded), if set: the step
    /// that crosses it is the last, then a final evaluation.
    #[serde(default)]
    pub time_budget_min: Option<f64>,
}

fn five_hundred() -> u64 {
    500
}

/// Everything one run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// A name for tables and plots.
    #[serde(default)]
    pub name: String,
    /// The model.
    pub model: ModelConfig,
    /// The data.
    #[serde(default)]
    pub data: DataConfig,
    /// The loss.
    #[serde(default)]
    pub loss: CriterionConfig,
    /// The optimiser.
    #[serde(default)]
    pub optim: OptimConfig,
    /// The loop.
    pub run: RunConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            shapes: ShapesConfig::default(),
            coco: None,
            train_subset: None,
            eval_on_train: false,
            transforms: TransformConfig::default(),
            prompts: PromptConfig::default(),
            batch_size: eight(),
        }
    }
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Step.
    pub step: u64,
    /// Training minutes so far (evaluation excluded).
    pub train_minutes: f64,
    /// COCO numbers on the validation images.
    pub val: CocoMetrics,
    /// AP50 on the held-out colour-shape pairs only (-1 without any).
    pub heldout_ap50: f64,
}

/// Builds the criterion of a config for `model`.
pub fn criterion(cfg: &CriterionConfig, model: &ModelConfig) -> Result<Box<dyn Criterion>, String> {
    let kind = cfg.criterion.clone().unwrap_or_else(|| {
        if model.detector.kind == "dense" { "dense" } else { "set" }.to_string()
    });
    match kind.as_str() {
        "dense" => Ok(Box::new(DenseCriterion::new(cfg.dense.clone()))),
        "set" => {
            let matcher: Box<dyn glip_core::Matcher> = match cfg.matcher.as_str() {
                "hungarian" => Box::new(HungarianMatcher),
                "ordered" => Box::new(OrderedMatcher),
                m => return Err(format!("loss.matcher: unknown {m:?} (hungarian or ordered)")),
            };
            Ok(Box::new(SetCriterion::new(cfg.weights.clone(), matcher)))
        }
        k => Err(format!("loss.criterion: unknown {k:?} (set or dense)")),
    }
}

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

/// Runs detection on every image of `ds` with a prompt of all categories and evaluates it
/// against the same images' ground truth (COCO bbox), also restricted to `held_out` categories.
pub fn evaluate_shapes(
    model: &GlipModel,
    ds: &ShapesDataset,
    n: usize,
    tok: &Arc<glip_text::Tokenizer>,
    head: &HeadConfig,
    dir: &Path,
) -> Result<(CocoMetrics, f64), String> {
    let cats = ds.categories().to_vec();
    let prompt = glip_core::prompt::Prompt::detection(&cats, ". ").map_err(|e| e.to_string())?;
    let enc = tok.encode(&prompt.caption).map_err(|e| e.to_string())?;
    let pm = glip_core::prompt::positive_map(&enc.offsets, &prompt.spans, enc.ids.len());
    let dev = Device::Cpu;
    let pm = Tensor::new(pm, &dev).map_err(|e| e.to_string())?;
    let mut gt_images = Vec::new();
    let mut gt_anns = Vec::new();
    let mut dets: Vec<CocoDetection> = Vec::new();
    let bs = 16;
    let mut i = 0;
    while i < n {
        let m = bs.min(n - i);
        let mut samples = Vec::with_capacity(m);
        for k in i..i + m {
            let (img, objects) = ds.render(k);
            for o in &objects {
                let [x0, y0, x1, y1] = o.bbox;
                gt_anns.push(serde_json::json!({"id": gt_anns.len() + 1, "image_id": k + 1, "category_id": o.category + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}));
            }
            gt_images.push(serde_json::json!({"id": k + 1, "file_name": format!("{k:06}.png"), "width": img.width(), "height": img.height()}));
            let dims = img.dimensions();
            samples.push(glip_data::Sample {
                image: img,
                image_id: k as u64 + 1,
                orig_size: dims,
                caption: prompt.caption.clone(),
                boxes: vec![],
                phrases: vec![],
                labels: vec![],
            });
        }
        let batch = glip_data::collate(&samples, tok.as_ref(), &dev).map_err(|e| e.to_string())?;
        let out = model.forward(&batch.images, &batch.text, false).map_err(|e| e.to_string())?;
        for (b, s) in samples.iter().enumerate() {
            let logits = out.pred.pred_logits.get(b).map_err(|e| e.to_string())?;
            let scores = match head {
                HeadConfig::Token => token_scores(&logits, &pm, Default::default()),
                HeadConfig::Class { .. } => class_scores(&logits),
            }
            .and_then(|sc| out.rescore(b, sc))
            .map_err(|e| e.to_string())?;
            let boxes = out.pred.pred_boxes.get(b).map_err(|e| e.to_string())?;
            let (w, h) = s.image.dimensions();
            let cfg = model.postprocess();
            for d in
                detections(&scores, &boxes, w as f32, h as f32, &cfg).map_err(|e| e.to_string())?
            {
                let [x0, y0, x1, y1] = d.bbox.map(|v| v as f64);
                dets.push(CocoDetection {
                    image_id: s.image_id,
                    category_id: d.category as u64 + 1,
                    bbox: [x0, y0, x1 - x0, y1 - y0],
                    score: d.score as f64,
                });
            }
        }
        i += m;
    }
    let categories: Vec<_> =
        cats.iter().enumerate().map(|(i, c)| serde_json::json!({"id": i + 1, "name": c})).collect();
    let write_gt = |path: &Path, anns: Vec<serde_json::Value>| -> Result<(), String> {
        let doc =
            serde_json::json!({"images": gt_images, "annotations": anns, "categories": categories});
        std::fs::write(path, doc.to_string()).map_err(|e| format!("{}: {e}", path.display()))
    };
    let gt_path = dir.join("val_gt.json");
    write_gt(&gt_path, gt_anns.clone())?;
    let all = evaluate_coco(&gt_path, &dets).map_err(|e| e.to_string())?;
    let held: Vec<u64> = ds.held_out().iter().map(|&c| c as u64 + 1).collect();
    let heldout = if held.is_empty() {
        -1.0
    } else {
        let anns: Vec<_> = gt_anns
            .into_iter()
            .filter(|a| held.contains(&a["category_id"].as_u64().unwrap_or(0)))
            .collect();
        let p = dir.join("val_gt_heldout.json");
        write_gt(&p, anns)?;
        let hd: Vec<CocoDetection> =
            dets.iter().filter(|d| held.contains(&d.category_id)).cloned().collect();
        // Restrict evaluation to the held-out categories: others have no ground truth and
        // pycocotools averages only over categories with some.
        evaluate_coco(&p, &hd).map_err(|e| e.to_string())?.get("AP50")
    };
    Ok((all, heldout))
}

/// What a run reports while it works (a progress bar, log lines).
pub trait Progress {
    /// A one-line message (an evaluation result, the budget reached).
    fn message(&mut self, msg: &str);
    /// Training from step `from` to step `to` of `total` begins.
    fn segment(&mut self, _from: u64, _to: u64, _total: u64) {}
    /// A step is done.
    fn step(&mut self, _step: u64, _loss: f32) {}
    /// A logged step (every `log_every`).
    fn log(&mut self, _line: &LogLine) {}
}

/// Messages to a closure; steps and logs ignored.
impl<F: FnMut(&str)> Progress for F {
    fn message(&mut self, msg: &str) {
        self(msg)
    }
}

/// The outcome of a run, written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentResult {
    /// The config's name.
    pub name: String,
    /// Steps trained.
    pub steps: u64,
    /// Wall-clock seconds of the run (training and evaluation).
    pub wall_s: f64,
    /// Minutes of training (evaluation excluded).
    pub train_minutes: f64,
    /// Every evaluation, in order.
    pub evals: Vec<EvalPoint>,
}

impl ExperimentResult {
    /// The last evaluation.
    pub fn last(&self) -> Option<&EvalPoint> {
        self.evals.last()
    }

    /// The evaluation with the best validation AP50.
    pub fn best(&self) -> Option<&EvalPoint> {
        self.evals.iter().max_by(|a, b| a.val.get("AP50").total_cmp(&b.val.get("AP50")))
    }

    /// `results.json`: `val` (AP, AP50 and the other COCO numbers of the last evaluation, and
    /// AP per category id),
    /// `heldout.AP50`, `best`, `steps`, `wall_s`, `train_minutes`, and every evaluation.
    pub fn to_json(&self) -> serde_json::Value {
        let val = |p: Option<&EvalPoint>| match p {
            Some(p) => {
                let mut m: serde_json::Map<_, _> = crate::eval::COCO_STAT_NAMES
                    .iter()
                    .map(|n| (n.to_string(), serde_json::json!(p.val.get(n))))
                    .collect();
                m.insert("per_category_AP".into(), serde_json::json!(p.val.per_category_ap));
                serde_json::Value::Object(m)
            }
            None => serde_json::Value::Null,
        };
        let heldout_best =
            self.evals.iter().map(|p| p.heldout_ap50).fold(f64::NEG_INFINITY, f64::max);
        serde_json::json!({
            "name": self.name,
            "val": val(self.last()),
            "heldout": {"AP50": self.last().map(|p| p.heldout_ap50), "best_AP50": heldout_best.is_finite().then_some(heldout_best)},
            "best": self.best().map(|p| serde_json::json!({"step": p.step, "train_minutes": p.train_minutes, "AP50": p.val.get("AP50"), "AP": p.val.get("AP"), "heldout_AP50": p.heldout_ap50})),
            "steps": self.steps,
            "wall_s": self.wall_s,
            "train_minutes": self.train_minutes,
            "evals": self.evals.iter().map(|p| serde_json::json!({"step": p.step, "train_minutes": p.train_minutes, "AP": p.val.get("AP"), "AP50": p.val.get("AP50"), "heldout_AP50": p.heldout_ap50})).collect::<Vec<_>>(),
        })
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Trains and evaluates; writes `dir/config.resolved.toml`, `log.jsonl`, `eval.jsonl`,
/// checkpoints and `results.json`.
pub fn run_experiment(
    cfg: &ExperimentConfig,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<ExperimentResult, String> {
    run_experiment_with(&ModelBuilder::new(), cfg, dir, resume, progress)
}

/// Where a run evaluates.
enum EvalTarget {
    Shapes(Box<ShapesDataset>, usize),
    Coco(PathBuf, PathBuf),
}

/// [`run_experiment`] with a builder that knows a researcher's own components (registered
/// with [`ModelBuilder::register_query_generator`] and friends).
pub fn run_experiment_with(
    builder: &ModelBuilder,
    cfg: &ExperimentConfig,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<ExperimentResult, String> {
    let wall = std::time::Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let resolved = toml::to_string(cfg).map_err(|e| e.to_string())?;
    write_atomic(&dir.join("config.resolved.toml"), &resolved)?;
    if !resume {
        for f in ["log.jsonl", "eval.jsonl"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    let dev = Device::Cpu;
    let tok = Arc::new(
        glip_text::Tokenizer::from_file(&cfg.model.text.tokenizer)
            .map_err(|e| format!("model.text.tokenizer: {e}"))?,
    );
    let caption_tok: Arc<dyn glip_core::prompt::CaptionTokenizer> = tok.clone();
    let (full, eval_target): (Arc<dyn Dataset>, EvalTarget) = match &cfg.data.coco {
        Some(c) => {
            let policy = if c.skip_bad_records { ErrorPolicy::Skip } else { ErrorPolicy::Fail };
            let ds = CocoDataset::open(&c.train_annotations, &c.train_images, policy)
                .map_err(|e| format!("data.coco.train_annotations: {e}"))?;
            if !ds.report.problems.is_empty() {
                progress.message(&ds.report.summary());
            }
            let ds = ds.with_prompts(cfg.data.prompts.clone(), Some(caption_tok));
            let target = EvalTarget::Coco(c.val_annotations.clone(), c.val_images.clone());
            (Arc::new(ds), target)
        }
        None => {
            let train = ShapesDataset::new(cfg.data.shapes.clone(), Split::Train)
                .map_err(|e| e.to_string())?
                .with_prompts(cfg.data.prompts.clone(), Some(caption_tok));
            let eval = if cfg.data.eval_on_train {
                ShapesDataset::new(cfg.data.shapes.clone(), Split::Train)
            } else {
                ShapesDataset::new(cfg.data.shapes.clone(), Split::Val)
            }
            .map_err(|e| e.to_string())?;
            let n = if cfg.data.eval_on_train {
                cfg.data.train_subset.unwrap_or(train.len()).min(train.len())
            } else {
                eval.len()
            };
            (Arc::new(train), EvalTarget::Shapes(Box::new(eval), n))
        }
    };
    let n_train = cfg.data.train_subset.unwrap_or(full.len()).min(full.len());
    let train: Arc<dyn Dataset> = Arc::new(Subset(full, n_train));
    let mut loader = Loader::new(train, tok.clone(), cfg.data.batch_size, dev.clone());
    loader.transforms = cfg.data.transforms.clone();
    loader.shuffle = true;
    loader.seed = cfg.run.seed;
    let varmap = candle_nn::VarMap::new();
    let model = builder
        .build_trainable(&cfg.model, &varmap, cfg.run.seed, &dev)
        .map_err(|e| e.to_string())?;
    let crit = criterion(&cfg.loss, &cfg.model)?;
    let resolved_json = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let mut result = ExperimentResult {
        name: cfg.name.clone(),
        steps: 0,
        wall_s: 0.0,
        train_minutes: 0.0,
        evals: Vec::new(),
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
    )
    .map_err(|e| e.to_string())?;
    if resume && dir.join("checkpoint.safetensors").exists() {
        trainer.resume().map_err(|e| e.to_string())?;
        step = trainer.step();
        if let Ok(text) = std::fs::read_to_string(dir.join("eval.jsonl")) {
            result.evals = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            trained_s = result.evals.last().map_or(0.0, |p| p.train_minutes * 60.0);
        }
    }
    let eval_log = dir.join("eval.jsonl");
    while step < total {
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
        done.map_err(|e| e.to_string())?;
        trained_s += t0.elapsed().as_secs_f64();
        step = trainer.step();
        let (val, heldout_ap50) = match &eval_target {
            EvalTarget::Shapes(ds, n) => {
                evaluate_shapes(&model, ds, *n, &tok, &cfg.model.head, dir)?
            }
            EvalTarget::Coco(ann, images) => {
                let p = crate::infer::Predictor {
                    model: &model,
                    config: cfg,
                    tokenizer: &tok,
                    device: &dev,
                };
                (p.evaluate_coco_folder(ann, images, &model.postprocess(), |_, _| {})?, -1.0)
            }
        };
        let p = EvalPoint { step, train_minutes: trained_s / 60.0, val, heldout_ap50 };
        progress.borrow_mut().message(&format!(
            "step {step}: val AP50 {:.3}, AP {:.3}, held-out AP50 {:.3} ({:.1} min of training)",
            p.val.get("AP50"),
            p.val.get("AP"),
            heldout_ap50,
            p.train_minutes,
        ));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&eval_log)
            .map_err(|e| format!("{}: {e}", eval_log.display()))?;
        use std::io::Write;
        writeln!(f, "{}", serde_json::to_string(&p).expect("json"))
            .map_err(|e| format!("{}: {e}", eval_log.display()))?;
        result.evals.push(p);
        if let Some(b) = cfg.run.time_budget_min.filter(|&b| trained_s / 60.0 >= b) {
            progress.borrow_mut().message(&format!("time budget ({b} min) reached at step {step}"));
            break;
        }
    }
    result.steps = step;
    result.train_minutes = trained_s / 60.0;
    result.wall_s = wall.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&result.to_json()).expect("json");
    write_atomic(&dir.join("results.json"), &json)?;
    Ok(result)
}

/// Reads an experiment config, naming the file on error.
pub fn load_config(path: &Path) -> Result<ExperimentConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where relative paths in a config resolve: the config's folder.
/// Made absolute, so a run folder's `config.resolved.toml` works from any directory.
pub fn resolve_paths(cfg: &mut ExperimentConfig, base: &Path) {
    let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    let fix = |p: &mut PathBuf| {
        if p.as_os_str().is_empty() {
            return;
        }
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    fix(&mut cfg.model.text.tokenizer);
    if let Some(c) = cfg.data.coco.as_mut() {
        for p in [
            &mut c.train_annotations,
            &mut c.train_images,
            &mut c.val_annotations,
            &mut c.val_images,
        ] {
            fix(p);
        }
    }
    if let Some(f) = cfg.model.text.folder.as_mut() {
        fix(f);
    }
    for f in cfg.model.weights.values_mut() {
        fix(f);
    }
}
