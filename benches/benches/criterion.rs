//! The set criterion (Hungarian matching and the three loss terms, forward only) on a batch as
//! `glip bench`'s presets make it: seed-r18 at batch 32 (50 queries, 10 classes) and seed-r50 at
//! batch 8 (100 queries, 91 classes), three boxes per image; the token head's grounding
//! criterion on the first shape with 16 tokens. On the CPU; on a GPU the costs' reads are what
//! batching the costs saves (one wait per layer instead of one per image).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion as Bench};
use glip_core::{Criterion, LogitsKind, ModelOutput, Prediction, Target};
use glip_loss::{HungarianMatcher, LossConfig, SetCriterion};

fn batch(b: usize, q: usize, kind: LogitsKind, t: usize) -> (ModelOutput, Vec<Target>) {
    let dev = Device::Cpu;
    let c = match kind {
        LogitsKind::Classes(n) => n + 1,
        LogitsKind::Tokens => t,
    };
    let logits = Tensor::randn(0f32, 1.0, (b, q, c), &dev).unwrap();
    let boxes = Tensor::rand(0.1f32, 0.9, (b, q, 4), &dev).unwrap();
    let hs = Tensor::zeros((b, q, 8), DType::F32, &dev).unwrap();
    let text_mask = Tensor::ones((b, t), DType::U8, &dev).unwrap();
    let pred = Prediction::new(boxes, logits).unwrap();
    let out = ModelOutput::new(pred, kind, vec![], hs.clone(), hs, text_mask).unwrap();
    let gt =
        Tensor::new(&[[0.3f32, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4], [0.5, 0.2, 0.1, 0.1]], &dev)
            .unwrap();
    let target = || match kind {
        LogitsKind::Classes(_) => {
            Target::new(gt.clone(), Some(Tensor::new(&[1u32, 5, 7], &dev).unwrap()), None)
        }
        LogitsKind::Tokens => {
            let mut pm = vec![0f32; 3 * t];
            for (i, k) in [1usize, 4, 9].into_iter().enumerate() {
                pm[i * t + k] = 1.0;
            }
            Target::new(gt.clone(), None, Some(Tensor::from_vec(pm, (3, t), &dev).unwrap()))
        }
    };
    let targets = (0..b).map(|_| target().unwrap()).collect();
    (out, targets)
}

fn set_criterion(c: &mut Bench) {
    let mut g = c.benchmark_group("set_criterion");
    let cases = [
        ("r18-b32-classes", 32, 50, LogitsKind::Classes(10), LossConfig::detr()),
        ("r50-b8-classes", 8, 100, LogitsKind::Classes(91), LossConfig::detr()),
        ("r18-b32-tokens", 32, 50, LogitsKind::Tokens, LossConfig::default()),
    ];
    for (name, b, q, kind, cfg) in cases {
        let (out, targets) = batch(b, q, kind, 16);
        let crit = SetCriterion::new(cfg, Box::new(HungarianMatcher));
        g.bench_function(name, |bench| bench.iter(|| crit.forward(&out, &targets).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, set_criterion);
criterion_main!(benches);
