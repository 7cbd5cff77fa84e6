//! Parity with the PyTorch reference (`reference/glip_ref.py`,
//! written out by `reference/make_fixtures.py`), at the fixture README's forward tolerance
//! `|a - b| <= 1e-4 + 1e-3 * |b|`.

use candle_core::{DType, Device, Result, Tensor, D};
use glip_backbone::{MobileNetV2, ResNet, ResNetConfig, ResNetDepth};
use glip_core::{weights, Backbone};
use glip_testing::{assert_f32_deep_close, assert_forward_close, fixture, load};

/// Products summed along the longest path of dot products from the input to each of
/// ResNet-50's C2..C5 (stem 7x7x3; per bottleneck 1x1 over its input channels, 3x3 over its
/// width, 1x1 over its width): 2,643, 9,555, 30,547, 51,027.
fn resnet50_path_sum_lengths() -> [usize; 4] {
    let mut total = 7 * 7 * 3;
    let mut out = [0; 4];
    let mut cin = 64;
    for (i, (width, blocks)) in [(64, 3), (128, 4), (256, 6), (512, 3)].into_iter().enumerate() {
        for b in 0..blocks {
            let input = if b == 0 { cin } else { 4 * width };
            total += input + 9 * width + width;
        }
        cin = 4 * width;
        out[i] = total;
    }
    out
}

/// C2..C5 of torchvision's ResNet-50 (the fixture, computed by PyTorch in f32) and ours (f32)
/// both within the f32 error bound of the exact values, computed here by the same network in
/// f64 (candle's f64 convolution: another summation order, round-off ~1e-16): see
/// [`assert_f32_deep_close`] for the bound. Elementwise `1e-4 + 1e-3 * |b|` against the
/// reference alone cannot hold on every CPU: near-zero outputs of 4,608-term sums carry the
/// reference's own f32 round-off, and gemm sums in another order on AVX-512 than on AVX2.
#[test]
fn resnet50_matches_torchvision_c2_to_c5() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("resnet50_io.safetensors", &dev)?;
    let net = ResNet::new(
        ResNetConfig::new(ResNetDepth::Resnet50),
        weights::open(&fixture("resnet50.safetensors"), DType::F32, &dev)?,
    )?;
    let levels = net.forward(&io["input"], false)?;
    let net64 = ResNet::new(
        ResNetConfig::new(ResNetDepth::Resnet50),
        weights::open(&fixture("resnet50.safetensors"), DType::F64, &dev)?,
    )?;
    let exact = net64.forward(&io["input"].to_dtype(DType::F64)?, false)?;
    for (i, name) in ["c2", "c3", "c4", "c5"].into_iter().enumerate() {
        let margin = assert_f32_deep_close(
            name,
            &levels[i].tensor,
            &io[name],
            &exact[i].tensor,
            resnet50_path_sum_lengths()[i],
        )?;
        eprintln!("{name}: largest error / bound {margin:.3}");
    }
    // The shallow levels also meet the fixture README's elementwise tolerance directly.
    for (l, name) in levels.iter().zip(["c2", "c3"]) {
        assert_forward_close(name, &l.tensor, &io[name])?;
    }
    Ok(())
}

#[test]
fn seed_tiny_resnet18_loads_with_backbone_prefix() -> Result<()> {
    let dev = glip_testing::device();
    let vb = weights::open(&fixture("seed-tiny/model.safetensors"), DType::F32, &dev)?;
    let net = ResNet::new(ResNetConfig::new(ResNetDepth::Resnet18), vb.pp("backbone"))?;
    let io = load("seed-tiny/io.safetensors", &dev)?;
    let c5 = &net.forward(&io["images"], false)?[3].tensor;
    assert_eq!(c5.dims(), &[3, 512, 4, 5]);
    Ok(())
}

#[test]
fn a_wrong_shape_names_the_key_and_both_shapes() {
    let dev = glip_testing::device();
    let vb = weights::open(&fixture("resnet50.safetensors"), DType::F32, &dev).unwrap();
    // ResNet-18 expects layer1.0.conv1 (64, 64, 3, 3); the ResNet-50 file has (64, 64, 1, 1).
    let err = ResNet::new(ResNetConfig::new(ResNetDepth::Resnet18), vb).unwrap_err().to_string();
    assert!(err.contains("layer1.0.conv1.weight"), "{err}");
    assert!(err.contains("[64, 64, 1, 1]") && err.contains("[64, 64, 3, 3]"), "{err}");
}

#[test]
fn mobilenet_v2_real_weights_match_features_logits_and_top1() -> Result<()> {
    let dev = glip_testing::device();
    let vb = weights::open(&fixture("mobilenet_v2/model.safetensors"), DType::F32, &dev)?;
    let net = MobileNetV2::new(vb, true, false)?;
    let io = load("mobilenet_v2/io.safetensors", &dev)?;
    let [f6, f13, f18] = net.forward_levels(&io["input"], false)?;
    assert_forward_close("features.6", &f6, &io["features.6"])?;
    assert_forward_close("features.13", &f13, &io["features.13"])?;
    assert_forward_close("features.18", &f18, &io["features.18"])?;
    let logits = net.logits(&f18)?;
    assert_forward_close("logits", &logits, &io["logits"])?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("mobilenet_v2/io.json")).unwrap())
            .unwrap();
    let top1: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let want: Vec<u32> =
        meta["top5"].as_array().unwrap().iter().map(|t| t[0].as_u64().unwrap() as u32).collect();
    assert_eq!(top1, want, "top-1 classes of the four photos");
    Ok(())
}

/// PyTorch zip `.pth` files load through the same path: the real MobileNetV2 weights written as
/// a `torch.save`-style state dict (by `tests/data/safetensors_to_pth.py`, no torch needed) give
/// the same logits as the safetensors file.
#[test]
fn pth_state_dicts_load_like_safetensors() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("glip-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pth = dir.join("mobilenet_v2.pth");
    // Beside this file, which the GPU test binary compiles into glip-train's tests (so not
    // under that crate's manifest folder), and which the device check runs from the
    // repository root on another machine (so not at the path it was compiled at either).
    let here = std::path::Path::new(file!()).with_file_name("data").join("safetensors_to_pth.py");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = [root.join(&here), here.clone()].into_iter().find(|p| p.exists());
    let status = match &script {
        Some(script) => std::process::Command::new("python3")
            .arg(script)
            .args([
                fixture("mobilenet_v2/model.safetensors").to_str().unwrap(),
                pth.to_str().unwrap(),
            ])
            .status()
            .map_err(|e| e.to_string()),
        None => Err(format!("no {} from here or from {}", here.display(), root.display())),
    };
    match status {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("SKIP pth_state_dicts_load_like_safetensors: python3 could not write the .pth ({other:?})");
            return Ok(());
        }
    }
    let dev = glip_testing::device();
    let io = load("mobilenet_v2/io.safetensors", &dev)?;
    let x = io["input"].narrow(0, 0, 1)?;
    let from_pth = MobileNetV2::new(weights::open(&pth, DType::F32, &dev)?, true, false)?;
    let from_st = MobileNetV2::new(
        weights::open(&fixture("mobilenet_v2/model.safetensors"), DType::F32, &dev)?,
        true,
        false,
    )?;
    let a = from_pth.logits(&from_pth.forward_levels(&x, false)?[2])?;
    let b = from_st.logits(&from_st.forward_levels(&x, false)?[2])?;
    glip_testing::assert_close("logits", &a, &b, 0.0, 0.0)?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[test]
fn unknown_weight_formats_are_named() {
    let Err(err) = weights::open(std::path::Path::new("model.onnx"), DType::F32, &Device::Cpu)
    else {
        panic!("an .onnx file was accepted")
    };
    assert!(err.to_string().contains("model.onnx: unknown weight format"), "{err}");
}

/// ResNet-50's C2..C5 with its convolutions in bf16 (`glip_kernels::bf16::autocast`) against
/// the exact values (the f64 network), by [`assert_f32_deep_close`]'s argument with bf16's unit
/// round-off: every product of a convolution reads two operands rounded to 8 significant bits
/// (relative error up to `2^-8` each), so the random walk of independent errors along the
/// longest path of products is `2 * 2^-8 * sqrt(sum_len) * max|exact|`, on top of the f32
/// bound (the sums are f32). On CUDA the activations are bf16 throughout
/// (`glip_kernels::bf16::activation_dtype`): each product reads a weight rounded to bf16 and an
/// activation that was rounded twice (cuDNN writes bf16, then the batch norm and ReLU write
/// bf16), three relative `2^-8` per product on the path.
/// The fixture README's elementwise forward tolerance is for f32 and does not apply. Also checks
/// that bf16 is what ran: its C2 differs from the f32 one. Run twice: NCHW activations, and
/// channels-last ones from the stem's pool on (`glip_kernels::layout::with_channels_last`; on
/// CUDA cuDNN's NHWC convolutions, the same bound: the roundings per product are the same).
#[test]
fn resnet50_in_bf16_is_within_the_bf16_round_off_of_the_exact_values() -> Result<()> {
    use glip_kernels::bf16::{autocast, fallback_reason, Precision};
    let dev = glip_testing::device();
    if let Some(why) = fallback_reason(Precision::Bf16, &dev) {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let io = load("resnet50_io.safetensors", &dev)?;
    let open = |dt| weights::open(&fixture("resnet50.safetensors"), dt, &dev);
    let net = ResNet::new(ResNetConfig::new(ResNetDepth::Resnet50), open(DType::F32)?)?;
    let f32_c2 = net.forward(&io["input"], false)?[0].tensor.clone();
    let net64 = ResNet::new(ResNetConfig::new(ResNetDepth::Resnet50), open(DType::F64)?)?;
    let exact = net64.forward(&io["input"].to_dtype(DType::F64)?, false)?;
    for channels_last in [false, true] {
        let bf16 = || autocast(Precision::Bf16, || net.forward(&io["input"], false));
        let levels =
            if channels_last { glip_kernels::layout::with_channels_last(bf16)? } else { bf16()? };
        let layout = if channels_last { "channels-last" } else { "NCHW" };
        check_bf16_levels(&levels, &exact, &f32_c2, dev.is_cuda(), layout)?;
    }
    Ok(())
}

/// [`resnet50_in_bf16_is_within_the_bf16_round_off_of_the_exact_values`]'s bound on each
/// level, and C2 not the f32 one.
fn check_bf16_levels(
    levels: &[glip_core::FeatureMap],
    exact: &[glip_core::FeatureMap],
    f32_c2: &Tensor,
    cuda: bool,
    layout: &str,
) -> Result<()> {
    let u_bf16 = 2f64.powi(-8);
    let roundings = if cuda { 3.0 } else { 2.0 };
    for (i, name) in ["c2", "c3", "c4", "c5"].into_iter().enumerate() {
        let len = resnet50_path_sum_lengths()[i];
        let e: Vec<f64> = exact[i].tensor.flatten_all()?.to_vec1()?;
        let got: Vec<f64> = levels[i].tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let m = e.iter().fold(0f64, |m, x| m.max(x.abs()));
        let walk = (roundings * u_bf16 + glip_testing::F32_UNIT_ROUNDOFF) * (len as f64).sqrt() * m;
        let mut worst = 0f64;
        for (k, (a, x)) in got.iter().zip(&e).enumerate() {
            let bound = 1e-4 + 1e-3 * x.abs() + walk;
            assert!((a - x).abs() <= bound, "{name}[{k}]: {a} vs exact {x} (bound {bound})");
            worst = worst.max((a - x).abs() / bound);
        }
        eprintln!("{name} (bf16, {layout}): largest error / bound {worst:.3}");
    }
    let c2 = levels[0].tensor.to_dtype(DType::F32)?;
    let differs = (&c2 - f32_c2)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(differs > 0.0, "C2 in bf16 equals C2 in f32: autocast did not take effect");
    Ok(())
}
