//! A run's config checked as a whole before any model is built or any data made: sizes, counts,
//! ranges, divisibility, feature levels against the backbone's stages, dataset sizes against
//! the batch size, files that must exist. Every broken rule is reported, each naming its key.
//!
//! The sections of the component crates check themselves ([`Validate`] impls beside their
//! structs); what spans sections is here. Registered components' parameters are checked by the
//! [`Registry`] (their types), and by their factories.

use crate::config::*;
use crate::optim::{OptimConfig, Schedule};
use crate::run_config::{DataConfig, ExperimentConfig, RunConfig};
use crate::trainer::TrainConfig;
use glip_core::validate::{limits, Checker, Problems, Validate};
use std::path::Path;

/// The backbone's levels (ResNet: C2..C5, the first `stages`; MobileNetV2: strides 8, 16, 32),
/// when it is a built-in.
fn backbone_levels(b: &Slot<BackboneConfig>) -> Option<usize> {
    match b.builtin()? {
        BackboneConfig::Resnet(p) => Some(p.stages),
        BackboneConfig::MobilenetV2(_) => Some(3),
    }
}

fn file_exists(c: &mut Checker, key: &str, p: &Path, what: &str) {
    if !p.as_os_str().is_empty() && !p.is_file() {
        c.fail(key, p.display(), format!("no such file ({what})"));
    }
}

fn dir_exists(c: &mut Checker, key: &str, p: &Path, what: &str) {
    if !p.is_dir() {
        c.fail(key, p.display(), format!("no such folder ({what})"));
    }
}

impl Validate for ResnetParams {
    fn validate(&self, c: &mut Checker) {
        c.ensure(
            [18, 34, 50, 101].contains(&self.depth),
            "depth",
            self.depth,
            "must be 18, 34, 50 or 101",
        );
        c.in_range("freeze_at", self.freeze_at, 0, 5);
        c.in_range("stages", self.stages, 1, 4);
    }
}

impl Validate for BertParams {
    fn validate(&self, c: &mut Checker) {
        file_exists(c, "tokenizer", &self.tokenizer, "a tokenizer.json");
        match &self.folder {
            Some(dir) => {
                dir_exists(c, "folder", dir, "a Hugging Face BERT: config.json and weights");
                for (k, v) in
                    [("hidden", self.hidden), ("layers", self.layers), ("heads", self.heads)]
                {
                    if v.is_some() {
                        c.fail_rule(k, "give `folder` or the inline sizes, not both");
                    }
                }
            }
            None => {
                let (h, l, n) = (self.hidden, self.layers, self.heads);
                if h.is_none() || l.is_none() || n.is_none() {
                    c.fail_rule("", "give `folder`, or `hidden`, `layers` and `heads`");
                }
                if let Some(h) = h {
                    c.in_range("hidden", h, 1, limits::WIDTH);
                }
                if let Some(l) = l {
                    c.in_range("layers", l, 0, limits::LAYERS);
                }
                if let Some(n) = n {
                    c.in_range("heads", n, 1, limits::HEADS);
                    let width = c.key("hidden");
                    c.divides("heads", n, h.unwrap_or(0), &width);
                }
            }
        }
        if let Some(i) = self.intermediate {
            c.in_range("intermediate", i, 1, limits::WIDTH);
        }
        if let Some(v) = self.vocab_size {
            c.in_range("vocab_size", v, 1, limits::VOCAB);
        }
        c.dropout("dropout", self.dropout as f64);
    }
}

impl Validate for ModelConfig {
    fn validate(&self, c: &mut Checker) {
        match self.backbone.builtin() {
            Some(BackboneConfig::Resnet(p)) => c.section("backbone", p),
            Some(BackboneConfig::MobilenetV2(_)) | None => {}
        }
        let levels = backbone_levels(&self.backbone);
        let level_rule =
            |n: usize| format!("must be a level of the backbone, which has {n} (0 to {})", n - 1);
        match (&self.feature_levels, self.feature_level) {
            (Some(_), Some(_)) => {
                c.fail_rule("feature_level", "give feature_level or feature_levels, not both")
            }
            (Some(ls), None) => {
                if ls.is_empty() || ls.windows(2).any(|w| w[0] >= w[1]) {
                    c.fail(
                        "feature_levels",
                        format!("{ls:?}"),
                        "give one or more levels, finest first, no repeats",
                    );
                }
                if let Some(n) = levels {
                    for &l in ls.iter().filter(|&&l| l >= n) {
                        c.fail("feature_levels", l, level_rule(n));
                    }
                }
            }
            (None, Some(l)) => {
                if let Some(n) = levels.filter(|&n| l >= n) {
                    c.fail("feature_level", l, level_rule(n));
                }
            }
            (None, None) => {}
        }
        if self.fpn && self.feature_levels.as_ref().is_none_or(|l| l.len() < 2) {
            c.fail_rule("fpn", "a top-down FPN needs two or more feature_levels");
        }
        if let Some(TextConfig::Bert(p)) = self.text.builtin() {
            c.section("text", p);
        }
        let d_model = match self.transformer.builtin() {
            Some(TransformerSlot::Detr(t)) => {
                c.section("transformer", t);
                Some(t.d_model)
            }
            None => self.d_model().ok(),
        };
        c.in_range("num_queries", self.num_queries, 1, limits::QUERIES);
        c.in_range("prompt_positions", self.prompt_positions, 0, limits::WIDTH);
        let prefixes = self.freeze.iter().map(|p| ("freeze", p));
        for (key, p) in prefixes.chain(self.trainable.iter().flatten().map(|p| ("trainable", p))) {
            if p.is_empty() || p.starts_with('.') || p.ends_with('.') || p.contains("..") {
                c.fail(key, format!("{p:?}"), "give parameter-name prefixes such as \"backbone\"");
            }
        }
        if self.trainable.as_ref().is_some_and(Vec::is_empty) {
            c.fail_rule("trainable", "names nothing: no parameter would train");
        }
        let d = d_model.unwrap_or(0);
        if let Some(QueryGeneratorConfig::TextAttend(p)) = self.query_generator.builtin() {
            c.within("query_generator", |c| {
                c.in_range("heads", p.heads, 1, limits::HEADS);
                c.divides("heads", p.heads, d, "model.transformer.d_model");
            });
        }
        if let Some(FusionConfig::BiAttention(p)) = self.fusion.builtin() {
            c.within("fusion", |c| {
                bi_attention_width(c, p.heads, p.embed, d);
                c.dropout("dropout", p.dropout as f64);
            });
        }
        if let Some(FusionConfig::FeatureEnhancer(p)) = self.fusion.builtin() {
            let text_width = match self.text.builtin() {
                Some(TextConfig::Bert(b)) => b.hidden,
                _ => None,
            };
            c.within("fusion", |c| {
                c.in_range("layers", p.layers, 1, limits::LAYERS);
                bi_attention_width(c, p.heads, p.embed, d);
                let (key, text_heads) = match p.text_heads {
                    Some(h) => ("text_heads", h),
                    None => ("heads", p.heads),
                };
                c.in_range(key, text_heads, 1, limits::HEADS);
                if let Some(w) = text_width {
                    c.divides(key, text_heads, w, "model.text.hidden");
                }
                if let Some(ff) = p.text_feedforward {
                    c.in_range("text_feedforward", ff, 1, limits::WIDTH);
                }
            });
            if self.transformer.builtin().is_none() {
                c.fail_rule(
                    "transformer",
                    "the feature enhancer's image layers are shaped like the `detr` transformer's",
                );
            }
        }
        let seed_queries = matches!(
            (self.detector.builtin(), self.query_generator.builtin()),
            (Some(DetectorConfig::Decoder(_)), Some(QueryGeneratorConfig::Seed(_)))
        );
        if self.text_attention == TextAttention::SubSentence && seed_queries {
            c.fail_rule(
                "text_attention",
                "with sub-sentences [CLS] attends to itself alone, so the pooled sentence the \
                 `seed` query generator reads carries no text: use query_generator = \
                 \"text-attend\" or \"learned\", or text_attention = \"sentence\"",
            );
        }
        let token_head = matches!(self.head.builtin(), Some(HeadConfig::Token(_)));
        if let Some(HeadConfig::Class(p)) = self.head.builtin() {
            c.within("head", |c| c.in_range("num_classes", p.num_classes, 1, limits::CLASSES));
        }
        match self.detector.builtin() {
            Some(DetectorConfig::Dense(p)) => c.section("detector", p),
            Some(DetectorConfig::QuerySelection(p)) => {
                c.section("detector", p);
                if self.transformer.builtin().is_none() {
                    c.fail_rule(
                        "transformer",
                        "query selection runs the `detr` transformer's decoder layers",
                    );
                }
            }
            Some(DetectorConfig::Decoder(_)) | None => {}
        }
        let predicts_tokens = matches!(
            self.detector.builtin(),
            Some(DetectorConfig::Dense(_) | DetectorConfig::QuerySelection(_))
        );
        if predicts_tokens && !token_head && self.head.builtin().is_some() {
            c.fail_rule(
                "head",
                format!(
                    "the {} detector predicts token logits: set model.head.type = \"token\"",
                    self.detector.kind()
                ),
            );
        }
        let decodes = matches!(
            self.detector.builtin(),
            Some(DetectorConfig::Decoder(_) | DetectorConfig::QuerySelection(_))
        );
        if let (true, Some(TransformerSlot::Detr(t))) = (decodes, self.transformer.builtin()) {
            if t.num_decoder_layers == 0 {
                c.fail(
                    "transformer.num_decoder_layers",
                    0,
                    format!(
                        "the {} detector decodes its queries: give one layer or more",
                        self.detector.kind()
                    ),
                );
            }
        }
        for (prefix, file) in &self.weights {
            let key = weights_key(prefix);
            let what = format!("a .safetensors or .pth checkpoint; {WEIGHTS_HINT}");
            file_exists(c, key.strip_prefix("model.").unwrap_or(&key), file, &what);
        }
    }
}

/// A bi-attention's `heads` and `embed` (within `model.fusion`): `heads` divides the attention's
/// width, `embed` or else the transformer's `d_model`.
fn bi_attention_width(c: &mut Checker, heads: usize, embed: Option<usize>, d_model: usize) {
    c.in_range("heads", heads, 1, limits::HEADS);
    match embed {
        Some(e) => {
            c.in_range("embed", e, 1, limits::WIDTH);
            c.divides("heads", heads, e, "model.fusion.embed");
        }
        None => c.divides("heads", heads, d_model, "model.transformer.d_model"),
    }
}

/// Where the files that configs name as weights come from.
pub(crate) const WEIGHTS_HINT: &str = "`cargo xtask fixtures` writes the fixtures' files, such \
    as fixtures/mobilenet_v2; `cargo xtask fetch-models` fetches the pretrained models";

/// The key of `model.weights` entry `prefix` (`model.weights.""` for the whole model).
pub(crate) fn weights_key(prefix: &str) -> String {
    if prefix.is_empty() {
        "model.weights.\"\"".into()
    } else {
        format!("model.weights.{prefix}")
    }
}

impl Validate for CriterionConfig {
    fn validate(&self, c: &mut Checker) {
        c.section("dense", &self.dense);
        self.weights.validate(c);
    }
}

impl Validate for OptimConfig {
    fn validate(&self, c: &mut Checker) {
        for (k, v) in
            [("lr", self.lr), ("backbone_lr", self.backbone_lr), ("text_lr", self.text_lr)]
        {
            c.finite_range(k, v, 0.0, 10.0);
        }
        c.finite_range("weight_decay", self.weight_decay, 0.0, 10.0);
        let (b1, b2) = self.betas;
        for (i, b) in [b1, b2].into_iter().enumerate() {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                c.fail(&format!("betas[{i}]"), b, "must be a finite number in [0, 1)");
            }
        }
        c.finite_above("eps", self.eps, 0.0, 1.0);
        c.in_range("warmup_steps", self.warmup_steps, 0, 1 << 40);
        c.within("schedule", |c| match &self.schedule {
            Schedule::Constant => {}
            Schedule::Step { every, gamma } => {
                c.in_range("every", *every, 1, 1 << 40);
                c.finite_range("gamma", *gamma, 0.0, 1e3);
            }
            Schedule::MultiStep { milestones, gamma } => {
                if milestones.is_empty() {
                    c.fail_rule("milestones", "must name at least one step");
                }
                for (i, &m) in milestones.iter().enumerate() {
                    c.in_range(&format!("milestones[{i}]"), m, 1, 1 << 40);
                    if i > 0 && m <= milestones[i - 1] {
                        c.fail(
                            &format!("milestones[{i}]"),
                            m,
                            format!("must be after milestones[{}] = {}", i - 1, milestones[i - 1]),
                        );
                    }
                }
                c.finite_range("gamma", *gamma, 0.0, 1e3);
            }
            Schedule::Cosine { total, min_ratio } => {
                c.in_range("total", *total, 1, 1 << 40);
                c.probability("min_ratio", *min_ratio);
            }
        });
        c.finite_range("clip_norm", self.clip_norm, 0.0, 1e12);
        if let Some(e) = self.ema_decay {
            if !(e.is_finite() && (0.0..1.0).contains(&e)) {
                c.fail("ema_decay", e, "must be a finite number in [0, 1)");
            }
        }
    }
}

impl Validate for TrainConfig {
    fn validate(&self, c: &mut Checker) {
        c.in_range("steps", self.steps, 1, 1 << 40);
        c.in_range("log_every", self.log_every, 1, 1 << 40);
        c.in_range("accumulate", self.accumulate, 1, limits::ACCUMULATE);
    }
}

impl Validate for RunConfig {
    fn validate(&self, c: &mut Checker) {
        self.train.validate(c);
        if let Some(b) = self.time_budget_min {
            c.finite_above_f64("time_budget_min", b, 0.0, 1e9);
        }
    }
}

impl Validate for DataConfig {
    fn validate(&self, c: &mut Checker) {
        c.in_range("batch_size", self.batch_size, 1, limits::BATCH);
        c.in_range("prefetch", self.prefetch, 0, limits::PREFETCH);
        c.section("transforms", &self.transforms);
        c.section("prompts", &self.prompts);
        if let Some(o) = &self.odvg {
            c.within("odvg", |c| {
                if self.coco.is_some() {
                    c.fail_rule("", "train on data.coco or on data.odvg, not both");
                }
                file_exists(c, "train", &o.train, "ODVG jsonl");
                dir_exists(c, "train_images", &o.train_images, "the training images");
                if let Some(lm) = &o.label_map {
                    file_exists(c, "label_map", lm, "a json object from label to name");
                }
                file_exists(c, "val_annotations", &o.val_annotations, "COCO json");
                dir_exists(c, "val_images", &o.val_images, "the validation images");
            });
        }
        for (i, m) in self.mix.iter().enumerate() {
            c.within(&format!("mix[{i}]"), |c| {
                match (&m.odvg, &m.coco) {
                    (Some(o), None) => file_exists(c, "odvg", o, "ODVG jsonl"),
                    (None, Some(a)) => file_exists(c, "coco", a, "COCO json"),
                    _ => c.fail_rule("", "give `odvg` (ODVG jsonl) or `coco` (COCO json): one"),
                }
                dir_exists(c, "images", &m.images, "the records' images");
                if let Some(lm) = &m.label_map {
                    file_exists(c, "label_map", lm, "a json object from label to name");
                    if m.coco.is_some() {
                        c.fail_rule("label_map", "is for ODVG records: COCO names its categories");
                    }
                }
                c.in_range("repeat", m.repeat, 1, limits::REPEAT);
            });
        }
        if let Some(g) = &self.val_grounding {
            c.within("val_grounding", |c| {
                file_exists(c, "odvg", &g.odvg, "ODVG jsonl with grounding records");
                dir_exists(c, "images", &g.images, "the captions' images");
            });
        }
        match &self.coco {
            Some(coco) => c.within("coco", |c| {
                file_exists(c, "train_annotations", &coco.train_annotations, "COCO json");
                dir_exists(c, "train_images", &coco.train_images, "the training images");
                file_exists(c, "val_annotations", &coco.val_annotations, "COCO json");
                dir_exists(c, "val_images", &coco.val_images, "the validation images");
            }),
            None if self.odvg.is_some() => {}
            None => {
                c.section("shapes", &self.shapes);
                let train = self.shapes.train_images;
                if self.train_subset.is_none() && train < self.batch_size {
                    c.fail(
                        "shapes.train_images",
                        train,
                        format!(
                            "must hold at least one batch (data.batch_size = {})",
                            self.batch_size
                        ),
                    );
                }
                if !self.eval_on_train {
                    c.at_least("shapes.val_images", self.shapes.val_images, 1);
                }
            }
        }
        if self.eval_on_train && (self.coco.is_some() || self.odvg.is_some()) {
            c.fail_rule(
                "eval_on_train",
                "applies to the synthetic task: a run on files evaluates on the validation split it names (name the training annotations there to evaluate on them)",
            );
        }
        if let Some(n) = self.train_subset {
            c.ensure(
                n >= self.batch_size,
                "train_subset",
                n,
                format!("must hold at least one batch (data.batch_size = {})", self.batch_size),
            );
            if self.coco.is_none() && self.odvg.is_none() && n > self.shapes.train_images {
                c.fail(
                    "train_subset",
                    n,
                    format!("is more than data.shapes.train_images = {}", self.shapes.train_images),
                );
            }
        }
    }
}

/// The categories of the synthetic task (for a fixed-class head's size).
fn shapes_categories(d: &DataConfig) -> usize {
    d.shapes.shapes.len() * d.shapes.colours.len()
}

impl Validate for ExperimentConfig {
    fn validate(&self, c: &mut Checker) {
        c.section("model", &self.model);
        c.section("data", &self.data);
        c.section("loss", &self.loss);
        c.section("optim", &self.optim);
        c.section("run", &self.run);
        if let Some(p) = &self.post {
            c.section("post", p);
        }
        if self.model.tokenizer().is_none() && self.model.text.builtin().is_some() {
            c.fail_rule("model.text.tokenizer", "training needs a tokenizer (a tokenizer.json)");
        }
        if let (Some(HeadConfig::Class(_)), Some(_)) = (self.model.head.builtin(), &self.data.odvg)
        {
            c.fail_rule(
                "model.head",
                "a fixed-class head needs a class for every box; ODVG's grounding records have phrases, not classes: use the token head (type = \"token\")",
            );
        }
        if let (Some(HeadConfig::Class(_)), false) =
            (self.model.head.builtin(), self.data.mix.is_empty())
        {
            c.fail_rule(
                "data.mix",
                "mixing sources needs the token head (type = \"token\"): a fixed-class head's classes are one dataset's categories, and grounding records have phrases, not classes",
            );
        }
        if let (Some(HeadConfig::Class(_)), Some(_)) =
            (self.model.head.builtin(), &self.data.val_grounding)
        {
            c.fail_rule(
                "data.val_grounding",
                "grounding a caption's phrases needs the token head (type = \"token\"): a fixed-class head labels boxes with classes, not phrases",
            );
        }
        let separator = &self.data.prompts.separator;
        if self.model.text_attention == TextAttention::SubSentence
            && !separator.contains(['.', '?'])
        {
            c.fail(
                "data.prompts.separator",
                format!("{separator:?}"),
                "with model.text_attention = \"sub-sentence\" a prompt's sub-sentences end at \
                 \".\" or \"?\" (Grounding DINO's rule): this separator would leave the \
                 categories one sub-sentence; use \". \"",
            );
        }
        let synthetic = self.data.coco.is_none() && self.data.odvg.is_none();
        if let (Some(HeadConfig::Class(p)), true) = (self.model.head.builtin(), synthetic) {
            let n = shapes_categories(&self.data);
            if p.num_classes < n {
                c.fail(
                    "model.head.num_classes",
                    p.num_classes,
                    format!(
                        "must be at least the synthetic task's {n} categories (colours x shapes)"
                    ),
                );
            }
        }
        let dense = matches!(self.model.detector.builtin(), Some(DetectorConfig::Dense(_)));
        match self.loss.criterion.as_ref().and_then(Slot::builtin) {
            Some(CriterionKind::Dense(_)) if !dense && self.model.detector.builtin().is_some() => c.fail_rule(
                "loss.criterion",
                "the dense criterion assigns locations of a dense head: use model.detector.type = \"dense\"",
            ),
            Some(CriterionKind::Set(_)) if dense => c.fail_rule(
                "loss.criterion",
                "the set criterion matches queries; a dense head has none: use \"dense\" (or leave it out)",
            ),
            _ => {}
        }
        // Only when every size is in range: the floor multiplies them.
        if c.is_ok() {
            check_memory(self, c);
        }
    }
}

/// Checks `cfg` as a whole; every problem, each naming its key.
pub fn validate(cfg: &(impl Validate + ?Sized)) -> Result<(), Problems> {
    let mut c = Checker::new();
    cfg.validate(&mut c);
    c.finish()
}

/// A lower bound of what a training step of `cfg` holds in memory, in bytes: the parameters with
/// their gradients and Adam's two moments (and the EMA), the input batch, the backbone's first
/// feature map, and the encoder's attention probabilities (kept for the backward pass). Each term
/// is something the step cannot do without; the real peak is higher. Parameters counted are the
/// backbone's (as built) and the weight matrices of the transformer, the inline BERT, the fusion
/// and the input projections, no bias or norm, so the count never exceeds the built model's.
/// Built-in components only (a registered one counts as nothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryFloor {
    /// Parameters counted.
    pub parameters: u64,
    /// Bytes of parameters, gradients and optimiser state.
    pub state_bytes: f64,
    /// Bytes of the activations counted.
    pub activation_bytes: f64,
}

impl MemoryFloor {
    /// Of `cfg`'s built-in components.
    pub fn of(cfg: &ExperimentConfig) -> Self {
        let m = &cfg.model;
        let f = |x: usize| x as f64;
        // Backbone parameters as built (glip inspect), per stage count: ResNet-18 for 18 and 34,
        // ResNet-50 for 50 and 101 (the deeper ones hold more); MobileNetV2's features.
        let (backbone_params, channels, strides, stem): (f64, &[usize], &[usize], f64) = match m
            .backbone
            .builtin()
        {
            Some(BackboneConfig::Resnet(p)) => {
                let (counts, ch): ([f64; 4], &[usize]) = match p.depth {
                    18 | 34 => {
                        ([157_504.0, 683_072.0, 2_782_784.0, 11_176_512.0], &[64, 128, 256, 512])
                    }
                    _ => (
                        [225_344.0, 1_444_928.0, 8_543_296.0, 23_508_032.0],
                        &[256, 512, 1024, 2048],
                    ),
                };
                let k = p.stages.clamp(1, 4);
                (counts[k - 1], &ch[..k], &[4, 8, 16, 32][..k], 64.0)
            }
            Some(BackboneConfig::MobilenetV2(_)) => (2.2e6, &[32, 96, 1280], &[8, 16, 32], 32.0),
            None => (0.0, &[], &[], 0.0),
        };
        let levels: Vec<usize> = match (&m.feature_levels, m.feature_level) {
            (Some(ls), _) => ls.clone(),
            (None, Some(l)) => vec![l],
            (None, None) => channels.len().checked_sub(1).into_iter().collect(),
        };
        let levels: Vec<usize> = levels.into_iter().filter(|&l| l < channels.len()).collect();
        let (d, ff, enc, dec, heads) = match m.transformer.builtin() {
            Some(TransformerSlot::Detr(t)) => (
                f(t.d_model),
                f(t.dim_feedforward),
                f(t.num_encoder_layers),
                f(t.num_decoder_layers),
                f(t.nhead),
            ),
            None => (0.0, 0.0, 0.0, 0.0, 0.0),
        };
        // An encoder layer's weight matrices, and whether its attention keeps a (tokens x tokens)
        // score matrix per head: a deformable one has value and output projections and its
        // offset and weight predictions (3 numbers per head, level and point), and keeps a few
        // numbers per token, head, level and point, nothing quadratic.
        let (encoder_layer, quadratic) = match m.transformer.builtin() {
            Some(TransformerSlot::Detr(t))
                if t.encoder_attention == glip_transformer::EncoderAttentionKind::Deformable =>
            {
                let samples = heads * f(levels.len().max(1)) * f(t.encoder_points);
                (2.0 * d * d + 3.0 * d * samples + 2.0 * d * ff, 0.0)
            }
            _ => (4.0 * d * d + 2.0 * d * ff, 1.0),
        };
        let decoder = !matches!(m.detector.builtin(), Some(DetectorConfig::Dense(_)));
        let transformer =
            enc * encoder_layer + if decoder { dec * (8.0 * d * d + 2.0 * d * ff) } else { 0.0 };
        let (text, t) = match m.text.builtin() {
            Some(TextConfig::Bert(p)) if p.folder.is_none() => {
                let h = f(p.hidden.unwrap_or(0));
                let i = p.intermediate.map_or(2.0 * h, f);
                let vocab = f(p.vocab_size.unwrap_or(0));
                (h * (vocab + 514.0) + f(p.layers.unwrap_or(0)) * (4.0 * h * h + 2.0 * h * i), h)
            }
            _ => (0.0, 0.0),
        };
        // The feature enhancer's layers: bi-attention, the text's self-attention and
        // feed-forward, an image encoder layer (whose attention is counted with the encoder's).
        let (fusion, enhancer_layers) = match m.fusion.builtin() {
            Some(FusionConfig::BiAttention(p)) => (3.0 * p.embed.map_or(d, f) * (d + t), 0.0),
            Some(FusionConfig::FeatureEnhancer(p)) => {
                let tff = p.text_feedforward.map_or((ff / 2.0).floor().max(1.0), f);
                let layer = 3.0 * p.embed.map_or(d, f) * (d + t)
                    + 4.0 * t * t
                    + 2.0 * t * tff
                    + encoder_layer;
                (f(p.layers) * layer, f(p.layers))
            }
            _ => (0.0, 0.0),
        };
        let proj: f64 = levels.iter().map(|&l| f(channels[l]) * d).sum();
        let queries = match (m.detector.builtin(), m.query_generator.builtin()) {
            (Some(DetectorConfig::Decoder(_)), Some(QueryGeneratorConfig::Learned(_))) => {
                f(m.num_queries) * d
            }
            _ => 0.0,
        };
        let parameters = backbone_params + transformer + text + fusion + proj + queries;
        let per_param = if cfg.optim.ema_decay.is_some() { 20.0 } else { 16.0 };

        let files = cfg.data.coco.is_some() || cfg.data.odvg.is_some();
        let side = match (files, cfg.data.transforms.shorter_side.iter().max()) {
            (_, Some(&s)) => f(s as usize),
            (false, None) => f(cfg.data.shapes.image_size as usize),
            (true, None) => 0.0, // unresized images: their sizes are in the files
        };
        let b = f(cfg.data.batch_size);
        let tokens: f64 = levels.iter().map(|&l| (side / f(strides[l])).powi(2)).sum();
        let activations = 4.0
            * b
            * (3.0 * side * side
                + stem * (side / 2.0).powi(2)
                + quadratic * (enc + enhancer_layers) * heads * tokens * tokens);
        Self {
            parameters: parameters as u64,
            state_bytes: parameters * per_param,
            activation_bytes: activations,
        }
    }

    /// Bytes in all.
    pub fn bytes(&self) -> f64 {
        self.state_bytes + self.activation_bytes
    }
}

/// Memory this process may still use: the least of the machine's available memory
/// (`MemAvailable`) and its cgroup's limit, where the system says (Linux).
pub fn available_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut avail = kb * 1024.0;
    if let Ok(max) = std::fs::read_to_string("/sys/fs/cgroup/memory.max") {
        if let Ok(limit) = max.trim().parse::<f64>() {
            let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
                .ok()
                .and_then(|u| u.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            avail = avail.min(limit - used);
        }
    }
    Some(avail)
}

/// A run on the CPU whose memory floor is over what the machine has: an allocation would fail
/// part-way (and a failed allocation aborts the process), so it is refused up front, naming what
/// takes the memory.
pub fn check_memory(cfg: &ExperimentConfig, c: &mut Checker) {
    let on_cpu = match cfg.run.device {
        crate::device::DeviceSpec::Cpu => true,
        crate::device::DeviceSpec::Auto => !crate::device::cuda_built(),
        crate::device::DeviceSpec::Cuda(_) => false,
    };
    let Some(avail) = available_memory().filter(|_| on_cpu) else { return };
    let floor = MemoryFloor::of(cfg);
    if floor.bytes() <= avail {
        return;
    }
    let gib = |b: f64| format!("{:.1} GiB", b / f64::from(1u32 << 30));
    let rule = format!(
        "this run needs at least {} ({} for {} parameters with their gradients and optimiser \
         state, {} for a batch's first activations), more than the {} available",
        gib(floor.bytes()),
        gib(floor.state_bytes),
        floor.parameters,
        gib(floor.activation_bytes),
        gib(avail)
    );
    if floor.state_bytes >= floor.activation_bytes {
        c.fail_rule("model", format!("{rule}: make the model smaller"));
    } else {
        c.fail(
            "data.batch_size",
            cfg.data.batch_size,
            format!("{rule}: lower the batch size or the image size"),
        );
    }
}
