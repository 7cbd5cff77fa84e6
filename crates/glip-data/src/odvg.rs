//! ODVG jsonl, the grounding format of mmdetection and Grounding DINO. One record a line:
//!
//! ```text
//! {"filename": "a.jpg", "height": 480, "width": 640,
//!  "detection": {"instances": [{"bbox": [x0, y0, x1, y1], "label": 3, "category": "dog"}]}}
//! {"filename": "b.jpg", "height": 480, "width": 640,
//!  "grounding": {"caption": "a dog on a sofa",
//!                "regions": [{"bbox": [x0, y0, x1, y1], "phrase": "a dog", "tokens_positive": [[0, 5]]}]}}
//! ```
//! Detection records name categories through a label map (`{"3": "dog", ...}`).

use crate::detection::{
    check_box, detection_sample, keep, load_image, missing_files, Object, PromptConfig,
};
use crate::error::{Collector, ErrorPolicy, SkipReport};
use crate::rng::Rng;
use crate::{DataError, Dataset, Sample};
use glip_core::prompt::{check_spans, phrase_text, positive_row, CaptionTokenizer};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One validated record.
#[derive(Debug, Clone, PartialEq)]
pub enum OdvgRecord {
    /// Boxes with category labels.
    Detection {
        /// Image file, relative to the images folder.
        filename: String,
        /// Objects (category = index into the label map's sorted labels).
        objects: Vec<Object>,
    },
    /// A caption with grounded regions.
    Grounding {
        /// Image file.
        filename: String,
        /// The caption.
        caption: String,
        /// Boxes `(x0, y0, x1, y1)` and the character spans of each box's phrase.
        regions: Vec<([f32; 4], Vec<(usize, usize)>)>,
    },
}

/// A validated ODVG file.
pub struct OdvgDataset {
    /// The jsonl file.
    pub path: PathBuf,
    /// The images folder.
    pub images_dir: PathBuf,
    /// Records in file order (line numbers in `lines`).
    pub records: Vec<OdvgRecord>,
    /// The 1-based line of each record.
    pub lines: Vec<usize>,
    /// Category names (the label map's values, by ascending label).
    pub categories: Vec<String>,
    /// What was skipped.
    pub report: SkipReport,
    /// Prompt construction for detection records (and grounding records' negatives).
    pub prompt: PromptConfig,
    tokenizer: Option<Arc<dyn CaptionTokenizer>>,
    /// Every distinct phrase of the grounding records and name of the label map, lowercase:
    /// where a caption's negatives come from (`PromptConfig::caption_negatives`).
    phrases: Vec<String>,
    /// The names held out of training, lowercase: never a caption's negative phrase.
    held_out: Vec<String>,
}

impl std::fmt::Debug for OdvgDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdvgDataset")
            .field("path", &self.path)
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

fn f64s(v: Option<&Value>, what: &str) -> Result<Vec<f64>, String> {
    let a = v.and_then(Value::as_array).ok_or(format!("missing `{what}`"))?;
    Ok(a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
}

impl OdvgDataset {
    /// Reads and validates `path`; `label_map` (a json object from label to name) is needed when
    /// there are detection records.
    pub fn open(
        path: &Path,
        images_dir: &Path,
        label_map: Option<&Path>,
        policy: ErrorPolicy,
    ) -> Result<Self, DataError> {
        let mut c = Collector::default();
        let mut labels: Vec<(u64, String)> = Vec::new();
        if let Some(lm) = label_map {
            let text = std::fs::read_to_string(lm)
                .map_err(|e| DataError::Io { path: lm.to_path_buf(), source: e })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
                path: lm.to_path_buf(),
                line: Some(e.line()),
                msg: e.to_string(),
            })?;
            let Some(obj) = v.as_object() else {
                return Err(DataError::Record {
                    file: lm.to_path_buf(),
                    record: "top level".into(),
                    problem: "label map must be an object {\"label\": \"name\"}".into(),
                });
            };
            for (k, name) in obj {
                let name = name.as_str().unwrap_or("").trim().to_string();
                match k.parse::<u64>() {
                    Err(_) => {
                        c.push(lm, format!("label {k:?}"), "label is not a non-negative integer")
                    }
                    Ok(_) if name.is_empty() => {
                        c.push(lm, format!("label {k}"), "empty category name")
                    }
                    Ok(l) => labels.push((l, name)),
                }
            }
            labels.sort();
        }
        let label_index: HashMap<u64, usize> =
            labels.iter().enumerate().map(|(i, (l, _))| (*l, i)).collect();
        let text = std::fs::read_to_string(path)
            .map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })?;
        let mut records = Vec::new();
        let mut lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let ln = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    if policy == ErrorPolicy::Fail {
                        return Err(DataError::Json {
                            path: path.to_path_buf(),
                            line: Some(ln),
                            msg: e.to_string(),
                        });
                    }
                    c.push(path, format!("line {ln}"), format!("malformed json: {e}"));
                    continue;
                }
            };
            let parsed = (|| -> Result<OdvgRecord, String> {
                let filename = v
                    .get("filename")
                    .and_then(Value::as_str)
                    .ok_or("missing `filename`")?
                    .to_string();
                let w = v.get("width").and_then(Value::as_f64).ok_or("missing `width`")?;
                let h = v.get("height").and_then(Value::as_f64).ok_or("missing `height`")?;
                if let Some(det) = v.get("detection") {
                    let inst = det
                        .get("instances")
                        .and_then(Value::as_array)
                        .ok_or("detection without `instances`")?;
                    let mut objects = Vec::new();
                    for (k, o) in inst.iter().enumerate() {
                        let b = f64s(o.get("bbox"), "bbox")
                            .map_err(|e| format!("instance {k}: {e}"))?;
                        if b.len() != 4 {
                            return Err(format!(
                                "instance {k}: bbox has {} numbers, expected 4",
                                b.len()
                            ));
                        }
                        let bbox = check_box([b[0], b[1], b[2], b[3]], w, h)
                            .map_err(|e| format!("instance {k}: {e}"))?;
                        let l = o
                            .get("label")
                            .and_then(Value::as_u64)
                            .ok_or(format!("instance {k}: missing `label`"))?;
                        let &category = label_index.get(&l).ok_or_else(|| match label_map {
                            Some(_) => format!("instance {k}: unknown category label {l}"),
                            None => format!(
                                "instance {k}: category label {l} without a label map (detection \
                                 records name categories through one: {{\"{l}\": \"name\", ...}})"
                            ),
                        })?;
                        objects.push(Object { bbox, category, crowd: false });
                    }
                    Ok(OdvgRecord::Detection { filename, objects })
                } else if let Some(g) = v.get("grounding") {
                    let caption = g
                        .get("caption")
                        .and_then(Value::as_str)
                        .ok_or("grounding without `caption`")?
                        .to_string();
                    let n = caption.chars().count();
                    let regs = g
                        .get("regions")
                        .and_then(Value::as_array)
                        .ok_or("grounding without `regions`")?;
                    let mut regions = Vec::new();
                    for (k, r) in regs.iter().enumerate() {
                        let b =
                            f64s(r.get("bbox"), "bbox").map_err(|e| format!("region {k}: {e}"))?;
                        if b.len() != 4 {
                            return Err(format!(
                                "region {k}: bbox has {} numbers, expected 4",
                                b.len()
                            ));
                        }
                        let bbox = check_box([b[0], b[1], b[2], b[3]], w, h)
                            .map_err(|e| format!("region {k}: {e}"))?;
                        let tp = r
                            .get("tokens_positive")
                            .and_then(Value::as_array)
                            .ok_or(format!("region {k}: missing `tokens_positive`"))?;
                        let mut spans = Vec::new();
                        for s in tp {
                            let s = f64s(Some(s), "span")?;
                            if s.len() != 2 || s.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                                return Err(format!("region {k}: span {s:?} is not [start, end]"));
                            }
                            spans.push((s[0] as usize, s[1] as usize));
                        }
                        if spans.is_empty() {
                            return Err(format!("region {k}: no span"));
                        }
                        check_spans(&spans, n).map_err(|e| format!("region {k}: {e}"))?;
                        regions.push((bbox, spans));
                    }
                    Ok(OdvgRecord::Grounding { filename, caption, regions })
                } else {
                    Err("record has neither `detection` nor `grounding`".into())
                }
            })();
            match parsed {
                Ok(r) => {
                    records.push(r);
                    lines.push(ln);
                }
                Err(e) => c.push(path, format!("line {ln}"), e),
            }
        }
        let report = c.finish(path, policy)?;
        Ok(Self {
            path: path.to_path_buf(),
            images_dir: images_dir.to_path_buf(),
            records,
            lines,
            categories: labels.into_iter().map(|(_, n)| n).collect(),
            report,
            prompt: PromptConfig::default(),
            tokenizer: None,
            phrases: Vec::new(),
            held_out: Vec::new(),
        })
    }

    /// Holds categories out of training (an open-vocabulary split, as
    /// [`crate::CocoDataset::without_categories`]): detection records lose their boxes of them,
    /// and their names leave the label map's, so no prompt names them, not even as a negative
    /// (nor as a caption's negative phrase). Grounding records are kept as written: a caption
    /// may still name one. A name the label map lacks is an error listing its names.
    pub fn without_categories(self, held_out: &[String]) -> Result<Self, DataError> {
        crate::detection::check_held_out(&self.path, "label map", &self.categories, held_out)?;
        Ok(self.without_any_of(held_out))
    }

    /// [`OdvgDataset::without_categories`] of those of `names` the label map has (a source mixed
    /// into a run's training data leaves out what the run holds out, whichever it names).
    pub fn without_any_of(mut self, names: &[String]) -> Self {
        if names.is_empty() {
            return self;
        }
        let new_index =
            crate::detection::keep_categories(&mut self.categories, |c| c.as_str(), names);
        for r in &mut self.records {
            if let OdvgRecord::Detection { objects, .. } = r {
                crate::detection::renumber(objects, &new_index);
            }
        }
        self.held_out.extend(names.iter().map(|n| n.to_lowercase()));
        self.phrases.retain(|p| !self.held_out.contains(p));
        self
    }

    /// Sets prompt construction for detection records, and grounding records' negatives (with
    /// `caption_negatives`, the phrases they are drawn from are gathered here, once).
    pub fn with_prompts(
        mut self,
        prompt: PromptConfig,
        tokenizer: Option<Arc<dyn CaptionTokenizer>>,
    ) -> Self {
        self.phrases = Vec::new();
        if prompt.caption_negatives > 0 {
            let mut phrases: Vec<String> =
                self.categories.iter().map(|n| n.to_lowercase()).collect();
            for r in &self.records {
                if let OdvgRecord::Grounding { caption, regions, .. } = r {
                    phrases.extend(phrase_texts(caption, regions));
                }
            }
            phrases.retain(|p| !p.is_empty() && !self.held_out.contains(p));
            phrases.sort_unstable();
            phrases.dedup();
            self.phrases = phrases;
        }
        self.prompt = prompt;
        self.tokenizer = tokenizer;
        self
    }

    /// Checks every grounding record's caption against the tokenizer given to
    /// [`OdvgDataset::with_prompts`] (nothing to check without one): a caption over the token
    /// budget (captions are not truncated, which would cut phrases off their boxes) and a region
    /// whose phrase covers no token (its box would have nothing to align with) are problems.
    /// Under [`ErrorPolicy::Fail`] they are an error naming each line; under `Skip` those
    /// records are left out and added to [`OdvgDataset::report`].
    pub fn check_captions(mut self, policy: ErrorPolicy) -> Result<Self, DataError> {
        let Some(tok) = self.tokenizer.clone() else { return Ok(self) };
        use rayon::prelude::*;
        // Per record, what is wrong with it (tokenised in parallel: pre-training sets hold
        // hundreds of thousands of captions).
        let found: Vec<Vec<String>> = self
            .records
            .par_iter()
            .map(|r| {
                let OdvgRecord::Grounding { caption, regions, .. } = r else { return Vec::new() };
                let offsets = match tok.encode_caption(caption) {
                    Ok((_, offsets)) => offsets,
                    Err(e) => return vec![format!("caption not usable: {e}")],
                };
                let chars: Vec<char> = caption.chars().collect();
                let mut wrong = Vec::new();
                for (k, (_, spans)) in regions.iter().enumerate() {
                    if positive_row(&offsets, spans, offsets.len()).iter().all(|&x| x == 0.0) {
                        wrong.push(format!(
                            "phrase covers no token: region {k}, {:?}",
                            phrase_text(&chars, spans)
                        ));
                    }
                }
                wrong
            })
            .collect();
        let mut c = Collector::default();
        for (i, wrong) in found.iter().enumerate() {
            for w in wrong {
                c.push(&self.path, format!("line {}", self.lines[i]), w.clone());
            }
        }
        let bad: Vec<bool> = found.iter().map(|w| !w.is_empty()).collect();
        let report = c.finish(&self.path, policy)?;
        if !report.problems.is_empty() {
            let (records, lines) =
                (std::mem::take(&mut self.records), std::mem::take(&mut self.lines));
            (self.records, self.lines) = keep(records, lines, &bad);
            self.report.problems.extend(report.problems);
        }
        Ok(self)
    }

    /// Looks for every record's image file, as [`crate::CocoDataset::without_missing_files`]
    /// does: missing ones are an error naming each line (`Fail`), or their records are left
    /// out and added to [`OdvgDataset::report`] (`Skip`).
    pub fn without_missing_files(mut self, policy: ErrorPolicy) -> Result<Self, DataError> {
        let names: Vec<&str> = (0..self.records.len()).map(|i| self.filename(i)).collect();
        let record = |i: usize| format!("line {} ({})", self.lines[i], names[i]);
        let (problems, missing) =
            missing_files(&self.path, &self.images_dir, &names, record, policy)?;
        let (records, lines) = (std::mem::take(&mut self.records), std::mem::take(&mut self.lines));
        (self.records, self.lines) = keep(records, lines, &missing);
        self.report.problems.extend(problems);
        Ok(self)
    }

    /// `caption` with up to `prompt.caption_negatives` negative phrases (see
    /// [`PromptConfig::caption_negatives`]) and how far the caption moved: phrases of the
    /// dataset that are not among `regions`' and that `caption` does not contain, drawn at
    /// random (up to `8 n + 8` draws, so fewer when few phrases qualify), dropped until the
    /// whole fits the token budget, and put before the caption or after it
    /// at random (always after, a model could tell them by their place). The regions' spans
    /// move by the returned number of characters.
    pub fn with_negatives(
        &self,
        caption: &str,
        regions: &[([f32; 4], Vec<(usize, usize)>)],
        rng: &mut Rng,
    ) -> Result<(String, usize), DataError> {
        let n = self.prompt.caption_negatives;
        if n == 0 {
            return Ok((caption.to_string(), 0));
        }
        let lower = caption.to_lowercase();
        let own = phrase_texts(caption, regions);
        // Drawn at random and kept when new, not the caption's and not in it: a few draws per
        // negative instead of a pass over a pre-training set's every phrase per sample.
        let mut pool: Vec<&String> = Vec::with_capacity(n);
        let m = self.phrases.len();
        for _ in 0..(8 * n + 8) {
            if pool.len() == n || m == 0 {
                break;
            }
            let p = &self.phrases[rng.below(m)];
            if !pool.contains(&p) && !lower.contains(p.as_str()) && !own.contains(p) {
                pool.push(p);
            }
        }
        let before = rng.below(2) == 0;
        let sep = &self.prompt.separator;
        // Before: "red car. bird. a dog on a sofa"; after: "a dog on a sofa. red car. bird."
        // (a space after a caption that ends a sentence already).
        let joined = |negs: &[&String]| -> (String, usize) {
            let names: Vec<&str> = negs.iter().map(|p| p.as_str()).collect();
            let names = names.join(sep);
            if before {
                let head = format!("{names}{sep}");
                (format!("{head}{caption}"), head.chars().count())
            } else {
                let gap = if caption.trim_end().ends_with('.') { " " } else { sep.as_str() };
                (format!("{caption}{gap}{names}."), 0)
            }
        };
        if let Some(tok) = &self.tokenizer {
            while !pool.is_empty() {
                let (c, _) = joined(&pool);
                let fits = tok.count_tokens(&c).is_ok_and(|t| t <= tok.token_budget());
                if fits {
                    break;
                }
                pool.pop();
            }
        }
        Ok(match pool.is_empty() {
            true => (caption.to_string(), 0),
            false => joined(&pool),
        })
    }

    /// Counts of `(detection, grounding)` records.
    pub fn record_kinds(&self) -> (usize, usize) {
        let det = self.records.iter().filter(|r| matches!(r, OdvgRecord::Detection { .. })).count();
        (det, self.records.len() - det)
    }

    fn filename(&self, i: usize) -> &str {
        match &self.records[i] {
            OdvgRecord::Detection { filename, .. } | OdvgRecord::Grounding { filename, .. } => {
                filename
            }
        }
    }

    /// Every image file that is missing or does not decode, as problems.
    pub fn check_images(&self) -> Vec<crate::Problem> {
        use rayon::prelude::*;
        (0..self.records.len())
            .into_par_iter()
            .filter_map(|i| {
                let f = self.filename(i);
                load_image(&self.images_dir.join(f)).err().map(|e| crate::Problem {
                    file: self.path.clone(),
                    record: format!("line {} ({f})", self.lines[i]),
                    problem: e.to_string(),
                })
            })
            .collect()
    }
}

/// The text of each region's phrase (its spans joined by a space), trimmed and lowercase.
fn phrase_texts(caption: &str, regions: &[([f32; 4], Vec<(usize, usize)>)]) -> Vec<String> {
    let chars: Vec<char> = caption.chars().collect();
    regions.iter().map(|(_, spans)| phrase_text(&chars, spans).trim().to_lowercase()).collect()
}

impl Dataset for OdvgDataset {
    fn len(&self) -> usize {
        self.records.len()
    }

    fn categories(&self) -> &[String] {
        &self.categories
    }

    fn get(&self, index: usize, rng: &mut Rng) -> Result<Sample, DataError> {
        let image = load_image(&self.images_dir.join(self.filename(index)))?;
        match &self.records[index] {
            OdvgRecord::Detection { filename, objects } => {
                let record =
                    || format!("{}: line {} ({filename})", self.path.display(), self.lines[index]);
                detection_sample(
                    image,
                    index as u64,
                    objects,
                    &self.categories,
                    &self.prompt,
                    self.tokenizer.as_ref(),
                    rng,
                    &record,
                )
            }
            OdvgRecord::Grounding { caption, regions, .. } => {
                let orig = image.dimensions();
                let (caption, shift) = self.with_negatives(caption, regions, rng)?;
                let moved = |spans: &Vec<(usize, usize)>| -> Vec<(usize, usize)> {
                    spans.iter().map(|&(s, e)| (s + shift, e + shift)).collect()
                };
                Ok(Sample {
                    image,
                    image_id: index as u64,
                    orig_size: orig,
                    caption,
                    boxes: regions.iter().map(|r| r.0).collect(),
                    phrases: regions.iter().map(|r| moved(&r.1)).collect(),
                    labels: vec![None; regions.len()],
                })
            }
        }
    }
}
