//! The dense criterion: FCOS center sampling and ATSS assignment on hand-checked cases, and
//! finite, non-negative losses with gradients for random locations, boxes and logits.

use candle_core::{DType, Device, Tensor, Var};
use glip_core::{Criterion, DenseOutput, LogitsKind, ModelOutput, Prediction, Target};
use glip_loss::dense::Locations;
use glip_loss::{Assigner, DenseCriterion, DenseLossConfig};
use proptest::prelude::*;

/// An `n x n` grid of one level with stride `1/n`, and a second level of `n/2 x n/2`.
fn grid(n: usize) -> (Vec<[f32; 2]>, Vec<[f32; 2]>, Vec<usize>) {
    let (mut p, mut s, mut l) = (Vec::new(), Vec::new(), Vec::new());
    for (level, m) in [n, n / 2].into_iter().enumerate() {
        let st = 1.0 / m as f32;
        for i in 0..m {
            for j in 0..m {
                p.push([(j as f32 + 0.5) * st, (i as f32 + 0.5) * st]);
                s.push([st, st]);
                l.push(level);
            }
        }
    }
    (p, s, l)
}

fn crit(assign: Assigner) -> DenseCriterion {
    DenseCriterion::new(DenseLossConfig { assign, ..Default::default() })
}

#[test]
fn fcos_takes_the_locations_within_the_radius_inside_the_box_and_the_smallest_box_wins() {
    let (p, s, l) = grid(8);
    let loc = Locations { points: &p, strides: &s, level: &l };
    // A box centred at (0.5, 0.5), 0.5 wide. Finest level (stride 0.125, radius 0.1875): the
    // centres 0.4375 and 0.5625 lie within, 0.3125 and 0.6875 are exactly on the radius (out).
    // Coarse level (stride 0.25, radius 0.375): centres 0.375 and 0.625, both inside the box.
    let big = [0.5, 0.5, 0.5, 0.5];
    let a = crit(Assigner::Fcos).assign(&loc, &[big]);
    let pos: Vec<usize> = (0..a.len()).filter(|&i| a[i].is_some()).collect();
    let expect: Vec<usize> =
        vec![3 * 8 + 3, 3 * 8 + 4, 4 * 8 + 3, 4 * 8 + 4, 64 + 5, 64 + 6, 64 + 9, 64 + 10];
    assert_eq!(pos, expect);
    // A smaller box over the same centre takes the locations both want.
    let small = [0.5, 0.5, 0.2, 0.2];
    let a = crit(Assigner::Fcos).assign(&loc, &[big, small]);
    assert_eq!(a[3 * 8 + 3], Some(1));
    assert_eq!(a[64 + 5], Some(0), "outside the small box: the big one keeps it");
    // No box: all background.
    assert!(crit(Assigner::Fcos).assign(&loc, &[]).iter().all(Option::is_none));
}

#[test]
fn atss_positives_lie_inside_their_box_at_most_topk_per_level() {
    // Stride 1/16: the default anchors (8 strides) are half the image at the finest level.
    let (p, s, l) = grid(16);
    let loc = Locations { points: &p, strides: &s, level: &l };
    let boxes = [[0.3, 0.3, 0.4, 0.4], [0.7, 0.65, 0.3, 0.5]];
    let c = crit(Assigner::Atss);
    let a = c.assign(&loc, &boxes);
    for (k, b) in boxes.iter().enumerate() {
        let mine: Vec<usize> = (0..a.len()).filter(|&i| a[i] == Some(k)).collect();
        assert!(!mine.is_empty(), "box {k} got no location");
        assert!(mine.len() <= 2 * c.config().atss_topk);
        for i in mine {
            let q = p[i];
            assert!((q[0] - b[0]).abs() < b[2] / 2.0 && (q[1] - b[1]).abs() < b[3] / 2.0);
        }
    }
}

fn output(b: usize, q: usize, t: usize, centerness: bool, vars: &[Var]) -> ModelOutput {
    let dev = Device::Cpu;
    let points = Tensor::rand(0.05f32, 0.95, (b, q, 2), &dev).unwrap();
    let strides = Tensor::full(0.1f32, (b, q, 2), &dev).unwrap();
    let ctr = centerness.then(|| vars[2].as_tensor().clone());
    ModelOutput::new(
        Prediction::new(vars[0].as_tensor().clone(), vars[1].as_tensor().clone()).unwrap(),
        LogitsKind::Tokens,
        Vec::new(),
        Tensor::zeros((b, q, 8), DType::F32, &dev).unwrap(),
        Tensor::zeros((b, q, 8), DType::F32, &dev).unwrap(),
        Tensor::ones((b, t), DType::U8, &dev).unwrap(),
    )
    .unwrap()
    .with_dense(DenseOutput::new(points, strides, vec![0; q], ctr).unwrap())
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn losses_are_finite_non_negative_with_gradients(
        b in 1usize..3, q in 1usize..40, n in 0usize..4, scale in 0.1f32..50.0,
        atss in any::<bool>(), centerness in any::<bool>(),
    ) {
        let (t, dev) = (5, Device::Cpu);
        let boxes = Var::from_tensor(&Tensor::rand(0.1f32, 0.6, (b, q, 4), &dev).unwrap()).unwrap();
        let logits = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, q, t), &dev).unwrap() * scale as f64).unwrap()).unwrap();
        let ctr = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, q), &dev).unwrap()).unwrap();
        let out = output(b, q, t, centerness, &[boxes.clone(), logits.clone(), ctr.clone()]);
        let targets: Vec<Target> = (0..b).map(|_| {
            let g = (Tensor::rand(0.3f32, 0.7, (n, 4), &dev).unwrap() * 1.0).unwrap();
            let pm = Tensor::from_vec((0..n * t).map(|i| (i % t == 1 + i / t % 3) as u8 as f32).collect::<Vec<_>>(), (n, t), &dev).unwrap();
            Target::new(g, None, Some(pm)).unwrap()
        }).collect();
        let c = crit(if atss { Assigner::Atss } else { Assigner::Fcos });
        let l = c.forward(&out, &targets).unwrap();
        let total: f32 = l.total.to_scalar().unwrap();
        prop_assert!(total.is_finite() && total >= 0.0, "total {}", total);
        for (name, v) in &l.terms {
            let v: f32 = v.to_scalar().unwrap();
            prop_assert!(v.is_finite() && v >= 0.0, "{} = {}", name, v);
        }
        prop_assert_eq!(l.terms.iter().any(|(n, _)| n == "loss_centerness"), centerness);
        // Matches name locations and boxes that exist, each location at most once.
        for m in &l.matches {
            prop_assert!(m.query.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(m.query.iter().all(|&x| x < q) && m.target.iter().all(|&x| x < n));
        }
        let g = l.total.backward().unwrap();
        let gl: Vec<f32> = g.get(logits.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        prop_assert!(gl.iter().all(|x| x.is_finite()) && gl.iter().any(|&x| x != 0.0));
        if l.matches.iter().any(|m| !m.query.is_empty()) {
            let gb: Vec<f32> = g.get(boxes.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            prop_assert!(gb.iter().all(|x| x.is_finite()) && gb.iter().any(|&x| x != 0.0));
        }
    }
}

#[test]
fn the_dense_criterion_names_what_it_needs() {
    let dev = Device::Cpu;
    let vars: Vec<Var> = [(1, 3, 4), (1, 3, 5), (1, 3, 1)]
        .iter()
        .map(|&s| Var::from_tensor(&Tensor::zeros(s, DType::F32, &dev).unwrap()).unwrap())
        .collect();
    let mut out = output(1, 3, 5, false, &vars);
    out.extensions.remove::<DenseOutput>();
    let t = Target::new(Tensor::zeros((0, 4), DType::F32, &dev).unwrap(), None, None).unwrap();
    let e = crit(Assigner::Fcos).forward(&out, &[t]).unwrap_err().to_string();
    assert!(e.contains("dense head"), "{e}");
}
