//! The components a researcher swaps, each a small trait shaped like candle's `Module`.
//!
//! Built-in implementations live in the sibling crates and are chosen by config in
//! `glip-train`; a researcher's own type implementing one of these traits plugs into the model
//! builder without touching any enum of this workspace.

use crate::types::{FeatureMap, Losses, Match, ModelOutput, Target, TextFeatures, TextSegments};

use candle_core::{Result, Tensor};

/// Image feature extractor.
pub trait Backbone: Send + Sync {
    /// `images (b, 3, h, w)` -> feature maps, finest first (ResNet: C2..C5, strides 4..32).
    fn forward(&self, images: &Tensor, train: bool) -> Result<Vec<FeatureMap>>;
    /// Channels of each returned level, in the same order.
    fn out_channels(&self) -> Vec<usize>;
    /// Stride of each returned level, in the same order.
    fn strides(&self) -> Vec<usize>;
}

/// Text encoder (BERT and friends).
pub trait TextEncoder: Send + Sync {
    /// `input_ids (b, t)` u32, `attention_mask (b, t)` u8 -> token features `(b, t, d)`.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<TextFeatures>;
    /// [`TextEncoder::forward`] with each token attending only to its own sub-sentence and
    /// positioned in it (Grounding DINO's sub-sentence representation,
    /// `model.text_attention = "sub-sentence"`). An encoder without it (the default) says so.
    fn forward_segmented(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        segments: &TextSegments,
        train: bool,
    ) -> Result<TextFeatures> {
        let _ = (input_ids, attention_mask, segments, train);
        candle_core::bail!(
            "this text encoder has no sub-sentence attention (model.text_attention = \
             \"sub-sentence\"): implement TextEncoder::forward_segmented"
        )
    }
    /// `d`, the width of the token features.
    fn hidden_size(&self) -> usize;
}

/// What a query generator may look at.
#[derive(Debug, Clone, Copy)]
pub struct QueryInputs<'a> {
    /// Text features (tokens `(b, t, d_text)`, pooled `(b, d_text)`, mask `(b, t)`).
    pub text: &'a TextFeatures,
    /// `(b, s, d)` encoder output.
    pub memory: &'a Tensor,
    /// `(b, s)` u8, 1 for real image positions; `None` when nothing is padded.
    pub memory_mask: Option<&'a Tensor>,
}

/// Decoder queries.
#[derive(Debug, Clone)]
pub struct Queries {
    /// `(b, q, d)` content queries (the decoder's initial `tgt`).
    pub content: Tensor,
    /// `(b, q, d)` positional part added to the queries in every attention, if any.
    pub pos: Option<Tensor>,
    /// `(b, q, 4)` normalised cxcywh reference boxes, for generators that predict them.
    pub reference_boxes: Option<Tensor>,
}

/// Turns text (and possibly image memory) into decoder queries.
pub trait QueryGenerator: Send + Sync {
    /// Queries `(b, q, d)` for the batch.
    fn forward(&self, inputs: &QueryInputs<'_>, train: bool) -> Result<Queries>;
    /// `q`.
    fn num_queries(&self) -> usize;
}

/// Image-text fusion applied to the encoder output. The identity is a valid fusion.
pub trait Fusion: Send + Sync {
    /// `image (b, s, d)`, `text (b, t, d_text)` -> updated `(image, text)`, same shapes.
    /// Masks are `(b, s)` / `(b, t)` u8 with 1 for real positions.
    fn forward(
        &self,
        image: &Tensor,
        image_mask: Option<&Tensor>,
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)>;

    /// [`Fusion::forward`] told the image tokens' positions and where they lie: a fusion with
    /// image layers of its own (Grounding DINO's feature enhancer, whose image layers may sample
    /// by position) needs them; the default ignores them. The model calls this one.
    fn forward_at(
        &self,
        image: &Tensor,
        image_mask: Option<&Tensor>,
        layout: TokenLayout<'_>,
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let _ = layout;
        self.forward(image, image_mask, text, text_mask, train)
    }
}

/// Where the encoder's image tokens come from: their positional encodings and levels, and the
/// images' sizes (as [`Encoded`] carries them); and the text tokens' sub-sentences, when the
/// model groups them so.
#[derive(Debug, Clone, Copy)]
pub struct TokenLayout<'a> {
    /// `(b, s, d)` positions added in attention, if the model has any.
    pub pos: Option<&'a Tensor>,
    /// The tokens' levels, finest first, each row-major.
    pub levels: &'a [LevelShape],
    /// Each image's real `(width, height)` in pixels.
    pub image_sizes: &'a [(f32, f32)],
    /// The text tokens' sub-sentences (`model.text_attention = "sub-sentence"`): a fusion
    /// whose text attends to itself keeps to them; `None` for whole captions.
    pub text: Option<&'a TextSegments>,
}

/// Encoder-decoder over flattened image tokens.
pub trait Transformer: Send + Sync {
    /// `src (b, s, d)`, `mask (b, s)` u8 (1 = real), `pos (b, s, d)` -> memory `(b, s, d)`.
    fn encode(
        &self,
        src: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor>;
    /// [`Transformer::encode`] told where the tokens come from: `levels` (finest first, each
    /// row-major, as [`Encoded::levels`]) of images of `image_sizes` `(width, height)` pixels
    /// (unpadded). An encoder that samples by position (deformable attention) needs it; the
    /// default ignores it.
    fn encode_levels(
        &self,
        src: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        levels: &[LevelShape],
        image_sizes: &[(f32, f32)],
        train: bool,
    ) -> Result<Tensor> {
        let _ = (levels, image_sizes);
        self.encode(src, mask, pos, train)
    }
    /// Queries and memory -> the output of every decoder layer `(b, q, d)`, first layer first,
    /// each passed through the decoder's final norm; the last is the model's `hs`.
    fn decode(
        &self,
        queries: &Queries,
        memory: &Tensor,
        memory_mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Vec<Tensor>>;
}

/// Predicts boxes from decoder states.
pub trait BoxHead: Send + Sync {
    /// `hs (b, q, d)` -> `(b, q, 4)` normalised cxcywh.
    fn forward(&self, hs: &Tensor) -> Result<Tensor>;
}

/// Predicts class or token logits from decoder states.
pub trait ClassHead: Send + Sync {
    /// `hs (b, q, d)` -> `(b, q, c)` class logits or `(b, q, t)` token logits.
    fn forward(&self, hs: &Tensor, text: &TextFeatures) -> Result<Tensor>;
    /// What the logits range over.
    fn logits_kind(&self) -> crate::types::LogitsKind;
}

/// Solves an assignment problem on a cost matrix.
pub trait Matcher: Send + Sync {
    /// `cost (q, n)` -> an assignment of `min(q, n)` pairs, sorted by query.
    fn assign(&self, cost: &Tensor) -> Result<Match>;
}

/// A training loss.
pub trait Criterion: Send + Sync {
    /// Loss of `out` against one target per image.
    fn forward(&self, out: &ModelOutput, targets: &[Target]) -> Result<Losses>;
}

/// The size of one level of the encoder's image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelShape {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Stride in input pixels.
    pub stride: usize,
}

/// Levels and image sizes as a key (bit patterns of the sizes), for the per-thread caches of
/// what is made from them (a dense head's locations, deformable attention's sampling levels).
pub type LevelsKey = (Vec<(usize, usize, usize)>, Vec<(u32, u32)>);

impl LevelShape {
    /// Every token's centre over `levels` (finest first, each row-major) in each image of
    /// `image_sizes` `(width, height)` pixels, normalised by the image's size: column `j` of a
    /// level of stride `t` at `(j + 0.5) * t / width`. `b * s` pairs `(x, y)`, flattened.
    pub fn token_centres(levels: &[LevelShape], image_sizes: &[(f32, f32)]) -> Vec<f32> {
        let s: usize = levels.iter().map(|l| l.h * l.w).sum();
        let mut v = Vec::with_capacity(image_sizes.len() * s * 2);
        for &(w, h) in image_sizes {
            for l in levels {
                let t = l.stride as f32;
                for i in 0..l.h {
                    for j in 0..l.w {
                        v.extend([(j as f32 + 0.5) * t / w, (i as f32 + 0.5) * t / h]);
                    }
                }
            }
        }
        v
    }

    /// `levels` and `image_sizes` as a [`LevelsKey`].
    pub fn key(levels: &[LevelShape], image_sizes: &[(f32, f32)]) -> LevelsKey {
        (
            levels.iter().map(|l| (l.h, l.w, l.stride)).collect(),
            image_sizes.iter().map(|&(w, h)| (w.to_bits(), h.to_bits())).collect(),
        )
    }
}

/// What a detector sees: the fused encoder output and the text.
#[derive(Clone, Copy)]
pub struct Encoded<'a> {
    /// `(b, s, d)` image tokens after the encoder and fusion; `s` is the sum of `h * w` over
    /// `levels`, every level row-major in turn.
    pub memory: &'a Tensor,
    /// `(b, s)` u8, 1 for real positions; `None` when nothing is padded.
    pub memory_mask: Option<&'a Tensor>,
    /// `(b, s, d)` positional encoding of the tokens, if the model uses one.
    pub pos: Option<&'a Tensor>,
    /// The levels the tokens come from, finest first.
    pub levels: &'a [LevelShape],
    /// Real (unpadded) `(width, height)` of every image in pixels.
    pub image_sizes: &'a [(f32, f32)],
    /// Text features after fusion.
    pub text: &'a TextFeatures,
    /// The encoder-decoder, for detectors that decode.
    pub transformer: &'a dyn Transformer,
    /// The batch's targets in a training step (`None` in inference and evaluation), for
    /// detectors that make queries from them (denoising, [`crate::DenoisingOutput`]).
    pub targets: Option<&'a [Target]>,
}

impl std::fmt::Debug for Encoded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("memory", &self.memory.dims())
            .field("levels", &self.levels)
            .field("image_sizes", &self.image_sizes)
            .finish_non_exhaustive()
    }
}

/// From the fused encoder output to predictions: a query decoder (DETR, the seed), a dense
/// one-stage head (GLIP), query selection with refinement (Grounding DINO), or your own.
pub trait Detector: Send + Sync {
    /// Predictions for the batch; `trace(name, shape)` is called for the tensors it makes
    /// (what `glip inspect` prints).
    fn forward(
        &self,
        x: &Encoded<'_>,
        train: bool,
        trace: &mut dyn FnMut(&str, &[usize]),
    ) -> Result<ModelOutput>;
    /// The per-category NMS IoU its detections need by default: none for set prediction
    /// (DETR-style one-to-one matching), GLIP's 0.6 for a dense head.
    fn default_nms(&self) -> Option<f32> {
        None
    }
    /// `(b, q, c)` detection scores of the batch from per-category scores computed on its
    /// logits (`per_category`, e.g. the token scores of a prompt), on the device. The default
    /// keeps them; a dense head with centerness gives FCOS's `sqrt(score * sigmoid(centerness))`.
    fn score(&self, out: &ModelOutput, per_category: Tensor) -> Result<Tensor> {
        let _ = out;
        Ok(per_category)
    }
    /// Whether it runs the transformer's decoder (a dense head and query selection do not: the
    /// transformer is then built without decoder layers).
    fn uses_decoder(&self) -> bool {
        true
    }
    /// The registered criterion that trains it unless the config names one (`set`: matched
    /// set prediction; `dense`: FCOS/ATSS assignment).
    fn default_criterion(&self) -> &str {
        "set"
    }
}
