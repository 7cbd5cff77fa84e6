//! Contrastive denoising queries (DINO, Zhang et al. 2022, after DN-DETR, Li et al. 2022) for
//! [`crate::QuerySelection`], with phrases for labels.
//!
//! In a training step every target box is copied `groups` times twice over: a *positive*, each
//! corner moved by up to `box_noise` times half the box's width (x) or height (y), and a
//! *negative*, moved by between one and two times that. They enter the decoder beside the
//! selected queries, each with its noised box as reference and its phrase as content; the
//! positive is trained to reconstruct its target (box and phrase), the negative to predict
//! nothing. Their assignment is known, so each target gets `groups` more supervised queries a
//! step than one-to-one matching gives it (one), and the decoder learns to refine a box near an
//! object rather than only the few matched.
//!
//! An attention mask keeps the selected queries from seeing any denoising query, and each
//! group from seeing the others (each group sees itself and the selected queries, as in DINO):
//! the selected queries compute what they compute without denoising, and no group's answer
//! leaks into another's.
//!
//! **Labels are phrases.** DINO embeds a fixed class index; an open-vocabulary model has no
//! classes, only the prompt's tokens. A query's content is a learned linear map of its target's
//! phrase: the mean of the (fused) text features of the tokens its positive map marks. Label
//! noise replaces the phrase, with probability `label_noise`, by that of a target drawn
//! uniformly from the same image (perhaps itself, as DINO draws from every class): the query
//! still reconstructs its own target. DINO's code draws a new label with probability half its
//! `label_noise_ratio` (0.5 in its configs): the default here, 0.25, is that rate.
//!
//! Images of a batch have different target counts: every group holds `m` positive and `m`
//! negative slots (`m` the batch's largest count); an image's unused slots are padding (a
//! unit box, no phrase) trained to predict nothing, as in DINO. As DINO bounds its denoising
//! queries (`dn_number`), `max_queries` caps `2 m groups`: a batch with many objects gets
//! fewer groups (one at least).

use candle_core::{Device, Result, Tensor};
use glip_core::rng::Rng;
use glip_core::validate::{Checker, Validate};
use glip_core::{Match, Target};

/// Options of the denoising queries (`model.detector.denoising` of `query-selection`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoisingConfig {
    /// Noised copies (positive and negative) of every target per training step; 0 turns
    /// denoising off. Default 0.
    #[serde(default)]
    pub groups: usize,
    /// DINO's box noise scale `lambda`: a positive's corners move by up to `lambda` times
    /// half the box's side, a negative's by between `lambda` and `2 lambda` times it. Default
    /// 0.4 (DINO's).
    #[serde(default = "box_noise")]
    pub box_noise: f64,
    /// Probability that a query's phrase is another target's of its image. Default 0.25
    /// (DINO's effective rate).
    #[serde(default = "label_noise")]
    pub label_noise: f64,
    /// At most this many denoising queries per image: a batch whose largest target count is
    /// `m` uses `min(groups, max(1, max_queries / 2m))` groups, so images with many objects
    /// (COCO's crowded ones) do not multiply the decoder's queries. Default 200 (DINO's: its
    /// `dn_number` 100 positive and 100 negative).
    #[serde(default = "max_queries")]
    pub max_queries: usize,
}

fn max_queries() -> usize {
    200
}

fn box_noise() -> f64 {
    0.4
}

fn label_noise() -> f64 {
    0.25
}

impl Default for DenoisingConfig {
    fn default() -> Self {
        Self {
            groups: 0,
            box_noise: box_noise(),
            label_noise: label_noise(),
            max_queries: max_queries(),
        }
    }
}

/// Groups of denoising queries at most: each adds `2 m` queries to every decoder layer.
pub const MAX_GROUPS: usize = 1000;

impl Validate for DenoisingConfig {
    fn validate(&self, c: &mut Checker) {
        let rule = format!("must be at most {MAX_GROUPS} (0 turns denoising off)");
        c.ensure(self.groups <= MAX_GROUPS, "groups", self.groups, rule);
        // A positive's corners stay on their side of the box's centre for `lambda <= 1`; a
        // negative may then cross it (its box is reordered).
        c.finite_above("box_noise", self.box_noise, 0.0, 1.0);
        c.probability("label_noise", self.label_noise);
        let rule = "must be at least 2 (one positive and one negative)";
        c.ensure(self.max_queries >= 2, "max_queries", self.max_queries, rule);
    }
}

/// One batch's denoising queries, made on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct DenoisingQueries {
    /// `(b, n, 4)` noised boxes, cxcywh inside the unit square, row-major.
    pub boxes: Vec<f32>,
    /// `(b, n, t)` each query's phrase: a positive-map row scaled to sum to 1 (zeros for
    /// padding), row-major.
    pub phrases: Vec<f32>,
    /// Queries per image: `groups * 2 * m`.
    pub n: usize,
    /// The batch's largest target count.
    pub m: usize,
    /// Groups.
    pub groups: usize,
    /// Per image, the positive queries and their targets.
    pub matches: Vec<Match>,
}

impl DenoisingQueries {
    /// The queries of `targets` over `t`-token prompts, noise drawn from `seed`; `None` when
    /// `config.groups` is 0 or no image has a target. Positive `j` of group `g` is query
    /// `2 m g + j`, its negative `2 m g + m + j`; `config.groups` groups, fewer where
    /// `config.max_queries` caps them (at least one).
    pub fn new(
        targets: &[Target],
        t: usize,
        config: &DenoisingConfig,
        seed: u64,
    ) -> Result<Option<Self>> {
        let m = targets.iter().map(Target::len).max().unwrap_or(0);
        if config.groups == 0 || m == 0 {
            return Ok(None);
        }
        let groups = config.groups.min((config.max_queries / (2 * m)).max(1));
        let (b, n) = (targets.len(), groups * 2 * m);
        let mut boxes = [0.5f32, 0.5, 1.0, 1.0].repeat(b * n);
        let mut phrases = vec![0f32; b * n * t];
        let mut matches = Vec::with_capacity(b);
        let mut rng = Rng::new(seed);
        let lambda = config.box_noise as f32;
        for (i, target) in targets.iter().enumerate() {
            let k = target.len();
            if k == 0 {
                matches.push(Match::default());
                continue;
            }
            let tb: Vec<Vec<f32>> =
                target.host_boxes()?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            let Some(map) = target.host_positive_map()? else {
                candle_core::bail!(
                    "denoising queries need the targets' positive maps (a token head)"
                )
            };
            let rows: Vec<Vec<f32>> = map.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            let mut m_i = Match::default();
            for g in 0..groups {
                for (j, tbox) in tb.iter().enumerate() {
                    for negative in [false, true] {
                        let q = 2 * m * g + j + if negative { m } else { 0 };
                        let at = i * n + q;
                        let noised = noise_box(tbox, lambda, negative, &mut rng);
                        boxes[4 * at..4 * at + 4].copy_from_slice(&noised);
                        let src = if rng.uniform() < config.label_noise as f32 {
                            rng.below(k)
                        } else {
                            j
                        };
                        let row = &rows[src];
                        let sum: f32 = row.iter().sum();
                        if sum > 0.0 {
                            let dst = &mut phrases[at * t..(at + 1) * t];
                            for (d, &v) in dst.iter_mut().zip(row) {
                                *d = v / sum;
                            }
                        }
                        if !negative {
                            m_i.query.push(q);
                            m_i.target.push(j);
                        }
                    }
                }
            }
            // Made group by group, target by target: the queries `2 m g + j` ascend already.
            matches.push(m_i);
        }
        Ok(Some(Self { boxes, phrases, n, m, groups, matches }))
    }

    /// `(n + k, n + k)` additive self-attention mask of the decoder's queries, these `n` first
    /// and `k` selected ones after: `f32::MIN` where a selected query would see a denoising
    /// one or a group another group, 0 elsewhere.
    pub fn attention_bias(&self, k: usize, device: &Device) -> Result<Tensor> {
        let (n, per) = (self.n, 2 * self.m);
        let l = n + k;
        let mut bias = vec![0f32; l * l];
        for r in 0..l {
            for c in 0..n {
                let hidden = r >= n || r / per != c / per;
                if hidden {
                    bias[r * l + c] = f32::MIN;
                }
            }
        }
        Tensor::from_vec(bias, (l, l), device)
    }
}

/// DINO's box noise: `box (cx, cy, w, h)`'s corners each moved by `lambda * u` times half its
/// width (x) or height (y), `u` uniform in `[0, 1)` for a positive and `[1, 2)` for a negative,
/// in a random direction; clamped into the unit square, reordered should the corners cross,
/// and back to cxcywh.
fn noise_box(b: &[f32], lambda: f32, negative: bool, rng: &mut Rng) -> [f32; 4] {
    let (cx, cy, w, h) = (b[0], b[1], b[2], b[3]);
    let corners = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
    let half = [w / 2.0, h / 2.0, w / 2.0, h / 2.0];
    let mut c = [0f32; 4];
    for e in 0..4 {
        let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
        let u = rng.uniform() + if negative { 1.0 } else { 0.0 };
        c[e] = (corners[e] + sign * u * half[e] * lambda).clamp(0.0, 1.0);
    }
    let (x0, x1) = (c[0].min(c[2]), c[0].max(c[2]));
    let (y0, y1) = (c[1].min(c[3]), c[1].max(c[3]));
    [(x0 + x1) / 2.0, (y0 + y1) / 2.0, x1 - x0, y1 - y0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(boxes: &[[f32; 4]], t: usize) -> Target {
        let dev = Device::Cpu;
        let n = boxes.len();
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        // Target j marks tokens j + 1 and j + 2 (distinct phrases).
        let mut pm = vec![0f32; n * t];
        for j in 0..n {
            pm[j * t + j + 1] = 1.0;
            pm[j * t + j + 2] = 1.0;
        }
        Target::new(
            Tensor::from_vec(flat, (n, 4), &dev).unwrap(),
            None,
            Some(Tensor::from_vec(pm, (n, t), &dev).unwrap()),
        )
        .unwrap()
    }

    fn corners(b: &[f32]) -> [f32; 4] {
        [b[0] - b[2] / 2.0, b[1] - b[3] / 2.0, b[0] + b[2] / 2.0, b[1] + b[3] / 2.0]
    }

    /// Layout, matches, noise bounds and phrases, over 50 seeds: images with 3, 0 and 1
    /// targets (padding to 3), 4 groups, boxes far enough inside the unit square that no
    /// corner is clamped. Each positive's corner is within `lambda` half-sides of its target's
    /// and each negative's between `lambda` and `2 lambda`, up to the f32 rounding of the
    /// corner arithmetic: at most 8 roundings of values under 1 between the two corners
    /// compared (4 making the noised corner and its cxcywh, 2 each making the corners back),
    /// `8 * 2^-24` absolute, over the smallest `lambda` half-side here (0.04). Padding keeps
    /// the unit box and no phrase; without label noise each phrase is its target's row over
    /// its sum.
    #[test]
    fn positives_and_negatives_are_noised_within_their_bands() {
        let t = 8;
        let boxes = [[0.5, 0.5, 0.3, 0.2], [0.3, 0.6, 0.2, 0.3], [0.6, 0.4, 0.25, 0.25]];
        let targets = [target(&boxes, t), target(&[], t), target(&boxes[1..2], t)];
        let config = DenoisingConfig { groups: 4, label_noise: 0.0, ..DenoisingConfig::default() };
        let eps = 8.0 * f32::EPSILON / 2.0 / 0.04;
        for seed in 0..50 {
            let q = DenoisingQueries::new(&targets, t, &config, seed).unwrap().unwrap();
            assert_eq!((q.m, q.n, q.groups), (3, 24, 4));
            assert_eq!(q.matches[1], Match::default());
            for (i, target) in targets.iter().enumerate() {
                let k = target.len();
                let want: Vec<(usize, usize)> =
                    (0..4).flat_map(|g| (0..k).map(move |j| (6 * g + j, j))).collect();
                let got: Vec<(usize, usize)> = q.matches[i]
                    .query
                    .iter()
                    .copied()
                    .zip(q.matches[i].target.iter().copied())
                    .collect();
                assert_eq!(got, want, "image {i}");
                for g in 0..4 {
                    for slot in 0..6 {
                        let (j, negative) = (slot % 3, slot >= 3);
                        let at = i * q.n + 6 * g + slot;
                        let b = &q.boxes[4 * at..4 * at + 4];
                        let p = &q.phrases[at * t..(at + 1) * t];
                        if j >= k {
                            assert_eq!(b, &[0.5, 0.5, 1.0, 1.0], "padding {i} {g} {slot}");
                            assert!(p.iter().all(|&v| v == 0.0), "padding's phrase");
                            continue;
                        }
                        let tb = if i == 2 { boxes[1] } else { boxes[j] };
                        let (got, orig) = (corners(b), corners(&tb));
                        let half = [tb[2] / 2.0, tb[3] / 2.0, tb[2] / 2.0, tb[3] / 2.0];
                        for e in 0..4 {
                            let moved = (got[e] - orig[e]).abs() / (half[e] * 0.4);
                            let (lo, hi) = if negative { (1.0, 2.0) } else { (0.0, 1.0) };
                            assert!(
                                moved >= lo - eps && moved <= hi + eps,
                                "seed {seed} image {i} group {g} slot {slot} corner {e}: moved \
                                 {moved} half-sides x lambda"
                            );
                        }
                        let tj = if i == 2 { 0 } else { j };
                        let mut want = vec![0f32; t];
                        want[tj + 1] = 0.5;
                        want[tj + 2] = 0.5;
                        assert_eq!(p, want.as_slice(), "phrase of {i} {g} {slot}");
                    }
                }
            }
        }
    }

    /// With `label_noise = 1` every query's phrase is one of its image's targets' (each drawn
    /// at least once over the draws), and the matches still point at the query's own target.
    #[test]
    fn label_noise_draws_phrases_of_the_same_image() {
        let t = 8;
        let boxes = [[0.5, 0.5, 0.3, 0.2], [0.3, 0.6, 0.2, 0.3], [0.6, 0.4, 0.25, 0.25]];
        let targets = [target(&boxes, t)];
        let config = DenoisingConfig { groups: 20, label_noise: 1.0, ..DenoisingConfig::default() };
        let q = DenoisingQueries::new(&targets, t, &config, 7).unwrap().unwrap();
        let mut seen = [false; 3];
        for at in 0..q.n {
            let p = &q.phrases[at * t..(at + 1) * t];
            let src = (0..3)
                .find(|&s| p[s + 1] == 0.5 && p[s + 2] == 0.5 && p.iter().sum::<f32>() == 1.0);
            let src = src.unwrap_or_else(|| panic!("query {at}: {p:?} is no target's phrase"));
            seen[src] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert_eq!(q.matches[0].target, (0..20).flat_map(|_| 0..3).collect::<Vec<_>>());
    }

    /// Which query sees which: every selected query sees the selected ones and no denoising
    /// one; a denoising query sees its own group and the selected ones, no other group.
    #[test]
    fn the_mask_isolates_selected_queries_and_groups() {
        let t = 6;
        let targets = [target(&[[0.5, 0.5, 0.3, 0.2], [0.3, 0.6, 0.2, 0.3]], t)];
        let config = DenoisingConfig { groups: 3, ..DenoisingConfig::default() };
        let q = DenoisingQueries::new(&targets, t, &config, 1).unwrap().unwrap();
        let k = 5;
        let bias: Vec<Vec<f32>> = q.attention_bias(k, &Device::Cpu).unwrap().to_vec2().unwrap();
        let group = |x: usize| (x < q.n).then_some(x / 4);
        for (r, row) in bias.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let sees = match (group(r), group(c)) {
                    (_, None) => true,
                    (None, Some(_)) => false,
                    (Some(a), Some(b)) => a == b,
                };
                assert_eq!(v, if sees { 0.0 } else { f32::MIN }, "query {r} -> {c}");
            }
        }
    }

    /// `max_queries` caps the groups by the batch's largest target count, never below one
    /// group: 20 groups of 2 x 3 slots under a cap of 24 are 4 groups; under a cap of 2, one.
    #[test]
    fn max_queries_caps_the_groups() {
        let t = 8;
        let boxes = [[0.5, 0.5, 0.3, 0.2], [0.3, 0.6, 0.2, 0.3], [0.6, 0.4, 0.25, 0.25]];
        let targets = [target(&boxes, t), target(&boxes[..1], t)];
        for (cap, groups) in [(200, 20), (24, 4), (29, 4), (2, 1)] {
            let config = DenoisingConfig { groups: 20, max_queries: cap, ..Default::default() };
            let q = DenoisingQueries::new(&targets, t, &config, 3).unwrap().unwrap();
            assert_eq!((q.groups, q.n), (groups, groups * 6), "cap {cap}");
            assert_eq!(q.matches[0].query.len(), 3 * groups);
            assert_eq!(q.matches[1].query.len(), groups);
        }
    }

    /// Off without groups or without any target; configs outside their ranges are refused.
    #[test]
    fn off_and_refused() {
        let t = 4;
        let off = DenoisingConfig::default();
        let some = [target(&[[0.5, 0.5, 0.3, 0.2]], t)];
        assert!(DenoisingQueries::new(&some, t, &off, 0).unwrap().is_none());
        let on = DenoisingConfig { groups: 2, ..off.clone() };
        let none = [target(&[], t), target(&[], t)];
        assert!(DenoisingQueries::new(&none, t, &on, 0).unwrap().is_none());
        for bad in [
            DenoisingConfig { groups: MAX_GROUPS + 1, ..on.clone() },
            DenoisingConfig { box_noise: 0.0, ..on.clone() },
            DenoisingConfig { box_noise: 1.5, ..on.clone() },
            DenoisingConfig { label_noise: -0.1, ..on.clone() },
            DenoisingConfig { label_noise: f64::NAN, ..on.clone() },
            DenoisingConfig { max_queries: 1, ..on.clone() },
        ] {
            let mut c = Checker::new();
            bad.validate(&mut c);
            assert!(!c.is_ok(), "{bad:?} accepted");
        }
        let mut c = Checker::new();
        on.validate(&mut c);
        assert!(c.is_ok());
    }
}
