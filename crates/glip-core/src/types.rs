//! The values that cross crate boundaries, each checking its shapes on construction.
//!
//! Conventions (the same as `reference/glip_ref.py`): pixels are NCHW f32 normalised with ImageNet
//! mean/std; boxes are normalised `(cx, cy, w, h)` in `[0, 1]`; token ids are `u32`; masks are
//! `u8` with 1 for a real pixel or token and 0 for padding.

use crate::shape::Contract;
use candle_core::{DType, Result, Tensor};

fn expect_dtype(name: &str, t: &Tensor, dtypes: &[DType]) -> Result<()> {
    if dtypes.contains(&t.dtype()) {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "{name}: dtype {:?}, expected one of {dtypes:?}",
            t.dtype()
        )))
    }
}

/// A batch of images padded to a common size.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `(b, 3, h, w)` f32, normalised.
    pub pixels: Tensor,
    /// `(b, h, w)` u8, 1 where the pixel is real, 0 where it is padding.
    pub mask: Tensor,
}

impl ImageBatch {
    /// Checks `pixels (b, 3, h, w)` and `mask (b, h, w)` agree.
    pub fn new(pixels: Tensor, mask: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pixels", &pixels, "b 3 h w")?;
        c.tensor("mask", &mask, "b h w")?;
        expect_dtype("pixels", &pixels, &[DType::F32, DType::F16, DType::BF16])?;
        expect_dtype("mask", &mask, &[DType::U8])?;
        Ok(Self { pixels, mask })
    }

    /// A batch with no padding: the mask is all ones.
    pub fn unpadded(pixels: Tensor) -> Result<Self> {
        let (b, _, h, w) = pixels.dims4()?;
        let mask = Tensor::ones((b, h, w), DType::U8, pixels.device())?;
        Self::new(pixels, mask)
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        self.pixels.dims()[0]
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch of tokenised captions padded to a common length.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// `(b, t)` u32 token ids.
    pub input_ids: Tensor,
    /// `(b, t)` u8, 1 for real tokens.
    pub attention_mask: Tensor,
    /// Per caption, per token, the character span `[start, end)` in the caption
    /// (`(0, 0)` for special and padding tokens); `b` lists of `t` spans.
    pub offsets: Vec<Vec<(usize, usize)>>,
    /// The captions themselves, `b` of them.
    pub captions: Vec<String>,
}

impl TextBatch {
    /// Checks ids and mask are `(b, t)` and the offsets and captions agree with them.
    pub fn new(
        input_ids: Tensor,
        attention_mask: Tensor,
        offsets: Vec<Vec<(usize, usize)>>,
        captions: Vec<String>,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("input_ids", &input_ids, "b t")?;
        c.tensor("attention_mask", &attention_mask, "b t")?;
        expect_dtype("input_ids", &input_ids, &[DType::U32])?;
        expect_dtype("attention_mask", &attention_mask, &[DType::U8])?;
        c.check("offsets", &[offsets.len()], "b")?;
        c.check("captions", &[captions.len()], "b")?;
        for (i, o) in offsets.iter().enumerate() {
            c.check(&format!("offsets[{i}]"), &[o.len()], "t")?;
        }
        Ok(Self { input_ids, attention_mask, offsets, captions })
    }

    /// Padded token count `t`.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.dims()[1]
    }
}

/// The ground truth of one image.
#[derive(Debug, Clone)]
pub struct Target {
    /// `(n, 4)` f32 normalised cxcywh.
    pub boxes: Tensor,
    /// `(n,)` u32 class indices, for fixed-class heads.
    pub labels: Option<Tensor>,
    /// `(n, t)` f32 0/1: which tokens of the caption each box grounds, for token heads.
    pub positive_map: Option<Tensor>,
}

impl Target {
    /// Checks `boxes (n, 4)`, `labels (n,)` and `positive_map (n, t)`.
    pub fn new(
        boxes: Tensor,
        labels: Option<Tensor>,
        positive_map: Option<Tensor>,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("boxes", &boxes, "n 4")?;
        if let Some(l) = &labels {
            c.tensor("labels", l, "n")?;
            expect_dtype("labels", l, &[DType::U32, DType::I64])?;
        }
        if let Some(p) = &positive_map {
            c.tensor("positive_map", p, "n t")?;
        }
        Ok(Self { boxes, labels, positive_map })
    }

    /// Number of boxes.
    pub fn len(&self) -> usize {
        self.boxes.dims()[0]
    }

    /// Whether the image has no object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One backbone output level.
#[derive(Debug, Clone)]
pub struct FeatureMap {
    /// `(b, c, h, w)`.
    pub tensor: Tensor,
    /// Its stride in input pixels (4 for C2, 32 for C5).
    pub stride: usize,
}

/// What a text encoder returns.
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// `(b, t, d_text)` last hidden state.
    pub tokens: Tensor,
    /// `(b, d_text)` pooled sentence vector (BERT's `tanh(dense(CLS))`), when the model has one.
    pub pooled: Option<Tensor>,
    /// `(b, t)` u8 attention mask, 1 for real tokens.
    pub mask: Tensor,
}

impl TextFeatures {
    /// Checks `tokens (b, t, d)`, `pooled (b, d)` and `mask (b, t)`.
    pub fn new(tokens: Tensor, pooled: Option<Tensor>, mask: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("text tokens", &tokens, "b t d")?;
        if let Some(p) = &pooled {
            c.tensor("pooled text", p, "b d")?;
        }
        c.tensor("text mask", &mask, "b t")?;
        Ok(Self { tokens, pooled, mask })
    }
}

/// What the logits of a model output range over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsKind {
    /// `num_classes + 1` softmax logits, the last being "no object".
    Classes(usize),
    /// One sigmoid logit per text token (GLIP's region-word alignment).
    Tokens,
}

/// Boxes and logits of one decoder layer.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// `(b, q, 4)` normalised cxcywh in `[0, 1]`.
    pub pred_boxes: Tensor,
    /// `(b, q, c)` class logits or `(b, q, t)` token logits.
    pub pred_logits: Tensor,
}

impl Prediction {
    /// Checks `pred_boxes (b, q, 4)` against `pred_logits (b, q, _)`.
    pub fn new(pred_boxes: Tensor, pred_logits: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pred_boxes", &pred_boxes, "b q 4")?;
        c.tensor("pred_logits", &pred_logits, "b q _")?;
        Ok(Self { pred_boxes, pred_logits })
    }
}

/// Everything a detector returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// The final prediction.
    pub pred: Prediction,
    /// What `pred.pred_logits` ranges over.
    pub logits_kind: LogitsKind,
    /// Predictions of the earlier decoder layers, first layer first, for auxiliary losses;
    /// empty when the model does not return them.
    pub aux: Vec<Prediction>,
    /// `(b, q, d)` decoder output of the last layer.
    pub hs: Tensor,
    /// `(b, s, d)` encoder output (after fusion).
    pub memory: Tensor,
    /// `(b, t)` u8 text mask the token logits were computed against.
    pub text_mask: Tensor,
    /// What a particular design adds for its own criterion or scoring (a dense head's
    /// locations, [`DenseOutput`]), keyed by type: a new design adds its own type here
    /// without editing this struct.
    pub extensions: Extensions,
}

/// A map from a type to one value of that type: the design-specific outputs of a detector.
#[derive(Clone, Default)]
pub struct Extensions {
    map: Vec<(std::any::TypeId, &'static str, std::sync::Arc<dyn std::any::Any + Send + Sync>)>,
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.map.iter().map(|(_, name, _)| name)).finish()
    }
}

impl Extensions {
    /// Stores `value`, replacing any earlier value of its type.
    pub fn insert<T: std::any::Any + Send + Sync>(&mut self, value: T) {
        let id = std::any::TypeId::of::<T>();
        self.map.retain(|(k, _, _)| *k != id);
        self.map.push((id, std::any::type_name::<T>(), std::sync::Arc::new(value)));
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        let id = std::any::TypeId::of::<T>();
        self.map.iter().find(|(k, _, _)| *k == id).and_then(|(_, _, v)| v.downcast_ref::<T>())
    }

    /// Removes the value of type `T`.
    pub fn remove<T: std::any::Any + Send + Sync>(&mut self) {
        let id = std::any::TypeId::of::<T>();
        self.map.retain(|(k, _, _)| *k != id);
    }
}

/// The locations of a dense head: one query per feature-map location, every level's
/// locations in turn (row-major, finest level first).
#[derive(Debug, Clone)]
pub struct DenseOutput {
    /// `(b, q, 2)` f32 location centres `(x, y)`, normalised by each image's real size.
    pub points: Tensor,
    /// `(b, q, 2)` f32 the location's stride along x and y, normalised the same way.
    pub strides: Tensor,
    /// Index of each location's level, `q` of them.
    pub level: Vec<usize>,
    /// `(b, q)` centerness logits, when the head predicts them (FCOS).
    pub centerness: Option<Tensor>,
}

impl DenseOutput {
    /// Checks `points (b, q, 2)`, `strides (b, q, 2)`, `level (q,)`, `centerness (b, q)`.
    pub fn new(
        points: Tensor,
        strides: Tensor,
        level: Vec<usize>,
        centerness: Option<Tensor>,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("points", &points, "b q 2")?;
        c.tensor("strides", &strides, "b q 2")?;
        c.check("level", &[level.len()], "q")?;
        if let Some(t) = &centerness {
            c.tensor("centerness", t, "b q")?;
        }
        Ok(Self { points, strides, level, centerness })
    }
}

impl ModelOutput {
    /// Checks every shape against one contract: `b`, `q`, `t` agree throughout.
    pub fn new(
        pred: Prediction,
        logits_kind: LogitsKind,
        aux: Vec<Prediction>,
        hs: Tensor,
        memory: Tensor,
        text_mask: Tensor,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pred_boxes", &pred.pred_boxes, "b q 4")?;
        match logits_kind {
            LogitsKind::Classes(n) => c.bind("c", n + 1, "num_classes + 1")?,
            LogitsKind::Tokens => {
                c.bind("c", text_mask.dims().get(1).copied().unwrap_or(0), "text mask")?
            }
        }
        c.tensor("pred_logits", &pred.pred_logits, "b q c")?;
        for (i, a) in aux.iter().enumerate() {
            c.tensor(&format!("aux[{i}].pred_boxes"), &a.pred_boxes, "b q 4")?;
            c.tensor(&format!("aux[{i}].pred_logits"), &a.pred_logits, "b q c")?;
        }
        c.tensor("hs", &hs, "b q d")?;
        c.tensor("memory", &memory, "b s d")?;
        c.tensor("text_mask", &text_mask, "b _")?;
        Ok(Self {
            pred,
            logits_kind,
            aux,
            hs,
            memory,
            text_mask,
            extensions: Extensions::default(),
        })
    }

    /// The same output with the locations of a dense head, checked against `pred`.
    pub fn with_dense(mut self, dense: DenseOutput) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pred_boxes", &self.pred.pred_boxes, "b q 4")?;
        c.tensor("dense points", &dense.points, "b q 2")?;
        self.extensions.insert(dense);
        Ok(self)
    }

    /// The locations of a dense head, if the detector is one.
    pub fn dense(&self) -> Option<&DenseOutput> {
        self.extensions.get::<DenseOutput>()
    }
}

/// A Hungarian (or other) assignment for one image: `query[i]` is matched to `target[i]`,
/// sorted by query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Matched query indices, ascending.
    pub query: Vec<usize>,
    /// The target index of each matched query.
    pub target: Vec<usize>,
}

/// A criterion's result.
#[derive(Debug, Clone)]
pub struct Losses {
    /// The weighted scalar to call `backward` on.
    pub total: Tensor,
    /// Each unweighted term by name (`loss_ce`, `loss_bbox`, ...), aux terms suffixed `_<layer>`.
    pub terms: Vec<(String, Tensor)>,
    /// The final layer's matches, one per image.
    pub matches: Vec<Match>,
}
