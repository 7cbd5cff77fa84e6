//! Helpers for the workspace's numerical tests: where the reference fixtures are (written by
//! `cargo xtask fixtures` from `reference/`), comparisons with stated tolerances, and the
//! every-parameter-learns check.

use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

mod attention;
mod deformable;
pub use attention::{attention_reference, AttentionShape};
pub use deformable::{
    assert_within_bound, check_deformable_op, deformable_reference, deformable_samples,
    DeformableCase, DeformableExact, DeformableShape, Exact,
};

/// The reference fixtures folder: `$GLIP_FIXTURES`, else `fixtures/` at the workspace root
/// (where `cargo xtask fixtures` writes them).
pub fn fixtures_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("GLIP_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

/// A fixture file's path; panics naming the command that writes the fixtures when it is
/// missing, since the parity tests are meaningless without them.
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(
        p.exists(),
        "fixture {} not found: `cargo xtask fixtures` writes the fixtures (or run the tests with \
         `cargo xtask test`, which does it first); GLIP_FIXTURES points elsewhere",
        p.display()
    );
    p
}

/// The device the parity tests compute on: `$GLIP_TEST_DEVICE` (`cpu`, the default, `cuda` or
/// `cuda:N`), so that the same tests check a GPU (`scripts/gpu-check.sh` sets it). Panics when
/// the device cannot be had: a test binary built without CUDA (build it with
/// `--features glip-kernels/cuda`), or no such GPU; silently testing the CPU instead would pass
/// a GPU check that never ran.
pub fn device() -> Device {
    let want = std::env::var("GLIP_TEST_DEVICE").unwrap_or_default();
    let ordinal = match want.trim() {
        "" | "cpu" => return Device::Cpu,
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => n,
            _ => panic!("GLIP_TEST_DEVICE={other:?}: give cpu, cuda or cuda:N"),
        },
    };
    Device::new_cuda(ordinal).unwrap_or_else(|e| {
        panic!(
            "GLIP_TEST_DEVICE={want}: no CUDA device ({e}); the test binary needs \
             `--features glip-kernels/cuda` and a GPU"
        )
    })
}

/// The tests' tiny experiment, a config document: the seed design on a frozen ResNet-18, a
/// one-layer text encoder and transformer 16 wide, on 48-pixel shapes (4 training
/// and 4 validation images, batch 2), trained 4 steps and evaluated every 2: seconds on a CPU.
/// The tokenizer is the repository's shapes tokenizer, by absolute path, so the document can
/// be written anywhere. A test states what it needs on top as `--set` overrides
/// (`glip_train::experiment::apply_overrides`), so the differences are all it lists.
pub fn tiny_experiment() -> toml::Table {
    let tokenizer = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/shapes-tokenizer.json");
    let doc = format!(
        r#"
name = "tiny"
[model]
num_queries = 4
[model.backbone]
type = "resnet"
depth = 18
freeze_at = 5
[model.text]
tokenizer = '{tokenizer}'
hidden = 16
layers = 1
heads = 2
[model.transformer]
d_model = 16
nhead = 2
num_encoder_layers = 1
num_decoder_layers = 1
dim_feedforward = 32
[model.head]
type = "token"
[data]
batch_size = 2
[data.shapes]
image_size = 48
train_images = 4
val_images = 4
[run]
steps = 4
eval_every = 2
log_every = 1
checkpoint_every = 0
"#
    );
    toml::from_str(&doc).expect("the tiny experiment is valid TOML")
}

/// Loads a safetensors fixture as f32 tensors on `device` (integer tensors keep their dtype).
pub fn load(rel: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
    let map = candle_core::safetensors::load(fixture(rel), device)?;
    map.into_iter()
        .map(|(k, v)| {
            let v = match v.dtype() {
                DType::F16 | DType::BF16 | DType::F64 => v.to_dtype(DType::F32)?,
                _ => v,
            };
            Ok((k, v))
        })
        .collect()
}

/// Checks `|a - b| <= atol + rtol * |b|` elementwise and reports the worst element.
pub fn assert_close(name: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes differ");
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut worst = (0usize, 0f32);
    let mut margin = 0f64;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let tol = atol + rtol * y.abs();
        let excess = (x - y).abs() - tol;
        let excess = if excess.is_nan() { f32::INFINITY } else { excess };
        if excess > worst.1 {
            worst = (i, excess);
        }
        if tol > 0.0 {
            margin = margin.max(((x - y).abs() / tol) as f64);
        }
    }
    report_margin(name, margin);
    assert!(
        worst.1 <= 0.0,
        "{name}: element {} is {} vs reference {} (|diff| {} > {} + {} * |ref|)",
        worst.0,
        a[worst.0],
        b[worst.0],
        (a[worst.0] - b[worst.0]).abs(),
        atol,
        rtol
    );
    Ok(())
}

/// Forward-output tolerance of the fixture README: `1e-4 + 1e-3 * |b|`.
pub fn assert_forward_close(name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    assert_close(name, a, b, 1e-4, 1e-3)
}

/// Gradient tolerance of the fixture README: `1e-3 * max|b| + 1e-5`.
pub fn assert_grad_close(name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    let m = b.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    assert_close(name, a, b, 1e-3 * m + 1e-5, 0.0)
}

/// With `GLIP_TEST_MARGINS` set, prints the largest error / tolerance ratio of a comparison
/// (how close it came to failing; `cargo test -- --nocapture` shows it).
fn report_margin(name: &str, ratio: f64) {
    if std::env::var_os("GLIP_TEST_MARGINS").is_some() {
        eprintln!("MARGIN {name}: {ratio:.4}");
    }
}

/// Unit round-off of f32 (`2^-24`).
pub const F32_UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;

/// The error bound of an f32 computation of a deep network's output against its exact value
/// (an f64 computation of the same network): the fixture README's forward tolerance
/// `1e-4 + 1e-3 * |exact|`, plus the random-walk bound of f32 summation
/// `u * sqrt(sum_len) * max|exact|`, where `sum_len` is the number of products summed along
/// the longest path of dot products into the output (each an independent rounding error of
/// relative size `u` of the tensor's scale). It holds for any order of summation: gemm's AVX2
/// or AVX-512 kernels, any thread count.
///
/// Checks both `ours` and `reference` (the PyTorch fixture, itself f32) against `exact`, so that
/// ours and the reference agree to twice the bound (triangle inequality), and returns the
/// largest ratio of error to bound over both (the margin: under 1 passes).
pub fn assert_f32_deep_close(
    name: &str,
    ours: &Tensor,
    reference: &Tensor,
    exact: &Tensor,
    sum_len: usize,
) -> Result<f64> {
    let exact: Vec<f64> = exact.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let m = exact.iter().fold(0f64, |m, x| m.max(x.abs()));
    let walk = F32_UNIT_ROUNDOFF * (sum_len as f64).sqrt() * m;
    let mut worst = 0f64;
    for (what, t) in [("ours", ours), ("reference", reference)] {
        let mut this = 0f64;
        let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        assert_eq!(v.len(), exact.len(), "{name}: sizes differ");
        for (i, (a, e)) in v.iter().zip(&exact).enumerate() {
            let bound = 1e-4 + 1e-3 * e.abs() + walk;
            let ratio = (a - e).abs() / bound;
            assert!(
                ratio <= 1.0,
                "{name} ({what}): element {i} is {a} vs exact {e} (|diff| {} > bound {bound}: \
                 1e-4 + 1e-3 * |exact| + u * sqrt({sum_len}) * {m})",
                (a - e).abs()
            );
            this = this.max(ratio);
        }
        report_margin(&format!("{name} ({what} vs f64)"), this);
        worst = worst.max(this);
    }
    Ok(worst)
}

/// Checks that every variable of `varmap` (but those `skip` names, such as batch-norm running
/// statistics) received a finite gradient that is not zero everywhere: candle silently drops
/// gradients through some fused ops, and this is what catches it.
pub fn assert_every_parameter_learns(
    varmap: &candle_nn::VarMap,
    grads: &candle_core::backprop::GradStore,
    skip: impl Fn(&str) -> bool,
) -> Result<()> {
    let vars = varmap.data().lock().expect("varmap lock");
    assert!(!vars.is_empty(), "the module registered no parameter");
    let mut names: Vec<&String> = vars.keys().filter(|n| !skip(n)).collect();
    names.sort();
    for name in names {
        let v = &vars[name];
        let Some(g) = grads.get(v.as_tensor()) else { panic!("{name}: no gradient reached it") };
        let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        assert!(g.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        assert!(g.iter().any(|&x| x != 0.0), "{name}: gradient is zero everywhere");
    }
    Ok(())
}

/// A `VarBuilder` over a fresh `VarMap` on the CPU, for gradient tests.
pub fn fresh_vars() -> (candle_nn::VarMap, candle_nn::VarBuilder<'static>) {
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (vm, vb)
}

/// A scalar loss that depends on every element of `t` in a non-trivial way (so that
/// normalisation layers do not cancel its gradient): `sum(t * r)` with fixed random weights `r`.
pub fn probe_loss(t: &Tensor) -> Result<Tensor> {
    let r = Tensor::randn(0f32, 1.0, t.dims(), t.device())?;
    (t * r)?.sum_all()
}

/// `n` values in (-2, 2), no two neighbours alike: a 32-bit LCG's high bits, the same for a
/// seed on every machine (kernels' tests that need plain numbers, not tensors).
pub fn lcg_values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}
