//! Prediction heads of glip-rs: box heads, the fixed-class head, GLIP's token-alignment head
//! and post-processing (scores per category, top-k, threshold, NMS, boxes back to pixels).
//! The detectors that use them are `glip-detectors`'.
//!
//! # Owns
//! Implementations of [`glip_core::BoxHead`] and [`glip_core::ClassHead`].
//!
//! # Must not know about
//! How hidden states were produced, losses, datasets.
//!
//! ```
//! use glip_heads::postprocess::nms;
//! let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
//! assert_eq!(nms(&boxes, &[0.9, 0.8, 0.7], 0.5), vec![0, 2]);
//! ```

pub mod postprocess;

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use glip_core::{BoxHead, ClassHead, LogitsKind, TextFeatures};
use glip_kernels::nn::{l2_normalize, Linear};

/// The seed's box head: one linear layer `bbox_pred (d -> 4)` and a sigmoid, giving normalised
/// cxcywh.
#[derive(Debug, Clone)]
pub struct LinearBoxHead {
    bbox_pred: Linear,
}

impl LinearBoxHead {
    /// Loads `weight (4, d)`, `bias (4,)` from `vb` (the `bbox_pred` scope).
    pub fn new(d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self { bbox_pred: Linear::new(d, 4, vb)? })
    }
}

impl BoxHead for LinearBoxHead {
    fn forward(&self, hs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.bbox_pred.forward(hs)?)
    }
}

/// DETR's box head: a 3-layer MLP `layers.{0,1,2}` (`d -> d -> d -> 4`, ReLU between) and a
/// sigmoid.
#[derive(Debug, Clone)]
pub struct MlpBoxHead {
    layers: Vec<Linear>,
}

impl MlpBoxHead {
    /// Loads `layers.N.*` from `vb` (the `bbox_embed` scope).
    pub fn new(d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let dims = [(d, d), (d, d), (d, 4)];
        let layers = dims
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| Linear::new(a, b, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// The MLP without the final sigmoid: `(b, q, d)` -> `(b, q, 4)` logits.
    pub fn forward_logits(&self, hs: &Tensor) -> Result<Tensor> {
        let mut x = hs.clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if i + 1 < self.layers.len() {
                x = glip_kernels::fused::relu(&x)?;
            }
        }
        Ok(x)
    }
}

impl BoxHead for MlpBoxHead {
    fn forward(&self, hs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::sigmoid(&self.forward_logits(hs)?)
    }
}

/// The seed's fixed-vocabulary head: `class_pred (d -> num_classes + 1)`, the last logit being
/// "no object".
#[derive(Debug, Clone)]
pub struct FixedClassHead {
    class_pred: Linear,
    num_classes: usize,
}

impl FixedClassHead {
    /// Loads from `vb` (the `class_pred` scope).
    pub fn new(d: usize, num_classes: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self { class_pred: Linear::new(d, num_classes + 1, vb)?, num_classes })
    }
}

impl ClassHead for FixedClassHead {
    fn forward(&self, hs: &Tensor, _text: &TextFeatures) -> Result<Tensor> {
        self.class_pred.forward(hs)
    }

    fn logits_kind(&self) -> LogitsKind {
        LogitsKind::Classes(self.num_classes)
    }
}

/// GLIP's region-word alignment head (`TokenAlignmentHead` in the reference):
/// ```text
/// emb    = l2_normalize(text_tokens)
/// proj_t = dot_product_projection_text(emb / 2)
/// proj_q = dot_product_projection_image(hs)
/// bias   = (emb * bias_lang).sum(-1) + bias0
/// logit  = proj_q proj_t^T / exp(log_scale) + bias, clamped to +-50000
/// ```
#[derive(Debug, Clone)]
pub struct TokenAlignmentHead {
    dot_product_projection_text: Linear,
    dot_product_projection_image: Linear,
    log_scale: Tensor,
    bias_lang: Tensor,
    bias0: Tensor,
}

impl TokenAlignmentHead {
    /// Loads from `vb` (the `token_head` scope); `bias0` starts at the focal-loss prior
    /// `-log((1 - 0.01) / 0.01)`.
    pub fn new(text_dim: usize, d: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let prior = 0.01f64;
        Ok(Self {
            dot_product_projection_text: Linear::new(
                text_dim,
                d,
                vb.pp("dot_product_projection_text"),
            )?,
            dot_product_projection_image: Linear::new(d, d, vb.pp("dot_product_projection_image"))?,
            log_scale: vb.get_with_hints((), "log_scale", Init::Const(0.0))?,
            bias_lang: vb.get_with_hints(text_dim, "bias_lang", Init::Const(0.0))?,
            bias0: vb.get_with_hints((), "bias0", Init::Const(-((1.0 - prior) / prior).ln()))?,
        })
    }

    /// `hs (b, q, d)` against any points' features, `tokens (b, t, text_dim)` -> `(b, q, t)`.
    pub fn logits(&self, hs: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let emb = l2_normalize(tokens)?;
        let proj_t = self.dot_product_projection_text.forward(&(&emb * 0.5)?)?;
        let proj_q = self.dot_product_projection_image.forward(hs)?;
        let bias =
            emb.broadcast_mul(&self.bias_lang)?.sum(D::Minus1)?.broadcast_add(&self.bias0)?;
        let sim = proj_q.matmul(&proj_t.transpose(1, 2)?.contiguous()?)?;
        let sim = sim.broadcast_div(&self.log_scale.exp()?)?;
        sim.broadcast_add(&bias.unsqueeze(1)?)?.clamp(-50000f32, 50000f32)
    }
}

impl ClassHead for TokenAlignmentHead {
    fn forward(&self, hs: &Tensor, text: &TextFeatures) -> Result<Tensor> {
        self.logits(hs, &text.tokens)
    }

    fn logits_kind(&self) -> LogitsKind {
        LogitsKind::Tokens
    }
}
