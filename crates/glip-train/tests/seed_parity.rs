//! The whole seed model against `seed-tiny/io` (`SeedGLIP` in `glip_reference.py`, eval mode),
//! at the fixture README's forward tolerance `|a - b| <= 1e-4 + 1e-3 * |b|`.

use candle_core::{DType, Device, Result, Tensor};
use glip_backbone::ResNetDepth;
use glip_core::testing::{assert_forward_close, fixture, load};
use glip_core::{weights, ImageBatch, TextBatch};
use glip_text::BertConfig;
use glip_train::seed::{build_seed, SeedHead, SeedSpec};
use glip_transformer::TransformerConfig;
use std::collections::HashMap;

fn spec(head: SeedHead) -> SeedSpec {
    SeedSpec {
        backbone: ResNetDepth::Resnet18,
        bert: BertConfig::from_file(&fixture("bert-tiny/config.json")).unwrap(),
        transformer: TransformerConfig::new(64, 4, 2, 2, 128),
        num_queries: 10,
        head,
    }
}

fn inputs(io: &HashMap<String, Tensor>) -> Result<(ImageBatch, TextBatch)> {
    let ids = io["input_ids"].to_dtype(DType::U32)?;
    let mask = io["attention_mask"].to_dtype(DType::U8)?;
    let (b, t) = ids.dims2()?;
    let text = TextBatch::new(ids, mask, vec![vec![(0, 0); t]; b], vec![String::new(); b])?;
    Ok((ImageBatch::unpadded(io["images"].clone())?, text))
}

#[test]
fn seed_tiny_forward_matches_reference_for_both_heads() -> Result<()> {
    let dev = Device::Cpu;
    let io = load("seed-tiny/io.safetensors", &dev)?;
    let (images, text) = inputs(&io)?;
    for (name, head) in [("class", SeedHead::Class(5)), ("token", SeedHead::Token)] {
        let vb = weights::open(&fixture("seed-tiny/model.safetensors"), DType::F32, &dev)?;
        let model = build_seed(&spec(head), 5, vb)?;
        let out = model.forward(&images, &text, false)?;
        assert_forward_close(&format!("{name}.memory"), &out.memory, &io[&format!("{name}.memory")])?;
        assert_forward_close(&format!("{name}.hs"), &out.hs, &io[&format!("{name}.hs")])?;
        assert_forward_close(&format!("{name}.pred_boxes"), &out.pred.pred_boxes, &io[&format!("{name}.pred_boxes")])?;
        assert_forward_close(&format!("{name}.pred_logits"), &out.pred.pred_logits, &io[&format!("{name}.pred_logits")])?;
    }
    Ok(())
}
