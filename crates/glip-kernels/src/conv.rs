//! 2-D convolution as im2col + gemm, forward and backward, on the CPU.
//!
//! candle 0.11.1 computes the input gradient of `conv2d` with `conv_transpose2d`, which on the
//! CPU is a direct loop of dot products, and its forward extracts patches tile by tile from an
//! NHWC copy; in a ResNet-18 training step these were the two largest costs (measured with `perf`
//! on `glip bench --preset seed-r18 --mode train`). Here, image by image, with `cols_b =
//! im2col(x_b)` of shape `(ci*k*k, oh*ow)` (one row per input channel and kernel offset):
//!
//! * forward:          `y_b = w (co, ci*k*k) @ cols_b`, straight into `(b, co, oh, ow)`;
//! * weight gradient:  `sum_b grad_b (co, oh*ow) @ cols_b^T`;
//! * input gradient:   `col2im(w^T @ grad_b)`,
//!
//! the products by the `gemm` crate (candle's CPU matmul) into uninitialised output (the
//! private `gemm` module), `im2col` / `col2im` as plain loops here (candle has no public 2-D
//! col2im), images split over threads where they split evenly (`ConvF32`); small images
//! (under 192 output pixels) go several to a product, their columns side by side. Checked
//! against autograd through differentiable candle ops in this module's tests. Inside
//! [`bf16::autocast`]`(Bf16, ..)` on a CPU with AVX512_BF16 all three products run in bf16 with
//! f32 sums ([`bf16::gemm`]; `Bf16Conv`): the forward with im2col written straight into the
//! packed panels, the input gradient as `w^T @ grad` then col2im, the weight gradient as one
//! product over the batch with each image's im2col transposed into the panels; small images
//! go several to a product. Checked against f64 sums within the bf16 bound.
//! On CUDA [`conv2d`] is cuDNN's (forward and both gradients, the private `cudnn` module) where
//! the build has the `cudnn` feature, candle's `conv2d` otherwise; on other CPU dtypes candle's.

use crate::bf16;
use crate::gemm::{self, Mat};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
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

impl Geometry {
    /// A 1x1 convolution with stride 1 and no padding: the image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// The `k*k` im2col rows of one input channel `plane (h, w)` of one image into the first
    /// `oh*ow` values of rows `ld` apart in `rows`, each of those written: the input pixel each
    /// output pixel sees through that kernel offset, zero where it falls in the padding.
    fn im2col_channel(&self, plane: &[f32], rows: &mut [f32], ld: usize) {
        let (oh, ow) = self.out();
        let len = oh * ow;
        for ky in 0..self.k {
            for kx in 0..self.k {
                self.im2col_row(plane, ky, kx, &mut rows[(ky * self.k + kx) * ld..][..len]);
            }
        }
    }

    /// The im2col row of kernel offset `(ky, kx)` of one channel `plane (h, w)` into `row`
    /// (`oh*ow` values, every one written).
    fn im2col_row(&self, plane: &[f32], ky: usize, kx: usize, row: &mut [f32]) {
        let (oh, ow) = self.out();
        let (ylo, yhi) = self.span(ky, self.h, oh);
        let (xlo, xhi) = self.span(kx, self.w, ow);
        if xlo == xhi || ylo == yhi {
            row.fill(0.0);
            return;
        }
        row[..ylo * ow].fill(0.0);
        row[yhi * ow..].fill(0.0);
        let ix0 = xlo * self.stride + kx - self.pad;
        for oy in ylo..yhi {
            let out = &mut row[oy * ow..][..ow];
            out[..xlo].fill(0.0);
            out[xhi..].fill(0.0);
            let src = &plane[(oy * self.stride + ky - self.pad) * self.w + ix0..];
            let out = &mut out[xlo..xhi];
            if self.stride == 1 {
                out.copy_from_slice(&src[..out.len()]);
            } else {
                for (d, &v) in out.iter_mut().zip(src.iter().step_by(self.stride)) {
                    *d = v;
                }
            }
        }
    }
}

/// `dst[c * ld + r] = src[r * cols + c]` for the `rows x cols` row-major `src`: its transpose
/// into rows of `ld` (the first `rows` values of each), in blocks of 16 columns so that the
/// lines read and written stay in L1 (a column at a time writes one value per cache line).
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], ld: usize) {
    for c0 in (0..cols).step_by(16) {
        let c1 = (c0 + 16).min(cols);
        for r in 0..rows {
            let line = &src[r * cols..][c0..c1];
            for (c, &v) in (c0..c1).zip(line) {
                dst[c * ld + r] = v;
            }
        }
    }
}

/// How many images a bf16 product takes side by side: enough for 192 columns (four of the
/// kernels' panels of 48) where the images are that small, else one. Image by image, a 4 x 4
/// output (ResNet's layer4 at 128 px) filled a third of each panel, and every image streamed
/// the whole weight through the kernel again.
fn images_per_product(b: usize, len: usize) -> usize {
    (4 * bf16::NR).div_ceil(len.max(1)).clamp(1, b.max(1))
}

/// The product `p (rows, count * len)` of `count` images side by side (image `t` in columns
/// `t * len..`) into `out (count, rows, len)`.
fn scatter(p: &[f32], rows: usize, len: usize, count: usize, out: &mut [f32]) {
    for (t, image) in out.chunks_exact_mut(rows * len).take(count).enumerate() {
        for (r, dst) in image.chunks_exact_mut(len).enumerate() {
            dst.copy_from_slice(&p[r * count * len + t * len..][..len]);
        }
    }
}

thread_local! {
    /// Each thread's column buffer, kept between convolutions (every element is rewritten by
    /// each use); taken out while in use, so a nested use (a rayon task run while this thread
    /// waits) gets a buffer of its own.
    static COLUMNS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest column buffer a thread keeps between convolutions (16 Mi values, 64 MiB): larger
/// ones (ResNet-50's first stages on detection-sized images) go back to the allocator.
pub(crate) const KEEP_COLUMNS: usize = 16 << 20;

/// A thread's kept f32 buffer, for [`with_kept`].
pub(crate) type Kept = std::thread::LocalKey<std::cell::Cell<Vec<f32>>>;

/// Puts `buf` back in `key` for the next use on this thread, unless it is over
/// [`KEEP_COLUMNS`].
fn keep(key: &'static Kept, buf: Vec<f32>) {
    if buf.capacity() <= KEEP_COLUMNS {
        key.set(buf);
    }
}

/// Calls `f` with `n` values of the buffer `key` keeps on this thread (their contents are
/// whatever the last use left), taken out while in use (a nested use gets a buffer of its own)
/// and kept after unless it is large: this module's column buffer, and the scratch of
/// [`bf16`]'s packings.
pub(crate) fn with_kept<R>(key: &'static Kept, n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = key.take();
    buf.resize(n, 0.0);
    let r = f(&mut buf[..n]);
    keep(key, buf);
    r
}

/// Calls `f` with this thread's column buffer, `n` values long ([`with_kept`]).
fn with_buffer<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_kept(&COLUMNS, n, f)
}

impl Geometry {
    /// The adjoint of [`Geometry::im2col_channel`]: adds each of the `k*k` rows of one channel
    /// (the first `oh*ow` values of rows `ld` apart) onto the input pixels they were read from.
    fn col2im_channel(&self, rows: &[f32], ld: usize, plane: &mut [f32]) {
        let (oh, ow) = self.out();
        let len = oh * ow;
        for ky in 0..self.k {
            for kx in 0..self.k {
                let row = &rows[(ky * self.k + kx) * ld..][..len];
                self.runs(ky, kx, |i, o, n| {
                    let src = &row[o..o + n];
                    if self.stride == 1 {
                        for (d, &v) in plane[i..i + n].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (d, &v) in plane[i..].iter_mut().step_by(self.stride).zip(src) {
                            *d += v;
                        }
                    }
                });
            }
        }
    }

    /// Whether a pass over `count` groups of images gives each thread whole groups (they split
    /// evenly over the threads: serial products, no hand-offs inside one), or goes one group
    /// after another with every thread on each group's im2col and product.
    fn splits(&self, count: usize) -> bool {
        let threads = rayon::current_num_threads();
        threads > 1 && count.is_multiple_of(threads)
    }

    fn image<'a>(&self, x: &'a [f32], bi: usize) -> &'a [f32] {
        let n = self.ci * self.h * self.w;
        &x[bi * n..][..n]
    }

    /// Calls `f` with the column matrix `(ci*k*k, count*oh*ow)` of the images `i0..i0 + count`
    /// of `x (b, ci, h, w)` side by side (image `i0 + t` in columns `t*oh*ow..`): one image's
    /// own values for a pointwise convolution, else im2col in this thread's buffer (filled on
    /// every thread when `parallel`).
    fn with_columns<R>(
        &self,
        x: &[f32],
        i0: usize,
        count: usize,
        parallel: bool,
        f: impl FnOnce(Mat<'_>) -> R,
    ) -> R {
        let (oh, ow) = self.out();
        let (len, kk, hw) = (oh * ow, self.k * self.k, self.h * self.w);
        if self.pointwise() && count == 1 {
            return f(Mat::rows(self.image(x, i0), self.ci, len));
        }
        let n = count * len;
        with_buffer(self.rows() * n, |cols| {
            let fill = |(c, rows): (usize, &mut [f32])| {
                for t in 0..count {
                    let plane = &self.image(x, i0 + t)[c * hw..][..hw];
                    self.im2col_channel(plane, &mut rows[t * len..], n);
                }
            };
            if parallel {
                cols.par_chunks_mut(kk * n).enumerate().for_each(fill);
            } else {
                cols.chunks_mut(kk * n).enumerate().for_each(fill);
            }
            f(Mat::rows(cols, self.rows(), n))
        })
    }
}

/// How many images an f32 product takes side by side: one where an image's output has at
/// least 192 pixels, else the smallest divisor of the batch that gives 192 columns, or the
/// whole batch (groups of one size, so that each is one chunk of the output). At 4 x 4 output
/// pixels (ResNet's layer4 at 128 px) a product of one image ran gemm's narrowest kernel (16
/// columns: `x1x6`, 14 % of a training step's `perf` samples), streamed the whole weight (9.4
/// MB in f32) per image, and its weight gradient read and wrote the 512 x 4608 sum for every
/// 16 terms.
fn f32_images_per_product(b: usize, len: usize) -> usize {
    let want = 192usize.div_ceil(len.max(1));
    if want <= 1 {
        return 1;
    }
    (want..b).find(|&d| b.is_multiple_of(d)).unwrap_or(b).max(1)
}

thread_local! {
    /// Each thread's buffer for a group of images' gradients side by side, or their product
    /// before [`scatter`]: small (it is used only for small images), kept like [`COLUMNS`].
    static GROUP: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Calls `f` with the rows `(co, count*len)` of the images `i0..i0 + count` of `grad (b, co,
/// len)` side by side: the image's own block for one image, else gathered into this thread's
/// group buffer.
fn with_grad_group<R>(
    grad: &[f32],
    co: usize,
    len: usize,
    i0: usize,
    count: usize,
    f: impl FnOnce(Mat<'_>) -> R,
) -> R {
    if count == 1 {
        return f(Mat::rows(&grad[i0 * co * len..][..co * len], co, len));
    }
    let n = count * len;
    with_kept(&GROUP, co * n, |dst| {
        for (o, row) in dst.chunks_exact_mut(n).enumerate() {
            for (t, part) in row.chunks_exact_mut(len).enumerate() {
                part.copy_from_slice(&grad[((i0 + t) * co + o) * len..][..len]);
            }
        }
        f(Mat::rows(dst, co, n))
    })
}

/// A convolution on the CPU in f32, `x (b, ci, h, w)`, `w (co, ci, k, k)` -> `(b, co, oh, ow)`,
/// image by image, or for small images a group of them side by side
/// ([`f32_images_per_product`]), with its backward:
///
/// * forward: per group `y (co, count*oh*ow) = w (co, ci*k*k) @ cols`, straight into that
///   image's block of the output for one image (`cols` is im2col in a reused per-thread buffer,
///   or the image itself for a pointwise convolution), scattered to the images' blocks for more;
/// * input gradient: per group `col2im(w^T @ grad)` (pointwise: `w^T @ grad`, straight into the
///   output for one image);
/// * weight gradient: `sum grad @ cols^T` over the groups, one partial sum per thread, then
///   their sum.
///
/// [`Geometry::splits`] decides whether threads take whole groups or share each one. Against
/// one im2col and one gemm over the whole batch (Caffe's `(ci*k*k, b*oh*ow)` layout, what this
/// module did first): no transposed copies of outputs and gradients, no zero-filled outputs or
/// column matrices, column buffers the size of one image or group (`perf` and `glip bench`
/// figures in docs/results).
struct ConvF32(Geometry);

impl ConvF32 {
    /// Images per product, and the number of groups.
    fn groups(&self) -> (usize, usize) {
        let (oh, ow) = self.0.out();
        let per = f32_images_per_product(self.0.b, oh * ow);
        (per, self.0.b / per)
    }

    /// Calls `f` with group `gi`'s gradient rows `(co, per*oh*ow)` and its column matrix
    /// transposed, `(per*oh*ow, ci*k*k)`: the two factors of its weight gradient.
    fn with_group<R>(
        &self,
        x: &[f32],
        grad: &[f32],
        co: usize,
        gi: usize,
        parallel: bool,
        f: impl FnOnce(Mat<'_>, Mat<'_>) -> R,
    ) -> R {
        let g = self.0;
        let (oh, ow) = g.out();
        let (per, _) = self.groups();
        with_grad_group(grad, co, oh * ow, gi * per, per, |gb| {
            g.with_columns(x, gi * per, per, parallel, |cols| f(gb, cols.t()))
        })
    }

    fn forward(&self, x: &[f32], w: &[f32], co: usize) -> Vec<f32> {
        let g = self.0;
        let (oh, ow) = g.out();
        let len = oh * ow;
        let wm = Mat::rows(w, co, g.rows());
        let (per, groups) = self.groups();
        let by = g.splits(groups);
        gemm::build(groups, per * co * len, by, |gi, out| {
            g.with_columns(x, gi * per, per, !by, |cols| {
                if per == 1 {
                    return out.gemm(wm, cols, !by);
                }
                with_kept(&GROUP, co * per * len, |y| {
                    gemm::set_product(y, wm, cols, !by);
                    out.fill(|o| scatter(y, co, len, per, o))
                })
            })
        })
    }

    fn input_grad(&self, grad: &[f32], w: &[f32], co: usize) -> Vec<f32> {
        let g = self.0;
        let (oh, ow) = g.out();
        let (len, hw, kk) = (oh * ow, g.h * g.w, g.k * g.k);
        let wt = Mat::rows(w, co, g.rows()).t();
        let (per, groups) = self.groups();
        let by = g.splits(groups);
        let n = per * len;
        gemm::build(groups, per * g.ci * hw, by, |gi, out| {
            with_grad_group(grad, co, len, gi * per, per, |gb| {
                if g.pointwise() && per == 1 {
                    return out.gemm(wt, gb, !by);
                }
                with_buffer(g.rows() * n, |cols| {
                    gemm::set_product(cols, wt, gb, !by);
                    out.fill(|gx| {
                        if g.pointwise() {
                            return scatter(cols, g.ci, len, per, gx);
                        }
                        let add = |(i, plane): (usize, &mut [f32])| {
                            let (t, c) = (i / g.ci, i % g.ci);
                            g.col2im_channel(&cols[c * kk * n + t * len..], n, plane);
                        };
                        if by {
                            gx.chunks_mut(hw).enumerate().for_each(add);
                        } else {
                            gx.par_chunks_mut(hw).enumerate().for_each(add);
                        }
                    })
                })
            })
        })
    }

    fn weight_grad(&self, x: &[f32], grad: &[f32], co: usize) -> Vec<f32> {
        let g = self.0;
        let (_, groups) = self.groups();
        let by = g.splits(groups);
        let parts = if by { rayon::current_num_threads() } else { 1 };
        let each = groups / parts;
        let n = co * g.rows();
        let partial = gemm::build(parts, n, by, |t, out| {
            let mut mine = (t * each)..((t + 1) * each);
            let Some(first) = mine.next() else { return out.fill(|_| {}) };
            let mut sum = self.with_group(x, grad, co, first, !by, |gb, ct| out.gemm(gb, ct, !by));
            for gi in mine {
                self.with_group(x, grad, co, gi, !by, |gb, ct| {
                    gemm::add_product(sum.as_mut(), gb, ct, !by);
                });
            }
            sum
        });
        if parts == 1 {
            return partial;
        }
        let mut gw = partial[..n].to_vec();
        for p in partial.chunks(n).skip(1) {
            for (d, &v) in gw.iter_mut().zip(p) {
                *d += v;
            }
        }
        gw
    }
}

impl ConvF32 {
    /// [`ConvF32::input_grad`] with bf16 products and f32 sums ([`bf16::gemm`]): `w^T @ grad`
    /// over a group of images side by side ([`images_per_product`]; `w^T` packed once, each
    /// group's gradient gathered into the panels of `B`), then col2im in f32, image by image.
    fn input_grad_bf16(&self, grad: &[f32], w: &[f32], co: usize) -> Vec<f32> {
        let g = self.0;
        let (oh, ow) = g.out();
        let (len, hw, kk, rows) = (oh * ow, g.h * g.w, g.k * g.k, g.rows());
        let wt = bf16::PackedA::transposed(w, co, rows);
        let group = images_per_product(g.b, len);
        let mut gx = vec![0f32; g.b * g.ci * hw];
        for (i0, out) in (0..g.b).step_by(group).zip(gx.chunks_mut(group * g.ci * hw)) {
            let count = group.min(g.b - i0);
            let n = count * len;
            // Column `t * len + p` of `B (co, n)` is pixel `p` of image `i0 + t`'s gradient.
            let gb = bf16::PackedB::from_panels_reusing(co, n, |j0, width, scratch| {
                for (o, row) in scratch.chunks_exact_mut(bf16::NR).enumerate() {
                    let mut j = j0;
                    while j < j0 + width {
                        let (t, p) = (j / len, j % len);
                        let run = (len - p).min(j0 + width - j);
                        let src = &grad[((i0 + t) * co + o) * len + p..][..run];
                        row[j - j0..][..run].copy_from_slice(src);
                        j += run;
                    }
                }
            });
            if g.pointwise() && count == 1 {
                bf16::gemm_to(&wt, &gb, out);
                continue;
            }
            with_buffer(rows * n, |cols| {
                bf16::gemm_to(&wt, &gb, cols);
                if g.pointwise() {
                    return scatter(cols, g.ci, len, count, out);
                }
                out.par_chunks_mut(hw).enumerate().for_each(|(i, plane)| {
                    let (t, c) = (i / g.ci, i % g.ci);
                    g.col2im_channel(&cols[c * kk * n + t * len..], n, plane);
                });
            });
        }
        gx
    }

    /// [`ConvF32::weight_grad`] with bf16 products and f32 sums: one product over the whole
    /// batch, `grad (co, b*oh*ow) @ cols^T (b*oh*ow, ci*k*k)`, `grad` gathered image after
    /// image into the packed rows of `A`, and each image's im2col rows for a panel of `B` made
    /// in f32 (one image's at a time, small) and transposed into the panel. One sum of
    /// `b*oh*ow` terms per weight. (The other way round, `cols @ grad^T` transposing the
    /// gradient and the product, was slower at ResNet-18's layer3 and layer4 shapes and no
    /// faster at layer1's, `benches/gemm`'s `conv-train`.)
    fn weight_grad_bf16(&self, x: &[f32], grad: &[f32], co: usize) -> Vec<f32> {
        let g = self.0;
        let (oh, ow) = g.out();
        let (len, hw, kk) = (oh * ow, g.h * g.w, g.k * g.k);
        let a = bf16::PackedA::from_rows(co, g.b * len, |i, dst| {
            for (bi, d) in dst.chunks_exact_mut(len).enumerate() {
                d.copy_from_slice(&grad[(bi * co + i) * len..][..len]);
            }
        });
        let cols = bf16::PackedB::from_panels_reusing(g.b * len, g.rows(), |j0, width, scratch| {
            with_buffer(width * len, |part| {
                for bi in 0..g.b {
                    let image = g.image(x, bi);
                    for (jj, row) in part.chunks_exact_mut(len).enumerate() {
                        let (c, o) = ((j0 + jj) / kk, (j0 + jj) % kk);
                        g.im2col_row(&image[c * hw..][..hw], o / g.k, o % g.k, row);
                    }
                    let panel = &mut scratch[bi * len * bf16::NR..];
                    transpose_into(part, width, len, panel, bf16::NR);
                }
            })
        });
        bf16::gemm(&a, &cols)
    }

    /// The gradients of [`ConvF32`] for those of `x` and `w` that are tracked: f32 products,
    /// or bf16 ones (f32 sums) with `bf16`.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        bf16: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &ConvGrad { g: self.0, input: true, bf16 })?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.detach().apply_op2_no_bwd(&grad, &ConvGrad { g: self.0, input: false, bf16 })?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

impl CustomOp2 for ConvF32 {
    fn name(&self) -> &'static str {
        "glip-conv2d-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(s1, l1, "conv2d")?;
        let w = contiguous_f32(s2, l2, "conv2d")?;
        let co = l2.dims()[0];
        let (oh, ow) = g.out();
        Ok((CpuStorage::F32(self.forward(x, w, co)), Shape::from((g.b, co, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, grad, false)
    }
}

/// [`ConvF32`]'s gradients as ops: `(grad, w)` -> the input gradient with `input`, `(x, grad)`
/// -> the weight gradient without; their products in bf16 (f32 sums) with `bf16`.
struct ConvGrad {
    g: Geometry,
    input: bool,
    bf16: bool,
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        if self.bf16 {
            "glip-conv2d-bf16-grad"
        } else {
            "glip-conv2d-f32-grad"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let a = contiguous_f32(s1, l1, "conv2d backward")?;
        let b = contiguous_f32(s2, l2, "conv2d backward")?;
        let op = ConvF32(g);
        if self.input {
            let co = l2.dims()[0];
            let gx = if self.bf16 { op.input_grad_bf16(a, b, co) } else { op.input_grad(a, b, co) };
            Ok((CpuStorage::F32(gx), Shape::from((g.b, g.ci, g.h, g.w))))
        } else {
            let co = l2.dims()[1];
            let gw =
                if self.bf16 { op.weight_grad_bf16(a, b, co) } else { op.weight_grad(a, b, co) };
            Ok((CpuStorage::F32(gw), Shape::from((co, g.ci, g.k, g.k))))
        }
    }
}

/// im2col ([`Geometry::im2col_channel`]) straight into the bf16 panels of [`bf16::PackedB`],
/// one panel of columns at a time: the f32 columns (9x the input for a 3x3 kernel) are never
/// written out, which is what made bf16 lose to f32 on ResNet-50's early layers
/// (`benches/benches/gemm.rs`). Every entry of the panel's columns is written, the padding's
/// zeros included, so the scratch is not cleared before each panel.
fn im2col_packed(x: &[f32], g: Geometry) -> bf16::PackedB {
    let (oh, ow) = g.out();
    let (len, hw) = (oh * ow, g.h * g.w);
    // The output columns that read inside the image, per kernel column offset.
    let spans: Vec<(usize, usize)> = (0..g.k).map(|kx| g.span(kx, g.w, ow)).collect();
    bf16::PackedB::from_panels_reusing(g.rows(), g.b * len, |j0, width, scratch| {
        let mut j = j0;
        // One run of the panel's columns per output row of one image.
        while j < j0 + width {
            let (bi, pix) = (j / len, j % len);
            let (oy, ox0) = (pix / ow, pix % ow);
            let count = (ow - ox0).min(j0 + width - j);
            for c in 0..g.ci {
                let plane = &x[(bi * g.ci + c) * hw..][..hw];
                for ky in 0..g.k {
                    let iy = (oy * g.stride + ky).checked_sub(g.pad).filter(|&iy| iy < g.h);
                    for (kx, &(xlo, xhi)) in spans.iter().enumerate() {
                        let row = (c * g.k + ky) * g.k + kx;
                        // Output columns `ox0..ox0 + count` of this row; those that read
                        // outside the image (the padding) are zeros.
                        let seg = &mut scratch[row * bf16::NR + j - j0..][..count];
                        let (lo, hi) = (xlo.max(ox0), xhi.min(ox0 + count));
                        let Some(iy) = iy.filter(|_| lo < hi) else {
                            seg.fill(0.0);
                            continue;
                        };
                        seg[..lo - ox0].fill(0.0);
                        seg[hi - ox0..].fill(0.0);
                        let dst = &mut seg[lo - ox0..hi - ox0];
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

/// A convolution in bf16 (f32 sums) on the CPU, `(x, w)` -> `(b, co, oh, ow)` f32, with its
/// backward in bf16 too ([`ConvF32::grads`]). The forward ([`bf16::gemm_each`]) reads `w` as
/// the op's packed weight (`(co, ci*k*k)`, packed once per bf16 scope for a frozen weight),
/// image by image (the columns of one image packed, then its product written in place: no
/// `(co, b*oh*ow)` intermediate to transpose, which candle did on one thread, 6 % of a bf16
/// ResNet-50 inference), or small images several to a product ([`images_per_product`]).
struct Bf16Conv(Geometry, std::sync::Arc<bf16::PackedA>);

impl CustomOp2 for Bf16Conv {
    fn name(&self) -> &'static str {
        "glip-conv2d-bf16"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "conv2d-bf16")?;
        let g = self.0;
        let ((oh, ow), image, co) = (g.out(), g.ci * g.h * g.w, self.1.rows());
        let group = images_per_product(g.b, oh * ow);
        let y = if group == 1 {
            let one = Geometry { b: 1, ..g };
            bf16::gemm_each(&self.1, g.b, oh * ow, |i| im2col_packed(&x[i * image..][..image], one))
        } else {
            // Small images: several side by side in one product, then each image's block of
            // it copied out (small, as the images are).
            let mut y = vec![0f32; g.b * co * oh * ow];
            for (i0, out) in (0..g.b).step_by(group).zip(y.chunks_mut(group * co * oh * ow)) {
                let count = group.min(g.b - i0);
                let cols =
                    im2col_packed(&x[i0 * image..][..count * image], Geometry { b: count, ..g });
                scatter(&bf16::gemm(&self.1, &cols), co, oh * ow, count, out);
            }
            y
        };
        Ok((CpuStorage::F32(y), Shape::from((g.b, co, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The backward of a bf16 forward computes in bf16 too (f32 sums), as PyTorch's
        // autocast and this crate's CUDA path do: both gradient products are as large as the
        // forward's.
        ConvF32(self.0).grads(x, w, grad, true)
    }
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

fn geometry(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Geometry> {
    let (b, ci, h, wd) = x.dims4()?;
    let (_, _, k, _) = w.dims4()?;
    Ok(Geometry { b, ci, h, w: wd, k, stride, pad })
}

/// `conv2d(x (b, ci, h, w), w (co, ci, k, k))` with zero padding `pad` and stride `stride`, no
/// groups, no dilation; on the CPU with this module's im2col + gemm passes (in bf16, forward
/// and backward, inside a bf16 [`bf16::autocast`] on a CPU with AVX512_BF16), on CUDA with
/// cuDNN (the `cudnn` feature; in bf16 inside a bf16 [`bf16::autocast`], see [`crate::cuda`]).
/// The result has `x`'s dtype: a bf16 `x` (bf16 activations) computes in bf16 with the weight
/// cast to bf16 on CUDA, in f32 on the bf16 values on the CPU (rounded to bf16 after).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return crate::cuda::conv2d(x, w, stride, pad, 1);
    }
    if crate::layout::is_channels_last(x) {
        // Nothing to gain on the CPU: an NCHW copy, the result laid out as `x` was.
        return crate::layout::keeping_layout(x, |x| conv2d(x, w, stride, pad));
    }
    let (_, _, kh, kw) = w.dims4()?;
    let cpu_f32 = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    let (_, ci, h, wd) = x.dims4()?;
    if cpu_f32 && kh == kw && ci == w.dims4()?.1 && h + 2 * pad >= kh && wd + 2 * pad >= kw {
        let g = geometry(x, w, stride, pad)?;
        let co = w.dims()[0];
        if !(bf16::precision() == bf16::Precision::Bf16 && bf16::available()) {
            // candle records no backward when neither input is tracked.
            return x.contiguous()?.apply_op2(&w.contiguous()?, ConvF32(g));
        }
        // Forward and backward products in bf16.
        let a = bf16::packed_weight(w, co, g.rows())?;
        x.contiguous()?.apply_op2(&w.contiguous()?, Bf16Conv(g, a))
    } else if x.dtype() == DType::BF16 && w.dtype() == DType::F32 {
        // bf16 activations on the CPU (candle has no bf16 product there): f32 arithmetic on
        // the bf16 values, the result rounded to bf16.
        conv2d(&x.to_dtype(DType::F32)?, w, stride, pad)?.to_dtype(DType::BF16)
    } else {
        x.conv2d(w, pad, stride, 1, 1)
    }
}

/// A grouped convolution (`groups` of them side by side: `w (co, ci / groups, k, k)`): through
/// cuDNN on CUDA when this build has it ([`crate::cuda::CUDNN`]), candle's `conv2d` otherwise
/// (the model's depthwise convolution on the CPU is glip-backbone's).
///
/// On the CPU, candle 0.11.1's backward derives the input gradient's output padding from the
/// height and applies it to the width too, so where the two axes leave different remainders
/// (`(n + 2 pad - k) % stride`; a 15x14 input at stride 2) the gradient comes out a column short
/// and the backward fails. The axis with the smaller remainder gets that many zeros at its end
/// first: no window reaches them (the output is the same), the remainders agree, and the zeros'
/// gradient is dropped by the padding's own backward.
pub fn conv2d_grouped(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
) -> Result<Tensor> {
    if x.device().is_cpu() {
        if crate::layout::is_channels_last(x) {
            let f = |x: &Tensor| conv2d_grouped(x, w, stride, pad, groups);
            return crate::layout::keeping_layout(x, f);
        }
        if x.dtype() == DType::BF16 && w.dtype() == DType::F32 {
            // As in `conv2d`: f32 arithmetic on bf16 activations, the result rounded.
            let y = conv2d_grouped(&x.to_dtype(DType::F32)?, w, stride, pad, groups)?;
            return y.to_dtype(DType::BF16);
        }
        let ((_, _, h, wd), (_, _, kh, kw)) = (x.dims4()?, w.dims4()?);
        if stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} over {h}x{wd} padded by {pad}")
        }
        let (rh, rw) = ((h + 2 * pad - kh) % stride, (wd + 2 * pad - kw) % stride);
        let x = match rh.cmp(&rw) {
            std::cmp::Ordering::Greater => x.pad_with_zeros(3, 0, rh - rw)?,
            std::cmp::Ordering::Less => x.pad_with_zeros(2, 0, rw - rh)?,
            std::cmp::Ordering::Equal => x.clone(),
        };
        return x.conv2d(w, pad, stride, 1, groups);
    }
    crate::cuda::conv2d(x, w, stride, pad, groups)
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
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            assert_eq!(got.dims(), want.dims(), "{what}");
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
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

    /// The grouped convolution on the CPU where candle's own backward fails (axes leaving
    /// different remainders at stride 2, either way round): per group, values and gradients
    /// equal [`reference`]'s to f32 round-off.
    #[test]
    fn grouped_strided_non_square_inputs_get_gradients() {
        let dev = Device::Cpu;
        for hw in [(15, 14), (14, 15), (9, 9)] {
            let (g, cig, cog) = (3usize, 2usize, 2usize);
            let x = Var::randn(0f32, 1., (2, g * cig, hw.0, hw.1), &dev).unwrap();
            let w = Var::randn(0f32, 1., (g * cog, cig, 3, 3), &dev).unwrap();
            let ours = conv2d_grouped(&x, &w, 2, 1, g).unwrap();
            let parts: Vec<Tensor> = (0..g)
                .map(|i| {
                    let xi = x.narrow(1, i * cig, cig).unwrap().contiguous().unwrap();
                    let wi = w.narrow(0, i * cog, cog).unwrap().contiguous().unwrap();
                    reference(&xi, &wi, 2, 1)
                })
                .collect();
            let theirs = Tensor::cat(&parts, 1).unwrap();
            let r = Tensor::randn(0f32, 1., theirs.shape(), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let pairs = [
                (ours, theirs, "forward"),
                (g1.get(&x).unwrap().clone(), g2.get(&x).unwrap().clone(), "input gradient"),
                (g1.get(&w).unwrap().clone(), g2.get(&w).unwrap().clone(), "weight gradient"),
            ];
            for (a, b, what) in pairs {
                assert_eq!(a.dims(), b.dims(), "{what} {hw:?}");
                let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(d <= 1e-4 * scale.max(1.0), "{what} {hw:?}: max |diff| {d}");
            }
        }
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
        // Larger images; batches that do and do not split evenly over two threads.
        check(2, 2, 3, (34, 34), 3, 1, 1);
        check(3, 2, 3, (33, 32), 3, 1, 1);
        check(2, 3, 2, (32, 33), 1, 1, 0);
    }

    /// Small images several to an f32 product, in more than one group
    /// ([`f32_images_per_product`]): 3x3 with padding, pointwise, a strided 1x1, a short
    /// stride-2 window; on pools of one, two and three threads, so that the groups go whole to
    /// each thread, or one after another with the threads sharing each.
    #[test]
    fn small_images_in_groups_match_the_reference() {
        let cases = [
            (6, 3, 4, (8, 8), 3, 1, 1),   // 64 pixels: groups of 3
            (12, 2, 3, (7, 7), 3, 1, 1),  // 49: groups of 4
            (4, 2, 5, (8, 12), 3, 1, 1),  // 96: groups of 2
            (6, 4, 3, (8, 8), 1, 1, 0),   // pointwise
            (4, 3, 2, (16, 24), 1, 2, 0), // strided 1x1, 96 outputs
            (8, 2, 3, (15, 17), 3, 2, 0), // 7 x 8 outputs: groups of 4
        ];
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for (b, ci, co, hw, k, stride, pad) in cases {
                let (oh, ow) =
                    ((hw.0 + 2 * pad - k) / stride + 1, (hw.1 + 2 * pad - k) / stride + 1);
                let per = f32_images_per_product(b, oh * ow);
                assert!(per > 1 && per < b, "b{b} {oh}x{ow}: {per} images a product");
                pool.install(|| check(b, ci, co, hw, k, stride, pad));
            }
        }
    }

    /// Groups are whole divisors of the batch, one image where an image has 192 outputs,
    /// else the fewest images that give 192 columns (or the whole batch).
    #[test]
    fn f32_groups_divide_the_batch_and_fill_192_columns() {
        for b in 1..=16 {
            for len in 1..=300 {
                let per = f32_images_per_product(b, len);
                assert!(b.is_multiple_of(per), "b{b} len{len}: {per}");
                if len >= 192 {
                    assert_eq!(per, 1, "b{b} len{len}");
                    continue;
                }
                assert!(per * len >= 192 || per == b, "b{b} len{len}: {per}");
                let fewer = (1..per).filter(|d| b.is_multiple_of(*d)).any(|d| d * len >= 192);
                assert!(!fewer, "b{b} len{len}: {per} where fewer give 192 columns");
            }
        }
    }

    /// `(b, ci, co, (h, w), k, stride, pad)` of the bf16 tests: padding, strides, a stride
    /// wider than the kernel, padding wider than the stride, pointwise, a 1x1 image under a 7x7
    /// kernel, batches that do and do not split over two threads, enough channels to cross the
    /// packings' panel widths, and small images several to a product (`images_per_product`)
    /// with a short last group (3x3 and pointwise).
    type Case = (usize, usize, usize, (usize, usize), usize, usize, usize);
    const BF16_CASES: [Case; 12] = [
        (2, 3, 4, (9, 7), 3, 1, 1),
        (2, 3, 5, (10, 10), 3, 2, 1),
        (1, 4, 2, (11, 8), 7, 2, 3),
        (3, 6, 8, (5, 5), 1, 1, 0),
        (2, 6, 8, (9, 6), 1, 2, 0),
        (1, 2, 2, (1, 1), 7, 2, 3),
        (1, 1, 2, (2, 3), 3, 3, 2),
        (3, 2, 3, (33, 32), 3, 1, 1),
        (2, 17, 19, (13, 30), 3, 1, 1),
        (2, 21, 53, (13, 30), 3, 1, 1),
        (3, 4, 6, (10, 10), 3, 1, 1),
        (5, 3, 4, (8, 8), 1, 1, 0),
    ];

    /// The output size of a case.
    fn out_size((_, _, _, (h, wd), k, stride, pad): Case) -> (usize, usize) {
        ((h + 2 * pad - k) / stride + 1, (wd + 2 * pad - k) / stride + 1)
    }

    /// Calls `f(y index, x index, w index)` for every term of a direct convolution: each output
    /// and each kernel tap of it that reads inside the image (flat indices into `y (b, co, oh,
    /// ow)`, `x (b, ci, h, w)` and `w (co, ci, k, k)`).
    fn terms(case: Case, mut f: impl FnMut(usize, usize, usize)) {
        let (b, ci, co, (h, wd), k, stride, pad) = case;
        let (oh, ow) = out_size(case);
        for yi in 0..b * co * oh * ow {
            let (bi, o, oy, ox) = (yi / (co * oh * ow), yi / (oh * ow) % co, yi / ow % oh, yi % ow);
            for c in 0..ci {
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                        if iy < pad || ix < pad || iy - pad >= h || ix - pad >= wd {
                            continue;
                        }
                        let xi = ((bi * ci + c) * h + iy - pad) * wd + ix - pad;
                        f(yi, xi, ((o * ci + c) * k + ky) * k + kx);
                    }
                }
            }
        }
    }

    /// Asserts `|got - exact| <= rel * mag` value by value.
    fn assert_within(what: &str, got: &[f32], exact: &[f64], mag: &[f64], rel: f64) {
        assert_eq!(got.len(), exact.len(), "{what}");
        for (i, ((&g, &e), &m)) in got.iter().zip(exact).zip(mag).enumerate() {
            assert!(
                (g as f64 - e).abs() <= rel * m,
                "{what} {i}: {g} against {e} (terms' magnitude {m})"
            );
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Runs `f` on each of [`BF16_CASES`] with the CPU device, or says why not (a CPU without
    /// AVX512_BF16, where autocast keeps f32).
    fn each_bf16_case(mut f: impl FnMut(Case, &Device)) {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16, so autocast keeps f32");
            return;
        }
        BF16_CASES.into_iter().for_each(|case| f(case, &Device::Cpu));
    }

    /// The bf16 forward (inside `autocast`) against a direct f64 convolution of the unrounded
    /// inputs, within `bf16`'s bound per output: `(2^-7 + 2^-16 + gamma_K) * sum |x w|` over the
    /// `K = ci*k*k` terms of that output (inputs rounded to 8 significant bits, exact products,
    /// f32 sums).
    #[test]
    fn bf16_forward_is_within_the_rounding_bound() {
        each_bf16_case(|case, dev| {
            let (b, ci, co, (h, wd), k, stride, pad) = case;
            let (oh, ow) = out_size(case);
            let x = Tensor::randn(0f32, 1., (b, ci, h, wd), dev).unwrap();
            let w = Tensor::randn(0f32, 1., (co, ci, k, k), dev).unwrap();
            let got =
                bf16::autocast(bf16::Precision::Bf16, || conv2d(&x, &w, stride, pad)).unwrap();
            assert_eq!(got.dims(), &[b, co, oh, ow]);
            let (xv, wv, gv) = (values(&x), values(&w), values(&got));
            let (mut exact, mut mag) = (vec![0f64; gv.len()], vec![0f64; gv.len()]);
            terms(case, |yi, xi, wi| {
                let p = xv[xi] as f64 * wv[wi] as f64;
                exact[yi] += p;
                mag[yi] += p.abs();
            });
            let what = format!("{case:?}: output");
            assert_within(&what, &gv, &exact, &mag, bf16::relative_error_bound(ci * k * k));
            let f32_out = values(&conv2d(&x, &w, stride, pad).unwrap());
            assert!(
                gv != f32_out || gv.iter().all(|&v| v == 0.0),
                "{case:?}: autocast left the f32 path in place"
            );
        });
    }

    /// `gamma_n = n u / (1 - n u)`, `u = 2^-24`: the bound on f32 summation of `n` terms.
    fn gamma(n: usize) -> f64 {
        let nu = n as f64 * 2f64.powi(-24);
        nu / (1.0 - nu)
    }

    /// Under a bf16 autocast the backward computes in bf16 too: the gradients of
    /// `sum(conv(x, w) * r)` against direct f64 sums over every `(output, kernel offset)` pair
    /// of the unrounded inputs, per gradient value within
    /// * weight gradient, one product of `B = b*oh*ow` terms: `relative_error_bound(B)` (the
    ///   bf16 module's bound) times the sum of the terms' magnitudes;
    /// * input gradient, products of `co` terms (bound `e = relative_error_bound(co)`) of
    ///   which col2im adds up to `k*k` in f32: `e + gamma_kk (1 + e)` times the sum of the
    ///   magnitudes.
    #[test]
    fn bf16_gradients_are_within_the_rounding_bound() {
        each_bf16_case(|case, dev| {
            let (b, ci, co, (h, wd), k, stride, pad) = case;
            let (oh, ow) = out_size(case);
            let x = Var::randn(0f32, 1., (b, ci, h, wd), dev).unwrap();
            let w = Var::randn(0f32, 1., (co, ci, k, k), dev).unwrap();
            let r = Tensor::randn(0f32, 1., (b, co, oh, ow), dev).unwrap();
            let run = |p| {
                let y = bf16::autocast(p, || conv2d(&x, &w, stride, pad)).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                (values(g.get(&x).unwrap()), values(g.get(&w).unwrap()))
            };
            let (gx, gw) = run(bf16::Precision::Bf16);
            let (gx32, gw32) = run(bf16::Precision::F32);
            let (xv, wv, rv) = (values(&x), values(&w), values(&r));
            // Exact gradients and the magnitudes of their terms.
            let (mut ex, mut mx) = (vec![0f64; xv.len()], vec![0f64; xv.len()]);
            let (mut ew, mut mw) = (vec![0f64; wv.len()], vec![0f64; wv.len()]);
            terms(case, |yi, xi, wi| {
                let (t, u) = (rv[yi] as f64 * wv[wi] as f64, rv[yi] as f64 * xv[xi] as f64);
                ex[xi] += t;
                mx[xi] += t.abs();
                ew[wi] += u;
                mw[wi] += u.abs();
            });
            let e = bf16::relative_error_bound(co);
            let rel_x = e + gamma(k * k) * (1.0 + e);
            let rel_w = bf16::relative_error_bound(b * oh * ow);
            assert_within(&format!("{case:?}: input gradient"), &gx, &ex, &mx, rel_x);
            assert_within(&format!("{case:?}: weight gradient"), &gw, &ew, &mw, rel_w);
            assert_ne!(gw, gw32, "{case:?}: the weight gradient did not run in bf16");
            if gx.iter().any(|&v| v != 0.0) {
                assert_ne!(gx, gx32, "{case:?}: the input gradient did not run in bf16");
            }
        });
    }

    /// A frozen input under a bf16 autocast: the weight gradient only (bf16), none for `x`.
    #[test]
    fn a_frozen_input_gets_only_the_bf16_weight_gradient() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16, so autocast keeps f32");
            return;
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 6, 6), &dev).unwrap();
        let w = Var::randn(0f32, 1., (4, 3, 3, 3), &dev).unwrap();
        let y = bf16::autocast(bf16::Precision::Bf16, || conv2d(&x, &w, 1, 1)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert_eq!(g.get(&w).unwrap().dims(), &[4, 3, 3, 3]);
    }

    #[test]
    fn large_column_buffers_are_not_kept() {
        keep(&COLUMNS, Vec::with_capacity(1000));
        assert!(COLUMNS.take().capacity() >= 1000, "a small buffer is kept");
        keep(&COLUMNS, Vec::with_capacity(KEEP_COLUMNS + 1));
        assert_eq!(COLUMNS.take().capacity(), 0, "a large buffer went back to the allocator");
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
