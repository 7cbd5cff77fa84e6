//! The seed tutorial's model (`SeedGLIP` in `reference/glip_ref.py`) built from components.

use crate::GlipModel;
use candle_core::Result;
use candle_nn::VarBuilder;
use glip_backbone::{layers::Conv, ResNet, ResNetConfig, ResNetDepth};
use glip_detectors::DecoderDetector;
use glip_heads::{FixedClassHead, LinearBoxHead, TokenAlignmentHead};
use glip_text::{Bert, BertConfig};
use glip_transformer::{DetrTransformer, NoFusion, SeedQueries, TransformerConfig};

/// Which classification head the seed model carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedHead {
    /// `class_pred`: `num_classes + 1` logits.
    Class(usize),
    /// `token_head`: GLIP's token alignment.
    Token,
}

/// The seed design's sizes.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// ResNet depth.
    pub backbone: ResNetDepth,
    /// The text encoder's config.
    pub bert: BertConfig,
    /// Transformer sizes.
    pub transformer: TransformerConfig,
    /// Query count.
    pub num_queries: usize,
    /// Head.
    pub head: SeedHead,
}

/// Builds `SeedGLIP` with the reference's names (`backbone.*`, `text.*`, `input_proj.*`,
/// `query_generator.*`, `transformer.*`, `bbox_pred.*`, `class_pred.*` / `token_head.*`).
/// The backbone is frozen up to `freeze_at` (all of it at 5) with frozen batch norm.
pub fn build_seed(spec: &SeedSpec, freeze_at: usize, vb: VarBuilder<'_>) -> Result<GlipModel> {
    let mut rc = ResNetConfig::new(spec.backbone);
    rc.freeze_at = freeze_at;
    let backbone = ResNet::new(rc, vb.pp("backbone"))?;
    let c5 = spec.backbone.channels()[3];
    let d = spec.transformer.d_model;
    let text_dim = spec.bert.hidden_size;
    let text = Bert::new(spec.bert.clone(), vb.pp("text"), true)?;
    let class_head: Box<dyn glip_core::ClassHead> = match spec.head {
        SeedHead::Class(n) => Box::new(FixedClassHead::new(d, n, vb.pp("class_pred"))?),
        SeedHead::Token => Box::new(TokenAlignmentHead::new(text_dim, d, vb.pp("token_head"))?),
    };
    Ok(GlipModel {
        backbone: Box::new(backbone),
        feature_levels: vec![3],
        input_proj: vec![Conv::new(vb.pp("input_proj"), c5, d, 1, 1, 0, 1, true, false)?],
        level_embed: None,
        fpn: false,
        text: Box::new(text),
        transformer: Box::new(DetrTransformer::new(
            spec.transformer.clone(),
            vb.pp("transformer"),
        )?),
        fusion: Box::new(NoFusion),
        detector: Box::new(DecoderDetector {
            query_generator: Box::new(SeedQueries::new(
                text_dim,
                d,
                spec.num_queries,
                vb.pp("query_generator"),
            )?),
            box_head: Box::new(LinearBoxHead::new(d, vb.pp("bbox_pred"))?),
            class_head,
            aux_outputs: false,
        }),
        position_encoding: false,
        d_model: d,
        prompt: None,
        text_attention: crate::config::TextAttention::Sentence,
    })
}
