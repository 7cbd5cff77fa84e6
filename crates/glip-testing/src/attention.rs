//! The exact value of multi-head attention's core and the error bound of an f32 kernel that
//! computes it with an online softmax over tiles of keys (glip-kernels' `glip_attention`),
//! shared by the kernel's test under the CPU emulation and its test on the GPU.

/// The shapes of an attention core: `q (b, lq, heads dh)`, `k`, `v (b, lk, heads dh)`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Batch.
    pub b: usize,
    /// Query rows.
    pub lq: usize,
    /// Keys.
    pub lk: usize,
    /// Heads.
    pub heads: usize,
    /// Head width.
    pub dh: usize,
}

/// `gamma(n) = n u / (1 - n u)`, `u` f32's unit round-off: the relative bound on an f32 sum of
/// `n` terms (or a product of `n` factors) against the sum of the terms' magnitudes.
pub(crate) fn gamma(n: usize) -> f64 {
    let nu = n as f64 * crate::F32_UNIT_ROUNDOFF;
    nu / (1.0 - nu)
}

/// `softmax(q k^T s + bias) v` per head in f64 from the f32 operands (the same whether `scale`
/// multiplies the query or the scores, and so is the bound; `mask` `(b, lk)`, 0 masking a key, as the f32
/// computation's bias of `f32::MIN` does: no weight, or, where a row masks every key, equal
/// weights on all of them), and per output the bound on an f32 computation over tiles of
/// `key_tile` keys, `(b, lq, heads dh)` each.
///
/// The bound, per output `o_c = sum_j P_j v_jc` of a row attending to keys `J` (`T` tiles,
/// unit round-off `u`, `g(n) = n u / (1 - n u)`):
/// * each f32 score is a sum of `dh` products with one scaling, off by at most
///   `D = g(dh + 1) max_j s sum_c |q_c k_jc|`; perturbed scores move every weight by a factor
///   within `exp(+-2D)`: `(exp(2D) - 1)` of `sum_j P_j |v_jc|`;
/// * each weight `exp(s_j - m)` has its argument rounded (`u M`, `M` the largest
///   `max s - s_j` over `J`, plus `2D`) and `expf`'s error (CUDA: 2 ulp, `4u`), a product with
///   `v` (`u`), and is rescaled by at most `T` factors `exp(m_old - m_new)`, each with the same
///   errors and a rounded product: `e_w = (T + 1)(6u + u M)` relative;
/// * the numerator sums at most `lk` terms in a chain (`g(lk)`), the denominator `lk + T`
///   (`g(lk + T)`), and the quotient rounds once (`u`);
///
/// so `|o - exact| <= e (1 + e)^2 sum_j P_j |v_jc| + 2 lk 2^-126 max|v|` with
/// `e = exp(2D) - 1 + 2 e_w + g(lk) + g(lk + T) + u` (the last term: weights under f32's
/// smallest normal flushed to zero). A masked key's weight is exactly 0 (`exp` of about
/// `-3.4e38`), and a row masking every key has every score exactly `f32::MIN` (weights 1).
pub fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[u8]>,
    shape: AttentionShape,
    scale: f32,
    key_tile: usize,
) -> (Vec<f64>, Vec<f64>) {
    let AttentionShape { b, lq, lk, heads, dh } = shape;
    let d = heads * dh;
    let u = crate::F32_UNIT_ROUNDOFF;
    let tiles = lk.div_ceil(key_tile);
    let (mut exact, mut bound) = (vec![0.0; b * lq * d], vec![0.0; b * lq * d]);
    let max_v = v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    for bi in 0..b {
        let attended: Vec<usize> = match mask {
            Some(m) if (0..lk).any(|j| m[bi * lk + j] != 0) => {
                (0..lk).filter(|&j| m[bi * lk + j] != 0).collect()
            }
            _ => (0..lk).collect(),
        };
        let all_masked = mask.is_some_and(|m| (0..lk).all(|j| m[bi * lk + j] == 0));
        for h in 0..heads {
            for i in 0..lq {
                let qr = &q[(bi * lq + i) * d + h * dh..][..dh];
                let key = |j: usize| &k[(bi * lk + j) * d + h * dh..][..dh];
                let s = f64::from(scale);
                // Each attended key's score and the sum of its products' magnitudes.
                let (scores, magnitudes): (Vec<f64>, Vec<f64>) = attended
                    .iter()
                    .map(|&j| {
                        let products =
                            qr.iter().zip(key(j)).map(|(&a, &c)| f64::from(a) * f64::from(c));
                        let (dot, mag) =
                            products.fold((0.0, 0.0), |(d, m), p| (d + p, m + p.abs()));
                        (dot * s, mag * s)
                    })
                    .unzip();
                let magnitude = magnitudes.into_iter().fold(0.0f64, f64::max);
                let (scores, delta) = if all_masked {
                    (vec![0.0; attended.len()], 0.0)
                } else {
                    (scores, gamma(dh + 1) * magnitude)
                };
                let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let spread = scores.iter().map(|&x| top - x).fold(0.0f64, f64::max) + 2.0 * delta;
                let weights: Vec<f64> = scores.iter().map(|&x| (x - top).exp()).collect();
                let total: f64 = weights.iter().sum();
                let e_w = (tiles as f64 + 1.0) * (6.0 * u + u * spread);
                let e = (2.0 * delta).exp_m1() + 2.0 * e_w + gamma(lk) + gamma(lk + tiles) + u;
                for c in 0..dh {
                    let (mut o, mut mag) = (0.0, 0.0);
                    for (&j, &w) in attended.iter().zip(&weights) {
                        let x = f64::from(v[(bi * lk + j) * d + h * dh + c]);
                        o += w / total * x;
                        mag += w / total * x.abs();
                    }
                    let at = (bi * lq + i) * d + h * dh + c;
                    exact[at] = o;
                    bound[at] = e * (1.0 + e) * (1.0 + e) * mag
                        + 2.0 * lk as f64 * f64::from(f32::MIN_POSITIVE) * max_v;
                }
            }
        }
    }
    (exact, bound)
}
