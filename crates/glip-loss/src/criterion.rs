//! Set criteria: `detr` (softmax cross-entropy with a down-weighted no-object class, for the
//! fixed-class head) and `grounding` (token-level sigmoid focal over positive maps, for the
//! token head), exactly `class_losses` / `token_losses` of `reference/glip_ref.py`; with the
//! [`crate::OrderedMatcher`] either becomes the seed tutorial's `ordered` ablation.

use crate::terms::{giou_loss_sum, l1_sum, sigmoid_focal, weighted_cross_entropy};
use candle_core::{DType, Result, Tensor, D};
use glip_core::boxes::{cxcywh_to_xyxy, generalized_box_iou};
use glip_core::validate::{Checker, Validate};
use glip_core::{Criterion, LogitsKind, Losses, Match, Matcher, ModelOutput, Prediction, Target};
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

/// Per-layer result: the three unweighted terms and the matches.
struct LayerLosses {
    class: Tensor,
    bbox: Tensor,
    giou: Tensor,
    matches: Vec<Match>,
}

fn target_boxes(t: &Target) -> Result<Tensor> {
    t.boxes.to_dtype(DType::F32)
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

    /// `(q, n)` matching cost of image `b`.
    fn cost(&self, pred: &Prediction, kind: LogitsKind, b: usize, t: &Target) -> Result<Tensor> {
        let c = &self.config;
        let logits = pred.pred_logits.get(b)?.detach(); // (q, c|t)
        let boxes = pred.pred_boxes.get(b)?.detach(); // (q, 4)
        let tb = target_boxes(t)?;
        let l1 = boxes.unsqueeze(1)?.broadcast_sub(&tb.unsqueeze(0)?)?.abs()?.sum(D::Minus1)?;
        let giou = generalized_box_iou(&cxcywh_to_xyxy(&boxes)?, &cxcywh_to_xyxy(&tb)?)?;
        let cls = match kind {
            LogitsKind::Classes(_) => {
                let prob = candle_nn::ops::softmax_last_dim(&logits)?;
                let labels = Tensor::new(labels_u32(t)?, logits.device())?;
                prob.index_select(&labels, 1)?.neg()?
            }
            LogitsKind::Tokens => {
                let Some(pm) = &t.positive_map else {
                    candle_core::bail!("the grounding criterion needs target positive maps")
                };
                let pm = pm.to_dtype(DType::F32)?;
                let (a, g) = (c.focal_alpha, c.focal_gamma);
                let p = candle_nn::ops::sigmoid(&logits)?;
                let one_minus_p = (1.0 - &p)?;
                let pos = ((one_minus_p.powf(g)? * a)? * (&p + 1e-8)?.log()?.neg()?)?;
                let neg = ((p.powf(g)? * (1.0 - a))? * (&one_minus_p + 1e-8)?.log()?.neg()?)?;
                let n = pm.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?.t()?; // (1, n)
                (pos - neg)?.matmul(&pm.t()?)?.broadcast_div(&n)?
            }
        };
        ((cls * c.cost_class)? + (l1 * c.cost_bbox)?)? - (giou * c.cost_giou)?
    }

    fn layer(
        &self,
        pred: &Prediction,
        kind: LogitsKind,
        targets: &[Target],
        text_mask: &Tensor,
        num_boxes: f64,
    ) -> Result<LayerLosses> {
        let (b, q, nc) = pred.pred_logits.dims3()?;
        if targets.len() != b {
            candle_core::bail!("{} targets for a batch of {b} images", targets.len());
        }
        let mut matches = Vec::with_capacity(b);
        for (i, t) in targets.iter().enumerate() {
            matches.push(if t.is_empty() {
                Match::default()
            } else {
                self.matcher.assign(&self.cost(pred, kind, i, t)?)?
            });
        }
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
        let mut src = Vec::new();
        let mut tgt = Vec::new();
        for (i, (m, t)) in matches.iter().zip(targets).enumerate() {
            if m.query.is_empty() {
                continue;
            }
            let qi = Tensor::new(m.query.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev)?;
            let ti = Tensor::new(m.target.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev)?;
            src.push(pred.pred_boxes.get(i)?.index_select(&qi, 0)?);
            tgt.push(target_boxes(t)?.index_select(&ti, 0)?);
        }
        let (bbox, giou) = if src.is_empty() {
            let z = pred.pred_boxes.sum_all()?.affine(0.0, 0.0)?;
            (z.clone(), z)
        } else {
            let (s, t) = (Tensor::cat(&src, 0)?, Tensor::cat(&tgt, 0)?);
            ((l1_sum(&s, &t)? / num_boxes)?, (giou_loss_sum(&s, &t)? / num_boxes)?)
        };
        Ok(LayerLosses { class, bbox, giou, matches })
    }
}

impl Criterion for SetCriterion {
    fn forward(&self, out: &ModelOutput, targets: &[Target]) -> Result<Losses> {
        let num_boxes = targets.iter().map(Target::len).sum::<usize>().max(1) as f64;
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
        let last = self.layer(&out.pred, out.logits_kind, targets, &out.text_mask, num_boxes)?;
        add(String::new(), &last, &mut terms)?;
        if c.aux_loss {
            for (i, aux) in out.aux.iter().enumerate() {
                let l = self.layer(aux, out.logits_kind, targets, &out.text_mask, num_boxes)?;
                add(format!("_{i}"), &l, &mut terms)?;
            }
        }
        Ok(Losses { total: total.expect("at least one layer"), terms, matches: last.matches })
    }
}
