//! The built-in components' factories, registered through the same API a researcher's crate
//! uses, and the assembly of a model from its slots ([`Registry::build`]).

use crate::config::*;
use crate::model::GlipModel;
use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use glip_backbone::{layers::Conv, MobileNetV2, ResNet, ResNetConfig, ResNetDepth};
use glip_core::{Backbone, TextEncoder};
use glip_detectors::{
    DecoderDetector, DenseHead, DenseHeadConfig, QuerySelection, QuerySelectionConfig,
};
use glip_heads::{FixedClassHead, LinearBoxHead, MlpBoxHead, TokenAlignmentHead};
use glip_loss::{DenseCriterion, HungarianMatcher, OrderedMatcher, SetCriterion};
use glip_text::{Bert, BertConfig};
use glip_transformer::{
    BiAttentionFusion, DetrTransformer, FeatureEnhancer, FeatureEnhancerConfig, LearnedQueries,
    NoFusion, SeedQueries, TextAttendQueries, TransformerConfig,
};
use std::path::{Path, PathBuf};

fn msg(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A BERT's config and weight file from a Hugging Face folder.
fn bert_folder(dir: &Path) -> Result<(BertConfig, PathBuf)> {
    let config = BertConfig::from_file(&dir.join("config.json"))
        .map_err(|e| msg(format!("model.text.folder: {e}")))?;
    let file = ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| {
            msg(format!(
                "model.text.folder: {} has no model.safetensors or pytorch_model.bin",
                dir.display()
            ))
        })?;
    Ok((config, file))
}

/// Registers every built-in component of this workspace.
pub fn register_builtins(r: &mut Registry) {
    r.register_backbone("resnet", |_, p: ResnetParams, vb| {
        let depth = match p.depth {
            18 => ResNetDepth::Resnet18,
            34 => ResNetDepth::Resnet34,
            50 => ResNetDepth::Resnet50,
            101 => ResNetDepth::Resnet101,
            d => candle_core::bail!("model.backbone: no ResNet-{d} (18, 34, 50 or 101)"),
        };
        let rc = ResNetConfig {
            depth,
            freeze_at: p.freeze_at,
            trainable_bn: p.trainable_bn,
            stages: p.stages,
        };
        Ok(Box::new(ResNet::new(rc, vb)?) as Box<dyn Backbone>)
    });
    r.register_backbone("mobilenet-v2", |_, p: MobilenetV2Params, vb| {
        let net = MobileNetV2::new(vb, false, p.trainable_bn)?;
        Ok(if p.frozen {
            Box::new(FrozenBackbone(net))
        } else {
            Box::new(net) as Box<dyn Backbone>
        })
    });
    r.register_text_encoder("bert", |_, t: BertParams, vb| {
        let bert = match &t.folder {
            Some(dir) => {
                // The folder's weights are a source of the trainable builder under `text`
                // (see `Registry::build_trainable`): the BERT trains and is checkpointed.
                let (config, _) = bert_folder(dir)?;
                let has_pooler = vb.contains_tensor("pooler.dense.weight")
                    || vb.contains_tensor("bert.pooler.dense.weight");
                Bert::new(config, vb, has_pooler)?
            }
            None => {
                let vocab = match t.vocab_size {
                    Some(v) => v,
                    None => glip_text::Tokenizer::from_file(&t.tokenizer)
                        .map_err(|e| msg(format!("model.text.tokenizer: {e}")))?
                        .vocab_size(),
                };
                let (Some(h), Some(l), Some(n)) = (t.hidden, t.layers, t.heads) else {
                    candle_core::bail!(
                        "model.text: give `folder`, or `hidden`, `layers` and `heads`"
                    )
                };
                let tiny = BertConfig::tiny(vocab, h, l, n);
                let bc = BertConfig {
                    hidden_dropout_prob: t.dropout,
                    attention_probs_dropout_prob: t.dropout,
                    intermediate_size: t.intermediate.unwrap_or(tiny.intermediate_size),
                    ..tiny
                };
                Bert::new(bc, vb, true)?
            }
        };
        Ok(if t.frozen {
            Box::new(FrozenText(bert))
        } else {
            Box::new(bert) as Box<dyn TextEncoder>
        })
    });
    r.register_transformer("detr", |ctx, mut tc: TransformerConfig, vb| {
        if !ctx.decoder {
            tc.num_decoder_layers = 0;
        }
        let levels = ctx.model.feature_levels.as_ref().map_or(1, Vec::len);
        Ok(Box::new(DetrTransformer::with_levels(tc, levels, vb)?))
    });
    r.register_query_generator("seed", |ctx, _: NoParams, vb| {
        Ok(Box::new(SeedQueries::new(ctx.text_dim, ctx.d_model, ctx.model.num_queries, vb)?))
    });
    r.register_query_generator("learned", |ctx, _: NoParams, vb| {
        Ok(Box::new(LearnedQueries::new(ctx.d_model, ctx.model.num_queries, vb)?))
    });
    r.register_query_generator("text-attend", |ctx, p: HeadsParams, vb| {
        let q = ctx.model.num_queries;
        Ok(Box::new(TextAttendQueries::new(ctx.text_dim, ctx.d_model, q, p.heads, vb)?))
    });
    r.register_fusion("none", |_, _: NoParams, _| Ok(Box::new(NoFusion)));
    r.register_fusion("bi-attention", |ctx, p: BiAttentionParams, vb| {
        let d = ctx.d_model;
        let embed = p.embed.unwrap_or(d);
        Ok(Box::new(
            BiAttentionFusion::new(d, ctx.text_dim, embed, p.heads, p.dropout, vb)?
                .with_residual(p.residual),
        ))
    });
    r.register_fusion("feature-enhancer", |ctx, p: FeatureEnhancerParams, vb| {
        let Some(TransformerSlot::Detr(image)) = ctx.model.transformer.builtin() else {
            candle_core::bail!(
                "model.fusion: the feature enhancer's image layers are shaped like the `detr` \
                 transformer's, and model.transformer is a registered one"
            )
        };
        let config = FeatureEnhancerConfig {
            layers: p.layers,
            heads: p.heads,
            embed: p.embed,
            text_heads: p.text_heads.unwrap_or(p.heads),
            text_feedforward: p.text_feedforward.unwrap_or((image.dim_feedforward / 2).max(1)),
        };
        let levels = ctx.model.feature_levels.as_ref().map_or(1, Vec::len);
        Ok(Box::new(FeatureEnhancer::new(image, levels, ctx.text_dim, &config, vb)?))
    });
    r.register_box_head("linear", |ctx, _: NoParams, vb| {
        Ok(Box::new(LinearBoxHead::new(ctx.d_model, vb.pp("bbox_pred"))?))
    });
    r.register_box_head("mlp", |ctx, _: NoParams, vb| {
        Ok(Box::new(MlpBoxHead::new(ctx.d_model, vb.pp("bbox_embed"))?))
    });
    r.register_class_head("class", |ctx, p: ClassParams, vb| {
        Ok(Box::new(FixedClassHead::new(ctx.d_model, p.num_classes, vb.pp("class_pred"))?))
    });
    r.register_class_head("token", |ctx, _: NoParams, vb| {
        Ok(Box::new(TokenAlignmentHead::new(ctx.text_dim, ctx.d_model, vb.pp("token_head"))?))
    });
    r.register_detector("decoder", |ctx, _: NoParams, vb| {
        // The heads keep the seed's parameter names at the model's root.
        let root = vb.root();
        Ok(Box::new(DecoderDetector {
            query_generator: build_slot(
                &ctx.registry.query_generators,
                &ctx.model.query_generator,
                ctx,
                root.pp("query_generator"),
            )?,
            box_head: build_slot(&ctx.registry.box_heads, &ctx.model.box_head, ctx, root.clone())?,
            class_head: build_slot(&ctx.registry.class_heads, &ctx.model.head, ctx, root)?,
            aux_outputs: ctx.model.aux_loss,
        }))
    });
    r.register_detector("dense", |ctx, p: DenseHeadConfig, vb| {
        needs_tokens(ctx, "dense")?;
        let head = DenseHead::new(ctx.d_model, ctx.text_dim, &p, vb.root().pp("dense_head"))?;
        Ok(Box::new(head))
    });
    r.register_detector("query-selection", |ctx, p: QuerySelectionConfig, vb| {
        needs_tokens(ctx, "query-selection")?;
        let Slot::Builtin(TransformerSlot::Detr(tc)) = &ctx.model.transformer else {
            candle_core::bail!(
                "model.detector: query selection runs the `detr` transformer's decoder layers"
            )
        };
        let qs = QuerySelection::new(
            tc,
            ctx.text_dim,
            ctx.model.num_queries,
            ctx.model.aux_loss,
            ctx.model.feature_levels.as_ref().map_or(1, Vec::len),
            p,
            vb.root().pp("query_selection"),
        )?;
        Ok(Box::new(qs))
    });
    r.register_matcher("hungarian", |_, _: NoParams, ()| Ok(Box::new(HungarianMatcher)));
    r.register_matcher("ordered", |_, _: NoParams, ()| Ok(Box::new(OrderedMatcher)));
    r.register_criterion("set", |ctx, _: NoParams, ()| {
        let loss = ctx.loss()?;
        let matcher = build_slot(&ctx.registry.matchers, &loss.matcher, ctx, ())?;
        Ok(Box::new(SetCriterion::new(loss.weights.clone(), matcher)))
    });
    r.register_criterion("dense", |ctx, _: NoParams, ()| {
        Ok(Box::new(DenseCriterion::new(ctx.loss()?.dense.clone())))
    });
}

/// A token-predicting detector refuses a fixed-class head.
fn needs_tokens(ctx: &BuildContext<'_>, name: &str) -> Result<()> {
    match &ctx.model.head {
        Slot::Builtin(HeadConfig::Token(_)) => Ok(()),
        _ => candle_core::bail!(
            "detector {name:?} predicts token logits: set model.head.type = \"token\""
        ),
    }
}

/// Builds the component a slot names through its family.
pub fn build_slot<T: ?Sized + 'static, A: 'static, B: Builtins>(
    family: &crate::registry::Family<T, A>,
    slot: &Slot<B>,
    ctx: &BuildContext<'_>,
    a: A,
) -> Result<Box<T>> {
    let (kind, params) = slot.split();
    family.build(&kind, &params, ctx, a)
}

impl Registry {
    /// Builds `cfg` with parameters from `vb` (a [`glip_core::weights::trainable`] builder for
    /// training, or a checkpoint for inference).
    pub fn build(
        &self,
        cfg: &ModelConfig,
        vb: VarBuilder<'static>,
        device: &Device,
    ) -> Result<GlipModel> {
        let mut ctx = BuildContext {
            registry: self,
            model: cfg,
            text_dim: 0,
            d_model: cfg.d_model()?,
            decoder: true,
            loss: None,
            device,
        };
        let backbone = build_slot(&self.backbones, &cfg.backbone, &ctx, vb.pp("backbone"))?;
        let channels = backbone.out_channels();
        let levels = match (&cfg.feature_levels, cfg.feature_level) {
            (Some(_), Some(_)) => {
                candle_core::bail!("model: give feature_level or feature_levels, not both")
            }
            (Some(v), None) => v.clone(),
            (None, l) => vec![l.unwrap_or(channels.len().saturating_sub(1))],
        };
        if levels.is_empty() || levels.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!(
                "model.feature_levels {levels:?}: give one or more, finest first, no repeats"
            );
        }
        let mut cins = Vec::with_capacity(levels.len());
        for &level in &levels {
            let Some(&cin) = channels.get(level) else {
                candle_core::bail!(
                    "model.feature_levels: level {level}, but the backbone has {} levels",
                    channels.len()
                )
            };
            cins.push(cin);
        }
        let text = build_slot(&self.text_encoders, &cfg.text, &ctx, vb.pp("text"))?;
        ctx.text_dim = text.hidden_size();
        let d = ctx.d_model;
        let fusion = build_slot(&self.fusions, &cfg.fusion, &ctx, vb.pp("fusion"))?;
        let detector = build_slot(&self.detectors, &cfg.detector, &ctx, vb.pp("detector"))?;
        ctx.decoder = detector.uses_decoder();
        let transformer =
            build_slot(&self.transformers, &cfg.transformer, &ctx, vb.pp("transformer"))?;
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
        let prompt = match cfg.prompt_positions {
            0 => None,
            n => Some(vb.get_with_hints(
                (n, ctx.text_dim),
                "prompt.offsets",
                candle_nn::Init::Const(0.0),
            )?),
        };
        Ok(GlipModel {
            backbone,
            feature_levels: levels,
            input_proj,
            level_embed,
            fpn: cfg.fpn,
            text,
            transformer,
            fusion,
            detector,
            position_encoding: cfg.position_encoding,
            d_model: d,
            prompt,
            text_attention: cfg.text_attention,
        })
    }

    /// The criterion of `loss` for `model`: `loss.criterion`, else the detector's default.
    pub fn build_criterion(
        &self,
        loss: &CriterionConfig,
        model_cfg: &ModelConfig,
        model: &GlipModel,
        device: &Device,
    ) -> Result<Box<dyn glip_core::Criterion>> {
        let ctx = BuildContext {
            registry: self,
            model: model_cfg,
            text_dim: model.text.hidden_size(),
            d_model: model.d_model,
            decoder: model.detector.uses_decoder(),
            loss: Some(loss),
            device,
        };
        match &loss.criterion {
            Some(slot) => build_slot(&self.criteria, slot, &ctx, ()),
            None => {
                let kind = model.detector.default_criterion().to_string();
                self.criteria.build(&kind, &toml::Table::new(), &ctx, ())
            }
        }
    }

    /// Builds a model whose parameters are trainable variables in `varmap`, initialised from the
    /// config's `weights` files (and a `text.folder` BERT's weights) where they hold them;
    /// other initial values are drawn from a generator seeded by `(seed, parameter name)`, so a
    /// run is reproducible. A parameter under a `weights` prefix that its file lacks is an
    /// error listing every such name, unless `allow_missing` names a prefix of it.
    pub fn build_trainable(
        &self,
        cfg: &ModelConfig,
        varmap: &candle_nn::VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<GlipModel> {
        let mut sources = Vec::new();
        if let Slot::Builtin(TextConfig::Bert(BertParams { folder: Some(dir), .. })) = &cfg.text {
            let (_, file) = bert_folder(dir)?;
            let weights = glip_core::weights::open(&file, DType::F32, device)?;
            let origin = file.display().to_string();
            sources.push(glip_core::weights::Source { prefix: "text".into(), weights, origin });
        }
        let mut prefixes: Vec<(&String, &PathBuf)> = cfg.weights.iter().collect();
        prefixes.sort_by_key(|(p, _)| p.len());
        for (prefix, file) in prefixes {
            let key = crate::validate::weights_key(prefix);
            if !file.exists() {
                let hint = crate::validate::WEIGHTS_HINT;
                candle_core::bail!("{key}: {} not found ({hint})", file.display());
            }
            let weights = glip_core::weights::open(file, DType::F32, device)
                .map_err(|e| msg(format!("{key}: {e}")))?;
            let origin = format!("{} ({key})", file.display());
            sources.push(glip_core::weights::Source { prefix: prefix.clone(), weights, origin });
        }
        let covered: Vec<(String, VarBuilder<'static>)> = cfg
            .weights
            .keys()
            .map(|p| {
                (
                    p.clone(),
                    sources.iter().find(|s| &s.prefix == p).expect("source").weights.clone(),
                )
            })
            .collect();
        let freeze = cfg.freeze_rule();
        let vb = glip_core::weights::trainable_with(
            varmap,
            sources,
            seed,
            freeze.clone(),
            DType::F32,
            device,
        );
        let model = self.build(cfg, vb, device)?;
        check_freeze(varmap, &freeze)?;
        let missing = missing_weights(varmap, &covered, &cfg.allow_missing);
        if !missing.is_empty() {
            candle_core::bail!(
                "model.weights: {} parameters of the model are not in their weights file: {}{} \
                 (allow_missing = [\"prefix\", ...] lets them start at random)",
                missing.len(),
                missing.iter().take(8).cloned().collect::<Vec<_>>().join(", "),
                if missing.len() > 8 { ", ..." } else { "" }
            );
        }
        Ok(model)
    }
}

/// Every prefix of `model.freeze` and `model.trainable` names a parameter of the model, and
/// something is left to train.
fn check_freeze(varmap: &candle_nn::VarMap, freeze: &glip_core::weights::Freeze) -> Result<()> {
    let names: Vec<String> =
        crate::trainer::trainable_vars(varmap).into_iter().map(|v| v.0).collect();
    let keys = freeze.freeze.iter().map(|p| ("freeze", p));
    for (key, prefix) in keys.chain(freeze.only.iter().flatten().map(|p| ("trainable", p))) {
        if !names.iter().any(|n| glip_core::weights::under_prefix(n, prefix)) {
            let mut tops: Vec<&str> =
                names.iter().map(|n| n.split('.').next().unwrap_or(n)).collect();
            tops.dedup();
            candle_core::bail!(
                "model.{key}: \"{prefix}\" names no parameter of the model (its parameters are \
                 under {})",
                tops.join(", ")
            );
        }
    }
    if names.iter().all(|n| freeze.frozen(n)) {
        candle_core::bail!(
            "model.freeze / model.trainable: every parameter of the model is frozen; nothing \
             would train"
        );
    }
    Ok(())
}

/// The parameters of `varmap` under a `weights` prefix that no file covering them holds.
fn missing_weights(
    varmap: &candle_nn::VarMap,
    sources: &[(String, VarBuilder<'static>)],
    allow: &[String],
) -> Vec<String> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter(|name| !allow.iter().any(|a| name.starts_with(a.as_str())))
        .filter(|name| {
            let rest_of = |prefix: &str| -> Option<String> {
                if prefix.is_empty() {
                    Some(name.to_string())
                } else {
                    name.strip_prefix(prefix)?.strip_prefix('.').map(String::from)
                }
            };
            let covering: Vec<_> =
                sources.iter().filter_map(|(p, w)| rest_of(p).map(|r| (r, w))).collect();
            !covering.is_empty() && !covering.iter().any(|(r, w)| w.contains_tensor(r))
        })
        .cloned()
        .collect()
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
    fn forward_segmented(
        &self,
        ids: &candle_core::Tensor,
        mask: &candle_core::Tensor,
        segments: &glip_core::TextSegments,
        _train: bool,
    ) -> Result<glip_core::TextFeatures> {
        let f = self.0.forward_segmented(ids, mask, segments, false)?;
        glip_core::TextFeatures::new(f.tokens.detach(), f.pooled.map(|p| p.detach()), f.mask)
    }
    fn hidden_size(&self) -> usize {
        self.0.hidden_size()
    }
}
