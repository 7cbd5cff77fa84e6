//! Set criteria: `detr` (softmax cross-entropy with a down-weighted no-object class, for the
//! fixed-class head) and `grounding` (token-level sigmoid focal over positive maps, for the
//! token head), exactly `class_losses` / `token_losses` of `reference/glip_ref.py`; with the
//! [`crate::OrderedMatcher`] either becomes the seed tutorial's `ordered` ablation.

use crate::terms::{giou_loss_sum, l1_sum, sigmoid_focal, weighted_cross_entropy};
use candle_core::{DType, Result, Tensor, D};
use glip_core::boxes::{cxcywh_to_xyxy, paired_generalized_box_iou};
use glip_core::validate::{Checker, Validate};
use glip_core::{
    Criterion, DenoisingOutput, LogitsKind, Losses, Match, Matcher, ModelOutput, Prediction, Target,
};
use serde::{Deserialize, Serialize};

/// Matching costs and loss weights. Defaults are the reference's for the token head; the
/// fixed-class head's reference uses `cost_class = 1` ([`LossConfig::detr`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of the classification cost in matching.
    #[serde(default = "two")]
    pub cost_class: f64,
    /// Weight of the L1 box cost in matching.
    #[serde(default = "five")]
    pub cost_bbox: f64,
    /// Weight of the -GIoU cost in matching.
    #[serde(default = "two")]
    pub cost_giou: f64,
    /// Weight of the classification loss.
    #[serde(default = "one")]
    pub w_class: f64,
    /// Weight of the L1 box loss.
    #[serde(default = "five")]
    pub w_bbox: f64,
    /// Weight of the GIoU loss.
    #[serde(default = "two")]
    pub w_giou: f64,
    /// Cross-entropy weight of the "no object" class (fixed-class head).
    #[serde(default = "eos")]
    pub eos_coef: f64,
    /// Focal alpha (token head).
    #[serde(default = "alpha")]
    pub focal_alpha: f64,
    /// Focal gamma (token head).
    #[serde(default = "two")]
    pub focal_gamma: f64,
    /// Add the same losses on every earlier decoder layer when the model returns them.
    #[serde(default = "yes")]
    pub aux_loss: bool,
}

pub(crate) fn one() -> f64 {
    1.0
}
pub(crate) fn two() -> f64 {
    2.0
}
pub(crate) fn five() -> f64 {
    5.0
}
fn eos() -> f64 {
    0.1
}
pub(crate) fn alpha() -> f64 {
    0.25
}
fn yes() -> bool {
    true
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            cost_class: 2.0,
            cost_bbox: 5.0,
            cost_giou: 2.0,
            w_class: 1.0,
            w_bbox: 5.0,
            w_giou: 2.0,
            eos_coef: 0.1,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            aux_loss: true,
        }
    }
}

impl Validate for LossConfig {
    fn validate(&self, c: &mut Checker) {
        for (k, v) in [
            ("cost_class", self.cost_class),
            ("cost_bbox", self.cost_bbox),
            ("cost_giou", self.cost_giou),
            ("w_class", self.w_class),
            ("w_bbox", self.w_bbox),
            ("w_giou", self.w_giou),
            ("eos_coef", self.eos_coef),
            ("focal_gamma", self.focal_gamma),
        ] {
            c.weight(k, v);
        }
        c.probability("focal_alpha", self.focal_alpha);
    }
}

impl LossConfig {
    /// The reference's `class_criterion` defaults (`cost_class = 1`).
    pub fn detr() -> Self {
        Self { cost_class: 1.0, ..Self::default() }
    }
}

/// A Hungarian-matched (or ordered) set criterion for either head.
pub struct SetCriterion {
    config: LossConfig,
    matcher: Box<dyn Matcher>,
}

impl std::fmt::Debug for SetCriterion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetCriterion").field("config", &self.config).finish_non_exhaustive()
    }
}

/// What a layer's terms are computed against: the logits' kind, the batch's targets, the text
/// mask of the token logits and the count that normalises the sums.
#[derive(Clone, Copy)]
struct Against<'a> {
    kind: LogitsKind,
    targets: &'a [Target],
    text_mask: &'a Tensor,
    num_boxes: f64,
}

/// Per-layer result: the three unweighted terms and the matches.
struct LayerLosses {
    class: Tensor,
    bbox: Tensor,
    giou: Tensor,
    matches: Vec<Match>,
}

fn labels_u32(t: &Target) -> Result<Vec<u32>> {
    match t.host_labels()? {
        Some(l) => l.to_dtype(DType::U32)?.to_vec1(),
        None => candle_core::bail!("the fixed-class criterion needs target labels"),
    }
}

impl SetCriterion {
    /// A criterion with these costs and weights and this matcher.
    pub fn new(config: LossConfig, matcher: Box<dyn Matcher>) -> Self {
        Self { config, matcher }
    }

    /// The configuration.
    pub fn config(&self) -> &LossConfig {
        &self.config
    }

    /// Each image's `(q, n)` matching cost, on the host (`None` for an image without targets):
    /// the whole batch's at once and read in one copy, so a GPU is waited for once per layer
    /// rather than once per image. The targets are padded to the batch's largest count `m`
    /// (a unit box, label 0, an empty positive map; those columns are dropped) and every image's
    /// `(q, m)` block computed side by side: `b q m` pairs, not DETR's `(b q, N)` against all
    /// `N` targets of the batch, which measured 3-4x slower on the CPU (the `set_criterion`
    /// bench). The values are those of one image at a time: the same element-wise operations
    /// (GIoU and L1 of each pair, the class probability gathered), the token head's product
    /// summing the same `t` tokens.
    ///
    /// Also returns every target box of the batch, `(N, 4)` on the device, image-major (`None`
    /// without any).
    fn costs(
        &self,
        pred: &Prediction,
        kind: LogitsKind,
        targets: &[Target],
    ) -> Result<(Vec<Option<Tensor>>, Option<Tensor>)> {
        let c = &self.config;
        let (b, q, nc) = pred.pred_logits.dims3()?;
        let m = targets.iter().map(Target::len).max().unwrap_or(0);
        if m == 0 {
            return Ok((vec![None; targets.len()], None));
        }
        let (dev, host) = (pred.pred_logits.device(), &candle_core::Device::Cpu);
        let host_boxes: Vec<Vec<[f32; 4]>> = targets
            .iter()
            .map(|t| {
                let v: Vec<Vec<f32>> = t.host_boxes()?.to_dtype(DType::F32)?.to_vec2()?;
                Ok(v.into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect())
            })
            .collect::<Result<_>>()?;
        let all_boxes: Vec<f32> = host_boxes.iter().flatten().flatten().copied().collect();
        let n_all = all_boxes.len() / 4;
        let padded: Vec<f32> = host_boxes
            .iter()
            .flat_map(|bx| {
                let pad = std::iter::repeat_n([0.5f32, 0.5, 1.0, 1.0], m - bx.len());
                bx.iter().copied().chain(pad).flatten()
            })
            .collect();
        // Each prediction against each (padded) target of its image: (b, q, m, 4) -> (b q m, 4).
        let pairs = |x: Tensor| x.contiguous()?.reshape((b * q * m, 4));
        let boxes = pred.pred_boxes.detach().unsqueeze(2)?.broadcast_as((b, q, m, 4))?;
        let tb = Tensor::from_vec(padded, (b, 1, m, 4), dev)?.broadcast_as((b, q, m, 4))?;
        let (boxes, tb) = (pairs(boxes)?, pairs(tb)?);
        let l1 = (&boxes - &tb)?.abs()?.sum(D::Minus1)?.reshape((b, q, m))?;
        let giou = paired_generalized_box_iou(&cxcywh_to_xyxy(&boxes)?, &cxcywh_to_xyxy(&tb)?)?
            .reshape((b, q, m))?;
        let logits = pred.pred_logits.detach();
        let cls = match kind {
            LogitsKind::Classes(_) => {
                let mut idx = Vec::with_capacity(b * q * m);
                for t in targets {
                    let mut labels = if t.is_empty() { Vec::new() } else { labels_u32(t)? };
                    labels.resize(m, 0);
                    for _ in 0..q {
                        idx.extend_from_slice(&labels);
                    }
                }
                let prob = candle_nn::ops::softmax_last_dim(&logits)?;
                prob.gather(&Tensor::from_vec(idx, (b, q, m), dev)?, 2)?.neg()?
            }
            LogitsKind::Tokens => {
                let mut pm = vec![0f32; b * m * nc];
                for (i, t) in targets.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
                    let Some(map) = t.host_positive_map()? else {
                        candle_core::bail!("the grounding criterion needs target positive maps")
                    };
                    let rows: Vec<Vec<f32>> = map.to_dtype(DType::F32)?.to_vec2()?;
                    for (j, row) in rows.iter().enumerate() {
                        if row.len() != nc {
                            candle_core::bail!(
                                "target {i}'s positive map has {} tokens, the token logits {nc}",
                                row.len()
                            )
                        }
                        pm[(i * m + j) * nc..(i * m + j + 1) * nc].copy_from_slice(row);
                    }
                }
                let pm = Tensor::from_vec(pm, (b, m, nc), dev)?;
                let (a, g) = (c.focal_alpha, c.focal_gamma);
                let p = candle_nn::ops::sigmoid(&logits)?;
                let one_minus_p = (1.0 - &p)?;
                let pos = ((one_minus_p.powf(g)? * a)? * (&p + 1e-8)?.log()?.neg()?)?;
                let neg = ((p.powf(g)? * (1.0 - a))? * (&one_minus_p + 1e-8)?.log()?.neg()?)?;
                // (b, 1, m): each target's token count, at least 1.
                let n = pm.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?.transpose(1, 2)?;
                (pos - neg)?.matmul(&pm.transpose(1, 2)?.contiguous()?)?.broadcast_div(&n)?
            }
        };
        let cost = (((cls * c.cost_class)? + (l1 * c.cost_bbox)?)? - (giou * c.cost_giou)?)?;
        let cost = cost.to_device(host)?;
        let costs = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (!t.is_empty())
                    .then(|| cost.get(i)?.narrow(1, 0, t.len())?.contiguous())
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok((costs, Some(Tensor::from_vec(all_boxes, (n_all, 4), dev)?)))
    }

    fn layer(&self, pred: &Prediction, on: Against<'_>) -> Result<LayerLosses> {
        let (kind, targets) = (on.kind, on.targets);
        let b = pred.pred_logits.dim(0)?;
        if targets.len() != b {
            candle_core::bail!("{} targets for a batch of {b} images", targets.len());
        }
        let (costs, all_boxes) = self.costs(pred, kind, targets)?;
        let matches = costs
            .iter()
            .map(|cost| cost.as_ref().map_or(Ok(Match::default()), |c| self.matcher.assign(c)))
            .collect::<Result<Vec<Match>>>()?;
        self.matched(pred, on, matches, all_boxes)
    }

    /// The three terms of `pred` under `matches` (found by the matcher, or known: denoising
    /// queries), `all_boxes` every target box of the batch (image-major).
    fn matched(
        &self,
        pred: &Prediction,
        on: Against<'_>,
        matches: Vec<Match>,
        all_boxes: Option<Tensor>,
    ) -> Result<LayerLosses> {
        let Against { kind, targets, text_mask, num_boxes } = on;
        let (b, q, nc) = pred.pred_logits.dims3()?;
        let dev = pred.pred_logits.device();
        let class = match kind {
            LogitsKind::Classes(n) => {
                if nc != n + 1 {
                    candle_core::bail!(
                        "pred_logits has {nc} classes, expected {} (num_classes + 1)",
                        n + 1
                    );
                }
                let mut tc = vec![n as u32; b * q];
                for (i, (m, t)) in matches.iter().zip(targets).enumerate() {
                    let labels = labels_u32(t)?;
                    for (&qi, &ti) in m.query.iter().zip(&m.target) {
                        tc[i * q + qi] = labels[ti];
                    }
                }
                let mut w = vec![1f32; n + 1];
                w[n] = self.config.eos_coef as f32;
                weighted_cross_entropy(
                    &pred.pred_logits,
                    &Tensor::from_vec(tc, (b, q), dev)?,
                    &Tensor::new(w, dev)?,
                )?
            }
            LogitsKind::Tokens => {
                let mut tm = vec![0f32; b * q * nc];
                for (i, (m, t)) in matches.iter().zip(targets).enumerate() {
                    if m.query.is_empty() {
                        continue;
                    }
                    let Some(pm) = t.host_positive_map()? else {
                        candle_core::bail!("the grounding criterion needs target positive maps")
                    };
                    let pm: Vec<Vec<f32>> = pm.to_dtype(DType::F32)?.to_vec2()?;
                    for (&qi, &ti) in m.query.iter().zip(&m.target) {
                        let row = &pm[ti];
                        let k = row.len().min(nc);
                        tm[(i * q + qi) * nc..(i * q + qi) * nc + k].copy_from_slice(&row[..k]);
                    }
                }
                let tm = Tensor::from_vec(tm, (b, q, nc), dev)?;
                let mask = text_mask.to_dtype(DType::F32)?.unsqueeze(1)?; // (b, 1, t)
                let focal = sigmoid_focal(
                    &pred.pred_logits,
                    &tm,
                    self.config.focal_alpha,
                    self.config.focal_gamma,
                )?;
                (focal.broadcast_mul(&mask)?.sum_all()? / num_boxes)?
            }
        };
        // The matched pairs of the whole batch: predictions by `image q + query`, targets by
        // their place among all the batch's boxes (image-major, as the costs above).
        let (mut src, mut tgt, mut at) = (Vec::new(), Vec::new(), 0);
        for (i, (m, t)) in matches.iter().zip(targets).enumerate() {
            src.extend(m.query.iter().map(|&x| (i * q + x) as u32));
            tgt.extend(m.target.iter().map(|&x| (at + x) as u32));
            at += t.len();
        }
        let (bbox, giou) = match all_boxes {
            Some(tb) if !src.is_empty() => {
                let s = pred
                    .pred_boxes
                    .reshape((b * q, 4))?
                    .index_select(&Tensor::new(src, dev)?, 0)?;
                let t = tb.index_select(&Tensor::new(tgt, dev)?, 0)?;
                ((l1_sum(&s, &t)? / num_boxes)?, (giou_loss_sum(&s, &t)? / num_boxes)?)
            }
            _ => {
                let z = pred.pred_boxes.sum_all()?.affine(0.0, 0.0)?;
                (z.clone(), z)
            }
        };
        Ok(LayerLosses { class, bbox, giou, matches })
    }
}

impl Criterion for SetCriterion {
    fn forward(&self, out: &ModelOutput, targets: &[Target]) -> Result<Losses> {
        let count = targets.iter().map(Target::len).sum::<usize>();
        let num_boxes = count.max(1) as f64;
        let class_name = match out.logits_kind {
            LogitsKind::Classes(_) => "loss_ce",
            LogitsKind::Tokens => "loss_cls",
        };
        let c = &self.config;
        let mut terms = Vec::new();
        let mut total: Option<Tensor> = None;
        let mut add =
            |suffix: String, l: &LayerLosses, terms: &mut Vec<(String, Tensor)>| -> Result<()> {
                let t =
                    (((&l.class * c.w_class)? + (&l.bbox * c.w_bbox)?)? + (&l.giou * c.w_giou)?)?;
                total = Some(match total.take() {
                    Some(acc) => (acc + t)?,
                    None => t,
                });
                terms.push((format!("{class_name}{suffix}"), l.class.clone()));
                terms.push((format!("loss_bbox{suffix}"), l.bbox.clone()));
                terms.push((format!("loss_giou{suffix}"), l.giou.clone()));
                Ok(())
            };
        let on = Against { kind: out.logits_kind, targets, text_mask: &out.text_mask, num_boxes };
        let last = self.layer(&out.pred, on)?;
        add(String::new(), &last, &mut terms)?;
        if c.aux_loss {
            for (i, aux) in out.aux.iter().enumerate() {
                let l = self.layer(aux, on)?;
                add(format!("_{i}"), &l, &mut terms)?;
            }
        }
        // Denoising queries: the same terms under their known assignment, normalised by the
        // count of their positives (DINO's `num_boxes * scalar`); the last layer's as
        // `*_dn`, the earlier layers' as `*_dn_{i}` with auxiliary losses.
        if let Some(dn) = out.extensions.get::<DenoisingOutput>() {
            if dn.matches.len() != targets.len() {
                candle_core::bail!(
                    "denoising matches for {} images, {} targets",
                    dn.matches.len(),
                    targets.len()
                );
            }
            for (i, (m, t)) in dn.matches.iter().zip(targets).enumerate() {
                if let Some(&bad) = m.target.iter().find(|&&j| j >= t.len()) {
                    candle_core::bail!(
                        "a denoising query of image {i} reconstructs target {bad}, of {}",
                        t.len()
                    );
                }
            }
            let dn_boxes = num_boxes * dn.groups.max(1) as f64;
            // Every target box of the batch, image-major (as `costs` returns them).
            let all: Vec<Tensor> =
                targets.iter().filter(|t| !t.is_empty()).map(|t| t.boxes.clone()).collect();
            let all_boxes = match all.is_empty() {
                true => None,
                false => Some(Tensor::cat(&all, 0)?.to_dtype(DType::F32)?),
            };
            let n = dn.preds.len();
            for (i, p) in dn.preds.iter().enumerate() {
                let is_last = i + 1 == n;
                if !is_last && !c.aux_loss {
                    continue;
                }
                let dn_on = Against { num_boxes: dn_boxes, ..on };
                let l = self.matched(p, dn_on, dn.matches.clone(), all_boxes.clone())?;
                let suffix = if is_last { "_dn".to_string() } else { format!("_dn_{i}") };
                add(suffix, &l, &mut terms)?;
            }
        }
        // With fixed classes the cross-entropy is a weighted mean over queries (DETR's): two
        // normalisers, so no one count to normalise an accumulated step by.
        let losses = Losses::new(total.expect("at least one layer"), terms, last.matches);
        Ok(match out.logits_kind {
            LogitsKind::Classes(_) => losses,
            LogitsKind::Tokens => losses.normalised_by(count as f64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HungarianMatcher;
    use candle_core::Device;
    use glip_core::boxes::generalized_box_iou;

    /// Denoising terms against the matched ones: one group whose predictions are the matched
    /// queries' own, under the matches the matcher found, gives `*_dn` terms equal bit for bit
    /// to the matched terms (the same operations on the same numbers, normalised by the same
    /// count). With 3 groups of the same predictions, each term sums three times as much over
    /// three times the count: the one-group term within the rounding of those sums (derived
    /// below). Earlier layers' `*_dn_i` only with auxiliary losses.
    #[test]
    fn denoising_terms_under_known_matches_are_the_matched_terms() {
        let dev = Device::Cpu;
        let (b, q, t) = (2usize, 6usize, 7usize);
        let mut rng = glip_core::rng::Rng::new(11);
        let targets: Vec<Target> = [2usize, 3]
            .iter()
            .map(|&n| {
                let bx: Vec<f32> = (0..n * 4).map(|_| 0.2 + 0.5 * rng.uniform()).collect();
                let pm: Vec<f32> = (0..n * t).map(|k| (k % t == k / t + 1) as u8 as f32).collect();
                Target::new(
                    Tensor::from_vec(bx, (n, 4), &dev).unwrap(),
                    None,
                    Some(Tensor::from_vec(pm, (n, t), &dev).unwrap()),
                )
                .unwrap()
            })
            .collect();
        let boxes = Tensor::rand(0.1f32, 0.9, (b, q, 4), &dev).unwrap();
        let logits = Tensor::randn(0f32, 2.0, (b, q, t), &dev).unwrap();
        let pred = Prediction::new(boxes.clone(), logits.clone()).unwrap();
        let text_mask = Tensor::ones((b, t), DType::U8, &dev).unwrap();
        let memory = Tensor::zeros((b, 3, 4), DType::F32, &dev).unwrap();
        let output = |aux: Vec<Prediction>| {
            ModelOutput::new(
                pred.clone(),
                LogitsKind::Tokens,
                aux,
                Tensor::zeros((b, q, 4), DType::F32, &dev).unwrap(),
                memory.clone(),
                text_mask.clone(),
            )
            .unwrap()
        };
        let crit = SetCriterion::new(LossConfig::default(), Box::new(HungarianMatcher));
        let plain = crit.forward(&output(Vec::new()), &targets).unwrap();
        let term = |l: &Losses, k: &str| -> f32 {
            let v = l.terms.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("no {k}"));
            v.1.to_scalar::<f32>().unwrap()
        };
        let mut out = output(Vec::new());
        let dn = DenoisingOutput::new(vec![pred.clone()], plain.matches.clone(), 1).unwrap();
        out.extensions.insert(dn);
        let with = crit.forward(&out, &targets).unwrap();
        for k in ["loss_cls", "loss_bbox", "loss_giou"] {
            assert_eq!(term(&with, k).to_bits(), term(&plain, k).to_bits(), "{k}");
            assert_eq!(
                term(&with, &format!("{k}_dn")).to_bits(),
                term(&plain, k).to_bits(),
                "{k}_dn"
            );
        }
        let (tw, tp) =
            (with.total.to_scalar::<f32>().unwrap(), plain.total.to_scalar::<f32>().unwrap());
        assert_eq!(tw.to_bits(), (tp * 2.0).to_bits(), "total: matched plus denoising");

        // Three groups: the queries repeated three times, each group's positives matched as
        // the matcher matched them. Every term sums three copies of the one-group sum and
        // divides by three times the count: equal to the one-group term within the rounding
        // of those sums (the focal sum over `3 b q t` terms, `gamma_n` with `n = 3 b q t`).
        let rep = |x: &Tensor| Tensor::cat(&[x, x, x], 1).unwrap();
        let pred3 = Prediction::new(rep(&boxes), rep(&logits)).unwrap();
        let matches3: Vec<Match> = plain
            .matches
            .iter()
            .map(|m| Match {
                query: (0..3).flat_map(|g| m.query.iter().map(move |&x| g * q + x)).collect(),
                target: (0..3).flat_map(|_| m.target.iter().copied()).collect(),
            })
            .collect();
        let mut out = output(vec![pred.clone()]);
        let dn = DenoisingOutput::new(vec![pred3.clone(), pred3], matches3, 3).unwrap();
        out.extensions.insert(dn);
        let with = crit.forward(&out, &targets).unwrap();
        let gamma = |n: usize| n as f64 * f32::EPSILON as f64 / 2.0;
        for k in ["loss_cls", "loss_bbox", "loss_giou"] {
            let want = term(&plain, k) as f64;
            for suffix in ["_dn", "_dn_0"] {
                let got = term(&with, &format!("{k}{suffix}")) as f64;
                // Both sides' sums within gamma_n of the exact sum of their (non-negative)
                // terms, twice that relative, plus the divisions and the weighting (a few
                // roundings, gamma_4).
                let bound = (2.0 * gamma(3 * b * q * t) + gamma(4)) * want.abs();
                assert!((got - want).abs() <= bound, "{k}{suffix}: {got} vs {want}");
            }
        }
        // A detector's matches naming a target the image does not have: an error, no panic.
        let mut broken = output(Vec::new());
        let mut bad = plain.matches.clone();
        bad[0].target[0] = 2;
        broken.extensions.insert(DenoisingOutput::new(vec![pred.clone()], bad, 1).unwrap());
        let e = crit.forward(&broken, &targets).unwrap_err().to_string();
        assert!(e.contains("image 0 reconstructs target 2, of 2"), "{e}");
        let no_aux = LossConfig { aux_loss: false, ..LossConfig::default() };
        let crit = SetCriterion::new(no_aux, Box::new(HungarianMatcher));
        let without = crit.forward(&out, &targets).unwrap();
        let names: Vec<&str> = without.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"loss_cls_dn") && !names.contains(&"loss_cls_dn_0"), "{names:?}");
    }

    /// One image's `(q, n)` cost as the criterion computed it before the batch's were made
    /// together (the per-image code of 5871a66, verbatim but for its inputs).
    fn one_image_cost(
        c: &LossConfig,
        pred: &Prediction,
        kind: LogitsKind,
        b: usize,
        t: &Target,
    ) -> Tensor {
        let go = || -> Result<Tensor> {
            let logits = pred.pred_logits.get(b)?.detach();
            let boxes = pred.pred_boxes.get(b)?.detach();
            let tb = t.boxes.to_dtype(DType::F32)?;
            let l1 = boxes.unsqueeze(1)?.broadcast_sub(&tb.unsqueeze(0)?)?.abs()?.sum(D::Minus1)?;
            let giou = generalized_box_iou(&cxcywh_to_xyxy(&boxes)?, &cxcywh_to_xyxy(&tb)?)?;
            let cls = match kind {
                LogitsKind::Classes(_) => {
                    let prob = candle_nn::ops::softmax_last_dim(&logits)?;
                    let labels = Tensor::new(labels_u32(t)?, logits.device())?;
                    prob.index_select(&labels, 1)?.neg()?
                }
                LogitsKind::Tokens => {
                    let pm = t.positive_map.as_ref().expect("a map").to_dtype(DType::F32)?;
                    let (a, g) = (c.focal_alpha, c.focal_gamma);
                    let p = candle_nn::ops::sigmoid(&logits)?;
                    let one_minus_p = (1.0 - &p)?;
                    let pos = ((one_minus_p.powf(g)? * a)? * (&p + 1e-8)?.log()?.neg()?)?;
                    let neg = ((p.powf(g)? * (1.0 - a))? * (&one_minus_p + 1e-8)?.log()?.neg()?)?;
                    let n = pm.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?.t()?;
                    (pos - neg)?.matmul(&pm.t()?)?.broadcast_div(&n)?
                }
            };
            ((cls * c.cost_class)? + (l1 * c.cost_bbox)?)? - (giou * c.cost_giou)?
        };
        go().unwrap()
    }

    /// The batch's costs, one image's block at a time, against [`one_image_cost`]: images with
    /// 3, 0, 5 and 1 targets (padding to 5, an image without any). The fixed-class costs are
    /// the same operations on the same numbers: equal bit for bit. The token head's product
    /// sums the same 9 terms, perhaps in another order: within `2 gamma_9` of the sum of the
    /// terms' magnitudes (each side within `gamma_9` of the exact sum), times `cost_class`.
    #[test]
    fn the_batchs_costs_are_each_images_own() {
        let dev = Device::Cpu;
        let (q, t, counts) = (7usize, 9usize, [3usize, 0, 5, 1]);
        let b = counts.len();
        let boxes = Tensor::rand(0.1f32, 0.9, (b, q, 4), &dev).unwrap();
        let mut rng = glip_core::rng::Rng::new(5);
        let targets: Vec<Target> = counts
            .iter()
            .map(|&n| {
                let bx: Vec<f32> = (0..n * 4).map(|_| 0.2 + 0.6 * rng.uniform()).collect();
                let labels: Vec<u32> = (0..n).map(|i| (i * 2 % 6) as u32).collect();
                let pm: Vec<f32> =
                    (0..n * t).map(|k| ((k * 7 + n) % 3 == 0) as u8 as f32).collect();
                Target::new(
                    Tensor::from_vec(bx, (n, 4), &dev).unwrap(),
                    Some(Tensor::from_vec(labels, n, &dev).unwrap()),
                    Some(Tensor::from_vec(pm, (n, t), &dev).unwrap()),
                )
                .unwrap()
            })
            .collect();
        for kind in [LogitsKind::Classes(5), LogitsKind::Tokens] {
            let width = if kind == LogitsKind::Tokens { t } else { 6 };
            let logits = Tensor::randn(0f32, 2.0, (b, q, width), &dev).unwrap();
            let pred = Prediction::new(boxes.clone(), logits.clone()).unwrap();
            let crit = SetCriterion::new(LossConfig::default(), Box::new(HungarianMatcher));
            let (costs, all) = crit.costs(&pred, kind, &targets).unwrap();
            assert_eq!(all.unwrap().dims(), &[9, 4]);
            for (i, (got, target)) in costs.iter().zip(&targets).enumerate() {
                let Some(got) = got else {
                    assert!(target.is_empty(), "image {i} has targets but no cost");
                    continue;
                };
                let want = one_image_cost(crit.config(), &pred, kind, i, target);
                let (g, w): (Vec<f32>, Vec<f32>) = (
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert_eq!(g.len(), w.len(), "image {i}");
                let gamma = 9.0 * f32::EPSILON as f64 / 2.0;
                for (k, (a, e)) in g.iter().zip(&w).enumerate() {
                    if kind == LogitsKind::Tokens {
                        // |pos - neg| per term is at most |log(1e-8)| = 18.5 (times alpha or
                        // 1 - alpha < 1), and each target's map averages its ones.
                        let bound = 2.0 * gamma * 18.5 * crit.config().cost_class;
                        assert!(((a - e) as f64).abs() <= bound, "image {i} [{k}]: {a} vs {e}");
                    } else {
                        assert_eq!(a.to_bits(), e.to_bits(), "image {i} [{k}]: {a} vs {e}");
                    }
                }
            }
        }
    }
}
