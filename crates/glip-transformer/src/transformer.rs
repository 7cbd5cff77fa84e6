//! Encoder and decoder with `torch.nn.Transformer`'s names: `encoder.layers.N.{self_attn,
//! linear1, linear2, norm1, norm2}`, `decoder.layers.N.{self_attn, multihead_attn, linear1,
//! linear2, norm1, norm2, norm3}`, final `encoder.norm` / `decoder.norm`.

use crate::attention::MultiheadAttention;
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

/// One encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    self_attn: MultiheadAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    pre_norm: bool,
    dropout: f32,
}

impl EncoderLayer {
    /// Loads `self_attn`, `linear1/2`, `norm1/2` from `vb`.
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            self_attn: MultiheadAttention::new(
                cfg.d_model,
                cfg.nhead,
                cfg.dropout,
                vb.pp("self_attn"),
            )?,
            ff: FeedForward::new(cfg, &vb)?,
            norm1: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm1"))?,
            norm2: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm2"))?,
            pre_norm: cfg.pre_norm,
            dropout: cfg.dropout,
        })
    }

    /// `x (b, s, d)`, `mask (b, s)`, `pos (b, s, d)` -> `(b, s, d)`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        if self.pre_norm {
            let h = self.norm1.forward(x)?;
            let qk = with_pos(&h, pos)?;
            let a = self.self_attn.forward(&qk, &qk, &h, mask, train)?;
            let x = (x + dropout(&a, self.dropout, train)?)?;
            let f = self.ff.forward(&self.norm2.forward(&x)?, train)?;
            x + f
        } else {
            let qk = with_pos(x, pos)?;
            let a = self.self_attn.forward(&qk, &qk, x, mask, train)?;
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
}

impl<'a> DecoderMemory<'a> {
    /// Image memory only.
    pub fn image(memory: &'a Tensor, mask: Option<&'a Tensor>, pos: Option<&'a Tensor>) -> Self {
        Self { memory, mask, pos, text: None }
    }
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
    multihead_attn: MultiheadAttention,
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
        let attn =
            |name: &str| MultiheadAttention::new(cfg.d_model, cfg.nhead, cfg.dropout, vb.pp(name));
        Ok(Self {
            self_attn: attn("self_attn")?,
            text_attn: None,
            multihead_attn: attn("multihead_attn")?,
            ff: FeedForward::new(cfg, &vb)?,
            norm1: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm1"))?,
            norm2: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm2"))?,
            norm3: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("norm3"))?,
            pre_norm: cfg.pre_norm,
            dropout: cfg.dropout,
        })
    }

    /// [`DecoderLayer::new`] plus Grounding DINO's text cross-attention (`ca_text`,
    /// `catext_norm`) between the self-attention and the image cross-attention: the queries
    /// (with their positions) attend to the prompt's tokens, which then need
    /// [`DecoderMemory::text`].
    pub fn with_text_attention(cfg: &TransformerConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let text_attn = TextCrossAttention {
            attn: MultiheadAttention::new(cfg.d_model, cfg.nhead, cfg.dropout, vb.pp("ca_text"))?,
            norm: LayerNorm::new(cfg.d_model, 1e-5, vb.pp("catext_norm"))?,
        };
        Ok(Self { text_attn: Some(text_attn), ..Self::new(cfg, vb)? })
    }

    /// Whether the layer attends to the text.
    pub fn has_text_attention(&self) -> bool {
        self.text_attn.is_some()
    }

    /// `x (b, q, d)` with query positions `qpos (b, q, d)` over `mem` -> `(b, q, d)`;
    /// `self_bias (q, q)`, if any, added to the self-attention's scores (which queries may see
    /// which, see [`MultiheadAttention::forward_biased`]). A layer with text cross-attention
    /// needs `mem.text`; one without ignores it.
    pub fn forward(
        &self,
        x: &Tensor,
        qpos: Option<&Tensor>,
        mem: &DecoderMemory<'_>,
        self_bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mem_k = with_pos(mem.memory, mem.pos)?;
        let drop = |t: &Tensor| dropout(t, self.dropout, train);
        let text = match (&self.text_attn, mem.text) {
            (None, _) => None,
            (Some(t), Some(text)) => Some((t, text)),
            (Some(_), None) => {
                candle_core::bail!("a decoder layer with text cross-attention was given no text")
            }
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
            let a = self.multihead_attn.forward(
                &with_pos(h, qpos)?,
                &mem_k,
                mem.memory,
                mem.mask,
                train,
            )?;
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
        let d = config.d_model;
        let encoder = (0..config.num_encoder_layers)
            .map(|i| EncoderLayer::new(&config, vb.pp(format!("encoder.layers.{i}"))))
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
