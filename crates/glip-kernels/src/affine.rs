//! A per-channel affine map, optionally with a residual added and a ReLU after, as one pass
//! forward and one backward: what a frozen batch norm (constant scale and shift) and its
//! activation cost in a ResNet; and the constants of a batch norm outside training.
//!
//! `y = relu?(x * scale[c] + shift[c] (+ residual))` over `(b, c, h, w)`, the constants packed as
//! `ss = [scale; shift]` `(2, c)` ([`batch_norm_constants`]); the backward is `g = dy` (with the
//! ReLU `dy * (y > 0)`), `dx = g * scale[c]`, `dresidual = g`. The constants get no gradient.
//! candle's composition is four or five element-wise passes forward and as many backward (a
//! `perf` profile of `glip bench --preset seed-r18 --mode train --batch 8 --size 128` had 20 % of
//! its samples in candle's element-wise maps), and the constants eight small kernels per batch
//! norm per forward on a GPU. On CUDA (the `cuda` feature) both are this crate's kernels
//! (`cuda_layers`), on f32 or bf16 activations (f32 arithmetic, one rounding to bf16); on the
//! CPU in f32 one parallel pass each way (the backward with candle's values bit for bit: it
//! was candle's comparison, cast and products, and one pass takes 8 % off the backward of a
//! `seed-r50` training step, whose batch norms are frozen); other devices and dtypes use the
//! composition (in f32, the result cast back); the tests compare them, values and gradients.

use crate::conv::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Per-channel constants, and whether the ReLU follows.
struct Affine {
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl Affine {
    /// `(b, c, h, w)` of a layout, checked against the constants.
    fn plane(&self, l: &Layout) -> Result<usize> {
        let d = l.dims();
        if d.len() != 4 || d[1] != self.scale.len() {
            candle_core::bail!("channel affine: {d:?} against {} channels", self.scale.len());
        }
        Ok(d[2] * d[3])
    }

    /// The plane size of `a` and the contiguous f32 values of `a` and `b`, which must have
    /// `a`'s dims (`what` names the op and `other` the second operand in errors).
    fn operands<'a>(
        &self,
        what: &str,
        other: &str,
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
    ) -> Result<(usize, &'a [f32], &'a [f32])> {
        let hw = self.plane(l1)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!("{what}: {:?} against a {other} {:?}", l1.dims(), l2.dims());
        }
        let b = contiguous_f32(s2, l2, &format!("{what} {other}"))?;
        Ok((hw, contiguous_f32(s1, l1, what)?, b))
    }

    /// `y = relu?(x * s + t (+ r))`, one task per (image, channel) plane.
    fn forward(&self, x: &[f32], r: Option<&[f32]>, hw: usize) -> Vec<f32> {
        let c = self.scale.len();
        let floor = if self.relu { 0.0 } else { f32::NEG_INFINITY };
        crate::buf::par_zeroed(x.len(), hw, |p, yo| {
            let (s, t) = (self.scale[p % c], self.shift[p % c]);
            let xi = &x[p * hw..(p + 1) * hw];
            match r {
                Some(r) => {
                    let ri = &r[p * hw..(p + 1) * hw];
                    for ((o, &v), &q) in yo.iter_mut().zip(xi).zip(ri) {
                        *o = (v * s + t + q).max(floor);
                    }
                }
                None => {
                    for (o, &v) in yo.iter_mut().zip(xi) {
                        *o = (v * s + t).max(floor);
                    }
                }
            }
        })
    }

    /// The backward of [`Affine::forward`] over planes of `hw`: `g = dy` (after the ReLU `dy *
    /// m` with `m = 1` where `y > 0`, else 0: candle's `dy.mul(y.gt(0).to_dtype(f32))`, the same
    /// values, NaN and infinities included), `dx = g * scale[c]` into the first `y.len()` values
    /// and, with `residual`, `dr = g` into the next `y.len()`. One pass over `y` and `dy` per
    /// half instead of candle's four (a comparison, a cast and two products).
    fn backward(&self, y: &[f32], dy: &[f32], hw: usize, residual: bool) -> Vec<f32> {
        let (c, n) = (self.scale.len(), y.len());
        let planes = n / hw.max(1);
        let len = if residual { 2 * n } else { n };
        crate::buf::par_zeroed(len, hw, |p, out| {
            let q = p % planes.max(1);
            // `g * 1` is `g` (a NaN stays a NaN), so both halves run one loop.
            let s = if p < planes { self.scale[q % c] } else { 1.0 };
            let (yi, di) = (&y[q * hw..][..out.len()], &dy[q * hw..][..out.len()]);
            if self.relu {
                for ((o, &v), &d) in out.iter_mut().zip(yi).zip(di) {
                    let m = if v > 0.0 { 1.0 } else { 0.0 };
                    *o = d * m * s;
                }
            } else {
                for (o, &d) in out.iter_mut().zip(di) {
                    *o = d * s;
                }
            }
        })
    }

    /// `(y, dy)` -> `dx` (and `dr` with `residual`) as tensors of `y`'s shape.
    fn grads(&self, y: &Tensor, dy: &Tensor, residual: bool) -> Result<(Tensor, Option<Tensor>)> {
        let op = Affine { scale: self.scale.clone(), shift: Vec::new(), relu: self.relu };
        let out = y.apply_op2_no_bwd(&dy.contiguous()?, &AffineBackwardCpu { op, residual })?;
        if !residual {
            return Ok((out.reshape(y.shape())?, None));
        }
        let both = out.reshape((2, ()))?;
        Ok((both.get(0)?.reshape(y.shape())?, Some(both.get(1)?.reshape(y.shape())?)))
    }
}

/// [`Affine::backward`] as an op on `(y, dy)`: `dx`, or `[dx; dr]` flat with `residual` (the
/// shift is not needed).
struct AffineBackwardCpu {
    op: Affine,
    residual: bool,
}

impl CustomOp2 for AffineBackwardCpu {
    fn name(&self) -> &'static str {
        "glip-channel-affine-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (hw, y, dy) =
            self.op.operands("channel affine backward", "gradient", (s1, l1), (s2, l2))?;
        let out = self.op.backward(y, dy, hw, self.residual);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

struct AffineCpu(Affine);

impl CustomOp1 for AffineCpu {
    fn name(&self) -> &'static str {
        "glip-channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hw = self.0.plane(l)?;
        let x = contiguous_f32(s, l, "channel affine")?;
        Ok((CpuStorage::F32(self.0.forward(x, None, hw)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.grads(y, dy, false)?.0))
    }
}

struct AffineAddCpu(Affine);

impl CustomOp2 for AffineAddCpu {
    fn name(&self) -> &'static str {
        "glip-channel-affine-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (hw, x, r) = self.0.operands("channel affine", "residual", (s1, l1), (s2, l2))?;
        Ok((CpuStorage::F32(self.0.forward(x, Some(r), hw)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _r: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dr) = self.0.grads(y, dy, true)?;
        Ok((Some(dx), dr))
    }
}

/// The constants `[scale; shift]` `(2, c)` of a batch norm outside training (frozen, or
/// evaluating): `scale = weight / sqrt(running_var + eps)`, `shift = bias - running_mean *
/// scale`, all `(c,)`; no gradient. One kernel on CUDA ([`crate::cuda::own_kernels`]), candle's
/// composition elsewhere (the same operations: the reciprocal of the root, then products).
/// Where the four tensors have no gradient (a frozen batch norm, an inference model) the
/// constants are made once per bf16 scope ([`crate::bf16::scope_cached`], keyed by the
/// running variance): in an evaluation or a bench's inference once in all.
pub fn batch_norm_constants(
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let make = || -> Result<Tensor> {
        let (w, b, rm, rv) =
            (weight.detach(), bias.detach(), running_mean.detach(), running_var.detach());
        #[cfg(feature = "cuda")]
        if crate::cuda::own_kernels(&w)
            && [&w, &b, &rm, &rv].iter().all(|t| t.dtype() == DType::F32)
        {
            let [w, b, rm, rv] = [&w, &b, &rm, &rv].map(|t| t.flatten_all()?.contiguous());
            return crate::cuda_layers::bn_constants(&w?, &b?, &rm?, &rv?, eps as f32);
        }
        let scale = w.broadcast_mul(&(rv + eps)?.sqrt()?.recip()?)?;
        let shift = (&b - rm.mul(&scale)?)?;
        Tensor::stack(&[scale.flatten_all()?, shift.flatten_all()?], 0)
    };
    if [weight, bias, running_mean].iter().any(|t| t.track_op()) {
        return make();
    }
    crate::bf16::scope_cached(running_var, "batch-norm constants", make)
}

/// `x * scale[c] + shift[c] (+ residual)`, then with `relu` the ReLU, for `x (b, c, h, w)` and
/// the constants `ss = [scale; shift]` `(2, c)` (f32, no gradient). The result has `x`'s dtype.
/// One pass on CUDA (f32 or bf16 `x`, the residual alike; [`crate::cuda::own_kernels`]) and on
/// the CPU in f32; elsewhere [`reference`](fn@reference) in f32 (f64 for f64 tensors).
///
/// A channels-last `x` ([`crate::layout`]) gives a channels-last result (the residual is laid
/// out as `x` first): on CUDA the same kernel over the storage seen as `(b h w, c, 1, 1)`, where
/// each element's channel is its index modulo `c`; elsewhere on an NCHW copy.
pub fn channel_affine(
    x: &Tensor,
    ss: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    if crate::layout::is_channels_last(x) {
        if !crate::cuda::own_kernels(x) {
            // On the NCHW copy, which reads the residual in NCHW order whatever its layout.
            let f = |x: &Tensor| channel_affine(x, ss, residual, relu);
            return crate::layout::keeping_layout(x, f);
        }
        let r = residual.map(crate::layout::to_channels_last).transpose()?;
        let (b, c, h, w) = x.dims4()?;
        let flat = |t: &Tensor| crate::layout::nhwc_view(t)?.reshape((b * h * w, c, 1, 1));
        let r = r.as_ref().map(flat).transpose()?;
        let y = channel_affine(&flat(x)?, ss, r.as_ref(), relu)?;
        return y.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
    }
    let ss = ss.detach();
    // The kernels read the residual in x's (contiguous) order.
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let residual = residual.as_ref();
    let same = |dtype: DType| residual.is_none_or(|r| r.dtype() == dtype);
    #[cfg(feature = "cuda")]
    if crate::cuda::own_kernels(x)
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && same(x.dtype())
        && ss.dtype() == DType::F32
    {
        let ss = ss.contiguous()?;
        return match residual {
            Some(r) => x.contiguous()?.apply_op3(
                &ss,
                &r.contiguous()?,
                crate::cuda_layers::AffineAdd { relu },
            ),
            None => x.contiguous()?.apply_op2(&ss, crate::cuda_layers::Affine { relu }),
        };
    }
    let (c, two) = (ss.dim(1)?, ss.dim(0)?);
    if two != 2 {
        candle_core::bail!("channel affine: constants of shape {:?}, expected (2, c)", ss.dims());
    }
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && same(DType::F32)) {
        // f32 arithmetic (f64 for f64 tensors), the result in x's dtype.
        let dt = if x.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let up = |t: &Tensor| t.to_dtype(dt);
        let r = residual.map(up).transpose()?;
        let (scale, shift) = (up(&ss.get(0)?)?, up(&ss.get(1)?)?);
        return reference(&up(x)?, &scale, &shift, r.as_ref(), relu)?.to_dtype(x.dtype());
    }
    let v = |i: usize| -> Result<Vec<f32>> { ss.get(i)?.to_dtype(DType::F32)?.to_vec1() };
    let op = Affine { scale: v(0)?, shift: v(1)?, relu };
    debug_assert_eq!(op.scale.len(), c);
    match residual {
        Some(r) => x.contiguous()?.apply_op2(r, AffineAddCpu(op)),
        None => x.contiguous()?.apply_op1(AffineCpu(op)),
    }
}

/// `relu(x * scale[c] + shift[c] (+ residual))` for `x (b, c, h, w)`; `scale` and `shift` `(c,)`
/// are constants: [`channel_affine`] with the ReLU.
pub fn affine_relu(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let ss = Tensor::stack(&[scale.flatten_all()?, shift.flatten_all()?], 0)?;
    channel_affine(x, &ss, residual, true)
}

/// The composition: `x * scale + shift (+ residual)`, then with `relu` the ReLU.
pub fn reference(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let per = |t: &Tensor| t.reshape((1, (), 1, 1));
    let y = x.broadcast_mul(&per(scale)?)?.broadcast_add(&per(shift)?)?;
    let y = match residual {
        Some(r) => (y + r)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and both gradients against autograd through the composition: equal up to f32
    /// round-off of one multiply-add (|a - b| <= 1e-6 * max(1, max|b|)); the gradients are
    /// exact products of the same factors.
    #[test]
    fn fused_affine_relu_matches_the_composition_values_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        let r = Var::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        let scale = Tensor::new(&[0.5f32, -1.5, 2.0], &dev).unwrap();
        let shift = Tensor::new(&[0.1f32, 0.0, -0.3], &dev).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev).unwrap();
        for residual in [None, Some(r.as_tensor())] {
            let ours = affine_relu(&x, &scale, &shift, residual).unwrap();
            let theirs = reference(&x, &scale, &shift, residual, true).unwrap();
            let close = |a: &Tensor, b: &Tensor| {
                let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
                let d =
                    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-6 * m, "{d} > 1e-6 * {m}");
            };
            close(&ours, &theirs);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            close(g1.get(&x).unwrap(), g2.get(&x).unwrap());
            if let Some(r) = residual {
                close(g1.get(r).unwrap(), g2.get(r).unwrap());
            }
        }
    }

    /// The one-pass backward against candle's formulation of it (the mask `y > 0` cast to f32,
    /// `dy` times it, times the scale), bit for bit: the same two products of the same factors.
    /// `y` holds +-0, negatives, a NaN and infinities; `dy` NaNs and infinities (a NaN or an
    /// infinite gradient where `y <= 0` gives NaN in both).
    #[test]
    fn the_backward_is_candles_composition_bit_for_bit() {
        let dev = Device::Cpu;
        let (b, c, h, w) = (2usize, 3usize, 4usize, 5usize);
        let n = b * c * h * w;
        let special = [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let mut yv = glip_testing::lcg_values(n, 7);
        let mut dyv = glip_testing::lcg_values(n, 8);
        for (i, &v) in special.iter().enumerate() {
            yv[i * 17] = v;
            dyv[i * 13 + 1] = v;
        }
        dyv[17] = f32::NAN; // where y is -0
        dyv[2 * 17] = f32::INFINITY; // where y is -1
        let y = Tensor::from_vec(yv, (b, c, h, w), &dev).unwrap();
        let dy = Tensor::from_vec(dyv, (b, c, h, w), &dev).unwrap();
        let scale = vec![0.5f32, -1.5, 3.0];
        let st = Tensor::from_slice(&scale, (1, c, 1, 1), &dev).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        for relu in [true, false] {
            let op = Affine { scale: scale.clone(), shift: vec![0.0; c], relu };
            let g = if relu {
                dy.mul(&y.gt(0f32).unwrap().to_dtype(DType::F32).unwrap()).unwrap()
            } else {
                dy.clone()
            };
            let dx = g.broadcast_mul(&st).unwrap();
            for residual in [false, true] {
                let (got_dx, got_dr) = op.grads(&y, &dy, residual).unwrap();
                assert_eq!(got_dx.dims(), &[b, c, h, w]);
                assert_eq!(bits(&got_dx), bits(&dx), "dx, relu {relu}, residual {residual}");
                match got_dr {
                    Some(dr) => assert_eq!(bits(&dr), bits(&g), "dr, relu {relu}"),
                    None => assert!(!residual, "no dr with a residual"),
                }
            }
        }
        // A gradient of another shape is an error, not a panic.
        let op = Affine { scale, shift: vec![0.0; c], relu: true };
        let e = op.grads(&y, &dy.narrow(0, 0, 1).unwrap(), true).unwrap_err().to_string();
        assert!(e.contains("against a gradient"), "{e}");
    }

    #[test]
    fn a_channel_count_that_does_not_match_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap();
        let s = Tensor::ones(3, DType::F32, &dev).unwrap();
        let e = affine_relu(&x, &s, &s, None).unwrap_err().to_string();
        assert!(e.contains("3 channels"), "{e}");
    }

    /// A frozen batch norm's constants are made once per bf16 scope (the same tensor back),
    /// afresh in the next scope and outside one; a trainable weight's at every call.
    #[test]
    fn frozen_constants_are_made_once_per_bf16_scope() {
        use crate::bf16::{autocast, Precision};
        let dev = Device::Cpu;
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let (w, b, m, v) = (t(&[1.0, 2.0]), t(&[0.5, -0.5]), t(&[0.1, 0.2]), t(&[1.0, 4.0]));
        let make = |w: &Tensor| batch_norm_constants(w, &b, &m, &v, 1e-5).unwrap();
        let (a1, a2) = autocast(Precision::Bf16, || (make(&w), make(&w)));
        assert_eq!(a1.id(), a2.id(), "made twice in one scope");
        let a3 = autocast(Precision::Bf16, || make(&w));
        assert_ne!(a3.id(), a1.id(), "outlived its scope");
        assert_eq!(a3.to_vec2::<f32>().unwrap(), a1.to_vec2::<f32>().unwrap());
        assert_ne!(make(&w).id(), make(&w).id(), "cached outside a bf16 scope");
        let var = Var::from_tensor(&w).unwrap();
        let (t1, t2) = autocast(Precision::Bf16, || (make(var.as_tensor()), make(var.as_tensor())));
        assert_ne!(t1.id(), t2.id(), "a trainable weight's constants were reused");
    }
}
