//! The config of a whole run (`ExperimentConfig`: model, data, loss, optimiser, loop,
//! scoring), read from TOML with errors naming the key, and what it says about inference.

use crate::config::{CriterionConfig, HeadConfig, ModelConfig, Registry, Slot};
use crate::infer::{InferenceSpec, Preprocess};
use crate::optim::OptimConfig;
use crate::trainer::TrainConfig;
use crate::{Error, GlipModel};
use glip_data::{
    CocoDataset, Dataset, ErrorPolicy, PromptConfig, ShapesConfig, ShapesDataset, Split,
    TransformConfig,
};
use glip_heads::postprocess::PostProcessConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// Category names held out of training (an open-vocabulary split, as OVR-CNN's and
    /// GLIP's zero-shot COCO): their boxes leave the training targets and their names every
    /// training prompt; evaluation still prompts every category and reports the held-out
    /// categories' mean AP50 as "held-out AP50". Default none.
    #[serde(default)]
    pub held_out: Vec<String>,
}

/// Grounding data in ODVG jsonl (the format of mmdetection's and Grounding DINO's grounded
/// pre-training): detection records (boxes with labels, prompted as COCO's are) and grounding
/// records (a caption with its phrases' boxes), in any mix; evaluation is COCO bbox AP on a COCO
/// validation split, every image prompted with every category name (as GLIP evaluates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdvgDataConfig {
    /// The training records (ODVG jsonl).
    pub train: PathBuf,
    /// The folder the records' `filename`s are relative to.
    pub train_images: PathBuf,
    /// The detection records' label map (`{"0": "person", ...}`); needed when there are any.
    #[serde(default)]
    pub label_map: Option<PathBuf>,
    /// Validation annotations (COCO json).
    pub val_annotations: PathBuf,
    /// Validation images folder.
    pub val_images: PathBuf,
    /// Skip (and count) bad records instead of stopping at the first. Default false.
    #[serde(default)]
    pub skip_bad_records: bool,
    /// Category names (of the label map) held out of training, as `data.coco.held_out`: the
    /// detection records' boxes of them and their names in every training prompt go; grounding
    /// captions are used as written. Evaluation reports their mean AP50 as the held-out AP50.
    /// Default none.
    #[serde(default)]
    pub held_out: Vec<String>,
}

/// More training data mixed into the run's own (`[[data.mix]]`), as GLIP trains on detection
/// and grounding data at once (Objects365 with GoldG's captions): ODVG records (grounding
/// captions and/or detection records) or a COCO file, whose samples join the training data's,
/// each pass over it seeing them `repeat` times. Evaluation stays on the run's validation data.
/// A category of the same name as one of the run's data is the same category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// ODVG records (jsonl); or give `coco`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub odvg: Option<PathBuf>,
    /// COCO annotations (json), prompted from its category names as `data.coco` is; or give
    /// `odvg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coco: Option<PathBuf>,
    /// The folder the records' `filename`s (COCO's `file_name`s) are relative to.
    pub images: PathBuf,
    /// The ODVG detection records' label map (`{"0": "person", ...}`); needed when there are
    /// any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_map: Option<PathBuf>,
    /// How many times each record is seen in one pass over the training data (upsamples a
    /// small source). Default 1.
    #[serde(default = "one")]
    pub repeat: usize,
    /// Skip (and count) bad records instead of stopping at the first. Default false.
    #[serde(default)]
    pub skip_bad_records: bool,
}

fn one() -> usize {
    1
}

/// Phrase grounding evaluated on captions (Flickr30k Entities style), beside the run's COCO
/// AP: ODVG grounding records, each image grounded with its own caption, and Recall@1, @5, @10
/// of its phrases (a phrase is hit at k when one of its k best boxes has IoU >= 0.5 with one of
/// its ground-truth boxes; regions with the same `tokens_positive` are one phrase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundingValConfig {
    /// The grounding records (ODVG jsonl; detection records are not read here).
    pub odvg: PathBuf,
    /// The folder the records' `filename`s are relative to.
    pub images: PathBuf,
}

/// Where a run evaluates.
#[derive(Debug)]
pub enum EvalData {
    /// The synthetic task's images (validation, or training with `data.eval_on_train`): their
    /// first `n`.
    Shapes(Box<ShapesDataset>, usize),
    /// A COCO validation split: annotations and images folder.
    Coco(PathBuf, PathBuf),
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
    /// ODVG grounding data instead of the synthetic task (or COCO): captions with their
    /// phrases' boxes and detection records; evaluation on a COCO validation split.
    #[serde(default)]
    pub odvg: Option<OdvgDataConfig>,
    /// Captions to evaluate phrase grounding on besides the COCO AP (any training data; a token
    /// head): Recall@1, @5, @10 in every evaluation and in `results.json` (`caption_recall`).
    #[serde(default)]
    pub val_grounding: Option<GroundingValConfig>,
    /// More training sources mixed into the training data (`[[data.mix]]`, a token head),
    /// after the run's own (so `train_subset` takes the run's own first). Default none.
    #[serde(default)]
    pub mix: Vec<MixSource>,
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
    /// Batches decoded, augmented and collated ahead of the training step by a worker thread
    /// (0: each when needed). Default 2.
    #[serde(default = "two")]
    pub prefetch: usize,
}

fn two() -> usize {
    2
}

fn eight() -> usize {
    8
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
    /// Where to compute: `auto` (default: the first GPU of a CUDA build, else the CPU), `cpu`,
    /// `cuda`, `cuda:N`. A command's `--device` overrides it.
    #[serde(default)]
    pub device: crate::device::DeviceSpec,
    /// What convolutions compute in: `"f32"` (default) or `"bf16"`. On CUDA (GPUs of compute
    /// capability 8.0, Ampere, and newer), convolutions and
    /// linear layers compute forward and backward in bf16 with f32 sums (autocast: the weights,
    /// the loss and the optimiser stay f32, gradients reach the weights as f32). On CPUs with
    /// AVX512_BF16 (AMX where there is), convolutions' forward and gradient products with their
    /// operands rounded to bf16 and f32 sums; linear layers f32 in training. Elsewhere f32,
    /// with a warning.
    #[serde(default)]
    pub precision: crate::Precision,
    /// On CUDA, whether f32 convolutions and matrix products may use TF32 tensor cores (10-bit
    /// mantissas in the products, f32 sums: PyTorch's default for convolutions, not for matrix
    /// products). Default false: f32 throughout. No effect on the CPU.
    #[serde(default)]
    pub tf32: bool,
    /// On CUDA, whether convolution gradients avoid cuDNN's algorithms that add with atomics
    /// (and deformable attention's sampling glip's kernel, whose values' gradient does), so
    /// that a run repeats bit for bit (and a resumed run continues as the uninterrupted one
    /// would): `torch.backends.cudnn.deterministic`. Default false (PyTorch's default too): the
    /// fastest choices, whose gradients can differ in the last bits from run to run. The CPU
    /// always repeats.
    #[serde(default)]
    pub deterministic: bool,
    /// Keep the weights of the evaluation with the best validation AP50 so far as
    /// `best.safetensors` beside the checkpoint (the EMA of the weights when there is one, as
    /// evaluation uses it; `best.json` names its step and numbers), as GLIP keeps `model_best.pth`. `glip eval` and
    /// `glip detect` take it as `--run <run>/best.safetensors`. Default true.
    #[serde(default = "yes")]
    pub keep_best: bool,
    /// Stop once this many evaluations in a row have not raised the best validation AP50 (an
    /// equal one does not), as GLIP's `SOLVER.AUTO_TERMINATE_PATIENCE`; the run ends with its
    /// checkpoint at that step and its best weights kept. Default 0: never.
    #[serde(default)]
    pub patience: u64,
}

fn five_hundred() -> u64 {
    500
}

fn yes() -> bool {
    true
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
    /// How outputs become scored boxes at evaluation and detection (top-k, threshold, NMS,
    /// token reduction). Default: 100 boxes, no threshold, the detector's NMS, mean.
    #[serde(default)]
    pub post: Option<PostProcessConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            shapes: ShapesConfig::default(),
            coco: None,
            odvg: None,
            val_grounding: None,
            mix: Vec::new(),
            train_subset: None,
            eval_on_train: false,
            transforms: TransformConfig::default(),
            prompts: PromptConfig::default(),
            batch_size: eight(),
            prefetch: two(),
        }
    }
}

impl ExperimentConfig {
    /// Checks the whole config before anything is built: every component against `registry`
    /// (unknown types, misspelt or missing parameters) and every rule of
    /// [`crate::validate`] (sizes, ranges, divisibility, levels, dataset against batch size,
    /// files). Reports every problem, each naming its key; fills in the defaults of registered
    /// components.
    pub fn check(&mut self, registry: &Registry) -> Result<(), Error> {
        let mut problems = match crate::validate::validate(self) {
            Ok(()) => Vec::new(),
            Err(p) => p.0,
        };
        if let Err(e) = registry.check(&mut self.model, &mut self.loss) {
            let (key, rule) = match e {
                Error::Config { key, msg } => (key, msg),
                other => (String::new(), other.to_string()),
            };
            problems.insert(0, glip_core::validate::Problem { key, value: None, rule });
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(Error::Invalid(glip_core::validate::Problems(problems))),
        }
    }

    /// The categories held out of training: `data.coco.held_out`, `data.odvg.held_out`, else
    /// the synthetic task's held-out colour-shape pairs.
    pub fn held_out(&self) -> &[String] {
        match (&self.data.coco, &self.data.odvg) {
            (Some(c), _) => &c.held_out,
            (None, Some(o)) => &o.held_out,
            (None, None) => &self.data.shapes.held_out,
        }
    }

    /// The held-out AP50 of a COCO evaluation of this run: the mean AP50 of the categories
    /// `data.coco.held_out` or `data.odvg.held_out` names (-1 without any).
    pub fn heldout_ap50(&self, coco: &crate::eval::CocoMetrics) -> f64 {
        match (&self.data.coco, &self.data.odvg) {
            (None, None) => -1.0,
            _ if self.held_out().is_empty() => -1.0,
            _ => coco.mean_ap50_of(self.held_out()),
        }
    }

    /// Where this run evaluates: the COCO validation split of `data.coco` or `data.odvg`, else
    /// the synthetic task's validation images (its training images with `data.eval_on_train`,
    /// as many as it trains on).
    pub fn eval_data(&self) -> Result<EvalData, Error> {
        let d = &self.data;
        if let Some(c) = &d.coco {
            return Ok(EvalData::Coco(c.val_annotations.clone(), c.val_images.clone()));
        }
        if let Some(o) = &d.odvg {
            return Ok(EvalData::Coco(o.val_annotations.clone(), o.val_images.clone()));
        }
        Ok(match d.eval_on_train {
            true => {
                let ds = ShapesDataset::new(d.shapes.clone(), Split::Train)?;
                let n = d.train_subset.unwrap_or(ds.len()).min(ds.len());
                EvalData::Shapes(Box::new(ds), n)
            }
            false => {
                let ds = ShapesDataset::new(d.shapes.clone(), Split::Val)?;
                let n = ds.len();
                EvalData::Shapes(Box::new(ds), n)
            }
        })
    }

    /// The resize rule of evaluation and detection: the training's largest shorter side and
    /// cap, or the synthetic task's image size.
    pub fn preprocess(&self) -> Preprocess {
        let t = &self.data.transforms;
        match t.shorter_side.iter().max() {
            Some(&short) => Preprocess { shorter_side: short, max_size: t.max_size },
            None => {
                let side = self.data.shapes.image_size;
                Preprocess { shorter_side: side, max_size: side }
            }
        }
    }

    /// The fixed classes of a class head: the data's category names.
    pub fn class_names(&self) -> Result<Vec<String>, Error> {
        if !matches!(self.model.head, Slot::Builtin(HeadConfig::Class(_))) {
            return Ok(Vec::new());
        }
        Ok(match &self.data.coco {
            Some(c) => CocoDataset::open(&c.val_annotations, &c.val_images, ErrorPolicy::Skip)?
                .categories
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            None => ShapesDataset::new(self.data.shapes.clone(), Split::Val)?.categories().to_vec(),
        })
    }

    /// What inference needs of this run, with `model`'s default NMS unless `post` says.
    pub fn inference_spec(&self, model: &GlipModel) -> Result<InferenceSpec, Error> {
        Ok(InferenceSpec {
            name: self.name.clone(),
            model: self.model.clone(),
            preprocess: self.preprocess(),
            class_names: self.class_names()?,
            post: self.post.clone().unwrap_or_else(|| PostProcessConfig {
                nms_iou: model.detector.default_nms(),
                ..Default::default()
            }),
            ema: self.optim.ema_decay.is_some(),
        })
    }
}

/// Reads an experiment config, naming the file and the key on error. Its `base` chain is
/// merged in ([`read_config_doc`]); relative paths stay relative to the file's folder (as
/// [`resolve_paths`] takes them), a base's rewritten so (`../fixtures/x` in a base one folder
/// down is `down/../fixtures/x`; absolute when the base was named by an absolute path).
pub fn load_config(path: &Path) -> Result<ExperimentConfig, Error> {
    let doc = read_config_doc(path)?;
    let mut cfg = doc.to_config(path)?;
    let top = folder(path);
    let origins: Vec<(String, PathBuf)> = doc
        .origins()
        .into_iter()
        .map(|(k, dir)| {
            let rel = dir.strip_prefix(&top).map(Path::to_path_buf).unwrap_or(dir);
            (k, rel)
        })
        .collect();
    rebase_paths(&mut cfg, Path::new(""), &origins);
    Ok(cfg)
}

/// The most config files one chain of `base` keys may hold.
pub const MAX_BASE_DEPTH: usize = 16;

/// A config file's TOML document with the chain of configs it names in `base` merged under it.
#[derive(Debug, Clone)]
pub struct ConfigDoc {
    /// The merged document, without `base` keys.
    pub doc: toml::Table,
    /// Each key path the files set a value at, with the file that set it, in merge order: the
    /// furthest base's first, the file's own last.
    pub keys: Vec<(String, PathBuf)>,
}

impl ConfigDoc {
    /// The key paths with the folders their relative paths resolve against, as
    /// [`resolve_paths_set`] takes them.
    pub fn origins(&self) -> Vec<(String, PathBuf)> {
        self.keys.iter().map(|(k, file)| (k.clone(), folder(file))).collect()
    }

    /// The file that set `key`, the table above it or a value under it last, if any file did.
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        let parts: Vec<&str> = key.split('.').collect();
        self.keys
            .iter()
            .rev()
            .find(|(k, _)| {
                let k: Vec<&str> = k.split('.').collect();
                let n = k.len().min(parts.len());
                parts[..n] == k[..n]
            })
            .map(|(_, f)| f.as_path())
    }

    /// The config, its errors naming the file that set the key (`path` when none did: a key
    /// that is missing).
    pub fn to_config(&self, path: &Path) -> Result<ExperimentConfig, Error> {
        config_from_table(self.doc.clone()).map_err(|e| {
            let file = match &e {
                Error::Config { key, .. } => self.file_of(key).unwrap_or(path),
                _ => path,
            };
            Error::file(file, e)
        })
    }
}

/// The folder a file's relative paths resolve against (empty for a bare file name: the
/// working directory).
fn folder(path: &Path) -> PathBuf {
    path.parent().unwrap_or(Path::new("")).to_path_buf()
}

/// Reads a config file and the chain of configs its `base` key names (relative to the file; a base
/// may name its own base), merged: the file's values over its base's, table by table, as
/// detectron2's `_BASE_` and mmdetection's `_base_` do. A value that is not a table (numbers,
/// strings, arrays) replaces the base's; a table merges into the base's key by key, except a
/// component table that names another `type` than the base's (`model.detector = { type =
/// "query-selection" }` over a dense detector): that replaces the base's table whole, since the
/// other type's parameters would not fit it. Errors name the file; a chain that loops or holds more
/// than [`MAX_BASE_DEPTH`] files is an error.
pub fn read_config_doc(path: &Path) -> Result<ConfigDoc, Error> {
    let mut chain = Vec::new();
    read_config_chain(path, &mut chain)
}

fn read_config_chain(path: &Path, chain: &mut Vec<PathBuf>) -> Result<ConfigDoc, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| Error::file(path, e))?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if chain.contains(&canonical) {
        let names: Vec<String> =
            chain.iter().chain([&canonical]).map(|p| p.display().to_string()).collect();
        return Err(Error::file(
            path,
            format!("base: the chain of bases loops: {}", names.join(" -> ")),
        ));
    }
    chain.push(canonical);
    if chain.len() > MAX_BASE_DEPTH {
        return Err(Error::file(
            path,
            format!("base: a chain of more than {MAX_BASE_DEPTH} config files"),
        ));
    }
    let own = |doc: &toml::Table| {
        let mut keys = Vec::new();
        leaf_keys(doc, "", &mut keys);
        keys.into_iter().map(|k| (k, path.to_path_buf())).collect::<Vec<_>>()
    };
    let Some(base) = doc.remove("base") else {
        return Ok(ConfigDoc { keys: own(&doc), doc });
    };
    let Some(base) = base.as_str().filter(|s| !s.trim().is_empty()) else {
        return Err(Error::file(
            path,
            Error::Config { key: "base".into(), msg: "must be the path of a config file".into() },
        ));
    };
    let base_path = folder(path).join(base);
    let mut merged = read_config_chain(&base_path, chain).map_err(|e| match e {
        Error::File { path: p, msg } if p == base_path && !msg.starts_with("base:") => {
            Error::file(path, format!("base = {base:?}: {}: {msg}", p.display()))
        }
        e => e,
    })?;
    merged.keys.extend(own(&doc));
    merge_tables(&mut merged.doc, doc);
    Ok(merged)
}

/// The key paths of a document's values (not of the tables holding them).
fn leaf_keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) if !t.is_empty() => leaf_keys(t, &key, out),
            _ => out.push(key),
        }
    }
}

/// Merges `over` into `base` (see [`read_config_doc`]).
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) if !other_type(b, &o) => {
                merge_tables(b, o)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Whether two component tables name different `type`s (a table naming none merges).
fn other_type(base: &toml::Table, over: &toml::Table) -> bool {
    matches!((base.get("type"), over.get("type")), (Some(a), Some(b)) if a != b)
}

/// An experiment config from a TOML document; errors name the key (`model.detector: ...`).
pub fn config_from_table(doc: toml::Table) -> Result<ExperimentConfig, Error> {
    serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
        let key = e.path().to_string();
        let msg = e.into_inner().message().trim().to_string();
        match key.as_str() {
            "" | "." => Error::Msg(msg),
            _ => Error::Config { key, msg },
        }
    })
}

/// Applies `key.path=value` overrides (`--set`, TOML value syntax; a value that does not parse
/// as TOML is a string) to a config document, naming the override on error.
pub fn apply_overrides(doc: &mut toml::Table, sets: &[String]) -> Result<(), Error> {
    for s in sets {
        let bad = |msg: String| Error::Msg(format!("--set {s:?}: {msg}"));
        let (key, value) =
            s.split_once('=').ok_or_else(|| bad("expected key.path=value".into()))?;
        let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.into())),
            Err(_) => toml::Value::String(value.to_string()),
        };
        let parts: Vec<&str> = key.trim().split('.').map(str::trim).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad(format!("{key:?} is not a key path (a.b.c)")));
        }
        let (last, tables) = parts.split_last().expect("split gives one part at least");
        let mut t = &mut *doc;
        for p in tables {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| bad(format!("{p} is not a table")))?;
        }
        t.insert(last.to_string(), value);
    }
    Ok(())
}

/// Where relative paths in a config resolve: the config's folder.
/// Made absolute, so a run folder's `config.resolved.toml` works from any directory.
pub fn resolve_paths(cfg: &mut ExperimentConfig, base: &Path) {
    resolve_paths_set(cfg, base, &[]);
}

/// [`resolve_paths`], except for the paths that overrides set: `sets` pairs each `key.path=value`
/// override (or a bare key path: [`ConfigDoc::origins`]) with the folder its relative paths
/// resolve against (the working directory for a command line's `--set`, an ablation file's
/// folder for its `set`, a base config's folder for what it sets). A path takes the folder of
/// the last override whose key is the path's key or a table above it (`model.weights` for
/// `model.weights.backbone`); every other path, the config's folder.
pub fn resolve_paths_set(cfg: &mut ExperimentConfig, base: &Path, sets: &[(String, PathBuf)]) {
    // `Path::parent` of a bare file name is "": the working directory.
    let absolute = |p: &Path| {
        let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
        std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
    };
    let sets: Vec<(String, PathBuf)> =
        sets.iter().map(|(s, dir)| (s.clone(), absolute(dir))).collect();
    rebase_paths(cfg, &absolute(base), &sets);
}

/// Joins each relative path of `cfg` to the folder of the last entry of `sets` whose key is the
/// path's key or a table above it, else to `base` (see [`resolve_paths_set`]).
fn rebase_paths(cfg: &mut ExperimentConfig, base: &Path, sets: &[(String, PathBuf)]) {
    let sets: Vec<(Vec<&str>, &Path)> = sets
        .iter()
        .map(|(s, dir)| {
            let key = s.split_once('=').map_or(s.as_str(), |(k, _)| k);
            (key.split('.').map(str::trim).collect(), dir.as_path())
        })
        .collect();
    let base_of = |key: &str| -> PathBuf {
        let parts: Vec<&str> = key.split('.').collect();
        sets.iter()
            .rev()
            .find(|(k, _)| k.len() <= parts.len() && parts[..k.len()] == k[..])
            .map_or(base, |(_, dir)| dir)
            .to_path_buf()
    };
    cfg.model.resolve_paths_with(&|key| base_of(&format!("model.{key}")));
    let mut paths: Vec<(&str, &mut PathBuf)> = Vec::new();
    if let Some(c) = cfg.data.coco.as_mut() {
        paths.extend([
            ("data.coco.train_annotations", &mut c.train_annotations),
            ("data.coco.train_images", &mut c.train_images),
            ("data.coco.val_annotations", &mut c.val_annotations),
            ("data.coco.val_images", &mut c.val_images),
        ]);
    }
    if let Some(o) = cfg.data.odvg.as_mut() {
        paths.extend([
            ("data.odvg.train", &mut o.train),
            ("data.odvg.train_images", &mut o.train_images),
            ("data.odvg.val_annotations", &mut o.val_annotations),
            ("data.odvg.val_images", &mut o.val_images),
        ]);
        paths.extend(o.label_map.as_mut().map(|p| ("data.odvg.label_map", p)));
    }
    if let Some(g) = cfg.data.val_grounding.as_mut() {
        paths.extend([
            ("data.val_grounding.odvg", &mut g.odvg),
            ("data.val_grounding.images", &mut g.images),
        ]);
    }
    for m in cfg.data.mix.iter_mut() {
        paths.push(("data.mix", &mut m.images));
        for p in [&mut m.odvg, &mut m.coco, &mut m.label_map].into_iter().flatten() {
            paths.push(("data.mix", p));
        }
    }
    for (key, p) in paths {
        if !p.as_os_str().is_empty() && p.is_relative() {
            *p = base_of(key).join(&*p);
        }
    }
}
