//! Differentiable building blocks shared by the model crates, written to avoid candle's
//! gradient traps (CANDLE-NOTES.md): candle's fused `LayerNorm` and `softmax_last_dim` pass no
//! gradient, so these are compositions of elementwise ops; `Linear` initialises as PyTorch does.

use crate::conv::contiguous_f32;
use crate::gemm::{self, Mat};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// Layer normalisation over the last axis, differentiable in its input, weight and bias.
/// Names `weight`/`bias` (PyTorch); Hugging Face's older `gamma`/`beta` are accepted too.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads a norm of width `d` from `vb`.
    pub fn new(d: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        let (wn, bn) = if !vb.contains_tensor("weight") && vb.contains_tensor("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        let weight = vb.get_with_hints(d, wn, Init::Const(1.0))?;
        let bias = vb.get_with_hints(d, bn, Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// `x (..., d)` -> normalised `(..., d)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// `x + r` normalised: the residual sum and the norm, one launch in inference on CUDA
    /// ([`crate::fused::layer_norm_residual`]).
    pub fn forward_residual(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        crate::fused::layer_norm_residual(x, r, &self.weight, &self.bias, self.eps)
    }
}

pub use crate::fused::softmax_last;

/// A linear layer `y = x W^T + b` with PyTorch's names and default initialisation
/// (`U(-1/sqrt(in), 1/sqrt(in))` for both weight and bias).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight (out, in)` and `bias (out,)` from `vb`.
    pub fn new(din: usize, dout: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Self::with_bias(din, dout, true, vb)
    }

    /// As [`Linear::new`], optionally without bias.
    pub fn with_bias(din: usize, dout: usize, bias: bool, vb: VarBuilder<'_>) -> Result<Self> {
        let bound = 1.0 / (din.max(1) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let weight = vb.get_with_hints((dout, din), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(dout, "bias", init)?) } else { None };
        Ok(Self { weight, bias })
    }

    /// From explicit tensors: `weight (out, in)`, `bias (out,)`.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `x (..., in)` -> `(..., out)`. Inside a bf16 `autocast` the product runs in bf16 with f32
    /// sums: on the CPU without gradients ([`crate::bf16::linear`]), on CUDA with them and an
    /// f32 result (cuBLAS, `cuda_linear`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bf16 = crate::bf16::applies(x, &self.weight);
        let cuda_bf16 = crate::cuda::bf16_linear_applies(x, &self.weight, self.bias.as_ref());
        let cpu_f32 = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.weight.rank() == 2;
        // Off the CPU, inside a bf16 autocast on CUDA, the product in bf16 (see crate::cuda).
        let product = |x: &Tensor| {
            crate::cuda::in_autocast(x, &self.weight, |x, w| x.broadcast_matmul(&w.t()?))
        };
        // The input flattened to rows (free when contiguous; else one copy of `x`): one 2-D
        // product, whose weight gradient is one product too. `broadcast_matmul` of a `(b, t,
        // in)` input would broadcast the weight, and its backward make a gradient per batch
        // element and sum them (a `(b, in, out)` buffer and a reduction per layer and step).
        let y = {
            let dims = x.dims();
            let flat = x.reshape(((), dims[dims.len() - 1]))?;
            let flat = if bf16 {
                crate::bf16::linear(&flat, &self.weight)?
            } else if cuda_bf16 {
                // bf16 operands, f32 sums and result (cuBLAS), no cast of the result; the bias
                // is added by the product (below, not again).
                crate::cuda::bf16_linear(&flat, &self.weight, self.bias.as_ref())?
            } else if cpu_f32 {
                // candle records no backward when neither input is tracked.
                flat.contiguous()?.apply_op2(&self.weight.contiguous()?, LinearF32)?
            } else {
                product(&flat)?
            };
            let mut out = dims.to_vec();
            *out.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
            flat.reshape(out)?
        };
        match &self.bias {
            Some(b) if !cuda_bf16 => y.broadcast_add(&b.to_dtype(y.dtype())?),
            _ => Ok(y),
        }
    }

    /// `weight (out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `bias (out,)`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Rows of `x` up to which [`LinearF32`] computes `(w @ x^T)^T` rather than `x @ w^T`.
const FEW_ROWS: usize = 64;

/// `x (m, in) @ w (out, in)^T` on the CPU in f32, with its backward. For a few rows (BERT's
/// 2 x 16 tokens) the product is computed as `w @ x^T` and transposed: the `gemm` crate packs
/// the row-major weight of `x @ w^T` anew at every call, which made candle's `matmul` of a
/// `(32, 3072)` input with a `(768, 3072)` weight 6.8 ms against 0.7 ms this way (and
/// BERT-base's forward 3x slower than PyTorch's, `perf` on `glip bench --preset seed-r50`).
struct LinearF32;

impl CustomOp2 for LinearF32 {
    fn name(&self) -> &'static str {
        "glip-linear-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_f32(s1, l1, "linear")?, contiguous_f32(s2, l2, "linear")?);
        let ((m, din), (out, win)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if din != win {
            candle_core::bail!("linear: input of width {din} for a weight of {out}x{win}");
        }
        let (xm, wm) = (Mat::rows(x, m, din), Mat::rows(w, out, din));
        let y = if m <= FEW_ROWS {
            let t = gemm::build(1, out * m, false, |_, o| o.gemm(wm, xm.t(), true));
            let mut y = vec![0f32; m * out];
            for (r, row) in y.chunks_mut(out).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = t[c * m + r];
                }
            }
            y
        } else {
            gemm::build(1, m * out, false, |_, o| o.gemm(xm, wm.t(), true))
        };
        Ok((CpuStorage::F32(y), Shape::from((m, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() { Some(grad.matmul(w)?) } else { None };
        let gw = if w.track_op() { Some(grad.t()?.matmul(x)?) } else { None };
        Ok((gx, gw))
    }
}

thread_local! {
    /// The state from which the next dropout mask of this thread is drawn.
    static DROPOUT_STREAM: std::cell::Cell<u64> = const { std::cell::Cell::new(0x5eed_d80f) };
}

/// Seeds this thread's dropout masks: the masks drawn after it depend only on `seed` and the
/// order of the [`dropout`] calls. The trainer seeds every step from (run seed, step), so a
/// resumed run draws the masks an uninterrupted one would (candle's own dropout draws from a
/// generator that cannot be seeded).
pub fn seed_dropout(seed: u64) {
    DROPOUT_STREAM.with(|s| s.set(seed));
}

/// The next seed of this thread's seeded stream (the one [`seed_dropout`] sets, advanced as a
/// dropout advances it): for other random draws of a training step (DINO's denoising noise)
/// that a resumed run must repeat.
pub fn next_seed() -> u64 {
    DROPOUT_STREAM.with(|s| {
        let v = s.get();
        s.set(v.wrapping_add(0x9e37_79b9_7f4a_7c15));
        v
    })
}

/// Inverted dropout, active only when `train` and `p > 0`; masks from the seeded stream of
/// [`seed_dropout`]. On the CPU a mask is drawn element by element from glip-core's generator;
/// on CUDA (the `cuda` feature) on the device from a counter-based hash of (stream, element)
/// (`cuda_source::ELEMENTWISE`), with no host work or copy (a host-drawn mask is one draw per
/// element on one thread and a copy of the whole mask to the GPU, for every dropout of every
/// layer, attention probabilities included), in the pass that applies it, and the backward is
/// the same pass over the gradient ([`HashDropout`]; no mask is stored). The two devices draw
/// different masks of the same distribution, each the same for the same stream.
pub fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let stream = next_seed();
    let scale = 1.0 / (1.0 - p);
    if x.dtype() == DType::F32 && crate::cuda::own_kernels(x) {
        return x.contiguous()?.apply_op1(HashDropout { seed: stream, p, scale });
    }
    let mut rng = glip_core::rng::Rng::new(stream);
    let keep: Vec<f32> =
        (0..x.elem_count()).map(|_| if rng.uniform() >= p { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// Dropout with the device's counter-based mask: `y = x * mask`, element `i`'s factor `scale`
/// or 0 from `(seed, i)` alone (`cuda_source::ELEMENTWISE`; the CPU computes the same hash, so
/// the two devices agree bit for bit), and the gradient the same map of `dy`. [`dropout`]
/// uses it on CUDA; f32, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct HashDropout {
    /// The stream the mask is drawn from.
    pub seed: u64,
    /// Probability of dropping an element.
    pub p: f32,
    /// The factor of a kept element (`1 / (1 - p)` for inverted dropout).
    pub scale: f32,
}

impl CustomOp1 for HashDropout {
    fn name(&self) -> &'static str {
        "glip-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "dropout")?;
        let y = x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                v * crate::cuda_source::dropout_keep(self.seed, i as u64, self.p, self.scale)
            })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    cuda_fwd!(|me, x| crate::cuda_layers::dropout(x.0, x.1, me.seed, me.p, me.scale));

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// L2-normalises the last axis: `x / max(||x||, 1e-12)` (PyTorch `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&n)
}

/// An additive attention bias from a `(b, t)` u8 mask (1 = attend): 0 where real, a large
/// negative number where padded, shaped `(b, 1, 1, t)` to broadcast over heads and queries.
/// Made in f32 and cast to `dtype` (in bf16 or f16 the padded entries are then `-inf`: made
/// there, `0 * f32::MIN` would be NaN at the real ones).
pub fn mask_to_bias(mask: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let m = mask.to_dtype(candle_core::DType::F32)?;
    // torch.finfo(float32).min, as Hugging Face BERT uses; exp() of it underflows to 0.
    ((1.0 - m)? * f32::MIN as f64)?.to_dtype(dtype)?.reshape((b, 1, 1, t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The mask's bias in f32 is 0 and `f32::MIN`; in bf16 and f16, 0 and `-inf`, never NaN.
    #[test]
    fn mask_bias_is_zero_where_real_in_every_dtype() -> Result<()> {
        use candle_core::DType;
        let mask = Tensor::new(&[[1u8, 0, 1]], &Device::Cpu)?;
        for (dtype, masked) in [
            (DType::F32, f32::MIN),
            (DType::BF16, f32::NEG_INFINITY),
            (DType::F16, f32::NEG_INFINITY),
        ] {
            let bias = mask_to_bias(&mask, dtype)?;
            assert_eq!(bias.dims(), [1, 1, 1, 3]);
            let v = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(v, [0.0, masked, 0.0], "{dtype:?}");
        }
        Ok(())
    }

    /// `Linear` against an f64 product of the same numbers, for few rows (the transposed
    /// product) and many, rank 2 and 3: per output within f32 summation's `gamma_n * sum |x w|`
    /// (`n = in + 1` terms with the bias, unit round-off `2^-24`). The gradients of `sum(y * r)`
    /// against candle's `matmul` composition (`x @ w^T + b`) within the same bound relative to
    /// each element's sum of |terms| (the two sum in other orders: `2 gamma` apart at most).
    #[test]
    fn linear_matches_f64_and_candles_gradients() {
        let dev = Device::Cpu;
        for (lead, din, dout) in [
            (vec![5], 7, 3),
            (vec![2, 16], 48, 40),
            (vec![FEW_ROWS + 1], 33, 17),
            (vec![3, 70], 20, 64),
        ] {
            let mut xs = lead.clone();
            xs.push(din);
            let x = Var::randn(0f32, 1., xs.as_slice(), &dev).unwrap();
            let w = Var::randn(0f32, 1., (dout, din), &dev).unwrap();
            let b = Var::randn(0f32, 1., dout, &dev).unwrap();
            let lin = Linear::from_tensors(w.as_tensor().clone(), Some(b.as_tensor().clone()));
            let y = lin.forward(&x).unwrap();
            let mut ys = lead.clone();
            ys.push(dout);
            assert_eq!(y.dims(), ys.as_slice());
            let (xv, wv, bv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                x.flatten_all().unwrap().to_vec1().unwrap(),
                w.flatten_all().unwrap().to_vec1().unwrap(),
                b.to_vec1().unwrap(),
            );
            let yv: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let n = din + 1;
            let gamma = n as f64 * 2f64.powi(-24) / (1.0 - n as f64 * 2f64.powi(-24));
            for (i, &got) in yv.iter().enumerate() {
                let (r, c) = (i / dout, i % dout);
                let (mut exact, mut mag) = (bv[c] as f64, (bv[c] as f64).abs());
                for k in 0..din {
                    let p = xv[r * din + k] as f64 * wv[c * din + k] as f64;
                    exact += p;
                    mag += p.abs();
                }
                assert!(
                    (got as f64 - exact).abs() <= gamma * mag,
                    "{lead:?}x{din}->{dout} at {i}: {got} against {exact}"
                );
            }
            let r = Tensor::randn(0f32, 1., y.shape(), &dev).unwrap();
            let theirs = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            let g1 = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            // Per gradient element, the sum of |terms| it adds: |r| @ |w|, |r|^T @ |x|, sum |r|.
            let flat = |t: &Tensor, n: usize| t.abs().unwrap().reshape(((), n)).unwrap();
            let (ra, xa, wa) = (flat(&r, dout), flat(&x, din), w.abs().unwrap());
            let mags = [
                (&x, ra.matmul(&wa).unwrap(), dout, "input"),
                (&w, ra.t().unwrap().matmul(&xa).unwrap(), ra.dim(0).unwrap(), "weight"),
                (&b, ra.sum(0).unwrap(), ra.dim(0).unwrap(), "bias"),
            ];
            for (v, mag, terms, what) in mags {
                let gamma = terms as f64 * 2f64.powi(-24) / (1.0 - terms as f64 * 2f64.powi(-24));
                let (a, e) = (g1.get(v).expect(what), g2.get(v).expect(what));
                let d: Vec<f32> =
                    (a - e).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let m: Vec<f32> = mag.flatten_all().unwrap().to_vec1().unwrap();
                for (i, (&d, &m)) in d.iter().zip(&m).enumerate() {
                    // Each side within gamma * mag of the exact sum: within 2 gamma of each other.
                    assert!(
                        d as f64 <= 2.0 * gamma * m as f64 * (1.0 + gamma),
                        "{what} gradient of {lead:?}x{din}->{dout} at {i}: {d} against {m}"
                    );
                }
            }
        }
    }

    /// The device's dropout op ([`HashDropout`]) on the CPU: `x * keep(seed, i)` bit for bit
    /// (the hash the CUDA kernel draws from, `cuda_source::dropout_keep`), the gradient the same
    /// map of `dy`, about `1 - p` of the elements kept (within 5 standard deviations).
    #[test]
    fn hash_dropout_is_x_times_the_hashed_mask_forward_and_backward() {
        let (n, p) = (20_000usize, 0.2f32);
        let op = HashDropout { seed: 99, p, scale: 1.0 / (1.0 - p) };
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap()).unwrap();
        let dy = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        let y = x.as_tensor().apply_op1(op).unwrap();
        let dx = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = dx.get(&x).unwrap().to_vec1().unwrap();
        let (xv, yv, dyv): (Vec<f32>, Vec<f32>, Vec<f32>) =
            (x.as_tensor().to_vec1().unwrap(), y.to_vec1().unwrap(), dy.to_vec1().unwrap());
        for i in 0..n {
            let keep = crate::cuda_source::dropout_keep(op.seed, i as u64, op.p, op.scale);
            assert_eq!(yv[i].to_bits(), (xv[i] * keep).to_bits(), "y[{i}]");
            assert_eq!(dx[i].to_bits(), (dyv[i] * keep).to_bits(), "dx[{i}]");
        }
        let kept = (0..n)
            .filter(|&i| crate::cuda_source::dropout_keep(op.seed, i as u64, p, 1.0) != 0.0)
            .count() as f64;
        let (mean, sd) = (n as f64 * 0.8, (n as f64 * 0.2 * 0.8).sqrt());
        assert!((kept - mean).abs() <= 5.0 * sd, "kept {kept} of {n}");
    }
}
