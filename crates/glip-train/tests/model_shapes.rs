//! The assembled model: output shapes for any batch, image size, token and query count, and
//! text padding that changes nothing real.

use candle_core::{Device, Tensor};
use glip_backbone::ResNetDepth;
use glip_core::{ImageBatch, TextBatch};
use glip_testing::{assert_close, fresh_vars};
use glip_text::BertConfig;
use glip_train::seed::{build_seed, SeedHead, SeedSpec};
use glip_transformer::TransformerConfig;
use proptest::prelude::*;

fn text(ids: Vec<u32>, b: usize, t: usize, real: usize) -> TextBatch {
    let mask: Vec<u8> = (0..b * t).map(|i| ((i % t) < real) as u8).collect();
    TextBatch::new(
        Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap(),
        vec![vec![(0, 0); t]; b],
        vec![String::new(); b],
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]
    #[test]
    fn seed_model_shapes_and_text_padding(b in 1usize..3, h in 33usize..80, w in 33usize..80, t in 2usize..9, q in 1usize..8, token in any::<bool>()) {
        let (_vm, vb) = fresh_vars();
        let spec = SeedSpec {
            backbone: ResNetDepth::Resnet18,
            bert: BertConfig::tiny(60, 16, 1, 2),
            transformer: TransformerConfig::new(16, 2, 1, 2, 32),
            num_queries: q,
            head: if token { SeedHead::Token } else { SeedHead::Class(3) },
        };
        let model = build_seed(&spec, 2, vb).unwrap();
        let images = ImageBatch::unpadded(Tensor::randn(0f32, 1.0, (b, 3, h, w), &Device::Cpu).unwrap()).unwrap();
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 60) as u32).collect();
        let out = model.forward(&images, &text(ids.clone(), b, t, t), false).unwrap();
        let c = if token { t } else { 4 };
        prop_assert_eq!(out.pred.pred_boxes.dims(), &[b, q, 4]);
        prop_assert_eq!(out.pred.pred_logits.dims(), &[b, q, c]);
        prop_assert_eq!(out.hs.dims(), &[b, q, 16]);
        // Pad the text by 3 tokens: boxes and real-token logits are unchanged.
        let mut padded = Vec::new();
        for r in ids.chunks(t) { padded.extend_from_slice(r); padded.extend_from_slice(&[5, 6, 7]); }
        let outp = model.forward(&images, &text(padded, b, t + 3, t), false).unwrap();
        assert_close("boxes", &outp.pred.pred_boxes, &out.pred.pred_boxes, 1e-5, 1e-4).unwrap();
        let lp = if token { outp.pred.pred_logits.narrow(2, 0, t).unwrap() } else { outp.pred.pred_logits.clone() };
        assert_close("logits", &lp, &out.pred.pred_logits, 1e-4, 1e-4).unwrap();
    }
}
