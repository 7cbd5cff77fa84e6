//! Image-text fusion: `none` (the identity, the seed's choice) and `bi-attention` (GLIP's
//! X-MHA: image tokens attend to text tokens and text tokens to image tokens, with gated
//! residuals). Names follow GLIP's `BiAttentionBlock`.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use glip_core::Fusion;
use glip_kernels::nn::{dropout, mask_to_bias, softmax_last, LayerNorm, Linear};

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
/// identity.
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
        })
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
        let image = (image + out_v.broadcast_mul(&self.gamma_v)?)?;
        let text = (text + out_l.broadcast_mul(&self.gamma_l)?)?;
        Ok((image, text))
    }
}
