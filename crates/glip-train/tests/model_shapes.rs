//! The assembled model: output shapes for any batch, image size, token and query count, and
//! text padding that changes nothing real.

use candle_core::{DType, Device, Tensor};
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

/// The model over a backbone with bf16 activations (forced on the CPU, as a bf16 autocast on
/// CUDA runs it): the projection reads the bf16 level and its output is cast to f32, so the
/// outputs are f32 and finite, they differ from the f32 model's (bf16 did run), and the
/// gradients reach the projection's weight and bias, and the trainable convolutions, in f32.
#[test]
fn the_model_over_bf16_activations_is_f32_after_the_projection_and_learns() {
    let (vm, vb) = fresh_vars();
    let spec = SeedSpec {
        backbone: ResNetDepth::Resnet18,
        bert: BertConfig::tiny(60, 16, 1, 2),
        transformer: TransformerConfig::new(16, 2, 1, 2, 32),
        num_queries: 3,
        head: SeedHead::Class(3),
    };
    let model = build_seed(&spec, 2, vb).unwrap();
    let images =
        ImageBatch::unpadded(Tensor::randn(0f32, 1.0, (2, 3, 48, 40), &Device::Cpu).unwrap())
            .unwrap();
    let ids: Vec<u32> = (0..8).map(|i| (i * 7 % 60) as u32).collect();
    let txt = text(ids, 2, 4, 4);
    let f32_out = model.forward(&images, &txt, true).unwrap();
    let out =
        glip_kernels::bf16::with_bf16_activations(|| model.forward(&images, &txt, true)).unwrap();
    for (name, t) in [("boxes", &out.pred.pred_boxes), ("logits", &out.pred.pred_logits)] {
        assert_eq!(t.dtype(), DType::F32, "{name}");
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}: {v:?}");
    }
    let diff = (&out.pred.pred_logits - &f32_out.pred.pred_logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0, "the bf16 data flow gave the f32 model's logits bit for bit");
    let loss = (out.pred.pred_logits.sqr().unwrap().sum_all().unwrap()
        + out.pred.pred_boxes.sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars = vm.data().lock().unwrap();
    for name in ["input_proj.weight", "input_proj.bias", "backbone.layer4.1.conv2.weight"] {
        let g = grads.get(vars[name].as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_eq!(g.dtype(), DType::F32, "{name}");
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: gradient norm {norm}");
    }
}
