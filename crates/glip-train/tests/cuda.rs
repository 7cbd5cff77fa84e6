//! The GPU tests, built only with the `cuda` feature and run on a machine with a GPU by
//! `scripts/gpu-check.sh` (part a):
//!
//! ```sh
//! GLIP_TEST_DEVICE=cuda cargo test -p glip-train --features cudnn --test cuda
//! ```
//!
//! * **The parity suite on CUDA.** The parity tests of glip-backbone (ResNet-50, MobileNetV2,
//!   ResNet-50 in bf16), glip-loss, glip-text (BERT-tiny, MiniLM), glip-train (seed-tiny
//!   forward, losses, matches and gradients) and glip-transformer (Grounding DINO's decoder layer
//!   with its text cross-attention, forward and gradients) are compiled into this binary as
//!   modules and compute on `$GLIP_TEST_DEVICE` ([`glip_testing::device`]), at the fixture
//!   README's tolerances in f32 (TF32 off, the default) and the stated bound in bf16. The
//!   trainer's tests come too: resumed training continues with the same losses on the GPU, and a
//!   GPU checkpoint resumes on the CPU. They turn determinism on for the whole process (which
//!   keeps candle's composition for deformable sampling), so `gpu-check.sh` runs them in a
//!   process of their own, after the others (`--skip trainer::`, then `trainer::`).
//! * **Each op with a CUDA path against exact values or the CPU path.** Convolutions (3x3,
//!   strided, 1x1, the 7x7 stem, depthwise) forward and both gradients, in f32 and under bf16
//!   autocast; `Linear` with its gradients in both; training batch norm, softmax and layer norm
//!   with gradients (exact values: the same computation in f64 on the CPU, candle's own ops);
//!   the frozen batch norm's affine map and ReLU, the stem max-pool with its gradient, dropout's
//!   device-drawn masks, query selection's top-k, AdamW, the EMA and the gradient norm
//!   (against the CPU kernels); deformable attention's sampling with both gradients (against
//!   exact values). Compared per element with the bounds derived at each test.
//!
//! These tests need `cuda:0`; they fail (not skip) without it, since a GPU check that silently
//! ran on the CPU would prove nothing.

#[path = "../../glip-backbone/tests/parity.rs"]
mod backbone_parity;
#[path = "../../glip-loss/tests/parity.rs"]
mod loss_parity;
#[path = "seed_parity.rs"]
mod seed_parity;
#[path = "../../glip-text/tests/parity.rs"]
mod text_parity;
#[path = "common/tiny_dense.rs"]
mod tiny_dense;
#[path = "trainer.rs"]
mod trainer;
#[path = "../../glip-transformer/tests/parity.rs"]
mod transformer_parity;

use candle_core::{DType, Device, Result, Tensor, Var};
use glip_kernels::bf16::{autocast, Precision};

fn gpu() -> Device {
    glip_kernels::cuda::new_device(0).expect("the GPU tests need cuda:0 (a GPU and a CUDA build)")
}

/// f32's unit round-off.
const U32: f64 = f32::EPSILON as f64 / 2.0;
/// bf16's unit round-off (8 significant bits, round to nearest).
const UBF16: f64 = 1.0 / 256.0;

/// `gamma_n = n u / (1 - n u)`: the relative bound on an f32 sum of `n` products, against the
/// sum of the terms' magnitudes.
fn gamma(n: usize) -> f64 {
    let nu = n as f64 * U32;
    nu / (1.0 - nu)
}

/// The relative bound per product for `precision`: f32 sums of `n` terms; in bf16 each term's
/// two operands are rounded to bf16 (`2 u_bf16 + u_bf16^2`) and the result once more (cuDNN and
/// cuBLAS write bf16, cast back to f32 after): `3 u_bf16 + u_bf16^2 + gamma_n`.
fn relative_bound(precision: Precision, n: usize) -> f64 {
    match precision {
        Precision::F32 => gamma(n),
        Precision::Bf16 => 3.0 * UBF16 + UBF16 * UBF16 + gamma(n),
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = glip_core::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `|got - exact| <= bound` elementwise (`got` from the GPU, `exact` and `bound` f64 on the CPU).
fn assert_within(name: &str, got: &Tensor, exact: &Tensor, bound: &Tensor) -> Result<()> {
    assert_eq!(got.dims(), exact.dims(), "{name}: shapes differ");
    let g: Vec<f64> =
        got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let e: Vec<f64> = exact.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = bound.flatten_all()?.to_vec1()?;
    let mut worst = 0f64;
    for (i, ((g, e), b)) in g.iter().zip(&e).zip(&b).enumerate() {
        let err = (g - e).abs();
        assert!(err <= *b, "{name}[{i}]: {g} vs exact {e}, error {err:e} over the bound {b:e}");
        if *b > 0.0 {
            worst = worst.max(err / b);
        }
    }
    eprintln!("{name}: largest error / bound {worst:.3}");
    Ok(())
}

/// One convolution: `x (b, ci, h, w)`, `w (co, ci / groups, k, k)`.
#[derive(Debug, Clone, Copy)]
struct ConvCase {
    b: usize,
    ci: usize,
    co: usize,
    hw: (usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
    groups: usize,
}

const CONVS: [ConvCase; 5] = [
    ConvCase { b: 2, ci: 16, co: 24, hw: (13, 11), k: 3, stride: 1, pad: 1, groups: 1 },
    ConvCase { b: 3, ci: 8, co: 16, hw: (17, 16), k: 3, stride: 2, pad: 1, groups: 1 },
    ConvCase { b: 2, ci: 32, co: 8, hw: (9, 9), k: 1, stride: 1, pad: 0, groups: 1 },
    ConvCase { b: 2, ci: 3, co: 16, hw: (40, 36), k: 7, stride: 2, pad: 3, groups: 1 },
    ConvCase { b: 2, ci: 24, co: 24, hw: (15, 14), k: 3, stride: 2, pad: 1, groups: 24 },
];

/// `y = conv(x, w)` and the gradients of `sum(y * g)` on `dev` in f32 with `precision`'s
/// autocast, through glip's dispatch (cuDNN on the GPU, im2col and GEMM on the CPU). With
/// `channels_last` the input is laid out channels-last (`glip_kernels::layout`; in bf16 as the
/// ResNet's bf16 activations, cast first): on the GPU cuDNN's NHWC convolutions, whose result
/// must be channels-last too.
fn conv_with_grads(
    c: &ConvCase,
    (x, w, g): (&Tensor, &Tensor, &Tensor),
    dev: &Device,
    precision: Precision,
    channels_last: bool,
) -> Result<[Tensor; 3]> {
    let xv = Var::from_tensor(&x.to_device(dev)?)?;
    let wv = Var::from_tensor(&w.to_device(dev)?)?;
    let input = if channels_last {
        let x = match precision {
            Precision::Bf16 => xv.to_dtype(DType::BF16)?,
            _ => xv.as_tensor().clone(),
        };
        glip_kernels::layout::to_channels_last(&x)?
    } else {
        xv.as_tensor().clone()
    };
    let y = if c.groups == 1 {
        autocast(precision, || glip_kernels::conv::conv2d(&input, &wv, c.stride, c.pad))?
    } else {
        autocast(precision, || {
            glip_kernels::conv::conv2d_grouped(&input, &wv, c.stride, c.pad, c.groups)
        })?
    };
    if channels_last {
        let what = format!("conv {c:?} on {dev:?} {precision}");
        assert!(
            glip_kernels::layout::is_channels_last(&y),
            "{what}: the result is not channels-last"
        );
    }
    let y = y.to_dtype(DType::F32)?;
    let grads = (&y * g.to_device(dev)?)?.sum_all()?.backward()?;
    Ok([y, grads.get(&xv).expect("dx").clone(), grads.get(&wv).expect("dw").clone()])
}

/// The convolution and both gradients of `sum(y * g)` by their definitions, in f64 on the host:
/// `y[b, o, i, j] = sum over (c, ki, kj) of x[b, c, s i - p + ki, s j - p + kj] w[o, c, ki, kj]`
/// (`c` over `o`'s group), `dx` and `dw` the same products of `g` summed the other ways. These
/// are the exact values (to f64 round-off, far under the bounds); candle 0.11.1's own conv2d
/// backward cannot give them for every case: it takes one output padding for both axes, so
/// the input gradient of a stride-2 convolution over 17x16 comes out 17x15.
fn conv_direct(c: &ConvCase, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<[Tensor; 3]> {
    let (h, wd) = c.hw;
    let (oh, ow) = ((h + 2 * c.pad - c.k) / c.stride + 1, (wd + 2 * c.pad - c.k) / c.stride + 1);
    let (cig, cog) = (c.ci / c.groups, c.co / c.groups);
    let flat =
        |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.flatten_all()?.to_vec1() };
    let (xs, ws, gs) = (flat(x)?, flat(w)?, flat(g)?);
    let mut y = vec![0f64; c.b * c.co * oh * ow];
    let mut dx = vec![0f64; xs.len()];
    let mut dw = vec![0f64; ws.len()];
    for b in 0..c.b {
        for o in 0..c.co {
            let group = o / cog;
            for i in 0..oh {
                for j in 0..ow {
                    let yi = ((b * c.co + o) * oh + i) * ow + j;
                    for cl in 0..cig {
                        let ch = group * cig + cl;
                        for ki in 0..c.k {
                            for kj in 0..c.k {
                                let (r, q) = (
                                    (i * c.stride + ki) as isize - c.pad as isize,
                                    (j * c.stride + kj) as isize - c.pad as isize,
                                );
                                if r < 0 || q < 0 || r >= h as isize || q >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * c.ci + ch) * h + r as usize) * wd + q as usize;
                                let wi = ((o * cig + cl) * c.k + ki) * c.k + kj;
                                y[yi] += xs[xi] * ws[wi];
                                dx[xi] += gs[yi] * ws[wi];
                                dw[wi] += gs[yi] * xs[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    let cpu = &Device::Cpu;
    Ok([
        Tensor::from_vec(y, (c.b, c.co, oh, ow), cpu)?,
        Tensor::from_vec(dx, x.dims(), cpu)?,
        Tensor::from_vec(dw, w.dims(), cpu)?,
    ])
}

/// Every case of [`CONVS`] through [`conv_with_grads`] on `dev` against [`conv_direct`],
/// within `precision`'s bound per sum (the same with a channels-last input: the same products
/// and roundings, summed in another order).
fn check_convs(dev: &Device, precision: Precision, channels_last: bool) -> Result<()> {
    for (i, c) in CONVS.iter().enumerate() {
        let (h, wd) = c.hw;
        let (oh, ow) =
            ((h + 2 * c.pad - c.k) / c.stride + 1, (wd + 2 * c.pad - c.k) / c.stride + 1);
        let x = random(&[c.b, c.ci, h, wd], 10 + i as u64);
        let w = random(&[c.co, c.ci / c.groups, c.k, c.k], 20 + i as u64);
        let g = random(&[c.b, c.co, oh, ow], 30 + i as u64);
        let got = conv_with_grads(c, (&x, &w, &g), dev, precision, channels_last)?;
        let exact = conv_direct(c, &x, &w, &g)?;
        // The sums of |terms|: the same computation on |x|, |w| and |g|.
        let magnitudes = conv_direct(c, &x.abs()?, &w.abs()?, &g.abs()?)?;
        // Terms per sum: forward (ci / groups) k^2, input gradient (co / groups) k^2 (at most),
        // weight gradient b oh ow.
        let terms = [c.ci / c.groups * c.k * c.k, c.co / c.groups * c.k * c.k, c.b * oh * ow];
        for (j, name) in ["y", "dx", "dw"].into_iter().enumerate() {
            let bound = (&magnitudes[j] * relative_bound(precision, terms[j]))?;
            let layout = if channels_last { "channels-last" } else { "NCHW" };
            let what = format!("conv {c:?} on {dev:?} {precision} {layout} {name}");
            assert_within(&what, &got[j], &exact[j], &bound)?;
        }
    }
    Ok(())
}

/// The GPU reports a compute capability, and at 8.0 or newer (the lent H100 / H200: 9.0) bf16
/// takes effect there: a driver that did not answer would silently keep bf16, and one that
/// answered wrongly would turn every bf16 row of the device check into f32.
#[test]
fn bf16_takes_effect_on_this_gpu() {
    let dev = gpu();
    let Device::Cuda(d) = &dev else { unreachable!("gpu() is CUDA") };
    let (major, minor) = d.cuda_stream().context().compute_capability().expect("the driver says");
    let why = glip_kernels::bf16::fallback_reason(Precision::Bf16, &dev);
    assert_eq!(why.is_none(), major >= 8, "compute capability {major}.{minor}: {why:?}");
}

/// `auto` takes the GPU in this CUDA build, without a note.
#[test]
fn auto_takes_the_gpu() {
    let (dev, note) = glip_train::device::DeviceSpec::Auto.resolve_noted().unwrap();
    assert!(dev.is_cuda() && note.is_none(), "{dev:?}: {note:?}");
}

/// The direct reference itself, on the host: glip's CPU convolutions (im2col and GEMM, both
/// gradients; held against PyTorch by the parity suite) agree with it within the same f32
/// bounds, every case including the 17x16 stride-2 one. Needs no GPU.
#[test]
fn the_direct_reference_agrees_with_the_cpu_convolutions() -> Result<()> {
    check_convs(&Device::Cpu, Precision::F32, false)?;
    check_convs(&Device::Cpu, Precision::F32, true)
}

#[test]
fn convolutions_and_both_gradients_match_exact_values_in_f32() -> Result<()> {
    check_convs(&gpu(), Precision::F32, false)
}

#[test]
fn convolutions_and_both_gradients_match_exact_values_in_bf16() -> Result<()> {
    check_convs(&gpu(), Precision::Bf16, false)
}

/// cuDNN's NHWC convolutions (a channels-last input, `GLIP_CHANNELS_LAST=1`'s data flow), every
/// case of [`CONVS`] with both gradients, f32 and bf16 activations.
#[test]
fn channels_last_convolutions_and_both_gradients_match_exact_values() -> Result<()> {
    check_convs(&gpu(), Precision::F32, true)?;
    check_convs(&gpu(), Precision::Bf16, true)
}

/// `Linear` `(4, 7, 96) -> 40` with bias, and the gradients of `sum(y * g)`: each output a sum
/// of 96 products and the bias (97 terms), the input gradient of 40, the weight gradient of 28.
fn check_linear(precision: Precision) -> Result<()> {
    let dev = gpu();
    let (x, w, b, g) =
        (random(&[4, 7, 96], 1), random(&[40, 96], 2), random(&[40], 3), random(&[4, 7, 40], 4));
    let run =
        |x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor, dev: &Device, dt| -> Result<[Tensor; 4]> {
            let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?);
            let (xv, wv, bv) = (var(x)?, var(w)?, var(b)?);
            let lin = glip_kernels::nn::Linear::from_tensors(
                wv.as_tensor().clone(),
                Some(bv.as_tensor().clone()),
            );
            let y = if dev.is_cpu() {
                lin.forward(&xv)?
            } else {
                autocast(precision, || lin.forward(&xv))?
            };
            let grads = (&y * g.to_dtype(dt)?.to_device(dev)?)?.sum_all()?.backward()?;
            let get = |v: &Var| grads.get(v).expect("gradient").clone();
            Ok([y.clone(), get(&xv), get(&wv), get(&bv)])
        };
    let got = run(&x, &w, &b, &g, &dev, DType::F32)?;
    let exact = run(&x, &w, &b, &g, &Device::Cpu, DType::F64)?;
    let mag = run(&x.abs()?, &w.abs()?, &b.abs()?, &g.abs()?, &Device::Cpu, DType::F64)?;
    // The bias is added in f32 after the product: one more term, never rounded to bf16.
    for (j, (name, terms)) in
        [("y", 97), ("dx", 40), ("dw", 28), ("db", 28)].into_iter().enumerate()
    {
        let rel = if name == "db" { gamma(terms) } else { relative_bound(precision, terms) };
        assert_within(
            &format!("linear {precision} {name}"),
            &got[j],
            &exact[j],
            &(&mag[j] * rel)?,
        )?;
    }
    Ok(())
}

#[test]
fn linear_and_its_gradients_match_exact_values_in_f32_and_bf16() -> Result<()> {
    check_linear(Precision::F32)?;
    check_linear(Precision::Bf16)
}

/// Inside a bf16 autocast `Linear` computes with cuBLAS's bf16 product and an f32 result
/// (glip-kernels' `cuda_linear`): its outputs are not rounded to bf16 (candle's bf16 product,
/// `GLIP_BF16_LINEAR=candle`, writes bf16, so every output of that path is a bf16 value). A
/// gradient-free weight is cast once per scope: two calls in one scope give the same result,
/// and a second backward of the same graph (a fresh cast of the input) the same gradients.
#[test]
fn the_bf16_linear_writes_f32_results_and_repeats() -> Result<()> {
    let dev = gpu();
    let x = Var::from_tensor(&random(&[3, 5, 64], 5).to_device(&dev)?)?;
    let w = random(&[48, 64], 6).to_device(&dev)?;
    let lin = glip_kernels::nn::Linear::from_tensors(w, None);
    let (y, again) = autocast(Precision::Bf16, || -> Result<(Tensor, Tensor)> {
        Ok((lin.forward(&x)?, lin.forward(&x)?))
    })?;
    assert_eq!(y.dtype(), DType::F32);
    let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
    let rounded: Vec<f32> = bf16_values(&y.flatten_all()?)?.to_vec1()?;
    let off_grid = v.iter().zip(&rounded).filter(|(a, b)| a != b).count();
    let expected = if glip_kernels_bf16_linear_is_candle() { 0 } else { v.len() / 2 };
    if expected == 0 {
        assert_eq!(off_grid, 0, "candle's path wrote values that are not bf16");
    } else {
        assert!(off_grid >= expected, "{off_grid} of {} outputs off the bf16 grid", v.len());
    }
    assert_eq!(v, again.flatten_all()?.to_vec1::<f32>()?, "the same layer gave another result");
    let loss = (&y * &y)?.sum_all()?;
    let g1 = loss.backward()?.get(&x).expect("dx").flatten_all()?.to_vec1::<f32>()?;
    let g2 = loss.backward()?.get(&x).expect("dx").flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(g1, g2, "a second backward of the graph gave other gradients");
    Ok(())
}

fn glip_kernels_bf16_linear_is_candle() -> bool {
    std::env::var("GLIP_BF16_LINEAR").is_ok_and(|v| v == "candle")
}

/// `f` on the GPU in f32 and on the CPU in f64, with the gradients of `sum(f(x) * g)` for every
/// input, compared at the fixture README's tolerances (forward `1e-4 + 1e-3 |b|`, gradients
/// `1e-3 max|b| + 1e-5`): these are normalisations, whose error analysis the product bounds
/// above do not cover.
fn check_normalisation(
    name: &str,
    inputs: &[Tensor],
    g: &Tensor,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let run = |dev: &Device, dt| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dt)?.to_device(dev)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let grads = (&y * g.to_dtype(dt)?.to_device(dev)?)?.sum_all()?.backward()?;
        Ok((y, vars.iter().map(|v| grads.get(v).expect("gradient").clone()).collect()))
    };
    let (y, dys) = run(&gpu(), DType::F32)?;
    let (e, des) = run(&Device::Cpu, DType::F64)?;
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    glip_testing::assert_forward_close(name, &cpu(&y)?, &e.to_dtype(DType::F32)?)?;
    for (i, (d, e)) in dys.iter().zip(&des).enumerate() {
        glip_testing::assert_grad_close(
            &format!("{name} d{i}"),
            &cpu(d)?,
            &e.to_dtype(DType::F32)?,
        )?;
    }
    Ok(())
}

/// glip's own CUDA kernels for these (`glip_kernels::cuda_layers`, unless `GLIP_CUDA_COMPOSED=1`)
/// on shapes that reach every branch of their launches: rows shorter than a warp and longer
/// than a block (256 threads), more rows or channels than threads, planes of one element,
/// masked (`-inf`) softmax entries.
#[test]
fn batch_norm_softmax_and_layer_norm_with_gradients_match_exact_values() -> Result<()> {
    for (i, shape) in [[4, 6, 5, 7], [8, 32, 16, 16], [16, 3, 1, 1]].into_iter().enumerate() {
        let seed = 5 + 10 * i as u64;
        let x = (random(&shape, seed) + 1.5)?;
        let c = shape[1];
        let (wt, bs) = ((random(&[c], seed + 1).abs()? + 0.5)?, random(&[c], seed + 2));
        check_normalisation(
            &format!("batch_norm_train {shape:?}"),
            &[x, wt, bs],
            &random(&shape, seed + 3),
            |t| Ok(glip_kernels::norm::batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0),
        )?;
    }
    for (i, d) in [5usize, 33, 300].into_iter().enumerate() {
        let seed = 40 + 10 * i as u64;
        let shape = [3, 70, d];
        let mut s: Vec<f32> = (random(&shape, seed) * 3.0)?.flatten_all()?.to_vec1()?;
        for r in (0..3 * 70).step_by(4) {
            s[r * d + r % d] = f32::NEG_INFINITY;
        }
        let s = Tensor::from_vec(s, &shape, &Device::Cpu)?;
        check_normalisation(
            &format!("softmax_last {shape:?}"),
            &[s],
            &random(&shape, seed + 1),
            |t| glip_kernels::fused::softmax_last(&t[0]),
        )?;
        let l = random(&shape, seed + 2);
        let (lw, lb) = ((random(&[d], seed + 3).abs()? + 0.5)?, random(&[d], seed + 4));
        check_normalisation(
            &format!("layer_norm {shape:?}"),
            &[l, lw, lb],
            &random(&shape, seed + 5),
            |t| glip_kernels::fused::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        )?;
    }
    Ok(())
}

/// The frozen batch norm's affine map and ReLU (glip's kernel on CUDA) against the CPU op,
/// with and without a residual, values and gradients at the fixture README's tolerances. Every
/// pre-activation is at least 0.01 from zero, so that no rounding (FMA on the GPU) decides a
/// mask.
#[test]
fn the_frozen_batch_norm_and_relu_match_the_cpu_op() -> Result<()> {
    let shape = [4usize, 16, 9, 11];
    let (c, hw) = (shape[1], shape[2] * shape[3]);
    let scale: Vec<f32> =
        random(&[c], 60).to_vec1::<f32>()?.iter().map(|v| v.abs() + 0.5).collect();
    let shift: Vec<f32> = random(&[c], 61).to_vec1()?;
    let r = random(&shape, 62);
    let rv: Vec<f32> = r.flatten_all()?.to_vec1()?;
    let pre: Vec<f32> = random(&shape, 63).flatten_all()?.to_vec1()?;
    let g = random(&shape, 64);
    for with_r in [false, true] {
        let x: Vec<f32> = (0..pre.len())
            .map(|i| {
                let ch = (i / hw) % c;
                let p = pre[i].signum() * (0.01 + pre[i].abs());
                (p - shift[ch] - if with_r { rv[i] } else { 0.0 }) / scale[ch]
            })
            .collect();
        let x = Tensor::from_vec(x, &shape[..], &Device::Cpu)?;
        let run = |dev: &Device| -> Result<[Tensor; 3]> {
            let xv = Var::from_tensor(&x.to_device(dev)?)?;
            let rv = Var::from_tensor(&r.to_device(dev)?)?;
            let st = Tensor::new(scale.as_slice(), dev)?;
            let sh = Tensor::new(shift.as_slice(), dev)?;
            let y =
                glip_kernels::affine::affine_relu(&xv, &st, &sh, with_r.then_some(rv.as_tensor()))?;
            let grads = (&y * g.to_device(dev)?)?.sum_all()?.backward()?;
            let dr = match grads.get(&rv) {
                Some(d) => d.clone(),
                None => rv.zeros_like()?,
            };
            Ok([y, grads.get(&xv).expect("dx").clone(), dr])
        };
        let (got, want) = (run(&gpu())?, run(&Device::Cpu)?);
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let name = if with_r { "affine-add-relu" } else { "affine-relu" };
        glip_testing::assert_forward_close(name, &cpu(&got[0])?, &want[0])?;
        glip_testing::assert_grad_close(&format!("{name} dx"), &cpu(&got[1])?, &want[1])?;
        glip_testing::assert_grad_close(&format!("{name} dr"), &cpu(&got[2])?, &want[2])?;
    }
    Ok(())
}

/// Dropout on CUDA draws its mask on the device: every element is kept (times `1 / (1 - p)`)
/// or dropped, the kept fraction is within 5 standard deviations of `1 - p`, the same stream
/// draws the same mask, and the gradient is the mask.
#[test]
fn dropout_on_the_gpu_keeps_one_minus_p_and_repeats_per_stream() -> Result<()> {
    let (n, p) = (200_000usize, 0.1f32);
    let scale = 1.0 / (1.0 - p);
    let x = Var::from_tensor(&Tensor::ones(n, DType::F32, &gpu())?)?;
    glip_kernels::nn::seed_dropout(7);
    let y = glip_kernels::nn::dropout(&x, p, true)?;
    glip_kernels::nn::seed_dropout(7);
    let again = glip_kernels::nn::dropout(&x, p, true)?;
    let grad = y.sum_all()?.backward()?.get(&x).expect("dx").to_vec1::<f32>()?;
    let (y, again) = (y.to_vec1::<f32>()?, again.to_vec1::<f32>()?);
    assert!(y.iter().all(|&v| v == 0.0 || v == scale), "values other than 0 and {scale}");
    assert_eq!(y, again, "the same stream drew another mask");
    assert_eq!(grad, y, "the gradient is not the mask");
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64;
    let (mean, sd) = (n as f64 * 0.9, (n as f64 * 0.1 * 0.9).sqrt());
    assert!((kept - mean).abs() <= 5.0 * sd, "kept {kept} of {n}, expected {mean} +- {sd}");
    Ok(())
}

/// The fused dropout (`glip_dropout`: the mask drawn and applied in one pass, the backward the
/// same pass over the gradient) against the same op on the CPU, which computes the same hash:
/// outputs and gradients bit for bit (one f32 product per element on both).
#[test]
fn the_fused_dropout_and_its_gradient_match_the_cpu_op_bit_for_bit() -> Result<()> {
    let op = glip_kernels::nn::HashDropout { seed: 0xd80f, p: 0.1, scale: 1.0 / 0.9 };
    let (x, dy) = (random(&[64, 300], 31), random(&[64, 300], 32));
    let run = |dev: &Device| -> Result<(Vec<u32>, Vec<u32>)> {
        let xv = Var::from_tensor(&x.to_device(dev)?)?;
        let y = xv.as_tensor().apply_op1(op)?;
        let g = (&y * dy.to_device(dev)?)?.sum_all()?.backward()?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            let v: Vec<f32> = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            Ok(v.iter().map(|v| v.to_bits()).collect())
        };
        Ok((bits(&y)?, bits(g.get(&xv).expect("dx"))?))
    };
    let (gpu_y, gpu_dx) = run(&gpu())?;
    let (cpu_y, cpu_dx) = run(&Device::Cpu)?;
    assert_eq!(gpu_y, cpu_y, "outputs differ");
    assert_eq!(gpu_dx, cpu_dx, "gradients differ");
    Ok(())
}

/// ReLU and GELU (`glip_kernels::fused`) on the GPU against the CPU: values and ReLU's
/// gradient bit for bit (candle's kernels forward; `dy * 1` or `dy * 0` backward), GELU's
/// gradient within twice the CPU test's bound of the exact derivative, `2 (16 u ((1 + |erf|) /
/// 2 + |x phi|) + (x^2 / 2) u |x phi|) |dy|` (CUDA's `erff` / `expf` against libm's, each
/// within 2 ulp).
#[test]
fn relu_and_gelu_with_their_gradients_match_the_cpu() -> Result<()> {
    let (x, dy) = (random(&[40, 250], 33), random(&[40, 250], 34));
    let run = |dev: &Device, gelu: bool| -> Result<(Tensor, Tensor)> {
        let xv = Var::from_tensor(&(x.to_device(dev)? * 2.0)?)?;
        let y = if gelu {
            glip_kernels::fused::gelu_erf(xv.as_tensor())?
        } else {
            glip_kernels::fused::relu(xv.as_tensor())?
        };
        let g = (&y * dy.to_device(dev)?)?.sum_all()?.backward()?;
        let dx = g.get(&xv).expect("dx").to_device(&Device::Cpu)?;
        Ok((y.to_device(&Device::Cpu)?, dx))
    };
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    };
    let (gy, gdx) = run(&gpu(), false)?;
    let (cy, cdx) = run(&Device::Cpu, false)?;
    assert_eq!(bits(&gy)?, bits(&cy)?, "relu values");
    assert_eq!(bits(&gdx)?, bits(&cdx)?, "relu gradients");
    let (gy, gdx) = run(&gpu(), true)?;
    let (cy, _) = run(&Device::Cpu, true)?;
    let (yv, cv): (Vec<f32>, Vec<f32>) =
        (gy.flatten_all()?.to_vec1()?, cy.flatten_all()?.to_vec1()?);
    let xs: Vec<f32> = (x * 2.0)?.flatten_all()?.to_vec1()?;
    // candle's forward kernels, `x Phi(x)`: the GPU's and libm's each within a few roundings
    // of the terms `|x| (1 + |erf|) / 2` (Phi's sum cancels for negative x), so within
    // `16 u` of them of each other.
    for (i, (a, b)) in yv.iter().zip(&cv).enumerate() {
        let v = f64::from(xs[i]);
        let erf = candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2);
        let bound = 16.0 * U32 * 0.5 * v.abs() * (1.0 + erf.abs());
        assert!(f64::from((a - b).abs()) <= bound, "gelu[{i}] at x {v}: {a} vs {b}");
    }
    let (dys, dxs): (Vec<f32>, Vec<f32>) =
        (dy.flatten_all()?.to_vec1()?, gdx.flatten_all()?.to_vec1()?);
    for i in 0..xs.len() {
        let (v, g) = (f64::from(xs[i]), f64::from(dys[i]));
        let erf = candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2);
        let xpdf = v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let want = g * (0.5 * (1.0 + erf) + xpdf);
        let bound = 2.0
            * (16.0 * U32 * (0.5 * (1.0 + erf.abs()) + xpdf.abs())
                + 0.5 * v * v * U32 * xpdf.abs())
            * g.abs();
        let err = (f64::from(dxs[i]) - want).abs();
        assert!(
            err <= bound,
            "gelu gradient at x {v}: {} vs {want}, error {err:e} > {bound:e}",
            dxs[i]
        );
    }
    Ok(())
}

/// The suite only means something on the GPU: `GLIP_TEST_DEVICE` must name one (the parity
/// modules above read it).
#[test]
fn the_parity_modules_run_on_the_gpu() {
    assert!(
        glip_testing::device().is_cuda(),
        "set GLIP_TEST_DEVICE=cuda: the parity modules of this binary would run on the CPU"
    );
}

/// The ResNet stem's max-pool on CUDA (glip's kernels, or candle's composition with
/// `GLIP_CUDA_COMPOSED=1`; with its gradient) against the CPU kernel: a maximum is exact, so
/// values agree bit for bit; an input that is the maximum of up to four overlapping windows
/// collects up to four gradient terms, which the composition sums in another order, so
/// gradients agree within `gamma_4` of the sum of their magnitudes (the same argument as the CPU
/// test in glip-backbone's layers; glip's kernel adds them in the CPU's order).
#[test]
fn the_stem_max_pool_and_its_gradient_match_the_cpu_kernel() -> Result<()> {
    let x = random(&[2, 3, 17, 14], 15);
    let g = random(&[2, 3, 9, 7], 16);
    let run = |dev: &Device, g: &Tensor| -> Result<(Tensor, Tensor)> {
        let v = Var::from_tensor(&x.to_device(dev)?)?;
        let y = glip_backbone::layers::max_pool_3x3_s2_p1(&v)?;
        let grads = (&y * g.to_device(dev)?)?.sum_all()?.backward()?;
        Ok((y.to_device(&Device::Cpu)?, grads.get(&v).expect("dx").to_device(&Device::Cpu)?))
    };
    let (y, dx) = run(&gpu(), &g)?;
    let (y_cpu, dx_cpu) = run(&Device::Cpu, &g)?;
    let (_, dx_mag) = run(&Device::Cpu, &g.abs()?)?;
    let zero = y.zeros_like()?.to_dtype(DType::F64)?;
    assert_within("max pool y", &y, &y_cpu.to_dtype(DType::F64)?, &zero)?;
    let bound = (dx_mag.to_dtype(DType::F64)? * gamma(4))?;
    assert_within("max pool dx", &dx, &dx_cpu.to_dtype(DType::F64)?, &bound)
}

/// `v` rounded to bf16 (ties to even) and back to f32: candle's cast on the CPU.
fn bf16_values(v: &Tensor) -> Result<Tensor> {
    v.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

/// The stem pool on bf16 activations: the maxima are the inputs' bf16 values and each input's
/// gradient the f32 sum of its (up to four) bf16 terms in the CPU kernel's order, rounded once
/// to bf16: equal to the CPU's f32 pool of the same values, rounded, bit for bit.
#[test]
fn the_stem_max_pool_on_bf16_matches_the_cpu_kernel_rounded() -> Result<()> {
    let x = bf16_values(&random(&[2, 3, 17, 14], 17))?;
    let g = bf16_values(&random(&[2, 3, 9, 7], 18))?;
    let v = Var::from_tensor(&x.to_device(&gpu())?.to_dtype(DType::BF16)?)?;
    let y = glip_backbone::layers::max_pool_3x3_s2_p1(&v)?;
    assert_eq!(y.dtype(), DType::BF16, "the pool left bf16");
    let gy = g.to_device(&gpu())?.to_dtype(DType::BF16)?;
    let dx = (&y * gy)?.sum_all()?.backward()?.get(&v).expect("dx").clone();
    let cpu = Var::from_tensor(&x)?;
    let y_cpu = glip_kernels::pool::max_pool_3x3_s2_p1(&cpu)?;
    let dx_cpu = (&y_cpu * &g)?.sum_all()?.backward()?.get(&cpu).expect("dx").clone();
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let zero = |t: &Tensor| t.zeros_like()?.to_dtype(DType::F64);
    assert_within("bf16 max pool y", &y, &host(&y_cpu)?, &zero(&y_cpu)?)?;
    assert_within("bf16 max pool dx", &dx, &host(&bf16_values(&dx_cpu)?)?, &zero(&dx_cpu)?)
}

/// The affine map without its ReLU (a downsample's frozen batch norm), with and without a
/// residual, in f32 against the CPU op at the fixture README's tolerances; and on bf16
/// activations (bf16 inputs, f32 arithmetic, one rounding): each output within `2^-8 |v|` of
/// the CPU's f32 result `v` plus `2^-23 (|x s| + |t| + |r|)` (a fused multiply-add may round
/// differently), `dx` within `2^-8 |dx|` plus `2^-23 |dx|`, the residual's gradient exactly
/// the CPU's (it is `dy` or 0). Pre-activations at least 0.1 from zero.
#[test]
fn the_channel_affine_with_and_without_relu_in_f32_and_bf16_matches_the_cpu_op() -> Result<()> {
    let shape = [3usize, 8, 7, 9];
    let (c, hw) = (shape[1], shape[2] * shape[3]);
    let scale: Vec<f32> =
        random(&[c], 70).to_vec1::<f32>()?.iter().map(|v| v.abs() + 0.5).collect();
    let shift: Vec<f32> = random(&[c], 71).to_vec1()?;
    let ss = Tensor::cat(
        &[
            Tensor::new(scale.as_slice(), &Device::Cpu)?,
            Tensor::new(shift.as_slice(), &Device::Cpu)?,
        ],
        0,
    )?
    .reshape((2, c))?;
    let r = bf16_values(&random(&shape, 72))?;
    let rv: Vec<f32> = r.flatten_all()?.to_vec1()?;
    let pre: Vec<f32> = random(&shape, 73).flatten_all()?.to_vec1()?;
    let g = bf16_values(&random(&shape, 74))?;
    for (with_r, relu, dtype) in [
        (false, false, DType::F32),
        (true, false, DType::F32),
        (false, true, DType::BF16),
        (true, true, DType::BF16),
        (true, false, DType::BF16),
    ] {
        let x: Vec<f32> = (0..pre.len())
            .map(|i| {
                let ch = (i / hw) % c;
                let p = pre[i].signum() * (0.1 + pre[i].abs());
                (p - shift[ch] - if with_r { rv[i] } else { 0.0 }) / scale[ch]
            })
            .collect();
        let x = bf16_values(&Tensor::from_vec(x, &shape[..], &Device::Cpu)?)?;
        let run = |dev: &Device, dt: DType| -> Result<[Tensor; 3]> {
            let xv = Var::from_tensor(&x.to_device(dev)?.to_dtype(dt)?)?;
            let rv = Var::from_tensor(&r.to_device(dev)?.to_dtype(dt)?)?;
            let y = glip_kernels::affine::channel_affine(
                &xv,
                &ss.to_device(dev)?,
                with_r.then_some(rv.as_tensor()),
                relu,
            )?;
            assert_eq!(y.dtype(), dt, "the affine map changed the activations' dtype");
            let grads = (&y * g.to_device(dev)?.to_dtype(dt)?)?.sum_all()?.backward()?;
            let dr = match grads.get(&rv) {
                Some(d) => d.clone(),
                None => rv.zeros_like()?,
            };
            let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            Ok([host(&y)?, host(grads.get(&xv).expect("dx"))?, host(&dr)?])
        };
        let (got, want) = (run(&gpu(), dtype)?, run(&Device::Cpu, DType::F32)?);
        let name = format!("channel affine ({dtype:?}, residual {with_r}, relu {relu})");
        if dtype == DType::F32 {
            glip_testing::assert_forward_close(&name, &got[0], &want[0])?;
            glip_testing::assert_grad_close(&format!("{name} dx"), &got[1], &want[1])?;
            glip_testing::assert_grad_close(&format!("{name} dr"), &got[2], &want[2])?;
            continue;
        }
        let f64 = |t: &Tensor| t.to_dtype(DType::F64);
        let per = |v: &[f32]| Tensor::new(v, &Device::Cpu)?.reshape((1, c, 1, 1));
        let terms =
            ((x.broadcast_mul(&per(&scale)?)?.abs()?.broadcast_add(&per(&shift)?.abs()?))?
                + if with_r { r.abs()? } else { r.zeros_like()? })?;
        let bound_y =
            ((f64(&want[0].abs()?)? * 2f64.powi(-8))? + (f64(&terms)? * 2f64.powi(-23))?)?;
        assert_within(&format!("{name} y"), &got[0], &f64(&want[0])?, &bound_y)?;
        let bound_dx = (f64(&want[1].abs()?)? * (2f64.powi(-8) + 2f64.powi(-23)))?;
        assert_within(&format!("{name} dx"), &got[1], &f64(&want[1])?, &bound_dx)?;
        assert_within(
            &format!("{name} dr"),
            &got[2],
            &f64(&want[2])?,
            &f64(&want[2].zeros_like()?)?,
        )?;
    }
    Ok(())
}

/// A batch norm's constants outside training, one kernel on the GPU, against the CPU's
/// composition (the same operations): the scale within `2^-23 |s|`, the shift within
/// `2^-23 (|rm s| + |t|)` (a fused multiply-add may round once less).
#[test]
fn batch_norm_constants_on_the_gpu_match_the_cpu_composition() -> Result<()> {
    let c = 1000usize;
    let (w, b, rm) = (random(&[c], 80), random(&[c], 81), (random(&[c], 82) * 2.0)?);
    let rv = (random(&[c], 83).sqr()? + 1e-3)?;
    let on = |dev: &Device| -> Result<Tensor> {
        let [w, b, rm, rv] = [&w, &b, &rm, &rv].map(|t| t.to_device(dev).expect("copy"));
        glip_kernels::affine::batch_norm_constants(&w, &b, &rm, &rv, 1e-5)?.to_device(&Device::Cpu)
    };
    let (got, want) = (on(&gpu())?, on(&Device::Cpu)?);
    let f64 = |t: &Tensor| t.to_dtype(DType::F64);
    let (s, t) = (want.get(0)?, want.get(1)?);
    let bound_s = (f64(&s.abs()?)? * 2f64.powi(-23))?;
    assert_within("bn constants scale", &got.get(0)?, &f64(&s)?, &bound_s)?;
    let bound_t = ((f64(&(&rm * &s)?.abs()?)? + f64(&t.abs()?)?)? * 2f64.powi(-23))?;
    assert_within("bn constants shift", &got.get(1)?, &f64(&t)?, &bound_t)
}

/// A convolution on bf16 activations (inside a bf16 autocast, as the ResNet's data flow runs
/// it): the result stays bf16, the input's gradient is bf16 and the f32 weight's f32. Values
/// against exact ones: the input is exact (bf16 values), the weight rounded to bf16 and the
/// result written in bf16, `2 u_bf16 + u_bf16^2 + gamma_n` relative to the sum of the
/// magnitudes of the products (the gradients alike: `dy` exact, `w` or `x` rounded).
#[test]
fn a_convolution_on_bf16_activations_stays_bf16_within_its_bound() -> Result<()> {
    let c = CONVS[1];
    let (h, w) = c.hw;
    let x = bf16_values(&random(&[c.b, c.ci, h, w], 90))?;
    let wt = random(&[c.co, c.ci / c.groups, c.k, c.k], 91);
    let oh = (h + 2 * c.pad - c.k) / c.stride + 1;
    let ow = (w + 2 * c.pad - c.k) / c.stride + 1;
    let g = bf16_values(&random(&[c.b, c.co, oh, ow], 92))?;
    let dev = gpu();
    let xv = Var::from_tensor(&x.to_device(&dev)?.to_dtype(DType::BF16)?)?;
    let wv = Var::from_tensor(&wt.to_device(&dev)?)?;
    let y = autocast(Precision::Bf16, || glip_kernels::conv::conv2d(&xv, &wv, c.stride, c.pad))?;
    assert_eq!(y.dtype(), DType::BF16, "a bf16 activation came out {:?}", y.dtype());
    let grads = (&y * g.to_device(&dev)?.to_dtype(DType::BF16)?)?.sum_all()?.backward()?;
    let (dx, dw) = (grads.get(&xv).expect("dx"), grads.get(&wv).expect("dw"));
    assert_eq!((dx.dtype(), dw.dtype()), (DType::BF16, DType::F32));
    let [ey, edx, edw] = conv_direct(&c, &x, &wt, &g)?;
    let [my, mdx, mdw] = conv_direct(&c, &x.abs()?, &wt.abs()?, &g.abs()?)?;
    let rel = |n: usize| 2.0 * UBF16 + UBF16 * UBF16 + gamma(n);
    let n_y = c.ci / c.groups * c.k * c.k;
    assert_within("bf16-activation conv y", &y, &ey, &(my * rel(n_y))?)?;
    assert_within("bf16-activation conv dx", dx, &edx, &(mdx * rel(c.co * c.k * c.k))?)?;
    assert_within("bf16-activation conv dw", dw, &edw, &(mdw * rel(c.b * oh * ow))?)
}

/// Query selection's top-k on the device equals the host's, index for index (a choice, no
/// arithmetic: ties by index, both zeros, infinities): rows of a 512-pixel C3+C4 memory (5120
/// tokens, the kernel's tiles of 256 running 20 times), values on a coarse grid so that many
/// tie, `k` 900 and all of them; with `GLIP_CUDA_COMPOSED` the device path is the host's.
#[test]
fn top_k_on_the_gpu_picks_what_the_host_picks() -> Result<()> {
    let x = (random(&[3, 5120], 17) * 4.0)?.round()?;
    let x =
        x.slice_assign(&[0..1, 0..3], &Tensor::new(&[[f32::INFINITY, -0.0, 0.0]], &Device::Cpu)?)?;
    for k in [900, 5120] {
        let want: Vec<Vec<u32>> = glip_kernels::topk::top_k_indices(&x, k)?.to_vec2()?;
        let got = glip_kernels::topk::top_k_indices(&x.to_device(&gpu())?, k)?;
        assert!(got.device().is_cuda(), "the indices stay on the GPU");
        assert_eq!(got.to_vec2::<u32>()?, want, "k {k}");
    }
    Ok(())
}

/// AdamW's composed update on CUDA against the CPU's in-place passes over three steps, with
/// clipping and decay, within `k u (4|w| + 320 lr)` after `k` steps (the bound and its
/// derivation are those of the CPU test in glip-kernels' `optim`), per tensor and as the
/// trainer runs it, every parameter in one launch (`adamw_update_all`, here two tensors of
/// other sizes with their own rates and decay); the EMA within the bound carried through its
/// recurrence below; the gradient-norm total within f64 round-off.
#[test]
fn adamw_ema_and_the_gradient_norm_match_the_cpu_passes() -> Result<()> {
    use glip_kernels::optim::{
        adamw_update, adamw_update_all, ema_update, moments_like, sum_squares_all, AdamWStep,
    };
    let dev = gpu();
    let w0 = random(&[257, 9], 17);
    // Two more weights, updated together on the GPU: one over several of the kernel's chunks
    // (32,768 elements), one of a single element.
    let x0 = [random(&[70_001], 18), random(&[1], 19)];
    let xc: Vec<Var> = x0.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let xg: Vec<Var> =
        x0.iter().map(|x| Var::from_tensor(&x.to_device(&dev)?)).collect::<Result<_>>()?;
    let mut xmc: Vec<Tensor> = x0.iter().map(moments_like).collect::<Result<_>>()?;
    let mut xmg: Vec<Tensor> =
        x0.iter().map(|x| moments_like(x)?.to_device(&dev)).collect::<Result<_>>()?;
    let (wc, wg) = (Var::from_tensor(&w0)?, Var::from_tensor(&w0.to_device(&dev)?)?);
    let (mut mc, mut mg) = (moments_like(&w0)?, moments_like(&w0)?.to_device(&dev)?);
    let (mut ec, mut eg) = (w0.copy()?, w0.to_device(&dev)?);
    let lr = 1e-2;
    let mut ema_bound = w0.zeros_like()?.to_dtype(DType::F64)?;
    for t in 1..=3 {
        let g = (random(&[257, 9], 20 + t as u64) * (0.8 / t as f64))?;
        let h = AdamWStep {
            clip: 0.7,
            b1: 0.9,
            b2: 0.999,
            bc1: 1.0 - 0.9f64.powi(t),
            bc2: 1.0 - 0.999f64.powi(t),
            lr,
            weight_decay: 0.05,
            eps: 1e-8,
        };
        adamw_update(&wc, &mut mc, &g, &h)?;
        adamw_update(&wg, &mut mg, &g.to_device(&dev)?, &h)?;
        let want = wc.as_tensor().to_dtype(DType::F64)?;
        let bound = (((want.abs()? * 4.0)? + 320.0 * lr)? * (t as f64 * U32))?;
        assert_within(&format!("adamw step {t}"), wg.as_tensor(), &want, &bound)?;
        let hx = [AdamWStep { lr: 3e-3, weight_decay: 0.0, ..h }, AdamWStep { lr: 2e-2, ..h }];
        let gx: Vec<Tensor> = x0
            .iter()
            .enumerate()
            .map(|(i, x)| random(x.dims(), 40 + 2 * t as u64 + i as u64))
            .collect();
        let gxg: Vec<Tensor> = gx.iter().map(|g| g.to_device(&dev)).collect::<Result<_>>()?;
        let mut items: Vec<_> = xg
            .iter()
            .zip(xmg.iter_mut())
            .zip(&gxg)
            .zip(hx)
            .map(|(((w, m), g), h)| (w, m, g, h))
            .collect();
        adamw_update_all(&mut items)?;
        for i in 0..2 {
            adamw_update(&xc[i], &mut xmc[i], &gx[i], &hx[i])?;
            let want = xc[i].as_tensor().to_dtype(DType::F64)?;
            let bound = (((want.abs()? * 4.0)? + 320.0 * hx[i].lr)? * (t as f64 * U32))?;
            assert_within(&format!("adamw (all) {i} step {t}"), xg[i].as_tensor(), &want, &bound)?;
        }
        // `e = d e + (1 - d) w`: the difference carried from the last step shrinks by `d`, the
        // weights' difference enters with `1 - d`, and each side's three roundings add at most
        // `3u max(|e|, |w|)`.
        let scale = ec.to_dtype(DType::F64)?.abs()?.maximum(&want.abs()?)?;
        ema_bound = ((ema_bound * 0.9)? + (&bound * 0.1)? + (scale * (3.0 * U32))?)?;
        ema_update(&mut ec, wc.as_tensor(), 0.9)?;
        ema_update(&mut eg, wg.as_tensor(), 0.9)?;
        assert_within(&format!("ema step {t}"), &eg, &ec.to_dtype(DType::F64)?, &ema_bound)?;
        let parts = [g.clone(), (&g * 2.0)?];
        let on_gpu = parts.iter().map(|p| p.to_device(&dev)).collect::<Result<Vec<_>>>()?;
        let a = sum_squares_all(&on_gpu.iter().collect::<Vec<_>>())?;
        let b = sum_squares_all(&parts.iter().collect::<Vec<_>>())?;
        // f64 sums of 2 x 2,313 squares of f32 numbers, in different orders.
        assert!((a - b).abs() <= 4626.0 * f64::EPSILON * b, "gradient norm^2 {a} vs {b}");
    }
    Ok(())
}

/// candle's strided kernels read their dims and strides from device memory; the vendored
/// candle-core uploads each such vector once and shares it (`params_from_vec`,
/// vendor/README.md). A layout reused with other data, and layouts past the cache's bound
/// (16,384 vectors, after which it empties), give the CPU's values bit for bit (a copy and one
/// f32 sum or product per element: the same arithmetic on both devices).
#[test]
fn strided_kernels_reusing_uploaded_layouts_match_the_cpu() -> Result<()> {
    let dev = gpu();
    let check = |rows: usize, seed: u64| -> Result<()> {
        let (a, b) = (random(&[3, rows], seed), random(&[1, 3], seed + 1));
        let cpu = (a.t()?.broadcast_add(&b)? * a.t()?)?.to_vec2::<f32>()?;
        let (ag, bg) = (a.to_device(&dev)?, b.to_device(&dev)?);
        let got = (ag.t()?.broadcast_add(&bg)? * ag.t()?)?.to_vec2::<f32>()?;
        assert_eq!(got, cpu, "rows {rows}, seed {seed}");
        Ok(())
    };
    for rows in 1..=40 {
        check(rows, 2 * rows as u64)?;
        check(rows, 2 * rows as u64 + 1)?;
    }
    // 19,960 more distinct layouts (each transposed view's dims), past the bound; every
    // 997th copy checked (a copy is exact).
    let big_cpu = random(&[3, 20_000], 5);
    let big = big_cpu.to_device(&dev)?;
    for rows in 41..=20_000 {
        let part = big.narrow(1, 0, rows)?.t()?.contiguous()?;
        if rows % 997 == 0 {
            let want = big_cpu.narrow(1, 0, rows)?.t()?.contiguous()?.to_vec2::<f32>()?;
            assert_eq!(part.to_vec2::<f32>()?, want, "copy of {rows} rows");
        }
    }
    for rows in 1..=40 {
        check(rows, 100 + rows as u64)?;
    }
    Ok(())
}

/// The attention core in one launch (`glip_kernels::attention::fused`, inference) against the
/// exact core within the bound glip-testing's `attention_reference` derives (the online
/// softmax over tiles of 32 keys, CUDA's `expf` at 2 ulp): the kernel's test under the CPU
/// emulation, on the GPU, plus a seed-r50-sized cross-attention (100 queries, 256 keys, 8
/// heads of 32).
#[test]
fn fused_attention_matches_the_exact_core_within_its_bound() -> Result<()> {
    use glip_kernels::attention::{fused, ScaleAt};
    use glip_testing::{attention_reference, AttentionShape};
    let dev = gpu();
    // (b, lq, lk, heads, dh, masked keys, scale on the scores, spread)
    let cases: [(usize, usize, usize, usize, usize, u8, bool, f32); 5] = [
        (2, 20, 40, 2, 8, 1, false, 1.0),
        (1, 17, 70, 3, 33, 0, true, 1.0),
        (2, 5, 1, 1, 64, 0, false, 1.0),
        (1, 16, 64, 2, 64, 2, true, 3.0),
        (2, 100, 256, 8, 32, 1, false, 1.0),
    ];
    for (n, (b, lq, lk, heads, dh, masking, at_scores, spread)) in cases.into_iter().enumerate() {
        let d = heads * dh;
        let seed = 400 + 3 * n as u64;
        let q = (random(&[b, lq, d], seed) * f64::from(spread))?;
        let k = (random(&[b, lk, d], seed + 1) * f64::from(spread))?;
        let v = random(&[b, lk, d], seed + 2);
        // 1: every third key of the first image masked, the second image masking all; 2: the
        // first 40 keys masked.
        let mask: Option<Vec<u8>> = match masking {
            0 => None,
            1 => Some((0..b * lk).map(|e| u8::from(e / lk == 0 && e % 3 != 1)).collect()),
            _ => Some((0..b * lk).map(|e| u8::from(e % lk >= 40)).collect()),
        };
        let mask_t =
            mask.as_ref().map(|m| Tensor::from_vec(m.clone(), (b, lk), &dev)).transpose()?;
        let scale = 1.0 / (dh as f64).sqrt();
        let at = if at_scores { ScaleAt::Scores } else { ScaleAt::Query };
        let on = |t: &Tensor| t.to_device(&dev);
        let got = fused(&on(&q)?, &on(&k)?, &on(&v)?, mask_t.as_ref(), heads, scale, at)?
            .expect("f32, contiguous, no gradient, on the GPU: fused");
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (exact, bound) = attention_reference(
            &flat(&q)?,
            &flat(&k)?,
            &flat(&v)?,
            mask.as_deref(),
            AttentionShape { b, lq, lk, heads, dh },
            scale as f32,
            32,
        );
        let exact = Tensor::from_vec(exact, (b, lq, d), &Device::Cpu)?;
        let bound = Tensor::from_vec(bound, (b, lq, d), &Device::Cpu)?;
        assert_within(&format!("attention case {n}"), &got, &exact, &bound)?;
    }
    Ok(())
}

/// Deformable attention's sampling on CUDA (glip-kernels' `deformable::sample`: glip's three
/// kernels, the values' gradient added with atomics) and the gradients of `sum(out * g)`
/// against exact values within the bound glip-testing's `deformable_reference` derives for any
/// f32 evaluation order: the kernels' emulation test's case (two small levels, a NaN sample),
/// then Grounding DINO's shape at the shapes task's size (4 levels, 300 queries, 8 heads of 32
/// for 2 images, 4 points: many queries adding into the same value rows).
#[test]
fn deformable_sampling_and_its_gradients_match_exact_values() -> Result<()> {
    use glip_kernels::deformable::{sample, Level};
    use glip_testing::{check_deformable_op, DeformableCase, DeformableShape};
    let dev = gpu();
    let small = [(3, 4, 0), (2, 3, 12)];
    let four = [(16, 20, 0), (8, 10, 320), (4, 5, 400), (2, 3, 420)];
    let cases = [
        DeformableShape { bh: 3, q: 5, points: 3, dh: 7, levels: &small },
        DeformableShape { bh: 16, q: 300, points: 4, dh: 32, levels: &four },
    ];
    for (n, shape) in cases.into_iter().enumerate() {
        let kernel_levels: Vec<Level> =
            shape.levels.iter().map(|&(h, w, start)| Level { h, w, start }).collect();
        let case = DeformableCase::new(shape, 500 + 3 * n as u32);
        let margins = check_deformable_op(&case, &dev, |v, s| sample(v, s, &kernel_levels))?;
        eprintln!(
            "deformable case {n}: largest error / bound (output, values', samples') {margins:.4?}"
        );
    }
    Ok(())
}

/// `MultiheadAttention` in inference on the GPU (the fused core, reading inputs that are one
/// tensor out of one packed product) against the same module on the CPU (candle's
/// composition), with a key mask: cross-attention with k = v (k and v packed) and with three
/// inputs, self-attention with one input (q, k and v packed) and with q = k but another v.
/// Inputs and projection weights lie on a coarse grid (multiples of 1/4 and 1/8, heads of 4 so
/// that the scale is 1/2), so that q, k and v are exact on both devices; each core is then
/// within glip-testing's bound `B` of the exact one (the composition's error is that of one
/// tile), so the two contexts differ by at most `2B`, and the output projections by
/// `sum |w| 2B` plus each one's f32 rounding `g(d + 1) (sum |w| (|ctx| + B) + |bias|)`.
#[test]
fn multihead_attention_in_inference_on_the_gpu_matches_the_cpu() -> Result<()> {
    use glip_testing::{attention_reference, AttentionShape};
    let (b, lq, lk, d, heads) = (2usize, 30usize, 45usize, 16usize, 4usize);
    let grid = |shape: &[usize], seed: u64, step: f64| -> Result<Tensor> {
        (random(shape, seed) * 1.5)?.round()?.clamp(-2.0, 2.0)? * step
    };
    let weights: std::collections::HashMap<String, Tensor> = [
        ("in_proj_weight", grid(&[3 * d, d], 500, 0.125)?),
        ("in_proj_bias", grid(&[3 * d], 501, 0.125)?),
        ("out_proj.weight", random(&[d, d], 502)),
        ("out_proj.bias", random(&[d], 503)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let query = grid(&[b, lq, d], 504, 0.25)?;
    let (memory, other) = (grid(&[b, lk, d], 505, 0.25)?, grid(&[b, lk, d], 506, 0.25)?);
    let mask: Vec<u8> = (0..b * lk).map(|e| u8::from(e % lk < 40 || e / lk == 0)).collect();
    let mask_t = Tensor::from_vec(mask.clone(), (b, lk), &Device::Cpu)?;
    let w = &weights["in_proj_weight"];
    // The exact projection `i` of `x` (grid values: f32 is exact).
    let proj = |x: &Tensor, i: usize| -> Result<Vec<f32>> {
        let wi = w.narrow(0, i * d, d)?;
        let bi = weights["in_proj_bias"].narrow(0, i * d, d)?;
        let rows = x.reshape((b * x.dim(1)?, d))?;
        rows.matmul(&wi.t()?)?.broadcast_add(&bi)?.flatten_all()?.to_vec1()
    };
    let cases = [("cross", &query, &memory, &memory), ("self", &memory, &memory, &memory)];
    let more =
        [("self, another v", &memory, &memory, &other), ("cross, three", &query, &memory, &other)];
    let cases = cases.into_iter().chain(more);
    for (name, q_in, k_in, v_in) in cases {
        let same_kv = std::ptr::eq(k_in, v_in);
        let run = |dev: &Device| -> Result<Tensor> {
            let on: std::collections::HashMap<String, Tensor> = weights
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.to_device(dev)?)))
                .collect::<Result<_>>()?;
            let vb = candle_nn::VarBuilder::from_tensors(on, DType::F32, dev);
            let mha = glip_transformer::attention::MultiheadAttention::new(d, heads, 0.1, vb)?;
            let mask = mask_t.to_device(dev)?;
            let (q, k) = (q_in.to_device(dev)?, k_in.to_device(dev)?);
            // The module packs its projections where its inputs are one tensor (not a copy).
            let q = if std::ptr::eq(q_in, k_in) { k.clone() } else { q };
            let v = if same_kv { k.clone() } else { v_in.to_device(dev)? };
            mha.forward(&q, &k, &v, Some(&mask), false)?.to_device(&Device::Cpu)
        };
        let (gpu_out, cpu_out) = (run(&gpu())?, run(&Device::Cpu)?);
        let (q, k, v) = (proj(q_in, 0)?, proj(k_in, 1)?, proj(v_in, 2)?);
        let lq = q_in.dim(1)?;
        let shape = AttentionShape { b, lq, lk, heads, dh: d / heads };
        let (ctx, core) = attention_reference(&q, &k, &v, Some(&mask), shape, 0.5, 32);
        let wo = weights["out_proj.weight"].to_dtype(DType::F64)?.abs()?;
        let bo = weights["out_proj.bias"].to_dtype(DType::F64)?.abs()?;
        let ctx = Tensor::from_vec(ctx, (b * lq, d), &Device::Cpu)?.abs()?;
        let core = Tensor::from_vec(core, (b * lq, d), &Device::Cpu)?;
        let g = gamma(d + 1);
        let spread = (core.matmul(&wo.t()?)? * 2.0)?;
        let rounding = ((ctx + &core)?.matmul(&wo.t()?)?.broadcast_add(&bo)? * (2.0 * g))?;
        let bound = (spread + rounding)?.reshape((b, lq, d))?;
        let name = format!("attention module ({name}), GPU against CPU");
        assert_within(&name, &gpu_out, &cpu_out.to_dtype(DType::F64)?, &bound)?;
    }
    Ok(())
}

/// The residual's layer norm in one launch (`glip_kernels::fused::layer_norm_residual`,
/// inference) is the composition's `layer_norm(x + r)` on the GPU bit for bit (the sum rounded
/// once, then the same kernel arithmetic); widths under and over a block.
#[test]
fn the_residual_layer_norm_is_the_composition_bit_for_bit() -> Result<()> {
    use glip_kernels::fused::{layer_norm, layer_norm_residual};
    let dev = gpu();
    for (rows, d) in [(300usize, 256usize), (17, 384), (5, 7)] {
        let x = random(&[rows, d], 600 + d as u64).to_device(&dev)?;
        let r = random(&[rows, d], 601 + d as u64).to_device(&dev)?;
        let w = (random(&[d], 602).abs()? + 0.5)?.to_device(&dev)?;
        let b = random(&[d], 603).to_device(&dev)?;
        let fused = layer_norm_residual(&x, &r, &w, &b, 1e-12)?.flatten_all()?.to_vec1::<f32>()?;
        let composed = layer_norm(&(&x + &r)?, &w, &b, 1e-12)?.flatten_all()?.to_vec1::<f32>()?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused), bits(&composed), "rows {rows}, width {d}");
    }
    Ok(())
}

/// Every element of `a` and `b` as bits (f32 values), for exact comparisons.
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().map(|x| x.to_bits()).collect())
}

/// A CUDA graph of the seed-r18 inference pass (`glip_kernels::graph::capture`, what `glip
/// bench --cuda-graph` times) replays the eager pass bit for bit: on the inputs it was recorded
/// with (checked by the capture itself), on new pixels, token ids and text mask, and on the
/// first inputs again (nothing stale), in f32 and in a bf16 autocast scope; after that scope
/// has ended (its weight copies released) the graph still gives the scope's outputs.
#[test]
fn a_cuda_graph_of_the_seed_pass_replays_the_eager_pass_bit_for_bit() -> Result<()> {
    let dev = gpu();
    let cfg = glip_train::bench::preset("seed-r18")?;
    let varmap = candle_nn::VarMap::new();
    let registry = glip_train::config::Registry::new();
    registry.build_trainable(&cfg, &varmap, 0, &dev)?;
    let model = glip_train::infer::inference_model(&registry, &cfg, &varmap, &dev)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (b, s, t) = (2, 64, 8);
    let template = glip_core::ImageBatch::unpadded(Tensor::zeros((b, 3, s, s), DType::F32, &dev)?)?;
    let inputs = |seed: u64| -> Result<Vec<Tensor>> {
        let mut rng = glip_core::rng::Rng::new(seed);
        let ids: Vec<u32> = (0..b * t).map(|_| 1000 + rng.below(28000) as u32).collect();
        // The second caption is shorter by `seed % 3` tokens: the text mask is an input too.
        let mask: Vec<u8> =
            (0..b * t).map(|i| u8::from(i < t || i % t < t - (seed % 3) as usize)).collect();
        Ok(vec![
            random(&[b, 3, s, s], seed).to_device(&dev)?,
            template.mask.copy()?,
            Tensor::from_vec(ids, (b, t), &dev)?,
            Tensor::from_vec(mask, (b, t), &dev)?,
        ])
    };
    let pass = |x: &[Tensor]| -> Result<Vec<Tensor>> {
        let images = template.with_tensors(x[0].clone(), x[1].clone())?;
        let text = glip_core::TextBatch::new(
            x[2].clone(),
            x[3].clone(),
            vec![vec![(0, 0); t]; b],
            vec![String::new(); b],
        )?;
        let out = model.forward(&images, &text, false)?;
        Ok(vec![candle_nn::ops::softmax_last_dim(&out.pred.pred_logits)?, out.pred.pred_boxes])
    };
    let same = |what: &str, got: &[Tensor], want: &[Tensor]| -> Result<()> {
        assert_eq!(got.len(), want.len(), "{what}");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.dims(), w.dims(), "{what}: output {k}");
            assert!(bits(g)? == bits(w)?, "{what}: output {k} differs from the eager pass");
        }
        Ok(())
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let (graph, want_b) = autocast(precision, || -> Result<_> {
            let a = inputs(1)?;
            // Recorded over buffers of its own: `a` itself stays as it is.
            let buffers = a.iter().map(Tensor::copy).collect::<Result<Vec<_>>>()?;
            let (graph, eager_a) = glip_kernels::graph::capture(buffers, pass)?;
            same(&format!("{precision}: eager outputs"), &eager_a, &pass(&a)?)?;
            let b_in = inputs(2)?;
            let want_b = pass(&b_in)?;
            same(&format!("{precision}: replay on new inputs"), &graph.run(&b_in)?, &want_b)?;
            same(&format!("{precision}: replay on the first inputs"), &graph.run(&a)?, &eager_a)?;
            // The recorded buffers passed as themselves are not copied onto themselves.
            let own = graph.inputs().to_vec();
            same(&format!("{precision}: replay on its own buffers"), &graph.run(&own)?, &eager_a)?;
            Ok((graph, want_b))
        })?;
        // Outside the scope: the bf16 weight copies the graph reads are its own to keep.
        same(&format!("{precision}: replay after the scope"), &graph.run(&inputs(2)?)?, &want_b)?;
        let wrong =
            inputs(3)?.into_iter().map(|x| x.narrow(0, 0, 1)).collect::<Result<Vec<_>>>()?;
        let e = graph.run(&wrong).unwrap_err().to_string();
        assert!(e.contains("input 0 is [1, 3, 64, 64] F32"), "{e}");
    }
    Ok(())
}

/// A pass that reads a value back to the host cannot be recorded: `capture` says so, keeps
/// nothing, and the device computes as before; a device made without glip's `new_device` is
/// refused with a reason.
#[test]
fn a_pass_reading_the_host_is_not_recorded_and_the_device_recovers() -> Result<()> {
    let dev = gpu();
    let x = random(&[4, 5], 7).to_device(&dev)?;
    let reads = |t: &[Tensor]| -> Result<Vec<Tensor>> {
        let s = t[0].sum_all()?.to_scalar::<f32>()?;
        Ok(vec![(&t[0] * f64::from(s))?])
    };
    let e = glip_kernels::graph::capture(vec![x.clone()], reads).unwrap_err().to_string();
    assert!(e.contains("could not be recorded"), "{e}");
    let want = (random(&[4, 5], 7) + 1.0)?.to_vec2::<f32>()?;
    assert_eq!((&x + 1.0)?.to_vec2::<f32>()?, want);
    // And a pass that can be recorded still is.
    let (g, _) = glip_kernels::graph::capture(vec![x.clone()], |t| Ok(vec![(&t[0] + 1.0)?]))?;
    assert_eq!(g.run(&[x])?[0].to_vec2::<f32>()?, want);
    // A device that orders its buffers with events cannot record: said before trying.
    let tracked = Device::new_cuda(0)?;
    let y = random(&[4, 5], 7).to_device(&tracked)?;
    let e = glip_kernels::graph::capture(vec![y], |t| Ok(vec![(&t[0] + 1.0)?])).unwrap_err();
    assert!(e.to_string().contains("glip_kernels::cuda::new_device"), "{e}");
    Ok(())
}

/// `Predictor::detect_batch` with a `GraphCache` (what `glip detect --cuda-graph` and `glip eval
/// --cuda-graph` use) on a dense model with positional encodings and centerness: a batch shape
/// seen once runs eagerly, twice is recorded, then replayed, and every call finds exactly the
/// detections of a predictor without graphs, for three different sets of images.
#[test]
fn detection_with_cuda_graphs_finds_what_eager_detection_finds(
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = gpu();
    let cfg = tiny_dense::config(&[]);
    let registry = glip_train::config::Registry::new();
    let varmap = candle_nn::VarMap::new();
    let trainable = registry.build_trainable(&cfg.model, &varmap, 0, &dev)?;
    let spec = cfg.inference_spec(&trainable)?;
    let model = glip_train::infer::inference_model(&registry, &cfg.model, &varmap, &dev)?;
    let tok = glip_text::Tokenizer::from_file(&cfg.model.tokenizer().ok_or("no tokenizer")?)?;
    let ds = glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val)?;
    let cats = glip_data::Dataset::categories(&ds).to_vec();
    let post =
        glip_heads::postprocess::PostProcessConfig { score_threshold: 0.0, ..spec.post.clone() };
    let graphs = glip_train::infer::GraphCache::new();
    let plain = glip_train::infer::Predictor::new(&model, &spec, &tok, &dev);
    let graphed = glip_train::infer::Predictor { graphs: Some(&graphs), ..plain };
    for precision in [Precision::F32, Precision::Bf16] {
        let (plain, graphed) = (
            glip_train::infer::Predictor { precision, ..plain },
            glip_train::infer::Predictor { precision, ..graphed },
        );
        autocast(precision, || -> std::result::Result<(), glip_train::Error> {
            // Three sets of three of the split's five images.
            for (set, ks) in [[0, 1, 2], [2, 3, 4], [4, 0, 3]].iter().enumerate() {
                let images: Vec<_> = ks.iter().map(|&k| ds.render(k).0).collect();
                let want = plain.detect_batch(&images, &cats, &post)?;
                let got = graphed.detect_batch(&images, &cats, &post)?;
                assert!(want.iter().all(|d| !d.is_empty()), "{precision} set {set}: nothing found");
                assert_eq!(got, want, "{precision}, set {set}");
            }
            Ok(())
        })?;
    }
    let r = graphs.report();
    eprintln!("{r}");
    assert!(r.failures.is_empty(), "{r}");
    // Per precision and prompt chunk: one eager pass, one recorded, one replayed.
    assert!(r.eager >= 2 && r.recorded == r.eager && r.replayed == r.eager, "{r}");
    Ok(())
}
