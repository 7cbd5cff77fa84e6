//! The embedded synthetic task `shapes`: coloured shapes on a light noisy background, one
//! category per colour-shape pair ("red circle"), deterministic from a seed, with colour-shape
//! pairs that never appear in training images but do in validation (open-vocabulary
//! grounding). No files needed; it exports itself as COCO json + PNG and as ODVG.

use crate::detection::{detection_sample, Object, PromptConfig};
use crate::rng::Rng;
use crate::{DataError, Dataset, Sample};
use glip_core::prompt::CaptionTokenizer;
use glip_core::validate::{limits, Checker, Validate};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// The generator's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapesConfig {
    /// Image side in pixels. Default 128.
    #[serde(default = "d_size")]
    pub image_size: u32,
    /// Objects per image: 1 to this many. Default 3.
    #[serde(default = "d_objects")]
    pub max_objects: usize,
    /// Shapes (any of circle, square, triangle, star, cross). Default the first four.
    #[serde(default = "d_shapes")]
    pub shapes: Vec<String>,
    /// Colours (any of red, green, blue, yellow, purple, orange, cyan, black). Default the first
    /// five.
    #[serde(default = "d_colours")]
    pub colours: Vec<String>,
    /// Colour-shape pairs absent from training images, present in validation. Default
    /// `["blue triangle", "yellow star"]`.
    #[serde(default = "d_held_out")]
    pub held_out: Vec<String>,
    /// Object size range as a fraction of the image side. Default `[0.15, 0.45]`.
    #[serde(default = "d_sizes")]
    pub size_range: [f32; 2],
    /// Background noise standard deviation (0-255 scale). Default 8.
    #[serde(default = "d_noise")]
    pub noise: f32,
    /// Training images. Default 2048.
    #[serde(default = "d_train")]
    pub train_images: usize,
    /// Validation images. Default 128.
    #[serde(default = "d_val")]
    pub val_images: usize,
    /// Seed of the whole task. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn d_size() -> u32 {
    128
}
fn d_objects() -> usize {
    3
}
fn d_shapes() -> Vec<String> {
    ["circle", "square", "triangle", "star"].map(String::from).to_vec()
}
fn d_colours() -> Vec<String> {
    ["red", "green", "blue", "yellow", "purple"].map(String::from).to_vec()
}
fn d_held_out() -> Vec<String> {
    vec!["blue triangle".into(), "yellow star".into()]
}
fn d_sizes() -> [f32; 2] {
    [0.15, 0.45]
}
fn d_noise() -> f32 {
    8.0
}
fn d_train() -> usize {
    2048
}
fn d_val() -> usize {
    128
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            image_size: d_size(),
            max_objects: d_objects(),
            shapes: d_shapes(),
            colours: d_colours(),
            held_out: d_held_out(),
            size_range: d_sizes(),
            noise: d_noise(),
            train_images: d_train(),
            val_images: d_val(),
            seed: 0,
        }
    }
}

const KNOWN_SHAPES: [&str; 5] = ["circle", "square", "triangle", "star", "cross"];
const KNOWN_COLOURS: [&str; 8] =
    ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black"];

/// Objects of one image, at most (each is drawn and placed in turn).
const MAX_OBJECTS: usize = 100;

impl Validate for ShapesConfig {
    /// The task's own rules; how many images a run needs is the run's rule.
    fn validate(&self, c: &mut Checker) {
        c.in_range("image_size", self.image_size, 16, limits::IMAGE_SIDE);
        c.in_range("max_objects", self.max_objects, 1, MAX_OBJECTS);
        if self.shapes.is_empty() {
            c.fail_rule("shapes", "give at least one shape");
        }
        for s in self.shapes.iter().filter(|s| !KNOWN_SHAPES.contains(&s.as_str())) {
            c.fail(
                "shapes",
                format!("{s:?}"),
                format!("unknown shape (known: {})", KNOWN_SHAPES.join(", ")),
            );
        }
        if self.colours.is_empty() {
            c.fail_rule("colours", "give at least one colour");
        }
        for col in self.colours.iter().filter(|col| rgb(col).is_none()) {
            c.fail(
                "colours",
                format!("{col:?}"),
                format!("unknown colour (known: {})", KNOWN_COLOURS.join(", ")),
            );
        }
        let [lo, hi] = self.size_range;
        if !(0.0 < lo && lo <= hi && hi <= 0.9) {
            c.fail(
                "size_range",
                format!("{:?}", self.size_range),
                "must satisfy 0 < lo <= hi <= 0.9",
            );
        }
        c.finite_range("noise", self.noise as f64, 0.0, 255.0);
        c.in_range("train_images", self.train_images, 0, limits::IMAGES);
        c.in_range("val_images", self.val_images, 0, limits::IMAGES);
        let names: Vec<String> = self
            .colours
            .iter()
            .flat_map(|col| self.shapes.iter().map(move |s| format!("{col} {s}")))
            .collect();
        for h in self.held_out.iter().filter(|h| !names.contains(h)) {
            c.fail(
                "held_out",
                format!("{h:?}"),
                "is not a category (a colour and a shape of this task)",
            );
        }
        if !names.is_empty() && names.iter().all(|n| self.held_out.contains(n)) {
            c.fail_rule("held_out", "holds out every pair: nothing is left to train on");
        }
    }
}

fn rgb(colour: &str) -> Option<[u8; 3]> {
    Some(match colour {
        "red" => [215, 40, 40],
        "green" => [40, 160, 60],
        "blue" => [40, 80, 215],
        "yellow" => [225, 195, 30],
        "purple" => [145, 50, 175],
        "orange" => [240, 130, 20],
        "cyan" => [30, 190, 200],
        "black" => [25, 25, 25],
        _ => return None,
    })
}

/// Train or validation images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Without the held-out pairs.
    Train,
    /// With every pair.
    Val,
}

/// The dataset of one split.
pub struct ShapesDataset {
    cfg: ShapesConfig,
    split: Split,
    names: Vec<String>,
    allowed: Vec<usize>,
    held_out: Vec<usize>,
    /// Prompt construction.
    pub prompt: PromptConfig,
    tokenizer: Option<Arc<dyn CaptionTokenizer>>,
}

impl std::fmt::Debug for ShapesDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapesDataset")
            .field("split", &self.split)
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl ShapesDataset {
    /// The `split` of the task described by `cfg`. Unknown shapes or colours, held-out pairs
    /// that are not categories, and empty ranges are errors.
    pub fn new(cfg: ShapesConfig, split: Split) -> Result<Self, DataError> {
        let bad = |problem: String| DataError::Record {
            file: "<shapes config>".into(),
            record: "shapes".into(),
            problem,
        };
        let mut c = Checker::new();
        cfg.validate(&mut c);
        c.finish().map_err(|p| bad(p.to_string()))?;
        let names: Vec<String> = cfg
            .colours
            .iter()
            .flat_map(|c| cfg.shapes.iter().map(move |s| format!("{c} {s}")))
            .collect();
        // Every held-out name is a category and some pair is left (checked above).
        let held_out: Vec<usize> =
            cfg.held_out.iter().filter_map(|h| names.iter().position(|n| n == h)).collect();
        let allowed: Vec<usize> = (0..names.len()).filter(|i| !held_out.contains(i)).collect();
        Ok(Self {
            cfg,
            split,
            names,
            allowed,
            held_out,
            prompt: PromptConfig::default(),
            tokenizer: None,
        })
    }

    /// Sets prompt construction and the tokenizer whose budget prompts must fit.
    pub fn with_prompts(
        mut self,
        prompt: PromptConfig,
        tokenizer: Option<Arc<dyn CaptionTokenizer>>,
    ) -> Self {
        self.prompt = prompt;
        self.tokenizer = tokenizer;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &ShapesConfig {
        &self.cfg
    }

    /// Indices (into the categories) of the held-out pairs.
    pub fn held_out(&self) -> &[usize] {
        &self.held_out
    }

    /// The image and its objects, without prompt: deterministic from (seed, split, index).
    pub fn render(&self, index: usize) -> (RgbImage, Vec<Object>) {
        let split_tag = match self.split {
            Split::Train => 1,
            Split::Val => 2,
        };
        let mut rng = Rng::for_sample(self.cfg.seed, split_tag, index as u64);
        let s = self.cfg.image_size;
        let sf = s as f32;
        let tint = [rng.range(225.0, 250.0), rng.range(225.0, 250.0), rng.range(225.0, 250.0)];
        let mut img = RgbImage::new(s, s);
        for p in img.pixels_mut() {
            let n = rng.normal() * self.cfg.noise;
            *p = Rgb(tint.map(|t| (t + n).clamp(0.0, 255.0) as u8));
        }
        let n = 1 + rng.below(self.cfg.max_objects);
        let mut objects: Vec<Object> = Vec::with_capacity(n);
        for k in 0..n {
            let cat = if self.split == Split::Val
                && k == 0
                && !self.held_out.is_empty()
                && rng.uniform() < 0.35
            {
                self.held_out[rng.below(self.held_out.len())]
            } else if self.split == Split::Val {
                rng.below(self.names.len())
            } else {
                self.allowed[rng.below(self.allowed.len())]
            };
            let shape = self.cfg.shapes[cat % self.cfg.shapes.len()].as_str();
            let colour =
                rgb(&self.cfg.colours[cat / self.cfg.shapes.len()]).expect("validated colour");
            // Place without heavy overlap; give up on the object after a few tries.
            for _ in 0..20 {
                let size = rng.range(self.cfg.size_range[0], self.cfg.size_range[1]) * sf;
                let cx = rng.range(size / 2.0, sf - size / 2.0);
                let cy = rng.range(size / 2.0, sf - size / 2.0);
                let bbox = shape_box(shape, cx, cy, size);
                if objects.iter().any(|o| glip_core::boxes::iou_f32(o.bbox, bbox) > 0.2) {
                    continue;
                }
                // The box is the extent of the pixels drawn: exactly what the image shows.
                if let Some(drawn) = draw(&mut img, shape, cx, cy, size, colour) {
                    objects.push(Object { bbox: drawn, category: cat, crowd: false });
                }
                break;
            }
        }
        (img, objects)
    }

    /// Writes the split as COCO json (`annotations.json`) plus PNG files under `images/`.
    pub fn export_coco(&self, dir: &Path) -> Result<(), DataError> {
        let io =
            |path: &Path, e: std::io::Error| DataError::Io { path: path.to_path_buf(), source: e };
        let img_dir = dir.join("images");
        std::fs::create_dir_all(&img_dir).map_err(|e| io(&img_dir, e))?;
        let mut images = Vec::new();
        let mut anns = Vec::new();
        for i in 0..self.len() {
            let (img, objects) = self.render(i);
            let name = format!("{i:06}.png");
            let path = img_dir.join(&name);
            write_png(&img, &path)?;
            images.push(serde_json::json!({"id": i + 1, "file_name": name, "width": img.width(), "height": img.height()}));
            for o in objects {
                let [x0, y0, x1, y1] = o.bbox;
                anns.push(serde_json::json!({
                    "id": anns.len() + 1, "image_id": i + 1, "category_id": o.category + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                }));
            }
        }
        let cats: Vec<_> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| serde_json::json!({"id": i + 1, "name": n}))
            .collect();
        let doc = serde_json::json!({"images": images, "annotations": anns, "categories": cats});
        write_atomic(
            &dir.join("annotations.json"),
            serde_json::to_string(&doc).expect("json").as_bytes(),
        )
    }

    /// Writes the split as ODVG detection records (`odvg.jsonl`, `label_map.json`) with the
    /// images under `images/` (as [`ShapesDataset::export_coco`] names them).
    pub fn export_odvg(&self, dir: &Path) -> Result<(), DataError> {
        self.write_odvg(dir, false)
    }

    /// Writes the split as ODVG grounding records (`odvg.jsonl`): per image a caption naming
    /// its objects ([`ShapesDataset::caption`]) and each object's box with the span of its
    /// phrase, the images under `images/`. Data of the kind GLIP pre-trains on (captions, no
    /// label map, no negatives).
    pub fn export_odvg_grounding(&self, dir: &Path) -> Result<(), DataError> {
        self.write_odvg(dir, true)
    }

    /// A caption naming `objects` and, per object, the character span of its phrase in it. The
    /// categories are named from left to right (by the centre of each one's leftmost object);
    /// objects of one category share a phrase. One category: "a red circle"; two: "a red circle
    /// left of a blue square"; more: "a red circle, a blue square and a green star".
    pub fn caption(&self, objects: &[Object]) -> (String, Vec<(usize, usize)>) {
        let centre = |o: &Object| o.bbox[0] + o.bbox[2];
        let mut cats: Vec<(f32, usize)> = Vec::new();
        for o in objects {
            match cats.iter_mut().find(|c| c.1 == o.category) {
                Some(c) => c.0 = c.0.min(centre(o)),
                None => cats.push((centre(o), o.category)),
            }
        }
        cats.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut caption = String::new();
        let mut span = vec![(0, 0); self.names.len()];
        for (k, &(_, cat)) in cats.iter().enumerate() {
            caption += match (k, cats.len()) {
                (0, _) => "a ",
                (1, 2) => " left of a ",
                (k, n) if k + 1 == n => " and a ",
                _ => ", a ",
            };
            let start = caption.chars().count();
            caption += &self.names[cat];
            span[cat] = (start, caption.chars().count());
        }
        (caption, objects.iter().map(|o| span[o.category]).collect())
    }

    fn write_odvg(&self, dir: &Path, grounding: bool) -> Result<(), DataError> {
        let img_dir = dir.join("images");
        std::fs::create_dir_all(&img_dir)
            .map_err(|e| DataError::Io { path: img_dir.clone(), source: e })?;
        let mut lines = String::new();
        for i in 0..self.len() {
            let (img, objects) = self.render(i);
            let name = format!("{i:06}.png");
            let path = img_dir.join(&name);
            if !path.exists() {
                write_png(&img, &path)?;
            }
            let mut rec = serde_json::json!({"filename": format!("images/{name}"), "height": img.height(), "width": img.width()});
            if grounding {
                let (caption, spans) = self.caption(&objects);
                let regions: Vec<_> = objects
                    .iter()
                    .zip(&spans)
                    .map(|(o, &(s, e))| {
                        serde_json::json!({"bbox": o.bbox, "phrase": self.names[o.category], "tokens_positive": [[s, e]]})
                    })
                    .collect();
                rec["grounding"] = serde_json::json!({"caption": caption, "regions": regions});
            } else {
                let inst: Vec<_> = objects
                    .iter()
                    .map(|o| serde_json::json!({"bbox": o.bbox, "label": o.category, "category": self.names[o.category]}))
                    .collect();
                rec["detection"] = serde_json::json!({ "instances": inst });
            }
            lines.push_str(&rec.to_string());
            lines.push('\n');
        }
        if !grounding {
            let map: serde_json::Map<String, serde_json::Value> = self
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), serde_json::json!(n)))
                .collect();
            write_atomic(
                &dir.join("label_map.json"),
                serde_json::Value::Object(map).to_string().as_bytes(),
            )?;
        }
        write_atomic(&dir.join("odvg.jsonl"), lines.as_bytes())
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a reader never sees a
/// half-written file and an existing file is replaced whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| DataError::Io { path: tmp.clone(), source: e })?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::Io { path: path.to_path_buf(), source: e })
}

fn write_png(img: &RgbImage, path: &Path) -> Result<(), DataError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).map_err(|e| DataError::Image {
        path: path.to_path_buf(),
        what: format!("cannot be encoded: {e}"),
    })?;
    write_atomic(path, &buf.into_inner())
}

fn star_vertices(cx: f32, cy: f32, r: f32) -> Vec<(f32, f32)> {
    (0..10)
        .map(|k| {
            let a = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
            let rr = if k % 2 == 0 { r } else { 0.45 * r };
            (cx + rr * a.cos(), cy + rr * a.sin())
        })
        .collect()
}

/// Tight box of a shape of `size` centred at `(cx, cy)`.
fn shape_box(shape: &str, cx: f32, cy: f32, size: f32) -> [f32; 4] {
    let h = size / 2.0;
    match shape {
        "star" => {
            let v = star_vertices(cx, cy, h);
            let f = |g: fn(f32, f32) -> f32, sel: fn(&(f32, f32)) -> f32, init: f32| {
                v.iter().map(sel).fold(init, g)
            };
            [
                f(f32::min, |p| p.0, f32::MAX),
                f(f32::min, |p| p.1, f32::MAX),
                f(f32::max, |p| p.0, f32::MIN),
                f(f32::max, |p| p.1, f32::MIN),
            ]
        }
        _ => [cx - h, cy - h, cx + h, cy + h],
    }
}

fn inside(shape: &str, x: f32, y: f32, cx: f32, cy: f32, size: f32, star: &[(f32, f32)]) -> bool {
    let h = size / 2.0;
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        "circle" => dx * dx + dy * dy <= h * h,
        "square" => dx.abs() <= h && dy.abs() <= h,
        "triangle" => dy >= -h && dy <= h && dx.abs() <= (dy + h) / 2.0,
        "cross" => (dx.abs() <= h && dy.abs() <= h / 3.0) || (dy.abs() <= h && dx.abs() <= h / 3.0),
        "star" => {
            // even-odd rule
            let mut c = false;
            for i in 0..star.len() {
                let (a, b) = (star[i], star[(i + 1) % star.len()]);
                if (a.1 > y) != (b.1 > y) && x < (b.0 - a.0) * (y - a.1) / (b.1 - a.1) + a.0 {
                    c = !c;
                }
            }
            c
        }
        _ => false,
    }
}

/// Draws the shape; returns the extent `(x0, y0, x1, y1)` of the pixels it coloured.
fn draw(
    img: &mut RgbImage,
    shape: &str,
    cx: f32,
    cy: f32,
    size: f32,
    colour: [u8; 3],
) -> Option<[f32; 4]> {
    let b = shape_box(shape, cx, cy, size);
    let star = if shape == "star" { star_vertices(cx, cy, size / 2.0) } else { Vec::new() };
    let (w, h) = img.dimensions();
    let (x0, y0) = (b[0].floor().max(0.0) as u32, b[1].floor().max(0.0) as u32);
    let (x1, y1) = ((b[2].ceil() as u32).min(w), (b[3].ceil() as u32).min(h));
    let mut ext = [u32::MAX, u32::MAX, 0, 0];
    for y in y0..y1 {
        for x in x0..x1 {
            if inside(shape, x as f32 + 0.5, y as f32 + 0.5, cx, cy, size, &star) {
                img.put_pixel(x, y, Rgb(colour));
                ext = [ext[0].min(x), ext[1].min(y), ext[2].max(x + 1), ext[3].max(y + 1)];
            }
        }
    }
    (ext[2] > ext[0]).then(|| ext.map(|v| v as f32))
}

impl Dataset for ShapesDataset {
    fn len(&self) -> usize {
        match self.split {
            Split::Train => self.cfg.train_images,
            Split::Val => self.cfg.val_images,
        }
    }

    fn categories(&self) -> &[String] {
        &self.names
    }

    fn get(&self, index: usize, rng: &mut Rng) -> Result<Sample, DataError> {
        let (img, objects) = self.render(index);
        let record = || format!("shapes {:?} image {index}", self.split);
        detection_sample(
            img,
            index as u64 + 1,
            &objects,
            &self.names,
            &self.prompt,
            self.tokenizer.as_ref(),
            rng,
            &record,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn obj(x0: f32, category: usize) -> Object {
        Object { bbox: [x0, 10.0, x0 + 20.0, 30.0], category, crowd: false }
    }

    /// The text of every object's phrase, as its span cuts it out of `caption`.
    fn phrases(caption: &str, spans: &[(usize, usize)]) -> Vec<String> {
        let chars: Vec<char> = caption.chars().collect();
        spans.iter().map(|&(s, e)| chars[s..e].iter().collect()).collect()
    }

    #[test]
    fn captions_name_the_objects_left_to_right_with_their_phrases() {
        let ds = ShapesDataset::new(ShapesConfig::default(), Split::Val).unwrap();
        let name = |c: usize| ds.categories()[c].clone();
        let (c, spans) = ds.caption(&[obj(50.0, 6)]);
        assert_eq!(c, format!("a {}", name(6)));
        assert_eq!(phrases(&c, &spans), [name(6)]);
        // Two categories: the one further left first, whatever the objects' order.
        let objects = [obj(70.0, 1), obj(5.0, 12)];
        let (c, spans) = ds.caption(&objects);
        assert_eq!(c, format!("a {} left of a {}", name(12), name(1)));
        assert_eq!(phrases(&c, &spans), [name(1), name(12)]);
        // Objects of one category share one phrase (at its leftmost object's place); more than
        // two categories are listed.
        let objects = [obj(90.0, 3), obj(40.0, 0), obj(10.0, 3), obj(60.0, 7)];
        let (c, spans) = ds.caption(&objects);
        assert_eq!(c, format!("a {}, a {} and a {}", name(3), name(0), name(7)));
        assert_eq!(spans[0], spans[2]);
        assert_eq!(phrases(&c, &spans), [name(3), name(0), name(3), name(7)]);
    }

    #[test]
    fn grounding_export_reads_back_as_the_rendered_objects() {
        let cfg = ShapesConfig { train_images: 12, val_images: 1, ..Default::default() };
        let ds = ShapesDataset::new(cfg, Split::Train).unwrap();
        let dir = std::env::temp_dir().join(format!("glip-data-grounding-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ds.export_odvg_grounding(&dir).unwrap();
        let read =
            crate::OdvgDataset::open(&dir.join("odvg.jsonl"), &dir, None, crate::ErrorPolicy::Fail);
        let back = read.map(|r| (0..ds.len()).map(|i| r.get(i, &mut Rng::new(0))).collect());
        let label_map = dir.join("label_map.json").exists();
        std::fs::remove_dir_all(&dir).ok();
        let back: Vec<Result<crate::Sample, DataError>> = back.unwrap();
        assert!(!label_map, "grounding records need no label map");
        for (i, s) in back.into_iter().enumerate() {
            let s = s.unwrap();
            let (img, objects) = ds.render(i);
            assert_eq!(s.image, img, "image {i}");
            assert_eq!(s.boxes, objects.iter().map(|o| o.bbox).collect::<Vec<_>>(), "image {i}");
            let named: Vec<String> = objects.iter().map(|o| ds.names[o.category].clone()).collect();
            let spans: Vec<(usize, usize)> = s.phrases.iter().map(|p| p[0]).collect();
            assert_eq!(phrases(&s.caption, &spans), named, "image {i}: {:?}", s.caption);
            assert!(s.labels.iter().all(Option::is_none), "grounding records have no labels");
        }
    }
}
