//! Convolution building blocks: batch norm (frozen or trainable), conv helpers and a max-pool
//! with a backward.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Module, VarBuilder};

/// Batch norm over `(b, c, h, w)` with torchvision names (`weight`, `bias`, `running_mean`,
/// `running_var`).
///
/// Frozen (the default for detection backbones, torchvision's `FrozenBatchNorm2d`): the
/// statistics and the affine parameters are constants, `y = x * w / sqrt(rv + eps) + (b - rm *
/// w / sqrt(rv + eps))`. Trainable: batch statistics in training (running statistics updated with
/// momentum 0.1 and the unbiased variance, as PyTorch), running statistics otherwise; only
/// `weight` and `bias` receive gradients.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    frozen: bool,
}

impl BatchNorm2d {
    /// Loads a batch norm of `c` channels from `vb`.
    pub fn new(c: usize, frozen: bool, vb: VarBuilder<'_>) -> Result<Self> {
        use candle_nn::Init;
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        let running_mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        let (weight, bias) = if frozen { (weight.detach(), bias.detach()) } else { (weight, bias) };
        Ok(Self { weight, bias, running_mean, running_var, eps: 1e-5, frozen })
    }

    /// The constant `[scale; shift]` `(2, c)` of a frozen batch norm (or of any batch norm
    /// outside training): `y = x * scale + shift` ([`glip_kernels::affine::batch_norm_constants`];
    /// one kernel on CUDA).
    fn constants(&self) -> Result<Tensor> {
        glip_kernels::affine::batch_norm_constants(
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
            self.eps,
        )
    }

    /// `relu(batch_norm(x) (+ residual))`: with constant statistics and parameters (frozen, or
    /// not training) one fused pass forward and backward
    /// ([`glip_kernels::affine::channel_affine`]), else the batch norm then the sum and ReLU.
    /// The result has `x`'s dtype (bf16 activations stay bf16; the residual must match).
    pub fn forward_relu(
        &self,
        x: &Tensor,
        train: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.frozen || !train {
            return glip_kernels::affine::channel_affine(x, &self.constants()?, residual, true);
        }
        // glip's ReLU: candle's values and gradient rule, the gradient in one pass (candle's
        // backward is a tensor of zeros, a comparison, a cast and a product; the default
        // training run takes 7 % more images a second with this one).
        let y = self.forward(x, train)?;
        match residual {
            Some(r) => glip_kernels::fused::relu(&(y + r)?),
            None => glip_kernels::fused::relu(&y),
        }
    }

    /// `x (b, c, h, w)` -> normalised `(b, c, h, w)`, in `x`'s dtype. A training batch norm
    /// normalises in f32 (bf16 activations are cast to f32 and back).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.frozen || !train {
            return glip_kernels::affine::channel_affine(x, &self.constants()?, None, false);
        }
        if x.dtype() != DType::F32 {
            return self.forward(&x.to_dtype(DType::F32)?, train)?.to_dtype(x.dtype());
        }
        let (b, _, h, w) = x.dims4()?;
        let n = (b * h * w) as f64;
        let (y, mean, var) =
            glip_kernels::norm::batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
        if self.running_mean.is_variable() {
            let m = 0.1;
            let unbiased = (var * (n / (n - 1.0).max(1.0)))?;
            let new_mean = ((self.running_mean.detach() * (1.0 - m))? + (mean * m)?)?;
            let new_var = ((self.running_var.detach() * (1.0 - m))? + (unbiased * m)?)?;
            Var::from_tensor(&self.running_mean)?.set(&new_mean.to_dtype(DType::F32)?)?;
            Var::from_tensor(&self.running_var)?.set(&new_var.to_dtype(DType::F32)?)?;
        }
        Ok(y)
    }
}

/// Elements `start, start + stride, ...` (`n` of them) along `axis`, by narrow and reshape
/// (differentiable; candle has no strided slice). `x` must be long enough:
/// `start + stride * n <= len`.
fn take_strided(x: &Tensor, axis: usize, start: usize, n: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return x.narrow(axis, start, n);
    }
    let span = x.narrow(axis, start, stride * n)?;
    let mut shape = span.dims().to_vec();
    shape[axis] = n;
    shape.insert(axis + 1, stride);
    span.reshape(shape)?.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)
}

/// Depthwise convolution (`groups == channels`): `x (b, c, h, w)`, `weight (c, 1, k, k)`,
/// zero padding `pad`, stride `stride` -> `(b, c, oh, ow)`.
///
/// candle runs a grouped convolution as one small convolution per group (hundreds for
/// MobileNetV2, each with a thread barrier); this sums `k * k` shifted, per-channel scaled
/// copies of the input instead, with differentiable ops only. On CUDA with cuDNN (the `cudnn`
/// feature) it is one grouped cuDNN convolution.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (wc, _, k, _) = weight.dims4()?;
    if wc != c {
        candle_core::bail!("depthwise conv: {c} input channels, weight for {wc}");
    }
    if x.device().is_cuda() && glip_kernels::cuda::CUDNN {
        // One cuDNN call with `c` groups (and its gradients) instead of 2 k^2 kernels.
        return glip_kernels::conv::conv2d_grouped(x, weight, stride, pad, c);
    }
    let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
    // Pad, plus `stride` extra zeros at the end so every strided window fits.
    let xp = x.pad_with_zeros(2, pad, pad + stride)?.pad_with_zeros(3, pad, pad + stride)?;
    let mut acc: Option<Tensor> = None;
    for i in 0..k {
        let rows = take_strided(&xp, 2, i, oh, stride)?;
        for j in 0..k {
            let patch = take_strided(&rows, 3, j, ow, stride)?;
            let wij = weight.narrow(2, i, 1)?.narrow(3, j, 1)?.reshape((1, c, 1, 1))?;
            let term = patch.broadcast_mul(&wij)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise conv with an empty kernel".into()))
}

/// A convolution: [`glip_kernels::conv::conv2d`] (candle's forward, a gemm backward), or
/// [`depthwise_conv2d`] when every channel is its own group.
#[derive(Debug, Clone)]
pub enum Conv {
    /// candle's `Conv2d`.
    Dense(Conv2d),
    /// Depthwise with `(weight (c, 1, k, k), bias, stride, padding)`.
    Depthwise(Tensor, Option<Tensor>, usize, usize),
}

impl Conv {
    /// Loads `weight (out, in/groups, k, k)` (and `bias`) from `vb`, torch's initialisers for
    /// fresh ones; frozen convolutions are detached from the graph. Depthwise when
    /// `groups == cin == cout > 1`.
    pub fn new(
        vb: VarBuilder<'_>,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
        frozen: bool,
    ) -> Result<Self> {
        let cfg = Conv2dConfig { padding, stride, groups, dilation: 1, cudnn_fwd_algo: None };
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let w = vb.get_with_hints((cout, cin / groups, k, k), "weight", init)?;
        let b = if bias {
            let bound = 1.0 / ((cin / groups * k * k) as f64).sqrt();
            let init = candle_nn::Init::Uniform { lo: -bound, up: bound };
            Some(vb.get_with_hints(cout, "bias", init)?)
        } else {
            None
        };
        let (w, b) = if frozen { (w.detach(), b.map(|b| b.detach())) } else { (w, b) };
        if groups > 1 && groups == cin && cin == cout {
            Ok(Conv::Depthwise(w, b, stride, padding))
        } else {
            Ok(Conv::Dense(Conv2d::new(w, b, cfg)))
        }
    }

    /// Applies the convolution; the result has `x`'s dtype (bf16 activations compute in bf16,
    /// [`glip_kernels::conv::conv2d`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Dense(c) => {
                let cfg = c.config();
                if cfg.groups != 1 || cfg.dilation != 1 {
                    return c.forward(x);
                }
                let y = glip_kernels::conv::conv2d(x, c.weight(), cfg.stride, cfg.padding)?;
                match c.bias() {
                    Some(b) => {
                        // On bf16 activations the bias in bf16 (a gradient-free one cast once
                        // per bf16 scope).
                        let b = match y.dtype() {
                            DType::BF16 => glip_kernels::bf16::bf16_weight(b)?,
                            dtype => b.to_dtype(dtype)?,
                        };
                        y.broadcast_add(&b.reshape((1, (), 1, 1))?)
                    }
                    None => Ok(y),
                }
            }
            Conv::Depthwise(w, b, s, p) => {
                let y = depthwise_conv2d(x, w, *s, *p)?;
                match b {
                    Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
                    None => Ok(y),
                }
            }
        }
    }
}

/// Pads axis `axis` of `x` with `before` and `after` copies of `value`.
fn pad_axis(x: &Tensor, axis: usize, before: usize, after: usize, value: f64) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let mut parts = Vec::with_capacity(3);
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[axis] = before;
        parts.push((Tensor::ones(shape.as_slice(), x.dtype(), x.device())? * value)?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[axis] = after;
        parts.push((Tensor::ones(shape.as_slice(), x.dtype(), x.device())? * value)?);
    }
    Tensor::cat(&parts, axis)
}

/// Max over a window of 3 with stride 2 and padding 1 along `axis`, composed of differentiable
/// ops: pad with -inf to an even length `2 * (o + 1)`, view as pairs, and take the max of
/// elements `2i`, `2i + 1` and `2i + 2`.
fn max3_stride2_axis(x: &Tensor, axis: usize) -> Result<Tensor> {
    let n = x.dims()[axis];
    let o = (n + 2 - 3) / 2 + 1;
    let padded = pad_axis(x, axis, 1, 2 * (o + 1) - n - 1, f64::NEG_INFINITY)?;
    let mut pairs_shape = padded.dims().to_vec();
    pairs_shape[axis] = o + 1;
    pairs_shape.insert(axis + 1, 2);
    let pairs = padded.reshape(pairs_shape)?;
    let even = pairs.narrow(axis + 1, 0, 1)?.squeeze(axis + 1)?;
    let odd = pairs.narrow(axis + 1, 1, 1)?.squeeze(axis + 1)?;
    let a = even.narrow(axis, 0, o)?;
    let b = odd.narrow(axis, 0, o)?;
    let c = even.narrow(axis, 1, o)?;
    a.maximum(&b)?.maximum(&c)
}

/// The ResNet stem max-pool: kernel 3, stride 2, padding 1 over `(b, c, h, w)`, output
/// `(b, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1)` as PyTorch.
///
/// candle's `max_pool2d` has no backward when kernel != stride and takes no padding
/// (CANDLE-NOTES.md). In f32 on the CPU, and on CUDA in a `cuda` build (f32 or bf16), this is
/// [`glip_kernels::pool`]'s op (forward and backward; parallel over planes on the CPU, a
/// thread per element on CUDA). Elsewhere, when `x` carries a gradient this composes the
/// pool from pads, reshapes, narrows and elementwise maxima (separable: rows then columns), all
/// differentiable; otherwise it pads and calls candle's pool.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let cpu = x.device().is_cpu() && x.dtype() == DType::F32;
    let cuda = glip_kernels::cuda::own_kernels(x) && matches!(x.dtype(), DType::F32 | DType::BF16);
    if cpu || cuda {
        return glip_kernels::pool::max_pool_3x3_s2_p1(x);
    }
    max_pool_composite(x)
}

/// [`max_pool_3x3_s2_p1`] from candle ops (other devices and dtypes).
fn max_pool_composite(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        // Pad so that a 3x3 stride-2 window without padding yields (oh, ow).
        let x = pad_axis(x, 2, 1, 2 * oh + 1 - h - 1, f64::NEG_INFINITY)?;
        let x = pad_axis(&x, 3, 1, 2 * ow + 1 - w - 1, f64::NEG_INFINITY)?;
        return x.max_pool2d_with_stride(3, 2);
    }
    max3_stride2_axis(&max3_stride2_axis(x, 2)?, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Brute-force PyTorch max_pool2d(3, 2, 1) on plain numbers.
    fn reference_pool(x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (oh, ow) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let mut out = vec![f32::NEG_INFINITY; oh * ow];
        for i in 0..oh {
            for j in 0..ow {
                for di in 0..3 {
                    for dj in 0..3 {
                        let (y, xx) = ((2 * i + di) as isize - 1, (2 * j + dj) as isize - 1);
                        if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                            let v = x[y as usize * w + xx as usize];
                            out[i * ow + j] = out[i * ow + j].max(v);
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn depthwise_matches_candles_grouped_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, k, s, p) in
            [(7, 9, 3, 1, 1), (8, 8, 3, 2, 1), (9, 6, 3, 2, 1), (5, 5, 1, 1, 0), (6, 7, 5, 2, 2)]
        {
            let x = Tensor::randn(0f32, 1.0, (2, 4, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (4, 1, k, k), &dev)?;
            let want = x.conv2d(&wt, p, s, 1, 4)?;
            let got = depthwise_conv2d(&x, &wt, s, p)?;
            assert_eq!(got.dims(), want.dims(), "{h}x{w} k{k} s{s} p{p}");
            let d = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "{h}x{w} k{k} s{s} p{p}: max diff {d}");
        }
        Ok(())
    }

    #[test]
    fn stem_pool_matches_brute_force_and_has_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(7, 9), (8, 8), (1, 2), (5, 4), (2, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev)?;
            let want: Vec<f32> = (0..6)
                .flat_map(|p| {
                    let plane: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                    reference_pool(&plane[p * h * w..(p + 1) * h * w], h, w)
                })
                .collect();
            let v = Var::from_tensor(&x)?;
            let r = Tensor::randn(0f32, 1.0, max_pool_3x3_s2_p1(&x)?.shape(), &dev)?;
            let mut grads = vec![];
            for (what, pool) in [
                ("kernel", max_pool_3x3_s2_p1 as fn(&Tensor) -> Result<Tensor>),
                ("composite", max_pool_composite),
            ] {
                let fast = pool(&x)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(fast, want, "{what} without gradient, {h}x{w}");
                let slow = pool(v.as_tensor())?;
                assert_eq!(slow.flatten_all()?.to_vec1::<f32>()?, want, "{what} {h}x{w}");
                let g = (slow * &r)?.sum_all()?.backward()?;
                grads.push(
                    g.get(v.as_tensor()).expect("no gradient").flatten_all()?.to_vec1::<f32>()?,
                );
            }
            // Each output routes its gradient to exactly one input (no ties in random data),
            // the same one in both; an input can be the maximum of up to 4 overlapping windows,
            // whose gradients the two add in other orders. Each sum of n <= 4 terms is within
            // gamma_4 * sum |terms| of the exact one, so the two within 2 gamma_4 of each other;
            // sum |terms| is the kernel's gradient against |r| (the same routing).
            let abs = (max_pool_3x3_s2_p1(v.as_tensor())? * r.abs()?)?.sum_all()?.backward()?;
            let mag =
                abs.get(v.as_tensor()).expect("no gradient").flatten_all()?.to_vec1::<f32>()?;
            let gamma = 4.0 * 2f64.powi(-24) / (1.0 - 4.0 * 2f64.powi(-24));
            for (i, ((&a, &b), &m)) in grads[0].iter().zip(&grads[1]).zip(&mag).enumerate() {
                let bound = 2.0 * gamma * m as f64 * (1.0 + gamma);
                assert!(
                    ((a - b) as f64).abs() <= bound,
                    "gradient {i} of {h}x{w}: {a} against {b}"
                );
            }
        }
        Ok(())
    }
}
