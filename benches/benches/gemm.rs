//! The bf16 gemm of `glip_kernels::bf16` (packing of `B` included, as a convolution pays it,
//! and the product alone), with each kernel the CPU runs (AVX512_BF16, AMX), against candle's
//! f32 matmul, at the convolution shapes of ResNet-50 at batch 2, 384 px
//! (`(m, k, n)` = output channels, input channels x kernel area, batch x output pixels); whole
//! convolutions, gradient-free and trained (forward and both gradients), in f32 and bf16.

/// As `glip` (freed pages kept for reuse): the convolutions' large buffers are not faulted in
/// afresh at every call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use glip_kernels::bf16::{self, Kernel};

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10);
    let shapes = [
        ("layer1-3x3", 64, 576, 18432),
        ("layer1-1x1", 256, 64, 18432),
        ("layer3-3x3", 256, 2304, 1152),
        ("layer4-3x3", 512, 4608, 288),
        ("layer4-1x1", 2048, 512, 288),
    ];
    for (name, m, k, n) in shapes {
        let a = Tensor::randn(0f32, 1., (m, k), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1., (k, n), &Device::Cpu).unwrap();
        g.bench_function(format!("f32/{name}"), |bench| bench.iter(|| a.matmul(&b).unwrap()));
        let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (kernel, label) in [(Kernel::Avx512, "bf16-avx512"), (Kernel::Amx, "bf16-amx")] {
            if kernel.runs_here() {
                let pa = bf16::PackedA::for_kernel(kernel, &av, m, k);
                g.bench_function(format!("{label}/{name}"), |bench| {
                    bench.iter(|| bf16::gemm(&pa, &bf16::PackedB::for_kernel(kernel, &bv, k, n)))
                });
                // The product alone, `B` packed beforehand: the kernel's own speed.
                let pb = bf16::PackedB::for_kernel(kernel, &bv, k, n);
                g.bench_function(format!("{label}-product/{name}"), |bench| {
                    bench.iter(|| bf16::gemm(&pa, &pb))
                });
            }
        }
    }
    g.finish();
}

/// A whole gradient-free convolution (im2col, product, layout) in f32 and under a bf16
/// `autocast` (im2col written straight into bf16 panels): ResNet-50's layer1 3x3 at batch 2,
/// 384 px, where the product alone favours f32 because packing `B` from f32 costs as much.
fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv");
    g.sample_size(10);
    let x = Tensor::randn(0f32, 1., (2, 64, 96, 96), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1., (64, 64, 3, 3), &Device::Cpu).unwrap();
    let conv = || glip_kernels::conv::conv2d(&x, &w, 1, 1).unwrap();
    g.bench_function("f32/layer1-3x3", |b| b.iter(conv));
    if bf16::available() {
        let label = format!("bf16-{:?}/layer1-3x3", Kernel::best()).to_lowercase();
        g.bench_function(label, |b| bf16::autocast(bf16::Precision::Bf16, || b.iter(conv)));
    }
    g.finish();
}

/// A trained convolution: forward, then both gradients of `sum(y * r)`, in f32 and under a
/// bf16 `autocast` (where the backward's products are bf16 too), at the 3x3 convolutions of
/// `glip bench --preset seed-r18 --mode train --batch 8 --size 128` (ResNet-18 on 128 px:
/// layer1 at 32 x 32, layer3 at 8 x 8, layer4 at 4 x 4).
fn conv_train(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv-train");
    g.sample_size(10);
    let dev = Device::Cpu;
    for (name, ch, side) in [("layer1-3x3", 64, 32), ("layer3-3x3", 256, 8), ("layer4-3x3", 512, 4)]
    {
        let x = candle_core::Var::randn(0f32, 1., (8, ch, side, side), &dev).unwrap();
        let w = candle_core::Var::randn(0f32, 0.05, (ch, ch, 3, 3), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (8, ch, side, side), &dev).unwrap();
        let step = || {
            let y = glip_kernels::conv::conv2d(&x, &w, 1, 1).unwrap();
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
        };
        g.bench_function(format!("f32/{name}"), |b| b.iter(step));
        if bf16::available() {
            let label = format!("bf16-{:?}/{name}", Kernel::best()).to_lowercase();
            g.bench_function(label, |b| b.iter(|| bf16::autocast(bf16::Precision::Bf16, step)));
        }
    }
    g.finish();
}

criterion_group!(benches, gemm, conv, conv_train);
criterion_main!(benches);
