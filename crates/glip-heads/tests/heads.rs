//! Heads: gradients, shapes, text padding, post-processing.

use candle_core::{DType, Device, Result, Tensor};
use glip_core::{BoxHead, ClassHead, TextFeatures};
use glip_heads::postprocess::{
    class_scores, detections, token_scores, PostProcessConfig, TokenReduce,
};
use glip_heads::{FixedClassHead, LinearBoxHead, MlpBoxHead, TokenAlignmentHead};
use glip_testing::{assert_close, assert_every_parameter_learns, fresh_vars, probe_loss};
use proptest::prelude::*;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn text(b: usize, t: usize, dt: usize) -> TextFeatures {
    TextFeatures::new(
        randn(&[b, t, dt]),
        None,
        Tensor::ones((b, t), DType::U8, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

#[test]
fn every_head_parameter_learns() -> Result<()> {
    let hs = randn(&[2, 5, 16]);
    let tf = text(2, 7, 12);
    let (vm, vb) = fresh_vars();
    let heads: (LinearBoxHead, MlpBoxHead, FixedClassHead, TokenAlignmentHead) = (
        LinearBoxHead::new(16, vb.pp("bbox_pred"))?,
        MlpBoxHead::new(16, vb.pp("bbox_embed"))?,
        FixedClassHead::new(16, 3, vb.pp("class_pred"))?,
        TokenAlignmentHead::new(12, 16, vb.pp("token_head"))?,
    );
    let loss = (((probe_loss(&heads.0.forward(&hs)?)? + probe_loss(&heads.1.forward(&hs)?)?)?
        + probe_loss(&heads.2.forward(&hs, &tf)?)?)?
        + probe_loss(&heads.3.forward(&hs, &tf)?)?)?;
    assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn head_shapes_and_token_padding(b in 1usize..4, q in 1usize..9, t in 1usize..10, extra in 1usize..4) {
        let (_vm, vb) = fresh_vars();
        let bh = MlpBoxHead::new(16, vb.pp("b")).unwrap();
        let th = TokenAlignmentHead::new(12, 16, vb.pp("t")).unwrap();
        let hs = randn(&[b, q, 16]);
        let boxes = bh.forward(&hs).unwrap();
        prop_assert_eq!(boxes.dims(), &[b, q, 4]);
        let v: Vec<f32> = boxes.flatten_all().unwrap().to_vec1().unwrap();
        prop_assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        let tf = text(b, t, 12);
        let l = th.forward(&hs, &tf).unwrap();
        prop_assert_eq!(l.dims(), &[b, q, t]);
        let padded = TextFeatures::new(Tensor::cat(&[&tf.tokens, &randn(&[b, extra, 12])], 1).unwrap(), None,
            Tensor::cat(&[tf.mask.clone(), Tensor::zeros((b, extra), DType::U8, &Device::Cpu).unwrap()], 1).unwrap()).unwrap();
        let lp = th.forward(&hs, &padded).unwrap();
        assert_close("token logits at real tokens", &lp.narrow(2, 0, t).unwrap(), &l, 1e-6, 1e-5).unwrap();
    }
}

#[test]
fn token_scores_average_or_max_over_the_category_tokens() -> Result<()> {
    // logits chosen so sigmoid gives 0.5, ~0.881, ~0.119
    let logits = Tensor::new(&[[0f32, 2.0, -2.0]], &Device::Cpu)?;
    let pm = Tensor::new(&[[1f32, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
    let s = |x: f32| 1.0 / (1.0 + (-x).exp());
    let mean: Vec<f32> = token_scores(&logits, &pm, TokenReduce::Mean)?.squeeze(0)?.to_vec1()?;
    let want = [(s(0.0) + s(2.0)) / 2.0, (s(2.0) + s(-2.0)) / 2.0, 0.0];
    assert!(mean.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{mean:?}");
    let max: Vec<f32> = token_scores(&logits, &pm, TokenReduce::Max)?.squeeze(0)?.to_vec1()?;
    assert!((max[0] - s(2.0)).abs() < 1e-6 && (max[1] - s(2.0)).abs() < 1e-6 && max[2] == 0.0);
    Ok(())
}

#[test]
fn detections_threshold_topk_nms_and_pixels() -> Result<()> {
    // Three queries, two categories. Queries 0 and 1 overlap heavily.
    let boxes = Tensor::new(
        &[[0.5f32, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]],
        &Device::Cpu,
    )?;
    let scores = Tensor::new(&[[0.9f32, 0.1], [0.8, 0.05], [0.3, 0.6]], &Device::Cpu)?;
    let cfg = PostProcessConfig { score_threshold: 0.2, ..Default::default() };
    let d = detections(&scores, &boxes, 200.0, 100.0, &cfg)?;
    assert_eq!(
        d.iter().map(|x| (x.category, x.score)).collect::<Vec<_>>(),
        vec![(0, 0.9), (0, 0.8), (1, 0.6), (0, 0.3)]
    );
    assert!(
        d[0].bbox.iter().zip([80.0, 40.0, 120.0, 60.0]).all(|(a, b)| (a - b).abs() < 1e-4),
        "{:?}",
        d[0].bbox
    );
    let nms = PostProcessConfig { nms_iou: Some(0.5), top_k: 2, ..cfg };
    let d = detections(&scores, &boxes, 200.0, 100.0, &nms)?;
    assert_eq!(
        d.iter().map(|x| (x.category, x.score)).collect::<Vec<_>>(),
        vec![(0, 0.9), (1, 0.6)]
    );
    // The fixed-class head drops the no-object column.
    let cs = class_scores(&Tensor::new(&[[0f32, 0.0, 0.0, 0.0]], &Device::Cpu)?)?;
    assert_eq!(cs.dims(), &[1, 3]);
    Ok(())
}
