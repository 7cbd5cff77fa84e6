//! From logits and boxes to detections: scores per category, top-k, threshold, NMS, pixels.

use candle_core::{DType, Result, Tensor, D};
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

/// Elements of the `(rows, c, t)` product [`token_scores`]'s max reduction makes at once: the
/// categories go in chunks of at most this many products (64 Mi f32s, 256 MiB).
const MAX_REDUCE_ELEMENTS: usize = 1 << 26;

/// Per-category scores from token logits: `logits (..., t)`, `positive_map (c, t)` 0/1 ->
/// `(..., c)` scores (the mean or max of the sigmoid over each category's tokens; 0 for a
/// category without tokens), for one image's `(q, t)` or a batch's `(b, q, t)` alike.
pub fn token_scores(logits: &Tensor, positive_map: &Tensor, reduce: TokenReduce) -> Result<Tensor> {
    let mut dims = logits.dims().to_vec();
    let t = dims.pop().ok_or_else(|| candle_core::Error::Msg("token logits: a scalar".into()))?;
    let (c, pt) = positive_map.dims2()?;
    if pt != t {
        candle_core::bail!("token scores: logits have {t} tokens, the positive map {pt}");
    }
    let rows = dims.iter().product::<usize>();
    let p = candle_nn::ops::sigmoid(&logits.reshape((rows, t))?)?; // (rows, t)
    let pm = positive_map.to_dtype(p.dtype())?; // (c, t)
    let scores = match reduce {
        TokenReduce::Mean => {
            let n = pm.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?; // (c, 1)
            p.matmul(&pm.t()?)?.broadcast_div(&n.t()?)?
        }
        TokenReduce::Max => max_over_tokens(&p, &pm, MAX_REDUCE_ELEMENTS)?,
    };
    dims.push(c);
    scores.reshape(dims)
}

/// `p (rows, t)` in `[0, 1]`, `pm (c, t)` 0/1 -> `(rows, c)`: per category the max of `p` over
/// its tokens (0 without any), as `(rows, 1, t) * (1, k, t)` maxed over `t` for `k`
/// categories at a time, `k` as many as keep the product within `max_elements`.
fn max_over_tokens(p: &Tensor, pm: &Tensor, max_elements: usize) -> Result<Tensor> {
    let (rows, t) = p.dims2()?;
    let c = pm.dim(0)?;
    let k = (max_elements / (rows * t).max(1)).clamp(1, c.max(1));
    let p = p.unsqueeze(1)?;
    let parts = (0..c)
        .step_by(k)
        .map(|c0| p.broadcast_mul(&pm.narrow(0, c0, k.min(c - c0))?.unsqueeze(0)?)?.max(D::Minus1))
        .collect::<Result<Vec<_>>>()?;
    match parts.len() {
        0 => Tensor::zeros((rows, 0), p.dtype(), p.device()),
        _ => Tensor::cat(&parts, 1),
    }
}

/// Class scores of the fixed-class head: softmax over `num_classes + 1`, the "no object" column
/// dropped: `(..., c + 1)` -> `(..., c)`.
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
/// then per-category NMS when configured (see [`select_detections`]).
pub fn detections(
    scores: &Tensor,
    boxes: &Tensor,
    width: f32,
    height: f32,
    cfg: &PostProcessConfig,
) -> Result<Vec<Detection>> {
    scores.dims2()?; // one image: (q, c)
    let one =
        batch_detections(&scores.unsqueeze(0)?, &boxes.unsqueeze(0)?, &[(width, height)], cfg)?;
    Ok(one.into_iter().next().unwrap_or_default())
}

/// Detections of every image of a batch from `scores (b, q, c)` and `boxes (b, q, 4)`
/// normalised cxcywh, image `i` being `sizes[i] = (width, height)` pixels, read from the
/// device for the whole batch at once (its scores, then its boxes, back to back); then
/// [`select_detections`] per image, on the scores as read.
pub fn batch_detections(
    scores: &Tensor,
    boxes: &Tensor,
    sizes: &[(f32, f32)],
    cfg: &PostProcessConfig,
) -> Result<Vec<Vec<Detection>>> {
    let (b, q, c) = scores.dims3()?;
    if boxes.dims() != [b, q, 4] || sizes.len() != b {
        candle_core::bail!(
            "batch detections: scores {:?}, boxes {:?} and {} image sizes do not agree",
            scores.dims(),
            boxes.dims(),
            sizes.len()
        );
    }
    // Two copies back to back: the first waits for the device, the second finds it idle.
    // (Not one copy of the two concatenated: candle's CPU `cat` costs more than both reads.)
    let s: Vec<f32> = scores.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bx: Vec<f32> = boxes.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| {
            let rows: Vec<[f32; 4]> = bx[i * q * 4..(i + 1) * q * 4]
                .chunks_exact(4)
                .map(|r| [r[0], r[1], r[2], r[3]])
                .collect();
            select_detections(&s[i * q * c..(i + 1) * q * c], c, &rows, w, h, cfg)
        })
        .collect()
}

/// The `k` indices of `s` that pass `keep`, best first: by score descending, the lower index
/// first among equal scores, which is what a stable sort of all of them truncated to `k`
/// gives; in `O(n + k log k)` ([`glip_kernels::topk::best_k`]) instead of `O(n log n)`.
pub fn best_indices(s: &[f32], k: usize, keep: impl Fn(f32) -> bool) -> Vec<usize> {
    let idx: Vec<usize> = (0..s.len()).filter(|&i| keep(s[i])).collect();
    glip_kernels::topk::best_k(idx, k, |i| s[i])
}

/// Detections of one image from its scores, `scores[i * c + j]` for query `i` and category
/// `j`, and its queries' normalised cxcywh `boxes`, in an image of `width x height` pixels:
/// the (query, category) pairs scoring at least the threshold (and finite), best first; with
/// NMS, the best [`PRE_NMS_TOP_N`] of them through per-category NMS; at most `top_k`.
pub fn select_detections(
    scores: &[f32],
    c: usize,
    boxes: &[[f32; 4]],
    width: f32,
    height: f32,
    cfg: &PostProcessConfig,
) -> Result<Vec<Detection>> {
    if scores.len() != boxes.len() * c {
        candle_core::bail!(
            "detections: {} scores for {} queries of {c} categories",
            scores.len(),
            boxes.len()
        );
    }
    // GLIP's pre-NMS top-n: a dense head scores every location for every category.
    let k = if cfg.nms_iou.is_some() { PRE_NMS_TOP_N } else { cfg.top_k };
    let idx = best_indices(scores, k, |x| x >= cfg.score_threshold && x.is_finite());
    let mut dets: Vec<Detection> = idx
        .iter()
        .map(|&i| Detection {
            bbox: to_pixels(boxes[i / c], width, height),
            score: scores[i],
            category: i % c,
        })
        .collect();
    if let Some(thr) = cfg.nms_iou {
        let mut by_category: Vec<Vec<&Detection>> = vec![Vec::new(); c];
        for d in &dets {
            by_category[d.category].push(d);
        }
        let mut kept = Vec::new();
        for of in by_category {
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

/// A normalised cxcywh box in pixels of a `width x height` image, clamped to the image.
pub fn to_pixels(cxcywh: [f32; 4], width: f32, height: f32) -> Xyxy {
    let [x0, y0, x1, y1] = cxcywh_to_xyxy_f32(cxcywh);
    [
        (x0 * width).clamp(0.0, width),
        (y0 * height).clamp(0.0, height),
        (x1 * width).clamp(0.0, width),
        (y1 * height).clamp(0.0, height),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The chunked max equals the one-product max of the first implementation (`(rows, 1, t) *
    /// (1, c, t)` maxed over `t`) exactly: both take the max of the same products.
    #[test]
    fn max_over_tokens_in_chunks_is_the_one_product_max() -> Result<()> {
        let dev = Device::Cpu;
        let p = candle_nn::ops::sigmoid(&Tensor::randn(0f32, 2.0, (6, 5), &dev)?)?;
        let pm = Tensor::new(
            &[
                [1f32, 1.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 0.0],
                [0.0, 1.0, 1.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 1.0],
                [1.0, 0.0, 1.0, 0.0, 1.0],
            ],
            &dev,
        )?;
        let want: Vec<Vec<f32>> =
            p.unsqueeze(1)?.broadcast_mul(&pm.unsqueeze(0)?)?.max(D::Minus1)?.to_vec2()?;
        // 30 products a category: 1, 2 and 5 categories a chunk, and chunks that do not divide 5.
        for limit in [1, 30, 60, 90, 150, 1 << 20] {
            let got: Vec<Vec<f32>> = max_over_tokens(&p, &pm, limit)?.to_vec2()?;
            assert_eq!(got, want, "limit {limit}");
        }
        assert_eq!(max_over_tokens(&p, &pm.narrow(0, 0, 0)?, 8)?.dims(), &[6, 0]);
        Ok(())
    }
}
