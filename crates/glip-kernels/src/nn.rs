//! Differentiable building blocks shared by the model crates, written to avoid candle's
//! gradient traps (CANDLE-NOTES.md): candle's fused `LayerNorm` and `softmax_last_dim` pass no
//! gradient, so these are compositions of elementwise ops; `Linear` initialises as PyTorch does.

use candle_core::{Result, Tensor, D};
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

    /// `x (..., in)` -> `(..., out)`. Inside a bf16 `autocast` without gradients, the product
    /// runs in bf16 with f32 sums ([`crate::bf16::linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bf16 = crate::bf16::applies(x, &self.weight);
        let y = if x.rank() == 3 && !bf16 {
            x.broadcast_matmul(&self.weight.t()?)?
        } else {
            let dims = x.dims();
            let flat = x.reshape(((), dims[dims.len() - 1]))?;
            let flat = if bf16 {
                crate::bf16::linear(&flat, &self.weight)?
            } else {
                flat.matmul(&self.weight.t()?)?
            };
            let mut out = dims.to_vec();
            *out.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
            flat.reshape(out)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
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

/// Inverted dropout, active only when `train` and `p > 0`; masks from the seeded stream of
/// [`seed_dropout`].
pub fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let stream = DROPOUT_STREAM.with(|s| {
        let v = s.get();
        s.set(v.wrapping_add(0x9e37_79b9_7f4a_7c15));
        v
    });
    let mut rng = glip_core::rng::Rng::new(stream);
    let scale = 1.0 / (1.0 - p);
    let keep: Vec<f32> =
        (0..x.elem_count()).map(|_| if rng.uniform() >= p { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// L2-normalises the last axis: `x / max(||x||, 1e-12)` (PyTorch `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&n)
}

/// An additive attention bias from a `(b, t)` u8 mask (1 = attend): 0 where real, a large
/// negative number where padded, shaped `(b, 1, 1, t)` to broadcast over heads and queries.
pub fn mask_to_bias(mask: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let m = mask.to_dtype(dtype)?;
    // torch.finfo(float32).min, as Hugging Face BERT uses; exp() of it underflows to 0.
    ((1.0 - m)? * f32::MIN as f64)?.reshape((b, 1, 1, t))
}
