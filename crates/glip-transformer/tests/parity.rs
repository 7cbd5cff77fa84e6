//! The transformer crate's modules against the PyTorch reference (`reference/glip_ref.py`,
//! fixtures written by `cargo xtask fixtures`), at the fixture README's tolerances: forward
//! outputs `1e-4 + 1e-3 |b|` elementwise, gradients `1e-3 max|b| + 1e-5`.

use candle_core::{DType, Result, Tensor, Var};
use glip_testing::{assert_forward_close, assert_grad_close, fresh_vars, load};
use glip_transformer::{DecoderLayer, DecoderMemory, TransformerConfig};

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
    {
        // Every parameter the layer made comes from the reference, and every reference weight
        // has its parameter: the names are Grounding DINO's and torch's.
        let vars = varmap.data().lock().expect("varmap lock");
        let mut ours: Vec<&String> = vars.keys().collect();
        let mut theirs: Vec<&String> = weights.keys().collect();
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs, "parameter names");
        for (name, var) in vars.iter() {
            var.set(&weights[name].to_dtype(DType::F32)?)?;
        }
    }
    let x = Var::from_tensor(&io["x"])?;
    let text = Var::from_tensor(&io["text"])?;
    let mem = DecoderMemory {
        text: Some((text.as_tensor(), &io["text_mask"])),
        ..DecoderMemory::image(&io["memory"], Some(&io["memory_mask"]), Some(&io["pos"]))
    };
    let out = layer.forward(x.as_tensor(), Some(&io["qpos"]), &mem, None, true)?;
    assert_forward_close("out", &out, &io["out"])?;
    let grads = (&out * &io["out_weight"])?.sum_all()?.backward()?;
    let grad = |t: &Tensor, name: &str| -> Result<()> {
        let g = grads.get(t).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_grad_close(&format!("grad.{name}"), g, &io[&format!("grad.{name}")])
    };
    grad(x.as_tensor(), "x")?;
    grad(text.as_tensor(), "text")?;
    let vars = varmap.data().lock().expect("varmap lock");
    let mut checked = 0;
    for key in io.keys() {
        if let Some(name) = key.strip_prefix("grad.").filter(|n| !["x", "text"].contains(n)) {
            grad(vars[name].as_tensor(), name)?;
            checked += 1;
        }
    }
    assert_eq!(checked, 9, "the fixture's parameter gradients");
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
