//! Query generators: `seed` (the tutorial's text-conditioned queries), `learned` (DETR,
//! text-agnostic) and `text-attend` (learned queries that cross-attend to the text tokens).
//! Each implements [`glip_core::QueryGenerator`]; a new one plugs in by implementing it too.

use crate::attention::MultiheadAttention;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use glip_core::{Queries, QueryGenerator, QueryInputs};
use glip_kernels::nn::{l2_normalize, LayerNorm, Linear};

fn query_embed(q: usize, d: usize, vb: &VarBuilder<'_>) -> Result<Tensor> {
    // torch.randn in the reference.
    vb.get_with_hints((q, d), "query_embed", Init::Randn { mean: 0.0, stdev: 1.0 })
}

fn expand(e: &Tensor, b: usize) -> Result<Tensor> {
    let (q, d) = e.dims2()?;
    e.unsqueeze(0)?.broadcast_as((b, q, d))?.contiguous()
}

/// The seed tutorial's generator (`SeedQueryGenerator`):
/// `queries[b, q] = normalize(query_proj(pooled_text[b])) + query_embed[q]`.
#[derive(Debug, Clone)]
pub struct SeedQueries {
    query_proj: Linear,
    query_embed: Tensor,
}

impl SeedQueries {
    /// Loads `query_proj.*` (`text_dim -> d`) and `query_embed (q, d)`.
    pub fn new(text_dim: usize, d: usize, q: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            query_proj: Linear::new(text_dim, d, vb.pp("query_proj"))?,
            query_embed: query_embed(q, d, &vb)?,
        })
    }
}

impl QueryGenerator for SeedQueries {
    fn forward(&self, inputs: &QueryInputs<'_>, _train: bool) -> Result<Queries> {
        let Some(pooled) = &inputs.text.pooled else {
            candle_core::bail!(
                "seed query generator needs a pooled text vector; the text encoder returned none"
            )
        };
        let p = l2_normalize(&self.query_proj.forward(pooled)?)?; // (b, d)
        let content = p.unsqueeze(1)?.broadcast_add(&self.query_embed.unsqueeze(0)?)?;
        Ok(Queries { content, pos: None, reference_boxes: None })
    }

    fn num_queries(&self) -> usize {
        self.query_embed.dims()[0]
    }
}

/// DETR's learned queries: zero content and a learned positional part `query_embed (q, d)`
/// added in every attention; the text does not enter.
#[derive(Debug, Clone)]
pub struct LearnedQueries {
    query_embed: Tensor,
}

impl LearnedQueries {
    /// Loads `query_embed (q, d)`.
    pub fn new(d: usize, q: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self { query_embed: query_embed(q, d, &vb)? })
    }
}

impl QueryGenerator for LearnedQueries {
    fn forward(&self, inputs: &QueryInputs<'_>, _train: bool) -> Result<Queries> {
        let b = inputs.memory.dims()[0];
        let pos = expand(&self.query_embed, b)?;
        Ok(Queries { content: pos.zeros_like()?, pos: Some(pos), reference_boxes: None })
    }

    fn num_queries(&self) -> usize {
        self.query_embed.dims()[0]
    }
}

/// Learned queries that read the caption: `content = norm(query_embed + attn(query_embed,
/// text_proj(tokens)))` with the text padding masked.
#[derive(Debug, Clone)]
pub struct TextAttendQueries {
    query_embed: Tensor,
    text_proj: Linear,
    cross_attn: MultiheadAttention,
    norm: LayerNorm,
}

impl TextAttendQueries {
    /// Loads `query_embed (q, d)`, `text_proj` (`text_dim -> d`), `cross_attn.*`, `norm.*`.
    pub fn new(
        text_dim: usize,
        d: usize,
        q: usize,
        heads: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(Self {
            query_embed: query_embed(q, d, &vb)?,
            text_proj: Linear::new(text_dim, d, vb.pp("text_proj"))?,
            cross_attn: MultiheadAttention::new(d, heads, 0.0, vb.pp("cross_attn"))?,
            norm: LayerNorm::new(d, 1e-5, vb.pp("norm"))?,
        })
    }
}

impl QueryGenerator for TextAttendQueries {
    fn forward(&self, inputs: &QueryInputs<'_>, train: bool) -> Result<Queries> {
        let b = inputs.text.tokens.dims()[0];
        let q = expand(&self.query_embed, b)?;
        let t = self.text_proj.forward(&inputs.text.tokens)?;
        let mask = inputs.text.mask.to_dtype(DType::U8)?;
        let a = self.cross_attn.forward(&q, &t, &t, Some(&mask), train)?;
        let content = self.norm.forward_residual(&q, &a)?;
        Ok(Queries { content, pos: None, reference_boxes: None })
    }

    fn num_queries(&self) -> usize {
        self.query_embed.dims()[0]
    }
}
