//! The transformer crate's modules against the PyTorch reference (`reference/glip_ref.py`,
//! fixtures written by `cargo xtask fixtures`), at the fixture README's tolerances: forward
//! outputs `1e-4 + 1e-3 |b|` elementwise, gradients `1e-3 max|b| + 1e-5`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;
use glip_core::LevelShape;
use glip_core::{Fusion, TokenLayout};
use glip_testing::{assert_forward_close, assert_grad_close, fresh_vars, load};
use glip_transformer::{
    text_sine_positions, BiAttentionFusion, DecoderLayer, DecoderLayerOptions, DecoderMemory,
    DeformableAttention, EncoderAttentionKind, EncoderLayer, EncoderLevels, FeatureEnhancer,
    FeatureEnhancerConfig, FusionResidual, Reference, SamplingLevels, TransformerConfig,
};
use std::collections::HashMap;

/// Sets every parameter of `varmap` to the fixture's weight of its name, after checking that
/// the two name the same parameters (the names are the reference's: Grounding DINO's, Deformable
/// DETR's, torch's).
fn set_weights(varmap: &VarMap, weights: &HashMap<String, Tensor>) -> Result<()> {
    let vars = varmap.data().lock().expect("varmap lock");
    let mut ours: Vec<&String> = vars.keys().collect();
    let mut theirs: Vec<&String> = weights.keys().collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "parameter names");
    for (name, var) in vars.iter() {
        var.set(&weights[name].to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// The gradients of `inputs` (tensor, fixture name) and of every parameter the fixture has one
/// for (`grad.<name>` for a name not among the inputs) against the fixture's; returns how many
/// parameters were checked.
fn check_grads(
    io: &HashMap<String, Tensor>,
    grads: &GradStore,
    inputs: &[(&Tensor, &str)],
    varmap: &VarMap,
) -> Result<usize> {
    let grad = |t: &Tensor, name: &str| -> Result<()> {
        let g = grads.get(t).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_grad_close(&format!("grad.{name}"), g, &io[&format!("grad.{name}")])
    };
    for (t, name) in inputs {
        grad(t, name)?;
    }
    let vars = varmap.data().lock().expect("varmap lock");
    let mut checked = 0;
    for key in io.keys() {
        let name = key.strip_prefix("grad.").filter(|n| !inputs.iter().any(|(_, i)| i == n));
        if let Some(name) = name {
            grad(vars[name].as_tensor(), name)?;
            checked += 1;
        }
    }
    Ok(checked)
}

/// Grounding DINO's decoder layer (`GroundingDecoderLayer`: self-attention, text
/// cross-attention, image cross-attention, FFN, post-norm) with padded image and text tokens:
/// the output, and the gradients of `sum(out * out_weight)` for the queries, the text and nine
/// parameters (the text cross-attention's among them).
#[test]
fn grounding_decoder_layer_matches_reference() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("grounding-decoder-layer/io.safetensors", &dev)?;
    let weights = load("grounding-decoder-layer/model.safetensors", &dev)?;
    let cfg = TransformerConfig { dropout: 0.0, ..TransformerConfig::new(32, 4, 0, 1, 64) };
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = DecoderLayer::with_text_attention(&cfg, vb)?;
    assert!(layer.has_text_attention());
    set_weights(&varmap, &weights)?;
    let x = Var::from_tensor(&io["x"])?;
    let text = Var::from_tensor(&io["text"])?;
    let mem = DecoderMemory {
        text: Some((text.as_tensor(), &io["text_mask"])),
        ..DecoderMemory::image(&io["memory"], Some(&io["memory_mask"]), Some(&io["pos"]))
    };
    let out = layer.forward(x.as_tensor(), Some(&io["qpos"]), &mem, None, true)?;
    assert_forward_close("out", &out, &io["out"])?;
    let grads = (&out * &io["out_weight"])?.sum_all()?.backward()?;
    let inputs = [(x.as_tensor(), "x"), (text.as_tensor(), "text")];
    assert_eq!(check_grads(&io, &grads, &inputs, &varmap)?, 9, "the fixture's parameter gradients");
    Ok(())
}

/// A layer with text cross-attention refuses to run without the text rather than skip it.
#[test]
fn text_attention_without_text_is_an_error() -> Result<()> {
    let cfg = TransformerConfig::new(16, 2, 0, 1, 32);
    let (_, vb) = fresh_vars();
    let layer = DecoderLayer::with_text_attention(&cfg, vb)?;
    let dev = candle_core::Device::Cpu;
    let x = Tensor::zeros((1, 3, 16), DType::F32, &dev)?;
    let memory = Tensor::zeros((1, 4, 16), DType::F32, &dev)?;
    let err = layer
        .forward(&x, None, &DecoderMemory::image(&memory, None, None), None, false)
        .unwrap_err();
    assert!(err.to_string().contains("no text"), "{err}");
    Ok(())
}

/// The two levels of the deformable-attention fixture (`SHAPES` in make_fixtures.py).
const DEFORMABLE_LEVELS: [LevelShape; 2] =
    [LevelShape { h: 4, w: 5, stride: 8 }, LevelShape { h: 2, w: 3, stride: 16 }];

/// Deformable DETR's multi-scale deformable attention with box references
/// (`DeformableAttention`, which samples with `F.grid_sample`; ours gathers): 2 levels of 4 x 5
/// and 2 x 3 tokens, 4 heads, 3 points, 2 x 5 queries, the second image smaller than the first
/// (its padded tokens masked), samples inside and outside the levels. The output, and the
/// gradients of `sum(out * out_weight)` for the queries, the boxes, the values and all eight
/// parameters; a new module's offsets' bias is the reference's initialisation.
#[test]
fn deformable_attention_matches_reference() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("deformable-attention/io.safetensors", &dev)?;
    let weights = load("deformable-attention/model.safetensors", &dev)?;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let attn = DeformableAttention::new(32, 4, 2, 3, vb)?;
    {
        let vars = varmap.data().lock().expect("varmap lock");
        // Deformable DETR's rays (cos and sin of 2 pi h / 4 over the larger of their
        // magnitudes, times the point's number): the same f32 arithmetic on both sides.
        let init = &io["init.sampling_offsets.bias"];
        assert_forward_close(
            "init.sampling_offsets.bias",
            vars["sampling_offsets.bias"].as_tensor(),
            init,
        )?;
    }
    set_weights(&varmap, &weights)?;
    let sizes = image_sizes(&io["image_sizes"])?;
    let at = SamplingLevels::new(&DEFORMABLE_LEVELS, &sizes, &dev)?;
    let query = Var::from_tensor(&io["query"])?;
    let boxes = Var::from_tensor(&io["boxes"])?;
    let value = Var::from_tensor(&io["value"])?;
    let out = attn.forward(
        query.as_tensor(),
        Reference::Boxes(boxes.as_tensor()),
        value.as_tensor(),
        Some(&io["value_mask"]),
        &at,
    )?;
    assert_forward_close("out", &out, &io["out"])?;
    let grads = (&out * &io["out_weight"])?.sum_all()?.backward()?;
    let inputs =
        [(query.as_tensor(), "query"), (boxes.as_tensor(), "boxes"), (value.as_tensor(), "value")];
    // All eight of the module's parameters.
    assert_eq!(check_grads(&io, &grads, &inputs, &varmap)?, 8, "the module's parameters");
    Ok(())
}

/// A deformable layer refuses to run without reference boxes or levels rather than fall back
/// to attending everywhere; its image attention's parameters are `cross_attn.*` (Grounding
/// DINO's name) in place of `multihead_attn.*`.
#[test]
fn deformable_layer_needs_boxes_and_levels() -> Result<()> {
    let cfg = TransformerConfig::new(16, 2, 0, 1, 32);
    let (varmap, vb) = fresh_vars();
    let options = DecoderLayerOptions { deformable: Some((2, 4)), ..Default::default() };
    let layer = DecoderLayer::with_options(&cfg, options, vb)?;
    assert!(layer.is_deformable());
    {
        let vars = varmap.data().lock().expect("varmap lock");
        assert!(vars.contains_key("cross_attn.sampling_offsets.weight"));
        assert!(!vars.keys().any(|k| k.starts_with("multihead_attn")), "{:?}", vars.keys());
    }
    let dev = candle_core::Device::Cpu;
    let x = Tensor::zeros((1, 3, 16), DType::F32, &dev)?;
    let memory = Tensor::zeros((1, 20 + 6, 16), DType::F32, &dev)?;
    let boxes = Tensor::full(0.5f32, (1, 3, 4), &dev)?;
    let at = SamplingLevels::new(&DEFORMABLE_LEVELS, &[(40.0, 32.0)], &dev)?;
    let image = DecoderMemory::image(&memory, None, None);
    let err = layer.forward(&x, None, &image, None, false).unwrap_err();
    assert!(err.to_string().contains("reference boxes"), "{err}");
    let err = layer.forward_at(&x, None, Some(&boxes), &image, None, false).unwrap_err();
    assert!(err.to_string().contains("reference boxes"), "{err}");
    let with_levels = DecoderMemory { levels: Some(&at), ..image };
    let out = layer.forward_at(&x, None, Some(&boxes), &with_levels, None, false)?;
    assert_eq!(out.dims(), &[1, 3, 16]);
    // Levels that are not the memory's are an error, not a wrong gather.
    let short = Tensor::zeros((1, 20, 16), DType::F32, &dev)?;
    let wrong = DecoderMemory { levels: Some(&at), ..DecoderMemory::image(&short, None, None) };
    let err = layer.forward_at(&x, None, Some(&boxes), &wrong, None, false).unwrap_err();
    assert!(err.to_string().contains("levels"), "{err}");
    Ok(())
}

/// `(b, 2)` widths and heights as pairs.
fn image_sizes(t: &Tensor) -> Result<Vec<(f32, f32)>> {
    Ok(t.to_vec2::<f32>()?.iter().map(|s| (s[0], s[1])).collect())
}

/// Deformable DETR's encoder layer (`DeformableEncoderLayer`: every token samples from its own
/// centre, `token_centres`, then the FFN, post-norm) over the two levels and images of the
/// deformable-attention fixture, 2 points: the tokens' centres, the output, and the gradients
/// of `sum(out * out_weight)` for the tokens, their positions and eight parameters.
#[test]
fn deformable_encoder_layer_matches_reference() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("deformable-encoder-layer/io.safetensors", &dev)?;
    let weights = load("deformable-encoder-layer/model.safetensors", &dev)?;
    let cfg = TransformerConfig {
        dropout: 0.0,
        encoder_attention: EncoderAttentionKind::Deformable,
        encoder_points: 2,
        ..TransformerConfig::new(32, 4, 1, 0, 64)
    };
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = EncoderLayer::with_levels(&cfg, 2, vb)?;
    set_weights(&varmap, &weights)?;
    let sizes = image_sizes(&io["image_sizes"])?;
    let levels = SamplingLevels::new(&DEFORMABLE_LEVELS, &sizes, &dev)?;
    let centres = levels.token_centres().clone();
    assert_forward_close("centres", &centres, &io["centres"])?;
    let x = Var::from_tensor(&io["x"])?;
    let pos = Var::from_tensor(&io["pos"])?;
    let at = EncoderLevels { levels: &levels, centres: &centres };
    let out = layer.forward_at(
        x.as_tensor(),
        Some(&io["mask"]),
        Some(pos.as_tensor()),
        Some(at),
        true,
    )?;
    assert_forward_close("out", &out, &io["out"])?;
    let grads = (&out * &io["out_weight"])?.sum_all()?.backward()?;
    let inputs = [(x.as_tensor(), "x"), (pos.as_tensor(), "pos")];
    assert_eq!(check_grads(&io, &grads, &inputs, &varmap)?, 8, "the fixture's parameter gradients");
    // Without the levels a deformable layer is an error, not a global attention.
    let err = layer.forward(x.as_tensor(), Some(&io["mask"]), None, false).unwrap_err();
    assert!(err.to_string().contains("levels"), "{err}");
    Ok(())
}

/// The text of a fusion's output at its real tokens only (a padded token's features are free).
fn real_text(text: &Tensor, mask: &Tensor) -> Result<Tensor> {
    text.broadcast_mul(&mask.to_dtype(text.dtype())?.unsqueeze(2)?)
}

/// GLIP's and Grounding DINO's bidirectional image-text attention (`BiAttentionBlock`, image
/// width 32, text width 24, attention width 16 in 4 heads, random norms, biases and layer
/// scales) over the padded images of the deformable-attention fixture and 2 x 6 text tokens
/// (the second prompt with 3 padded), with the residual on the block's input (glip-rs's
/// `bi-attention` default) and on the normed features (theirs): both outputs, and the
/// gradients of `sum(image' * image_weight) + sum(text' * text_weight)` (the text weight zero
/// at padded tokens) for the image, the text and all eighteen parameters.
#[test]
fn bi_attention_matches_reference() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("bi-attention/io.safetensors", &dev)?;
    let weights = load("bi-attention/model.safetensors", &dev)?;
    for residual in [FusionResidual::Input, FusionResidual::Normed] {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let fusion = BiAttentionFusion::new(32, 24, 16, 4, 0.0, vb)?.with_residual(residual);
        set_weights(&varmap, &weights)?;
        let tag = match residual {
            FusionResidual::Input => "input",
            FusionResidual::Normed => "normed",
        };
        let image = Var::from_tensor(&io["image"])?;
        let text = Var::from_tensor(&io["text"])?;
        let text_mask = &io["text_mask"];
        let (v, l) = fusion.forward(
            image.as_tensor(),
            Some(&io["image_mask"]),
            text.as_tensor(),
            text_mask,
            true,
        )?;
        assert_forward_close(&format!("{tag}.out_image"), &v, &io[&format!("{tag}.out_image")])?;
        assert_forward_close(
            &format!("{tag}.out_text"),
            &real_text(&l, text_mask)?,
            &real_text(&io[&format!("{tag}.out_text")], text_mask)?,
        )?;
        let loss =
            ((&v * &io["image_weight"])?.sum_all()? + (&l * &io["text_weight"])?.sum_all()?)?;
        let grads = loss.backward()?;
        let prefix = format!("{tag}.");
        let io_tag: HashMap<String, Tensor> = io
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|k| (k.to_string(), t.clone())))
            .collect();
        let inputs = [(image.as_tensor(), "image"), (text.as_tensor(), "text")];
        assert_eq!(
            check_grads(&io_tag, &grads, &inputs, &varmap)?,
            18,
            "{tag}: parameter gradients"
        );
    }
    Ok(())
}

/// Grounding DINO's feature enhancer (`FeatureEnhancer`: 2 layers of bi-attention with the
/// residual on the normed features, the text's self-attention layer with `text_positions`, and
/// a deformable encoder layer; image width 32 in 4 heads, 2 points, FFN 64; text width 24 in 4
/// heads, FFN 48) over the padded images and levels of the deformable-attention fixture and the
/// text of the bi-attention fixture: the text positions, both outputs, and the gradients of
/// `sum(out * out_weight) + sum(out_text * text_weight)` for the image tokens, their positions,
/// the text and eleven parameters of every kind (both layers); then the same with the text in
/// sub-sentences (`starts`, `positions` of the reference's `FeatureEnhancer`). The fixture's
/// seed keeps every sampling location of both image layers 1e-4 or more from a grid line.
#[test]
fn feature_enhancer_matches_reference() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("feature-enhancer/io.safetensors", &dev)?;
    let weights = load("feature-enhancer/model.safetensors", &dev)?;
    let image_cfg = TransformerConfig {
        dropout: 0.0,
        encoder_attention: EncoderAttentionKind::Deformable,
        encoder_points: 2,
        ..TransformerConfig::new(32, 4, 0, 0, 64)
    };
    let config = FeatureEnhancerConfig {
        layers: 2,
        heads: 4,
        embed: None,
        text_heads: 4,
        text_feedforward: 48,
    };
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let enhancer = FeatureEnhancer::new(&image_cfg, 2, 24, &config, vb)?;
    set_weights(&varmap, &weights)?;
    assert_forward_close(
        "text_positions",
        &text_sine_positions(6, 24, 10000.0, &dev)?,
        &io["text_positions"],
    )?;
    let x = Var::from_tensor(&io["x"])?;
    let pos = Var::from_tensor(&io["pos"])?;
    let text = Var::from_tensor(&io["text"])?;
    let (mask, text_mask) = (&io["mask"], &io["text_mask"]);
    let sizes = image_sizes(&io["image_sizes"])?;
    let inputs = [(x.as_tensor(), "x"), (pos.as_tensor(), "pos"), (text.as_tensor(), "text")];
    // Both outputs (the text's real tokens) and the gradients against `want`'s; the text whole
    // or in `segments`.
    let check = |segments: Option<&glip_core::TextSegments>,
                 want: &HashMap<String, Tensor>,
                 what: &str|
     -> Result<()> {
        let layout = TokenLayout {
            pos: Some(pos.as_tensor()),
            levels: &DEFORMABLE_LEVELS,
            image_sizes: &sizes,
            text: segments,
        };
        let (out, out_text) = enhancer.forward_at(
            x.as_tensor(),
            Some(mask),
            layout,
            text.as_tensor(),
            text_mask,
            true,
        )?;
        assert_forward_close(&format!("{what}out"), &out, &want["out"])?;
        assert_forward_close(
            &format!("{what}out_text"),
            &real_text(&out_text, text_mask)?,
            &real_text(&want["out_text"], text_mask)?,
        )?;
        let loss = ((&out * &io["out_weight"])?.sum_all()?
            + (&out_text * &io["text_weight"])?.sum_all()?)?;
        let checked = check_grads(want, &loss.backward()?, &inputs, &varmap)?;
        assert_eq!(checked, 11, "{what}the fixture's parameter gradients");
        Ok(())
    };
    check(None, &io, "")?;
    // Deformable image layers without the tokens' levels are an error, not a global attention.
    let err = enhancer
        .forward(x.as_tensor(), Some(mask), text.as_tensor(), text_mask, false)
        .unwrap_err();
    assert!(err.to_string().contains("levels"), "{err}");
    // The same enhancer and inputs with the text in sub-sentences
    // (`feature-enhancer/sub-sentence.safetensors`: the text layers attend within each, the
    // text positions count from each one's start): outputs and the same gradients.
    let sub = load("feature-enhancer/sub-sentence.safetensors", &dev)?;
    let segments = glip_core::TextSegments::new(
        sub["positions"].to_dtype(DType::U32)?,
        sub["starts"].to_dtype(DType::U32)?,
    )?;
    check(Some(&segments), &sub, "sub-sentence ")?;
    Ok(())
}
