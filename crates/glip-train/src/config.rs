//! The typed config of a model and its loss.
//!
//! Every swappable slot is a [`Slot`] over a serde-tagged enum of the built-ins' parameters;
//! a registered name (`type = "mine"`) is a `Custom` slot. The built-ins are registered in
//! [`crate::builtins::register_builtins`] through the same API a researcher's crate uses, and
//! [`Registry::build`] makes every component through the registry: nothing chooses a
//! component by its name outside it.

pub use crate::builtins::{build_slot, register_builtins};
pub use crate::registry::{BuildContext, Builtins, Registry, Slot};
use candle_core::Result;
use glip_detectors::{DenseHeadConfig, QuerySelectionConfig};
use glip_loss::{DenseLossConfig, LossConfig};
use glip_transformer::{FusionResidual, TransformerConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Parameters of a component that takes none (a misspelt key is still an error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `builtins!(Enum, "slot.key", ["name" => Variant, ...])`: the enum's `type` names and the
/// variant each names (whose own type says where a wrong value is).
macro_rules! builtins {
    ($t:ident, $key:literal, [$($name:literal => $variant:ident),*] $(, default $d:literal)?) => {
        impl Builtins for $t {
            const KEY: &'static str = $key;
            const NAMES: &'static [&'static str] = &[$($name),*];
            $(const DEFAULT_TYPE: Option<&'static str> = Some($d);)?

            fn param_error(
                kind: &str,
                params: &toml::Table,
            ) -> Option<crate::registry::ParamError> {
                match kind {
                    $($name => crate::registry::params_of(params).map($t::$variant).err(),)*
                    _ => None,
                }
            }
        }
    };
}

/// torchvision ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResnetParams {
    /// 18, 34, 50 or 101.
    pub depth: u32,
    /// Stages frozen (0 nothing ... 5 all). Default 2.
    #[serde(default = "two")]
    pub freeze_at: usize,
    /// Trainable batch norm. Default false (frozen).
    #[serde(default)]
    pub trainable_bn: bool,
    /// Stages built and run (1 to 4; 3 stops at C4). Default 4.
    #[serde(default = "four")]
    pub stages: usize,
}

/// torchvision MobileNetV2 (strides 8, 16, 32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MobilenetV2Params {
    /// Trainable batch norm. Default false.
    #[serde(default)]
    pub trainable_bn: bool,
    /// Freeze the whole backbone. Default false.
    #[serde(default)]
    pub frozen: bool,
}

/// The built-in backbones (`[model.backbone] type = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BackboneConfig {
    /// torchvision ResNet.
    Resnet(ResnetParams),
    /// torchvision MobileNetV2.
    MobilenetV2(MobilenetV2Params),
}
builtins!(BackboneConfig, "model.backbone", ["resnet" => Resnet, "mobilenet-v2" => MobilenetV2]);

fn two() -> usize {
    2
}

fn four() -> usize {
    4
}

/// A BERT text encoder, from a Hugging Face folder or a config given inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertParams {
    /// `tokenizer.json` (may be left out with an inline `vocab_size`, for timing runs on
    /// random ids).
    #[serde(default)]
    pub tokenizer: PathBuf,
    /// A Hugging Face folder (`config.json`, weights): the architecture and the initial
    /// weights come from there; the weights train (unless `frozen`) and are saved in
    /// checkpoints like the rest of the model.
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

/// What text tokens attend to (`model.text_attention`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextAttention {
    /// Every real token of the caption.
    #[default]
    Sentence,
    /// The tokens of the same sub-sentence ([`glip_core::TextSegments`]).
    SubSentence,
}

/// The built-in text encoders (`[model.text] type = ...`, default `bert`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum TextConfig {
    /// BERT.
    Bert(BertParams),
}
builtins!(TextConfig, "model.text", ["bert" => Bert], default "bert");

/// The built-in transformers (`[model.transformer] type = ...`, default `detr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum TransformerSlot {
    /// DETR's encoder-decoder.
    Detr(TransformerConfig),
}
builtins!(TransformerSlot, "model.transformer", ["detr" => Detr], default "detr");

/// Heads of an attention (`text-attend` queries, `bi-attention` fusion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadsParams {
    /// Attention heads. Default 8.
    #[serde(default = "eight")]
    pub heads: usize,
}

/// The built-in query generators (`[model.query_generator] type = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum QueryGeneratorConfig {
    /// The seed's: queries from the pooled sentence.
    Seed(NoParams),
    /// Learned embeddings.
    Learned(NoParams),
    /// Learned queries that attend to the text tokens.
    TextAttend(HeadsParams),
}
builtins!(
    QueryGeneratorConfig,
    "model.query_generator",
    ["seed" => Seed, "learned" => Learned, "text-attend" => TextAttend]
);

/// Bidirectional image-text attention.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiAttentionParams {
    /// Attention heads. Default 8.
    #[serde(default = "eight")]
    pub heads: usize,
    /// Width of the attention (default the transformer's).
    #[serde(default)]
    pub embed: Option<usize>,
    /// Dropout on the attention weights (training only). Default 0.
    #[serde(default)]
    pub dropout: f32,
    /// What the residual adds the attention to: `input` (the block's input, so it starts as the
    /// identity; the default) or `normed` (the layer-normed features, as GLIP's and Grounding
    /// DINO's `BiAttentionBlock`).
    #[serde(default)]
    pub residual: FusionResidual,
}

/// Grounding DINO's feature enhancer: `layers` times bi-attention between image and text, the
/// text's self-attention layer, the image tokens' encoder layer (shaped like the transformer's:
/// width, heads, feed-forward, dropout, `encoder_attention`, `encoder_points`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureEnhancerParams {
    /// Enhancer layers. Default 1 (Grounding DINO: 6, with no image-only encoder layer before
    /// them: `model.transformer.num_encoder_layers = 0`).
    #[serde(default = "one")]
    pub layers: usize,
    /// Heads of the bi-attention. Default 8.
    #[serde(default = "eight")]
    pub heads: usize,
    /// Width of the bi-attention (default the transformer's).
    #[serde(default)]
    pub embed: Option<usize>,
    /// Heads of the text's self-attention (default `heads`).
    #[serde(default)]
    pub text_heads: Option<usize>,
    /// Feed-forward width of the text layers (default half the transformer's
    /// `dim_feedforward`, Grounding DINO's choice).
    #[serde(default)]
    pub text_feedforward: Option<usize>,
}

/// The built-in fusions (`[model.fusion] type = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum FusionConfig {
    /// No fusion.
    None(NoParams),
    /// GLIP's bidirectional image-text attention.
    BiAttention(BiAttentionParams),
    /// Grounding DINO's feature enhancer.
    FeatureEnhancer(FeatureEnhancerParams),
}
builtins!(
    FusionConfig,
    "model.fusion",
    ["none" => None, "bi-attention" => BiAttention, "feature-enhancer" => FeatureEnhancer]
);

fn eight() -> usize {
    8
}

fn one() -> usize {
    1
}

/// The built-in detectors (`[model.detector] type = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum DetectorConfig {
    /// The seed's: query generator, decoder, box and class heads.
    Decoder(NoParams),
    /// GLIP's one-stage head.
    Dense(DenseHeadConfig),
    /// Grounding DINO's language-guided query selection.
    QuerySelection(QuerySelectionConfig),
}
builtins!(
    DetectorConfig,
    "model.detector",
    ["decoder" => Decoder, "dense" => Dense, "query-selection" => QuerySelection]
);

/// Fixed classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassParams {
    /// Number of classes.
    pub num_classes: usize,
}

/// The built-in classification heads (`[model.head] type = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HeadConfig {
    /// Fixed classes (`num_classes + 1` logits).
    Class(ClassParams),
    /// GLIP's token alignment (open vocabulary).
    Token(NoParams),
}
builtins!(HeadConfig, "model.head", ["class" => Class, "token" => Token]);

/// The built-in box heads (`model.box_head = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BoxHeadConfig {
    /// One linear layer (the seed).
    Linear(NoParams),
    /// DETR's 3-layer MLP.
    Mlp(NoParams),
}
builtins!(BoxHeadConfig, "model.box_head", ["linear" => Linear, "mlp" => Mlp]);

/// The built-in matchers (`loss.matcher = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum MatcherConfig {
    /// Hungarian matching (scipy's algorithm).
    Hungarian(NoParams),
    /// The seed tutorial's pairing: query i with target i.
    Ordered(NoParams),
}
builtins!(MatcherConfig, "loss.matcher", ["hungarian" => Hungarian, "ordered" => Ordered]);

/// The built-in criteria (`loss.criterion = ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum CriterionKind {
    /// Matched set prediction (`loss.matcher`, the weights of `[loss]`).
    Set(NoParams),
    /// FCOS/ATSS assignment for a dense head (`[loss.dense]`).
    Dense(NoParams),
}
builtins!(CriterionKind, "loss.criterion", ["set" => Set, "dense" => Dense]);

/// The whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Backbone.
    pub backbone: Slot<BackboneConfig>,
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
    /// `centerness`), `query-selection` (Grounding DINO's; params `anchor_scale`, `content` =
    /// `selected` or `learned` (DINO's mixed query selection), `denoising` = DINO's denoising
    /// queries `{ groups, box_noise, label_noise, max_queries }`, `text_cross_attention`,
    /// `look_forward_twice`, `image_attention` = `global` or `deformable` (Deformable DETR's
    /// attention, `deformable_points` per head and level)), or a registered name. Default
    /// `decoder`.
    #[serde(default = "decoder_detector")]
    pub detector: Slot<DetectorConfig>,
    /// Text encoder (default type `bert`).
    pub text: Slot<TextConfig>,
    /// Transformer sizes and options (default type `detr`).
    pub transformer: Slot<TransformerSlot>,
    /// Number of queries.
    pub num_queries: usize,
    /// Query generator: `seed`, `learned`, `text-attend` (params: `heads`), or a registered name.
    #[serde(default = "seed_queries")]
    pub query_generator: Slot<QueryGeneratorConfig>,
    /// Fusion: `none`, `bi-attention` (params: `heads`, `embed`), or a registered name.
    #[serde(default = "no_fusion")]
    pub fusion: Slot<FusionConfig>,
    /// What each text token attends to in the text encoder and in a fusion's text layers:
    /// `sentence` (every token of its caption; default) or `sub-sentence` (Grounding DINO's:
    /// the tokens of its own phrase, up to and including a `.` or `?`, positions counted from
    /// the phrase's start, so a category's features do not depend on the other categories of
    /// the prompt or their order). `[CLS]` then attends to itself alone: the pooled sentence
    /// (the `seed` query generator's input) no longer sees the caption.
    #[serde(default)]
    pub text_attention: TextAttention,
    /// Box head. Default linear.
    #[serde(default = "linear")]
    pub box_head: Slot<BoxHeadConfig>,
    /// Classification head.
    pub head: Slot<HeadConfig>,
    /// DETR's sine positional encoding. Default false (the seed has none).
    #[serde(default)]
    pub position_encoding: bool,
    /// Predictions of every decoder layer, for auxiliary losses. Default false.
    #[serde(default)]
    pub aux_loss: bool,
    /// Checkpoints to initialise from: model prefix (`backbone`, `text`, or empty for the whole
    /// model) -> file (`.safetensors` or `.pth`). Every parameter under a prefix must be in its
    /// file unless it is under one of `allow_missing`.
    #[serde(default)]
    pub weights: HashMap<String, PathBuf>,
    /// Parameter-name prefixes that may be missing from the `weights` files (initialised
    /// at random instead). Default none: a missing name is an error listing them.
    #[serde(default)]
    pub allow_missing: Vec<String>,
    /// Parameter-name prefixes (whole components: `backbone`, `text.embeddings`, `dense_head`)
    /// whose parameters stay as they are in training: no gradient is computed for them and the
    /// optimizer leaves them and keeps no moments for them (their batch norms' running
    /// statistics stay too; with `trainable_bn` a batch still normalises by its own
    /// statistics). They are saved in checkpoints like the rest. Each must name a parameter of
    /// the model. Default none.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// If set, only parameters under these prefixes train (`freeze` applies on top), e.g.
    /// `["prompt"]` for GLIP's prompt tuning, `["dense_head"]` to train the dense head alone.
    /// Each must name a parameter of the model (`glip inspect` lists the components). Default:
    /// every parameter.
    #[serde(default)]
    pub trainable: Option<Vec<String>>,
    /// GLIP's prompt tuning: a learned offset per token position (`prompt.offsets`,
    /// `(prompt_positions, text width)`, from zeros) added to the text encoder's token features
    /// before fusion; with `trainable = ["prompt"]` it is all that trains. A prompt longer than
    /// this many tokens is an error. Default 0: none.
    #[serde(default)]
    pub prompt_positions: usize,
}

fn decoder_detector() -> Slot<DetectorConfig> {
    DetectorConfig::Decoder(NoParams {}).into()
}
fn seed_queries() -> Slot<QueryGeneratorConfig> {
    QueryGeneratorConfig::Seed(NoParams {}).into()
}
fn no_fusion() -> Slot<FusionConfig> {
    FusionConfig::None(NoParams {}).into()
}
fn linear() -> Slot<BoxHeadConfig> {
    BoxHeadConfig::Linear(NoParams {}).into()
}

fn table_path(t: &toml::Table, key: &str) -> Option<PathBuf> {
    t.get(key).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(PathBuf::from)
}

impl ModelConfig {
    /// The tokenizer file: the BERT's `tokenizer`, or a registered text encoder's
    /// `tokenizer` parameter.
    pub fn tokenizer(&self) -> Option<PathBuf> {
        match &self.text {
            Slot::Builtin(TextConfig::Bert(p)) => {
                Some(p.tokenizer.clone()).filter(|p| !p.as_os_str().is_empty())
            }
            Slot::Custom { params, .. } => table_path(params, "tokenizer"),
        }
    }

    /// The transformer width: the DETR transformer's `d_model`, or a registered
    /// transformer's `d_model` parameter.
    pub fn d_model(&self) -> Result<usize> {
        match &self.transformer {
            Slot::Builtin(TransformerSlot::Detr(t)) => Ok(t.d_model),
            Slot::Custom { kind, params } => params
                .get("d_model")
                .and_then(|v| v.as_integer())
                .filter(|&d| d > 0)
                .map(|d| d as usize)
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "model.transformer (type {kind:?}): give `d_model`, the width of the image tokens"
                    ))
                }),
        }
    }

    /// The rule of `freeze` and `trainable`: which parameters are handed out frozen.
    pub fn freeze_rule(&self) -> glip_core::weights::Freeze {
        glip_core::weights::Freeze { freeze: self.freeze.clone(), only: self.trainable.clone() }
    }

    /// Makes relative paths (and a registered text encoder's `tokenizer` / `folder`) relative
    /// to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        self.resolve_paths_with(&|_| base.to_path_buf());
    }

    /// Makes each relative path relative to `base(key)`, where `key` is the path's key under
    /// `model.` (`weights.backbone`, `text.tokenizer`, `text.folder`).
    pub fn resolve_paths_with(&mut self, base: &dyn Fn(&str) -> PathBuf) {
        let resolve = |key: String, p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base(&key).join(&*p);
            }
        };
        for (k, p) in self.weights.iter_mut() {
            resolve(format!("weights.{k}"), p);
        }
        match &mut self.text {
            Slot::Builtin(TextConfig::Bert(p)) => {
                resolve("text.tokenizer".into(), &mut p.tokenizer);
                if let Some(f) = p.folder.as_mut() {
                    resolve("text.folder".into(), f);
                }
            }
            Slot::Custom { params, .. } => {
                for key in ["tokenizer", "folder"] {
                    if let Some(mut p) = table_path(params, key) {
                        resolve(format!("text.{key}"), &mut p);
                        params.insert(key.into(), toml::Value::String(p.to_string_lossy().into()));
                    }
                }
            }
        }
    }
}

/// Which criterion, which matcher, and their weights (`[loss]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriterionConfig {
    /// `set` (matched set prediction), `dense` (FCOS/ATSS assignment for a dense head), or a
    /// registered name. Default: the detector's (`dense` for a dense head, `set` otherwise).
    #[serde(default)]
    pub criterion: Option<Slot<CriterionKind>>,
    /// `hungarian` (default), `ordered` (the seed tutorial's pairing), or a registered name.
    #[serde(default = "hungarian")]
    pub matcher: Slot<MatcherConfig>,
    /// The dense criterion's assignment and weights (`[loss.dense]`).
    #[serde(default)]
    pub dense: DenseLossConfig,
    /// Costs and weights.
    #[serde(flatten)]
    pub weights: LossConfig,
}

fn hungarian() -> Slot<MatcherConfig> {
    MatcherConfig::Hungarian(NoParams {}).into()
}

impl Default for CriterionConfig {
    fn default() -> Self {
        Self {
            criterion: None,
            matcher: hungarian(),
            dense: DenseLossConfig::default(),
            weights: LossConfig::default(),
        }
    }
}
