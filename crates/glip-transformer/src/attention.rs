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
    /// The q and k projections together (the first `2d` rows), k and v (the last `2d`), and
    /// all three: one product where the inputs are one tensor, in inference on CUDA (the fused
    /// core reads the column blocks of their output).
    in_proj_qk: Linear,
    in_proj_kv: Linear,
    in_proj_qkv: Linear,
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
        let rows = |from: usize, n: usize| -> Result<Linear> {
            Ok(Linear::from_tensors(
                in_proj_weight.narrow(0, from, n)?,
                Some(in_proj_bias.narrow(0, from, n)?),
            ))
        };
        let (in_proj_qk, in_proj_kv) = (rows(0, 2 * d)?, rows(d, 2 * d)?);
        let in_proj_qkv = Linear::from_tensors(in_proj_weight, Some(in_proj_bias));
        Ok(Self { in_proj, in_proj_qk, in_proj_kv, in_proj_qkv, out_proj, heads, d, dropout })
    }

    /// `x (b, len, d)` through the q (`i = 0`), k (1) or v (2) projection.
    fn project(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        self.in_proj[i].forward(x)
    }

    /// Whether projecting `x` through a packed product pays: where the fused core will read it
    /// (inference on CUDA, no gradient through `x` or the weights).
    fn packs(&self, x: &Tensor) -> bool {
        glip_kernels::attention::may_fuse(x)
            && self.d / self.heads <= glip_kernels::attention::MAX_HEAD_WIDTH
            && !self.in_proj_qkv.weight().track_op()
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
        self.forward_biased(query, key, value, key_mask, None, train)
    }

    /// [`MultiheadAttention::forward`] with `attn_bias (lq, lk)` added to every image's and
    /// head's scores before the softmax, or `(b, lq, lk)` to each image's heads: `f32::MIN`
    /// where a query must not see a key (DINO's attention mask between denoising groups,
    /// Grounding DINO's between sub-sentences), 0 where it may. A row's masked keys then get
    /// exactly zero weight, so what they hold cannot change its output.
    pub fn forward_biased(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        key_mask: Option<&Tensor>,
        attn_bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, lq, _) = query.dims3()?;
        let dh = self.d / self.heads;
        let scale = 1.0 / (dh as f64).sqrt();
        let inference = !train || self.dropout == 0.0;
        // Inference on CUDA where inputs are one tensor: one product for them, whose column
        // blocks the fused core reads in place.
        let d = self.d;
        let packs = inference && self.packs(query) && self.packs(key);
        let (same_qk, same_kv) = (query.id() == key.id(), key.id() == value.id());
        let (q, k, v) = match (packs, same_qk, same_kv) {
            (true, true, true) => {
                let qkv = self.in_proj_qkv.forward(query)?;
                (qkv.narrow(2, 0, d)?, qkv.narrow(2, d, d)?, qkv.narrow(2, 2 * d, d)?)
            }
            (true, true, false) => {
                let qk = self.in_proj_qk.forward(query)?;
                (qk.narrow(2, 0, d)?, qk.narrow(2, d, d)?, self.project(value, 2)?)
            }
            (true, false, true) => {
                let kv = self.in_proj_kv.forward(key)?;
                (self.project(query, 0)?, kv.narrow(2, 0, d)?, kv.narrow(2, d, d)?)
            }
            _ => (self.project(query, 0)?, self.project(key, 1)?, self.project(value, 2)?),
        };
        // Inference on CUDA: the core in one launch (`None` elsewhere, and in training).
        if inference && attn_bias.is_none() {
            let at = glip_kernels::attention::ScaleAt::Query;
            if let Some(ctx) =
                glip_kernels::attention::fused(&q, &k, &v, key_mask, self.heads, scale, at)?
            {
                return self.out_proj.forward(&ctx);
            }
        }
        let q = (self.split_heads(q)? * scale)?;
        let (k, v) = (self.split_heads(k)?, self.split_heads(v)?);
        let mut scores = q.matmul(&k.t()?)?; // (b, h, lq, lk)
        if let Some(m) = key_mask {
            scores = scores.broadcast_add(&mask_to_bias(m, scores.dtype())?)?;
        }
        if let Some(bias) = attn_bias {
            let (_, _, lq, lk) = scores.dims4()?;
            let bias = match bias.dims() {
                &[q, k] if (q, k) == (lq, lk) => bias.clone(),
                &[bb, q, k] if (bb, q, k) == (b, lq, lk) => bias.unsqueeze(1)?,
                d => candle_core::bail!("attention bias {d:?} for ({b}, {lq}, {lk}) scores"),
            };
            scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?;
        }
        let p = dropout(&softmax_last(&scores)?, self.dropout, train)?;
        let ctx = p.matmul(&v)?.transpose(1, 2)?.reshape((b, lq, self.d))?;
        self.out_proj.forward(&ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use glip_testing::{attention_reference, AttentionShape};

    /// The composed attention (the CPU's, and training's on every device) computes the core
    /// that glip-testing's `attention_reference` states (heads in column blocks, the scale on
    /// the query, the key mask's bias) within its bound for one tile of keys: the reference
    /// the fused CUDA kernel is tested against on the GPU (glip-train's `tests/cuda.rs`) is
    /// this module's. The output projection is the identity with zero bias, so the output is
    /// the core.
    #[test]
    fn the_composed_core_is_the_reference_core() -> Result<()> {
        let (b, lq, lk, d, heads) = (2usize, 7usize, 11usize, 12usize, 3usize);
        let dev = Device::Cpu;
        let mut rng = glip_core::rng::Rng::new(9);
        let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal()).collect() };
        let eye = Tensor::eye(d, DType::F32, &dev)?;
        let packed = Tensor::cat(&[&eye, &eye, &eye], 0)?;
        let weights: std::collections::HashMap<String, Tensor> = [
            ("in_proj_weight", packed),
            ("in_proj_bias", Tensor::zeros(3 * d, DType::F32, &dev)?),
            ("out_proj.weight", eye),
            ("out_proj.bias", Tensor::zeros(d, DType::F32, &dev)?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let mha = MultiheadAttention::new(d, heads, 0.0, vb)?;
        let (q, kv) = (normal(b * lq * d), normal(b * lk * d));
        // The first image attends to every key but the 2nd and 5th, the second to none.
        let mask: Vec<u8> = (0..b * lk).map(|e| u8::from(e < lk && e != 1 && e != 4)).collect();
        let out = mha.forward(
            &Tensor::from_vec(q.clone(), (b, lq, d), &dev)?,
            &Tensor::from_vec(kv.clone(), (b, lk, d), &dev)?,
            &Tensor::from_vec(kv.clone(), (b, lk, d), &dev)?,
            Some(&Tensor::from_vec(mask.clone(), (b, lk), &dev)?),
            false,
        )?;
        let shape = AttentionShape { b, lq, lk, heads, dh: d / heads };
        let scale = 1.0 / ((d / heads) as f32).sqrt();
        let (exact, bound) = attention_reference(&q, &kv, &kv, Some(&mask), shape, scale, lk);
        // The identity projections add their own f32 rounding: none (x * 1 + 0 summed with
        // zeros is x).
        for (i, (got, (want, bound))) in
            out.flatten_all()?.to_vec1::<f32>()?.iter().zip(exact.iter().zip(&bound)).enumerate()
        {
            let err = (f64::from(*got) - want).abs();
            assert!(err <= *bound, "element {i}: {got} against {want}, bound {bound:e}");
        }
        Ok(())
    }
}
