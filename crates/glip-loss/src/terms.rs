//! Loss terms: L1 and GIoU on boxes, weighted softmax cross-entropy, sigmoid focal loss.
//! All differentiable and numerically stable (no `log(sigmoid)`: CANDLE-NOTES.md).

use candle_core::{Result, Tensor, D};
use glip_core::boxes::{cxcywh_to_xyxy, paired_generalized_box_iou};

/// Sum of `|a - b|` over matched boxes `(n, 4)`.
pub fn l1_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.abs()?.sum_all()
}

/// Sum of `1 - GIoU` over matched cxcywh boxes `(n, 4)`.
pub fn giou_loss_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let g = paired_generalized_box_iou(&cxcywh_to_xyxy(a)?, &cxcywh_to_xyxy(b)?)?;
    (1.0 - g)?.sum_all()
}

/// Binary cross-entropy with logits in the stable form
/// `max(x, 0) - x z + log(1 + exp(-|x|))`, elementwise.
pub fn bce_with_logits(x: &Tensor, z: &Tensor) -> Result<Tensor> {
    let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (x.relu()? - (x * z)?)? + softplus
}

/// torchvision's `sigmoid_focal_loss` with `reduction="none"`:
/// `alpha_t * (1 - p_t)^gamma * bce(x, z)`, `p_t = p z + (1 - p)(1 - z)`. Finite for logits of
/// any size, and so is its gradient.
pub fn sigmoid_focal(x: &Tensor, z: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(x)?;
    let ce = bce_with_logits(x, z)?;
    // 1 - p_t = p (1 - z) + (1 - p) z
    let one_minus_pt = ((&p * (1.0 - z)?)? + ((1.0 - &p)? * z)?)?;
    let modulator = if gamma == 2.0 {
        one_minus_pt.sqr()?
    } else if gamma == 0.0 {
        one_minus_pt.ones_like()?
    } else {
        // Clamp away from 0 so that the gradient of x^gamma stays finite for gamma < 1.
        one_minus_pt.clamp(1e-12, 1.0)?.powf(gamma)?
    };
    let loss = (ce * modulator)?;
    if alpha >= 0.0 {
        let alpha_t = ((z * alpha)? + ((1.0 - z)? * (1.0 - alpha))?)?;
        loss * alpha_t
    } else {
        Ok(loss)
    }
}

/// `F.cross_entropy(logits, target, weight)` with mean reduction over `(b, q)`:
/// `sum w[y] * -log softmax(x)[y] / sum w[y]`. `logits (b, q, c)`, `target (b, q)` u32,
/// `weight (c,)`.
pub fn weighted_cross_entropy(logits: &Tensor, target: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = lp.gather(&target.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?;
    let w = weight.index_select(&target.flatten_all()?, 0)?.reshape(target.dims())?;
    let num = (picked * &w)?.sum_all()?.neg()?;
    // Divided on the device: no wait for it to read the weight sum.
    num.div(&w.sum_all()?)
}
