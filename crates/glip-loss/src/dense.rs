//! The dense head's criterion (GLIP / FCOS / ATSS): locations are assigned to ground-truth
//! boxes by FCOS center sampling or by ATSS, then a sigmoid focal loss over the real text tokens
//! against the assigned box's positive map, GIoU and L1 on the positive locations' boxes, and
//! optionally centerness; every term normalised by the number of positive locations.

use crate::criterion::{alpha, five, one, two};
use crate::terms::{bce_with_logits, giou_loss_sum, l1_sum, sigmoid_focal};
use candle_core::{DType, Result, Tensor};
use glip_core::boxes::{cxcywh_to_xyxy_f32, iou_f32};
use glip_core::validate::{Checker, Validate};
use glip_core::{Criterion, DenseOutput, Losses, Match, ModelOutput, Target};
use serde::{Deserialize, Serialize};

/// How locations are assigned to boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assigner {
    /// FCOS center sampling: a location inside a box and within `center_radius` strides of its
    /// centre is positive for it; among several boxes the smallest wins.
    #[default]
    Fcos,
    /// ATSS: per box and level the `atss_topk` locations closest to its centre are candidates;
    /// those whose anchor (a square of `atss_anchor_scale` strides) overlaps the box by at least
    /// the candidates' IoU mean + standard deviation, with the point inside the box, are
    /// positive; among several boxes the highest IoU wins.
    Atss,
}

/// Weights and assignment options of [`DenseCriterion`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseLossConfig {
    /// `fcos` (default) or `atss`.
    #[serde(default)]
    pub assign: Assigner,
    /// FCOS center-sampling radius in strides. Default 1.5.
    #[serde(default = "radius")]
    pub center_radius: f64,
    /// ATSS candidates per level and box. Default 9.
    #[serde(default = "nine")]
    pub atss_topk: usize,
    /// ATSS anchor side in strides. Default 8.
    #[serde(default = "eight")]
    pub atss_anchor_scale: f64,
    /// Focal alpha. Default 0.25.
    #[serde(default = "alpha")]
    pub focal_alpha: f64,
    /// Focal gamma. Default 2.
    #[serde(default = "two")]
    pub focal_gamma: f64,
    /// Weight of the focal term. Default 1.
    #[serde(default = "one")]
    pub w_class: f64,
    /// Weight of the L1 term on normalised cxcywh boxes. Default 5.
    #[serde(default = "five")]
    pub w_bbox: f64,
    /// Weight of the GIoU term. Default 2.
    #[serde(default = "two")]
    pub w_giou: f64,
    /// Weight of the centerness term (when the head predicts it). Default 1.
    #[serde(default = "one")]
    pub w_centerness: f64,
}

fn radius() -> f64 {
    1.5
}
fn nine() -> usize {
    9
}
fn eight() -> f64 {
    8.0
}

impl Default for DenseLossConfig {
    fn default() -> Self {
        Self {
            assign: Assigner::Fcos,
            center_radius: radius(),
            atss_topk: nine(),
            atss_anchor_scale: eight(),
            focal_alpha: alpha(),
            focal_gamma: two(),
            w_class: one(),
            w_bbox: five(),
            w_giou: two(),
            w_centerness: one(),
        }
    }
}

/// The dense criterion.
#[derive(Debug, Clone, Default)]
pub struct DenseCriterion {
    config: DenseLossConfig,
}

/// One image's locations: centres and strides `(x, y)`, normalised, and levels.
#[derive(Debug, Clone, Copy)]
pub struct Locations<'a> {
    /// Centres, `q` of them.
    pub points: &'a [[f32; 2]],
    /// Strides along x and y.
    pub strides: &'a [[f32; 2]],
    /// Level of each location.
    pub level: &'a [usize],
}

impl Validate for DenseLossConfig {
    fn validate(&self, c: &mut Checker) {
        c.finite_above("center_radius", self.center_radius, 0.0, 1e4);
        c.in_range("atss_topk", self.atss_topk, 1, 100_000);
        c.finite_above("atss_anchor_scale", self.atss_anchor_scale, 0.0, 1e4);
        c.probability("focal_alpha", self.focal_alpha);
        for (k, v) in [
            ("focal_gamma", self.focal_gamma),
            ("w_class", self.w_class),
            ("w_bbox", self.w_bbox),
            ("w_giou", self.w_giou),
            ("w_centerness", self.w_centerness),
        ] {
            c.weight(k, v);
        }
    }
}

impl DenseCriterion {
    /// A criterion with these options.
    pub fn new(config: DenseLossConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &DenseLossConfig {
        &self.config
    }

    /// The box each location is assigned to (`None`: background), for boxes `gt` in normalised
    /// cxcywh.
    pub fn assign(&self, loc: &Locations<'_>, gt: &[[f32; 4]]) -> Vec<Option<usize>> {
        match self.config.assign {
            Assigner::Fcos => self.assign_fcos(loc, gt),
            Assigner::Atss => self.assign_atss(loc, gt),
        }
    }

    fn assign_fcos(&self, loc: &Locations<'_>, gt: &[[f32; 4]]) -> Vec<Option<usize>> {
        let r = self.config.center_radius as f32;
        let mut out = vec![None; loc.points.len()];
        for (i, (p, s)) in loc.points.iter().zip(loc.strides).enumerate() {
            let mut best: Option<(usize, f32)> = None;
            for (k, g) in gt.iter().enumerate() {
                let [x0, y0, x1, y1] = cxcywh_to_xyxy_f32(*g);
                let inside = p[0] > x0 && p[0] < x1 && p[1] > y0 && p[1] < y1;
                let near = (p[0] - g[0]).abs() < r * s[0] && (p[1] - g[1]).abs() < r * s[1];
                let area = g[2] * g[3];
                if inside && near && best.is_none_or(|(_, a)| area < a) {
                    best = Some((k, area));
                }
            }
            out[i] = best.map(|(k, _)| k);
        }
        out
    }

    fn assign_atss(&self, loc: &Locations<'_>, gt: &[[f32; 4]]) -> Vec<Option<usize>> {
        let q = loc.points.len();
        let levels = loc.level.iter().copied().max().map_or(0, |m| m + 1);
        let scale = self.config.atss_anchor_scale as f32;
        let anchor = |i: usize| {
            let (p, s) = (loc.points[i], loc.strides[i]);
            let (hw, hh) = (scale * s[0] / 2.0, scale * s[1] / 2.0);
            [p[0] - hw, p[1] - hh, p[0] + hw, p[1] + hh]
        };
        let mut best: Vec<Option<(usize, f32)>> = vec![None; q];
        for (k, g) in gt.iter().enumerate() {
            let gb = cxcywh_to_xyxy_f32(*g);
            let mut cand: Vec<usize> = Vec::new();
            for l in 0..levels {
                let mut of: Vec<(f32, usize)> = (0..q)
                    .filter(|&i| loc.level[i] == l)
                    .map(|i| {
                        let (dx, dy) = (loc.points[i][0] - g[0], loc.points[i][1] - g[1]);
                        (dx * dx + dy * dy, i)
                    })
                    .collect();
                of.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                cand.extend(of.iter().take(self.config.atss_topk).map(|&(_, i)| i));
            }
            if cand.is_empty() {
                continue;
            }
            let ious: Vec<f32> = cand.iter().map(|&i| iou_f32(anchor(i), gb)).collect();
            let n = ious.len() as f32;
            let mean = ious.iter().sum::<f32>() / n;
            // torch.std: the unbiased estimate.
            let var = if ious.len() > 1 {
                ious.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / (n - 1.0)
            } else {
                0.0
            };
            let thr = mean + var.sqrt();
            for (&i, &v) in cand.iter().zip(&ious) {
                let p = loc.points[i];
                let inside = p[0] > gb[0] && p[0] < gb[2] && p[1] > gb[1] && p[1] < gb[3];
                if v >= thr && inside && best[i].is_none_or(|(_, b)| v > b) {
                    best[i] = Some((k, v));
                }
            }
        }
        best.into_iter().map(|b| b.map(|(k, _)| k)).collect()
    }
}

/// `(b, q, 2)` on the host as `b` lists of `q` pairs.
fn pairs(t: &Tensor) -> Result<Vec<Vec<[f32; 2]>>> {
    let v = t.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    Ok(v.into_iter().map(|img| img.into_iter().map(|p| [p[0], p[1]]).collect()).collect())
}

/// FCOS's centerness target of a point inside a box (xyxy).
fn centerness_target(p: [f32; 2], b: [f32; 4]) -> f32 {
    let (l, t, r, bt) = (p[0] - b[0], p[1] - b[1], b[2] - p[0], b[3] - p[1]);
    let (l, t, r, bt) = (l.max(1e-6), t.max(1e-6), r.max(1e-6), bt.max(1e-6));
    ((l.min(r) / l.max(r)) * (t.min(bt) / t.max(bt))).sqrt()
}

impl Criterion for DenseCriterion {
    fn forward(&self, out: &ModelOutput, targets: &[Target]) -> Result<Losses> {
        let Some(dense @ DenseOutput { level, centerness, .. }) = out.dense() else {
            candle_core::bail!(
                "the dense criterion needs a dense head's output (model.detector.type = \"dense\")"
            )
        };
        let c = &self.config;
        let logits = &out.pred.pred_logits;
        let (b, q, t) = logits.dims3()?;
        if targets.len() != b {
            candle_core::bail!("{} targets for a batch of {b} images", targets.len());
        }
        let dev = logits.device();
        let mut cls_target = vec![0f32; b * q * t];
        let mut matches = Vec::with_capacity(b);
        let (mut src, mut tgt) = (Vec::new(), Vec::new());
        let mut ctr_idx: Vec<u32> = Vec::new();
        let mut ctr_target: Vec<f32> = Vec::new();
        // Everything the assignment reads is on the host already (host copies): no wait for
        // the device here on a GPU.
        let (points, strides) = (pairs(&dense.host_points()?)?, pairs(&dense.host_strides()?)?);
        for (i, target) in targets.iter().enumerate() {
            let (pts, st) = (&points[i], &strides[i]);
            let gt: Vec<[f32; 4]> = target
                .host_boxes()?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .into_iter()
                .map(|v| [v[0], v[1], v[2], v[3]])
                .collect();
            let loc = Locations { points: pts, strides: st, level };
            let assigned = self.assign(&loc, &gt);
            let mut m = Match::default();
            for (qi, a) in assigned.iter().enumerate() {
                if let Some(k) = *a {
                    m.query.push(qi);
                    m.target.push(k);
                }
            }
            if !m.query.is_empty() {
                let Some(pm) = target.host_positive_map()? else {
                    candle_core::bail!("the dense criterion needs target positive maps")
                };
                let pm: Vec<Vec<f32>> = pm.to_dtype(DType::F32)?.to_vec2()?;
                for (&qi, &k) in m.query.iter().zip(&m.target) {
                    let row = &pm[k];
                    let n = row.len().min(t);
                    let o = (i * q + qi) * t;
                    cls_target[o..o + n].copy_from_slice(&row[..n]);
                    ctr_idx.push((i * q + qi) as u32);
                    ctr_target.push(centerness_target(pts[qi], cxcywh_to_xyxy_f32(gt[k])));
                }
                let qi = Tensor::new(m.query.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev)?;
                let ti = Tensor::new(m.target.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev)?;
                src.push(out.pred.pred_boxes.get(i)?.index_select(&qi, 0)?);
                tgt.push(target.boxes.to_dtype(DType::F32)?.index_select(&ti, 0)?);
            }
            matches.push(m);
        }
        let count = ctr_idx.len();
        let num_pos = count.max(1) as f64;
        let tm = Tensor::from_vec(cls_target, (b, q, t), dev)?;
        let mask = out.text_mask.to_dtype(DType::F32)?.unsqueeze(1)?;
        let focal = sigmoid_focal(logits, &tm, c.focal_alpha, c.focal_gamma)?;
        let cls = (focal.broadcast_mul(&mask)?.sum_all()? / num_pos)?;
        let (bbox, giou) = if src.is_empty() {
            let z = out.pred.pred_boxes.sum_all()?.affine(0.0, 0.0)?;
            (z.clone(), z)
        } else {
            let (s, g) = (Tensor::cat(&src, 0)?, Tensor::cat(&tgt, 0)?);
            ((l1_sum(&s, &g)? / num_pos)?, (giou_loss_sum(&s, &g)? / num_pos)?)
        };
        let mut total = (((&cls * c.w_class)? + (&bbox * c.w_bbox)?)? + (&giou * c.w_giou)?)?;
        let mut terms = vec![
            ("loss_cls".to_string(), cls),
            ("loss_bbox".to_string(), bbox),
            ("loss_giou".to_string(), giou),
        ];
        if let Some(ctr) = centerness {
            let l = if ctr_idx.is_empty() {
                ctr.sum_all()?.affine(0.0, 0.0)?
            } else {
                let n = ctr_idx.len();
                let x = ctr.flatten_all()?.index_select(&Tensor::from_vec(ctr_idx, n, dev)?, 0)?;
                let z = Tensor::from_vec(ctr_target, n, dev)?;
                (bce_with_logits(&x, &z)?.sum_all()? / num_pos)?
            };
            total = (total + (&l * c.w_centerness)?)?;
            terms.push(("loss_centerness".to_string(), l));
        }
        Ok(Losses::new(total, terms, matches).normalised_by(count as f64))
    }
}
