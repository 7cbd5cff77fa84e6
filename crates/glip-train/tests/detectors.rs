//! The dense head and language-guided query selection assembled into models: output shapes for
//! any batch, image size, prompt length and levels, and every trainable parameter receiving a
//! gradient through the criterion each trains with. The text encoder is wider (24) than the
//! transformer (16), as a pretrained one would be.

use candle_core::{DType, Device, Tensor};
use glip_core::{ImageBatch, Target, TextBatch};
use glip_testing::assert_every_parameter_learns;
use glip_train::config::{
    CriterionConfig, ModelConfig, Registry, Slot, TextAttention, TransformerSlot,
};
use glip_transformer::EncoderAttentionKind;
use proptest::prelude::*;

fn config(detector: &str, fusion: &str, levels: &str, fpn: bool, extra: &str) -> ModelConfig {
    try_config(detector, fusion, levels, fpn, extra).unwrap()
}

fn try_config(
    detector: &str,
    fusion: &str,
    levels: &str,
    fpn: bool,
    extra: &str,
) -> Result<ModelConfig, toml::de::Error> {
    toml::from_str(&config_text(detector, fusion, levels, fpn, extra))
}

fn config_text(detector: &str, fusion: &str, levels: &str, fpn: bool, extra: &str) -> String {
    let tok = glip_testing::fixture("bert-tiny/tokenizer.json");
    format!(
        r#"
num_queries = 6
position_encoding = true
aux_loss = true
feature_levels = {levels}
fpn = {fpn}
[backbone]
type = "resnet"
depth = 18
freeze_at = 0
trainable_bn = true
stages = 3
[text]
tokenizer = "{}"
hidden = 24
layers = 1
heads = 2
[transformer]
d_model = 16
nhead = 2
num_encoder_layers = 1
num_decoder_layers = 2
dim_feedforward = 32
[fusion]
{fusion}
[detector]
{detector}
{extra}
[head]
type = "token"
"#,
        tok.display()
    )
}

/// `b` captions of `t` tokens: `[CLS]`, then phrases of a word and its `.` (`"x. x."`, the
/// tokens' spans in it: sub-sentences of two tokens), `[SEP]`.
fn text(b: usize, t: usize) -> TextBatch {
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 60) as u32 + 1).collect();
    let real = t.saturating_sub(2);
    let mut spans: Vec<(usize, usize)> =
        (0..real).map(|j| (3 * (j / 2) + j % 2, 3 * (j / 2) + j % 2 + 1)).collect();
    spans.insert(0, (0, 0));
    spans.resize(t, (0, 0));
    let caption = "x. ".repeat(real.div_ceil(2));
    TextBatch::new(
        Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        Tensor::ones((b, t), DType::U8, &Device::Cpu).unwrap(),
        vec![spans; b],
        vec![caption; b],
    )
    .unwrap()
}

const DENSE: &str = r#"type = "dense""#;
const QSEL: &str = r#"type = "query-selection""#;
const BI: &str = "type = \"bi-attention\"\nheads = 2";
const NONE: &str = r#"type = "none""#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]
    #[test]
    fn dense_and_query_selection_shapes(b in 1usize..3, h in 33usize..90, w in 33usize..90, t in 2usize..8, dense in any::<bool>(), bi in any::<bool>(), two_levels in any::<bool>(), fpn in any::<bool>(), deformable in any::<bool>()) {
        let levels = if two_levels { "[1, 2]" } else { "[2]" };
        let extra = if deformable && !dense { "image_attention = \"deformable\"" } else { "" };
        let cfg = config(if dense { DENSE } else { QSEL }, if bi { BI } else { NONE }, levels, fpn, extra);
        let vm = candle_nn::VarMap::new();
        let model = Registry::new().build_trainable(&cfg, &vm, 0, &Device::Cpu).unwrap();
        let images = ImageBatch::unpadded(Tensor::randn(0f32, 1.0, (b, 3, h, w), &Device::Cpu).unwrap()).unwrap();
        let out = model.forward(&images, &text(b, t), false).unwrap();
        // C3 and C4 of a ResNet: ceil(h / 8) and ceil(h / 16) for these sizes.
        let cells = |s: usize| h.div_ceil(s) * w.div_ceil(s);
        let s = if two_levels { cells(8) + cells(16) } else { cells(16) };
        let q = if dense { s } else { 6.min(s) };
        prop_assert_eq!(out.pred.pred_boxes.dims(), &[b, q, 4]);
        prop_assert_eq!(out.pred.pred_logits.dims(), &[b, q, t]);
        prop_assert_eq!(out.memory.dims(), &[b, s, 16]);
        prop_assert_eq!(out.dense().is_some(), dense);
        // Query selection: the selection's prediction and the first decoder layer's.
        prop_assert_eq!(out.aux.len(), if dense { 0 } else { 2 });
        prop_assert_eq!(model.detector.default_nms().is_some(), dense);
        let bx: Vec<f32> = out.pred.pred_boxes.flatten_all().unwrap().to_vec1().unwrap();
        prop_assert!(bx.iter().all(|v| v.is_finite()));
        if !dense {
            prop_assert!(bx.iter().all(|&v| (0.0..=1.0).contains(&v)), "refined boxes are sigmoids");
        }
    }
}

fn targets(b: usize, t: usize) -> Vec<Target> {
    let dev = Device::Cpu;
    (0..b)
        .map(|i| {
            let boxes =
                Tensor::new(&[[0.3f32, 0.4, 0.3, 0.4], [0.7, 0.6, 0.4, 0.3]], &dev).unwrap();
            let pm: Vec<f32> =
                (0..2 * t).map(|k| (k % t == 1 + (k / t + i) % (t - 1)) as u8 as f32).collect();
            Target::new(boxes, None, Some(Tensor::from_vec(pm, (2, t), &dev).unwrap())).unwrap()
        })
        .collect()
}

/// A model of `config(detector, fusion, [1, 2] with an FPN, extra)` and a batch of 2 random
/// 64 x 64 images.
fn model_and_images(
    detector: &str,
    fusion: &str,
    extra: &str,
) -> (ModelConfig, candle_nn::VarMap, glip_train::GlipModel, ImageBatch) {
    model_and_images_of(config(detector, fusion, "[1, 2]", true, extra))
}

/// A model of `cfg` and a batch of 2 random 64 x 64 images.
fn model_and_images_of(
    cfg: ModelConfig,
) -> (ModelConfig, candle_nn::VarMap, glip_train::GlipModel, ImageBatch) {
    let vm = candle_nn::VarMap::new();
    let model = Registry::new().build_trainable(&cfg, &vm, 0, &Device::Cpu).unwrap();
    let images =
        ImageBatch::unpadded(Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap())
            .unwrap();
    (cfg, vm, model, images)
}

fn every_parameter_learns(detector: &str, fusion: &str, extra: &str, loss: &str) {
    every_parameter_of_learns(config(detector, fusion, "[1, 2]", true, extra), loss);
}

/// `cfg` with Deformable DETR's encoder (2 points per head and level).
fn with_deformable_encoder(mut cfg: ModelConfig) -> ModelConfig {
    let Slot::Builtin(TransformerSlot::Detr(tc)) = &mut cfg.transformer else {
        panic!("the built-in transformer")
    };
    tc.encoder_attention = EncoderAttentionKind::Deformable;
    tc.encoder_points = 2;
    cfg
}

fn every_parameter_of_learns(cfg: ModelConfig, loss: &str) {
    let (cfg, vm, model, images) = model_and_images_of(cfg);
    // A new deformable encoder's offsets and attention weights are constant in their queries
    // (zero matrices, Deformable DETR's initialisation), so at the first step no gradient
    // reaches the queries' positions (the level embedding, in the dense design): checked as
    // after a first update, which moves them off zero.
    for (name, var) in vm.data().lock().unwrap().iter() {
        let encoder =
            name.starts_with("transformer.encoder.layers.") || name.starts_with("fusion.layers.");
        let deformable = encoder
            && (name.ends_with("self_attn.sampling_offsets.weight")
                || name.ends_with("self_attn.attention_weights.weight"));
        if deformable {
            let moved =
                (Tensor::randn(0f32, 1.0, var.dims(), &Device::Cpu).unwrap() * 0.01).unwrap();
            var.set(&moved).unwrap();
        }
    }
    let (b, t) = (2, 6);
    let targets = targets(b, t);
    let out = model.forward_train(&images, &text(b, t), &targets).unwrap();
    let lc: CriterionConfig = toml::from_str(loss).unwrap();
    let crit = Registry::new().build_criterion(&lc, &cfg, &model, &Device::Cpu).unwrap();
    let l = crit.forward(&out, &targets).unwrap();
    let grads = l.total.backward().unwrap();
    // BERT's pooler feeds only query generators that read the pooled sentence (the seed's);
    // these detectors use the token features alone.
    let unused = |n: &str| glip_train::trainer::is_buffer(n) || n.starts_with("text.pooler.");
    assert_every_parameter_learns(&vm, &grads, unused).unwrap();
}

#[test]
fn every_parameter_of_a_dense_model_learns_through_the_fcos_criterion() {
    every_parameter_learns(r#"type = "dense""#, BI, "tower = 1\ncenterness = true", "");
}

#[test]
fn every_parameter_of_a_dense_model_learns_through_the_atss_criterion() {
    every_parameter_learns(DENSE, NONE, "", "[dense]\nassign = \"atss\"\natss_anchor_scale = 4.0");
}

#[test]
fn every_parameter_of_a_query_selection_model_learns_through_the_hungarian_criterion() {
    every_parameter_learns(QSEL, BI, "", "");
}

#[test]
fn every_parameter_of_a_query_selection_model_with_denoising_learns() {
    every_parameter_learns(QSEL, BI, "denoising = { groups = 2 }", "");
}

/// DINO's mixed query selection: learned content (`tgt_embed`) at the selected boxes, with and
/// without denoising queries beside it.
#[test]
fn every_parameter_of_a_query_selection_model_with_learned_content_learns() {
    every_parameter_learns(QSEL, NONE, "content = \"learned\"", "");
    every_parameter_learns(QSEL, BI, "content = \"learned\"\ndenoising = { groups = 2 }", "");
}

/// Grounding DINO's decoder with deformable image attention in every layer (`cross_attn`),
/// alone and with text cross-attention, denoising queries and look forward twice beside it.
#[test]
fn every_parameter_of_a_query_selection_model_with_deformable_attention_learns() {
    every_parameter_learns(QSEL, NONE, "image_attention = \"deformable\"", "");
    let extra = "image_attention = \"deformable\"\ndeformable_points = 2\n\
                 text_cross_attention = true\nlook_forward_twice = true\ndenoising = { groups = 2 }";
    every_parameter_learns(QSEL, BI, extra, "");
}

/// Deformable DETR's encoder (every token samples around its own centre on both levels) under
/// GLIP's dense head, and under query selection with Grounding DINO's whole decoder (deformable
/// image attention, text cross-attention, denoising, look forward twice).
#[test]
fn every_parameter_of_a_model_with_a_deformable_encoder_learns() {
    every_parameter_of_learns(with_deformable_encoder(config(DENSE, BI, "[1, 2]", true, "")), "");
    let extra = "image_attention = \"deformable\"\ntext_cross_attention = true\n\
                 look_forward_twice = true\ndenoising = { groups = 2 }";
    every_parameter_of_learns(with_deformable_encoder(config(QSEL, BI, "[1, 2]", true, extra)), "");
}

/// `cfg` with no image-only encoder layer and the given encoder attention: Grounding DINO's
/// arrangement, where the feature enhancer's layers are the encoder.
fn enhancer_only(mut cfg: ModelConfig, attention: EncoderAttentionKind) -> ModelConfig {
    let Slot::Builtin(TransformerSlot::Detr(tc)) = &mut cfg.transformer else {
        panic!("the built-in transformer")
    };
    tc.num_encoder_layers = 0;
    tc.encoder_attention = attention;
    tc.encoder_points = 2;
    cfg
}

/// Grounding DINO's feature enhancer (two layers of bi-attention, the text's self-attention and
/// the image's encoder layer) in place of the encoder: with global image layers under GLIP's
/// dense head, with deformable ones under query selection with Grounding DINO's decoder, and
/// after an image-only encoder layer.
#[test]
fn every_parameter_of_a_model_with_a_feature_enhancer_learns() {
    let enhancer = "type = \"feature-enhancer\"\nlayers = 2\nheads = 2\ntext_feedforward = 16";
    let global = EncoderAttentionKind::Global;
    every_parameter_of_learns(
        enhancer_only(config(DENSE, enhancer, "[1, 2]", true, ""), global),
        "",
    );
    let extra = "image_attention = \"deformable\"\ntext_cross_attention = true";
    let cfg = config(QSEL, enhancer, "[1, 2]", true, extra);
    every_parameter_of_learns(enhancer_only(cfg.clone(), EncoderAttentionKind::Deformable), "");
    every_parameter_learns(DENSE, "type = \"feature-enhancer\"\nheads = 2", "", "");
    // With Grounding DINO's sub-sentences (phrases of two tokens) in BERT and the text layers.
    let sub = ModelConfig { text_attention: TextAttention::SubSentence, ..cfg };
    let batch = text(2, 6);
    assert_eq!(
        batch.sub_sentences(&Device::Cpu).unwrap().starts.to_vec2::<u32>().unwrap()[0],
        [0, 1, 1, 3, 3, 5]
    );
    every_parameter_of_learns(enhancer_only(sub, EncoderAttentionKind::Deformable), "");
}

/// DINO's denoising queries in a training step: `(b, groups 2 m, .)` predictions for every
/// decoder layer, their positives matched to their targets; none in inference or without
/// targets. Two steps whose targets differ (other boxes and phrases, so other denoising
/// queries) but whose seeded stream is the same (the same dropout masks) give the selected
/// queries' predictions equal bit for bit: the attention mask gives every denoising query
/// exactly zero weight in a selected query's attention (`exp` of `f32::MIN` plus a score
/// underflows to 0), so nothing of them reaches the matched predictions.
#[test]
fn denoising_queries_leave_the_selected_queries_as_they_are() {
    let (_, _vm, model, images) = model_and_images(QSEL, BI, "denoising = { groups = 3 }");
    let (b, t) = (2, 6);
    let text = text(b, t);
    let first = targets(b, t);
    // The same counts, other boxes and phrases.
    let second: Vec<Target> = first
        .iter()
        .map(|tg| {
            let boxes = Tensor::new(&[[0.5f32, 0.5, 0.2, 0.6], [0.2, 0.3, 0.3, 0.3]], &Device::Cpu)
                .unwrap();
            let pm = tg.positive_map.as_ref().unwrap().flip(&[0]).unwrap();
            Target::new(boxes, None, Some(pm)).unwrap()
        })
        .collect();
    let run = |targets: &[Target]| {
        glip_kernels::nn::seed_dropout(42);
        model.forward_train(&images, &text, targets).unwrap()
    };
    let (a, c) = (run(&first), run(&second));
    let bits = |x: &Tensor| -> Vec<u32> {
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    };
    for (pa, pc) in std::iter::once((&a.pred, &c.pred)).chain(a.aux.iter().zip(&c.aux)) {
        assert_eq!(bits(&pa.pred_boxes), bits(&pc.pred_boxes), "selected queries' boxes");
        assert_eq!(bits(&pa.pred_logits), bits(&pc.pred_logits), "selected queries' logits");
    }
    let (da, dc) = (
        a.extensions.get::<glip_core::DenoisingOutput>().expect("denoising output"),
        c.extensions.get::<glip_core::DenoisingOutput>().expect("denoising output"),
    );
    // Two layers (auxiliary outputs on), 3 groups of 2 m = 4 queries.
    assert_eq!(da.preds.len(), 2);
    assert_eq!(da.preds[1].pred_boxes.dims(), &[b, 12, 4]);
    assert_eq!(da.preds[1].pred_logits.dims(), &[b, 12, t]);
    assert_eq!(da.groups, 3);
    for m in &da.matches {
        assert_eq!(m.query, vec![0, 1, 4, 5, 8, 9]);
        assert_eq!(m.target, vec![0, 1, 0, 1, 0, 1]);
    }
    assert_ne!(bits(&da.preds[1].pred_boxes), bits(&dc.preds[1].pred_boxes), "their own queries");
    let inference = model.forward(&images, &text, false).unwrap();
    assert!(inference.extensions.get::<glip_core::DenoisingOutput>().is_none());
    let untargeted = model.forward(&images, &text, true).unwrap();
    assert!(untargeted.extensions.get::<glip_core::DenoisingOutput>().is_none());
    assert_eq!(untargeted.pred.pred_boxes.dims(), a.pred.pred_boxes.dims());
}

#[test]
fn detectors_that_predict_tokens_refuse_a_fixed_class_head() {
    let mut cfg = config(DENSE, NONE, "[1, 2]", false, "");
    cfg.head =
        glip_train::config::HeadConfig::Class(glip_train::config::ClassParams { num_classes: 3 })
            .into();
    let vm = candle_nn::VarMap::new();
    let e = Registry::new().build_trainable(&cfg, &vm, 0, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.head.type"), "{e}");
    let e = try_config("type = \"dense\"\ntowr = 1", NONE, "[1, 2]", false, "")
        .unwrap_err()
        .to_string();
    assert!(e.contains("towr"), "{e}");
}

/// Grounding DINO's text cross-attention in every decoder layer (`ca_text`, `catext_norm`,
/// `text_proj`), alone and with denoising queries and learned content.
#[test]
fn every_parameter_of_a_query_selection_model_with_text_cross_attention_learns() {
    every_parameter_learns(QSEL, BI, "text_cross_attention = true", "");
    let extra = "text_cross_attention = true\ncontent = \"learned\"\ndenoising = { groups = 2 }";
    every_parameter_learns(QSEL, NONE, extra, "");
}

/// DINO's look forward twice changes gradients only: with the same weights and dropout masks a
/// training step predicts the same boxes and logits bit for bit on every layer, and the set
/// criterion's gradients are bit for bit the same for every parameter its extra path cannot
/// reach (the last decoder layer's own, the selection heads', which the detached first reference
/// keeps out) and differ for the layer before the last and the shared box refinement. With one
/// decoder layer there is no layer before, and every gradient is the same.
#[test]
fn look_forward_twice_changes_the_gradients_it_should_and_no_value() {
    for layers in [2, 1] {
        let step = |lft: bool| {
            let doc = config_text(QSEL, BI, "[1, 2]", true, &format!("look_forward_twice = {lft}"))
                .replace("num_decoder_layers = 2", &format!("num_decoder_layers = {layers}"));
            let cfg: ModelConfig = toml::from_str(&doc).unwrap();
            let vm = candle_nn::VarMap::new();
            let model = Registry::new().build_trainable(&cfg, &vm, 0, &Device::Cpu).unwrap();
            let images = ImageBatch::unpadded(
                Tensor::arange(0f32, (2 * 3 * 64 * 64) as f32, &Device::Cpu)
                    .unwrap()
                    .affine(1e-4, -0.5)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .reshape((2, 3, 64, 64))
                    .unwrap(),
            )
            .unwrap();
            let (b, t) = (2, 6);
            let targets = targets(b, t);
            glip_kernels::nn::seed_dropout(7);
            let out = model.forward_train(&images, &text(b, t), &targets).unwrap();
            let crit = Registry::new()
                .build_criterion(&toml::from_str("").unwrap(), &cfg, &model, &Device::Cpu)
                .unwrap();
            let grads = crit.forward(&out, &targets).unwrap().total.backward().unwrap();
            let bits = |x: &Tensor| -> Vec<u32> {
                let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|v| v.to_bits()).collect()
            };
            let preds: Vec<Vec<u32>> = std::iter::once(&out.pred)
                .chain(&out.aux)
                .flat_map(|p| [bits(&p.pred_boxes), bits(&p.pred_logits)])
                .collect();
            let vars = vm.data().lock().unwrap();
            let grads: std::collections::BTreeMap<String, Vec<u32>> = vars
                .iter()
                .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), bits(g))))
                .collect();
            (preds, grads)
        };
        let (plain, lft) = (step(false), step(true));
        assert_eq!(plain.0, lft.0, "{layers} layers: the same predictions");
        assert_eq!(plain.1.keys().collect::<Vec<_>>(), lft.1.keys().collect::<Vec<_>>());
        let differs = |n: &str| plain.1[n] != lft.1[n];
        let (mut same, mut other) = (0, 0);
        for name in plain.1.keys() {
            // The extra path runs from the last layer's boxes into the first layer's refined
            // boxes and from there back through everything that made them (the first layer,
            // the shared refinement, the encoder, the backbone, ...): only the last layer, the
            // selection heads (whose boxes and features enter the decoder detached) and the
            // token head (the logits do not change) are out of its reach.
            let last = format!("decoder.layers.{}.", layers - 1);
            let out_of_reach = layers == 1
                || name.contains(&last)
                || name.contains(".enc_")
                || name.contains("token_head");
            if out_of_reach {
                assert!(!differs(name), "{layers} layers: {name}'s gradient changed");
                same += 1;
            } else if name.contains("decoder.layers.0.") || name.contains(".bbox_embed.") {
                other += usize::from(differs(name));
            }
        }
        assert!(same > 0, "the unreachable parameters were found");
        if layers == 2 {
            assert!(other > 0, "look forward twice reached the layer before");
        }
    }
}
