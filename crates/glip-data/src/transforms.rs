//! Transforms of a [`Sample`]: resize, horizontal flip (with "left"/"right" swapped in the
//! caption, as GLIP does), a random crop that keeps every box, all keeping boxes consistent
//! with the pixels. Normalisation and padding happen in [`crate::collate`].

use crate::rng::Rng;
use crate::Sample;
use glip_core::validate::{limits, Checker, Validate};
use image::imageops::{self, FilterType};
use serde::{Deserialize, Serialize};

/// Which transforms run, with their parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Shorter side after resizing: one of these, drawn per sample (empty: no resize).
    #[serde(default)]
    pub shorter_side: Vec<u32>,
    /// Longer side at most this many pixels after resizing (0: no limit).
    #[serde(default)]
    pub max_size: u32,
    /// Probability of a horizontal flip.
    #[serde(default)]
    pub hflip: f32,
    /// Probability of a random crop that keeps every box whole.
    #[serde(default)]
    pub crop: f32,
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self { shorter_side: Vec::new(), max_size: 0, hflip: 0.0, crop: 0.0 }
    }
}

impl Validate for TransformConfig {
    fn validate(&self, c: &mut Checker) {
        for &side in &self.shorter_side {
            c.in_range("shorter_side", side, 16, limits::IMAGE_SIDE);
        }
        if self.max_size != 0 {
            c.in_range("max_size", self.max_size, 16, limits::IMAGE_SIDE);
        }
        c.probability("hflip", self.hflip as f64);
        c.probability("crop", self.crop as f64);
    }
}

impl TransformConfig {
    /// Applies the configured transforms with the sample's own random stream.
    pub fn apply(&self, mut s: Sample, rng: &mut Rng) -> Sample {
        if self.crop > 0.0 && rng.uniform() < self.crop {
            s = random_crop(s, rng);
        }
        if self.hflip > 0.0 && rng.uniform() < self.hflip {
            s = hflip(s);
        }
        if !self.shorter_side.is_empty() {
            let short = self.shorter_side[rng.below(self.shorter_side.len())];
            s = resize(s, short, self.max_size);
        }
        s
    }
}

/// DETR's `get_size_with_aspect_ratio`: the output `(width, height)` for a shorter side of
/// `short`, the longer side capped at `max_size` (0: no cap).
pub fn target_size(w: u32, h: u32, short: u32, max_size: u32) -> (u32, u32) {
    let (mut short, (mn, mx)) = (short as f64, (w.min(h) as f64, w.max(h) as f64));
    if max_size > 0 && mx / mn * short > max_size as f64 {
        short = (max_size as f64 * mn / mx).floor();
    }
    let long = (short * mx / mn).round().max(1.0);
    let short = short.max(1.0);
    if w <= h {
        (short as u32, long as u32)
    } else {
        (long as u32, short as u32)
    }
}

/// Resizes to a shorter side of `short` (aspect kept, longer side at most `max_size`); boxes
/// scale by the pixel factors.
pub fn resize(mut s: Sample, short: u32, max_size: u32) -> Sample {
    let (w, h) = s.image.dimensions();
    let (nw, nh) = target_size(w, h, short, max_size);
    if (nw, nh) == (w, h) {
        return s;
    }
    s.image = imageops::resize(&s.image, nw, nh, FilterType::Triangle);
    let (fx, fy) = (nw as f32 / w as f32, nh as f32 / h as f32);
    // Clamped: a box edge on the image border must stay on it (`h * (nh / h)` can round above
    // `nh` in f32: 109.00001 for a crop resized to a height of 109).
    let (mw, mh) = (nw as f32, nh as f32);
    for b in &mut s.boxes {
        *b = [
            (b[0] * fx).clamp(0.0, mw),
            (b[1] * fy).clamp(0.0, mh),
            (b[2] * fx).clamp(0.0, mw),
            (b[3] * fy).clamp(0.0, mh),
        ];
    }
    s
}

/// Flips horizontally: pixels, boxes (`x -> w - x`), and the words "left" and "right" in the
/// caption, with the phrase spans moved to follow the text.
pub fn hflip(mut s: Sample) -> Sample {
    let w = s.image.width() as f32;
    imageops::flip_horizontal_in_place(&mut s.image);
    for b in &mut s.boxes {
        *b = [w - b[2], b[1], w - b[0], b[3]];
    }
    let (caption, map) = swap_left_right(&s.caption);
    for spans in &mut s.phrases {
        for sp in spans.iter_mut() {
            *sp = (map[sp.0], map[sp.1]);
        }
    }
    s.caption = caption;
    s
}

/// Swaps the whole words "left" and "right" (any case of the first letter kept). Returns the new
/// caption and, for every character position `0..=len` of the old one, its position in the new.
pub fn swap_left_right(caption: &str) -> (String, Vec<usize>) {
    let chars: Vec<char> = caption.chars().collect();
    let mut out = String::with_capacity(caption.len() + 8);
    let mut map = Vec::with_capacity(chars.len() + 1);
    let mut new_len = 0usize;
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let boundary_before = i == 0 || !is_word(chars[i - 1]);
        let matched = if boundary_before {
            [("left", "right"), ("right", "left")].into_iter().find_map(|(from, to)| {
                let n = from.len();
                let word: String = chars.get(i..i + n)?.iter().collect();
                let after_ok = chars.get(i + n).is_none_or(|&c| !is_word(c));
                (word.to_lowercase() == from && after_ok).then(|| {
                    let first_upper = chars[i].is_uppercase();
                    let mut rep: String = to.to_string();
                    if first_upper {
                        rep = rep[..1].to_uppercase() + &rep[1..];
                    }
                    (n, rep)
                })
            })
        } else {
            None
        };
        match matched {
            Some((n, rep)) => {
                // Every old character of the word maps to the word's start, its end to the end.
                for k in 0..n {
                    map.push(if k == 0 { new_len } else { new_len + (k * rep.len()) / n });
                }
                out.push_str(&rep);
                new_len += rep.chars().count();
                i += n;
            }
            None => {
                map.push(new_len);
                out.push(chars[i]);
                new_len += 1;
                i += 1;
            }
        }
    }
    map.push(new_len);
    (out, map)
}

/// Crops a random window that contains every box whole (the window may be the whole image).
pub fn random_crop(mut s: Sample, rng: &mut Rng) -> Sample {
    let (w, h) = s.image.dimensions();
    let (mut bx0, mut by0, mut bx1, mut by1) = (w as f32, h as f32, 0f32, 0f32);
    for b in &s.boxes {
        bx0 = bx0.min(b[0]);
        by0 = by0.min(b[1]);
        bx1 = bx1.max(b[2]);
        by1 = by1.max(b[3]);
    }
    if s.boxes.is_empty() {
        (bx0, by0, bx1, by1) = (w as f32 / 2.0, h as f32 / 2.0, w as f32 / 2.0, h as f32 / 2.0);
    }
    let x0 = rng.range(0.0, bx0.max(0.0)).floor() as u32;
    let y0 = rng.range(0.0, by0.max(0.0)).floor() as u32;
    let x1 = (bx1.min(w as f32).ceil() as u32 + rng.range(0.0, (w as f32 - bx1).max(0.0)) as u32)
        .clamp(x0 + 1, w);
    let y1 = (by1.min(h as f32).ceil() as u32 + rng.range(0.0, (h as f32 - by1).max(0.0)) as u32)
        .clamp(y0 + 1, h);
    s.image = imageops::crop_imm(&s.image, x0, y0, x1 - x0, y1 - y0).to_image();
    let (fx, fy) = (x0 as f32, y0 as f32);
    let (cw, ch) = ((x1 - x0) as f32, (y1 - y0) as f32);
    for b in &mut s.boxes {
        *b = [
            (b[0] - fx).clamp(0.0, cw),
            (b[1] - fy).clamp(0.0, ch),
            (b[2] - fx).clamp(0.0, cw),
            (b[3] - fy).clamp(0.0, ch),
        ];
    }
    s
}
