//! `Losses::normaliser`, the count a criterion divides its whole loss by: what gradient
//! accumulation (`run.accumulate`) weighs each batch of a step with. Checked here: the dense
//! criterion and the set criterion over tokens report one, the count of their matches, and a
//! batch's loss is the count-weighted combination of its halves' losses,
//! `(max(c_a, 1) L_a + max(c_b, 1) L_b) / max(c_a + c_b, 1)`, so an accumulated step is the
//! large batch's loss; the set criterion with fixed classes (a weighted mean over queries,
//! DETR's) reports none.
//!
//! Tolerance: both sides compute every element of every term identically (the same values,
//! element by element: the halves are slices of the batch's tensors, and the matching is per
//! image, asserted equal); only the sums differ. A sum of `m` non-negative f32 values is within
//! `(m - 1) u` of the exact sum relative to it, in any order (`u = 2^-24`); every term here is
//! such a sum (focal loss, L1, `1 - GIoU`, binary cross-entropy, all `>= 0`) of at most
//! `N = b q t` values, divided once. So the batch's term is within `(N + 1) u`, each half's
//! within `(N / 2 + 1) u`, of the exact value; the total adds its three or four weighted terms
//! in f32 (eight more roundings). Bound: `(1.5 N + 10) u` relative to the term.

use candle_core::{DType, Device, Tensor};
use glip_core::{Criterion, DenseOutput, LogitsKind, Losses, ModelOutput, Prediction, Target};
use glip_loss::{
    Assigner, DenseCriterion, DenseLossConfig, HungarianMatcher, LossConfig, SetCriterion,
};
use proptest::prelude::*;

const T: usize = 6;

/// One image's targets: `n` random boxes, each grounded in one token.
fn target(n: usize, dev: &Device) -> Target {
    let boxes = Tensor::rand(0.25f32, 0.6, (n, 4), dev).unwrap();
    let pm: Vec<f32> = (0..n * T).map(|i| (i % T == 1 + i / T % 4) as u8 as f32).collect();
    let labels = Tensor::from_vec((0..n as u32).map(|k| k % 3).collect::<Vec<_>>(), n, dev);
    Target::new(boxes, Some(labels.unwrap()), Some(Tensor::from_vec(pm, (n, T), dev).unwrap()))
        .unwrap()
}

/// Images `from..from + len` of a batch's output (every tensor sliced along the batch).
fn slice(out: &ModelOutput, from: usize, len: usize) -> ModelOutput {
    let cut = |t: &Tensor| t.narrow(0, from, len).unwrap().contiguous().unwrap();
    let mut o = ModelOutput::new(
        Prediction::new(cut(&out.pred.pred_boxes), cut(&out.pred.pred_logits)).unwrap(),
        out.logits_kind,
        Vec::new(),
        cut(&out.hs),
        cut(&out.memory),
        cut(&out.text_mask),
    )
    .unwrap();
    if let Some(d) = out.dense() {
        let dense = DenseOutput::new(
            cut(&d.points),
            cut(&d.strides),
            d.level.clone(),
            d.centerness.as_ref().map(cut),
        );
        o = o.with_dense(dense.unwrap()).unwrap();
    }
    o
}

fn output(b: usize, q: usize, kind: LogitsKind, dense: Option<bool>, dev: &Device) -> ModelOutput {
    let c = match kind {
        LogitsKind::Classes(n) => n + 1,
        LogitsKind::Tokens => T,
    };
    let logits = (Tensor::randn(0f32, 1.0, (b, q, c), dev).unwrap() * 3.0).unwrap();
    let boxes = Tensor::rand(0.1f32, 0.9, (b, q, 4), dev).unwrap();
    let hs = Tensor::zeros((b, q, 8), DType::F32, dev).unwrap();
    let out = ModelOutput::new(
        Prediction::new(boxes, logits).unwrap(),
        kind,
        Vec::new(),
        hs.clone(),
        hs,
        Tensor::ones((b, T), DType::U8, dev).unwrap(),
    )
    .unwrap();
    let Some(centerness) = dense else { return out };
    // A 6 x 6 grid and a 3 x 3 one over the image, the same for every image.
    let (mut p, mut s, mut l) = (Vec::new(), Vec::new(), Vec::new());
    for (level, m) in [6usize, 3].into_iter().enumerate() {
        let st = 1.0 / m as f32;
        for i in 0..m * m {
            p.extend([((i % m) as f32 + 0.5) * st, ((i / m) as f32 + 0.5) * st]);
            s.extend([st, st]);
            l.push(level);
        }
    }
    assert_eq!(l.len(), q);
    let tile = |v: Vec<f32>| Tensor::from_vec(v.repeat(b), (b, q, 2), dev).unwrap();
    let ctr = centerness.then(|| Tensor::randn(0f32, 1.0, (b, q), dev).unwrap());
    out.with_dense(DenseOutput::new(tile(p), tile(s), l, ctr).unwrap()).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The batch's loss against its halves' (images `0..h`, `h..b`), combined by their counts.
fn composes(crit: &dyn Criterion, out: &ModelOutput, targets: &[Target]) {
    let (b, q, c) = out.pred.pred_logits.dims3().unwrap();
    let h = b / 2;
    let all = crit.forward(out, targets).unwrap();
    let halves: Vec<Losses> = [(0, h), (h, b - h)]
        .iter()
        .map(|&(from, len)| crit.forward(&slice(out, from, len), &targets[from..from + len]))
        .collect::<candle_core::Result<_>>()
        .unwrap();
    let matches: Vec<_> = halves.iter().flat_map(|l| l.matches.clone()).collect();
    assert_eq!(all.matches, matches, "the matching is per image: the same in the halves");
    let count = |l: &Losses| l.normaliser.expect("a criterion normalised by one count");
    // The count is the number of matches.
    let matched = |l: &Losses| l.matches.iter().map(|m| m.query.len()).sum::<usize>() as f64;
    assert_eq!(count(&all), matched(&all));
    assert_eq!(count(&all), count(&halves[0]) + count(&halves[1]));
    let n = (b * q * c) as f64;
    let tol = (1.5 * n + 10.0) * 2f64.powi(-24);
    let mut named: Vec<(&str, &Tensor, Vec<&Tensor>)> =
        vec![("total", &all.total, halves.iter().map(|l| &l.total).collect())];
    for (k, (name, v)) in all.terms.iter().enumerate() {
        named.push((name, v, halves.iter().map(|l| &l.terms[k].1).collect()));
    }
    for (name, whole, parts) in named {
        let combined =
            parts.iter().zip(&halves).map(|(p, l)| count(l).max(1.0) * scalar(p)).sum::<f64>()
                / count(&all).max(1.0);
        let whole = scalar(whole);
        assert!(
            (whole - combined).abs() <= tol * whole.abs().max(combined.abs()),
            "{name}: {whole} for the batch, {combined} from its halves (tolerance {tol:e} relative)"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The dense criterion (FCOS or ATSS, with or without centerness); some images hold no box,
    /// so a half may count none.
    #[test]
    fn a_dense_batch_is_its_halves_weighed_by_their_positives(
        boxes in prop::collection::vec(0usize..4, 4), atss in any::<bool>(), centerness in any::<bool>(),
    ) {
        let dev = Device::Cpu;
        let out = output(4, 45, LogitsKind::Tokens, Some(centerness), &dev);
        let targets: Vec<Target> = boxes.iter().map(|&n| target(n, &dev)).collect();
        let assign = if atss { Assigner::Atss } else { Assigner::Fcos };
        composes(&DenseCriterion::new(DenseLossConfig { assign, ..Default::default() }), &out, &targets);
    }

    /// The set criterion over tokens: the count is the batch's boxes, every one matched.
    #[test]
    fn a_set_batch_is_its_halves_weighed_by_their_boxes(boxes in prop::collection::vec(0usize..4, 4)) {
        let dev = Device::Cpu;
        let out = output(4, 7, LogitsKind::Tokens, None, &dev);
        let targets: Vec<Target> = boxes.iter().map(|&n| target(n, &dev)).collect();
        composes(&SetCriterion::new(LossConfig::default(), Box::new(HungarianMatcher)), &out, &targets);
    }
}

/// With fixed classes the cross-entropy is a weighted mean over every query (DETR's), the box
/// terms are over the matched boxes: no one count, so no normaliser.
#[test]
fn fixed_classes_report_no_normaliser() {
    let dev = Device::Cpu;
    let out = output(2, 7, LogitsKind::Classes(3), None, &dev);
    let targets = [target(2, &dev), target(1, &dev)];
    let crit = SetCriterion::new(LossConfig::detr(), Box::new(HungarianMatcher));
    assert_eq!(crit.forward(&out, &targets).unwrap().normaliser, None);
}
