//! `glip detect`: a trained run grounds the phrases of a prompt in images; prints JSON and writes
//! each image with its boxes and labels drawn.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use glip_heads::postprocess::PostProcessConfig;
use glip_train::infer::{Detector, Grounded};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// `glip detect`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["prompt", "caption"])))]
pub struct DetectArgs {
    /// A run folder (`inference.json`, `tokenizer.json` and `checkpoint.safetensors`, as training
    /// writes them) or a checkpoint file in one (`best.safetensors`).
    #[arg(long)]
    run: PathBuf,
    /// What to find: phrases separated by `.` (`"red circle. blue square"`), each name
    /// prompted as GLIP's detection prompts are.
    #[arg(long)]
    prompt: Option<String>,
    /// Or a caption with the phrases to ground marked in brackets (`"a [red circle] left of a
    /// [blue square]"`): the model reads the caption whole, as it reads grounding data.
    #[arg(long)]
    caption: Option<String>,
    /// Images (PNG or JPEG), turned upright by their EXIF orientation as viewers show them (the
    /// boxes are in that image; the JSON says `exif_orientation` when one was applied).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Folder for the drawn images (`<stem>.detections.png`).
    #[arg(long, default_value = "detections")]
    out: PathBuf,
    /// Keep detections scoring at least this.
    #[arg(long, default_value_t = 0.3, value_parser = crate::parse_unit)]
    threshold: f32,
    /// At most this many detections per image.
    #[arg(long, default_value_t = 20, value_parser = crate::count(1, 100_000))]
    top_k: usize,
    /// Per-phrase NMS at this IoU (default: the model's, 0.6 for a dense head, none for set
    /// prediction).
    #[arg(long, value_parser = crate::parse_unit)]
    nms: Option<f32>,
    #[command(flatten)]
    compute: crate::Compute,
    /// On CUDA, replay passes as CUDA graphs: a pass whose batch shape, padding and prompt were
    /// seen before is recorded (second time) and then replayed in one launch. Pays off when
    /// images share a size; a summary goes to stderr. No effect on the CPU.
    #[arg(long)]
    cuda_graph: bool,
}

/// The phrases of a prompt: split at `.`, trimmed, empty pieces dropped.
pub fn phrases(prompt: &str) -> Vec<String> {
    prompt.split('.').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect()
}

/// Runs `glip detect`.
pub fn run(registry: &glip_train::config::Registry, a: DetectArgs) -> Result<()> {
    // What the model reads: a detection prompt made of the phrases, or a marked caption.
    let (phrases, caption) = match (&a.prompt, &a.caption) {
        (Some(prompt), _) => {
            let phrases = phrases(prompt);
            if phrases.is_empty() {
                return Err(anyhow!(
                    "--prompt {prompt:?} names nothing (phrases are separated by '.')"
                ));
            }
            (phrases, None)
        }
        (None, Some(marked)) => {
            let p = glip_core::prompt::Prompt::marked(marked).context("--caption")?;
            (p.phrases(), Some(p))
        }
        (None, None) => return Err(anyhow!("give --prompt or --caption")),
    };
    let (dev, precision) = a.compute.resolve()?;
    let mut det = Detector::load_with(registry, &a.run, &dev)?;
    det.precision = precision;
    let graphs = crate::graphs_on(a.cuda_graph, &dev);
    let unknown = det.predictor().unknown_words(&phrases);
    if !unknown.is_empty() {
        eprintln!(
            "warning: the run's tokenizer does not know {} (read as [UNK]): {}",
            if unknown.len() == 1 { "this word" } else { "these words" },
            unknown.join(", ")
        );
    }
    let post = PostProcessConfig {
        top_k: a.top_k,
        score_threshold: a.threshold,
        nms_iou: a.nms.or(det.spec.post.nms_iou),
        ..det.spec.post.clone()
    };
    crate::check_out_folder(&a.out, "the drawn images")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let mut results = Vec::new();
    let mut unreadable = 0usize;
    let drawn_names = drawn_names(&a.images);
    // One bf16 scope for every image: each convolution's weight is packed once.
    glip_train::autocast(det.precision, || -> Result<()> {
        for (path, name) in a.images.iter().zip(&drawn_names) {
            // An image that does not decode is reported and left out; the others go on (the
            // JSON says which failed, and the exit status is 1).
            let (img, orientation) = match glip_data::detection::load_image_upright(path) {
                Ok(read) => read,
                Err(e) => {
                    eprintln!("error: {e}");
                    results.push(serde_json::json!({"image": path, "error": e.to_string()}));
                    unreadable += 1;
                    continue;
                }
            };
            let p = glip_train::infer::Predictor { graphs: graphs.as_ref(), ..det.predictor() };
            let found = match &caption {
                None => p.detect(&img, &phrases, &post),
                Some(c) => {
                    let spans: Vec<Vec<(usize, usize)>> =
                        c.spans.iter().map(|&s| vec![s]).collect();
                    p.ground_batch(std::slice::from_ref(&img), &c.caption, &spans, &post)
                        .map(|mut f| f.pop().unwrap_or_default())
                }
            }
            .with_context(|| path.display().to_string())?;
            let drawn = a.out.join(name);
            let mut canvas = img.clone();
            draw(&mut canvas, &found);
            save_png_atomic(&canvas, &drawn)?;
            let mut result = serde_json::json!({
                "image": path,
                "width": img.width(),
                "height": img.height(),
                "prompt": a.prompt.as_ref().or(a.caption.as_ref()),
                "detections": found,
                "drawn": drawn,
            });
            if orientation != 1 {
                // Turned upright: the size and the boxes are the upright image's.
                result["exif_orientation"] = orientation.into();
            }
            results.push(result);
        }
        Ok(())
    })?;
    crate::report_graphs(graphs.as_ref());
    println!("{}", serde_json::to_string_pretty(&results)?);
    match unreadable {
        0 => Ok(()),
        n => Err(anyhow!(
            "{n} of {} images could not be read (named above; the others were detected)",
            a.images.len()
        )),
    }
}

/// The drawn file of each image, `<stem>.detections.png`; an image whose name would repeat an
/// earlier one's (`a/x.png`, `b/x.png`, `x.jpg`) gets `<stem>-2.detections.png` (or the next
/// number free), so that none overwrites another's.
fn drawn_names(images: &[PathBuf]) -> Vec<String> {
    let mut used = std::collections::HashSet::new();
    images
        .iter()
        .map(|p| {
            let stem = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let mut name = format!("{stem}.detections.png");
            let mut k = 1;
            while !used.insert(name.clone()) {
                k += 1;
                name = format!("{stem}-{k}.detections.png");
            }
            name
        })
        .collect()
}

fn save_png_atomic(img: &RgbImage, path: &Path) -> Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).with_context(|| path.display().to_string())?;
    Ok(glip_train::write_atomic(path, png.get_ref())?)
}

const COLORS: [[u8; 3]; 8] = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [128, 128, 0],
];

/// Draws every box (2 px, one colour per phrase) with a `phrase score` label above it.
pub fn draw(img: &mut RgbImage, found: &[Grounded]) {
    let scale = if img.width().max(img.height()) >= 512 { 2 } else { 1 };
    for g in found.iter().rev() {
        let c = Rgb(COLORS[g.phrase_index % COLORS.len()]);
        let [x0, y0, x1, y1] = g.bbox.map(|v| v.round().max(0.0) as u32);
        for t in 0..2 * scale {
            rect(img, x0.saturating_sub(t), y0.saturating_sub(t), x1 + t, y1 + t, c);
        }
        let label = format!("{} {:.2}", g.phrase, g.score);
        let (lw, lh) = (label.len() as u32 * 8 * scale + 2, 8 * scale + 2);
        let ly = if y0 >= lh { y0 - lh } else { y1.min(img.height().saturating_sub(lh)) };
        fill(img, x0, ly, x0 + lw, ly + lh, c);
        text(img, x0 + 1, ly + 1, &label, scale, Rgb([255, 255, 255]));
    }
}

fn put(img: &mut RgbImage, x: u32, y: u32, c: Rgb<u8>) {
    if x < img.width() && y < img.height() {
        img.put_pixel(x, y, c);
    }
}

fn rect(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x, y0, c);
        put(img, x, y1, c);
    }
    for y in y0..=y1 {
        put(img, x0, y, c);
        put(img, x1, y, c);
    }
}

fn fill(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, c: Rgb<u8>) {
    for y in y0..y1 {
        for x in x0..x1 {
            put(img, x, y, c);
        }
    }
}

/// 8x8 bitmap text (the `font8x8` crate's basic Latin; other characters as `?`).
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, scale: u32, c: Rgb<u8>) {
    use font8x8::UnicodeFonts;
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).or_else(|| font8x8::BASIC_FONTS.get('?'));
        let Some(glyph) = glyph else { continue };
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let px = x + (i as u32 * 8 + col) * scale + dx;
                            put(img, px, y + row as u32 * scale + dy, c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_with_the_same_stem_are_drawn_to_different_files() {
        let paths: Vec<PathBuf> =
            ["a/x.png", "b/x.png", "x.jpg", "x-2.png", "y.png"].iter().map(PathBuf::from).collect();
        assert_eq!(
            drawn_names(&paths),
            [
                "x.detections.png",
                "x-2.detections.png",
                "x-3.detections.png",
                "x-2-2.detections.png",
                "y.detections.png"
            ]
        );
    }

    #[test]
    fn prompts_split_into_trimmed_phrases() {
        assert_eq!(phrases(" red circle. blue square .. "), ["red circle", "blue square"]);
        assert!(phrases(" . ").is_empty());
    }

    #[test]
    fn drawing_colours_the_box_outline_and_stays_inside_the_image() {
        let mut img = RgbImage::new(40, 30);
        let g = Grounded {
            bbox: [5.0, 12.0, 20.0, 29.9],
            score: 0.9,
            phrase_index: 0,
            phrase: "x".into(),
        };
        draw(
            &mut img,
            &[
                g,
                Grounded {
                    bbox: [30.0, 0.0, 45.0, 40.0],
                    score: 0.5,
                    phrase_index: 1,
                    phrase: "long label".into(),
                },
            ],
        );
        assert_eq!(img.get_pixel(5, 20), &Rgb(COLORS[0]), "left edge");
        assert_eq!(img.get_pixel(12, 20), &Rgb([0, 0, 0]), "inside untouched");
    }
}
