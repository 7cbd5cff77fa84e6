//! Model assembly from a TOML config: every component chosen by name with its parameters,
//! weights to load per component, what is frozen. Unknown keys are errors.
//!
//! Built-in components are matched here (the only place that does); a researcher's own
//! component registers a factory under a new `type` name with [`ModelBuilder`], without editing
//! any enum of this workspace.

use crate::detectors::{DecoderDetector, QuerySelection, QuerySelectionConfig};
use crate::model::GlipModel;
use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use glip_backbone::{layers::Conv, MobileNetV2, ResNet, ResNetConfig, ResNetDepth};
use glip_core::{Backbone, BoxHead, ClassHead, Detector, Fusion, QueryGenerator, TextEncoder};
use glip_heads::{
    DenseHead, DenseHeadConfig, FixedClassHead, LinearBoxHead, MlpBoxHead, TokenAlignmentHead,
};
use glip_text::{Bert, BertConfig};
use glip_transformer::{
    BiAttentionFusion, DetrTransformer, LearnedQueries, NoFusion, SeedQueries, TextAttendQueries,
    TransformerConfig,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

/// The backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BackboneConfig {
    /// torchvision ResNet.
    Resnet {
        /// 18, 34, 50 or 101.
        depth: u32,
        /// Stages frozen (0 nothing ... 5 all). Default 2.
        #[serde(default = "two")]
        freeze_at: usize,
        /// Trainable batch norm. Default false (frozen).
        #[serde(default)]
        trainable_bn: bool,
        /// Stages built and run (1 to 4; 3 stops at C4). Default 4.
        #[serde(default = "four")]
        stages: usize,
    },
    /// torchvision MobileNetV2 (strides 8, 16, 32).
    MobilenetV2 {
        /// Trainable batch norm. Default false.
        #[serde(default)]
        trainable_bn: bool,
        /// Freeze the whole backbone. Default false.
        #[serde(default)]
        frozen: bool,
    },
}

fn two() -> usize {
    2
}

fn four() -> usize {
    4
}

/// The text encoder: a BERT, from a Hugging Face folder or a config given inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// `tokenizer.json` (may be left out with an inline `vocab_size`, for timing runs on
    /// random ids).
    #[serde(default)]
    pub tokenizer: PathBuf,
    /// A Hugging Face folder (`config.json`, weights): architecture and weights from there.
    #[serde(default)]
    pub folder: Option<PathBuf>,
    /// Inline architecture (hidden, layers, heads) when there is no folder; the vocabulary size
    /// comes from the tokenizer.
    #[serde(default)]
    pub hidden: Option<usize>,
    /// Layers of the inline BERT.
    #[serde(default)]
    pub layers: Option<usize>,
    /// Heads of the inline BERT.
    #[serde(default)]
    pub heads: Option<usize>,
    /// Feed-forward width of the inline BERT. Default `2 * hidden`.
    #[serde(default)]
    pub intermediate: Option<usize>,
    /// Vocabulary of the inline BERT. Default: the tokenizer's.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Dropout of the inline BERT (training only). Default 0.1.
    #[serde(default = "d_text_dropout")]
    pub dropout: f32,
    /// Freeze the text encoder. Default false.
    #[serde(default)]
    pub frozen: bool,
}

fn d_text_dropout() -> f32 {
    0.1
}

/// A swappable slot (query generator, fusion): a `type` name and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    /// Built-in or registered name.
    #[serde(rename = "type")]
    pub kind: String,
    /// The component's parameters.
    #[serde(flatten)]
    pub params: toml::Table,
}

impl Component {
    /// A component with no parameters.
    pub fn named(kind: &str) -> Self {
        Self { kind: kind.into(), params: toml::Table::new() }
    }

    fn parse<T: for<'de> Deserialize<'de>>(&self, slot: &str) -> Result<T> {
        toml::Value::Table(self.params.clone())
            .try_into()
            .map_err(|e| candle_core::Error::Msg(format!("{slot} {:?}: {e}", self.kind)))
    }
}

/// The classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HeadConfig {
    /// Fixed classes (`num_classes + 1` logits).
    Class {
        /// Number of classes.
        num_classes: usize,
    },
    /// GLIP's token alignment (open vocabulary).
    Token,
}

/// The box head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoxHeadConfig {
    /// One linear layer (the seed).
    Linear,
    /// DETR's 3-layer MLP.
    Mlp,
}

/// The whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Backbone.
    pub backbone: BackboneConfig,
    /// Which backbone level feeds the transformer; default the last (C5).
    #[serde(default)]
    pub feature_level: Option<usize>,
    /// Several backbone levels instead (finest first, e.g. `[1, 2]` for C3 and C4): their
    /// tokens are concatenated, each level's positions get a learned level embedding.
    #[serde(default)]
    pub feature_levels: Option<Vec<usize>>,
    /// A top-down FPN over the projected levels (each plus the upsampled next). Default false.
    #[serde(default)]
    pub fpn: bool,
    /// What turns the fused tokens into predictions: `decoder` (the seed's: query generator,
    /// decoder, box and class heads), `dense` (GLIP's one-stage head; params `tower`,
    /// `centerness`), `query-selection` (Grounding DINO's; param `anchor_scale`), or a
    /// registered name. Default `decoder`.
    #[serde(default = "decoder_component")]
    pub detector: Component,
    /// Text encoder.
    pub text: TextConfig,
    /// Transformer sizes and options.
    pub transformer: TransformerConfig,
    /// Number of queries.
    pub num_queries: usize,
    /// Query generator: `seed`, `learned`, `text-attend` (params: `heads`), or a registered name.
    #[serde(default = "seed_component")]
    pub query_generator: Component,
    /// Fusion: `none`, `bi-attention` (params: `heads`, `embed`), or a registered name.
    #[serde(default = "none_component")]
    pub fusion: Component,
    /// Box head. Default linear.
    #[serde(default = "linear")]
    pub box_head: BoxHeadConfig,
    /// Classification head.
    pub head: HeadConfig,
    /// DETR's sine positional encoding. Default false (the seed has none).
    #[serde(default)]
    pub position_encoding: bool,
    /// Predictions of every decoder layer, for auxiliary losses. Default false.
    #[serde(default)]
    pub aux_loss: bool,
    /// Checkpoints to initialise from: model prefix (`backbone`, `text`, or empty for the whole
    /// model) -> file (`.safetensors` or `.pth`).
    #[serde(default)]
    pub weights: HashMap<String, PathBuf>,
}

fn decoder_component() -> Component {
    Component::named("decoder")
}
fn seed_component() -> Component {
    Component::named("seed")
}
fn none_component() -> Component {
    Component::named("none")
}
fn linear() -> BoxHeadConfig {
    BoxHeadConfig::Linear
}

/// What a component factory sees.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The model config.
    pub config: &'a ModelConfig,
    /// Width of the text features.
    pub text_dim: usize,
    /// Transformer width.
    pub d_model: usize,
}

/// Makes a query generator from its parameters.
pub type QueryFactory = Box<
    dyn Fn(&BuildContext<'_>, &toml::Table, VarBuilder<'_>) -> Result<Box<dyn QueryGenerator>>
        + Send
        + Sync,
>;
/// Makes a fusion from its parameters.
pub type FusionFactory = Box<
    dyn Fn(&BuildContext<'_>, &toml::Table, VarBuilder<'_>) -> Result<Box<dyn Fusion>>
        + Send
        + Sync,
>;

/// Makes a detector from its parameters (its `vb` is the `detector` scope).
pub type DetectorFactory = Box<
    dyn Fn(&BuildContext<'_>, &toml::Table, VarBuilder<'_>) -> Result<Box<dyn Detector>>
        + Send
        + Sync,
>;

/// Builds models from configs; extra components register here.
#[derive(Default)]
pub struct ModelBuilder {
    queries: HashMap<String, QueryFactory>,
    fusions: HashMap<String, FusionFactory>,
    detectors: HashMap<String, DetectorFactory>,
}

impl std::fmt::Debug for ModelBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBuilder")
            .field("queries", &self.queries.keys().collect::<Vec<_>>())
            .field("fusions", &self.fusions.keys().collect::<Vec<_>>())
            .field("detectors", &self.detectors.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadsParam {
    #[serde(default = "eight")]
    heads: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BiParams {
    #[serde(default = "eight")]
    heads: usize,
    #[serde(default)]
    embed: Option<usize>,
    #[serde(default)]
    dropout: f32,
}

fn eight() -> usize {
    8
}

impl ModelBuilder {
    /// A builder knowing only the built-in components.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a query generator under `name` (usable as `query_generator.type = "name"`).
    pub fn register_query_generator(&mut self, name: &str, f: QueryFactory) -> &mut Self {
        self.queries.insert(name.to_string(), f);
        self
    }

    /// Registers a fusion under `name`.
    pub fn register_fusion(&mut self, name: &str, f: FusionFactory) -> &mut Self {
        self.fusions.insert(name.to_string(), f);
        self
    }

    /// Registers a detector under `name` (usable as `detector.type = "name"`).
    pub fn register_detector(&mut self, name: &str, f: DetectorFactory) -> &mut Self {
        self.detectors.insert(name.to_string(), f);
        self
    }

    /// Builds `cfg` with parameters from `vb` (a [`glip_core::weights::trainable`] builder for
    /// training, or a checkpoint for inference).
    pub fn build(
        &self,
        cfg: &ModelConfig,
        vb: VarBuilder<'_>,
        device: &Device,
    ) -> Result<GlipModel> {
        let backbone: Box<dyn Backbone> = match &cfg.backbone {
            BackboneConfig::Resnet { depth, freeze_at, trainable_bn, stages } => {
                let depth = match depth {
                    18 => ResNetDepth::Resnet18,
                    34 => ResNetDepth::Resnet34,
                    50 => ResNetDepth::Resnet50,
                    101 => ResNetDepth::Resnet101,
                    d => candle_core::bail!("backbone: no ResNet-{d} (18, 34, 50 or 101)"),
                };
                Box::new(ResNet::new(
                    ResNetConfig {
                        depth,
                        freeze_at: *freeze_at,
                        trainable_bn: *trainable_bn,
                        stages: *stages,
                    },
                    vb.pp("backbone"),
                )?)
            }
            BackboneConfig::MobilenetV2 { trainable_bn, frozen } => {
                let net = MobileNetV2::new(vb.pp("backbone"), false, *trainable_bn)?;
                if *frozen {
                    Box::new(FrozenBackbone(net))
                } else {
                    Box::new(net)
                }
            }
        };
        let channels = backbone.out_channels();
        let levels = match (&cfg.feature_levels, cfg.feature_level) {
            (Some(_), Some(_)) => {
                candle_core::bail!("give feature_level or feature_levels, not both")
            }
            (Some(v), None) => v.clone(),
            (None, l) => vec![l.unwrap_or(channels.len() - 1)],
        };
        if levels.is_empty() || levels.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!(
                "feature_levels {levels:?}: give one or more, finest first, no repeats"
            );
        }
        let mut cins = Vec::with_capacity(levels.len());
        for &level in &levels {
            let Some(&cin) = channels.get(level) else {
                candle_core::bail!(
                    "feature level {level}: the backbone has {} levels",
                    channels.len()
                )
            };
            cins.push(cin);
        }
        let text: Box<dyn TextEncoder> = {
            let t = &cfg.text;
            let bert = match &t.folder {
                Some(dir) => Bert::from_folder(dir, device)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
                None => {
                    let vocab = match t.vocab_size {
                        Some(v) => v,
                        None => glip_text::Tokenizer::from_file(&t.tokenizer)
                            .map_err(|e| candle_core::Error::Msg(format!("text.tokenizer: {e}")))?
                            .vocab_size(),
                    };
                    let (Some(h), Some(l), Some(n)) = (t.hidden, t.layers, t.heads) else {
                        candle_core::bail!("text: give `folder`, or `hidden`, `layers` and `heads`")
                    };
                    let tiny = BertConfig::tiny(vocab, h, l, n);
                    let bc = BertConfig {
                        hidden_dropout_prob: t.dropout,
                        attention_probs_dropout_prob: t.dropout,
                        intermediate_size: t.intermediate.unwrap_or(tiny.intermediate_size),
                        ..tiny
                    };
                    Bert::new(bc, vb.pp("text"), true)?
                }
            };
            if t.frozen {
                Box::new(FrozenText(bert))
            } else {
                Box::new(bert)
            }
        };
        let d = cfg.transformer.d_model;
        let ctx = BuildContext { config: cfg, text_dim: text.hidden_size(), d_model: d };
        let query_generator = || -> Result<Box<dyn QueryGenerator>> {
            let qv = vb.pp("query_generator");
            let qg = &cfg.query_generator;
            Ok(match qg.kind.as_str() {
            "seed" => {
                qg.parse::<NoParams>("query_generator")?;
                Box::new(SeedQueries::new(ctx.text_dim, d, cfg.num_queries, qv)?)
            }
            "learned" => {
                qg.parse::<NoParams>("query_generator")?;
                Box::new(LearnedQueries::new(d, cfg.num_queries, qv)?)
            }
            "text-attend" => {
                let p: HeadsParam = qg.parse("query_generator")?;
                Box::new(TextAttendQueries::new(ctx.text_dim, d, cfg.num_queries, p.heads, qv)?)
            }
            other => match self.queries.get(other) {
                Some(f) => f(&ctx, &qg.params, qv)?,
                None => candle_core::bail!("query_generator: unknown type {other:?} (seed, learned, text-attend, or a registered one)"),
            },
        })
        };
        let fv = vb.pp("fusion");
        let fc = &cfg.fusion;
        let fusion: Box<dyn Fusion> = match fc.kind.as_str() {
            "none" => {
                fc.parse::<NoParams>("fusion")?;
                Box::new(NoFusion)
            }
            "bi-attention" => {
                let p: BiParams = fc.parse("fusion")?;
                Box::new(BiAttentionFusion::new(
                    d,
                    ctx.text_dim,
                    p.embed.unwrap_or(d),
                    p.heads,
                    p.dropout,
                    fv,
                )?)
            }
            other => match self.fusions.get(other) {
                Some(f) => f(&ctx, &fc.params, fv)?,
                None => candle_core::bail!(
                    "fusion: unknown type {other:?} (none, bi-attention, or a registered one)"
                ),
            },
        };
        let dc = &cfg.detector;
        let needs_tokens = |name: &str| -> Result<()> {
            match cfg.head {
                HeadConfig::Token => Ok(()),
                HeadConfig::Class { .. } => candle_core::bail!(
                    "detector {name:?} predicts token logits: set model.head.type = \"token\""
                ),
            }
        };
        let mut tc = cfg.transformer.clone();
        let detector: Box<dyn Detector> = match dc.kind.as_str() {
            "decoder" => {
                dc.parse::<NoParams>("detector")?;
                let box_head: Box<dyn BoxHead> = match cfg.box_head {
                    BoxHeadConfig::Linear => Box::new(LinearBoxHead::new(d, vb.pp("bbox_pred"))?),
                    BoxHeadConfig::Mlp => Box::new(MlpBoxHead::new(d, vb.pp("bbox_embed"))?),
                };
                let class_head: Box<dyn ClassHead> = match cfg.head {
                    HeadConfig::Class { num_classes } => {
                        Box::new(FixedClassHead::new(d, num_classes, vb.pp("class_pred"))?)
                    }
                    HeadConfig::Token => {
                        Box::new(TokenAlignmentHead::new(ctx.text_dim, d, vb.pp("token_head"))?)
                    }
                };
                Box::new(DecoderDetector {
                    query_generator: query_generator()?,
                    box_head,
                    class_head,
                    aux_outputs: cfg.aux_loss,
                })
            }
            "dense" => {
                needs_tokens("dense")?;
                let p: DenseHeadConfig = dc.parse("detector")?;
                tc.num_decoder_layers = 0;
                Box::new(DenseHead::new(d, ctx.text_dim, &p, vb.pp("dense_head"))?)
            }
            "query-selection" => {
                needs_tokens("query-selection")?;
                let p: QuerySelectionConfig = dc.parse("detector")?;
                let qs = QuerySelection::new(
                    &tc,
                    ctx.text_dim,
                    cfg.num_queries,
                    cfg.aux_loss,
                    p,
                    vb.pp("query_selection"),
                )?;
                tc.num_decoder_layers = 0;
                Box::new(qs)
            }
            other => match self.detectors.get(other) {
                Some(f) => f(&ctx, &dc.params, vb.pp("detector"))?,
                None => candle_core::bail!("detector: unknown type {other:?} (decoder, dense, query-selection, or a registered one)"),
            },
        };
        let input_proj = if levels.len() == 1 {
            vec![Conv::new(vb.pp("input_proj"), cins[0], d, 1, 1, 0, 1, true, false)?]
        } else {
            cins.iter()
                .enumerate()
                .map(|(k, &cin)| {
                    Conv::new(vb.pp(format!("input_proj.{k}")), cin, d, 1, 1, 0, 1, true, false)
                })
                .collect::<Result<Vec<_>>>()?
        };
        let level_embed = if levels.len() > 1 {
            Some(vb.get_with_hints(
                (levels.len(), d),
                "level_embed",
                candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 },
            )?)
        } else {
            None
        };
        Ok(GlipModel {
            backbone,
            feature_levels: levels,
            input_proj,
            level_embed,
            fpn: cfg.fpn,
            text,
            transformer: Box::new(DetrTransformer::new(tc, vb.pp("transformer"))?),
            fusion,
            detector,
            position_encoding: cfg.position_encoding,
            d_model: d,
        })
    }

    /// Builds a model whose parameters are trainable variables in `varmap`, initialised from the
    /// config's `weights` files where they hold them; other initial values are drawn from a
    /// generator seeded by `(seed, parameter name)`, so a run is reproducible.
    pub fn build_trainable(
        &self,
        cfg: &ModelConfig,
        varmap: &candle_nn::VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<GlipModel> {
        let mut sources = Vec::new();
        let mut prefixes: Vec<(&String, &PathBuf)> = cfg.weights.iter().collect();
        prefixes.sort_by_key(|(p, _)| p.len());
        for (prefix, file) in prefixes {
            let weights = glip_core::weights::open(file, DType::F32, device)?;
            sources.push(glip_core::weights::Source { prefix: prefix.clone(), weights });
        }
        let vb = glip_core::weights::trainable(varmap, sources, seed, DType::F32, device);
        self.build(cfg, vb, device)
    }
}

/// A backbone whose outputs carry no gradient.
struct FrozenBackbone<B>(B);

impl<B: Backbone> Backbone for FrozenBackbone<B> {
    fn forward(
        &self,
        images: &candle_core::Tensor,
        _train: bool,
    ) -> Result<Vec<glip_core::FeatureMap>> {
        Ok(self
            .0
            .forward(images, false)?
            .into_iter()
            .map(|f| glip_core::FeatureMap { tensor: f.tensor.detach(), stride: f.stride })
            .collect())
    }
    fn out_channels(&self) -> Vec<usize> {
        self.0.out_channels()
    }
    fn strides(&self) -> Vec<usize> {
        self.0.strides()
    }
}

/// A text encoder whose outputs carry no gradient.
struct FrozenText<T>(T);

impl<T: TextEncoder> TextEncoder for FrozenText<T> {
    fn forward(
        &self,
        ids: &candle_core::Tensor,
        mask: &candle_core::Tensor,
        _train: bool,
    ) -> Result<glip_core::TextFeatures> {
        let f = self.0.forward(ids, mask, false)?;
        glip_core::TextFeatures::new(f.tokens.detach(), f.pooled.map(|p| p.detach()), f.mask)
    }
    fn hidden_size(&self) -> usize {
        self.0.hidden_size()
    }
}
