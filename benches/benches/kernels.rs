//! glip's element-wise CPU kernels at the default run's shapes (`configs/shapes.toml`: batch 8,
//! 8 heads, 320 image tokens at C3 + C4 of 128 px images, captions of about 24 tokens): the
//! softmax of the encoder's self-attention (rows of 320) and of the fusion's image-to-text
//! attention (rows of 24), forward and with its gradient.

/// As `glip`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};

fn softmax(c: &mut Criterion) {
    let mut g = c.benchmark_group("softmax");
    g.sample_size(20);
    for (name, rows, d) in [("self-attention", 64 * 320, 320), ("image-to-text", 64 * 320, 24)] {
        let x = Tensor::randn(0f32, 2.0, (rows, d), &Device::Cpu).unwrap();
        g.bench_function(format!("forward/{name}"), |b| {
            b.iter(|| glip_kernels::fused::softmax_last(&x).unwrap())
        });
        let v = Var::from_tensor(&x).unwrap();
        let w = Tensor::randn(0f32, 1.0, (rows, d), &Device::Cpu).unwrap();
        g.bench_function(format!("with-gradient/{name}"), |b| {
            b.iter(|| {
                let y = glip_kernels::fused::softmax_last(v.as_tensor()).unwrap();
                (y * &w).unwrap().sum_all().unwrap().backward().unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, softmax);
criterion_main!(benches);
