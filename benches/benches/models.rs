//! Forward-pass benchmarks of the model's parts at the sizes the issues name.
//!
//! `cargo bench -p glip-benches --bench models` (set `RAYON_NUM_THREADS` to pin threads).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use glip_backbone::{ResNet, ResNetConfig, ResNetDepth};
use glip_core::{Backbone, LevelShape, Queries, Transformer};
use glip_transformer::{
    DeformableAttention, DetrTransformer, MultiheadAttention, Reference, SamplingLevels,
    TransformerConfig,
};

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

/// A decoder's image cross-attention, forward and backward (a training step's), global
/// (every query over every token) against deformable (4 points per head and level around each
/// query's box): d 256, 8 heads, 300 queries (Grounding DINO's 900 minus denoising's room), batch
/// 2, on the levels of a 128 px image (C3+C4, the shapes task), a 512 px one and an 800 x 1066
/// one (C3-C5). Global attention grows with the tokens, deformable with the queries.
fn image_attention(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (b, q, d, heads) = (2, 300, 256, 8);
    let grids: [(&str, &[(usize, usize, usize)]); 3] = [
        ("128px_320tok", &[(16, 16, 8), (8, 8, 16)]),
        ("512px_5376tok", &[(64, 64, 8), (32, 32, 16), (16, 16, 32)]),
        ("800px_17600tok", &[(100, 134, 8), (50, 67, 16), (25, 34, 32)]),
    ];
    let mut g = c.benchmark_group("decoder_image_attention_train_b2_q300_d256");
    g.sample_size(10);
    for (name, grid) in grids {
        let levels: Vec<LevelShape> =
            grid.iter().map(|&(h, w, stride)| LevelShape { h, w, stride }).collect();
        let s: usize = levels.iter().map(|l| l.h * l.w).sum();
        let size = ((grid[0].1 * grid[0].2) as f32, (grid[0].0 * grid[0].2) as f32);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let global = MultiheadAttention::new(d, heads, 0.0, vb.pp("global")).unwrap();
        let deformable =
            DeformableAttention::new(d, heads, levels.len(), 4, vb.pp("deformable")).unwrap();
        let at = SamplingLevels::new(&levels, &vec![size; b], &dev).unwrap();
        let query = candle_core::Var::randn(0f32, 1.0, (b, q, d), &dev).unwrap();
        let memory = candle_core::Var::randn(0f32, 1.0, (b, s, d), &dev).unwrap();
        let u = Tensor::rand(0f32, 1.0, (b, q, 4), &dev).unwrap();
        let boxes = Tensor::cat(
            &[u.narrow(2, 0, 2).unwrap(), u.narrow(2, 2, 2).unwrap().affine(0.3, 0.02).unwrap()],
            2,
        )
        .unwrap();
        g.bench_function(format!("global/{name}"), |bench| {
            bench.iter(|| {
                let (q, m) = (query.as_tensor(), memory.as_tensor());
                global.forward(q, m, m, None, true).unwrap().sum_all().unwrap().backward().unwrap()
            })
        });
        g.bench_function(format!("deformable/{name}"), |bench| {
            bench.iter(|| {
                let (q, m) = (query.as_tensor(), memory.as_tensor());
                let out = deformable.forward(q, Reference::Boxes(&boxes), m, None, &at).unwrap();
                out.sum_all().unwrap().backward().unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, resnets, transformer, image_attention);
criterion_main!(benches);
