//! What COCO and ODVG detection records share: validated boxes, categories, and GLIP's
//! detection prompt over the positive categories plus sampled negatives.

use crate::error::{Collector, ErrorPolicy};
use crate::rng::Rng;
use crate::{DataError, Sample};
use glip_core::prompt::{CaptionTokenizer, Prompt};
use glip_core::validate::{Checker, Validate};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// How detection prompts are built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// Negative categories (absent from the image) added to each prompt, at most. Default 8.
    #[serde(default = "default_negatives")]
    pub max_negatives: usize,
    /// Shuffle the categories of each prompt. Default true.
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Separator between names. Default ". ".
    #[serde(default = "default_sep")]
    pub separator: String,
    /// Use every category in a fixed order (evaluation prompts): no sampling, no shuffle.
    #[serde(default)]
    pub all_categories: bool,
    /// Negative phrases added to each grounding record's caption, at most (`"a dog on a sofa.
    /// red car. cat."`, or before it: `"red car. cat. a dog on a sofa"`, at random): phrases of
    /// the dataset's other captions and its label map's names that the caption does not contain,
    /// sampled, as many as fit the token budget. A caption names only what is in its image, so
    /// without them nothing teaches the model that a phrase can be absent; they assume a caption
    /// names everything in its image that they could name. Default 0 (captions as they are).
    #[serde(default)]
    pub caption_negatives: usize,
}

fn default_negatives() -> usize {
    8
}
fn yes() -> bool {
    true
}
fn default_sep() -> String {
    ". ".into()
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            max_negatives: 8,
            shuffle: true,
            separator: default_sep(),
            all_categories: false,
            caption_negatives: 0,
        }
    }
}

impl Validate for PromptConfig {
    fn validate(&self, c: &mut Checker) {
        // A prompt holds every positive name and these negatives; far more than any
        // tokenizer's budget only costs sampling time, so bound it where that stays small.
        c.in_range("max_negatives", self.max_negatives, 0, 100_000);
        c.in_range("caption_negatives", self.caption_negatives, 0, 100_000);
        if self.separator.trim().is_empty() {
            c.fail("separator", format!("{:?}", self.separator), "must hold a visible character (GLIP's is \". \"): without one the names run together");
        }
    }
}

/// An object of a detection record: `(x0, y0, x1, y1)` pixels and a category index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// Box in pixels, clipped to the image.
    pub bbox: [f32; 4],
    /// Index into the dataset's category list.
    pub category: usize,
    /// A crowd region: excluded from training targets, kept for evaluation.
    pub crowd: bool,
}

/// The error for the first of `held_out` that is not one of `names` (the file's categories),
/// listing them.
pub(crate) fn check_held_out(
    file: &std::path::Path,
    record: &str,
    names: &[String],
    held_out: &[String],
) -> Result<(), DataError> {
    match held_out.iter().find(|n| !names.contains(n)) {
        None => Ok(()),
        Some(unknown) => Err(DataError::Record {
            file: file.to_path_buf(),
            record: record.into(),
            problem: format!(
                "no category named {unknown:?} to hold out (the categories: {})",
                if names.is_empty() { "none".into() } else { names.join(", ") }
            ),
        }),
    }
}

/// Keeps the categories whose name is not one of `held_out`, in order; returns each old
/// index's new one (`None`: held out).
pub(crate) fn keep_categories<T>(
    categories: &mut Vec<T>,
    name: impl Fn(&T) -> &str,
    held_out: &[String],
) -> Vec<Option<usize>> {
    let mut new_index = vec![None; categories.len()];
    let mut kept = Vec::new();
    for (i, c) in std::mem::take(categories).into_iter().enumerate() {
        if !held_out.iter().any(|h| h == name(&c)) {
            new_index[i] = Some(kept.len());
            kept.push(c);
        }
    }
    *categories = kept;
    new_index
}

/// Keeps the objects whose category `new_index` maps to a new index (renumbered), drops the
/// others: what holding categories out does to an image's objects.
pub(crate) fn renumber(objects: &mut Vec<Object>, new_index: &[Option<usize>]) {
    objects.retain_mut(|o| match new_index[o.category] {
        Some(k) => {
            o.category = k;
            true
        }
        None => false,
    });
}

/// Checks a box given as `(x0, y0, x1, y1)` against an image of `w x h`; returns it clipped.
/// Non-finite values, zero or negative sizes (in the file's numbers, or once rounded to the f32
/// the box is returned in), and boxes far outside the image (more than 10% of the image beyond
/// an edge, or no overlap) are problems.
pub fn check_box(b: [f64; 4], w: f64, h: f64) -> Result<[f32; 4], String> {
    if b.iter().any(|v| !v.is_finite()) {
        return Err(format!("box {b:?} is not finite"));
    }
    if b[2] <= b[0] || b[3] <= b[1] {
        return Err(format!("box with zero or negative size: xyxy {b:?}"));
    }
    let (mx, my) = (0.1 * w, 0.1 * h);
    if b[0] < -mx || b[1] < -my || b[2] > w + mx || b[3] > h + my {
        return Err(format!("box far outside its {w}x{h} image: xyxy {b:?}"));
    }
    let c = [b[0].max(0.0), b[1].max(0.0), b[2].min(w), b[3].min(h)];
    if c[2] <= c[0] || c[3] <= c[1] {
        return Err(format!("box outside its {w}x{h} image: xyxy {b:?}"));
    }
    let c = c.map(|v| v as f32);
    if c[2] <= c[0] || c[3] <= c[1] {
        // A width like 1e-300 is positive in the file's f64 and zero in f32, which every box
        // is computed in from here on.
        return Err(format!("box with zero or negative size in f32: xyxy {b:?}"));
    }
    Ok(c)
}

/// Loads and decodes an image (JPEG or PNG) as RGB, its pixels as stored.
pub fn load_image(path: &Path) -> Result<RgbImage, DataError> {
    Ok(read_and_decode(path)?.1.to_rgb8())
}

/// Loads an image as [`load_image`] does, then turns it upright by its EXIF orientation, as
/// image viewers show it (a phone stores a portrait photo sideways, tagged "rotate 90
/// degrees"); returns the EXIF orientation applied, 1 (as stored) to 8. For the photos given to
/// `glip detect`: the model sees them upright and the boxes are in the image a viewer shows.
/// Datasets keep [`load_image`]: COCO's boxes are in the stored pixels, as pycocotools and the
/// PyTorch reference read them (PIL without `exif_transpose`). Metadata that does not parse
/// leaves the image as stored.
pub fn load_image_upright(path: &Path) -> Result<(RgbImage, u8), DataError> {
    let (bytes, mut img) = read_and_decode(path)?;
    // A second decoder reads only the headers: decoding through it instead would skip the
    // allocation limit `load_from_memory` checks (a header claiming 60000x60000).
    let orientation = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .ok()
        .and_then(|reader| reader.into_decoder().ok())
        .and_then(|mut decoder| image::ImageDecoder::orientation(&mut decoder).ok())
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    img.apply_orientation(orientation);
    Ok((img.to_rgb8(), orientation.to_exif()))
}

/// The file's bytes and the image they decode to (within `image`'s default limits on size).
fn read_and_decode(path: &Path) -> Result<(Vec<u8>, image::DynamicImage), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Image {
        path: path.to_path_buf(),
        what: format!("cannot be read: {e}"),
    })?;
    let img = image::load_from_memory(&bytes).map_err(|e| {
        let formats = match e {
            image::ImageError::Unsupported(_) => " (glip reads PNG and JPEG)",
            _ => "",
        };
        DataError::Image {
            path: path.to_path_buf(),
            what: format!("cannot be decoded: {e}{formats}"),
        }
    })?;
    Ok((bytes, img))
}

/// Builds the sample of one image: the prompt over its positive categories plus up to
/// `max_negatives` sampled others, shuffled, fitted to the tokenizer's budget by dropping
/// negatives; boxes ground their category's name.
pub fn detection_sample(
    image: RgbImage,
    image_id: u64,
    objects: &[Object],
    categories: &[String],
    cfg: &PromptConfig,
    tokenizer: Option<&Arc<dyn CaptionTokenizer>>,
    rng: &mut Rng,
    record: &dyn Fn() -> String,
) -> Result<Sample, DataError> {
    let objects: Vec<&Object> = objects.iter().filter(|o| !o.crowd).collect();
    let mut cats: Vec<usize> = if cfg.all_categories {
        (0..categories.len()).collect()
    } else {
        let mut pos: Vec<usize> = objects.iter().map(|o| o.category).collect();
        pos.sort_unstable();
        pos.dedup();
        let mut neg: Vec<usize> = (0..categories.len()).filter(|c| !pos.contains(c)).collect();
        rng.shuffle(&mut neg);
        neg.truncate(cfg.max_negatives);
        let npos = pos.len();
        pos.extend(neg);
        // Fit the budget by dropping negatives (from the end), never positives.
        if let Some(tok) = tokenizer {
            while pos.len() > npos {
                let p = Prompt::detection(
                    &pos.iter().map(|&c| &categories[c]).collect::<Vec<_>>(),
                    &cfg.separator,
                )
                .map_err(|e| DataError::Record {
                    file: "<prompt>".into(),
                    record: record(),
                    problem: e.to_string(),
                })?;
                if tok.count_tokens(&p.caption).map_err(|e| DataError::Record {
                    file: "<prompt>".into(),
                    record: record(),
                    problem: e,
                })? <= tok.token_budget()
                {
                    break;
                }
                pos.pop();
            }
        }
        if cfg.shuffle {
            rng.shuffle(&mut pos);
        }
        pos
    };
    if cats.is_empty() && !categories.is_empty() {
        cats.push(rng.below(categories.len()));
    }
    let names: Vec<&String> = cats.iter().map(|&c| &categories[c]).collect();
    let prompt = Prompt::detection(&names, &cfg.separator).map_err(|e| DataError::Record {
        file: "<prompt>".into(),
        record: record(),
        problem: e.to_string(),
    })?;
    let mut phrases = Vec::with_capacity(objects.len());
    let mut boxes = Vec::with_capacity(objects.len());
    let mut labels = Vec::with_capacity(objects.len());
    for o in objects {
        let Some(k) = cats.iter().position(|&c| c == o.category) else { continue };
        phrases.push(vec![prompt.spans[k]]);
        boxes.push(o.bbox);
        labels.push(Some(o.category as u32));
    }
    let orig = image.dimensions();
    Ok(Sample { image, image_id, orig_size: orig, caption: prompt.caption, boxes, phrases, labels })
}

/// Looks for every one of `files` (relative to `dir`; a `stat` each, in parallel) and applies
/// `policy` to those missing, each a problem of `path` named by `record(i)`: an error under
/// `Fail`; under `Skip`, the problems and, per file, whether it is missing.
pub(crate) fn missing_files(
    path: &Path,
    dir: &Path,
    files: &[&str],
    record: impl Fn(usize) -> String,
    policy: ErrorPolicy,
) -> Result<(Vec<crate::Problem>, Vec<bool>), DataError> {
    use rayon::prelude::*;
    let missing: Vec<bool> = files.par_iter().map(|f| !dir.join(f).is_file()).collect();
    let mut c = Collector::default();
    for i in (0..files.len()).filter(|&i| missing[i]) {
        c.push(path, record(i), "image file missing");
    }
    Ok((c.finish(path, policy)?.problems, missing))
}

/// The pairs `(a[i], b[i])` whose `drop[i]` is false: a dataset's records and what goes with
/// them, without those left out.
pub(crate) fn keep<A, B>(a: Vec<A>, b: Vec<B>, drop: &[bool]) -> (Vec<A>, Vec<B>) {
    a.into_iter().zip(b).zip(drop).filter(|(_, &d)| !d).map(|(pair, _)| pair).unzip()
}
