//! A trained model on new images: load a run folder, ground a list of phrases in images (prompts
//! chunked to the token budget, never truncated), evaluate on a COCO folder.

use crate::config::{HeadConfig, ModelBuilder};
use crate::eval::{evaluate_coco, CocoDetection, CocoMetrics};
use crate::experiment::ExperimentConfig;
use crate::GlipModel;
use candle_core::{DType, Device, Tensor};
use glip_data::Sample;
use glip_heads::postprocess::{class_scores, detections, token_scores, PostProcessConfig};
use glip_text::{chunked_detection_prompts, Tokenizer};
use image::RgbImage;
use serde::Serialize;
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

/// A trained model ready for inference.
pub struct Detector {
    /// The model.
    pub model: GlipModel,
    /// The run's config.
    pub config: ExperimentConfig,
    /// Its tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Where it runs.
    pub device: Device,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector").field("name", &self.config.name).finish_non_exhaustive()
    }
}

impl Detector {
    /// Loads a run folder (`config.resolved.toml` + `checkpoint.safetensors`), or a checkpoint
    /// file with its `config.resolved.toml` beside it. Every model parameter must be in the
    /// checkpoint: a missing one is an error, never a random value.
    pub fn load(path: &Path, device: &Device) -> Result<Self, String> {
        let (dir, ckpt) = if path.is_dir() {
            (path.to_path_buf(), path.join("checkpoint.safetensors"))
        } else {
            (path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf), path.into())
        };
        let cfg_path = dir.join("config.resolved.toml");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            format!("{}: {e} (a run folder holds the config it trained)", cfg_path.display())
        })?;
        let config: ExperimentConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        if !ckpt.exists() {
            return Err(format!("{}: no checkpoint (train first)", ckpt.display()));
        }
        let weights = glip_core::weights::open(&ckpt, DType::F32, device)
            .map_err(|e| format!("{}: {e}", ckpt.display()))?;
        let names = safetensors_names(&ckpt)?;
        let varmap = candle_nn::VarMap::new();
        let mut sources = Vec::new();
        for (prefix, file) in &config.model.weights {
            let w = glip_core::weights::open(file, DType::F32, device)
                .map_err(|e| format!("model.weights.{prefix} = {}: {e}", file.display()))?;
            sources.push(glip_core::weights::Source { prefix: prefix.clone(), weights: w });
        }
        sources.push(glip_core::weights::Source { prefix: String::new(), weights });
        let vb = glip_core::weights::trainable(&varmap, sources, 0, DType::F32, device);
        let model = ModelBuilder::new()
            .build(&config.model, vb, device)
            .map_err(|e| format!("{}: building the model: {e}", cfg_path.display()))?;
        let missing: Vec<String> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .keys()
            .filter(|k| !names.contains(*k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{}: {} parameters of the model are not in the checkpoint (first: {})",
                ckpt.display(),
                missing.len(),
                missing[0]
            ));
        }
        let tokenizer = Arc::new(
            Tokenizer::from_file(&config.model.text.tokenizer)
                .map_err(|e| format!("model.text.tokenizer: {e}"))?,
        );
        Ok(Self { model, config, tokenizer, device: device.clone() })
    }

    /// The borrowing view that runs inference.
    pub fn predictor(&self) -> Predictor<'_> {
        Predictor {
            model: &self.model,
            config: &self.config,
            tokenizer: &self.tokenizer,
            device: &self.device,
        }
    }
}

/// A model with its config and tokenizer, borrowed: what inference needs (a [`Detector`]'s, or
/// the one training in [`crate::experiment::run_experiment`]).
#[derive(Clone, Copy)]
pub struct Predictor<'a> {
    /// The model.
    pub model: &'a GlipModel,
    /// Its config (input size, head, classes).
    pub config: &'a ExperimentConfig,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Where it runs.
    pub device: &'a Device,
}

impl std::fmt::Debug for Predictor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor").field("name", &self.config.name).finish_non_exhaustive()
    }
}

impl Predictor<'_> {
    /// The side the model was trained at: images are resized so that their longer side is this
    /// (synthetic task), or by the run's `shorter_side` / `max_size` transforms.
    fn resize(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let t = &self.config.data.transforms;
        let (nw, nh) = if let Some(&short) = t.shorter_side.iter().max() {
            let s = short as f32 / w.min(h) as f32;
            let s = if t.max_size > 0 { s.min(t.max_size as f32 / w.max(h) as f32) } else { s };
            ((w as f32 * s).round() as u32, (h as f32 * s).round() as u32)
        } else {
            let side = self.config.data.shapes.image_size as f32;
            let s = side / w.max(h) as f32;
            ((w as f32 * s).round() as u32, (h as f32 * s).round() as u32)
        };
        if (nw, nh) == (w, h) {
            img.clone()
        } else {
            image::imageops::resize(
                img,
                nw.max(1),
                nh.max(1),
                image::imageops::FilterType::Triangle,
            )
        }
    }

    /// The fixed classes of the run's data (the synthetic task's categories).
    pub fn class_names(&self) -> Vec<String> {
        use glip_data::Dataset;
        glip_data::ShapesDataset::new(self.config.data.shapes.clone(), glip_data::Split::Val)
            .map(|d| d.categories().to_vec())
            .unwrap_or_default()
    }

    /// Grounds `phrases` in `img`: one detection list, best first, boxes in `img`'s pixels.
    /// Phrases that do not fit one prompt are split over several forward passes. With a
    /// fixed-class head the prompt still conditions the queries, and boxes are labelled with
    /// the training classes.
    pub fn detect(
        &self,
        img: &RgbImage,
        phrases: &[String],
        post: &PostProcessConfig,
    ) -> Result<Vec<Grounded>, String> {
        if phrases.is_empty() || phrases.iter().any(|p| p.trim().is_empty()) {
            return Err("the prompt needs at least one phrase, none of them empty".into());
        }
        let (w, h) = img.dimensions();
        let small = self.resize(img);
        let chunks = chunked_detection_prompts(self.tokenizer, phrases, ". ")
            .map_err(|e| format!("prompt: {e}"))?;
        let class_names = match self.config.model.head {
            HeadConfig::Class { .. } => self.class_names(),
            HeadConfig::Token => Vec::new(),
        };
        let mut all = Vec::new();
        for chunk in &chunks {
            let sample = Sample {
                image: small.clone(),
                image_id: 0,
                orig_size: (w, h),
                caption: chunk.prompt.caption.clone(),
                boxes: vec![],
                phrases: vec![],
                labels: vec![],
            };
            let batch = glip_data::collate(&[sample], self.tokenizer, self.device)
                .map_err(|e| e.to_string())?;
            let out =
                self.model.forward(&batch.images, &batch.text, false).map_err(|e| e.to_string())?;
            let logits = out.pred.pred_logits.get(0).map_err(|e| e.to_string())?;
            let boxes = out.pred.pred_boxes.get(0).map_err(|e| e.to_string())?;
            let scores = match self.config.model.head {
                HeadConfig::Token => {
                    let e = &chunk.encoding;
                    let pm = glip_core::prompt::positive_map(
                        &e.offsets,
                        &chunk.prompt.spans,
                        e.ids.len(),
                    );
                    let pm = Tensor::new(pm, self.device).map_err(|e| e.to_string())?;
                    token_scores(&logits, &pm, post.token_reduce)
                }
                HeadConfig::Class { .. } => class_scores(&logits),
            }
            .and_then(|sc| out.rescore(0, sc))
            .map_err(|e| e.to_string())?;
            let dets =
                detections(&scores, &boxes, w as f32, h as f32, post).map_err(|e| e.to_string())?;
            for d in dets {
                let (index, phrase) = match self.config.model.head {
                    HeadConfig::Token => {
                        let i = chunk.categories[d.category];
                        (i, phrases[i].clone())
                    }
                    HeadConfig::Class { .. } => (
                        d.category,
                        class_names
                            .get(d.category)
                            .cloned()
                            .unwrap_or_else(|| format!("class {}", d.category)),
                    ),
                };
                all.push(Grounded { bbox: d.bbox, score: d.score, phrase_index: index, phrase });
            }
            if matches!(self.config.model.head, HeadConfig::Class { .. }) {
                break; // the classes do not depend on the chunk
            }
        }
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        all.truncate(post.top_k);
        Ok(all)
    }

    /// COCO bbox evaluation on a COCO folder: every image prompted with every category name
    /// (in chunks when they do not fit one prompt).
    pub fn evaluate_coco_folder(
        &self,
        ann: &Path,
        images: &Path,
        post: &PostProcessConfig,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<CocoMetrics, String> {
        let ds = glip_data::CocoDataset::open(ann, images, glip_data::ErrorPolicy::Fail)
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = ds.categories.iter().map(|c| c.name.clone()).collect();
        let mut dets = Vec::new();
        for (i, im) in ds.images.iter().enumerate() {
            let img = glip_data::detection::load_image(&ds.images_dir.join(&im.file_name))
                .map_err(|e| e.to_string())?;
            for g in self.detect(&img, &names, post)? {
                let [x0, y0, x1, y1] = g.bbox.map(f64::from);
                dets.push(CocoDetection {
                    image_id: im.id,
                    category_id: ds.categories[g.phrase_index].id,
                    bbox: [x0, y0, x1 - x0, y1 - y0],
                    score: g.score as f64,
                });
            }
            progress(i + 1, ds.images.len());
        }
        evaluate_coco(ann, &dets).map_err(|e| e.to_string())
    }
}

/// The tensor names of a safetensors file, from its header alone (8-byte length + JSON).
fn safetensors_names(path: &Path) -> Result<std::collections::HashSet<String>, String> {
    use std::io::Read;
    let bad =
        |e: &dyn std::fmt::Display| format!("{}: not a safetensors file ({e})", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(&e))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad(&format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(&e))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(&e))?;
    Ok(map.into_iter().map(|(k, _)| k).filter(|k| k != "__metadata__").collect())
}
