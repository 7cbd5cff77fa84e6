//! Box utilities shared by the heads, the losses, the data pipeline and evaluation.
//!
//! Tensor functions take boxes on the last axis (`(..., 4)`) and are built from differentiable
//! candle ops, so the losses can backpropagate through them. IoU and GIoU follow
//! `torchvision.ops.box_iou` / `generalized_box_iou` exactly (no epsilon): boxes of zero area
//! give NaN there as in torchvision, and callers keep predicted boxes non-degenerate.

use candle_core::{Result, Tensor, D};

fn split4(b: &Tensor) -> Result<[Tensor; 4]> {
    Ok([
        b.narrow(D::Minus1, 0, 1)?,
        b.narrow(D::Minus1, 1, 1)?,
        b.narrow(D::Minus1, 2, 1)?,
        b.narrow(D::Minus1, 3, 1)?,
    ])
}

/// `(..., 4)` normalised `(cx, cy, w, h)` -> `(..., 4)` `(x0, y0, x1, y1)`.
pub fn cxcywh_to_xyxy(b: &Tensor) -> Result<Tensor> {
    let [cx, cy, w, h] = split4(b)?;
    let (hw, hh) = ((w * 0.5)?, (h * 0.5)?);
    Tensor::cat(&[(&cx - &hw)?, (&cy - &hh)?, (&cx + &hw)?, (&cy + &hh)?], D::Minus1)
}

/// `(..., 4)` `(x0, y0, x1, y1)` -> `(..., 4)` `(cx, cy, w, h)`.
pub fn xyxy_to_cxcywh(b: &Tensor) -> Result<Tensor> {
    let [x0, y0, x1, y1] = split4(b)?;
    Tensor::cat(
        &[((&x0 + &x1)? * 0.5)?, ((&y0 + &y1)? * 0.5)?, (&x1 - &x0)?, (&y1 - &y0)?],
        D::Minus1,
    )
}

/// `(n, 4)` xyxy -> `(n,)` areas.
pub fn box_area(b: &Tensor) -> Result<Tensor> {
    let [x0, y0, x1, y1] = split4(b)?;
    ((x1 - x0)? * (y1 - y0)?)?.squeeze(D::Minus1)
}

/// Pairwise IoU and union of `a (n, 4)` and `b (m, 4)`, both xyxy: two `(n, m)` tensors.
pub fn box_iou_union(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (area_a, area_b) = (box_area(a)?, box_area(b)?);
    let a3 = a.unsqueeze(1)?; // (n, 1, 4)
    let b3 = b.unsqueeze(0)?; // (1, m, 4)
    let lt = a3.narrow(2, 0, 2)?.broadcast_maximum(&b3.narrow(2, 0, 2)?)?;
    let rb = a3.narrow(2, 2, 2)?.broadcast_minimum(&b3.narrow(2, 2, 2)?)?;
    let wh = (rb - lt)?.relu()?;
    let inter = (wh.narrow(2, 0, 1)? * wh.narrow(2, 1, 1)?)?.squeeze(2)?;
    let union = area_a.unsqueeze(1)?.broadcast_add(&area_b.unsqueeze(0)?)?.sub(&inter)?;
    Ok(((inter / &union)?, union))
}

/// Pairwise IoU `(n, m)` of xyxy boxes (torchvision `box_iou`).
pub fn box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(box_iou_union(a, b)?.0)
}

/// Pairwise generalized IoU `(n, m)` of xyxy boxes (torchvision `generalized_box_iou`).
pub fn generalized_box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (iou, union) = box_iou_union(a, b)?;
    let a3 = a.unsqueeze(1)?;
    let b3 = b.unsqueeze(0)?;
    let lt = a3.narrow(2, 0, 2)?.broadcast_minimum(&b3.narrow(2, 0, 2)?)?;
    let rb = a3.narrow(2, 2, 2)?.broadcast_maximum(&b3.narrow(2, 2, 2)?)?;
    let wh = (rb - lt)?.relu()?;
    let area = (wh.narrow(2, 0, 1)? * wh.narrow(2, 1, 1)?)?.squeeze(2)?;
    iou - ((&area - union)? / area)?
}

/// Elementwise GIoU of matched pairs `a (n, 4)`, `b (n, 4)` (xyxy): the diagonal of
/// [`generalized_box_iou`] without building the `(n, n)` matrix.
pub fn paired_generalized_box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (area_a, area_b) = (box_area(a)?, box_area(b)?);
    let lt = a.narrow(1, 0, 2)?.maximum(&b.narrow(1, 0, 2)?)?;
    let rb = a.narrow(1, 2, 2)?.minimum(&b.narrow(1, 2, 2)?)?;
    let wh = (rb - lt)?.relu()?;
    let inter = (wh.narrow(1, 0, 1)? * wh.narrow(1, 1, 1)?)?.squeeze(1)?;
    let union = ((area_a + area_b)? - &inter)?;
    let iou = (inter / &union)?;
    let lt = a.narrow(1, 0, 2)?.minimum(&b.narrow(1, 0, 2)?)?;
    let rb = a.narrow(1, 2, 2)?.maximum(&b.narrow(1, 2, 2)?)?;
    let wh = (rb - lt)?.relu()?;
    let area = (wh.narrow(1, 0, 1)? * wh.narrow(1, 1, 1)?)?.squeeze(1)?;
    iou - ((&area - union)? / area)?
}

/// A box in plain numbers, `(x0, y0, x1, y1)`, for data pipelines and evaluation.
pub type Xyxy = [f32; 4];

/// `(cx, cy, w, h)` -> `(x0, y0, x1, y1)` on plain numbers.
pub fn cxcywh_to_xyxy_f32(b: [f32; 4]) -> Xyxy {
    [b[0] - 0.5 * b[2], b[1] - 0.5 * b[3], b[0] + 0.5 * b[2], b[1] + 0.5 * b[3]]
}

/// `(x0, y0, x1, y1)` -> `(cx, cy, w, h)` on plain numbers.
pub fn xyxy_to_cxcywh_f32(b: Xyxy) -> [f32; 4] {
    [0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]), b[2] - b[0], b[3] - b[1]]
}

/// IoU of two plain xyxy boxes (0 when the union is empty).
pub fn iou_f32(a: Xyxy, b: Xyxy) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}
