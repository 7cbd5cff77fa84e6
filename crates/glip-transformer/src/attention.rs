//! Multi-head attention with PyTorch's packed parameters (`in_proj_weight (3d, d)`,
//! `in_proj_bias (3d,)`, `out_proj.{weight,bias}`) and key-padding masks.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use glip_kernels::nn::{dropout, mask_to_bias, softmax_last, Linear};

/// `torch.nn.MultiheadAttention` with `batch_first` semantics on our side: inputs are
/// `(b, len, d)`.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    /// The q, k and v projections: `Linear`s over row blocks of the packed `in_proj_weight`
    /// and `in_proj_bias`, views made once (the gradients reach the packed parameters through
    /// them; a view's identity is what a bf16 scope caches its weight's cast by).
    in_proj: [Linear; 3],
    out_proj: Linear,
    heads: usize,
    d: usize,
    dropout: f32,
}

impl MultiheadAttention {
    /// Loads `in_proj_weight`, `in_proj_bias`, `out_proj.*` of width `d` with `heads` heads.
    /// Initialisation follows PyTorch (Xavier-uniform packed weight, zero biases).
    pub fn new(d: usize, heads: usize, dropout: f32, vb: VarBuilder<'_>) -> Result<Self> {
        if heads == 0 || !d.is_multiple_of(heads) {
            candle_core::bail!("attention: width {d} is not divisible by {heads} heads");
        }
        let bound = (6.0 / (d as f64 + 3.0 * d as f64)).sqrt();
        let in_proj_weight = vb.get_with_hints(
            (3 * d, d),
            "in_proj_weight",
            Init::Uniform { lo: -bound, up: bound },
        )?;
        let in_proj_bias = vb.get_with_hints(3 * d, "in_proj_bias", Init::Const(0.0))?;
        let ob = 1.0 / (d as f64).sqrt();
        let out_proj = Linear::from_tensors(
            vb.get_with_hints((d, d), "out_proj.weight", Init::Uniform { lo: -ob, up: ob })?,
            Some(vb.get_with_hints(d, "out_proj.bias", Init::Const(0.0))?),
        );
        let block = |i: usize| -> Result<Linear> {
            Ok(Linear::from_tensors(
                in_proj_weight.narrow(0, i * d, d)?,
                Some(in_proj_bias.narrow(0, i * d, d)?),
            ))
        };
        let in_proj = [block(0)?, block(1)?, block(2)?];
        Ok(Self { in_proj, out_proj, heads, d, dropout })
    }

    /// `x (b, len, d)` through the q (`i = 0`), k (1) or v (2) projection.
    fn project(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.in_proj[i].forward(x)
    }

    fn split_heads(&self, x: Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.d / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// `query (b, lq, d)`, `key`/`value (b, lk, d)`, `key_mask (b, lk)` u8 (1 = attend) ->
    /// `(b, lq, d)`.
    pub fn forward(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        key_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, lq, _) = query.dims3()?;
        let dh = self.d / self.heads;
        let q = (self.split_heads(self.project(query, 0)?)? * (1.0 / (dh as f64).sqrt()))?;
        let k = self.split_heads(self.project(key, 1)?)?;
        let v = self.split_heads(self.project(value, 2)?)?;
        let mut scores = q.matmul(&k.t()?)?; // (b, h, lq, lk)
        if let Some(m) = key_mask {
            scores = scores.broadcast_add(&mask_to_bias(m, scores.dtype())?)?;
        }
        let p = dropout(&softmax_last(&scores)?, self.dropout, train)?;
        let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, self.d))?;
        self.out_proj.forward(&ctx)
    }
}
