//! Image-text fusion: `none` (the identity, the seed's choice), `bi-attention` (GLIP's
//! X-MHA: image tokens attend to text tokens and text tokens to image tokens, with gated
//! residuals; names follow GLIP's `BiAttentionBlock`) and Grounding DINO's feature enhancer
//! (bi-attention, the text's self-attention and the image's self-attention, layer after layer).

use crate::deformable::SamplingLevels;
use crate::position::text_sine_positions;
use crate::transformer::{
    Activation, EncoderAttentionKind, EncoderLayer, EncoderLevels, TransformerConfig,
};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use glip_core::{Fusion, TokenLayout};
use glip_kernels::nn::{dropout, mask_to_bias, softmax_last, LayerNorm, Linear};
use serde::{Deserialize, Serialize};

/// The identity fusion.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFusion;

impl Fusion for NoFusion {
    fn forward(
        &self,
        image: &Tensor,
        _: Option<&Tensor>,
        text: &Tensor,
        _: &Tensor,
        _: bool,
    ) -> Result<(Tensor, Tensor)> {
        Ok((image.clone(), text.clone()))
    }
}

/// GLIP's bidirectional attention block:
/// ```text
/// v, l   = layer_norm_v(image), layer_norm_l(text)
/// A      = (v_proj(v) heads) (l_proj(l) heads)^T / sqrt(dh)            (b, h, s, t)
/// image' = image + gamma_v * out_v_proj(softmax_t(A + text mask) values_l_proj(l))
/// text'  = text  + gamma_l * out_l_proj(softmax_s(A^T + image mask) values_v_proj(v))
/// ```
/// `gamma_*` start at 1e-4 (layer scale, as GLIP's `init_values`), so the block starts near the
/// identity. That is [`FusionResidual::Input`], glip-rs's default; GLIP's and Grounding DINO's
/// block adds the residual to the layer-normed features instead ([`FusionResidual::Normed`]:
/// `image' = v + gamma_v * ...`, `text' = l + gamma_l * ...`), so it starts as the layer norms.
/// Padded image tokens are masked for the text (Grounding DINO's `attention_mask_v`).
#[derive(Debug, Clone)]
pub struct BiAttentionFusion {
    layer_norm_v: LayerNorm,
    layer_norm_l: LayerNorm,
    v_proj: Linear,
    l_proj: Linear,
    values_v_proj: Linear,
    values_l_proj: Linear,
    out_v_proj: Linear,
    out_l_proj: Linear,
    gamma_v: Tensor,
    gamma_l: Tensor,
    heads: usize,
    embed: usize,
    dropout: f32,
    residual: FusionResidual,
}

/// What a [`BiAttentionFusion`]'s residual adds its attention to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FusionResidual {
    /// The block's input: the block starts as the identity (glip-rs's default).
    #[default]
    Input,
    /// The layer-normed features, as GLIP's and Grounding DINO's `BiAttentionBlock`.
    Normed,
}

impl BiAttentionFusion {
    /// Image width `d_v`, text width `d_l`, attention width `embed` with `heads` heads.
    pub fn new(
        d_v: usize,
        d_l: usize,
        embed: usize,
        heads: usize,
        dropout: f32,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if heads == 0 || !embed.is_multiple_of(heads) {
            candle_core::bail!("bi-attention: width {embed} is not divisible by {heads} heads");
        }
        let a = vb.pp("attn");
        Ok(Self {
            layer_norm_v: LayerNorm::new(d_v, 1e-5, vb.pp("layer_norm_v"))?,
            layer_norm_l: LayerNorm::new(d_l, 1e-5, vb.pp("layer_norm_l"))?,
            v_proj: Linear::new(d_v, embed, a.pp("v_proj"))?,
            l_proj: Linear::new(d_l, embed, a.pp("l_proj"))?,
            values_v_proj: Linear::new(d_v, embed, a.pp("values_v_proj"))?,
            values_l_proj: Linear::new(d_l, embed, a.pp("values_l_proj"))?,
            out_v_proj: Linear::new(embed, d_v, a.pp("out_v_proj"))?,
            out_l_proj: Linear::new(embed, d_l, a.pp("out_l_proj"))?,
            gamma_v: vb.get_with_hints(d_v, "gamma_v", Init::Const(1e-4))?,
            gamma_l: vb.get_with_hints(d_l, "gamma_l", Init::Const(1e-4))?,
            heads,
            embed,
            dropout,
            residual: FusionResidual::Input,
        })
    }

    /// The block with its residual added to `residual`.
    pub fn with_residual(mut self, residual: FusionResidual) -> Self {
        self.residual = residual;
        self
    }

    fn heads_of(&self, x: Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.embed / self.heads))?.transpose(1, 2)?.contiguous()
    }

    fn merge(&self, x: Tensor) -> Result<Tensor> {
        let (b, _, n, _) = x.dims4()?;
        x.transpose(1, 2)?.reshape((b, n, self.embed))
    }
}

impl Fusion for BiAttentionFusion {
    fn forward(
        &self,
        image: &Tensor,
        image_mask: Option<&Tensor>,
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let v = self.layer_norm_v.forward(image)?;
        let l = self.layer_norm_l.forward(text)?;
        let dh = self.embed / self.heads;
        let q = (self.heads_of(self.v_proj.forward(&v)?)? * (1.0 / (dh as f64).sqrt()))?;
        let k = self.heads_of(self.l_proj.forward(&l)?)?;
        let vv = self.heads_of(self.values_v_proj.forward(&v)?)?;
        let vl = self.heads_of(self.values_l_proj.forward(&l)?)?;
        let scores = q.matmul(&k.t()?)?; // (b, h, s, t)
        let p_v = softmax_last(&scores.broadcast_add(&mask_to_bias(text_mask, scores.dtype())?)?)?;
        let scores_t = scores.transpose(2, 3)?.contiguous()?; // (b, h, t, s)
        let scores_t = match image_mask {
            Some(m) => scores_t.broadcast_add(&mask_to_bias(m, scores.dtype())?)?,
            None => scores_t,
        };
        let p_l = softmax_last(&scores_t)?;
        let out_v = self
            .out_v_proj
            .forward(&self.merge(dropout(&p_v, self.dropout, train)?.matmul(&vl)?)?)?;
        let out_l = self
            .out_l_proj
            .forward(&self.merge(dropout(&p_l, self.dropout, train)?.matmul(&vv)?)?)?;
        let (image, text) = match self.residual {
            FusionResidual::Input => (image, text),
            FusionResidual::Normed => (&v, &l),
        };
        let image = (image + out_v.broadcast_mul(&self.gamma_v)?)?;
        let text = (text + out_l.broadcast_mul(&self.gamma_l)?)?;
        Ok((image, text))
    }
}

/// A [`FeatureEnhancer`]'s layers, bi-attention and text layers; its image layers are shaped by
/// a [`TransformerConfig`] (the model's transformer: width, heads, feed-forward, activation,
/// dropout, norm placement, global or deformable attention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureEnhancerConfig {
    /// Enhancer layers (Grounding DINO: 6).
    pub layers: usize,
    /// Heads of the bi-attention blocks.
    pub heads: usize,
    /// Width of the bi-attention (default the image tokens').
    pub embed: Option<usize>,
    /// Heads of the text's self-attention.
    pub text_heads: usize,
    /// Feed-forward width of the text layers (Grounding DINO: half the image layers').
    pub text_feedforward: usize,
}

/// Grounding DINO's feature enhancer (its transformer encoder with `fusion_layers` and
/// `text_layers`): each layer fuses image and text tokens (a [`BiAttentionFusion`] with the
/// residual on the normed features, as Grounding DINO's), runs the text's self-attention layer
/// (post-norm, relu feed-forward, [`text_sine_positions`] added to its queries and keys), then
/// the image tokens' encoder layer (an [`EncoderLayer`]: deformable in Grounding DINO). Given
/// the text's sub-sentences ([`TokenLayout::text`]), the text layers attend within each and
/// position the tokens in it, as Grounding DINO's with its sub-sentence masks.
/// Parameters: `fusion_layers.N`, `text_layers.N`, `layers.N`, Grounding DINO's names.
///
/// Where the model's transformer also has encoder layers, they run first, on the image alone;
/// Grounding DINO's own encoder is this enhancer, `num_encoder_layers = 0` gives that.
#[derive(Debug, Clone)]
pub struct FeatureEnhancer {
    fusion_layers: Vec<BiAttentionFusion>,
    text_layers: Vec<EncoderLayer>,
    layers: Vec<EncoderLayer>,
    deformable: bool,
}

impl FeatureEnhancer {
    /// Image tokens shaped by `image` (from `levels` feature levels, what deformable layers
    /// sample), text tokens of width `d_text`.
    pub fn new(
        image: &TransformerConfig,
        levels: usize,
        d_text: usize,
        config: &FeatureEnhancerConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let c = config;
        if c.text_heads == 0 || !d_text.is_multiple_of(c.text_heads) {
            candle_core::bail!(
                "feature enhancer: the text width {d_text} is not divisible by text_heads = {}",
                c.text_heads
            );
        }
        if !d_text.is_multiple_of(2) {
            candle_core::bail!(
                "feature enhancer: the text width {d_text} is not even (its sine positions)"
            );
        }
        let text = TransformerConfig {
            d_model: d_text,
            nhead: c.text_heads,
            dim_feedforward: c.text_feedforward,
            activation: Activation::Relu,
            pre_norm: false,
            encoder_attention: EncoderAttentionKind::Global,
            ..image.clone()
        };
        let d = image.d_model;
        let embed = c.embed.unwrap_or(d);
        let mut enhancer = Self {
            fusion_layers: Vec::with_capacity(c.layers),
            text_layers: Vec::with_capacity(c.layers),
            layers: Vec::with_capacity(c.layers),
            deformable: image.encoder_attention == EncoderAttentionKind::Deformable,
        };
        for k in 0..c.layers {
            let fusion = vb.pp(format!("fusion_layers.{k}"));
            enhancer.fusion_layers.push(
                BiAttentionFusion::new(d, d_text, embed, c.heads, image.dropout, fusion)?
                    .with_residual(FusionResidual::Normed),
            );
            enhancer.text_layers.push(EncoderLayer::new(&text, vb.pp(format!("text_layers.{k}")))?);
            enhancer.layers.push(EncoderLayer::with_levels(
                image,
                levels,
                vb.pp(format!("layers.{k}")),
            )?);
        }
        Ok(enhancer)
    }

    fn run(
        &self,
        image: &Tensor,
        image_mask: Option<&Tensor>,
        layout: Option<TokenLayout<'_>>,
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (mut x, mut l) = (image.clone(), text.clone());
        if self.layers.is_empty() {
            return Ok((x, l));
        }
        let (b, t, d_text) = text.dims3()?;
        let table =
            text_sine_positions(t, d_text, 10000.0, text.device())?.to_dtype(text.dtype())?;
        // Sub-sentences: positions counted in each, attention kept within each.
        let segments = layout.and_then(|at| at.text);
        let (text_pos, text_bias) = match segments {
            Some(s) => {
                if s.positions.dims() != [b, t] {
                    candle_core::bail!(
                        "feature enhancer: sub-sentences of {:?} tokens for text of ({b}, {t})",
                        s.positions.dims()
                    );
                }
                let pos =
                    table.index_select(&s.positions.flatten_all()?, 0)?.reshape((b, t, d_text))?;
                (pos, Some(s.attention_bias(text.dtype())?))
            }
            None => (table.unsqueeze(0)?, None),
        };
        let levels = match (self.deformable, layout) {
            (true, Some(at)) => {
                Some(SamplingLevels::cached(at.levels, at.image_sizes, image.device())?)
            }
            (true, None) => candle_core::bail!(
                "a feature enhancer with deformable image layers needs the tokens' levels \
                 (Fusion::forward_at)"
            ),
            (false, _) => None,
        };
        let at = levels.as_ref().map(|s| EncoderLevels { levels: s, centres: s.token_centres() });
        let pos = layout.and_then(|at| at.pos);
        for ((fusion, text_layer), layer) in
            self.fusion_layers.iter().zip(&self.text_layers).zip(&self.layers)
        {
            (x, l) = fusion.forward(&x, image_mask, &l, text_mask, train)?;
            l = match &text_bias {
                Some(bias) => text_layer.forward_biased(&l, bias, Some(&text_pos), train)?,
                None => text_layer.forward(&l, Some(text_mask), Some(&text_pos), train)?,
            };
            x = layer.forward_at(&x, image_mask, pos, at, train)?;
        }
        Ok((x, l))
    }
}

impl Fusion for FeatureEnhancer {
    fn forward(
        &self,
        image: &Tensor,
        image_mask: Option<&Tensor>,
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.run(image, image_mask, None, text, text_mask, train)
    }

    fn forward_at(
        &self,
        image: &Tensor,
        image_mask: Option<&Tensor>,
        layout: TokenLayout<'_>,
        text: &Tensor,
        text_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.run(image, image_mask, Some(layout), text, text_mask, train)
    }
}
