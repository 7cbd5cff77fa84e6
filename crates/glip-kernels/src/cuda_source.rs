//! The CUDA C of this crate's own GPU kernels, compiled at run time with NVRTC by the `cuda`
//! build (`cuda_launch`), and compiled in every build so that the CPU can test it: the tests
//! here run these very sources on the CPU under an emulation of CUDA's execution model (a
//! block's threads as OS threads meeting at `__syncthreads()` barriers, blocks one after
//! another; `emulation`), against exact values. That CUDA's compilers take them, `nvrtc` checks
//! without a GPU: NVRTC compiles each module as the `cuda` build does, `ptxas` assembles it for
//! `sm_75`, `sm_80` and the lent GPUs' `sm_90`, and no kernel spills or keeps a stack frame.
//! What neither can show (the launches through cudarc, GPU memory, the compiled code's results)
//! glip-train's `tests/cuda.rs` checks on a GPU.
//!
//! The kernels keep to what both compilers take: no warp intrinsics, reductions through shared
//! memory over a power-of-two block, `__int_as_float` for infinities; one kernel adds with
//! `atomicAdd` on floats (deformable sampling's value gradient), which the emulation makes a
//! `std::atomic_ref` addition.

#![cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "launched only by the cuda build; tested in every build")
)]

/// Threads per block: the row and channel kernels run `block_threads(n)` of them (a power of
/// two, at most this), the element-wise ones this many.
pub(crate) const THREADS: u32 = 256;
// The reductions' `__shared__` arrays below hold 256 values: one per thread of a block.
const _: () = assert!(THREADS == 256);

/// The block size for reductions over `n` elements: the smallest power of two holding `n`,
/// from one warp (32) to [`THREADS`].
pub(crate) fn block_threads(n: usize) -> u32 {
    (n.next_power_of_two() as u32).clamp(32, THREADS)
}

/// 64-bit words per tensor in the many-tensor kernels' table (`GLIP_TABLE_WORDS` in [`OPTIM`]).
#[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "read by cuda_optim and the tests"))]
pub(crate) const TABLE_WORDS: usize = 10;

/// The optimiser's passes ([`crate::optim`]): AdamW's moment update and weight update and the
/// EMA, grid-stride loops over `n` elements; the same AdamW update for many tensors in one
/// launch (`glip_adamw_all`); and the gradient norm's sum of squares in f64 over many tensors:
/// each block's partial sum of one chunk of one tensor (`glip_sum_squares_all`, a tree in shared
/// memory), then one block adding every partial (`glip_sum_f64`), so the order of the sums is
/// fixed by the sizes alone (the same total on every run).
///
/// The many-tensor kernels read a table of [`TABLE_WORDS`] 64-bit words per tensor: the
/// addresses of the weight, its moments `[m; v]` and its gradient, its length `n`, the index of
/// its first chunk, then 32-bit floats (AdamW's `c, b1, a1, b2, a2, keep, step, r, eps`). Chunk
/// `b` (of `chunks`; blocks stride over them) is `chunk` elements of the tensor whose chunks hold
/// `b` (a binary search over the first-chunk indices), from `(b - first) chunk` on.
pub(crate) const OPTIM: &str = r#"
__device__ void glip_tree_sum_f64(double acc, double *sh) {
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
}

#define GLIP_TABLE_WORDS 10

/// The table entry of the tensor whose chunks hold chunk `b`, and the chunk's first element.
__device__ const unsigned long long *glip_entry(const unsigned long long *table,
                                                unsigned int tensors, unsigned long long chunk,
                                                unsigned long long b, unsigned long long *start) {
    unsigned int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        unsigned int mid = (lo + hi + 1) / 2;
        if (table[mid * GLIP_TABLE_WORDS + 4] <= b) lo = mid; else hi = mid - 1;
    }
    const unsigned long long *e = table + lo * GLIP_TABLE_WORDS;
    *start = (b - e[4]) * chunk;
    return e;
}

extern "C" __global__ void glip_sum_squares_all(const unsigned long long *table,
                                                unsigned int tensors, unsigned long long chunk,
                                                unsigned long long chunks, double *parts) {
    __shared__ double sh[256];
    double acc = 0.0;
    for (unsigned long long b = blockIdx.x; b < chunks; b += gridDim.x) {
        unsigned long long start;
        const unsigned long long *e = glip_entry(table, tensors, chunk, b, &start);
        const float *x = (const float *)e[2];
        unsigned long long n = e[3];
        unsigned long long end = start + chunk < n ? start + chunk : n;
        for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            double v = (double)x[i];
            acc += v * v;
        }
    }
    glip_tree_sum_f64(acc, sh);
    if (threadIdx.x == 0) parts[blockIdx.x] = sh[0];
}

extern "C" __global__ void glip_adamw_all(const unsigned long long *table, unsigned int tensors,
                                          unsigned long long chunk, unsigned long long chunks) {
    for (unsigned long long b = blockIdx.x; b < chunks; b += gridDim.x) {
        unsigned long long start;
        const unsigned long long *e = glip_entry(table, tensors, chunk, b, &start);
        float *w = (float *)e[0];
        float *mv = (float *)e[1];
        const float *g = (const float *)e[2];
        unsigned long long n = e[3];
        const float *s = (const float *)(e + 5);
        float c = s[0], b1 = s[1], a1 = s[2], b2 = s[3], a2 = s[4];
        float keep = s[5], step = s[6], r = s[7], eps = s[8];
        unsigned long long end = start + chunk < n ? start + chunk : n;
        for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
            float gi = c * g[i];
            float m = b1 * mv[i] + a1 * gi;
            float v = b2 * mv[n + i] + a2 * (gi * gi);
            mv[i] = m;
            mv[n + i] = v;
            w[i] = w[i] * keep - step * m / (sqrtf(v) * r + eps);
        }
    }
}

extern "C" __global__ void glip_sum_f64(const double *parts, unsigned long long n, double *out) {
    __shared__ double sh[256];
    double acc = 0.0;
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) acc += parts[i];
    glip_tree_sum_f64(acc, sh);
    if (threadIdx.x == 0) out[0] = sh[0];
}

extern "C" __global__ void glip_adamw_moments(float *mv, const float *g, unsigned long long n,
                                              float c, float b1, float a1, float b2, float a2) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        float gi = c * g[i];
        mv[i] = b1 * mv[i] + a1 * gi;
        mv[n + i] = b2 * mv[n + i] + a2 * (gi * gi);
    }
}

extern "C" __global__ void glip_adamw_apply(float *w, const float *mv, unsigned long long n,
                                            float keep, float step, float inv_root_bc2,
                                            float eps) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        w[i] = w[i] * keep - step * mv[i] / (sqrtf(mv[n + i]) * inv_root_bc2 + eps);
    }
}

extern "C" __global__ void glip_ema(float *e, const float *w, unsigned long long n, float d,
                                    float a) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        e[i] = d * e[i] + a * w[i];
    }
}
"#;

/// bf16 in the kernels, without `cuda_bf16.h` (which NVRTC would need on its include path and
/// the CPU's compiler has not): `glip_bf16` is the 16 bits of a bf16 (the top half of an f32's),
/// `glip_load` reads an element as f32 (exact), `glip_put` writes an f32 rounded to the nearest
/// even bf16 (a NaN stays a NaN), as CUDA's `__float2bfloat16` and the `half` crate round.
macro_rules! bf16_prelude {
    () => {
        r#"
struct glip_bf16 { unsigned short bits; };
__device__ inline float glip_load(float v) { return v; }
__device__ inline float glip_load(glip_bf16 v) {
    return __int_as_float((int)((unsigned)v.bits << 16));
}
__device__ inline unsigned short glip_bf16_bits(float v) {
    unsigned u = (unsigned)__float_as_int(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ inline void glip_put(float *p, float v) { *p = v; }
__device__ inline void glip_put(glip_bf16 *p, float v) { p->bits = glip_bf16_bits(v); }
"#
    };
}

/// Softmax over the last axis, layer norm, training batch norm and a frozen batch norm with
/// its ReLU, forward and backward ([`crate::fused`], [`crate::norm`], [`crate::affine`]), the
/// same closed forms as the CPU ops:
///
/// * rows (softmax, layer norm): one block per row (grid-stride over rows), the row's sums
///   reduced in shared memory, in f32 as on the CPU;
/// * layer norm's `dweight`, `dbias`: per column, partial sums over chunks of rows
///   (`glip_layer_norm_params`, a `(columns, chunks)` grid), then the chunks summed
///   (`glip_sum_parts`);
/// * batch norm: one block per channel for the statistics and the backward's two sums, in f64
///   as on the CPU, then element-wise passes. `p` is `(5, c)`: mean, biased variance, inverse
///   standard deviation, weight, bias;
/// * a batch norm's constants outside training, and the frozen batch norm's affine map (with or
///   without a residual, with or without its ReLU): element-wise, forward and backward, on f32
///   or bf16 activations (f32 arithmetic, the constants f32).
pub(crate) const NORM: &str = concat!(
    bf16_prelude!(),
    r#"
template <typename T> __device__ T glip_block_sum(T v, T *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    T r = sh[0];
    __syncthreads();
    return r;
}

__device__ float glip_block_max(float v, float *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    float r = sh[0];
    __syncthreads();
    return r;
}

extern "C" __global__ void glip_softmax(const float *x, float *y, unsigned rows, unsigned d) {
    __shared__ float sh[256];
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + (unsigned long long)r * d;
        float *yr = y + (unsigned long long)r * d;
        float m = -__int_as_float(0x7f800000);
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) m = fmaxf(m, xr[k]);
        m = glip_block_max(m, sh);
        // A row of only -inf: exp(-inf - 0) = 0, 0 * (1 / 0) = NaN, as on the CPU.
        if (!(m - m == 0.0f)) m = 0.0f;
        float s = 0.0f;
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) {
            float e = expf(xr[k] - m);
            yr[k] = e;
            s += e;
        }
        float inv = 1.0f / glip_block_sum(s, sh);
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) yr[k] *= inv;
    }
}

extern "C" __global__ void glip_softmax_backward(const float *y, const float *dy, float *dx,
                                                 unsigned rows, unsigned d) {
    __shared__ float sh[256];
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned long long o = (unsigned long long)r * d;
        float s = 0.0f;
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) s += y[o + k] * dy[o + k];
        float dot = glip_block_sum(s, sh);
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x)
            dx[o + k] = y[o + k] * (dy[o + k] - dot);
    }
}

/// The mean and inverse standard deviation of row `xr` (biased variance, `eps` inside the root).
__device__ void glip_row_stats(const float *xr, unsigned d, float eps, float *sh, float *mean,
                               float *inv) {
    float s = 0.0f;
    for (unsigned k = threadIdx.x; k < d; k += blockDim.x) s += xr[k];
    float m = glip_block_sum(s, sh) / (float)d;
    float q = 0.0f;
    for (unsigned k = threadIdx.x; k < d; k += blockDim.x) q += (xr[k] - m) * (xr[k] - m);
    *mean = m;
    *inv = 1.0f / sqrtf(glip_block_sum(q, sh) / (float)d + eps);
}

extern "C" __global__ void glip_layer_norm(const float *x, const float *w, const float *b,
                                           float *y, unsigned rows, unsigned d, float eps) {
    __shared__ float sh[256];
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned long long o = (unsigned long long)r * d;
        float m, inv;
        glip_row_stats(x + o, d, eps, sh, &m, &inv);
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x)
            y[o + k] = (x[o + k] - m) * inv * w[k] + b[k];
    }
}

/// `layer_norm(x + res)`: the sum written to `y`, then `glip_layer_norm`'s arithmetic over it
/// in place (each thread reads back only the elements it wrote).
extern "C" __global__ void glip_add_layer_norm(const float *x, const float *res, const float *w,
                                               const float *b, float *y, unsigned rows,
                                               unsigned d, float eps) {
    __shared__ float sh[256];
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned long long o = (unsigned long long)r * d;
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) y[o + k] = x[o + k] + res[o + k];
        float m, inv;
        glip_row_stats(y + o, d, eps, sh, &m, &inv);
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x)
            y[o + k] = (y[o + k] - m) * inv * w[k] + b[k];
    }
}

/// `dx` of every row, and each row's (mean, inverse standard deviation) into `stats`.
extern "C" __global__ void glip_layer_norm_backward(const float *x, const float *w,
                                                    const float *dy, float *dx, float *stats,
                                                    unsigned rows, unsigned d, float eps) {
    __shared__ float sh[256];
    for (unsigned r = blockIdx.x; r < rows; r += gridDim.x) {
        const unsigned long long o = (unsigned long long)r * d;
        float m, inv;
        glip_row_stats(x + o, d, eps, sh, &m, &inv);
        float sg = 0.0f, sgx = 0.0f;
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) {
            float g = dy[o + k] * w[k];
            sg += g;
            sgx += g * ((x[o + k] - m) * inv);
        }
        float mg = glip_block_sum(sg, sh) / (float)d;
        float mgx = glip_block_sum(sgx, sh) / (float)d;
        for (unsigned k = threadIdx.x; k < d; k += blockDim.x) {
            float xhat = (x[o + k] - m) * inv;
            dx[o + k] = inv * (dy[o + k] * w[k] - mg - xhat * mgx);
        }
        if (threadIdx.x == 0) {
            stats[2ull * r] = m;
            stats[2ull * r + 1] = inv;
        }
    }
}

/// Column `c` of chunk `blockIdx.y` (rows `[y chunk, (y + 1) chunk)`): `sum dy * xhat` into
/// `part[y][c]`, `sum dy` into `part[y][d + c]`.
extern "C" __global__ void glip_layer_norm_params(const float *x, const float *dy,
                                                  const float *stats, float *part,
                                                  unsigned rows, unsigned d, unsigned chunk) {
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    unsigned r0 = blockIdx.y * chunk;
    unsigned r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float a = 0.0f, b = 0.0f;
    for (unsigned r = r0; r < r1; ++r) {
        const unsigned long long i = (unsigned long long)r * d + c;
        a += dy[i] * ((x[i] - stats[2ull * r]) * stats[2ull * r + 1]);
        b += dy[i];
    }
    part[2ull * d * blockIdx.y + c] = a;
    part[2ull * d * blockIdx.y + d + c] = b;
}

/// `out[j] = sum_p part[p m + j]` for `j < m`.
extern "C" __global__ void glip_sum_parts(const float *part, float *out, unsigned parts,
                                          unsigned m) {
    for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < m; j += blockDim.x * gridDim.x) {
        float s = 0.0f;
        for (unsigned p = 0; p < parts; ++p) s += part[(unsigned long long)p * m + j];
        out[j] = s;
    }
}

/// Element `j` of channel `ch`'s `b hw` elements in `(b, c, hw)`.
__device__ unsigned long long glip_channel_at(unsigned long long j, unsigned ch, unsigned c,
                                              unsigned hw) {
    return (j / hw) * c * hw + (unsigned long long)ch * hw + j % hw;
}

/// `p[0..3 c]`: every channel's batch mean, biased variance and `1 / sqrt(var + eps)`.
extern "C" __global__ void glip_batch_norm_stats(const float *x, float *p, unsigned b,
                                                 unsigned c, unsigned hw, double eps) {
    __shared__ double sh[256];
    const unsigned long long n = (unsigned long long)b * hw;
    const double count = n > 0 ? (double)n : 1.0;
    for (unsigned ch = blockIdx.x; ch < c; ch += gridDim.x) {
        double s = 0.0;
        for (unsigned long long j = threadIdx.x; j < n; j += blockDim.x)
            s += (double)x[glip_channel_at(j, ch, c, hw)];
        double mean = glip_block_sum(s, sh) / count;
        double q = 0.0;
        for (unsigned long long j = threadIdx.x; j < n; j += blockDim.x) {
            double v = (double)x[glip_channel_at(j, ch, c, hw)] - mean;
            q += v * v;
        }
        float var = (float)(glip_block_sum(q, sh) / count);
        if (threadIdx.x == 0) {
            p[ch] = (float)mean;
            p[c + ch] = var;
            p[2 * c + ch] = 1.0f / (float)sqrt((double)var + eps);
        }
    }
}

extern "C" __global__ void glip_batch_norm(const float *x, const float *p, float *y,
                                           unsigned long long total, unsigned c, unsigned hw) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned ch = (unsigned)((i / hw) % c);
        float scale = p[2 * c + ch] * p[3 * c + ch];
        float shift = p[4 * c + ch] - p[ch] * scale;
        y[i] = x[i] * scale + shift;
    }
}

/// Per channel `sum dy * xhat` into `sums[ch]` and `sum dy` into `sums[c + ch]` (dgamma, dbeta).
extern "C" __global__ void glip_batch_norm_sums(const float *x, const float *p, const float *dy,
                                                float *sums, unsigned b, unsigned c,
                                                unsigned hw) {
    __shared__ double sh[256];
    const unsigned long long n = (unsigned long long)b * hw;
    for (unsigned ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const float m = p[ch], is = p[2 * c + ch];
        double s = 0.0, sx = 0.0;
        for (unsigned long long j = threadIdx.x; j < n; j += blockDim.x) {
            unsigned long long i = glip_channel_at(j, ch, c, hw);
            s += (double)dy[i];
            sx += (double)(dy[i] * (x[i] - m) * is);
        }
        float ssx = (float)glip_block_sum(sx, sh);
        float ss = (float)glip_block_sum(s, sh);
        if (threadIdx.x == 0) {
            sums[ch] = ssx;
            sums[c + ch] = ss;
        }
    }
}

/// `dx = gamma invstd / n (n dy - sum(dy) - xhat sum(dy xhat))` into `out[0..total]`, the sums
/// read from `out[total..]` (written there by `glip_batch_norm_sums`).
extern "C" __global__ void glip_batch_norm_backward(const float *x, const float *p,
                                                    const float *dy, float *out,
                                                    unsigned long long total, unsigned c,
                                                    unsigned hw, float n) {
    const float *sums = out + total;
    float *dx = out;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned ch = (unsigned)((i / hw) % c);
        float m = p[ch], is = p[2 * c + ch];
        float k = p[3 * c + ch] * is / n;
        float xhat = (x[i] - m) * is;
        dx[i] = k * (n * dy[i] - sums[c + ch] - xhat * sums[ch]);
    }
}

/// The constants of a batch norm outside training: `ss = [s; t]` `(2, c)` with
/// `s = w / sqrt(rv + eps)` (as the CPU's composition: the reciprocal of the root, then the
/// product) and `t = b - rm s`, one thread per channel.
extern "C" __global__ void glip_bn_constants(const float *w, const float *b, const float *rm,
                                             const float *rv, float *ss, unsigned c, float eps) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < c; i += blockDim.x * gridDim.x) {
        float s = w[i] * (1.0f / sqrtf(rv[i] + eps));
        ss[i] = s;
        ss[c + i] = b[i] - rm[i] * s;
    }
}

/// A constant per-channel affine map (a frozen batch norm): `y = x s + t (+ r)`, then with
/// `GLIP_RELU` in `flags` the ReLU, with `ss = [s; t]` `(2, c)`; `r` is read with `GLIP_ADD`.
/// Computed in f32 whatever `T` is (one rounding to `T` at the end).
#define GLIP_ADD 1u
#define GLIP_RELU 2u
template <typename T>
__device__ void glip_affine(const T *x, const float *ss, const T *r, T *y,
                            unsigned long long total, unsigned c, unsigned hw, unsigned flags) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned ch = (unsigned)((i / hw) % c);
        float v = glip_load(x[i]) * ss[ch] + ss[c + ch];
        if (flags & GLIP_ADD) v += glip_load(r[i]);
        glip_put(y + i, (flags & GLIP_RELU) ? fmaxf(v, 0.0f) : v);
    }
}

/// Its backward: `g = dy` (with `GLIP_RELU`, `dy (y > 0)`), `dx = g s` into `out[0..total]`,
/// and with `GLIP_ADD` `dr = g` into `out[total..2 total]`.
template <typename T>
__device__ void glip_affine_backward(const T *y, const T *dy, const float *ss, T *out,
                                     unsigned long long total, unsigned c, unsigned hw,
                                     unsigned flags) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned ch = (unsigned)((i / hw) % c);
        float g = glip_load(dy[i]);
        if (flags & GLIP_RELU) g *= glip_load(y[i]) > 0.0f ? 1.0f : 0.0f;
        glip_put(out + i, g * ss[ch]);
        if (flags & GLIP_ADD) glip_put(out + total + i, g);
    }
}

extern "C" __global__ void glip_affine_f32(const float *x, const float *ss, const float *r,
                                           float *y, unsigned long long total, unsigned c,
                                           unsigned hw, unsigned flags) {
    glip_affine(x, ss, r, y, total, c, hw, flags);
}

extern "C" __global__ void glip_affine_bf16(const glip_bf16 *x, const float *ss,
                                            const glip_bf16 *r, glip_bf16 *y,
                                            unsigned long long total, unsigned c, unsigned hw,
                                            unsigned flags) {
    glip_affine(x, ss, r, y, total, c, hw, flags);
}

extern "C" __global__ void glip_affine_backward_f32(const float *y, const float *dy,
                                                    const float *ss, float *out,
                                                    unsigned long long total, unsigned c,
                                                    unsigned hw, unsigned flags) {
    glip_affine_backward(y, dy, ss, out, total, c, hw, flags);
}

extern "C" __global__ void glip_affine_backward_bf16(const glip_bf16 *y, const glip_bf16 *dy,
                                                     const float *ss, glip_bf16 *out,
                                                     unsigned long long total, unsigned c,
                                                     unsigned hw, unsigned flags) {
    glip_affine_backward(y, dy, ss, out, total, c, hw, flags);
}
"#
);

/// Layer norm's parameter gradients: the rows per chunk of `glip_layer_norm_params` (at least
/// 32, at most 128 chunks), and the number of chunks.
pub(crate) fn layer_norm_chunks(rows: usize) -> (usize, usize) {
    let chunk = rows.div_ceil(128).max(32);
    (chunk, rows.div_ceil(chunk).max(1))
}

/// The ResNet stem's max-pool (kernel 3, stride 2, padding 1; [`crate::pool`]), PyTorch's
/// rule as on the CPU: each output the first maximum of its window in row-major order (a NaN
/// wins), its gradient to that one input. Forward one thread per output; backward one thread
/// per input, gathering the gradients of the (at most four) windows whose maximum it is, in
/// the CPU's order (windows row-major), so the sums are the CPU's.
pub(crate) const POOL: &str = concat!(
    bf16_prelude!(),
    r#"
/// The index in its plane of the maximum of window (oy, ox).
template <typename T>
__device__ unsigned glip_pool_argmax(const T *plane, unsigned h, unsigned w, unsigned oy,
                                     unsigned ox) {
    unsigned y0 = oy > 0 ? 2 * oy - 1 : 0, y1 = 2 * oy + 2 < h ? 2 * oy + 2 : h;
    unsigned x0 = ox > 0 ? 2 * ox - 1 : 0, x1 = 2 * ox + 2 < w ? 2 * ox + 2 : w;
    float best = -__int_as_float(0x7f800000);
    unsigned at = y0 * w + x0;
    for (unsigned iy = y0; iy < y1; ++iy)
        for (unsigned ix = x0; ix < x1; ++ix) {
            float v = glip_load(plane[iy * w + ix]);
            if (v > best || (v != v && best == best)) {
                best = v;
                at = iy * w + ix;
            }
        }
    return at;
}

/// Each output is its window's maximum element, copied (bf16 stays bf16 bit for bit).
template <typename T>
__device__ void glip_max_pool(const T *x, T *y, unsigned long long planes, unsigned h,
                              unsigned w, unsigned oh, unsigned ow) {
    const unsigned long long total = planes * oh * ow;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned long long p = i / ((unsigned long long)oh * ow);
        unsigned o = (unsigned)(i % ((unsigned long long)oh * ow));
        const T *plane = x + p * h * w;
        y[i] = plane[glip_pool_argmax(plane, h, w, o / ow, o % ow)];
    }
}

/// Each input's gradient: the sum (in f32, then rounded once to `T`) of the gradients of the
/// windows whose maximum it is, windows row-major.
template <typename T>
__device__ void glip_max_pool_backward(const T *x, const T *g, T *dx, unsigned long long planes,
                                       unsigned h, unsigned w, unsigned oh, unsigned ow) {
    const unsigned long long total = planes * h * w;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
        unsigned long long p = i / ((unsigned long long)h * w);
        unsigned at = (unsigned)(i % ((unsigned long long)h * w));
        unsigned iy = at / w, ix = at % w;
        const T *plane = x + p * h * w;
        const T *gp = g + p * oh * ow;
        // Windows 2o-1..2o+1 hold row iy for o in [ceil((iy-1)/2), floor((iy+1)/2)].
        unsigned oy0 = iy / 2, oy1 = (iy + 1) / 2 < oh - 1 ? (iy + 1) / 2 : oh - 1;
        unsigned ox0 = ix / 2, ox1 = (ix + 1) / 2 < ow - 1 ? (ix + 1) / 2 : ow - 1;
        float s = 0.0f;
        for (unsigned oy = oy0; oy <= oy1; ++oy)
            for (unsigned ox = ox0; ox <= ox1; ++ox)
                if (glip_pool_argmax(plane, h, w, oy, ox) == at) s += glip_load(gp[oy * ow + ox]);
        glip_put(dx + i, s);
    }
}

extern "C" __global__ void glip_max_pool_f32(const float *x, float *y, unsigned long long planes,
                                             unsigned h, unsigned w, unsigned oh, unsigned ow) {
    glip_max_pool(x, y, planes, h, w, oh, ow);
}

extern "C" __global__ void glip_max_pool_bf16(const glip_bf16 *x, glip_bf16 *y,
                                              unsigned long long planes, unsigned h, unsigned w,
                                              unsigned oh, unsigned ow) {
    glip_max_pool(x, y, planes, h, w, oh, ow);
}

extern "C" __global__ void glip_max_pool_backward_f32(const float *x, const float *g, float *dx,
                                                      unsigned long long planes, unsigned h,
                                                      unsigned w, unsigned oh, unsigned ow) {
    glip_max_pool_backward(x, g, dx, planes, h, w, oh, ow);
}

extern "C" __global__ void glip_max_pool_backward_bf16(const glip_bf16 *x, const glip_bf16 *g,
                                                       glip_bf16 *dx, unsigned long long planes,
                                                       unsigned h, unsigned w, unsigned oh,
                                                       unsigned ow) {
    glip_max_pool_backward(x, g, dx, planes, h, w, oh, ow);
}
"#
);

/// The element-wise pass before `Linear`'s bf16 product (`cuda_linear`): the input cast to bf16
/// and, with a bias (not null), the output prefilled with it row by row (the product then adds
/// onto it, `beta = 1`): one launch for the cast and the bias sum.
pub(crate) const LINEAR: &str = concat!(
    bf16_prelude!(),
    r#"
extern "C" __global__ void glip_bf16_cast_fill(const float *x, glip_bf16 *xb,
                                               unsigned long long n, const float *bias,
                                               float *y, unsigned long long rows,
                                               unsigned cols) {
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    const unsigned long long first = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (unsigned long long i = first; i < n; i += stride) glip_put(xb + i, x[i]);
    if (bias)
        for (unsigned long long i = first; i < rows * cols; i += stride) y[i] = bias[i % cols];
}

"#
);

/// Element-wise kernels over f32 ([`crate::nn::dropout`], [`crate::fused::relu`],
/// [`crate::fused::gelu_erf`]).
///
/// Dropout: element `i` keeps (`scale`) when the top 24 bits of SplitMix64's finaliser of
/// `seed + (i + 1) golden`, as a fraction of `2^24`, are at least `p`, else drops (0).
/// Counter-based, so every thread draws its own elements and the mask depends only on
/// `(seed, i)`: `glip_dropout` applies it to `x` in the pass that draws it (`x * mask`, the
/// product the separate mask and multiplication computed), and the backward is the same
/// launch on the output's gradient. `glip_dropout_mask` writes the mask itself (the tests').
///
/// Activation gradients in one pass (candle's backward composes them: ReLU's from a tensor of
/// zeros, a comparison, a cast and a product; GELU's from a dozen): ReLU's `dy * (x >= 0)`,
/// candle's rule; GELU's (erf form) `dy * (Phi(x) + x phi(x))`, PyTorch's formula.
pub(crate) const ELEMENTWISE: &str = r#"
__device__ unsigned long long glip_mix(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ull) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ float glip_keep(unsigned long long seed, unsigned long long i, float p, float scale) {
    float u = (float)(glip_mix(seed, i) >> 40) * 5.9604644775390625e-8f;
    return u >= p ? scale : 0.0f;
}

#define GLIP_EACH(n) \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; \
         i < (n); i += (unsigned long long)blockDim.x * gridDim.x)

extern "C" __global__ void glip_dropout_mask(float *mask, unsigned long long n,
                                             unsigned long long seed, float p, float scale) {
    GLIP_EACH(n) mask[i] = glip_keep(seed, i, p, scale);
}

extern "C" __global__ void glip_dropout(const float *x, float *y, unsigned long long n,
                                        unsigned long long seed, float p, float scale) {
    GLIP_EACH(n) y[i] = x[i] * glip_keep(seed, i, p, scale);
}

extern "C" __global__ void glip_relu_backward(const float *x, const float *dy, float *dx,
                                              unsigned long long n) {
    GLIP_EACH(n) dx[i] = dy[i] * (x[i] >= 0.0f ? 1.0f : 0.0f);
}

extern "C" __global__ void glip_gelu_erf_backward(const float *x, const float *dy, float *dx,
                                                  unsigned long long n) {
    GLIP_EACH(n) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = expf(-0.5f * v * v) * 0.39894228040143268f;
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}
"#;

/// Each row's `k` best elements, best first ([`crate::topk::top_k_indices`]): the order of a
/// stable sort by descending value under `f32::total_cmp`, ties by the lower index. Every
/// element's rank is counted against its whole row (those with a greater key, or an equal key
/// at a lower index), and one of rank under `k` writes its index at that rank: ranks are
/// distinct, so the `k` outputs of a row are written once each. `O(s^2)` comparisons a row,
/// the row read through shared memory a tile of `THREADS` at a time; grid `(s / THREADS, rows)`.
pub(crate) const TOP_K: &str = r#"
/// `f32::total_cmp`'s order as signed integers: the bits, the lower 31 flipped when negative.
__device__ int glip_order_key(float v) {
    int b = __float_as_int(v);
    return b ^ (int)(((unsigned)(b >> 31)) >> 1);
}

extern "C" __global__ void glip_top_k(const float *x, unsigned *out, unsigned s, unsigned k) {
    __shared__ int tile[256];
    const float *row = x + (unsigned long long)blockIdx.y * s;
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    int key = i < s ? glip_order_key(row[i]) : 0;
    unsigned before = 0;
    for (unsigned t0 = 0; t0 < s; t0 += blockDim.x) {
        unsigned j = t0 + threadIdx.x;
        tile[threadIdx.x] = j < s ? glip_order_key(row[j]) : 0;
        __syncthreads();
        unsigned n = s - t0 < blockDim.x ? s - t0 : blockDim.x;
        for (unsigned u = 0; u < n; ++u) {
            int other = tile[u];
            before += (other > key || (other == key && t0 + u < i)) ? 1u : 0u;
        }
        __syncthreads();
    }
    if (i < s && before < k) out[(unsigned long long)blockIdx.y * k + before] = i;
}
"#;

/// Query rows per block of [`ATTENTION`] (`GLIP_ATT_QT`).
pub(crate) const ATTENTION_QUERY_TILE: usize = 16;
/// Keys per tile of [`ATTENTION`] (`GLIP_ATT_KT`): the bound of its tests counts the tiles.
#[allow(dead_code, reason = "read by the tests' bound; the kernel has its own #define")]
pub(crate) const ATTENTION_KEY_TILE: usize = 32;
/// The widest head [`ATTENTION`] takes (`GLIP_ATT_DH`).
pub(crate) const ATTENTION_MAX_HEAD: usize = 64;
/// [`ATTENTION`]'s threads per block (its accumulators assume it).
pub(crate) const ATTENTION_THREADS: u32 = 128;

/// Multi-head attention in one launch, for inference ([`crate::attention::fused`]):
/// `out = softmax(q k^T s + bias) v` per head, `bias_j = (1 - mask_j) f32::MIN` as
/// [`crate::nn::mask_to_bias`] adds it, `s` multiplying the query (`scale_scores = 0`, as
/// `torch.nn.MultiheadAttention`) or the scores (as BERT). Grid `(ceil(lq / 16), b heads)`,
/// 128 threads: a block's 16 query rows of one head stay in shared memory while the keys and
/// values pass through it in tiles of 32 (loaded coalesced), and the softmax is the online one
/// (a running maximum and sum per row; the accumulated outputs rescaled by `exp(m_old - m_new)`
/// when the maximum grows), so nothing of size `lq x lk` is written. `q`, `k`, `v` are rows of
/// `ld*` floats (`(b, l, ld)`, head `h` at columns `h dh ..`), `out` is `(b, lq, heads dh)`.
pub(crate) const ATTENTION: &str = r#"
#define GLIP_ATT_QT 16
#define GLIP_ATT_KT 32
#define GLIP_ATT_DH 64
#define GLIP_ATT_ACC (GLIP_ATT_QT * GLIP_ATT_DH / 128)

extern "C" __global__ void glip_attention(const float *q, const float *k, const float *v,
                                          const unsigned char *mask, float *out,
                                          unsigned heads, unsigned lq, unsigned lk,
                                          unsigned dh, unsigned ldq, unsigned ldk,
                                          unsigned ldv, float scale, unsigned scale_scores) {
    __shared__ float qs[GLIP_ATT_QT][GLIP_ATT_DH];
    __shared__ float ks[GLIP_ATT_KT][GLIP_ATT_DH + 1];
    __shared__ float vs[GLIP_ATT_KT][GLIP_ATT_DH];
    __shared__ float p[GLIP_ATT_QT][GLIP_ATT_KT + 1];
    __shared__ float row_max[GLIP_ATT_QT], row_sum[GLIP_ATT_QT], row_corr[GLIP_ATT_QT];
    const float neg_inf = -__int_as_float(0x7f800000);
    const unsigned t = threadIdx.x, nt = blockDim.x;
    const unsigned bi = blockIdx.y / heads, h = blockIdx.y % heads, i0 = blockIdx.x * GLIP_ATT_QT;
    const unsigned outs = GLIP_ATT_QT * dh;
    for (unsigned e = t; e < outs; e += nt) {
        unsigned r = e / dh, c = e % dh, i = i0 + r;
        float x = i < lq ? q[((unsigned long long)bi * lq + i) * ldq + h * dh + c] : 0.0f;
        qs[r][c] = scale_scores ? x : x * scale;
    }
    if (t < GLIP_ATT_QT) {
        row_max[t] = neg_inf;
        row_sum[t] = 0.0f;
    }
    float acc[GLIP_ATT_ACC];
    for (unsigned a = 0; a < GLIP_ATT_ACC; ++a) acc[a] = 0.0f;
    for (unsigned j0 = 0; j0 < lk; j0 += GLIP_ATT_KT) {
        const unsigned n = lk - j0 < GLIP_ATT_KT ? lk - j0 : GLIP_ATT_KT;
        __syncthreads();
        for (unsigned e = t; e < GLIP_ATT_KT * dh; e += nt) {
            unsigned j = e / dh, c = e % dh;
            unsigned long long row = (unsigned long long)bi * lk + j0 + j;
            ks[j][c] = j < n ? k[row * ldk + h * dh + c] : 0.0f;
            vs[j][c] = j < n ? v[row * ldv + h * dh + c] : 0.0f;
        }
        __syncthreads();
        for (unsigned e = t; e < GLIP_ATT_QT * GLIP_ATT_KT; e += nt) {
            unsigned r = e / GLIP_ATT_KT, j = e % GLIP_ATT_KT;
            float s = neg_inf;
            if (j < n) {
                float dot = 0.0f;
                for (unsigned c = 0; c < dh; ++c) dot += qs[r][c] * ks[j][c];
                if (scale_scores) dot = dot * scale;
                if (mask) {
                    float bias = (1.0f - (float)mask[(unsigned long long)bi * lk + j0 + j]) *
                                 -3.40282347e38f;
                    dot = dot + bias;
                }
                s = dot;
            }
            p[r][j] = s;
        }
        __syncthreads();
        if (t < GLIP_ATT_QT) {
            float m = row_max[t];
            for (unsigned j = 0; j < n; ++j) m = fmaxf(m, p[t][j]);
            // The first tile: exp(-inf - m) = 0 clears the (zero) sums.
            float corr = expf(row_max[t] - m);
            float sum = 0.0f;
            for (unsigned j = 0; j < GLIP_ATT_KT; ++j) {
                float e = j < n ? expf(p[t][j] - m) : 0.0f;
                p[t][j] = e;
                sum += e;
            }
            row_sum[t] = row_sum[t] * corr + sum;
            row_max[t] = m;
            row_corr[t] = corr;
        }
        __syncthreads();
        for (unsigned a = 0; a < GLIP_ATT_ACC; ++a) {
            unsigned o = t + a * nt;
            if (o < outs) {
                unsigned r = o / dh, c = o % dh;
                float x = acc[a] * row_corr[r];
                for (unsigned j = 0; j < GLIP_ATT_KT; ++j) x += p[r][j] * vs[j][c];
                acc[a] = x;
            }
        }
    }
    for (unsigned a = 0; a < GLIP_ATT_ACC; ++a) {
        unsigned o = t + a * nt;
        if (o < outs) {
            unsigned r = o / dh, c = o % dh, i = i0 + r;
            if (i < lq)
                out[((unsigned long long)bi * lq + i) * (heads * dh) + h * dh + c] =
                    acc[a] / row_sum[r];
        }
    }
}
"#;

/// The most levels [`DEFORMABLE`]'s kernels take (`GLIP_DEFORM_MAX_LEVELS`): Deformable DETR and
/// Grounding DINO sample 4 or 5.
pub(crate) const DEFORMABLE_MAX_LEVELS: usize = 8;

/// Multi-scale deformable attention's sampling ([`crate::deformable`]) on CUDA, f32, the same
/// arithmetic as the CPU op: `value (bh, s, dh)`, `samples (bh, q, levels, points, [x, y, a])`
/// (column and row in the level's units, attention weight), the levels as a `GlipLevels` passed
/// by value (`h`, `w` and first token of each).
///
/// * `glip_deformable_sample`: one thread per output `(bh, q, c)` (grid-stride), its samples'
///   bilinear reads in order; a non-finite location or weight makes the output NaN;
/// * `glip_deformable_value_grad`: one thread per `(bh, q, c)` adds `w a g` into each of its
///   samples' four value rows with `atomicAdd` (as Deformable DETR's kernel does): the order
///   of those sums varies from run to run, so under `GLIP_CUDNN_DETERMINISTIC` the caller
///   keeps candle's composition (its `index_add` sums in a fixed order); `grad_value` must be
///   zero before;
/// * `glip_deformable_sample_grad`: one thread per sample: per neighbour the dot product of the
///   value row and the output's gradient, then the location's and the weight's gradients (NaN
///   for a non-finite sample, which adds nothing to the values' gradient).
pub(crate) const DEFORMABLE: &str = r#"
#define GLIP_DEFORM_MAX_LEVELS 8

struct GlipLevels {
    unsigned n;
    unsigned hws[3 * GLIP_DEFORM_MAX_LEVELS];
};

/// Level `l`'s height, width and first token, each entry read at a constant index (the loop
/// unrolled): a variable index into the by-value parameter would copy it to local memory.
__device__ void glip_deform_level(const GlipLevels &lv, unsigned l, unsigned &h, unsigned &w,
                                  unsigned &start) {
    h = w = start = 0;
#pragma unroll
    for (unsigned i = 0; i < GLIP_DEFORM_MAX_LEVELS; ++i) {
        if (i == l) {
            h = lv.hws[3 * i];
            w = lv.hws[3 * i + 1];
            start = lv.hws[3 * i + 2];
        }
    }
}

/// `f(token, wy, wx, sy, sx)` for each of the (up to four) tokens around column `x`, row `y` of
/// level `l` that lie inside it, in order: the token, its bilinear weight's factors and the
/// signs of their derivatives. (Handed over one by one, not through an array of corners: an
/// array indexed by a running count lives in local memory.)
template <class F>
__device__ void glip_deform_corners(const GlipLevels &lv, unsigned l, float x, float y, F f) {
    unsigned h, w, start;
    glip_deform_level(lv, l, h, w, start);
    const float x0 = floorf(x), y0 = floorf(y);
    const float fx = x - x0, fy = y - y0;
    const float last_col = (float)(w - 1), last_row = (float)(h - 1);
#pragma unroll
    for (unsigned dy = 0; dy < 2; ++dy) {
        const float row = y0 + (float)dy;
        if (!(row >= 0.0f && row <= last_row)) continue;
#pragma unroll
        for (unsigned dx = 0; dx < 2; ++dx) {
            const float col = x0 + (float)dx;
            if (!(col >= 0.0f && col <= last_col)) continue;
            f(start + (unsigned long long)row * w + (unsigned long long)col, dy ? fy : 1.0f - fy,
              dx ? fx : 1.0f - fx, dy ? 1.0f : -1.0f, dx ? 1.0f : -1.0f);
        }
    }
}

__device__ bool glip_deform_finite(const float *smp) {
    return isfinite(smp[0]) && isfinite(smp[1]) && isfinite(smp[2]);
}

/// For output element `e` (row `e / dh` of `(bh q)`, channel `e % dh`): `f(at, w)` for each
/// in-level neighbour of each of the row's samples, in order, with `at` the neighbour's element
/// among its image and head's values and `w` its bilinear weight times the sample's attention
/// weight; false if a sample was not finite (it adds nothing).
template <class F>
__device__ bool glip_deform_row(const GlipLevels &lv, const float *samples, unsigned dh,
                                unsigned points, unsigned long long e, F f) {
    const unsigned per_query = lv.n * points;
    const unsigned long long row = e / dh;
    const unsigned c = (unsigned)(e % dh);
    const float *smp = samples + row * per_query * 3;
    bool finite = true;
    for (unsigned k = 0; k < per_query; ++k, smp += 3) {
        if (!glip_deform_finite(smp)) {
            finite = false;
            continue;
        }
        glip_deform_corners(lv, k / points, smp[0], smp[1],
                            [&](unsigned long long token, float wy, float wx, float, float) {
                                f(token * dh + c, wy * wx * smp[2]);
                            });
    }
    return finite;
}

/// Element `e` of `n`, grid-stride.
#define GLIP_DEFORM_EACH(e, n)                                                                 \
    for (unsigned long long e = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;      \
         e < (n); e += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void glip_deformable_sample(const float *value, const float *samples,
                                                  GlipLevels lv, float *out, unsigned s,
                                                  unsigned dh, unsigned q, unsigned points,
                                                  unsigned long long n) {
    GLIP_DEFORM_EACH(e, n) {
        const float *v = value + e / dh / q * s * dh;
        float acc = 0.0f;
        const bool finite = glip_deform_row(
            lv, samples, dh, points, e, [&](unsigned long long at, float w) { acc += w * v[at]; });
        out[e] = finite ? acc : __int_as_float(0x7fc00000);
    }
}

extern "C" __global__ void glip_deformable_value_grad(const float *samples, const float *grad,
                                                      GlipLevels lv, float *grad_value,
                                                      unsigned s, unsigned dh, unsigned q,
                                                      unsigned points, unsigned long long n) {
    GLIP_DEFORM_EACH(e, n) {
        float *gv = grad_value + e / dh / q * s * dh;
        const float g = grad[e];
        glip_deform_row(lv, samples, dh, points, e,
                        [&](unsigned long long at, float w) { atomicAdd(&gv[at], w * g); });
    }
}

extern "C" __global__ void glip_deformable_sample_grad(const float *value, const float *samples,
                                                       const float *grad, GlipLevels lv,
                                                       float *grad_samples, unsigned s,
                                                       unsigned dh, unsigned q, unsigned points,
                                                       unsigned long long n) {
    const unsigned per_query = lv.n * points;
    GLIP_DEFORM_EACH(e, n) {
        const unsigned long long row = e / per_query;
        const unsigned k = (unsigned)(e % per_query);
        const float *smp = samples + e * 3;
        float *gs = grad_samples + e * 3;
        if (!glip_deform_finite(smp)) {
            gs[0] = gs[1] = gs[2] = __int_as_float(0x7fc00000);
            continue;
        }
        const float *v = value + row / q * s * dh;
        const float *g = grad + row * dh;
        const float a = smp[2];
        float gx = 0.0f, gy = 0.0f, ga = 0.0f;
        glip_deform_corners(
            lv, k / points, smp[0], smp[1],
            [&](unsigned long long token, float wy, float wx, float sy, float sx) {
                const float *vr = v + token * dh;
                float dot = 0.0f;
                for (unsigned c = 0; c < dh; ++c) dot += vr[c] * g[c];
                ga += wy * wx * dot;
                gx += sx * wy * dot;
                gy += sy * wx * dot;
            });
        gs[0] = a * gx;
        gs[1] = a * gy;
        gs[2] = ga;
    }
}
"#;

/// [`ELEMENTWISE`]'s dropout draw of element `i`, in Rust: the CPU implementation of the
/// device's dropout op and the tests' reference.
pub(crate) fn dropout_uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
}

/// [`ELEMENTWISE`]'s dropout factor of element `i`: `scale` kept, 0 dropped.
pub(crate) fn dropout_keep(seed: u64, i: u64, p: f32, scale: f32) -> f32 {
    if dropout_uniform(seed, i) >= p {
        scale
    } else {
        0.0
    }
}

#[cfg(test)]
mod emulation_elementwise {
    //! [`ELEMENTWISE`]'s kernels under the emulation. Dropout: the mask equal to the Rust
    //! reference of its hash, element by element (integer arithmetic and exact f32 scaling),
    //! keeping a fraction of elements within 5 standard deviations of `1 - p`, and the fused
    //! pass equal to `x * mask` bit for bit (one f32 product either way). ReLU's gradient bit
    //! for bit against candle's rule (`dy * 1` or `dy * 0`). GELU's against the f64 derivative.

    use super::emulation::emulate;
    use super::{dropout_keep, ELEMENTWISE};

    /// `n` values in about `[-4, 4]`, with exact zeros among them.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = glip_core::rng::Rng::new(seed);
        (0..n).map(|i| if i % 17 == 0 { 0.0 } else { 8.0 * rng.uniform() - 4.0 }).collect()
    }

    /// Runs `kernel(x, dy, out, n)` (or `kernel(x, out, n, ...)` through `call`) on `x` and
    /// `dy` and returns `out`.
    fn run(x: &[f32], dy: &[f32], call: &str) -> Option<Vec<f32>> {
        let n = x.len();
        let body = format!(
            "static float out[{n}];
             glip_launch(4, 1, 64, [] {{ {call}; }});
             glip_print(\"out\", out, {n});"
        );
        let out = emulate(ELEMENTWISE, &[("x", x.to_vec()), ("dy", dy.to_vec())], &body)?;
        Some(out["out"].clone())
    }

    #[test]
    fn fused_dropout_is_x_times_the_mask() {
        let (n, seed, p) = (5_000usize, 0x1234_5678_u64, 0.25f32);
        let scale = 1.0 / (1.0 - p);
        let x = values(n, 1);
        let call = format!("glip_dropout(x, out, {n}, {seed}ull, {p:e}f, {scale:e}f)");
        let Some(y) = run(&x, &x, &call) else {
            return;
        };
        for (i, (&y, &x)) in y.iter().zip(&x).enumerate() {
            let want = x * dropout_keep(seed, i as u64, p, scale);
            assert_eq!(y.to_bits(), want.to_bits(), "element {i}: {y} vs {want}");
        }
    }

    #[test]
    fn relu_gradient_is_candles_rule() {
        let n = 3_000;
        let (x, dy) = (values(n, 2), values(n, 3));
        let Some(dx) = run(&x, &dy, &format!("glip_relu_backward(x, dy, out, {n})")) else {
            return;
        };
        for i in 0..n {
            let want = dy[i] * if x[i] >= 0.0 { 1.0 } else { 0.0 };
            assert_eq!(dx[i].to_bits(), want.to_bits(), "element {i}: {} vs {want}", dx[i]);
        }
    }

    /// Against the exact derivative within [`crate::fused::check_gelu_erf_gradient`]'s bound
    /// (derived there for f32 arithmetic with `erff` / `expf` within 2 ulp).
    #[test]
    fn gelu_erf_gradient_matches_f64() {
        let n = 3_000;
        let (x, dy) = (values(n, 4), values(n, 5));
        let Some(dx) = run(&x, &dy, &format!("glip_gelu_erf_backward(x, dy, out, {n})")) else {
            return;
        };
        crate::fused::check_gelu_erf_gradient(&x, &dy, &dx);
    }

    #[test]
    fn dropout_masks_follow_the_hash_and_keep_one_minus_p() {
        let (n, seed, p) = (100_000usize, 0x5eed_d80f_u64, 0.1f32);
        let scale = 1.0 / (1.0 - p);
        // The one kernel only the tests launch: named through its declaration.
        let kernel = <super::kernels::glip_dropout_mask as super::kernels::Kernel>::NAME;
        let body = format!(
            "static float mask[{n}];
             glip_launch(16, 1, 256, [] {{ {kernel}(mask, {n}, {seed}ull, {p:e}f, {scale:e}f); }});
             glip_print(\"mask\", mask, {n});"
        );
        let Some(out) = emulate(ELEMENTWISE, &[], &body) else {
            return;
        };
        let mask = &out["mask"];
        assert_eq!(mask.len(), n);
        for (i, &m) in mask.iter().enumerate() {
            let want = dropout_keep(seed, i as u64, p, scale);
            assert_eq!(m.to_bits(), want.to_bits(), "element {i}: {m} vs {want}");
        }
        let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64;
        let (mean, sd) =
            (n as f64 * (1.0 - p as f64), (n as f64 * p as f64 * (1.0 - p as f64)).sqrt());
        assert!((kept - mean).abs() <= 5.0 * sd, "kept {kept} of {n}: {mean} +- {sd} expected");
    }
}

#[cfg(test)]
mod emulation {
    //! The kernels above, compiled by the host's C++ compiler (`$CXX`, else `g++`; C++20 for
    //! `std::barrier`) with a header that maps CUDA's built-ins onto the CPU: each block's
    //! threads are OS threads, `__syncthreads()` a barrier among them, `__shared__` memory a
    //! static array (blocks run one at a time, so a block owns it). A test skips, saying why,
    //! where there is no C++ compiler. Compared with exact values (the same computation in f64
    //! through candle on the CPU) at the fixture README's tolerances, as the GPU's test in
    //! glip-train's `tests/cuda.rs` compares the real launches.
    //!
    //! Compiled with multiplies and adds contracted into FMAs (`-O2 -ffp-contract=fast`, with
    //! `-mfma` on an x86-64 that has FMA), as NVRTC contracts them by default: the rounding the
    //! GPU does, not the one a CPU build without FMA would, is what the bounds must hold for.

    use super::*;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use std::collections::HashMap;
    use std::fmt::Write as _;
    use std::process::Command;

    const SHIM: &str = r#"
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>
struct glip_dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local glip_dim3 threadIdx;
static glip_dim3 blockIdx, blockDim, gridDim;
static std::barrier<> *glip_barrier = nullptr;
#define __global__
#define __device__
#define __shared__ static
#define __syncthreads() glip_barrier->arrive_and_wait()
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }
static inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, sizeof i); return i; }
static inline float atomicAdd(float *p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
// Runs `kernel` on a (gx, gy) grid of blocks of bx threads, one block at a time.
template <class F> static void glip_launch(unsigned gx, unsigned gy, unsigned bx, F kernel) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = {x, y, 0};
            std::barrier<> bar(bx);
            glip_barrier = &bar;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < bx; ++t)
                threads.emplace_back([=] { threadIdx = {t, 0, 0}; kernel(); });
            for (auto &t : threads) t.join();
        }
}
static void glip_print(const char *name, const float *p, size_t n) {
    std::printf("%s", name);
    for (size_t i = 0; i < n; ++i) std::printf(" %.9g", p[i]);
    std::printf("\n");
}
"#;

    fn literal(v: f32) -> String {
        match v {
            v if v.is_nan() => "NAN".into(),
            v if v.is_infinite() => if v > 0.0 { "INFINITY" } else { "(-INFINITY)" }.into(),
            v => format!("{v:e}f"),
        }
    }

    /// `-mfma` where the host is an x86-64 with FMA (elsewhere FMA is either in the baseline, as
    /// on AArch64, or not there to use).
    fn fma_flag() -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            return Some("-mfma");
        }
        None
    }

    /// The compiler's sanitizer flags `GLIP_EMULATION_SANITIZE` asks for (CI runs these tests
    /// once with each): `address`, AddressSanitizer and UBSan (a kernel reading or writing
    /// outside its arrays, undefined behaviour such as a shift past the width); `thread`,
    /// ThreadSanitizer (a data race among a block's threads: shared memory read before the
    /// `__syncthreads()` that orders it after another thread's write, or overwritten before the
    /// one that orders it after every read). A report fails the run, so the test.
    fn sanitizer_flags() -> &'static [&'static str] {
        match std::env::var("GLIP_EMULATION_SANITIZE").as_deref() {
            Err(_) | Ok("") => &[],
            Ok("address") => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"],
            Ok("thread") => &["-fsanitize=thread", "-g"],
            Ok(other) => panic!("GLIP_EMULATION_SANITIZE={other:?}: give address or thread"),
        }
    }

    /// Compiles `source`, the arrays (as `static float name[]`, each also `name_n` long) and
    /// `main`'s `body`, runs it and returns what it printed with `glip_print`, by name; `None`
    /// (after saying why) without a C++ compiler.
    pub(super) fn emulate(
        source: &str,
        arrays: &[(&str, Vec<f32>)],
        body: &str,
    ) -> Option<HashMap<String, Vec<f32>>> {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        if Command::new(&cxx).arg("--version").output().is_err() {
            eprintln!("skipped: no C++ compiler ({cxx}) to run the CUDA kernels on the CPU");
            return None;
        }
        let mut text = format!("{SHIM}\n{source}\n");
        for (name, v) in arrays {
            let items: Vec<String> = v.iter().map(|&x| literal(x)).collect();
            let _ = writeln!(
                text,
                "static float {name}[] = {{{}}};\nstatic const size_t {name}_n = {};",
                items.join(","),
                v.len()
            );
        }
        let _ = write!(text, "int main() {{\n{body}\nreturn 0;\n}}\n");
        let dir = std::env::temp_dir().join(format!(
            "glip-emulation-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        /// Removes the folder however the test ends.
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        let (src, bin) = (dir.join("k.cpp"), dir.join("k"));
        std::fs::write(&src, text).unwrap();
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-ffp-contract=fast", "-pthread", "-w"])
            .args(fma_flag())
            .args(sanitizer_flags())
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cxx}: {}", String::from_utf8_lossy(&out.stderr));
        let run = Command::new(&bin).output().unwrap();
        assert!(run.status.success(), "emulated kernels: {}", String::from_utf8_lossy(&run.stderr));
        let parse = |s: &str| -> f32 {
            let t = s.trim_start_matches('-');
            if t.eq_ignore_ascii_case("nan") {
                f32::NAN
            } else {
                s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
            }
        };
        Some(
            String::from_utf8(run.stdout)
                .unwrap()
                .lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    Some((it.next()?.to_string(), it.map(parse).collect()))
                })
                .collect(),
        )
    }

    /// Whether `a` and `b` hold the same floats bit for bit (any NaN equal to any NaN).
    pub(super) fn same(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
    }

    pub(super) fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = glip_core::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal() * scale).collect()
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// `f` in f64 on the CPU and the gradients of `sum(f(inputs) * dy)`: the exact values.
    fn exact(
        inputs: &[Tensor],
        dy: &Tensor,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let g = (&y * dy.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        let grads: Result<Vec<Tensor>> =
            vars.iter().map(|v| g.get(v).expect("gradient").to_dtype(DType::F32)).collect();
        Ok((y.to_dtype(DType::F32)?, grads?))
    }

    fn got(out: &HashMap<String, Vec<f32>>, name: &str, shape: &[usize]) -> Tensor {
        t(out.get(name).unwrap_or_else(|| panic!("{name} not printed")), shape)
    }

    /// Rows shorter than a warp, rows longer than a block (256) and not a power of two, a grid
    /// smaller than the rows (the grid-stride loop), some `-inf` entries (attention masks).
    #[test]
    fn softmax_forward_and_backward_match_exact_values() -> Result<()> {
        for (rows, d) in [(37usize, 5usize), (9, 300), (12, 64)] {
            let n = rows * d;
            let mut x = random(n, 1 + d as u64, 3.0);
            for r in (0..rows).step_by(3) {
                x[r * d + r % d] = f32::NEG_INFINITY;
            }
            let dy = random(n, 2 + d as u64, 1.0);
            let threads = block_threads(d);
            let body = format!(
                "static float y[{n}], dx[{n}];
                 glip_launch(8, 1, {threads}, [] {{ glip_softmax(x, y, {rows}, {d}); }});
                 glip_launch(8, 1, {threads}, [] {{ glip_softmax_backward(y, dy, dx, {rows}, {d}); }});
                 glip_print(\"y\", y, {n}); glip_print(\"dx\", dx, {n});"
            );
            let Some(out) = emulate(NORM, &[("x", x.clone()), ("dy", dy.clone())], &body) else {
                return Ok(());
            };
            let (y, g) = exact(&[t(&x, &[rows, d])], &t(&dy, &[rows, d]), |t| {
                crate::fused::softmax_last_composed(&t[0])
            })?;
            glip_testing::assert_forward_close("softmax", &got(&out, "y", &[rows, d]), &y)?;
            glip_testing::assert_grad_close("softmax dx", &got(&out, "dx", &[rows, d]), &g[0])?;
        }
        Ok(())
    }

    /// A row of only `-inf` gives NaN, as the CPU op and PyTorch do.
    #[test]
    fn softmax_of_a_fully_masked_row_is_nan() {
        let body = "static float y[3]; glip_launch(1, 1, 32, [] { glip_softmax(x, y, 1, 3); });
                    glip_print(\"y\", y, 3);";
        let Some(out) = emulate(NORM, &[("x", vec![f32::NEG_INFINITY; 3])], body) else {
            return;
        };
        assert!(out["y"].iter().all(|v| v.is_nan()), "{:?}", out["y"]);
        let cpu = crate::fused::softmax_last(&t(&[f32::NEG_INFINITY; 3], &[1, 3])).unwrap();
        assert!(cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_nan()));
    }

    /// Widths under and over a block, rows in several chunks of the parameter sums.
    #[test]
    fn layer_norm_forward_and_backward_match_exact_values() -> Result<()> {
        for (rows, d) in [(70usize, 64usize), (40, 300), (3, 7)] {
            let n = rows * d;
            let x = random(n, 3 + d as u64, 2.0);
            let x: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + (i / d) as f32 * 0.1).collect();
            let w: Vec<f32> = random(d, 4, 0.5).iter().map(|v| v.abs() + 0.5).collect();
            let b = random(d, 5, 0.5);
            let dy = random(n, 6 + d as u64, 1.0);
            let threads = block_threads(d);
            // Chunks of 16 rows here (the launch's are at least 32) to sum several partials.
            let parts = rows.div_ceil(16);
            let cols = d.div_ceil(128);
            let body = format!(
                "static float y[{n}], dx[{n}], stats[{}], part[{}], params[{}];
                 glip_launch(8, 1, {threads}, [] {{ glip_layer_norm(x, w, b, y, {rows}, {d}, 1e-5f); }});
                 glip_launch(8, 1, {threads}, [] {{
                     glip_layer_norm_backward(x, w, dy, dx, stats, {rows}, {d}, 1e-5f); }});
                 glip_launch({cols}, {parts}, 128, [] {{
                     glip_layer_norm_params(x, dy, stats, part, {rows}, {d}, 16); }});
                 glip_launch(2, 1, 64, [] {{ glip_sum_parts(part, params, {parts}, {}); }});
                 glip_print(\"y\", y, {n}); glip_print(\"dx\", dx, {n});
                 glip_print(\"dw\", params, {d}); glip_print(\"db\", params + {d}, {d});",
                2 * rows,
                2 * d * parts,
                2 * d,
                2 * d,
            );
            let arrays = [("x", x.clone()), ("w", w.clone()), ("b", b.clone()), ("dy", dy.clone())];
            let Some(out) = emulate(NORM, &arrays, &body) else {
                return Ok(());
            };
            let (y, g) =
                exact(&[t(&x, &[rows, d]), t(&w, &[d]), t(&b, &[d])], &t(&dy, &[rows, d]), |t| {
                    crate::fused::layer_norm_composed(&t[0], &t[1], &t[2], 1e-5)
                })?;
            glip_testing::assert_forward_close("layer norm", &got(&out, "y", &[rows, d]), &y)?;
            glip_testing::assert_grad_close("layer norm dx", &got(&out, "dx", &[rows, d]), &g[0])?;
            glip_testing::assert_grad_close("layer norm dw", &got(&out, "dw", &[d]), &g[1])?;
            glip_testing::assert_grad_close("layer norm db", &got(&out, "db", &[d]), &g[2])?;
        }
        Ok(())
    }

    /// The residual's layer norm (`glip_add_layer_norm`) is `glip_layer_norm` of the f32 sum,
    /// bit for bit (the same arithmetic on the same sums), at widths under and over a block.
    #[test]
    fn the_residual_layer_norm_is_the_layer_norm_of_the_sum_bit_for_bit() {
        for (rows, d) in [(9usize, 64usize), (5, 300), (3, 7)] {
            let n = rows * d;
            let (x, r) = (random(n, 30 + d as u64, 2.0), random(n, 31 + d as u64, 1.0));
            let w: Vec<f32> = random(d, 32, 0.5).iter().map(|v| v.abs() + 0.5).collect();
            let b = random(d, 33, 0.5);
            let threads = block_threads(d);
            let body = format!(
                "static float s[{n}], y[{n}], fused[{n}];
                 for (size_t i = 0; i < {n}; ++i) s[i] = x[i] + r[i];
                 glip_launch(4, 1, {threads}, [] {{ glip_layer_norm(s, w, b, y, {rows}, {d}, 1e-5f); }});
                 glip_launch(4, 1, {threads}, [] {{
                     glip_add_layer_norm(x, r, w, b, fused, {rows}, {d}, 1e-5f); }});
                 glip_print(\"y\", y, {n}); glip_print(\"fused\", fused, {n});"
            );
            let arrays = [("x", x), ("r", r), ("w", w), ("b", b)];
            let Some(out) = emulate(NORM, &arrays, &body) else {
                return;
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out["fused"]), bits(&out["y"]), "rows {rows}, width {d}");
        }
    }

    /// Channels in a grid smaller than their number, planes of one element, more elements per
    /// channel than a block has threads.
    #[test]
    fn batch_norm_forward_and_backward_match_exact_values() -> Result<()> {
        for (bs, c, h, w) in [(3usize, 5usize, 4usize, 7usize), (4, 3, 1, 1), (2, 6, 16, 9)] {
            let (hw, n) = (h * w, bs * c * h * w);
            let x: Vec<f32> = random(n, 7 + c as u64, 2.0).iter().map(|v| v + 1.5).collect();
            let gamma: Vec<f32> = random(c, 8, 0.3).iter().map(|v| v + 1.0).collect();
            let beta = random(c, 9, 0.3);
            let dy = random(n, 10 + c as u64, 1.0);
            let threads = block_threads(bs * hw);
            let body = format!(
                "static float p[{}], y[{n}], out[{}];
                 glip_launch(2, 1, {threads}, [] {{ glip_batch_norm_stats(x, p, {bs}, {c}, {hw}, 1e-5); }});
                 for (unsigned i = 0; i < {c}; ++i) {{ p[3 * {c} + i] = bn_weight[i]; p[4 * {c} + i] = bn_bias[i]; }}
                 glip_launch(3, 1, 256, [] {{ glip_batch_norm(x, p, y, {n}, {c}, {hw}); }});
                 glip_launch(2, 1, {threads}, [] {{
                     glip_batch_norm_sums(x, p, dy, out + {n}, {bs}, {c}, {hw}); }});
                 glip_launch(3, 1, 256, [] {{
                     glip_batch_norm_backward(x, p, dy, out, {n}, {c}, {hw}, {}.0f); }});
                 glip_print(\"mean\", p, {c}); glip_print(\"var\", p + {c}, {c});
                 glip_print(\"y\", y, {n}); glip_print(\"dx\", out, {n});
                 glip_print(\"dgamma\", out + {n}, {c}); glip_print(\"dbeta\", out + {n} + {c}, {c});",
                5 * c,
                n + 2 * c,
                bs * hw,
            );
            let arrays = [
                ("x", x.clone()),
                ("bn_weight", gamma.clone()),
                ("bn_bias", beta.clone()),
                ("dy", dy.clone()),
            ];
            let Some(out) = emulate(NORM, &arrays, &body) else {
                return Ok(());
            };
            let shape = [bs, c, h, w];
            let per = |t: &Tensor| t.reshape((1, c, 1, 1));
            let (y, g) =
                exact(&[t(&x, &shape), t(&gamma, &[c]), t(&beta, &[c])], &t(&dy, &shape), |t| {
                    let mean = t[0].mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
                    let xc = t[0].broadcast_sub(&mean)?;
                    let var = xc.sqr()?.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
                    let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                    y.broadcast_mul(&per(&t[1])?)?.broadcast_add(&per(&t[2])?)
                })?;
            let x64 = t(&x, &shape).to_dtype(DType::F64)?;
            let mean = x64.mean_keepdim(3)?.mean_keepdim(2)?.mean_keepdim(0)?;
            let var = x64
                .broadcast_sub(&mean)?
                .sqr()?
                .mean_keepdim(3)?
                .mean_keepdim(2)?
                .mean_keepdim(0)?;
            let f32s = |t: Tensor| t.flatten_all()?.to_dtype(DType::F32);
            glip_testing::assert_forward_close("bn mean", &got(&out, "mean", &[c]), &f32s(mean)?)?;
            glip_testing::assert_forward_close("bn var", &got(&out, "var", &[c]), &f32s(var)?)?;
            glip_testing::assert_forward_close("bn", &got(&out, "y", &shape), &y)?;
            glip_testing::assert_grad_close("bn dx", &got(&out, "dx", &shape), &g[0])?;
            glip_testing::assert_grad_close("bn dgamma", &got(&out, "dgamma", &[c]), &g[1])?;
            glip_testing::assert_grad_close("bn dbeta", &got(&out, "dbeta", &[c]), &g[2])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod emulation_affine {
    //! A batch norm's constants and the frozen batch norm's affine map (with and without a
    //! residual, with and without its ReLU) under the emulation, against the CPU ops: in f32 at
    //! the fixture README's tolerances, in bf16 within one bf16 rounding of the f32 result. Every
    //! pre-activation is at least 0.01 from zero, so that no rounding decides a mask.

    use super::emulation::{emulate, random};
    use super::NORM;
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// The bf16 value nearest `v` (ties to even), as f32: candle's cast on the CPU.
    fn bf16_round(v: &[f32]) -> Vec<f32> {
        let t = Tensor::new(v, &Device::Cpu).unwrap();
        t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    /// `relu?(x s + t (+ r))` and its gradients `dx`, `dr` for `dy`, on the CPU in f32.
    fn cpu_op(
        x: &[f32],
        ss: &[f32],
        r: Option<&[f32]>,
        dy: &[f32],
        shape: (usize, usize, usize, usize),
        relu: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let dev = Device::Cpu;
        let xv = Var::from_vec(x.to_vec(), shape, &dev)?;
        let rv = r.map(|r| Var::from_vec(r.to_vec(), shape, &dev)).transpose()?;
        let sst = Tensor::from_vec(ss.to_vec(), (2, shape.1), &dev)?;
        let y = crate::affine::channel_affine(&xv, &sst, rv.as_ref().map(|v| v.as_tensor()), relu)?;
        let g = (&y * Tensor::from_vec(dy.to_vec(), shape, &dev)?)?.sum_all()?.backward()?;
        let dx = g.get(&xv).expect("dx").clone();
        let dr = rv.map(|v| g.get(&v).expect("dr").clone());
        Ok((y, dx, dr))
    }

    /// Per-channel constants (scales at least 0.5) and, with the residual `r` or without, the
    /// input whose pre-activation `x s + t (+ r)` is `+-(margin + |p|)` for normal `p`.
    struct Case {
        scale: Vec<f32>,
        shift: Vec<f32>,
        ss: Vec<f32>,
        pre: Vec<f32>,
        hw: usize,
    }

    impl Case {
        fn new((b, c, h, w): (usize, usize, usize, usize), seed: u64) -> Case {
            let scale: Vec<f32> = random(c, seed, 0.5).iter().map(|v| v.abs() + 0.5).collect();
            let shift = random(c, seed + 1, 0.5);
            let ss = scale.iter().chain(&shift).copied().collect();
            Case { scale, shift, ss, pre: random(b * c * h * w, seed + 2, 1.0), hw: h * w }
        }

        fn channel(&self, i: usize) -> usize {
            (i / self.hw) % self.scale.len()
        }

        fn x(&self, margin: f32, r: Option<&[f32]>) -> Vec<f32> {
            (0..self.pre.len())
                .map(|i| {
                    let ch = self.channel(i);
                    let p = self.pre[i].signum() * (margin + self.pre[i].abs());
                    (p - self.shift[ch] - r.map_or(0.0, |r| r[i])) / self.scale[ch]
                })
                .collect()
        }
    }

    /// Planes of `h w` (NCHW), and planes of one element: the shape `(b h w, c, 1, 1)` that a
    /// channels-last tensor's storage is given to the kernel as (`glip_kernels::layout`), each
    /// element's channel its index modulo `c`.
    #[test]
    fn affine_with_and_without_residual_and_relu_matches_the_cpu_op() -> Result<()> {
        for shape in [(3usize, 5usize, 6usize, 7usize), (3 * 6 * 7, 5, 1, 1)] {
            affine_case(shape)?;
        }
        Ok(())
    }

    fn affine_case((b, c, h, w): (usize, usize, usize, usize)) -> Result<()> {
        let n = b * c * h * w;
        let case = Case::new((b, c, h, w), 31);
        let ss = case.ss.clone();
        let r = random(n, 34, 1.0);
        let dy = random(n, 35, 1.0);
        for (with_r, relu) in [(false, true), (true, true), (false, false), (true, false)] {
            let x = case.x(0.01, with_r.then_some(r.as_slice()));
            let flags = u32::from(with_r) | (u32::from(relu) << 1);
            let body = format!(
                "static float y[{n}], out[{}];
                 glip_launch(3, 1, 256, [] {{ glip_affine_f32(x, ss, r, y, {n}, {c}, {}, {flags}); }});
                 glip_launch(3, 1, 256, [] {{
                     glip_affine_backward_f32(y, dy, ss, out, {n}, {c}, {}, {flags}); }});
                 glip_print(\"y\", y, {n}); glip_print(\"dx\", out, {n});
                 if ({flags} & 1) glip_print(\"dr\", out + {n}, {n});",
                2 * n,
                h * w,
                h * w,
            );
            let arrays =
                [("x", x.clone()), ("ss", ss.clone()), ("r", r.clone()), ("dy", dy.clone())];
            let Some(out) = emulate(NORM, &arrays, &body) else {
                return Ok(());
            };
            let shape = (b, c, h, w);
            let (y, dx, dr) = cpu_op(&x, &ss, with_r.then_some(&r), &dy, shape, relu)?;
            let got = |name: &str| Tensor::from_vec(out[name].clone(), shape, &Device::Cpu);
            let what = format!("affine {shape:?} (residual {with_r}, relu {relu})");
            glip_testing::assert_forward_close(&what, &got("y")?, &y)?;
            glip_testing::assert_grad_close(&format!("{what} dx"), &got("dx")?, &dx)?;
            if let Some(dr) = dr {
                glip_testing::assert_grad_close(&format!("{what} dr"), &got("dr")?, &dr)?;
            }
        }
        Ok(())
    }

    /// bf16 activations: inputs that are bf16 values, the kernel's f32 arithmetic rounded once.
    /// Each output is within one rounding to bf16 of the CPU's f32 result `v` (`2^-8 |v|`, the
    /// unit roundoff of bf16's 8-bit significand) plus the f32 difference a fused multiply-add
    /// may make (`2^-24` of each product and sum: `2^-23 (|x s| + |t| + |r|)` bounds both
    /// roundings); `dr = dy` or 0, exactly.
    #[test]
    fn affine_on_bf16_activations_rounds_the_f32_result_once() -> Result<()> {
        let (b, c, h, w) = (2usize, 4usize, 5usize, 9usize);
        let n = b * c * h * w;
        let case = Case::new((b, c, h, w), 51);
        let (scale, shift, ss) = (&case.scale, &case.shift, case.ss.clone());
        let r = bf16_round(&random(n, 54, 1.0));
        let dy = bf16_round(&random(n, 55, 1.0));
        let ch = |i: usize| case.channel(i);
        for (with_r, relu) in [(false, true), (true, true), (true, false)] {
            // Pre-activations at least 0.1 from zero before x is rounded to bf16, which moves
            // x s by at most 2^-8 |x s| (under 0.04 here).
            let x = bf16_round(&case.x(0.1, with_r.then_some(r.as_slice())));
            let flags = u32::from(with_r) | (u32::from(relu) << 1);
            let body = format!(
                "static glip_bf16 xb[{n}], rb[{n}], dyb[{n}], yb[{n}], outb[{}];
                 static float y[{n}], out[{}];
                 for (size_t i = 0; i < {n}; ++i) {{
                     xb[i].bits = glip_bf16_bits(x[i]); rb[i].bits = glip_bf16_bits(r[i]);
                     dyb[i].bits = glip_bf16_bits(dy[i]);
                 }}
                 glip_launch(2, 1, 128, [] {{ glip_affine_bf16(xb, ss, rb, yb, {n}, {c}, {}, {flags}); }});
                 glip_launch(2, 1, 128, [] {{
                     glip_affine_backward_bf16(yb, dyb, ss, outb, {n}, {c}, {}, {flags}); }});
                 for (size_t i = 0; i < {n}; ++i) y[i] = glip_load(yb[i]);
                 for (size_t i = 0; i < {}; ++i) out[i] = glip_load(outb[i]);
                 glip_print(\"y\", y, {n}); glip_print(\"dx\", out, {n});
                 if ({flags} & 1) glip_print(\"dr\", out + {n}, {n});",
                2 * n,
                2 * n,
                h * w,
                h * w,
                2 * n,
            );
            let arrays =
                [("x", x.clone()), ("ss", ss.clone()), ("r", r.clone()), ("dy", dy.clone())];
            let Some(out) = emulate(NORM, &arrays, &body) else {
                return Ok(());
            };
            let (y, dx, dr) = cpu_op(&x, &ss, with_r.then_some(&r), &dy, (b, c, h, w), relu)?;
            let (y, dx): (Vec<f32>, Vec<f32>) =
                (y.flatten_all()?.to_vec1()?, dx.flatten_all()?.to_vec1()?);
            for i in 0..n {
                let (s, t) = (scale[ch(i)], shift[ch(i)]);
                let terms = (x[i] * s).abs() + t.abs() + if with_r { r[i].abs() } else { 0.0 };
                let f32_part = 2f32.powi(-23) * terms;
                let bound = 2f32.powi(-8) * y[i].abs() + f32_part;
                let d = (out["y"][i] - y[i]).abs();
                assert!(d <= bound, "y[{i}] {} vs {} (bound {bound})", out["y"][i], y[i]);
                let bound = 2f32.powi(-8) * dx[i].abs() + 2f32.powi(-23) * dx[i].abs();
                let d = (out["dx"][i] - dx[i]).abs();
                assert!(d <= bound, "dx[{i}] {} vs {} (bound {bound})", out["dx"][i], dx[i]);
            }
            if let Some(dr) = dr {
                let dr: Vec<f32> = dr.flatten_all()?.to_vec1()?;
                assert_eq!(out["dr"], dr, "dr is dy where the ReLU passes, 0 elsewhere");
            }
        }
        Ok(())
    }

    /// The constants of a batch norm outside training against the CPU's composition: the
    /// scale to within two roundings of the same operations (`2^-23 |s|`), the shift to within
    /// the rounding a fused multiply-add may save (`2^-23 (|rm s| + |t|)`).
    #[test]
    fn batch_norm_constants_match_the_cpu_composition() -> Result<()> {
        let c = 300usize;
        let w = random(c, 61, 1.0);
        let b = random(c, 62, 1.0);
        let rm = random(c, 63, 2.0);
        let rv: Vec<f32> = random(c, 64, 1.0).iter().map(|v| v * v + 1e-3).collect();
        let eps = 1e-5f32;
        let body = format!(
            "static float ss[{}];
             glip_launch(2, 1, 256, [] {{ glip_bn_constants(w, b, rm, rv, ss, {c}, {eps:e}f); }});
             glip_print(\"ss\", ss, {});",
            2 * c,
            2 * c
        );
        let arrays = [("w", w.clone()), ("b", b.clone()), ("rm", rm.clone()), ("rv", rv.clone())];
        let Some(out) = emulate(NORM, &arrays, &body) else {
            return Ok(());
        };
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu);
        let want: Vec<f32> =
            crate::affine::batch_norm_constants(&t(&w)?, &t(&b)?, &t(&rm)?, &t(&rv)?, eps as f64)?
                .flatten_all()?
                .to_vec1()?;
        for i in 0..c {
            let (s, sh) = (want[i], want[c + i]);
            let (gs, gsh) = (out["ss"][i], out["ss"][c + i]);
            assert!((gs - s).abs() <= 2f32.powi(-23) * s.abs(), "scale {i}: {gs} vs {s}");
            let bound = 2f32.powi(-23) * ((rm[i] * s).abs() + sh.abs());
            assert!((gsh - sh).abs() <= bound, "shift {i}: {gsh} vs {sh} (bound {bound})");
        }
        Ok(())
    }
}

#[cfg(test)]
mod emulation_pool {
    //! The stem's max-pool under the emulation against the CPU op, bit for bit: a maximum is
    //! exact, and each input's gradient is the same f32 values added in the same order (windows
    //! row-major). Ties, NaNs, `-inf` and odd and even sizes included.

    use super::emulation::{emulate, random, same};
    use super::POOL;
    use candle_core::{Device, Result, Tensor, Var};

    #[test]
    fn max_pool_and_its_gradient_equal_the_cpu_op() -> Result<()> {
        for (b, c, h, w) in [(2usize, 3usize, 17usize, 14usize), (1, 2, 1, 5), (1, 1, 6, 6)] {
            let n = b * c * h * w;
            // Values on a coarse grid, so that windows tie.
            let mut x: Vec<f32> = random(n, 41 + h as u64, 2.0).iter().map(|v| v.round()).collect();
            x[n / 3] = f32::NAN;
            x[n / 2] = f32::NEG_INFINITY;
            let (oh, ow) = crate::pool::out_dims(h, w);
            let m = b * c * oh * ow;
            let g = random(m, 42, 1.0);
            let body = format!(
                "static float y[{m}], dx[{n}];
                 glip_launch(2, 1, 64, [] {{ glip_max_pool_f32(x, y, {}, {h}, {w}, {oh}, {ow}); }});
                 glip_launch(2, 1, 64, [] {{
                     glip_max_pool_backward_f32(x, g, dx, {}, {h}, {w}, {oh}, {ow}); }});
                 glip_print(\"y\", y, {m}); glip_print(\"dx\", dx, {n});",
                b * c,
                b * c,
            );
            let Some(out) = emulate(POOL, &[("x", x.clone()), ("g", g.clone())], &body) else {
                return Ok(());
            };
            let xv = Var::from_vec(x, (b, c, h, w), &Device::Cpu)?;
            let y = crate::pool::max_pool_3x3_s2_p1(&xv)?;
            let gy = Tensor::from_vec(g, (b, c, oh, ow), &Device::Cpu)?;
            let dx = (&y * gy)?.sum_all()?.backward()?.get(&xv).expect("dx").flatten_all()?;
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
            assert!(
                same(&out["y"], &y),
                "max pool {h}x{w}: {:?} vs {:?}",
                bits(&out["y"]),
                bits(&y)
            );
            let dx: Vec<f32> = dx.to_vec1()?;
            assert!(same(&out["dx"], &dx), "max pool gradient {h}x{w}: {:?} vs {dx:?}", out["dx"]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod emulation_pool_bf16 {
    //! The stem's max-pool on bf16 activations under the emulation: the maxima are the inputs'
    //! bf16 values, and each input's gradient is the f32 sum of the CPU's (the same bf16 terms
    //! in the same order) rounded once to bf16, bit for bit.

    use super::emulation::{emulate, random, same};
    use super::POOL;
    use candle_core::{DType, Device, Result, Tensor, Var};

    #[test]
    fn max_pool_on_bf16_equals_the_cpu_op_rounded() -> Result<()> {
        let (b, c, h, w) = (2usize, 3usize, 11usize, 8usize);
        let n = b * c * h * w;
        // Small integers (bf16 values) so that windows tie; a NaN and a -inf.
        let mut x: Vec<f32> = random(n, 71, 3.0).iter().map(|v| v.round()).collect();
        x[n / 4] = f32::NAN;
        x[n / 2] = f32::NEG_INFINITY;
        let (oh, ow) = crate::pool::out_dims(h, w);
        let m = b * c * oh * ow;
        let round = |v: Vec<f32>, shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)
        };
        let g = round(random(m, 72, 1.0), (b, c, oh, ow))?;
        let gv: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let body = format!(
            "static glip_bf16 xb[{n}], gb[{m}], yb[{m}], dxb[{n}];
             static float y[{m}], dx[{n}];
             for (size_t i = 0; i < {n}; ++i) xb[i].bits = glip_bf16_bits(x[i]);
             for (size_t i = 0; i < {m}; ++i) gb[i].bits = glip_bf16_bits(g[i]);
             glip_launch(2, 1, 64, [] {{ glip_max_pool_bf16(xb, yb, {}, {h}, {w}, {oh}, {ow}); }});
             glip_launch(2, 1, 64, [] {{
                 glip_max_pool_backward_bf16(xb, gb, dxb, {}, {h}, {w}, {oh}, {ow}); }});
             for (size_t i = 0; i < {m}; ++i) y[i] = glip_load(yb[i]);
             for (size_t i = 0; i < {n}; ++i) dx[i] = glip_load(dxb[i]);
             glip_print(\"y\", y, {m}); glip_print(\"dx\", dx, {n});",
            b * c,
            b * c,
        );
        let Some(out) = emulate(POOL, &[("x", x.clone()), ("g", gv)], &body) else {
            return Ok(());
        };
        let xv = Var::from_vec(x, (b, c, h, w), &Device::Cpu)?;
        let y = crate::pool::max_pool_3x3_s2_p1(&xv)?;
        let dx = (&y * g)?.sum_all()?.backward()?.get(&xv).expect("dx").clone();
        let dx: Vec<f32> =
            round(dx.flatten_all()?.to_vec1()?, (b, c, h, w))?.flatten_all()?.to_vec1()?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        assert!(same(&out["y"], &y), "bf16 max pool: {:?} vs {y:?}", out["y"]);
        assert!(same(&out["dx"], &dx), "bf16 max pool gradient: {:?} vs {dx:?}", out["dx"]);
        Ok(())
    }
}

#[cfg(test)]
mod emulation_linear {
    //! `Linear`'s bf16 pass under the emulation: the cast rounds to nearest even (candle's cast
    //! on the CPU, bit for bit) and the prefill is the bias row by row.

    use super::emulation::{emulate, random, same};
    use super::LINEAR;
    use candle_core::{DType, Device, Tensor};

    fn bf16(v: &[f32]) -> Vec<f32> {
        let t = Tensor::new(v, &Device::Cpu).unwrap();
        t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn the_cast_and_the_prefill_match_the_cpu() {
        let (rows, cols) = (37usize, 300usize);
        let n = rows * cols;
        let mut x = random(n, 81, 3.0);
        x[5] = f32::INFINITY;
        x[6] = -0.0;
        x[7] = 1.0 + 2f32.powi(-8); // a tie: to even, 1
        let bias = random(cols, 82, 1.0);
        let body = format!(
            "static glip_bf16 xb[{n}], xb2[{n}];
             static float y[{n}], xr[{n}], xr2[{n}];
             glip_launch(3, 1, 128, [] {{ glip_bf16_cast_fill(x, xb, {n}, bias, y, {rows}, {cols}); }});
             glip_launch(2, 1, 64, [] {{ glip_bf16_cast_fill(x, xb2, {n}, nullptr, nullptr, 0, 0); }});
             for (size_t i = 0; i < {n}; ++i) {{ xr[i] = glip_load(xb[i]); xr2[i] = glip_load(xb2[i]); }}
             glip_print(\"xb\", xr, {n}); glip_print(\"xb2\", xr2, {n}); glip_print(\"y\", y, {n});"
        );
        let Some(out) = emulate(LINEAR, &[("x", x.clone()), ("bias", bias.clone())], &body) else {
            return;
        };
        let want = bf16(&x);
        assert!(same(&out["xb"], &want), "the cast with the prefill");
        assert!(same(&out["xb2"], &want), "the cast alone");
        assert_eq!(out["xb"][7], 1.0, "a tie rounds to even");
        let fill: Vec<f32> = (0..n).map(|i| bias[i % cols]).collect();
        assert!(same(&out["y"], &fill), "the prefill");
    }
}

#[cfg(test)]
mod emulation_top_k {
    //! The top-k kernel under the emulation against the host's selection
    //! ([`crate::topk::best_k`], a stable sort's order), index for index: ties, both zeros,
    //! infinities and NaNs of both signs, rows not a multiple of a block, `k` from 1 to `s`.

    use super::emulation::{emulate, random};
    use super::TOP_K;

    #[test]
    fn top_k_equals_the_host_selection() {
        let cases =
            [(3usize, 300usize, 7usize), (2, 256, 256), (1, 5, 5), (1, 6, 1), (2, 513, 100)];
        for (rows, s, k) in cases {
            // A coarse grid of values, so that many tie (zeros among them), and the specials.
            let mut x: Vec<f32> =
                random(rows * s, 61 + s as u64, 2.0).iter().map(|v| v.round()).collect();
            x[0] = -0.0;
            x[1] = f32::NAN;
            x[2] = -f32::NAN; // set again in C below: the literals drop a NaN's sign
            x[3] = f32::INFINITY;
            x[4] = f32::NEG_INFINITY;
            let body = format!(
                "static unsigned idx[{n}]; static float out[{n}];
                 x[2] = __int_as_float((int)0xffc00000u);
                 glip_launch({gx}, {rows}, 256, [] {{ glip_top_k(x, idx, {s}, {k}); }});
                 for (size_t i = 0; i < {n}; ++i) out[i] = (float)idx[i];
                 glip_print(\"idx\", out, {n});",
                n = rows * k,
                gx = s.div_ceil(256),
            );
            let Some(out) = emulate(TOP_K, &[("x", x.clone())], &body) else {
                return;
            };
            for r in 0..rows {
                let row = &x[r * s..(r + 1) * s];
                let want = crate::topk::best_k((0..s).collect(), k, |i| row[i]);
                let got: Vec<usize> =
                    out["idx"][r * k..(r + 1) * k].iter().map(|&v| v as usize).collect();
                assert_eq!(got, want, "row {r} of {rows}x{s}, k {k}");
            }
        }
    }
}

#[cfg(test)]
mod emulation_optim {
    //! The optimiser's kernels under the same emulation, against exact (f64) arithmetic on the
    //! same f32 inputs and scalars, per element within the rounding bound of each formula
    //! (`u = 2^-24` per operation, terms' magnitudes; NVRTC's FMA contraction only removes
    //! roundings): moments `m' = b1 m + a1 (c g)` 3 roundings, `v' = b2 v + a2 (c g)^2` 5;
    //! apply `w' = w keep - step m / (sqrt(v) r + e)` 2 on the first term, 7 on the quotient;
    //! EMA `e' = d e + a w` 3. Bounds use 1.01 times those counts (second-order terms).

    use super::emulation::{emulate, random};
    use super::OPTIM;

    const U: f64 = f32::EPSILON as f64 / 2.0;

    fn check(name: &str, got: &[f32], want: &[f64], mag: &[f64], roundings: f64) {
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
            let bound = 1.01 * roundings * U * m;
            let err = (g as f64 - w).abs();
            assert!(err <= bound, "{name}[{i}]: {g} vs exact {w}: {err:e} > {bound:e}");
        }
    }

    #[test]
    fn adamw_and_ema_kernels_match_exact_arithmetic() {
        let n = 1000usize;
        let g = random(n, 21, 0.1);
        let m = random(n, 22, 0.01);
        let v: Vec<f32> = random(n, 23, 0.001).iter().map(|x| x * x).collect();
        let w = random(n, 24, 1.0);
        let (c, b1, b2) = (0.8f32, 0.9f32, 0.999f32);
        let (a1, a2) = (1.0 - b1, 1.0 - b2);
        let (keep, step, r, eps) = (0.9999f32, 1e-3f32, 1.0f32 / 0.02f32.sqrt(), 1e-8f32);
        let (d, a) = (0.99f32, 0.01f32);
        let mv: Vec<f32> = m.iter().chain(&v).copied().collect();
        // Two blocks of 256 over 1000 elements: the grid-stride loop runs twice.
        let body = format!(
            "static float e[{n}]; for (size_t i = 0; i < {n}; ++i) e[i] = w[i];
             static float ww[{n}]; for (size_t i = 0; i < {n}; ++i) ww[i] = w[i];
             glip_launch(2, 1, 256, [] {{ glip_adamw_moments(mv, g, {n}, {c:e}f, {b1:e}f, {a1:e}f, {b2:e}f, {a2:e}f); }});
             glip_print(\"mv\", mv, {});
             glip_launch(2, 1, 256, [] {{ glip_adamw_apply(ww, mv, {n}, {keep:e}f, {step:e}f, {r:e}f, {eps:e}f); }});
             glip_print(\"w\", ww, {n});
             glip_launch(2, 1, 256, [] {{ glip_ema(e, g, {n}, {d:e}f, {a:e}f); }});
             glip_print(\"e\", e, {n});",
            2 * n
        );
        let Some(out) = emulate(OPTIM, &[("mv", mv), ("g", g.clone()), ("w", w.clone())], &body)
        else {
            return;
        };
        let f = |x: f32| x as f64;
        let (mut m2, mut v2, mut mm, mut mv_) = (vec![], vec![], vec![], vec![]);
        for i in 0..n {
            let gi = f(c) * f(g[i]);
            m2.push(f(b1) * f(m[i]) + f(a1) * gi);
            mm.push((f(b1) * f(m[i])).abs() + (f(a1) * gi).abs());
            v2.push(f(b2) * f(v[i]) + f(a2) * gi * gi);
            mv_.push((f(b2) * f(v[i])).abs() + f(a2) * gi * gi);
        }
        let got_mv = &out["mv"];
        check("adamw m", &got_mv[..n], &m2, &mm, 3.0);
        check("adamw v", &got_mv[n..], &v2, &mv_, 5.0);
        // The weight update from the kernel's own moments (its inputs).
        let (mut w2, mut wmag) = (vec![], vec![]);
        for i in 0..n {
            let (mi, vi) = (f(got_mv[i]), f(got_mv[n + i]));
            let q = f(step) * mi / (vi.sqrt() * f(r) + f(eps));
            w2.push(f(w[i]) * f(keep) - q);
            // 2 roundings on the first term, 7 on the quotient: weight them into one bound.
            wmag.push((f(w[i]) * f(keep)).abs() + 3.5 * q.abs());
        }
        check("adamw w", &out["w"], &w2, &wmag, 2.0);
        let e2: Vec<f64> = (0..n).map(|i| f(d) * f(w[i]) + f(a) * f(g[i])).collect();
        let emag: Vec<f64> =
            (0..n).map(|i| (f(d) * f(w[i])).abs() + (f(a) * f(g[i])).abs()).collect();
        check("ema", &out["e"], &e2, &emag, 3.0);
    }
    /// C++ that fills `table` (`GLIP_TABLE_WORDS` words a row) for the arrays named `w{i}`,
    /// `mv{i}`, `g{i}` of `sizes` (a weight and moments only with `adamw`), chunks of `chunk`,
    /// and scalars `sc{i}` (nine floats each, with `adamw`); returns it and the chunk count.
    fn table_code(sizes: &[usize], chunk: usize, adamw: bool) -> (String, usize) {
        let words = super::TABLE_WORDS;
        let mut code =
            format!("static unsigned long long table[{}] = {{0}};\n", sizes.len() * words);
        let mut first = 0;
        for (i, &n) in sizes.iter().enumerate() {
            let row = i * words;
            code += &format!(
                "table[{row} + 2] = (unsigned long long)g{i}; table[{row} + 3] = {n}; \
                 table[{row} + 4] = {first};\n"
            );
            if adamw {
                code += &format!(
                    "table[{row}] = (unsigned long long)w{i}; table[{row} + 1] = (unsigned long long)mv{i}; \
                     std::memcpy(&table[{row} + 5], sc{i}, 9 * sizeof(float));\n"
                );
            }
            first += n.div_ceil(chunk);
        }
        (code, first)
    }

    /// The gradient norm's sum of squares as `cuda_optim::sum_squares_all` launches it (one
    /// table of tensors, chunks of 512 here, fewer blocks than chunks so that blocks stride over
    /// them, then one block over the partials), over tensors of 1000, 1 and 2999 elements
    /// (chunks of one tensor, a tensor of one element, a last chunk partly filled), against the
    /// exact sum: each square of an f32 is exact in f64, each of the at most `n` additions
    /// rounds once, so the error is at most `n u64 sum(x^2)` (`u64 = 2^-53`). The total comes
    /// back as two f32 (high and low parts).
    #[test]
    fn sum_of_squares_matches_the_exact_sum() {
        let sizes = [1000usize, 1, 2999];
        let xs: Vec<Vec<f32>> =
            sizes.iter().enumerate().map(|(i, &n)| random(n, 31 + i as u64, 3.0)).collect();
        let (table, chunks) = table_code(&sizes, 512, false);
        let grid = 4;
        assert!(chunks > grid);
        let body = format!(
            "{table}static double parts[{grid}], out[1];
             glip_launch({grid}, 1, 256, [] {{ glip_sum_squares_all(table, {}, 512, {chunks}, parts); }});
             glip_launch(1, 1, 256, [] {{ glip_sum_f64(parts, {grid}, out); }});
             float hl[2] = {{(float)out[0], (float)(out[0] - (double)(float)out[0])}};
             glip_print(\"total\", hl, 2);",
            sizes.len()
        );
        let arrays: Vec<(String, Vec<f32>)> =
            xs.iter().enumerate().map(|(i, x)| (format!("g{i}"), x.clone())).collect();
        let named: Vec<(&str, Vec<f32>)> =
            arrays.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let Some(out) = emulate(OPTIM, &named, &body) else {
            return;
        };
        let got = out["total"][0] as f64 + out["total"][1] as f64;
        let exact: f64 = xs.iter().flatten().map(|&v| (v as f64) * (v as f64)).sum();
        let n: usize = sizes.iter().sum();
        // The host's sum above rounds too: twice the bound covers both.
        let bound = 2.0 * n as f64 * (f64::EPSILON / 2.0) * exact;
        assert!((got - exact).abs() <= bound, "sum of squares {got} vs {exact} (bound {bound:e})");
    }

    /// AdamW over three tensors in one launch (`glip_adamw_all`, as `cuda_optim::adamw_all`
    /// builds its table: each tensor its own constants) against the per-tensor kernels
    /// (`glip_adamw_moments` then `glip_adamw_apply`, checked against exact arithmetic above)
    /// on copies of the same inputs: the same operations on the same values, so the same bits.
    /// Chunks of 512 and fewer blocks than chunks, as in the sum of squares.
    #[test]
    fn adamw_over_many_tensors_matches_the_kernels_per_tensor() {
        let sizes = [1000usize, 1, 1500];
        let mut arrays: Vec<(String, Vec<f32>)> = Vec::new();
        let mut per_tensor = String::new();
        for (i, &n) in sizes.iter().enumerate() {
            let k = 40 + 4 * i as u64;
            let v: Vec<f32> = random(n, k + 2, 0.001).iter().map(|x| x * x).collect();
            let mv: Vec<f32> = random(n, k + 1, 0.01).into_iter().chain(v).collect();
            // c, b1, a1, b2, a2, keep, step, r, eps: a learning rate and decay per tensor.
            let lr = 1e-3 * (i + 1) as f32;
            let sc = [0.8, 0.9, 0.1, 0.999, 0.001, 1.0 - lr * 0.01 * i as f32, lr / 0.1, 5.0, 1e-8];
            arrays.push((format!("g{i}"), random(n, k, 0.1)));
            arrays.push((format!("w{i}"), random(n, k + 3, 1.0)));
            arrays.push((format!("pw{i}"), arrays.last().unwrap().1.clone()));
            arrays.push((format!("mv{i}"), mv.clone()));
            arrays.push((format!("pmv{i}"), mv));
            arrays.push((format!("sc{i}"), sc.to_vec()));
            per_tensor += &format!(
                "glip_launch(2, 1, 256, [] {{ glip_adamw_moments(pmv{i}, g{i}, {n}, sc{i}[0], sc{i}[1], sc{i}[2], sc{i}[3], sc{i}[4]); }});
                 glip_launch(2, 1, 256, [] {{ glip_adamw_apply(pw{i}, pmv{i}, {n}, sc{i}[5], sc{i}[6], sc{i}[7], sc{i}[8]); }});
                 glip_print(\"w{i}\", w{i}, {n}); glip_print(\"pw{i}\", pw{i}, {n});
                 glip_print(\"mv{i}\", mv{i}, {}); glip_print(\"pmv{i}\", pmv{i}, {});\n",
                2 * n,
                2 * n
            );
        }
        let (table, chunks) = table_code(&sizes, 512, true);
        assert!(chunks > 3);
        let body = format!(
            "{table}glip_launch(3, 1, 256, [] {{ glip_adamw_all(table, {}, 512, {chunks}); }});\n{per_tensor}",
            sizes.len()
        );
        let named: Vec<(&str, Vec<f32>)> =
            arrays.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let Some(out) = emulate(OPTIM, &named, &body) else {
            return;
        };
        for i in 0..sizes.len() {
            for what in ["w", "mv"] {
                let (all, one) = (&out[&format!("{what}{i}")], &out[&format!("p{what}{i}")]);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(all), bits(one), "{what}{i}: one launch against per tensor");
                let before = &arrays.iter().find(|(k, _)| *k == format!("{what}{i}")).unwrap().1;
                assert_ne!(bits(all), bits(before), "{what}{i} was not updated");
            }
        }
    }
}

#[cfg(test)]
mod emulation_attention {
    //! The attention kernel under the emulation against the exact core (f64, glip-testing's
    //! `attention_reference`) within the bound derived there: several query tiles, key tiles
    //! with a partial last one, heads of 8, 33 and 64 columns, the scale on the query or the
    //! scores, key masks attending to some keys, to all and to none (a row masking every key
    //! weighs them equally, as the composition's `f32::MIN` bias does), one key.

    use super::emulation::{emulate, random};
    use super::{ATTENTION, ATTENTION_KEY_TILE, ATTENTION_QUERY_TILE};
    use glip_testing::{attention_reference, AttentionShape};

    #[test]
    fn attention_matches_the_exact_core_within_its_bound() {
        // (b, lq, lk, heads, dh, mask, scale on the scores, spread of the inputs)
        type Case = (usize, usize, usize, usize, usize, Option<fn(usize, usize) -> u8>, bool, f32);
        let cases: [Case; 4] = [
            (2, 20, 40, 2, 8, Some(|b, j| u8::from(b == 0 && j % 3 != 1)), false, 1.0),
            (1, 17, 70, 3, 33, None, true, 1.0),
            (2, 5, 1, 1, 64, Some(|_, _| 1), false, 1.0),
            (1, 16, 64, 2, 64, Some(|_, j| u8::from(j >= 40)), true, 3.0),
        ];
        for (n, (b, lq, lk, heads, dh, mask, scale_scores, spread)) in cases.into_iter().enumerate()
        {
            let d = heads * dh;
            let seed = 70 + 3 * n as u64;
            let (q, k, v) = (
                random(b * lq * d, seed, spread),
                random(b * lk * d, seed + 1, spread),
                random(b * lk * d, seed + 2, 1.0),
            );
            let mask: Option<Vec<u8>> =
                mask.map(|f| (0..b * lk).map(|e| f(e / lk, e % lk)).collect());
            let scale = 1.0 / (dh as f32).sqrt();
            let (mask_decl, mask_arg) = match &mask {
                Some(m) => {
                    let items: Vec<String> = m.iter().map(u8::to_string).collect();
                    (format!("static unsigned char mask[] = {{{}}};", items.join(",")), "mask")
                }
                None => (String::new(), "nullptr"),
            };
            let body = format!(
                "{mask_decl} static float out[{total}];
                 glip_launch({gx}, {gy}, 128, [] {{ glip_attention(q, k, v, {mask_arg}, out,
                     {heads}, {lq}, {lk}, {dh}, {d}, {d}, {d}, {scale:e}f, {flag}); }});
                 glip_print(\"out\", out, {total});",
                total = b * lq * d,
                gx = lq.div_ceil(ATTENTION_QUERY_TILE),
                gy = b * heads,
                flag = u32::from(scale_scores),
            );
            let arrays = [("q", q.clone()), ("k", k.clone()), ("v", v.clone())];
            let Some(out) = emulate(ATTENTION, &arrays, &body) else {
                return;
            };
            let shape = AttentionShape { b, lq, lk, heads, dh };
            let (exact, bound) =
                attention_reference(&q, &k, &v, mask.as_deref(), shape, scale, ATTENTION_KEY_TILE);
            let max_v = v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
            let mut margin = 0.0f64;
            for (e, ((&got, &want), &bound)) in
                out["out"].iter().zip(&exact).zip(&bound).enumerate()
            {
                let err = (f64::from(got) - want).abs();
                assert!(
                    err <= bound,
                    "case {n}, element {e}: {got} against {want}, bound {bound:e}"
                );
                // Not vacuous: a lost key or a wrong weight moves an output by far more.
                assert!(bound <= 1e-3 * max_v, "case {n}: bound {bound:e}");
                margin = margin.max(err / bound);
            }
            eprintln!("attention case {n}: largest error / bound {margin:.4}");
        }
    }

    /// q, k and v as column blocks of one packed projection `(b, l, 3d)` (rows `3d` apart, the
    /// blocks `d` apart), as self-attention reads them: the same core as from three tensors.
    #[test]
    fn attention_reads_q_k_v_out_of_a_packed_projection() {
        let (b, l, heads, dh) = (2usize, 20usize, 2usize, 16usize);
        let d = heads * dh;
        let qkv = random(b * l * 3 * d, 90, 1.0);
        let block = |i: usize| -> Vec<f32> {
            qkv.chunks(3 * d).flat_map(|row| row[i * d..(i + 1) * d].to_vec()).collect()
        };
        let (q, k, v) = (block(0), block(1), block(2));
        let scale = 1.0 / (dh as f32).sqrt();
        let body = format!(
            "static float out[{total}];
             glip_launch({gx}, {gy}, 128, [] {{ glip_attention(qkv, qkv + {d}, qkv + {two_d},
                 nullptr, out, {heads}, {l}, {l}, {dh}, {ld}, {ld}, {ld}, {scale:e}f, 0); }});
             glip_print(\"out\", out, {total});",
            total = b * l * d,
            gx = l.div_ceil(ATTENTION_QUERY_TILE),
            gy = b * heads,
            two_d = 2 * d,
            ld = 3 * d,
        );
        let Some(out) = emulate(ATTENTION, &[("qkv", qkv.clone())], &body) else {
            return;
        };
        let shape = AttentionShape { b, lq: l, lk: l, heads, dh };
        let (exact, bound) =
            attention_reference(&q, &k, &v, None, shape, scale, ATTENTION_KEY_TILE);
        for (e, ((&got, &want), &bound)) in out["out"].iter().zip(&exact).zip(&bound).enumerate() {
            let err = (f64::from(got) - want).abs();
            assert!(err <= bound, "element {e}: {got} against {want}, bound {bound:e}");
        }
    }
}

#[cfg(test)]
mod emulation_deformable {
    //! Deformable sampling's kernels under the emulation against exact values within the
    //! bound derived in glip-testing's `deformable_reference` (any f32 evaluation order, as the
    //! value gradient's atomic additions have): two levels, samples inside, on the border,
    //! outside and on whole-number coordinates, a non-finite one, grids smaller than the work
    //! (the grid-stride loops).

    use super::emulation::emulate;
    use super::DEFORMABLE;
    use glip_testing::{assert_within_bound, DeformableCase, DeformableShape};

    #[test]
    fn deformable_sampling_and_its_gradients_match_exact_values_within_their_bound() {
        let levels = [(3, 4, 0), (2, 3, 12)];
        let tokens = 18;
        let shape = DeformableShape { bh: 3, q: 5, points: 3, dh: 7, levels: &levels };
        let DeformableShape { bh, q, points, dh, .. } = shape;
        let per_query = levels.len() * points;
        let case = DeformableCase::new(shape, 31);
        let (n_out, n_smp) = (bh * q * dh, bh * q * per_query);
        let hws: Vec<String> = levels.iter().map(|(h, w, s)| format!("{h}, {w}, {s}")).collect();
        let body = format!(
            "GlipLevels lv = {{{nl}, {{{hws}}}}};
             static float out[{n_out}], gv[{n_gv}], gs[{n_gs}];
             glip_launch(2, 1, 32, [&] {{ glip_deformable_sample(value, samples, lv, out,
                 {tokens}, {dh}, {q}, {points}, {n_out}ull); }});
             glip_launch(2, 1, 32, [&] {{ glip_deformable_value_grad(samples, grad, lv, gv,
                 {tokens}, {dh}, {q}, {points}, {n_out}ull); }});
             glip_launch(1, 1, 32, [&] {{ glip_deformable_sample_grad(value, samples, grad, lv,
                 gs, {tokens}, {dh}, {q}, {points}, {n_smp}ull); }});
             glip_print(\"out\", out, {n_out});
             glip_print(\"gv\", gv, {n_gv});
             glip_print(\"gs\", gs, {n_gs});",
            nl = levels.len(),
            hws = hws.join(", "),
            n_gv = bh * tokens * dh,
            n_gs = n_smp * 3,
        );
        let arrays = [
            ("value", case.value.clone()),
            ("samples", case.samples.clone()),
            ("grad", case.grad.clone()),
        ];
        let Some(got) = emulate(DEFORMABLE, &arrays, &body) else {
            return;
        };
        let exact = case.exact();
        for (name, want) in
            [("out", &exact.out), ("gv", &exact.grad_value), ("gs", &exact.grad_samples)]
        {
            let margin = assert_within_bound(name, &got[name], want);
            // Not vacuous: a misread token or a wrong factor moves a value by far more.
            let largest =
                want.bound.iter().filter(|b| b.is_finite()).fold(0.0f64, |a, &b| a.max(b));
            assert!(largest < 1e-4, "{name}: bound {largest:e}");
            let nans = got[name].iter().filter(|v| v.is_nan()).count();
            let expected = match name {
                "out" => dh,
                "gs" => 3,
                _ => 0,
            };
            assert_eq!(nans, expected, "{name}: NaN entries");
            eprintln!("deformable {name}: largest error / bound {margin:.4}");
        }
    }
}

/// Every kernel with its parameters as Rust types: what the `cuda` build launches through.
pub(crate) mod kernels;

/// Every kernel run on the CPU within its contract's buffer lengths.
#[cfg(test)]
mod emulation_contracts;

/// NVRTC and ptxas on every module, without a GPU (skipped where no CUDA toolkit is installed).
#[cfg(all(test, target_os = "linux"))]
mod nvrtc;
