//! The ResNet's bf16 data flow (`glip_kernels::bf16::activation_dtype`): inside a bf16 autocast
//! on CUDA the image is cast to bf16 once and every convolution, frozen batch norm, ReLU,
//! residual sum and the stem pool reads and writes bf16. Here it is forced on the CPU
//! (`with_bf16_activations`, candle's generic bf16 operations), where the same code runs: the
//! levels come out bf16, every parameter still learns (its gradient f32, through the casts),
//! and the values are within bf16's round-off of the exact ones. The CUDA kernels themselves are
//! tested under the emulation (glip-kernels) and on a GPU (glip-train's `tests/cuda.rs`).

use candle_core::{DType, Device, Result, Tensor};
use glip_backbone::{ResNet, ResNetConfig, ResNetDepth};
use glip_core::Backbone;
use glip_kernels::bf16::with_bf16_activations;
use glip_testing::{assert_every_parameter_learns, fresh_vars, probe_loss};

/// The number of products summed along the longest path of dot products into each of
/// ResNet-18's C2..C5 (the stem's 7x7x3, then two 3x3 convolutions per basic block).
fn resnet18_path_sum_lengths() -> [usize; 4] {
    let mut total = 7 * 7 * 3;
    let mut out = [0; 4];
    let mut cin = 64;
    for (i, width) in [64usize, 128, 256, 512].into_iter().enumerate() {
        for b in 0..2 {
            let input = if b == 0 { cin } else { width };
            total += 9 * input + 9 * width;
        }
        cin = width;
        out[i] = total;
    }
    out
}

/// C2..C5 with bf16 activations against the exact values (the same network and weights in
/// f64), by `glip_testing::assert_f32_deep_close`'s random-walk argument with bf16's unit
/// round-off `u = 2^-8`: along the path every product reads a weight rounded to bf16 and an
/// activation rounded to bf16, and each layer's output is rounded twice more (the convolution
/// writes bf16, then the batch norm and ReLU write bf16): `4 u sqrt(sum_len) max|exact|`, on top
/// of the fixture README's forward tolerance; the sums are f32 (`u_f32` per term).
#[test]
fn resnet18_with_bf16_activations_is_within_bf16_round_off_and_learns() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let cfg =
        ResNetConfig { depth: ResNetDepth::Resnet18, freeze_at: 0, trainable_bn: false, stages: 4 };
    let net = ResNet::new(cfg.clone(), vb)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 48), &Device::Cpu)?;
    let levels = with_bf16_activations(|| net.forward(&x, true))?;
    for l in &levels {
        assert_eq!(l.tensor.dtype(), DType::BF16, "a level left the bf16 data flow");
    }

    // The same weights in f64.
    let weights: std::collections::HashMap<String, Tensor> = vm
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().to_dtype(DType::F64).expect("f64")))
        .collect();
    let vb64 = candle_nn::VarBuilder::from_tensors(weights, DType::F64, &Device::Cpu);
    let net64 = ResNet::new(cfg, vb64)?;
    let exact = net64.forward(&x.to_dtype(DType::F64)?, false)?;
    let u = 2f64.powi(-8);
    for (i, name) in ["c2", "c3", "c4", "c5"].into_iter().enumerate() {
        let len = resnet18_path_sum_lengths()[i] as f64;
        let e: Vec<f64> = exact[i].tensor.flatten_all()?.to_vec1()?;
        let got: Vec<f64> = levels[i].tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let m = e.iter().fold(0f64, |m, v| m.max(v.abs()));
        let walk = (4.0 * u + glip_testing::F32_UNIT_ROUNDOFF) * len.sqrt() * m;
        let mut worst = 0f64;
        for (k, (a, v)) in got.iter().zip(&e).enumerate() {
            let bound = 1e-4 + 1e-3 * v.abs() + walk;
            assert!((a - v).abs() <= bound, "{name}[{k}]: {a} vs exact {v} (bound {bound})");
            worst = worst.max((a - v).abs() / bound);
        }
        eprintln!("{name} (bf16 activations): largest error / bound {worst:.3}");
    }

    // Gradients reach every convolution (frozen batch norm's constants have none), in f32.
    let loss = levels.iter().try_fold(Tensor::new(0f32, &Device::Cpu)?, |acc, l| {
        acc + probe_loss(&l.tensor.to_dtype(DType::F32)?)?
    })?;
    let grads = loss.backward()?;
    assert_every_parameter_learns(&vm, &grads, |n| {
        n.ends_with("running_mean")
            || n.ends_with("running_var")
            || n.contains("bn")
            || n.contains("downsample.1")
    })?;
    for (name, v) in vm.data().lock().expect("varmap lock").iter() {
        if let Some(g) = grads.get(v.as_tensor()) {
            assert_eq!(g.dtype(), DType::F32, "{name}: the gradient of an f32 weight is f32");
        }
    }
    Ok(())
}

/// A trainable batch norm in training normalises in f32 inside the bf16 data flow (its input
/// cast up, its output back to bf16); its parameters learn.
#[test]
fn trainable_batch_norm_in_the_bf16_data_flow_learns() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let cfg =
        ResNetConfig { depth: ResNetDepth::Resnet18, freeze_at: 0, trainable_bn: true, stages: 2 };
    let net = ResNet::new(cfg, vb)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)?;
    let levels = with_bf16_activations(|| net.forward(&x, true))?;
    let loss = levels.iter().try_fold(Tensor::new(0f32, &Device::Cpu)?, |acc, l| {
        assert_eq!(l.tensor.dtype(), DType::BF16);
        acc + probe_loss(&l.tensor.to_dtype(DType::F32)?)?
    })?;
    let grads = loss.backward()?;
    assert_every_parameter_learns(&vm, &grads, |n| {
        n.ends_with("running_mean") || n.ends_with("running_var")
    })
}
