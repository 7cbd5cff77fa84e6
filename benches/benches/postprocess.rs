//! Post-processing at detection sizes: a dense head's 512-pixel map (C3+C4: 64x64 + 32x32 =
//! 5120 locations) for 80 categories with NMS, and a decoder's 900 queries without, 8 images
//! a batch; per image (a tensor read and a selection each) and for the batch at once.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use glip_heads::postprocess::{batch_detections, detections, PostProcessConfig};

/// Deterministic pseudo-random numbers in `[0, 1)` (an LCG).
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn postprocess(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("postprocess");
    g.sample_size(20);
    // The dense head: GLIP's 0.05 threshold and NMS 0.6; a decoder: every pair, no NMS.
    for (name, q, thr, nms) in [("dense", 5120, 0.05, Some(0.6)), ("decoder", 900, 0.0, None)] {
        let (b, k) = (8, 80);
        // Scores skewed low like a trained head's (u^8: about 31% reach 0.05).
        let s: Vec<f32> = uniform(b * q * k, 7).into_iter().map(|u| u.powi(8)).collect();
        let bx: Vec<f32> = uniform(b * q * 4, 11)
            .chunks_exact(4)
            .flat_map(|r| {
                [0.1 + 0.8 * r[0], 0.1 + 0.8 * r[1], 0.05 + 0.25 * r[2], 0.05 + 0.25 * r[3]]
            })
            .collect();
        let scores = Tensor::from_vec(s, (b, q, k), &dev).unwrap();
        let boxes = Tensor::from_vec(bx, (b, q, 4), &dev).unwrap();
        let cfg = PostProcessConfig {
            score_threshold: thr,
            nms_iou: nms,
            ..PostProcessConfig::default()
        };
        let sizes = vec![(512f32, 512f32); b];
        g.bench_function(format!("per-image/{name}-{b}x{q}x{k}"), |it| {
            it.iter(|| {
                (0..b)
                    .map(|i| {
                        let (s, bx) = (scores.get(i).unwrap(), boxes.get(i).unwrap());
                        detections(&s, &bx, 512.0, 512.0, &cfg).unwrap().len()
                    })
                    .sum::<usize>()
            })
        });
        g.bench_function(format!("batch/{name}-{b}x{q}x{k}"), |it| {
            it.iter(|| batch_detections(&scores, &boxes, &sizes, &cfg).unwrap().len())
        });
    }
    g.finish();
}

criterion_group!(benches, postprocess);
criterion_main!(benches);
