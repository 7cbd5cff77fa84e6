//! The workspace's candle-core carries three patches to its CPU backend (vendor/README.md), checked
//! here for what they must keep.
//!
//! `candle-core-threads.patch` splits large element-wise maps (64 Ki values and up) over the
//! rayon pool the caller is in instead of candle's own barrier pool: every output value written
//! exactly once, by the same arithmetic, whatever the number of threads, the tensor's size (on
//! and either side of the 64 Ki threshold, a last chunk of 16 Ki values that is short) and the
//! operands' layouts (contiguous, broadcast, transposed). Element-wise f32 negation, squaring,
//! addition and multiplication are exactly rounded, so the expected values are the same
//! operations on the values read back, compared bit for bit.
//!
//! `candle-core-matmul.patch` computes a batched matrix product's products in parallel, each on
//! one thread, where the batch splits over the threads: each must be the same gemm of the same
//! operands as the product of that batch element alone (whose gemm splits over the threads; its
//! sums run over `k` in one order either way), compared bit for bit. It also leaves the output
//! unzeroed for gemm to write: every value of it must be written, whatever the shape (checked
//! against f64 sums within f32's summation bound, on memory left full of NaN).
//!
//! `candle-core-reduce.patch` sums a contiguous tensor over dims that are not the last ones a
//! block of the trailing dims at a time, and over dims that end with the last one but are not
//! all the trailing ones (a convolution bias's gradient) a run of the trailing reduced dims at
//! a time: each sum must take the same terms in the same order as before (source order), so it
//! is compared bit for bit with that sum written out.

use candle_core::{Device, Result, Tensor};
use glip_testing::lcg_values as values;

/// Shapes of 65,535, 65,536, 82,173 and 1,007,287 values: one below candle's threshold for a
/// parallel map, one on it, and two whose last chunk of 16,384 values is short.
const SHAPES: [(usize, usize); 4] = [(257, 255), (256, 256), (301, 273), (1031, 977)];

fn matrix(rows: usize, cols: usize, seed: u32) -> Result<Tensor> {
    Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu)
}

/// `got` against `f(i, j)` at every position, bit for bit.
fn assert_each(what: &str, got: &Tensor, f: impl Fn(usize, usize) -> f32) -> Result<()> {
    for (i, row) in got.to_vec2::<f32>()?.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let want = f(i, j);
            assert!(v.to_bits() == want.to_bits(), "{what} at ({i}, {j}): {v} against {want}");
        }
    }
    Ok(())
}

fn check_maps(rows: usize, cols: usize) -> Result<()> {
    let what =
        |op: &str| format!("{op} on {rows} x {cols}, {} threads", rayon::current_num_threads());
    let a = matrix(rows, cols, 1)?;
    let b = matrix(rows, cols, 2)?;
    let at = matrix(cols, rows, 3)?; // read through its transpose: a strided operand
    let bias = matrix(1, cols, 4)?;
    let scale = matrix(rows, 1, 5)?;
    let (va, vb) = (a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
    let (vt, vbias, vscale) =
        (at.to_vec2::<f32>()?, bias.to_vec2::<f32>()?, scale.to_vec2::<f32>()?);

    assert_each(&what("neg"), &a.neg()?, |i, j| -va[i][j])?;
    assert_each(&what("sqr"), &a.sqr()?, |i, j| va[i][j] * va[i][j])?;
    assert_each(&what("add"), &(&a + &b)?, |i, j| va[i][j] + vb[i][j])?;
    assert_each(&what("mul"), &(&a * &b)?, |i, j| va[i][j] * vb[i][j])?;
    assert_each(&what("broadcast add (row)"), &a.broadcast_add(&bias)?, |i, j| {
        va[i][j] + vbias[0][j]
    })?;
    assert_each(&what("broadcast mul (column)"), &a.broadcast_mul(&scale)?, |i, j| {
        va[i][j] * vscale[i][0]
    })?;
    assert_each(&what("add (transposed lhs)"), &(at.t()? + &b)?, |i, j| vt[j][i] + vb[i][j])?;
    assert_each(&what("sqr (transposed)"), &at.t()?.sqr()?, |i, j| vt[j][i] * vt[j][i])?;
    Ok(())
}

#[test]
fn large_element_wise_maps_write_every_value_once_on_any_pool() -> Result<()> {
    for threads in [1, 2, 3, 7] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (rows, cols) in SHAPES {
            pool.install(|| check_maps(rows, cols))?;
        }
    }
    Ok(())
}

/// `x`'s sum over `dims` (keeping them), added up in source order, each value's terms one
/// after another from zero: candle's order, except over all the trailing dims (its own
/// vectorised path, not patched, not tested here).
fn sum_in_source_order(x: &[f32], shape: &[usize], dims: &[usize]) -> Vec<f32> {
    let out: Vec<usize> =
        shape.iter().enumerate().map(|(d, &n)| if dims.contains(&d) { 1 } else { n }).collect();
    let mut sums = vec![0f32; out.iter().product()];
    for (i, &v) in x.iter().enumerate() {
        let (mut rest, mut at, mut step) = (i, 0, 1);
        for d in (0..shape.len()).rev() {
            let index = rest % shape[d];
            rest /= shape[d];
            at += if dims.contains(&d) { 0 } else { index * step };
            step *= out[d];
        }
        sums[at] += v;
    }
    sums
}

#[test]
fn sums_over_leading_and_middle_dims_keep_their_order() -> Result<()> {
    let cases: [(&[usize], &[usize]); 13] = [
        (&[4, 5, 6, 7], &[0]),
        (&[4, 5, 6, 7], &[1]),
        (&[4, 5, 6, 7], &[0, 1]),
        (&[4, 5, 6, 7], &[0, 2]),
        (&[4, 5, 6, 7], &[1, 2]),
        (&[4, 5, 6, 7], &[0, 1, 2]),
        (&[4, 5, 6, 7], &[0, 3]), // the last dim among them: runs of 7
        (&[4, 5, 6, 7], &[1, 3]),
        (&[4, 5, 6, 7], &[0, 2, 3]),  // runs of 42
        (&[8, 16, 9, 9], &[0, 2, 3]), // a convolution bias's gradient
        (&[2, 3, 0], &[0, 2]),        // empty: no runs
        (&[64, 33, 96], &[0, 1]),     // a linear layer's bias gradient
        (&[3, 1, 8], &[1]),           // a reduced dim of one
    ];
    for (seed, (shape, dims)) in (10..).zip(cases) {
        let n = shape.iter().product();
        let data = values(n, seed);
        let x = Tensor::from_vec(data.clone(), shape, &Device::Cpu)?;
        let got = x.sum_keepdim(dims)?.flatten_all()?.to_vec1::<f32>()?;
        let want = sum_in_source_order(&data, shape, dims);
        assert_eq!(got.len(), want.len(), "{shape:?} over {dims:?}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{shape:?} over {dims:?} at {i}: {g} against {w}");
        }
    }
    Ok(())
}

#[test]
fn batched_products_are_each_batch_elements_product_on_any_pool() -> Result<()> {
    // (batch, m, k, n): an attention's heads, a batch that does not split evenly, one of
    // fewer elements than threads, odd sizes.
    let shapes = [(32, 40, 32, 40), (6, 5, 7, 3), (3, 64, 16, 64), (33, 17, 9, 21)];
    for threads in [1, 2, 3, 7] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (seed, (b, m, k, n)) in (20..).zip(shapes) {
            pool.install(|| -> Result<()> {
                let dev = Device::Cpu;
                let a = Tensor::from_vec(values(b * m * k, seed), (b, m, k), &dev)?;
                let c = Tensor::from_vec(values(b * n * k, seed + 1), (b, n, k), &dev)?;
                // The right operand read through its transpose, as attention's `q @ k^T`.
                let got = a.matmul(&c.transpose(1, 2)?)?;
                for i in 0..b {
                    let want = a.get(i)?.matmul(&c.get(i)?.t()?)?;
                    let (g, w) = (got.get(i)?.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
                    for (r, (gr, wr)) in g.iter().zip(&w).enumerate() {
                        for (j, (x, y)) in gr.iter().zip(wr).enumerate() {
                            assert!(
                                x.to_bits() == y.to_bits(),
                                "{b} x {m} x {k} x {n}, {threads} threads, element {i} at ({r}, \
                                 {j}): {x} against {y}"
                            );
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// `a @ b` for `a (bs, m, k)` and `b (bs or 1, k, n)` in f64 from the same f32 values, with
/// each sum's `sum |a_ik b_kj|` for its error bound.
fn exact_products(
    a: &[f32],
    b: &[f32],
    (bs, m, k, n): (usize, usize, usize, usize),
    shared: bool,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(bs * m * n);
    for e in 0..bs {
        let (ae, be) = (&a[e * m * k..], &b[if shared { 0 } else { e * k * n }..]);
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|t| ae[i * k + t] as f64 * be[t * n + j] as f64);
                out.push(terms.clone().fold((0.0, 0.0), |(s, abs), v| (s + v, abs + v.abs())));
            }
        }
    }
    out
}

#[test]
fn products_write_every_output_value_of_any_shape() -> Result<()> {
    // (batch, m, k, n, right operand shared by the batch): gemm's general kernels, its vector
    // paths (one row, one column), batches split over the threads or not, a shared right
    // operand (candle folds the batch into the rows of one product), no inner dimension (zeros)
    // and no rows at all (an empty output).
    let shapes = [
        (1, 1, 17, 9, false),
        (4, 13, 17, 1, false),
        (6, 5, 7, 3, false),
        (3, 64, 16, 64, false),
        (5, 33, 40, 29, true),
        (8, 9, 11, 10, true),
        (4, 6, 0, 5, false),
        (4, 0, 5, 3, false),
    ];
    // u = 2^-24, f32's unit roundoff: a sum of k exact f64 products of f32 values, rounded to
    // f32 after each of its k operations (any order, with or without FMA), is within
    // gamma_k * sum |a_ik b_kj| of the exact sum, gamma_k = k u / (1 - k u) (Higham, 3.1).
    let u = f64::from(f32::EPSILON) / 2.0;
    for threads in [1, 2, 3, 7] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (seed, (bs, m, k, n, shared)) in (40..).zip(shapes) {
            pool.install(|| -> Result<()> {
                let dev = Device::Cpu;
                let (av, bv) = (
                    values(bs * m * k, seed),
                    values(if shared { 1 } else { bs } * k * n, seed + 1),
                );
                let a = Tensor::from_vec(av.clone(), (bs, m, k), &dev)?;
                // Memory a vector of the output's size left behind (the test binary's allocator
                // hands small blocks back): an output value the product does not write reads NaN.
                drop(vec![f32::NAN; bs * m * n]);
                let got = if shared {
                    a.broadcast_matmul(&Tensor::from_vec(bv.clone(), (k, n), &dev)?)?
                } else {
                    a.matmul(&Tensor::from_vec(bv.clone(), (bs, k, n), &dev)?)?
                };
                assert_eq!(got.dims(), [bs, m, n]);
                let gamma = k as f64 * u / (1.0 - k as f64 * u);
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                for (idx, (g, (exact, abs))) in
                    got.iter().zip(exact_products(&av, &bv, (bs, m, k, n), shared)).enumerate()
                {
                    let err = (*g as f64 - exact).abs();
                    assert!(
                        err <= gamma * abs,
                        "{bs} x {m} x {k} x {n} (shared {shared}), {threads} threads, value {idx}: \
                         {g} against {exact} (bound {})",
                        gamma * abs
                    );
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}
