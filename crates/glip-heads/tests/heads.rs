//! Heads: gradients, shapes, text padding, post-processing.

use candle_core::{DType, Device, Result, Tensor};
use glip_core::boxes::Xyxy;
use glip_core::{BoxHead, ClassHead, TextFeatures};
use glip_heads::postprocess::{
    batch_detections, best_indices, class_scores, detections, nms, to_pixels, token_scores,
    Detection, PostProcessConfig, TokenReduce, PRE_NMS_TOP_N,
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

/// Scores with ties and non-finite values, from a few codes.
fn coded(codes: &[u8]) -> Vec<f32> {
    const TABLE: [f32; 7] = [f32::NAN, f32::NEG_INFINITY, 0.1, 0.5, 0.5, 0.9, f32::INFINITY];
    codes.iter().map(|&c| TABLE[c as usize % TABLE.len()]).collect()
}

/// The post-processing as first written (every candidate sorted, stably, best first; the
/// pre-NMS cut; NMS category by category), the reference the selection-based one must equal.
fn reference_detections(
    s: &[f32],
    c: usize,
    b: &[[f32; 4]],
    (width, height): (f32, f32),
    cfg: &PostProcessConfig,
) -> Vec<Detection> {
    let mut idx: Vec<usize> =
        (0..s.len()).filter(|&i| s[i] >= cfg.score_threshold && s[i].is_finite()).collect();
    idx.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    if cfg.nms_iou.is_some() {
        idx.truncate(PRE_NMS_TOP_N);
    }
    let dets = idx.iter().map(|&i| Detection {
        bbox: to_pixels(b[i / c], width, height),
        score: s[i],
        category: i % c,
    });
    let mut dets: Vec<Detection> = dets.collect();
    if let Some(thr) = cfg.nms_iou {
        let mut kept: Vec<Detection> = (0..c)
            .flat_map(|cat| {
                let of: Vec<&Detection> = dets.iter().filter(|d| d.category == cat).collect();
                let boxes: Vec<Xyxy> = of.iter().map(|d| d.bbox).collect();
                let scores: Vec<f32> = of.iter().map(|d| d.score).collect();
                nms(&boxes, &scores, thr).into_iter().map(move |k| of[k].clone())
            })
            .collect();
        kept.sort_by(|x, y| y.score.total_cmp(&x.score));
        dets = kept;
    }
    dets.truncate(cfg.top_k);
    dets
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The selection gives what a stable sort of every kept index, truncated, gives: the same
    /// indices in the same order, ties by index.
    #[test]
    fn best_indices_are_a_stable_sort_truncated(codes in prop::collection::vec(0u8..7, 0..80), k in 0usize..90) {
        let s = coded(&codes);
        let keep = |x: f32| x.is_finite() && x >= 0.2;
        let mut want: Vec<usize> = (0..s.len()).filter(|&i| keep(s[i])).collect();
        want.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
        want.truncate(k);
        prop_assert_eq!(best_indices(&s, k, keep), want);
    }

    /// A batch's detections, read from the device once, are each image's detections by the
    /// reference post-processing, exactly (the same f32 values, selected and converted alike).
    #[test]
    fn batch_detections_are_the_reference_per_image(
        b in 1usize..4,
        q in 1usize..30,
        c in 1usize..5,
        seed in 0u8..7,
        top_k in 1usize..40,
        thr in prop::sample::select(vec![0.0f32, 0.3]),
        nms_iou in prop::sample::select(vec![None, Some(0.5f32)]),
    ) {
        let codes: Vec<u8> = (0..b * q * c).map(|i| ((i * 5 + seed as usize * 3) % 11) as u8).collect();
        let s = coded(&codes);
        let boxes = Tensor::rand(0.05f32, 0.6, (b, q, 4), &Device::Cpu).unwrap();
        let scores = Tensor::from_vec(s.clone(), (b, q, c), &Device::Cpu).unwrap();
        let sizes: Vec<(f32, f32)> = (0..b).map(|i| (100.0 + 10.0 * i as f32, 80.0)).collect();
        let cfg = PostProcessConfig { top_k, score_threshold: thr, nms_iou, ..Default::default() };
        let got = batch_detections(&scores, &boxes, &sizes, &cfg).unwrap();
        let bx: Vec<Vec<Vec<f32>>> = boxes.to_vec3().unwrap();
        for i in 0..b {
            let rows: Vec<[f32; 4]> = bx[i].iter().map(|r| [r[0], r[1], r[2], r[3]]).collect();
            let want = reference_detections(&s[i * q * c..(i + 1) * q * c], c, &rows, sizes[i], &cfg);
            prop_assert_eq!(&got[i], &want);
            let one = detections(&scores.get(i).unwrap(), &boxes.get(i).unwrap(), sizes[i].0, sizes[i].1, &cfg).unwrap();
            prop_assert_eq!(&one, &want);
        }
    }
}

/// Token scores of a batch `(b, q, t)` are each image's `(q, t)` scores. The sigmoid is
/// elementwise, the same value of a logit in either shape. Max: exactly (a max of the same
/// products by 0 or 1). Mean: the same sums of at most `t` sigmoids in `[0, 1]`,
/// perhaps in another order inside the product, each within `t * 2^-24` (relative, f32
/// summation) of the exact mean, and one division: tolerance `2 * (t + 1) * 2^-24` absolute,
/// the means being at most 1.
#[test]
fn token_scores_of_a_batch_are_those_of_its_images() -> Result<()> {
    let (b, q, t) = (3, 7, 9);
    let logits = Tensor::randn(0f32, 3.0, (b, q, t), &Device::Cpu)?;
    let pm = Tensor::new(
        &[
            [1f32, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0; 9],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
        ],
        &Device::Cpu,
    )?;
    let tol = 2.0 * (t as f32 + 1.0) * 2f32.powi(-24);
    for reduce in [TokenReduce::Mean, TokenReduce::Max] {
        let all = token_scores(&logits, &pm, reduce)?;
        assert_eq!(all.dims(), &[b, q, 4]);
        for i in 0..b {
            let one = token_scores(&logits.get(i)?, &pm, reduce)?;
            match reduce {
                TokenReduce::Max => {
                    assert_eq!(all.get(i)?.to_vec2::<f32>()?, one.to_vec2::<f32>()?)
                }
                TokenReduce::Mean => {
                    assert_close("mean token scores", &all.get(i)?, &one, tol, 0.0)?
                }
            }
        }
    }
    let bad = token_scores(&logits, &pm.narrow(1, 0, 8)?, TokenReduce::Mean);
    assert!(bad.unwrap_err().to_string().contains("9 tokens"));
    Ok(())
}
