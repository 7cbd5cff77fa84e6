//! Forward-pass benchmarks of the model's parts at the sizes the issues name.
//!
//! `cargo bench -p glip-benches --bench models` (set `RAYON_NUM_THREADS` to pin threads).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use glip_backbone::{ResNet, ResNetConfig, ResNetDepth};
use glip_core::{Backbone, Queries, Transformer};
use glip_transformer::{DetrTransformer, TransformerConfig};

fn resnets(c: &mut Criterion) {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 384, 384), &dev).unwrap();
    let mut g = c.benchmark_group("backbone_forward_b2_384");
    g.sample_size(10);
    for depth in [ResNetDepth::Resnet18, ResNetDepth::Resnet50] {
        let vm = VarMap::new();
        let net =
            ResNet::new(ResNetConfig::new(depth), VarBuilder::from_varmap(&vm, DType::F32, &dev))
                .unwrap();
        g.bench_function(format!("{depth:?}").to_lowercase(), |b| {
            b.iter(|| net.forward(&x, false).unwrap())
        });
    }
    g.finish();
}

fn transformer(c: &mut Criterion) {
    let dev = Device::Cpu;
    // The seed-r50 transformer (d 256, 8 heads, 6+6 layers, ff 2048, 100 queries) on the C5 map
    // of a 384x384 image (12x12 = 144 tokens), batch 2.
    let vm = VarMap::new();
    let cfg = TransformerConfig::new(256, 8, 6, 6, 2048);
    let t = DetrTransformer::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let src = Tensor::randn(0f32, 1.0, (2, 144, 256), &dev).unwrap();
    let q = Queries {
        content: Tensor::randn(0f32, 1.0, (2, 100, 256), &dev).unwrap(),
        pos: None,
        reference_boxes: None,
    };
    let mut g = c.benchmark_group("transformer_seed_r50_b2_144tok");
    g.sample_size(10);
    g.bench_function("encode_decode", |b| {
        b.iter(|| {
            let m = t.encode(&src, None, None, false).unwrap();
            t.decode(&q, &m, None, None, false).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, resnets, transformer);
criterion_main!(benches);
