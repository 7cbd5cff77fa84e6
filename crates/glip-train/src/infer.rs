//! The one inference path: preprocessing (the training resize rule), prompt chunking, forward,
//! scoring (the detector's), top-k, threshold and NMS. Evaluation during training,
//! `glip eval` and `glip detect` all go through one pass runner: [`Predictor::detect_batch`] for
//! detection prompts made of phrases, [`Predictor::ground_batch`] for a caption's phrases.
//!
//! Every run saves an [`InferenceSpec`] (`inference.json`: the model config, the resize rule,
//! the class names, the score rule) and its tokenizer (`tokenizer.json`) beside the
//! checkpoint, so a run folder is served by [`Detector::load`] without its training config.

use crate::config::{ModelConfig, Registry};
use crate::eval::{evaluate_coco, CocoDetection, CocoMetrics};
pub use crate::graphs::{GraphCache, GraphKey, GraphReport};
use crate::{Error, GlipModel};
use candle_core::{DType, Device, Tensor};
use glip_core::LogitsKind;
use glip_data::Sample;
use glip_heads::postprocess::{batch_detections, class_scores, token_scores, PostProcessConfig};
use glip_text::{chunked_detection_prompts, Tokenizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One grounded box in the pixels of the image given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grounded {
    /// `[x0, y0, x1, y1]` pixels.
    pub bbox: [f32; 4],
    /// Score in `[0, 1]`.
    pub score: f32,
    /// Index of the phrase (or class) it grounds.
    pub phrase_index: usize,
    /// The phrase (or class name).
    pub phrase: String,
}

/// How images are resized before the model: [`glip_data::transforms::target_size`] with the
/// training's shorter side and cap (the largest of a multi-scale training's sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Target shorter side in pixels.
    pub shorter_side: u32,
    /// Cap on the longer side (0: none).
    pub max_size: u32,
}

impl Preprocess {
    /// `img` resized by the rule (unchanged when it already has the target size).
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let (nw, nh) = self.size(img);
        if (nw, nh) == (w, h) {
            img.clone()
        } else {
            image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle)
        }
    }

    /// The `(width, height)` that [`Preprocess::apply`] gives `img`.
    pub fn size(&self, img: &RgbImage) -> (u32, u32) {
        let (w, h) = img.dimensions();
        glip_data::transforms::target_size(w, h, self.shorter_side, self.max_size)
    }
}

/// Everything inference needs besides the weights; saved as `inference.json` in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceSpec {
    /// The run's name.
    #[serde(default)]
    pub name: String,
    /// The model (paths absolute, or relative to the run folder).
    pub model: ModelConfig,
    /// The resize rule.
    pub preprocess: Preprocess,
    /// The names of a fixed-class head's classes (empty for a token head).
    #[serde(default)]
    pub class_names: Vec<String>,
    /// Scoring defaults: token reduction, NMS, top-k, threshold.
    pub post: PostProcessConfig,
    /// Use the checkpoint's EMA of the weights (the run trained with `optim.ema_decay`).
    #[serde(default)]
    pub ema: bool,
}

/// A run's folder (its `inference.json`) and checkpoint, from what `--run` names: a run folder,
/// or a checkpoint file whose folder holds the spec (`ckpt.safetensors` alone: the current
/// folder). A path that is neither is named, not mistaken for a file in its parent folder.
fn run_files(path: &Path) -> Result<(PathBuf, PathBuf), Error> {
    if path.is_dir() {
        return Ok((path.to_path_buf(), path.join("checkpoint.safetensors")));
    }
    if !path.is_file() {
        return Err(Error::file(path, "no such run folder or checkpoint file"));
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((dir.to_path_buf(), path.to_path_buf()))
}

/// The spec's file in a run folder.
pub const SPEC_FILE: &str = "inference.json";
/// The tokenizer's copy in a run folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

impl InferenceSpec {
    /// Writes `inference.json` and a copy of the tokenizer into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let mut spec = self.clone();
        if let Some(tok) = self.model.tokenizer() {
            let bytes = std::fs::read(&tok).map_err(|e| Error::file(&tok, e))?;
            crate::write_atomic(&dir.join(TOKENIZER_FILE), &bytes)?;
            spec.model.text = retarget_tokenizer(&spec.model, TOKENIZER_FILE);
        }
        let json = serde_json::to_string_pretty(&spec).expect("spec serialises");
        crate::write_atomic(&dir.join(SPEC_FILE), json.as_bytes())
    }

    /// Reads `dir/inference.json`, resolving its relative paths against `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(SPEC_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::file(
                &path,
                format!("{e} (a run folder holds the inference spec its training wrote)"),
            )
        })?;
        let mut spec: Self = serde_json::from_str(&text).map_err(|e| Error::file(&path, e))?;
        spec.model.resolve_paths(dir);
        let mut c = glip_core::validate::Checker::new();
        c.section("model", &spec.model);
        c.section("post", &spec.post);
        c.within("preprocess", |c| {
            let side = glip_core::validate::limits::IMAGE_SIDE;
            c.in_range("shorter_side", spec.preprocess.shorter_side, 16, side);
            c.in_range("max_size", spec.preprocess.max_size, 0, side);
        });
        c.finish().map_err(|p| Error::file(&path, p))?;
        Ok(spec)
    }
}

/// The text slot with its tokenizer path replaced.
fn retarget_tokenizer(
    model: &ModelConfig,
    to: &str,
) -> crate::config::Slot<crate::config::TextConfig> {
    use crate::config::{Slot, TextConfig};
    match &model.text {
        Slot::Builtin(TextConfig::Bert(p)) => {
            let mut p = p.clone();
            p.tokenizer = PathBuf::from(to);
            Slot::Builtin(TextConfig::Bert(p))
        }
        Slot::Custom { kind, params } => {
            let mut params = params.clone();
            params.insert("tokenizer".into(), toml::Value::String(to.into()));
            Slot::Custom { kind: kind.clone(), params }
        }
    }
}

/// A trained model ready for inference.
pub struct Detector {
    /// The model.
    pub model: GlipModel,
    /// How it was trained to see images and score.
    pub spec: InferenceSpec,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Where it runs.
    pub device: Device,
    /// What its convolutions compute in ([`crate::Precision::F32`] as loaded).
    pub precision: crate::Precision,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector").field("name", &self.spec.name).finish_non_exhaustive()
    }
}

/// A checkpoint's weights: the EMA of the parameters (`optim.ema.<name>`) when asked and
/// present, else the parameters. Names are the model's.
fn checkpoint_weights(
    ckpt: &Path,
    ema: bool,
    device: &Device,
) -> Result<std::collections::HashMap<String, Tensor>, Error> {
    let all = glip_core::weights::load_all(ckpt, device).map_err(|e| Error::file(ckpt, e))?;
    for (name, t) in &all {
        glip_core::weights::check_float(name, t.dtype()).map_err(|e| Error::file(ckpt, e))?;
    }
    let mut out: std::collections::HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| !k.starts_with("optim."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if ema {
        for (k, v) in &all {
            if let Some(name) = k.strip_prefix("optim.ema.") {
                out.insert(name.to_string(), v.clone());
            }
        }
    }
    Ok(out)
}

impl Detector {
    /// Loads a run folder (`inference.json`, `tokenizer.json`, `checkpoint.safetensors`), or a
    /// checkpoint file with the run's `inference.json` beside it, with the built-in
    /// components. Every model parameter must be in the checkpoint: a missing one is an error,
    /// never a random value. A run that kept an EMA of its weights is served with it.
    pub fn load(path: &Path, device: &Device) -> Result<Self, Error> {
        Self::load_with(&Registry::new(), path, device)
    }

    /// [`Detector::load`] with a registry that knows a researcher's components.
    pub fn load_with(registry: &Registry, path: &Path, device: &Device) -> Result<Self, Error> {
        let (dir, ckpt) = run_files(path)?;
        let spec = InferenceSpec::load(&dir)?;
        if !ckpt.exists() {
            return Err(Error::file(&ckpt, "no checkpoint (train first)"));
        }
        let weights = checkpoint_weights(&ckpt, spec.ema, device)?;
        let model = model_from_weights(registry, &spec.model, weights, device)
            .map_err(|e| Error::file(&ckpt, e))?;
        let tok = spec.model.tokenizer().ok_or_else(|| Error::Config {
            key: "model.text.tokenizer".into(),
            msg: "the run's model names no tokenizer".into(),
        })?;
        let tokenizer = Arc::new(Tokenizer::from_file(&tok)?);
        Ok(Self { model, spec, tokenizer, device: device.clone(), precision: Default::default() })
    }

    /// The borrowing view that runs inference (launching eagerly; for CUDA graphs set its
    /// `graphs` to a [`GraphCache`] the caller keeps, which, unlike the detector, stays on its
    /// thread).
    pub fn predictor(&self) -> Predictor<'_> {
        Predictor {
            model: &self.model,
            spec: &self.spec,
            tokenizer: &self.tokenizer,
            device: &self.device,
            precision: self.precision,
            graphs: None,
        }
    }
}

/// Builds `cfg` with every parameter from `weights`: a parameter they lack is an error naming
/// how many and the first ones.
pub fn model_from_weights(
    registry: &Registry,
    cfg: &ModelConfig,
    weights: std::collections::HashMap<String, Tensor>,
    device: &Device,
) -> Result<GlipModel, Error> {
    let varmap = candle_nn::VarMap::new();
    let names: std::collections::HashSet<String> = weights.keys().cloned().collect();
    let source = glip_core::weights::Source {
        prefix: String::new(),
        weights: candle_nn::VarBuilder::from_tensors(weights, DType::F32, device),
        origin: "the checkpoint".into(),
    };
    let vb = glip_core::weights::trainable(&varmap, vec![source], 0, DType::F32, device);
    let model = registry
        .build(cfg, vb, device)
        .map_err(|e| Error::Msg(format!("building the model: {e}")))?;
    let mut missing: Vec<String> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .keys()
        .filter(|k| !names.contains(*k))
        .cloned()
        .collect();
    missing.sort();
    if !missing.is_empty() {
        return Err(Error::Msg(format!(
            "{} parameters of the model are not in the checkpoint (first: {})",
            missing.len(),
            missing.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    drop(model);
    inference_model(registry, cfg, &varmap, device)
}

/// `cfg`'s model over detached views of `varmap`'s tensors (their storage, no copy, so it
/// follows the training's updates): its forward passes record no backprop graph, as under
/// `torch.no_grad`, so no activation is kept and the kernels take their inference paths.
pub fn inference_model(
    registry: &Registry,
    cfg: &ModelConfig,
    varmap: &candle_nn::VarMap,
    device: &Device,
) -> Result<GlipModel, Error> {
    let weights: std::collections::HashMap<String, Tensor> = crate::trainer::named_vars(varmap)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, device);
    registry
        .build(cfg, vb, device)
        .map_err(|e| Error::Msg(format!("building the inference model: {e}")))
}

/// A model with its spec and tokenizer, borrowed: what inference needs (a [`Detector`]'s, or
/// the one training in [`crate::experiment::run_experiment`]).
#[derive(Clone, Copy)]
pub struct Predictor<'a> {
    /// The model.
    pub model: &'a GlipModel,
    /// Its inference spec.
    pub spec: &'a InferenceSpec,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Where it runs.
    pub device: &'a Device,
    /// What the convolutions compute in (inputs and weights rounded to bf16 with f32 sums, or
    /// f32; see `glip_kernels::bf16`).
    pub precision: crate::Precision,
    /// Where to keep CUDA graphs of the passes (on CUDA: a pass whose shapes and host-side
    /// inputs repeat is recorded at its second run and replayed from its third; see
    /// [`GraphCache`]); `None`: every pass launches its kernels one by one.
    pub graphs: Option<&'a GraphCache>,
}

impl std::fmt::Debug for Predictor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor").field("name", &self.spec.name).finish_non_exhaustive()
    }
}

/// One forward pass's prompt: the caption, its tokens, each phrase's character spans (the
/// rows of the positive map) and the index of each phrase in the caller's list.
struct PromptPass<'p> {
    caption: &'p str,
    encoding: &'p glip_text::Encoded,
    rows: Vec<Vec<(usize, usize)>>,
    phrases: &'p [usize],
}

impl<'a> Predictor<'a> {
    /// A predictor computing in f32 (set `precision` for bf16).
    pub fn new(
        model: &'a GlipModel,
        spec: &'a InferenceSpec,
        tokenizer: &'a Tokenizer,
        device: &'a Device,
    ) -> Self {
        Self { model, spec, tokenizer, device, precision: crate::Precision::F32, graphs: None }
    }

    /// Words of `phrases` that the tokenizer does not know (they become `[UNK]`).
    pub fn unknown_words(&self, phrases: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in phrases {
            for w in p.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
                if !self.tokenizer.knows(w) && !out.iter().any(|o| o == w) {
                    out.push(w.to_string());
                }
            }
        }
        out
    }

    /// Grounds `phrases` in `img`: one detection list, best first, boxes in `img`'s pixels.
    pub fn detect(
        &self,
        img: &RgbImage,
        phrases: &[String],
        post: &PostProcessConfig,
    ) -> Result<Vec<Grounded>, Error> {
        Ok(self.detect_batch(std::slice::from_ref(img), phrases, post)?.pop().unwrap_or_default())
    }

    /// Grounds the same `phrases` in every image of `images` (one forward pass per prompt
    /// chunk for the whole batch): per image, a detection list, best first, in its pixels.
    /// Phrases that do not fit one prompt are split over several passes, never truncated.
    /// With a fixed-class head the prompt still conditions the queries, and boxes are
    /// labelled with the run's class names.
    pub fn detect_batch(
        &self,
        images: &[RgbImage],
        phrases: &[String],
        post: &PostProcessConfig,
    ) -> Result<Vec<Vec<Grounded>>, Error> {
        if phrases.is_empty() || phrases.iter().any(|p| p.trim().is_empty()) {
            return Err(Error::Msg(
                "the prompt needs at least one phrase, none of them empty".into(),
            ));
        }
        let chunks = chunked_detection_prompts(self.tokenizer, phrases, ". ")?;
        let passes: Vec<PromptPass<'_>> = chunks
            .iter()
            .map(|c| PromptPass {
                caption: &c.prompt.caption,
                encoding: &c.encoding,
                rows: c.prompt.spans.iter().map(|&s| vec![s]).collect(),
                phrases: &c.categories,
            })
            .collect();
        self.run_passes(images, phrases, &passes, post)
    }

    /// Grounds the phrases of a free caption in every image of `images` (one forward pass for
    /// the batch, the caption whole): per image, a detection list, best first, in its pixels,
    /// each detection's `phrase_index` an index into `phrases`. A phrase is one or more
    /// `[start, end)` character spans of `caption` (ODVG's `tokens_positive`) and is scored
    /// over the tokens they cover, as training aligns it. A caption over the token budget, a
    /// span outside it or a phrase that covers no token is an error.
    pub fn ground_batch(
        &self,
        images: &[RgbImage],
        caption: &str,
        phrases: &[Vec<(usize, usize)>],
        post: &PostProcessConfig,
    ) -> Result<Vec<Vec<Grounded>>, Error> {
        let chars: Vec<char> = caption.chars().collect();
        if caption.trim().is_empty() || phrases.is_empty() {
            return Err(Error::Msg(
                "grounding needs a caption and at least one phrase in it".into(),
            ));
        }
        let mut names = Vec::with_capacity(phrases.len());
        for (i, spans) in phrases.iter().enumerate() {
            glip_core::prompt::check_spans(spans, chars.len())
                .map_err(|e| Error::Msg(format!("phrase {i} of {caption:?}: {e}")))?;
            if spans.is_empty() {
                return Err(Error::Msg(format!("phrase {i} of {caption:?} has no span")));
            }
            names.push(glip_core::prompt::phrase_text(&chars, spans));
        }
        let encoding = self.tokenizer.encode(caption)?;
        for (i, spans) in phrases.iter().enumerate() {
            let row = glip_core::prompt::positive_row(&encoding.offsets, spans, encoding.ids.len());
            if row.iter().all(|&x| x == 0.0) {
                return Err(Error::Msg(format!(
                    "phrase {i} ({:?}) covers no token of {caption:?}",
                    names[i]
                )));
            }
        }
        let index: Vec<usize> = (0..phrases.len()).collect();
        let pass =
            PromptPass { caption, encoding: &encoding, rows: phrases.to_vec(), phrases: &index };
        self.run_passes(images, &names, &[pass], post)
    }

    /// Runs every prompt pass over `images` and merges their detections per image, best
    /// first, `post.top_k` at most; `names[i]` is phrase `i`'s text.
    fn run_passes(
        &self,
        images: &[RgbImage],
        names: &[String],
        passes: &[PromptPass<'_>],
        post: &PostProcessConfig,
    ) -> Result<Vec<Vec<Grounded>>, Error> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        if let Some((k, img)) =
            images.iter().enumerate().find(|(_, i)| i.width() == 0 || i.height() == 0)
        {
            return Err(Error::Msg(format!(
                "image {k} is {}x{} pixels: there is nothing to detect in it",
                img.width(),
                img.height()
            )));
        }
        let small: Vec<RgbImage> = images.iter().map(|i| self.spec.preprocess.apply(i)).collect();
        let mut all: Vec<Vec<Grounded>> = vec![Vec::new(); images.len()];
        for chunk in passes {
            let samples: Vec<Sample> = small
                .iter()
                .zip(images)
                .map(|(s, orig)| Sample {
                    image: s.clone(),
                    image_id: 0,
                    orig_size: orig.dimensions(),
                    caption: chunk.caption.to_string(),
                    boxes: vec![],
                    phrases: vec![],
                    labels: vec![],
                })
                .collect();
            let batch = glip_data::collate(&samples, self.tokenizer, self.device)?;
            let e = chunk.encoding;
            let pm: Vec<Vec<f32>> = chunk
                .rows
                .iter()
                .map(|spans| glip_core::prompt::positive_row(&e.offsets, spans, e.ids.len()))
                .collect();
            let pm = Tensor::new(pm, self.device)?;
            // The pass as a function of its tensors (what a CUDA graph records): pixels, mask,
            // token ids, attention mask, positive map -> scores, boxes.
            let pass = |t: &[Tensor]| -> candle_core::Result<(Vec<Tensor>, LogitsKind)> {
                let images = batch.images.with_tensors(t[0].clone(), t[1].clone())?;
                let text = glip_core::TextBatch::new(
                    t[2].clone(),
                    t[3].clone(),
                    batch.text.offsets.clone(),
                    batch.text.captions.clone(),
                )?;
                let out = glip_kernels::bf16::autocast(self.precision, || {
                    self.model.forward(&images, &text, false)
                })?;
                let logits = &out.pred.pred_logits;
                let scores = match out.logits_kind {
                    LogitsKind::Tokens => token_scores(logits, &t[4], post.token_reduce)?,
                    LogitsKind::Classes(_) => class_scores(logits)?,
                };
                let scores = self.model.detector.score(&out, scores)?;
                Ok((vec![scores, out.pred.pred_boxes], out.logits_kind))
            };
            let inputs = vec![
                batch.images.pixels.clone(),
                batch.images.mask.clone(),
                batch.text.input_ids.clone(),
                batch.text.attention_mask.clone(),
                pm,
            ];
            let (outputs, kind) = match self.graphs {
                Some(graphs) => {
                    let key = GraphKey::new(&inputs, &batch, self.precision, post)?;
                    graphs.run(key, inputs, &pass)?
                }
                None => pass(&inputs)?,
            };
            let (scores, boxes) = (&outputs[0], &outputs[1]);
            let tokens = kind == LogitsKind::Tokens;
            let sizes: Vec<(f32, f32)> =
                images.iter().map(|i| (i.width() as f32, i.height() as f32)).collect();
            let found = batch_detections(scores, boxes, &sizes, post)?;
            for (b, found) in found.into_iter().enumerate() {
                for d in found {
                    let (index, phrase) = if tokens {
                        let i = chunk.phrases[d.category];
                        (i, names[i].clone())
                    } else {
                        (
                            d.category,
                            self.spec
                                .class_names
                                .get(d.category)
                                .cloned()
                                .unwrap_or_else(|| format!("class {}", d.category)),
                        )
                    };
                    all[b].push(Grounded {
                        bbox: d.bbox,
                        score: d.score,
                        phrase_index: index,
                        phrase,
                    });
                }
            }
            if !tokens {
                break; // the classes do not depend on the chunk
            }
        }
        for dets in &mut all {
            dets.sort_by(|a, b| b.score.total_cmp(&a.score));
            dets.truncate(post.top_k);
        }
        Ok(all)
    }

    /// Detections in every image of a COCO folder, each prompted with every category name (in
    /// chunks when they do not fit one prompt), in the dataset's image order. Images are decoded
    /// in parallel a window at a time, and those that resize to the same size go through
    /// [`Predictor::detect_batch`] together (up to 16 a pass, fewer for large images), which
    /// computes each as a pass of its own would, up to f32 round-off; `progress(done, n)`
    /// after each window.
    pub fn coco_folder_detections(
        &self,
        ds: &glip_data::CocoDataset,
        post: &PostProcessConfig,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<Vec<Grounded>>, Error> {
        use rayon::prelude::*;
        const WINDOW: usize = 32;
        const BATCH: usize = 16;
        // At most 16 images of 512 x 512 a pass: inference activations stay well within memory.
        const PIXELS: usize = 16 * 512 * 512;
        let names: Vec<String> = ds.categories.iter().map(|c| c.name.clone()).collect();
        let n = ds.images.len();
        let mut found: Vec<Vec<Grounded>> = Vec::with_capacity(n);
        for start in (0..n).step_by(WINDOW) {
            let window = &ds.images[start..n.min(start + WINDOW)];
            let decoded: Vec<RgbImage> = window
                .par_iter()
                .map(|im| glip_data::detection::load_image(&ds.images_dir.join(&im.file_name)))
                .collect::<Result<_, _>>()?;
            // Same-size groups in order of first appearance, each cut into passes.
            let mut groups: Vec<((u32, u32), Vec<usize>)> = Vec::new();
            for (k, img) in decoded.iter().enumerate() {
                let s = self.spec.preprocess.size(img);
                match groups.iter_mut().find(|g| g.0 == s) {
                    Some(g) => g.1.push(k),
                    None => groups.push((s, vec![k])),
                }
            }
            let mut images: Vec<Option<RgbImage>> = decoded.into_iter().map(Some).collect();
            let mut out: Vec<Vec<Grounded>> = vec![Vec::new(); window.len()];
            for ((w, h), members) in groups {
                let per_pass = (PIXELS / (w as usize * h as usize).max(1)).clamp(1, BATCH);
                for pass in members.chunks(per_pass) {
                    let batch: Vec<RgbImage> =
                        pass.iter().filter_map(|&k| images[k].take()).collect();
                    for (&k, dets) in pass.iter().zip(self.detect_batch(&batch, &names, post)?) {
                        out[k] = dets;
                    }
                }
            }
            found.extend(out);
            progress(found.len(), n);
        }
        Ok(found)
    }

    /// Phrase grounding on the grounding records of an ODVG file (Flickr30k Entities style):
    /// each image grounded with its own caption ([`Predictor::ground_batch`]), and per phrase
    /// ([`record_phrases`]) whether one of its k best boxes has IoU >= 0.5 with one of its
    /// ground-truth boxes. Images are decoded in parallel a window at a time; `progress(done, n)`
    /// after each window. The records are read by [`grounding_records`]: a record that cannot be
    /// grounded is an error naming its line.
    pub fn evaluate_grounding(
        &self,
        odvg: &Path,
        images: &Path,
        post: &PostProcessConfig,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<CaptionRecall, Error> {
        use glip_data::odvg::OdvgRecord;
        use rayon::prelude::*;
        const WINDOW: usize = 32;
        if !self.spec.class_names.is_empty() {
            return Err(Error::Msg(format!(
                "{}: phrase grounding needs a token head; this run's fixed-class head labels boxes with its {} classes, not with a caption's phrases",
                odvg.display(),
                self.spec.class_names.len()
            )));
        }
        let ds = grounding_records(odvg, images, self.tokenizer)?;
        let records: Vec<(usize, &str, &String, &Vec<_>)> = ds
            .records
            .iter()
            .zip(&ds.lines)
            .filter_map(|(r, &line)| match r {
                OdvgRecord::Grounding { filename, caption, regions } => {
                    Some((line, filename.as_str(), caption, regions))
                }
                OdvgRecord::Detection { .. } => None,
            })
            .collect();
        let n = records.len();
        let mut cases = Vec::new();
        let mut done = 0;
        for window in records.chunks(WINDOW) {
            let decoded: Vec<RgbImage> = window
                .par_iter()
                .map(|(_, f, _, _)| glip_data::detection::load_image(&images.join(f)))
                .collect::<Result<_, _>>()?;
            for ((line, _, caption, regions), img) in window.iter().zip(&decoded) {
                let phrases = record_phrases(regions);
                let spans: Vec<Vec<(usize, usize)>> = phrases.iter().map(|p| p.0.clone()).collect();
                let found = self
                    .ground_batch(std::slice::from_ref(img), caption, &spans, post)
                    .map_err(|e| Error::file(odvg, format!("line {line}: {e}")))?
                    .pop()
                    .unwrap_or_default();
                for (k, (_, gt)) in phrases.into_iter().enumerate() {
                    let pred = found.iter().filter(|d| d.phrase_index == k).map(|d| d.bbox);
                    cases.push((pred.collect(), gt));
                }
            }
            done += window.len();
            progress(done, n);
        }
        Ok(CaptionRecall { recall: recall(&cases), phrases: cases.len(), captions: n })
    }

    /// COCO bbox evaluation on a COCO folder ([`Predictor::coco_folder_detections`]), with
    /// Recall@k of each image's categories.
    pub fn evaluate_coco_folder(
        &self,
        ann: &Path,
        images: &Path,
        post: &PostProcessConfig,
        progress: impl FnMut(usize, usize),
    ) -> Result<Evaluation, Error> {
        let ds = glip_data::CocoDataset::open(ann, images, glip_data::ErrorPolicy::Fail)?;
        let found = self.coco_folder_detections(&ds, post, progress)?;
        let mut dets = Vec::new();
        let mut grounding = Vec::new();
        for ((im, objects), found) in ds.images.iter().zip(&ds.objects).zip(found) {
            let gt: Vec<(usize, [f32; 4])> =
                objects.iter().filter(|o| !o.crowd).map(|o| (o.category, o.bbox)).collect();
            grounding.extend(phrase_recall_cases(&found, &gt, ds.categories.len()));
            for g in found {
                let [x0, y0, x1, y1] = g.bbox.map(f64::from);
                dets.push(CocoDetection {
                    image_id: im.id,
                    category_id: ds.categories[g.phrase_index].id,
                    bbox: [x0, y0, x1 - x0, y1 - y0],
                    score: g.score as f64,
                });
            }
        }
        let coco = evaluate_coco(ann, &dets)?;
        Ok(Evaluation { coco, heldout_ap50: -1.0, recall: recall(&grounding) })
    }
}

/// The result of evaluating a model on a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// COCO bbox numbers.
    pub coco: CocoMetrics,
    /// AP50 on the held-out colour-shape pairs (-1 without any).
    pub heldout_ap50: f64,
    /// Recall@1, @5, @10 of phrase grounding: per image and phrase with ground truth, whether
    /// one of the phrase's k best boxes has IoU >= 0.5 with one of its boxes.
    pub recall: [f64; 3],
}

/// The grounding records of an ODVG file, read for phrase grounding: every caption checked
/// against `tokenizer` (one over the token budget, or a phrase that covers no token, is an
/// error naming its line), every image file present, and a detection record an error (it has no
/// caption). What [`Predictor::evaluate_grounding`] reads, and what a run checks before training
/// so that a fault in its validation captions does not wait for the first evaluation.
pub fn grounding_records(
    odvg: &Path,
    images: &Path,
    tokenizer: &Tokenizer,
) -> Result<glip_data::OdvgDataset, Error> {
    let policy = glip_data::ErrorPolicy::Fail;
    // A detection record has no caption: say so before the reader asks for its label map.
    let text = std::fs::read_to_string(odvg).map_err(|e| Error::file(odvg, e))?;
    let detection = text.lines().position(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v.get("detection").is_some() && v.get("grounding").is_none())
    });
    if let Some(i) = detection {
        return Err(Error::file(
            odvg,
            format!("line {}: a detection record; phrase grounding is evaluated on grounding records (a caption and its regions)", i + 1),
        ));
    }
    let tok: Arc<dyn glip_core::prompt::CaptionTokenizer> = Arc::new(tokenizer.clone());
    let ds = glip_data::OdvgDataset::open(odvg, images, None, policy)?
        .with_prompts(Default::default(), Some(tok))
        .check_captions(policy)?
        .without_missing_files(policy)?;
    if ds.records.is_empty() {
        return Err(Error::file(odvg, "no grounding records (captions with regions) to evaluate"));
    }
    Ok(ds)
}

/// Phrase grounding on captions: what [`Predictor::evaluate_grounding`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionRecall {
    /// Recall@1, @5, @10 over the phrases.
    pub recall: [f64; 3],
    /// Phrases with ground truth (the denominator).
    pub phrases: usize,
    /// Captions (grounding records) grounded.
    pub captions: usize,
}

/// The phrases of a grounding record's regions: regions with the same spans are one phrase
/// (a Flickr30k entity with several boxes), in order of first appearance; per phrase its
/// spans and its ground-truth boxes.
pub fn record_phrases(
    regions: &[([f32; 4], Vec<(usize, usize)>)],
) -> Vec<(Vec<(usize, usize)>, Vec<[f32; 4]>)> {
    let mut out: Vec<(Vec<(usize, usize)>, Vec<[f32; 4]>)> = Vec::new();
    for (bbox, spans) in regions {
        let mut key = spans.clone();
        key.sort_unstable();
        match out.iter_mut().find(|(s, _)| *s == key) {
            Some((_, boxes)) => boxes.push(*bbox),
            None => out.push((key, vec![*bbox])),
        }
    }
    out
}

/// The k of [`Evaluation::recall`].
pub const RECALL_KS: [usize; 3] = [1, 5, 10];

/// Per phrase present in an image: its predicted boxes (best first) and its ground truth.
fn phrase_recall_cases(
    found: &[Grounded],
    gt: &[(usize, [f32; 4])],
    n_phrases: usize,
) -> Vec<(Vec<[f32; 4]>, Vec<[f32; 4]>)> {
    (0..n_phrases)
        .filter_map(|p| {
            let g: Vec<[f32; 4]> = gt.iter().filter(|(c, _)| *c == p).map(|(_, b)| *b).collect();
            if g.is_empty() {
                return None;
            }
            let pred = found.iter().filter(|d| d.phrase_index == p).map(|d| d.bbox).collect();
            Some((pred, g))
        })
        .collect()
}

fn recall(cases: &[(Vec<[f32; 4]>, Vec<[f32; 4]>)]) -> [f64; 3] {
    let r = crate::eval::recall_at_k(cases, &RECALL_KS);
    [r[0], r[1], r[2]]
}

/// Detections on the first `n` images of a synthetic split, every image prompted with every
/// category (through [`Predictor::detect_batch`], 16 images a pass, the spec's scoring),
/// with each image's ground-truth objects.
pub fn shapes_detections(
    p: &Predictor<'_>,
    ds: &glip_data::ShapesDataset,
    n: usize,
) -> Result<Vec<(Vec<Grounded>, Vec<glip_data::detection::Object>)>, Error> {
    use glip_data::Dataset;
    let cats = ds.categories().to_vec();
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(16) {
        let (imgs, objects): (Vec<RgbImage>, Vec<_>) =
            (start..n.min(start + 16)).map(|k| ds.render(k)).unzip();
        let found = p.detect_batch(&imgs, &cats, &p.spec.post)?;
        out.extend(found.into_iter().zip(objects));
    }
    Ok(out)
}

/// Evaluates on the first `n` images of a synthetic split ([`shapes_detections`]): COCO AP,
/// AP50 on the held-out categories alone, and Recall@k. Ground-truth files go to `scratch`.
pub fn evaluate_shapes(
    p: &Predictor<'_>,
    ds: &glip_data::ShapesDataset,
    n: usize,
    scratch: &Path,
) -> Result<Evaluation, Error> {
    use glip_data::Dataset;
    let cats = ds.categories().to_vec();
    let size = ds.config().image_size;
    let mut gt_images = Vec::new();
    let mut gt_anns = Vec::new();
    let mut dets: Vec<CocoDetection> = Vec::new();
    let mut grounding = Vec::new();
    for (k, (found, objects)) in shapes_detections(p, ds, n)?.into_iter().enumerate() {
        for o in &objects {
            let [x0, y0, x1, y1] = o.bbox;
            gt_anns.push(serde_json::json!({"id": gt_anns.len() + 1, "image_id": k + 1, "category_id": o.category + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}));
        }
        gt_images.push(serde_json::json!({"id": k + 1, "file_name": format!("{k:06}.png"), "width": size, "height": size}));
        let gt: Vec<(usize, [f32; 4])> = objects.iter().map(|o| (o.category, o.bbox)).collect();
        grounding.extend(phrase_recall_cases(&found, &gt, cats.len()));
        for d in found {
            let [x0, y0, x1, y1] = d.bbox.map(|v| v as f64);
            dets.push(CocoDetection {
                image_id: k as u64 + 1,
                category_id: d.phrase_index as u64 + 1,
                bbox: [x0, y0, x1 - x0, y1 - y0],
                score: d.score as f64,
            });
        }
    }
    let categories: Vec<_> =
        cats.iter().enumerate().map(|(i, c)| serde_json::json!({"id": i + 1, "name": c})).collect();
    let write_gt = |path: &Path, anns: Vec<serde_json::Value>| -> Result<(), Error> {
        let doc =
            serde_json::json!({"images": gt_images, "annotations": anns, "categories": categories});
        std::fs::write(path, doc.to_string()).map_err(|e| Error::file(path, e))
    };
    std::fs::create_dir_all(scratch).map_err(|e| Error::file(scratch, e))?;
    let gt_path = scratch.join("val_gt.json");
    write_gt(&gt_path, gt_anns.clone())?;
    let coco = evaluate_coco(&gt_path, &dets)?;
    let held: Vec<u64> = ds.held_out().iter().map(|&c| c as u64 + 1).collect();
    let heldout_ap50 = if held.is_empty() {
        -1.0
    } else {
        let anns: Vec<_> = gt_anns
            .into_iter()
            .filter(|a| held.contains(&a["category_id"].as_u64().unwrap_or(0)))
            .collect();
        let path = scratch.join("val_gt_heldout.json");
        write_gt(&path, anns)?;
        let hd: Vec<CocoDetection> =
            dets.iter().filter(|d| held.contains(&d.category_id)).cloned().collect();
        // Restrict evaluation to the held-out categories: others have no ground truth and
        // pycocotools averages only over categories with some.
        evaluate_coco(&path, &hd)?.get("AP50")
    };
    Ok(Evaluation { coco, heldout_ap50, recall: recall(&grounding) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--run` as a folder, a checkpoint file (alone: in the current folder, which for tests is
    /// the crate's), or a path that is neither.
    #[test]
    fn a_run_path_is_a_folder_a_checkpoint_file_or_named_as_missing() {
        let (dir, ckpt) = run_files(Path::new("src")).unwrap();
        assert_eq!(
            (dir.as_path(), ckpt.as_path()),
            (Path::new("src"), Path::new("src/checkpoint.safetensors"))
        );
        let (dir, ckpt) = run_files(Path::new("Cargo.toml")).unwrap();
        assert_eq!((dir.as_path(), ckpt.as_path()), (Path::new("."), Path::new("Cargo.toml")));
        let (dir, _) = run_files(Path::new("src/lib.rs")).unwrap();
        assert_eq!(dir, Path::new("src"));
        let err = run_files(Path::new("runs/typo")).unwrap_err().to_string();
        assert!(
            err.contains("runs/typo") && err.contains("no such run folder or checkpoint"),
            "{err}"
        );
    }
}
