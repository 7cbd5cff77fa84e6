//! 2-D convolution as im2col + gemm, forward and backward, on the CPU.
//!
//! candle 0.11.1 computes the input gradient of `conv2d` with `conv_transpose2d`, which on the
//! CPU is a direct loop of dot products, and its forward extracts patches tile by tile from an
//! NHWC copy; in a ResNet-18 training step these were the two largest costs (measured with `perf`
//! on `glip bench --preset seed-r18 --mode train`). Here, with `cols = im2col(x)` of shape
//! `(ci*k*k, b*oh*ow)` (Caffe's layout, every image side by side: one row per input channel and
//! kernel offset, so that each product is one large gemm rather than one per image):
//!
//! * forward:          `y = w (co, ci*k*k) @ cols`, then `(co, b, ..)` -> `(b, co, ..)`;
//! * weight gradient:  `grad (co, b*oh*ow) @ cols^T`;
//! * input gradient:   `col2im(w^T @ grad)`,
//!
//! the products by candle's gemm, `im2col` / `col2im` as plain loops here (candle has no public
//! 2-D col2im). Checked against autograd through differentiable candle ops in this module's
//! tests. Inside [`bf16::autocast`]`(Bf16, ..)` on a CPU with AVX512_BF16 the forward product
//! runs in bf16 ([`bf16::gemm`], im2col written straight into its panels); the gradients stay
//! f32 gemms. On other devices and dtypes [`conv2d`] is candle's `conv2d`.

use crate::bf16;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution (square kernel, same stride and zero padding on both axes).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    ci: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn out(&self) -> (usize, usize) {
        let o = |len: usize| (len + 2 * self.pad - self.k) / self.stride + 1;
        (o(self.h), o(self.w))
    }

    fn rows(&self) -> usize {
        self.ci * self.k * self.k
    }

    /// The output positions `lo..hi` along an axis of `len` input pixels (and `olen` outputs)
    /// whose input `o * stride + ki - pad` lies inside the image.
    fn span(&self, ki: usize, len: usize, olen: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if self.pad > ki { (self.pad - ki).div_ceil(s) } else { 0 };
        let hi =
            if len + self.pad > ki { ((len - 1 + self.pad - ki) / s + 1).min(olen) } else { 0 };
        (lo, hi.max(lo))
    }

    /// For kernel offset `(ky, kx)`, calls `f(input start, output start, count)` once per output
    /// row that reads inside the image: output pixels `start..start + count` read the input
    /// pixels `start + j * stride` (the bounds are worked out once per row, not per pixel).
    fn runs(&self, ky: usize, kx: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = self.out();
        let (ylo, yhi) = self.span(ky, self.h, oh);
        let (xlo, xhi) = self.span(kx, self.w, ow);
        if xlo == xhi {
            return;
        }
        let ix0 = xlo * self.stride + kx - self.pad;
        for oy in ylo..yhi {
            let iy = oy * self.stride + ky - self.pad;
            f(iy * self.w + ix0, oy * ow + xlo, xhi - xlo);
        }
    }
}

/// `(b, ci, h, w)` -> `(ci*k*k, b*oh*ow)`: row `(c, ky, kx)` holds, for every image and output
/// pixel, the input pixel it sees through that kernel offset (zero in the padding).
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "glip-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(s, l, "im2col")?;
        let (oh, ow) = g.out();
        let (kk, len, hw) = (g.k * g.k, oh * ow, g.h * g.w);
        let width = g.b * len;
        let mut cols = vec![0f32; g.rows() * width];
        // One task per input channel: its k*k rows, across every image.
        cols.par_chunks_mut(kk * width).enumerate().for_each(|(c, rows)| {
            for bi in 0..g.b {
                let plane = &x[(bi * g.ci + c) * hw..][..hw];
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let row = &mut rows[(ky * g.k + kx) * width + bi * len..][..len];
                        g.runs(ky, kx, |i, o, n| {
                            let out = &mut row[o..o + n];
                            if g.stride == 1 {
                                out.copy_from_slice(&plane[i..i + n]);
                            } else {
                                let src = plane[i..].iter().step_by(g.stride);
                                for (d, &v) in out.iter_mut().zip(src) {
                                    *d = v;
                                }
                            }
                        });
                    }
                }
            }
        });
        Ok((CpuStorage::F32(cols), Shape::from((g.rows(), width))))
    }
}

/// The adjoint of [`Im2Col`]: `(ci*k*k, b*oh*ow)` -> `(b, ci, h, w)`, summing every entry back
/// onto the input pixel it came from.
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "glip-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous_f32(s, l, "col2im")?;
        let (oh, ow) = g.out();
        let (kk, len) = (g.k * g.k, oh * ow);
        let width = g.b * len;
        let mut x = vec![0f32; g.b * g.ci * g.h * g.w];
        // One task per (image, channel) plane: each owns its output, so no two write alike.
        x.par_chunks_mut(g.h * g.w).enumerate().for_each(|(p, plane)| {
            let (bi, c) = (p / g.ci, p % g.ci);
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let row = &cols[(c * kk + ky * g.k + kx) * width + bi * len..][..len];
                    g.runs(ky, kx, |i, o, n| {
                        let src = &row[o..o + n];
                        if g.stride == 1 {
                            for (d, &v) in plane[i..i + n].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            let dst = plane[i..].iter_mut().step_by(g.stride);
                            for (d, &v) in dst.zip(src) {
                                *d += v;
                            }
                        }
                    });
                }
            }
        });
        Ok((CpuStorage::F32(x), Shape::from((g.b, g.ci, g.h, g.w))))
    }
}

impl Geometry {
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// `im2col(x)`, or `x` with its first two axes swapped when the convolution is 1x1, stride 1,
/// no padding.
fn columns(x: &Tensor, g: Geometry) -> Result<Tensor> {
    if g.pointwise() {
        x.transpose(0, 1)?.contiguous()?.reshape((g.ci, ()))
    } else {
        x.contiguous()?.apply_op1_no_bwd(&Im2Col(g))
    }
}

/// [`Im2Col`] straight into the bf16 panels of [`bf16::PackedB`], one panel of columns at a
/// time: the f32 columns (9x the input for a 3x3 kernel) are never written out, which is what
/// made bf16 lose to f32 on ResNet-50's early layers (`benches/benches/gemm.rs`).
fn im2col_packed(x: &[f32], g: Geometry) -> bf16::PackedB {
    let (oh, ow) = g.out();
    let (len, hw) = (oh * ow, g.h * g.w);
    // The output columns that read inside the image, per kernel column offset.
    let spans: Vec<(usize, usize)> = (0..g.k).map(|kx| g.span(kx, g.w, ow)).collect();
    bf16::PackedB::from_panels(g.rows(), g.b * len, |j0, width, scratch| {
        let mut j = j0;
        // One run of the panel's columns per output row of one image.
        while j < j0 + width {
            let (bi, pix) = (j / len, j % len);
            let (oy, ox0) = (pix / ow, pix % ow);
            let count = (ow - ox0).min(j0 + width - j);
            for c in 0..g.ci {
                let plane = &x[(bi * g.ci + c) * hw..][..hw];
                for ky in 0..g.k {
                    let Some(iy) = (oy * g.stride + ky).checked_sub(g.pad).filter(|&iy| iy < g.h)
                    else {
                        continue;
                    };
                    for (kx, &(xlo, xhi)) in spans.iter().enumerate() {
                        let (lo, hi) = (xlo.max(ox0), xhi.min(ox0 + count));
                        if lo >= hi {
                            continue;
                        }
                        let row = (c * g.k + ky) * g.k + kx;
                        let dst = &mut scratch[row * bf16::NR + j - j0 + lo - ox0..][..hi - lo];
                        let src = &plane[iy * g.w + lo * g.stride + kx - g.pad..];
                        if g.stride == 1 {
                            dst.copy_from_slice(&src[..hi - lo]);
                        } else {
                            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(g.stride)) {
                                *d = v;
                            }
                        }
                    }
                }
            }
            j += count;
        }
    })
}

/// The forward product of a gradient-free convolution in bf16 ([`bf16::gemm`]): `x (b, ci, h,
/// w)` and the packed weight `(co, ci*k*k)` -> `(co, b*oh*ow)` f32.
struct Bf16Conv(Geometry, std::sync::Arc<bf16::PackedA>);

impl CustomOp1 for Bf16Conv {
    fn name(&self) -> &'static str {
        "glip-conv2d-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "conv2d-bf16")?;
        let b = im2col_packed(x, self.0);
        let (co, n) = (self.1.rows(), b.cols());
        Ok((CpuStorage::F32(bf16::gemm(&self.1, &b)), Shape::from((co, n))))
    }
}

/// `(b, c, h, w)` -> `(c, b*h*w)`, and back.
fn channels_first(t: &Tensor) -> Result<Tensor> {
    let c = t.dims()[1];
    t.transpose(0, 1)?.contiguous()?.reshape((c, ()))
}

fn batch_first(t: &Tensor, b: usize, h: usize, w: usize) -> Result<Tensor> {
    let c = t.dims()[0];
    t.reshape((c, b, h, w))?.transpose(0, 1)?.contiguous()
}

/// The f32 slice of a contiguous CPU tensor, or an error naming `op` (shared by the CPU kernels
/// of this crate).
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: f32 only") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// Carries the forward result `y = conv2d(x, w)` (computed without a graph) and attaches the
/// gemm backward pass above to `x` and `w`: its own forward is a copy of `y`.
struct AttachConvGrad {
    stride: usize,
    pad: usize,
}

impl CustomOp3 for AttachConvGrad {
    fn name(&self) -> &'static str {
        "glip-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "conv2d")?;
        Ok((CpuStorage::F32(y.to_vec()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = geometry(x, w, self.stride, self.pad)?;
        let co = w.dims()[0];
        let grad = channels_first(grad)?; // (co, b*oh*ow)
        let wm = w.reshape((co, g.rows()))?;
        let gx = if x.track_op() {
            let cols = wm.t()?.matmul(&grad)?;
            Some(if g.pointwise() {
                batch_first(&cols, g.b, g.h, g.w)?
            } else {
                cols.apply_op1_no_bwd(&Col2Im(g))?
            })
        } else {
            None
        };
        let gw = if w.track_op() {
            let cols = columns(&x.detach(), g)?;
            Some(grad.matmul(&cols.t()?)?.reshape(w.shape())?)
        } else {
            None
        };
        Ok((None, gx, gw))
    }
}

fn geometry(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Geometry> {
    let (b, ci, h, wd) = x.dims4()?;
    let (_, _, k, _) = w.dims4()?;
    Ok(Geometry { b, ci, h, w: wd, k, stride, pad })
}

/// `conv2d(x (b, ci, h, w), w (co, ci, k, k))` with zero padding `pad` and stride `stride`, no
/// groups, no dilation; on the CPU in f32 with this module's im2col + gemm passes.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    let (_, ci, h, wd) = x.dims4()?;
    if cpu_f32 && kh == kw && ci == w.dims4()?.1 && h + 2 * pad >= kh && wd + 2 * pad >= kw {
        let g = geometry(x, w, stride, pad)?;
        let (oh, ow) = g.out();
        let co = w.dims()[0];
        let frozen = !(x.track_op() || w.track_op());
        let y = if bf16::precision() == bf16::Precision::Bf16 && bf16::available() {
            // The forward product in bf16; a backward below stays f32.
            let a = bf16::packed_weight(w, co, g.rows())?;
            x.detach().contiguous()?.apply_op1_no_bwd(&Bf16Conv(g, a))?
        } else {
            let cols = columns(&x.detach(), g)?;
            w.detach().reshape((co, g.rows()))?.matmul(&cols)?
        };
        let y = batch_first(&y, g.b, oh, ow)?;
        if frozen {
            return Ok(y);
        }
        y.apply_op3(x, w, AttachConvGrad { stride, pad })
    } else {
        x.conv2d(w, pad, stride, 1, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// An independent convolution from differentiable candle ops only (pad, index_select,
    /// matmul): the sum over kernel offsets of a strided input view times that offset's
    /// `(ci, co)` weight slice. Its autograd is the reference for ours.
    fn reference(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Tensor {
        let (_, _, h, wd) = x.dims4().unwrap();
        let (co, ci, k, _) = w.dims4().unwrap();
        let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (wd + 2 * pad - k) / stride + 1);
        let xp = x.pad_with_zeros(2, pad, pad).unwrap().pad_with_zeros(3, pad, pad).unwrap();
        let idx = |start: usize, n: usize| {
            let v: Vec<u32> = (0..n).map(|i| (start + i * stride) as u32).collect();
            Tensor::new(v, x.device()).unwrap()
        };
        let mut acc: Option<Tensor> = None;
        for ky in 0..k {
            let rows = xp.index_select(&idx(ky, oh), 2).unwrap();
            for kx in 0..k {
                let patch = rows.index_select(&idx(kx, ow), 3).unwrap();
                let patch = patch.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
                let wk = w
                    .narrow(2, ky, 1)
                    .unwrap()
                    .narrow(3, kx, 1)
                    .unwrap()
                    .reshape((co, ci))
                    .unwrap();
                let term = patch.broadcast_matmul(&wk.t().unwrap()).unwrap();
                acc = Some(match acc {
                    Some(a) => (a + term).unwrap(),
                    None => term,
                });
            }
        }
        acc.unwrap().permute((0, 3, 1, 2)).unwrap()
    }

    /// Values and gradients of `sum(conv(x, w) * r)` for a fixed random `r`, ours against
    /// [`reference`]: equal to f32 round-off (1e-4 relative to the largest value).
    fn check(
        b: usize,
        ci: usize,
        co: usize,
        hw: (usize, usize),
        k: usize,
        stride: usize,
        pad: usize,
    ) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (b, ci, hw.0, hw.1), &dev).unwrap();
        let w = Var::randn(0f32, 1., (co, ci, k, k), &dev).unwrap();
        let ours = conv2d(&x, &w, stride, pad).unwrap();
        let theirs = reference(&x, &w, stride, pad);
        let r = Tensor::randn(0f32, 1., theirs.shape(), &dev).unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            assert_eq!(a.dims(), b.dims(), "{what}");
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-4 * scale, "{what}: max |diff| {d} (scale {scale}) for b{b} ci{ci} co{co} {hw:?} k{k} s{stride} p{pad}");
        };
        close(&ours, &theirs, "forward");
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), "input gradient");
        close(g1.get(&w).unwrap(), g2.get(&w).unwrap(), "weight gradient");
    }

    /// candle 0.11.1's own conv2d backward fails on this shape (it derives the transposed
    /// convolution's output padding from the height only and applies it to the width too).
    #[test]
    fn non_square_strided_inputs_get_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (1, 4, 11, 8), &dev).unwrap();
        let w = Var::randn(0f32, 1., (2, 4, 7, 7), &dev).unwrap();
        let candle = x.conv2d(&w, 3, 2, 1, 1).unwrap().sum_all().unwrap().backward();
        assert!(candle.is_err(), "candle's conv backward now handles this shape");
        check(1, 4, 2, (11, 8), 7, 2, 3);
    }

    #[test]
    fn gradients_match_a_reference_from_differentiable_ops() {
        check(2, 3, 4, (9, 7), 3, 1, 1);
        check(2, 3, 5, (10, 10), 3, 2, 1);
        check(1, 4, 2, (11, 8), 7, 2, 3);
        check(3, 6, 8, (5, 5), 1, 1, 0);
        check(2, 6, 8, (9, 6), 1, 2, 0);
        check(1, 2, 3, (6, 6), 3, 1, 0);
        // Rows and columns whose window lies partly or wholly in the padding: a 1x1 image
        // under a 7x7 kernel, padding wider than the stride, a stride wider than the kernel.
        check(1, 2, 2, (1, 1), 7, 2, 3);
        check(1, 1, 2, (2, 3), 3, 3, 2);
        check(2, 2, 2, (4, 5), 3, 2, 0);
        check(1, 3, 2, (5, 2), 5, 1, 4);
    }

    /// The bf16 forward (inside `autocast`) against a direct f64 convolution of the unrounded
    /// inputs, within `bf16`'s bound per output: `(2^-7 + 2^-16 + gamma_K) * sum |x w|` over the
    /// `K = ci*k*k` terms of that output (inputs rounded to 8 significant bits, exact products,
    /// f32 sums).
    #[test]
    fn bf16_forward_is_within_the_rounding_bound() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16, so autocast keeps f32");
            return;
        }
        let dev = Device::Cpu;
        for (b, ci, co, (h, wd), k, stride, pad) in [
            (2, 3, 4, (9, 7), 3, 1, 1),
            (2, 3, 5, (10, 10), 3, 2, 1),
            (1, 4, 2, (11, 8), 7, 2, 3),
            (3, 6, 8, (5, 5), 1, 1, 0),
            (2, 6, 8, (9, 6), 1, 2, 0),
            (1, 2, 2, (1, 1), 7, 2, 3),
            (2, 17, 19, (13, 30), 3, 1, 1),
        ] {
            let x = Tensor::randn(0f32, 1., (b, ci, h, wd), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (co, ci, k, k), &dev).unwrap();
            let got =
                bf16::autocast(bf16::Precision::Bf16, || conv2d(&x, &w, stride, pad)).unwrap();
            let f32_out = conv2d(&x, &w, stride, pad).unwrap();
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (wd + 2 * pad - k) / stride + 1);
            assert_eq!(got.dims(), &[b, co, oh, ow]);
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let gv: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let fv: Vec<f32> = f32_out.flatten_all().unwrap().to_vec1().unwrap();
            let rel = bf16::relative_error_bound(ci * k * k);
            let mut differs = false;
            for (o, (&g, &f)) in gv.iter().zip(&fv).enumerate() {
                let (bi, oc, oy, ox) =
                    (o / (co * oh * ow), o / (oh * ow) % co, o / ow % oh, o % ow);
                let (mut exact, mut mag) = (0f64, 0f64);
                for c in 0..ci {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) = (
                                (oy * stride + ky) as isize - pad as isize,
                                (ox * stride + kx) as isize - pad as isize,
                            );
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            let xi =
                                xv[((bi * ci + c) * h + iy as usize) * wd + ix as usize] as f64;
                            let p = xi * wv[((oc * ci + c) * k + ky) * k + kx] as f64;
                            exact += p;
                            mag += p.abs();
                        }
                    }
                }
                assert!(
                    (g as f64 - exact).abs() <= rel * mag,
                    "b{b} ci{ci} co{co} k{k} s{stride} p{pad} at {o}: {g} against {exact}"
                );
                differs |= g != f;
            }
            assert!(differs || gv.iter().all(|&v| v == 0.0), "autocast left the f32 path in place");
        }
    }

    /// Under a bf16 autocast the backward is the f32 one: the gradients of `sum(conv(x, w) * r)`
    /// (which depend on `x`, `w` and `r`, not on the forward's values) equal the f32 path's bit
    /// for bit, while the forward differs (it ran in bf16).
    #[test]
    fn bf16_forward_keeps_f32_gradients() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16, so autocast keeps f32");
            return;
        }
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 5, 9, 7), &dev).unwrap();
        let w = Var::randn(0f32, 1., (6, 5, 3, 3), &dev).unwrap();
        let r = Tensor::randn(0f32, 1., (2, 6, 5, 4), &dev).unwrap();
        let run = |p| {
            let y = bf16::autocast(p, || conv2d(&x, &w, 2, 1)).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (v(&y), v(g.get(&x).unwrap()), v(g.get(&w).unwrap()))
        };
        let (y16, gx16, gw16) = run(bf16::Precision::Bf16);
        let (y32, gx32, gw32) = run(bf16::Precision::F32);
        assert_ne!(y16, y32, "the forward did not run in bf16");
        assert_eq!(gx16, gx32, "input gradient");
        assert_eq!(gw16, gw32, "weight gradient");
    }

    #[test]
    fn a_frozen_input_gets_no_gradient_work() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 2, 5, 5), &dev).unwrap();
        let w = Var::randn(0f32, 1., (3, 2, 3, 3), &dev).unwrap();
        let g = conv2d(&x, &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&w).is_some());
    }
}
