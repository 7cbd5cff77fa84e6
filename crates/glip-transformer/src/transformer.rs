//! Encoder and decoder with `torch.nn.Transformer`'s names: `encoder.layers.N.{self_attn,
//! linear1, linear2, norm1, norm2}`, `decoder.layers.N.{self_attn, multihead_attn, linear1,
//! linear2, norm1, norm2, norm3}`, final `encoder.norm` / `decoder.norm`.

use crate::attention::MultiheadAttention;
use crate::deformable::{DeformableAttention, Reference, SamplingLevels};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use glip_core::validate::{limits, Checker, Validate};
use glip_core::Queries;
use glip_kernels::nn::{dropout, LayerNorm, Linear};
use serde::{Deserialize, Serialize};

/// Feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// ReLU (torch's default).
    Relu,
    /// Exact (erf) GELU.
    Gelu,
}

/// Transformer options; defaults are `torch.nn.Transformer`'s except the sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Width `d`.
    pub d_model: usize,
    /// Attention heads.
    pub nhead: usize,
    /// Encoder layers.
    pub num_encoder_layers: usize,
    /// Decoder layers.
    pub num_decoder_layers: usize,
    /// Feed-forward width.
    pub dim_feedforward: usize,
    /// Dropout (training only). Default 0.1.
    #[serde(default = "default_dropout")]
    pub dropout: f32,
    /// Feed-forward activation. Default relu.
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// Pre-norm layers (norm before each block) instead of torch's default post-norm.
    #[serde(default)]
    pub pre_norm: bool,
    /// How the encoder's tokens attend to each other: `global` (multi-head self-attention over
    /// every token, the default) or `deformable` (Deformable DETR's and Grounding DINO's image
    /// encoder: each token samples `encoder_points` points per head and level around its own
    /// centre, linear in the number of tokens).
    #[serde(default)]
    pub encoder_attention: EncoderAttentionKind,
    /// Samples per head and level of a deformable encoder (Grounding DINO's `enc_n_points`).
    /// Default 4.
    #[serde(default = "default_points")]
    pub encoder_points: usize,
}

/// How the encoder's tokens attend to each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncoderAttentionKind {
    /// Multi-head self-attention over every token (`self_attn` with packed projections).
    #[default]
    Global,
    /// Multi-scale deformable self-attention from each token's centre (`self_attn`:
    /// `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`).
    Deformable,
}

fn default_points() -> usize {
    4
}

fn default_dropout() -> f32 {
    0.1
}
fn default_activation() -> Activation {
    Activation::Relu
}

impl Validate for TransformerConfig {
    fn validate(&self, c: &mut Checker) {
        c.in_range("d_model", self.d_model, 1, limits::WIDTH);
        c.in_range("nhead", self.nhead, 1, limits::HEADS);
        let width = c.key("d_model");
        c.divides("nhead", self.nhead, self.d_model, &width);
        c.in_range("num_encoder_layers", self.num_encoder_layers, 0, limits::LAYERS);
        c.in_range("num_decoder_layers", self.num_decoder_layers, 0, limits::LAYERS);
        c.in_range("dim_feedforward", self.dim_feedforward, 1, limits::WIDTH);
        c.dropout("dropout", self.dropout as f64);
        c.in_range("encoder_points", self.encoder_points, 1, 64);
    }
}

impl TransformerConfig {
    /// A config with torch's defaults for everything but the sizes.
    pub fn new(d_model: usize, nhead: usize, enc: usize, dec: usize, ff: usize) -> Self {
        Self {
            d_model,
            nhead,
            num_encoder_layers: enc,
            num_decoder_layers: dec,
            dim_feedforward: ff,
            dropout: default_dropout(),
            activation: default_activation(),
            pre_norm: false,
            encoder_attention: EncoderAttentionKind::Global,
            encoder_points: default_points(),
        }
    }
}

fn with_pos(x: &Tensor, pos: Option<&Tensor>) -> Result<Tensor> {
    match pos {
        Some(p) => x.broadcast_add(p),
        None => Ok(x.clone()),
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    linear1: Linear,
    linear2: Linear,
    activation: Activation,
    dropout: f32,
}

impl FeedForward {
    fn new(cfg: &TransformerConfig, vb: &VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            linear1: Linear::new(cfg.d_model, cfg.dim_feedforward, vb.pp("linear1"))?,
            linear2: Linear::new(cfg.dim_feedforward, cfg.d_model, vb.pp("linear2"))?,
            activation: cfg.activation,
            dropout: cfg.dropout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.linear1.forward(x)?;
        let h = match self.activation {
            Activation::Relu => glip_kernels::fused::relu(&h)?,
            Activation::Gelu => glip_kernels::fused::gelu_erf(&h)?,
        };
        let h = self.linear2.forward(&dropout(&h, self.dropout, train)?)?;
        dropout(&h, self.dropout, train)
    }
}

/// An encoder layer's self-attention.
#[derive(Debug, Clone)]
enum SelfAttention {
    Global(MultiheadAttention),
    Deformable(DeformableAttention),
}

/// Where a deformable encoder layer samples: the levels, and every token's centre `(b, s, 2)`
/// ([`SamplingLevels::token_centres`]).
#[derive(Debug, Clone, Copy)]
pub struct EncoderLevels<'a> {
    /// The tokens' levels and the images' sizes.
    pub levels: &'a SamplingLevels,
    /// Every token's centre, normalised by its image's size.
    pub centres: &'a Tensor,
}

/// One encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    self_attn: SelfAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    pre_norm: bool,
    dropout: f32,
}

impl EncoderLayer {
    /// Loads `self_attn`, `linear1/2`, `norm1/2` from `vb`.
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Self::with_levels(cfg, 1, vb)
    }

    /// An encoder layer over tokens from `levels` levels: with `cfg.encoder_attention =
    /// deformable`, its self-attention samples `cfg.encoder_points` points per head and level
    /// (and needs [`EncoderLayer::forward_at`]); otherwise `levels` is not used.
    pub fn with_levels(cfg: &TransformerConfig, levels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let (d, heads) = (cfg.d_model, cfg.nhead);
        let self_attn = match cfg.encoder_attention {
            EncoderAttentionKind::Global => SelfAttention::Global(MultiheadAttention::new(
                d,
                heads,
                cfg.dropout,
                vb.pp("self_attn"),
            )?),
            EncoderAttentionKind::Deformable => SelfAttention::Deformable(
                DeformableAttention::new(d, heads, levels, cfg.encoder_points, vb.pp("self_attn"))?,
            ),
        };
        Ok(Self {
            self_attn,
            ff: FeedForward::new(cfg, &vb)?,
            norm1: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm1"))?,
            norm2: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm2"))?,
            pre_norm: cfg.pre_norm,
            dropout: cfg.dropout,
        })
    }

    /// `x (b, s, d)`, `mask (b, s)`, `pos (b, s, d)` -> `(b, s, d)`. A deformable layer needs
    /// [`EncoderLayer::forward_at`].
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_at(x, mask, pos, None, train)
    }

    /// [`EncoderLayer::forward`] told where the tokens lie, which a deformable layer samples
    /// by (a global one ignores it).
    pub fn forward_at(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        at: Option<EncoderLevels<'_>>,
        train: bool,
    ) -> Result<Tensor> {
        self.block(x, train, |h| {
            let qk = with_pos(h, pos)?;
            match (&self.self_attn, at) {
                (SelfAttention::Global(attn), _) => attn.forward(&qk, &qk, h, mask, train),
                (SelfAttention::Deformable(attn), Some(at)) => {
                    attn.forward(&qk, Reference::Points(at.centres), h, mask, at.levels)
                }
                (SelfAttention::Deformable(_), None) => candle_core::bail!(
                    "an encoder layer with deformable attention needs the tokens' levels"
                ),
            }
        })
    }

    /// [`EncoderLayer::forward`] of a global layer with `bias (b, s, s)` added to its
    /// attention scores in place of a key mask (`f32::MIN` where token `i` must not see `j`:
    /// Grounding DINO's text layers between sub-sentences).
    pub fn forward_biased(
        &self,
        x: &Tensor,
        bias: &Tensor,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.block(x, train, |h| {
            let qk = with_pos(h, pos)?;
            match &self.self_attn {
                SelfAttention::Global(attn) => {
                    attn.forward_biased(&qk, &qk, h, None, Some(bias), train)
                }
                SelfAttention::Deformable(_) => candle_core::bail!(
                    "an encoder layer with deformable attention takes no attention bias"
                ),
            }
        })
    }

    /// The layer around its self-attention `attend` (of the normed input when pre-norm).
    fn block(
        &self,
        x: &Tensor,
        train: bool,
        attend: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.pre_norm {
            let h = self.norm1.forward(x)?;
            let a = attend(&h)?;
            let x = (x + dropout(&a, self.dropout, train)?)?;
            let f = self.ff.forward(&self.norm2.forward(&x)?, train)?;
            x + f
        } else {
            let a = attend(x)?;
            let x = self.norm1.forward_residual(x, &dropout(&a, self.dropout, train)?)?;
            let f = self.ff.forward(&x, train)?;
            self.norm2.forward_residual(&x, &f)
        }
    }
}

/// What a decoder layer's queries attend to: the image memory and, for a layer with text
/// cross-attention, the text.
#[derive(Debug, Clone, Copy)]
pub struct DecoderMemory<'a> {
    /// `(b, s, d)` image tokens.
    pub memory: &'a Tensor,
    /// `(b, s)` u8, 1 for real image tokens.
    pub mask: Option<&'a Tensor>,
    /// `(b, s, d)` their positions (added to the keys).
    pub pos: Option<&'a Tensor>,
    /// `(b, t, d)` text tokens at the model's width and their `(b, t)` u8 mask (1 for real
    /// tokens): the keys and values of a layer's text cross-attention, without positions.
    pub text: Option<(&'a Tensor, &'a Tensor)>,
    /// The image tokens' levels and the images' sizes, where a layer with deformable image
    /// attention samples.
    pub levels: Option<&'a SamplingLevels>,
}

impl<'a> DecoderMemory<'a> {
    /// Image memory only.
    pub fn image(memory: &'a Tensor, mask: Option<&'a Tensor>, pos: Option<&'a Tensor>) -> Self {
        Self { memory, mask, pos, text: None, levels: None }
    }
}

/// What a [`DecoderLayer`] has beside self-attention, image cross-attention and feed-forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderLayerOptions {
    /// Grounding DINO's text cross-attention (`ca_text`, `catext_norm`) between the
    /// self-attention and the image cross-attention.
    pub text_attention: bool,
    /// Deformable DETR's deformable attention over the image tokens (`cross_attn`:
    /// `(levels, points)`) in place of multi-head attention over all of them
    /// (`multihead_attn`), as Grounding DINO's decoder has.
    pub deformable: Option<(usize, usize)>,
}

/// A layer's image attention in one forward, with its inputs.
enum Image<'a> {
    Global(&'a MultiheadAttention, Tensor),
    Deformable(&'a DeformableAttention, &'a Tensor, &'a SamplingLevels),
}

/// A decoder layer's image cross-attention.
#[derive(Debug, Clone)]
enum ImageAttention {
    /// Every query attends to every image token (`multihead_attn`, the image positions added
    /// to the keys).
    Global(MultiheadAttention),
    /// Every query samples around its reference box (`cross_attn`).
    Deformable(DeformableAttention),
}

/// Grounding DINO's text cross-attention in a decoder layer: `ca_text` over the text tokens,
/// then `catext_norm` (its names).
#[derive(Debug, Clone)]
struct TextCrossAttention {
    attn: MultiheadAttention,
    norm: LayerNorm,
}

/// One decoder layer: self-attention, (with [`DecoderLayer::with_text_attention`]) text
/// cross-attention, image cross-attention, feed-forward.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: MultiheadAttention,
    text_attn: Option<TextCrossAttention>,
    image_attn: ImageAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
    pre_norm: bool,
    dropout: f32,
}

impl DecoderLayer {
    /// Loads `self_attn`, `multihead_attn`, `linear1/2`, `norm1..3` from `vb`.
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Self::with_options(cfg, DecoderLayerOptions::default(), vb)
    }

    /// [`DecoderLayer::new`] plus Grounding DINO's text cross-attention (`ca_text`,
    /// `catext_norm`) between the self-attention and the image cross-attention: the queries
    /// (with their positions) attend to the prompt's tokens, which then need
    /// [`DecoderMemory::text`].
    pub fn with_text_attention(cfg: &TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let options = DecoderLayerOptions { text_attention: true, ..Default::default() };
        Self::with_options(cfg, options, vb)
    }

    /// A layer with `options`: with text attention it needs [`DecoderMemory::text`], with
    /// deformable image attention [`DecoderMemory::levels`] and reference boxes
    /// ([`DecoderLayer::forward_at`]).
    pub fn with_options(
        cfg: &TransformerConfig,
        options: DecoderLayerOptions,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let (d, heads) = (cfg.d_model, cfg.nhead);
        let attn = |name: &str| MultiheadAttention::new(d, heads, cfg.dropout, vb.pp(name));
        let text_attn = match options.text_attention {
            true => Some(TextCrossAttention {
                attn: attn("ca_text")?,
                norm: LayerNorm::new(d, 1e-5, vb.pp("catext_norm"))?,
            }),
            false => None,
        };
        let image_attn = match options.deformable {
            None => ImageAttention::Global(attn("multihead_attn")?),
            Some((levels, points)) => ImageAttention::Deformable(DeformableAttention::new(
                d,
                heads,
                levels,
                points,
                vb.pp("cross_attn"),
            )?),
        };
        Ok(Self {
            self_attn: attn("self_attn")?,
            text_attn,
            image_attn,
            ff: FeedForward::new(cfg, &vb)?,
            norm1: LayerNorm::new(d, 1e-5, vb.pp("norm1"))?,
            norm2: LayerNorm::new(d, 1e-5, vb.pp("norm2"))?,
            norm3: LayerNorm::new(d, 1e-5, vb.pp("norm3"))?,
            pre_norm: cfg.pre_norm,
            dropout: cfg.dropout,
        })
    }

    /// Whether the layer attends to the text.
    pub fn has_text_attention(&self) -> bool {
        self.text_attn.is_some()
    }

    /// Whether the layer's image attention is deformable (it then needs reference boxes).
    pub fn is_deformable(&self) -> bool {
        matches!(self.image_attn, ImageAttention::Deformable(_))
    }

    /// `x (b, q, d)` with query positions `qpos (b, q, d)` over `mem` -> `(b, q, d)`;
    /// `self_bias (q, q)`, if any, added to the self-attention's scores (which queries may see
    /// which, see [`MultiheadAttention::forward_biased`]). A layer with text cross-attention
    /// needs `mem.text`; one without ignores it. A deformable layer needs
    /// [`DecoderLayer::forward_at`].
    pub fn forward(
        &self,
        x: &Tensor,
        qpos: Option<&Tensor>,
        mem: &DecoderMemory<'_>,
        self_bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_at(x, qpos, None, mem, self_bias, train)
    }

    /// [`DecoderLayer::forward`] with the queries' reference boxes `(b, q, 4)` (cx, cy, w, h,
    /// normalised by each image's size), around which a deformable layer samples `mem.levels`;
    /// a layer that attends to every image token ignores them.
    pub fn forward_at(
        &self,
        x: &Tensor,
        qpos: Option<&Tensor>,
        boxes: Option<&Tensor>,
        mem: &DecoderMemory<'_>,
        self_bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let drop = |t: &Tensor| dropout(t, self.dropout, train);
        let text = match (&self.text_attn, mem.text) {
            (None, _) => None,
            (Some(t), Some(text)) => Some((t, text)),
            (Some(_), None) => {
                candle_core::bail!("a decoder layer with text cross-attention was given no text")
            }
        };
        // The image attention with what it reads: the keys (memory plus positions), or where
        // to sample.
        let image = match (&self.image_attn, boxes, mem.levels) {
            (ImageAttention::Global(attn), _, _) => {
                Image::Global(attn, with_pos(mem.memory, mem.pos)?)
            }
            (ImageAttention::Deformable(attn), Some(boxes), Some(levels)) => {
                Image::Deformable(attn, boxes, levels)
            }
            (ImageAttention::Deformable(_), _, _) => candle_core::bail!(
                "a decoder layer with deformable attention needs reference boxes and the \
                 image's levels"
            ),
        };
        // Each block: `attend(block input) -> residual`, around it the norm before (pre-norm)
        // or after (post-norm).
        let block = |x: &Tensor, norm: &LayerNorm, f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            if self.pre_norm {
                x + f(&norm.forward(x)?)?
            } else {
                norm.forward_residual(x, &f(x)?)
            }
        };
        let x = block(x, &self.norm1, &|h| {
            let qk = with_pos(h, qpos)?;
            drop(&self.self_attn.forward_biased(&qk, &qk, h, None, self_bias, train)?)
        })?;
        let x = match text {
            None => x,
            Some((t, (tokens, mask))) => block(&x, &t.norm, &|h| {
                drop(&t.attn.forward(&with_pos(h, qpos)?, tokens, tokens, Some(mask), train)?)
            })?,
        };
        let x = block(&x, &self.norm2, &|h| {
            let query = with_pos(h, qpos)?;
            let a = match &image {
                Image::Global(attn, keys) => {
                    attn.forward(&query, keys, mem.memory, mem.mask, train)?
                }
                Image::Deformable(attn, boxes, levels) => {
                    attn.forward(&query, Reference::Boxes(boxes), mem.memory, mem.mask, levels)?
                }
            };
            drop(&a)
        })?;
        block(&x, &self.norm3, &|h| self.ff.forward(h, train))
    }
}

/// The encoder-decoder: `encoder.layers.N`, `encoder.norm`, `decoder.layers.N`, `decoder.norm`
/// (no decoder at all with `num_decoder_layers = 0`: an encoder for detectors that do not decode
/// with it).
#[derive(Debug, Clone)]
pub struct DetrTransformer {
    encoder: Vec<EncoderLayer>,
    encoder_norm: LayerNorm,
    decoder: Vec<DecoderLayer>,
    /// Absent in an encoder-only transformer (no decoder layer).
    decoder_norm: Option<LayerNorm>,
    config: TransformerConfig,
}

impl DetrTransformer {
    /// Loads from `vb` (the `transformer` scope of a checkpoint).
    pub fn new(config: TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Self::with_levels(config, 1, vb)
    }

    /// [`DetrTransformer::new`] for image tokens from `levels` feature levels (what a
    /// deformable encoder samples; see [`EncoderLayer::with_levels`]).
    pub fn with_levels(
        config: TransformerConfig,
        levels: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let d = config.d_model;
        let encoder = (0..config.num_encoder_layers)
            .map(|i| {
                EncoderLayer::with_levels(&config, levels, vb.pp(format!("encoder.layers.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..config.num_decoder_layers)
            .map(|i| DecoderLayer::new(&config, vb.pp(format!("decoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            encoder,
            encoder_norm: LayerNorm::new(d, 1e-5, vb.pp("encoder.norm"))?,
            decoder,
            decoder_norm: if config.num_decoder_layers > 0 {
                Some(LayerNorm::new(d, 1e-5, vb.pp("decoder.norm"))?)
            } else {
                None
            },
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }
}

impl glip_core::Transformer for DetrTransformer {
    fn encode(
        &self,
        src: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mut x = src.clone();
        for l in &self.encoder {
            x = l.forward(&x, mask, pos, train)?;
        }
        self.encoder_norm.forward(&x)
    }

    fn encode_levels(
        &self,
        src: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        levels: &[glip_core::LevelShape],
        image_sizes: &[(f32, f32)],
        train: bool,
    ) -> Result<Tensor> {
        if self.config.encoder_attention == EncoderAttentionKind::Global {
            return self.encode(src, mask, pos, train);
        }
        let at = SamplingLevels::cached(levels, image_sizes, src.device())?;
        let at = EncoderLevels { levels: &at, centres: at.token_centres() };
        let mut x = src.clone();
        for l in &self.encoder {
            x = l.forward_at(&x, mask, pos, Some(at), train)?;
        }
        self.encoder_norm.forward(&x)
    }

    fn decode(
        &self,
        queries: &Queries,
        memory: &Tensor,
        memory_mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let Some(norm) = &self.decoder_norm else {
            candle_core::bail!("this transformer has no decoder (num_decoder_layers = 0)")
        };
        let mut x = queries.content.clone();
        let mut out = Vec::with_capacity(self.decoder.len());
        let mem = DecoderMemory::image(memory, memory_mask, pos);
        for l in &self.decoder {
            x = l.forward(&x, queries.pos.as_ref(), &mem, None, train)?;
            out.push(norm.forward(&x)?);
        }
        Ok(out)
    }
}
