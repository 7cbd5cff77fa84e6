//! Hungarian matching at DETR-like sizes (`matcher_cases.json` has a 900x20 case).

use criterion::{criterion_group, criterion_main, Criterion};
use glip_loss::matcher::hungarian;

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("hungarian");
    for (q, n) in [(100, 20), (900, 20), (900, 100)] {
        // Deterministic pseudo-random costs (an LCG), like the fixture's normal draws.
        let mut s = 12345u64;
        let cost: Vec<f64> = (0..q * n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect();
        g.bench_function(format!("{q}x{n}"), |b| b.iter(|| hungarian(&cost, q, n).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
