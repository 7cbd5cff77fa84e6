//! A grounding sample (image, caption, boxes with their phrases) and batching into the model's
//! types.

use crate::DataError;
use candle_core::{Device, Tensor};
use glip_core::prompt::{positive_row, CaptionTokenizer};
use glip_core::{ImageBatch, Target, TextBatch};
use image::RgbImage;

/// ImageNet channel means (RGB), as torchvision.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB), as torchvision.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One image with its caption and grounded boxes.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The (transformed) image.
    pub image: RgbImage,
    /// The dataset's image id.
    pub image_id: u64,
    /// Size `(width, height)` of the image as stored, before transforms.
    pub orig_size: (u32, u32),
    /// The caption (a detection prompt or a free caption).
    pub caption: String,
    /// Boxes `(x0, y0, x1, y1)` in pixels of `image`.
    pub boxes: Vec<[f32; 4]>,
    /// Per box, the character spans of its phrase in `caption` (one or more).
    pub phrases: Vec<Vec<(usize, usize)>>,
    /// Per box, its category index in the dataset's category list (`None` for free grounding).
    pub labels: Vec<Option<u32>>,
}

/// A batch ready for the model and the criterion.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised pixels padded to the largest image, with the valid-pixel mask.
    pub images: ImageBatch,
    /// Tokenised captions.
    pub text: TextBatch,
    /// Per image: boxes as normalised cxcywh (relative to the unpadded image), labels when every
    /// box has one, positive maps over the padded tokens.
    pub targets: Vec<Target>,
    /// Per image: dataset image id.
    pub image_ids: Vec<u64>,
    /// Per image: `(width, height)` of the unpadded transformed image.
    pub sizes: Vec<(u32, u32)>,
    /// Per image: `(width, height)` as stored.
    pub orig_sizes: Vec<(u32, u32)>,
}

/// Normalises and pads images, tokenises captions and builds targets.
pub fn collate(
    samples: &[Sample],
    tok: &dyn CaptionTokenizer,
    device: &Device,
) -> Result<Batch, DataError> {
    let b = samples.len();
    if b == 0 {
        return Err(DataError::Record {
            file: "<batch>".into(),
            record: "collate".into(),
            problem: "no samples to batch (an empty dataset, or every sample skipped)".into(),
        });
    }
    let h = samples.iter().map(|s| s.image.height()).max().unwrap_or(0) as usize;
    let w = samples.iter().map(|s| s.image.width()).max().unwrap_or(0) as usize;
    let mut pixels = vec![0f32; b * 3 * h * w];
    let mut mask = vec![0u8; b * h * w];
    for (i, s) in samples.iter().enumerate() {
        let (iw, ih) = s.image.dimensions();
        for y in 0..ih as usize {
            mask[(i * h + y) * w..(i * h + y) * w + iw as usize].fill(1);
            for x in 0..iw as usize {
                let p = s.image.get_pixel(x as u32, y as u32).0;
                for c in 0..3 {
                    pixels[((i * 3 + c) * h + y) * w + x] =
                        (p[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                }
            }
        }
    }
    // Built on the host and moved: the batch keeps host copies of what the model and the
    // criteria read on the host (the mask, the targets), so a GPU step does not wait for them.
    let host = &Device::Cpu;
    let images = ImageBatch::new(
        Tensor::from_vec(pixels, (b, 3, h, w), host)?,
        Tensor::from_vec(mask, (b, h, w), host)?,
    )?
    .to_device(device)?;
    let mut encs = Vec::with_capacity(b);
    for s in samples {
        let e = tok.encode_caption(&s.caption).map_err(|e| DataError::Record {
            file: "<batch>".into(),
            record: format!("image id {}", s.image_id),
            problem: e,
        })?;
        encs.push(e);
    }
    let t = encs.iter().map(|e| e.0.len()).max().unwrap_or(0);
    let mut ids = vec![0u32; b * t];
    let mut tmask = vec![0u8; b * t];
    let mut offsets = Vec::with_capacity(b);
    for (i, (eid, eoff)) in encs.iter().enumerate() {
        ids[i * t..i * t + eid.len()].copy_from_slice(eid);
        tmask[i * t..i * t + eid.len()].fill(1);
        let mut o = eoff.clone();
        o.resize(t, (0, 0));
        offsets.push(o);
    }
    let captions: Vec<String> = samples.iter().map(|s| s.caption.clone()).collect();
    let text = TextBatch::new(
        Tensor::from_vec(ids, (b, t), device)?,
        Tensor::from_vec(tmask, (b, t), device)?,
        offsets,
        captions,
    )?;
    let mut targets = Vec::with_capacity(b);
    for (s, (_, off)) in samples.iter().zip(&encs) {
        let (iw, ih) = (s.image.width() as f32, s.image.height() as f32);
        let n = s.boxes.len();
        let cxcywh: Vec<f32> = s
            .boxes
            .iter()
            .flat_map(|bb| {
                [
                    (bb[0] + bb[2]) / 2.0 / iw,
                    (bb[1] + bb[3]) / 2.0 / ih,
                    (bb[2] - bb[0]) / iw,
                    (bb[3] - bb[1]) / ih,
                ]
            })
            .collect();
        let pm: Vec<f32> = s.phrases.iter().flat_map(|spans| positive_row(off, spans, t)).collect();
        let labels = if s.labels.iter().all(Option::is_some) {
            Some(Tensor::from_vec(
                s.labels.iter().map(|l| l.unwrap_or(0)).collect::<Vec<u32>>(),
                n,
                host,
            )?)
        } else {
            None
        };
        targets.push(
            Target::new(
                Tensor::from_vec(cxcywh, (n, 4), host)?,
                labels,
                Some(Tensor::from_vec(pm, (n, t), host)?),
            )?
            .to_device(device)?,
        );
    }
    Ok(Batch {
        images,
        text,
        targets,
        image_ids: samples.iter().map(|s| s.image_id).collect(),
        sizes: samples.iter().map(|s| s.image.dimensions()).collect(),
        orig_sizes: samples.iter().map(|s| s.orig_size).collect(),
    })
}
