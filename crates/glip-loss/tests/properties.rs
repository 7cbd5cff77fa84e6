//! Property tests of the criteria: finite non-negative losses, invariance to the order of the
//! targets, zero box loss for a perfect prediction, ordered vs Hungarian pairing.

use candle_core::{DType, Device, Tensor};
use glip_core::{Criterion, LogitsKind, ModelOutput, Prediction, Target};
use glip_loss::{HungarianMatcher, LossConfig, OrderedMatcher, SetCriterion};
use proptest::prelude::*;

const T: usize = 6;

#[derive(Debug, Clone)]
struct Case {
    boxes: Vec<Vec<[f32; 4]>>, // per image, per target (cxcywh)
    labels: Vec<Vec<u32>>,
    logits_scale: f32,
}

fn case() -> impl Strategy<Value = Case> {
    let bx = (0.2f32..0.8, 0.2f32..0.8, 0.05f32..0.3, 0.05f32..0.3)
        .prop_map(|(a, b, c, d)| [a, b, c, d]);
    prop::collection::vec(prop::collection::vec((bx, 0u32..3), 0..5), 1..4).prop_flat_map(|imgs| {
        let boxes = imgs.iter().map(|v| v.iter().map(|x| x.0).collect()).collect();
        let labels = imgs.iter().map(|v| v.iter().map(|x| x.1).collect()).collect();
        (Just(Case { boxes, labels, logits_scale: 1.0 }), 0.1f32..60.0)
            .prop_map(|(c, s)| Case { logits_scale: s, ..c })
    })
}

fn targets(c: &Case, perm: bool) -> Vec<Target> {
    c.boxes
        .iter()
        .zip(&c.labels)
        .map(|(b, l)| {
            let mut idx: Vec<usize> = (0..b.len()).collect();
            if perm {
                idx.reverse();
            }
            let n = b.len();
            let flat: Vec<f32> = idx.iter().flat_map(|&i| b[i]).collect();
            let pm: Vec<f32> = idx
                .iter()
                .flat_map(|&i| (0..T).map(move |t| (t == 1 + l[i] as usize) as u8 as f32))
                .collect();
            Target::new(
                Tensor::from_vec(flat, (n, 4), &Device::Cpu).unwrap(),
                Some(
                    Tensor::from_vec(
                        idx.iter().map(|&i| l[i]).collect::<Vec<_>>(),
                        n,
                        &Device::Cpu,
                    )
                    .unwrap(),
                ),
                Some(Tensor::from_vec(pm, (n, T), &Device::Cpu).unwrap()),
            )
            .unwrap()
        })
        .collect()
}

fn output(b: usize, q: usize, kind: LogitsKind, scale: f32, boxes: Option<Tensor>) -> ModelOutput {
    let dev = Device::Cpu;
    let c = match kind {
        LogitsKind::Classes(n) => n + 1,
        LogitsKind::Tokens => T,
    };
    let logits = (Tensor::randn(0f32, 1.0, (b, q, c), &dev).unwrap() * scale as f64).unwrap();
    let boxes = boxes.unwrap_or_else(|| Tensor::rand(0.1f32, 0.9, (b, q, 4), &dev).unwrap());
    let text_mask = Tensor::ones((b, T), DType::U8, &dev).unwrap();
    let hs = Tensor::zeros((b, q, 8), DType::F32, &dev).unwrap();
    ModelOutput::new(
        Prediction::new(boxes, logits).unwrap(),
        kind,
        vec![],
        hs.clone(),
        hs,
        text_mask,
    )
    .unwrap()
}

fn criterion(kind: LogitsKind) -> SetCriterion {
    let cfg = if matches!(kind, LogitsKind::Classes(_)) {
        LossConfig::detr()
    } else {
        LossConfig::default()
    };
    SetCriterion::new(cfg, Box::new(HungarianMatcher))
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn losses_are_finite_non_negative_and_target_order_free(c in case(), q in 5usize..9, token in any::<bool>()) {
        let kind = if token { LogitsKind::Tokens } else { LogitsKind::Classes(3) };
        let out = output(c.boxes.len(), q, kind, c.logits_scale, None);
        let crit = criterion(kind);
        let a = crit.forward(&out, &targets(&c, false)).unwrap();
        let b = crit.forward(&out, &targets(&c, true)).unwrap();
        for (name, v) in &a.terms {
            let v = scalar(v);
            prop_assert!(v.is_finite() && v >= -1e-6, "{} = {}", name, v);
        }
        let (ta, tb) = (scalar(&a.total), scalar(&b.total));
        prop_assert!((ta - tb).abs() <= 1e-4 * ta.abs().max(1.0), "{} vs {} after permuting targets", ta, tb);
    }

    #[test]
    fn a_perfect_prediction_has_zero_box_loss(c in case(), token in any::<bool>()) {
        // Place every target box on a query; the remaining queries anywhere.
        let q = 5;
        let b = c.boxes.len();
        let mut flat = Vec::new();
        for img in &c.boxes {
            for k in 0..q {
                flat.extend(img.get(k).copied().unwrap_or([0.5, 0.5, 0.9, 0.9]));
            }
        }
        let boxes = Tensor::from_vec(flat, (b, q, 4), &Device::Cpu).unwrap();
        let kind = if token { LogitsKind::Tokens } else { LogitsKind::Classes(3) };
        // Confident, correct logits make classification agree with the box costs.
        let out = output(b, q, kind, 0.01, Some(boxes));
        let l = criterion(kind).forward(&out, &targets(&c, false)).unwrap();
        for (name, v) in &l.terms {
            if name == "loss_bbox" || name == "loss_giou" {
                prop_assert!(scalar(v).abs() < 1e-5, "{} = {}", name, scalar(v));
            }
        }
    }
}

#[test]
fn ordered_pairing_is_query_i_to_target_i() {
    let c = Case {
        boxes: vec![vec![[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]],
        labels: vec![vec![0, 1]],
        logits_scale: 1.0,
    };
    // Queries hold the targets in the opposite order: Hungarian finds them, ordered does not.
    let boxes = Tensor::new(
        &[[[0.8f32, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]],
        &Device::Cpu,
    )
    .unwrap();
    let out = output(1, 3, LogitsKind::Tokens, 1.0, Some(boxes));
    let t = targets(&c, false);
    let h = SetCriterion::new(LossConfig::default(), Box::new(HungarianMatcher))
        .forward(&out, &t)
        .unwrap();
    let o = SetCriterion::new(LossConfig::default(), Box::new(OrderedMatcher))
        .forward(&out, &t)
        .unwrap();
    assert_eq!(h.matches[0].query, vec![0, 1]);
    assert_eq!(h.matches[0].target, vec![1, 0]);
    assert_eq!(o.matches[0].target, vec![0, 1]);
    let bbox =
        |l: &glip_core::Losses| scalar(&l.terms.iter().find(|t| t.0 == "loss_bbox").unwrap().1);
    assert!(bbox(&h) < 1e-6 && bbox(&o) > 0.5);
}

#[test]
fn auxiliary_layers_add_suffixed_terms() {
    let c =
        Case { boxes: vec![vec![[0.3, 0.3, 0.2, 0.2]]], labels: vec![vec![2]], logits_scale: 1.0 };
    let mut out = output(1, 4, LogitsKind::Classes(3), 1.0, None);
    let aux = output(1, 4, LogitsKind::Classes(3), 1.0, None).pred;
    out.aux = vec![aux.clone(), aux];
    let l = criterion(LogitsKind::Classes(3)).forward(&out, &targets(&c, false)).unwrap();
    let names: Vec<&str> = l.terms.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "loss_ce",
            "loss_bbox",
            "loss_giou",
            "loss_ce_0",
            "loss_bbox_0",
            "loss_giou_0",
            "loss_ce_1",
            "loss_bbox_1",
            "loss_giou_1"
        ]
    );
}
