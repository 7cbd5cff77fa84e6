//! The whole seed model against `seed-tiny/io` (`SeedGLIP` in `reference/glip_ref.py`, eval mode),
//! at the fixture README's forward tolerance `|a - b| <= 1e-4 + 1e-3 * |b|`.

use candle_core::{DType, Result, Tensor};
use glip_backbone::ResNetDepth;
use glip_core::{weights, ImageBatch, TextBatch};
use glip_testing::{assert_forward_close, fixture, load};
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
    let dev = glip_testing::device();
    let io = load("seed-tiny/io.safetensors", &dev)?;
    let (images, text) = inputs(&io)?;
    for (name, head) in [("class", SeedHead::Class(5)), ("token", SeedHead::Token)] {
        let vb = weights::open(&fixture("seed-tiny/model.safetensors"), DType::F32, &dev)?;
        let model = build_seed(&spec(head), 5, vb)?;
        let out = model.forward(&images, &text, false)?;
        assert_forward_close(
            &format!("{name}.memory"),
            &out.memory,
            &io[&format!("{name}.memory")],
        )?;
        assert_forward_close(&format!("{name}.hs"), &out.hs, &io[&format!("{name}.hs")])?;
        assert_forward_close(
            &format!("{name}.pred_boxes"),
            &out.pred.pred_boxes,
            &io[&format!("{name}.pred_boxes")],
        )?;
        assert_forward_close(
            &format!("{name}.pred_logits"),
            &out.pred.pred_logits,
            &io[&format!("{name}.pred_logits")],
        )?;
    }
    Ok(())
}

fn targets(io: &HashMap<String, Tensor>) -> Result<Vec<glip_core::Target>> {
    (0..3)
        .map(|b| {
            glip_core::Target::new(
                io[&format!("target{b}.boxes")].clone(),
                Some(io[&format!("target{b}.labels")].clone()),
                Some(io[&format!("target{b}.positive_map")].clone()),
            )
        })
        .collect()
}

/// Losses, matches and gradients of `class_criterion` / `token_criterion` after backward through
/// the whole model (backbone unfrozen, so `backbone.conv1.weight` needs the stem max-pool's
/// backward). Losses at `1e-3` relative, gradients at `1e-3 * max|b| + 1e-5` (fixture README).
#[test]
fn seed_tiny_losses_matches_and_gradients_match_reference() -> Result<()> {
    use glip_core::Criterion;
    use glip_loss::{HungarianMatcher, LossConfig, SetCriterion};
    use glip_testing::assert_grad_close;
    let dev = glip_testing::device();
    let io = load("seed-tiny/io.safetensors", &dev)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("seed-tiny/io.json")).unwrap())
            .unwrap();
    let (images, text) = inputs(&io)?;
    let targets = targets(&io)?;
    for (name, head) in [("class", SeedHead::Class(5)), ("token", SeedHead::Token)] {
        let varmap = candle_nn::VarMap::new();
        let file = weights::open(&fixture("seed-tiny/model.safetensors"), DType::F32, &dev)?;
        let vb = weights::trainable(
            &varmap,
            vec![weights::Source {
                prefix: String::new(),
                weights: file,
                origin: "seed-tiny".into(),
            }],
            0,
            DType::F32,
            &dev,
        );
        let model = build_seed(&spec(head), 0, vb)?;
        let out = model.forward(&images, &text, false)?;
        let cfg = if name == "class" { LossConfig::detr() } else { LossConfig::default() };
        let losses = SetCriterion::new(cfg, Box::new(HungarianMatcher)).forward(&out, &targets)?;
        let class_term = if name == "class" { "loss_ce" } else { "loss_cls" };
        for (term, value) in
            losses.terms.iter().chain(std::iter::once(&("loss".to_string(), losses.total.clone())))
        {
            assert!(
                [class_term, "loss_bbox", "loss_giou", "loss"].contains(&term.as_str()),
                "{term}"
            );
            glip_testing::assert_close(
                &format!("{name}.{term}"),
                value,
                &io[&format!("{name}.{term}")],
                0.0,
                1e-3,
            )?;
        }
        for (b, m) in losses.matches.iter().enumerate() {
            let q: Vec<i64> = io[&format!("{name}.match{b}.query")].to_vec1()?;
            let t: Vec<i64> = io[&format!("{name}.match{b}.target")].to_vec1()?;
            assert_eq!(
                m.query.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                q,
                "{name} match {b} queries"
            );
            assert_eq!(
                m.target.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                t,
                "{name} match {b} targets"
            );
        }
        let grads = losses.total.backward()?;
        let vars = varmap.data().lock().unwrap();
        let names = meta[format!("{name}.grads")].as_array().unwrap();
        assert!(names.len() >= 12);
        for p in names {
            let p = p.as_str().unwrap();
            let var = vars.get(p).unwrap_or_else(|| panic!("no parameter {p}"));
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient reached {p}"));
            assert_grad_close(&format!("{name}.grad.{p}"), g, &io[&format!("{name}.grad.{p}")])?;
        }
    }
    Ok(())
}
