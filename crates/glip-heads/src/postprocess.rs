//! From logits and boxes to detections: scores per category, top-k, threshold, NMS, pixels.

use candle_core::{Result, Tensor, D};
use glip_core::boxes::{cxcywh_to_xyxy_f32, iou_f32, Xyxy};
use glip_core::validate::{Checker, Validate};
use serde::{Deserialize, Serialize};

/// How token probabilities become a category score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenReduce {
    /// Mean of the sigmoid over the category's tokens (GLIP).
    #[default]
    Mean,
    /// Max over the category's tokens.
    Max,
}

/// Post-processing options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostProcessConfig {
    /// Keep at most this many detections per image. Default 100.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Drop detections scoring below. Default 0.0.
    #[serde(default)]
    pub score_threshold: f32,
    /// Per-category NMS IoU threshold; none by default (DETR-style models need none).
    #[serde(default)]
    pub nms_iou: Option<f32>,
    /// Token-to-category reduction. Default mean.
    #[serde(default)]
    pub token_reduce: TokenReduce,
}

fn default_top_k() -> usize {
    100
}

impl Default for PostProcessConfig {
    fn default() -> Self {
        Self {
            top_k: default_top_k(),
            score_threshold: 0.0,
            nms_iou: None,
            token_reduce: TokenReduce::Mean,
        }
    }
}

impl Validate for PostProcessConfig {
    fn validate(&self, c: &mut Checker) {
        c.in_range("top_k", self.top_k, 1, 100_000);
        c.probability("score_threshold", self.score_threshold as f64);
        if let Some(iou) = self.nms_iou {
            c.probability("nms_iou", iou as f64);
        }
    }
}

/// Candidates kept before NMS, best first (GLIP's `pre_nms_top_n`).
pub const PRE_NMS_TOP_N: usize = 1000;

/// One detection in pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// `(x0, y0, x1, y1)` in pixels of the original image.
    pub bbox: Xyxy,
    /// Score in `[0, 1]`.
    pub score: f32,
    /// Category index (into the positive-map rows, or the fixed classes).
    pub category: usize,
}

/// Per-category scores from token logits: `logits (q, t)`, `positive_map (c, t)` 0/1 ->
/// `(q, c)` scores (the mean or max of the sigmoid over each category's tokens; 0 for a
/// category without tokens).
pub fn token_scores(logits: &Tensor, positive_map: &Tensor, reduce: TokenReduce) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(logits)?; // (q, t)
    let pm = positive_map.to_dtype(p.dtype())?; // (c, t)
    match reduce {
        TokenReduce::Mean => {
            let n = pm.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?; // (c, 1)
            p.matmul(&pm.t()?)?.broadcast_div(&n.t()?)
        }
        TokenReduce::Max => {
            // (q, 1, t) * (1, c, t) -> max over t
            p.unsqueeze(1)?.broadcast_mul(&pm.unsqueeze(0)?)?.max(D::Minus1)
        }
    }
}

/// Class scores of the fixed-class head: softmax over `num_classes + 1`, the "no object" column
/// dropped: `(q, c + 1)` -> `(q, c)`.
pub fn class_scores(logits: &Tensor) -> Result<Tensor> {
    let c = logits.dim(D::Minus1)? - 1;
    candle_nn::ops::softmax_last_dim(logits)?.narrow(D::Minus1, 0, c)
}

/// Greedy NMS: indices of the boxes kept, in descending score order.
pub fn nms(boxes: &[Xyxy], scores: &[f32], iou: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        if keep.iter().all(|&k| iou_f32(boxes[k], boxes[i]) <= iou) {
            keep.push(i);
        }
    }
    keep
}

/// Detections of one image from `scores (q, c)` and `boxes (q, 4)` normalised cxcywh, in an
/// image of `width x height` pixels: the top-k (query, category) pairs above the threshold,
/// then per-category NMS when configured.
pub fn detections(
    scores: &Tensor,
    boxes: &Tensor,
    width: f32,
    height: f32,
    cfg: &PostProcessConfig,
) -> Result<Vec<Detection>> {
    let (q, c) = scores.dims2()?;
    let s: Vec<f32> = scores.flatten_all()?.to_vec1()?;
    let b: Vec<[f32; 4]> =
        boxes.to_vec2::<f32>()?.into_iter().map(|v| [v[0], v[1], v[2], v[3]]).collect();
    let mut idx: Vec<usize> =
        (0..q * c).filter(|&i| s[i] >= cfg.score_threshold && s[i].is_finite()).collect();
    idx.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    if cfg.nms_iou.is_some() {
        // GLIP's pre-NMS top-n: a dense head scores every location for every category.
        idx.truncate(PRE_NMS_TOP_N);
    }
    let to_px = |bb: [f32; 4]| {
        let [x0, y0, x1, y1] = cxcywh_to_xyxy_f32(bb);
        [
            (x0 * width).clamp(0.0, width),
            (y0 * height).clamp(0.0, height),
            (x1 * width).clamp(0.0, width),
            (y1 * height).clamp(0.0, height),
        ]
    };
    let mut dets: Vec<Detection> = idx
        .iter()
        .map(|&i| Detection { bbox: to_px(b[i / c]), score: s[i], category: i % c })
        .collect();
    if let Some(thr) = cfg.nms_iou {
        let mut kept = Vec::new();
        for cat in 0..c {
            let of: Vec<&Detection> = dets.iter().filter(|d| d.category == cat).collect();
            let bx: Vec<Xyxy> = of.iter().map(|d| d.bbox).collect();
            let sc: Vec<f32> = of.iter().map(|d| d.score).collect();
            kept.extend(nms(&bx, &sc, thr).into_iter().map(|k| of[k].clone()));
        }
        kept.sort_by(|x, y| y.score.total_cmp(&x.score));
        dets = kept;
    }
    dets.truncate(cfg.top_k);
    Ok(dets)
}
