//! The three products of a linear layer as column-major BLAS calls (cuBLAS's convention), for
//! row-major buffers: `x (m, k)`, `w (n, k)`, `dy (m, n)`. A row-major `(r, c)` buffer is a
//! column-major `(c, r)` matrix with leading dimension `c`, so each product is computed
//! transposed:
//!
//! * `y = x w^T (m, n)`: `y^T (n, m) = op_T(w as (k, n)) (x as (k, m))`;
//! * `dx = dy w (m, k)`: `dx^T (k, m) = (w as (k, n)) (dy as (n, m))`;
//! * `dw = dy^T x (n, k)`: `dw^T (k, n) = (x as (k, m)) op_T(dy as (n, m))`.
//!
//! Compiled in every build so that the CPU tests the arguments against a column-major
//! reference (`cuda_linear` passes them to cuBLAS).

#![cfg_attr(
    not(feature = "cuda"),
    allow(dead_code, reason = "used by the cuda build, tested in every build")
)]

/// A linear layer's operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operand {
    /// The input `x (m, k)`.
    X,
    /// The weight `w (n, k)`.
    W,
    /// The output's gradient `dy (m, n)`.
    Dy,
}

/// Which product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// `y = x w^T`.
    Forward,
    /// `dx = dy w`.
    InputGrad,
    /// `dw = dy^T x`.
    WeightGrad,
}

/// `c = op(a) op(b)`, column-major, `op(a)` `(rows, inner)`, `op(b)` `(inner, cols)`, `c`'s
/// leading dimension `rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColMajor {
    pub(crate) a: Operand,
    pub(crate) transpose_a: bool,
    pub(crate) lda: usize,
    pub(crate) b: Operand,
    pub(crate) transpose_b: bool,
    pub(crate) ldb: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) inner: usize,
}

/// The column-major call computing `product` for `x (m, k)`, `w (n, k)`, `dy (m, n)`; its
/// result, read row-major, is `y (m, n)`, `dx (m, k)` or `dw (n, k)`.
pub(crate) fn plan(product: Product, m: usize, n: usize, k: usize) -> ColMajor {
    use Operand::{Dy, W, X};
    let call = |a, transpose_a, lda, b, transpose_b, ldb, (rows, cols, inner)| ColMajor {
        a,
        transpose_a,
        lda,
        b,
        transpose_b,
        ldb,
        rows,
        cols,
        inner,
    };
    match product {
        Product::Forward => call(W, true, k, X, false, k, (n, m, k)),
        Product::InputGrad => call(W, false, k, Dy, false, n, (k, m, n)),
        Product::WeightGrad => call(X, false, k, Dy, true, n, (k, n, m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS's `gemm` by its definition: `c[i + j ldc] = sum_l op(a)[i, l] op(b)[l, j]` with
    /// column-major `a`, `b` (`op` transposes), `ldc = rows`.
    fn col_major(p: &ColMajor, a: &[f64], b: &[f64]) -> Vec<f64> {
        let at =
            |i: usize, l: usize| if p.transpose_a { a[l + i * p.lda] } else { a[i + l * p.lda] };
        let bt =
            |l: usize, j: usize| if p.transpose_b { b[j + l * p.ldb] } else { b[l + j * p.ldb] };
        let mut c = vec![0.0; p.rows * p.cols];
        for j in 0..p.cols {
            for i in 0..p.rows {
                c[i + j * p.rows] = (0..p.inner).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    /// Each plan, run by the column-major definition on the row-major buffers, gives the
    /// row-major product it names, exactly (small integers: every sum is exact in f64).
    #[test]
    fn each_plan_computes_its_row_major_product() {
        let (m, n, k) = (5usize, 3usize, 4usize);
        let fill = |len: usize, seed: usize| -> Vec<f64> {
            (0..len).map(|i| ((i * 7 + seed * 3) % 11) as f64 - 5.0).collect()
        };
        let (x, w, dy) = (fill(m * k, 1), fill(n * k, 2), fill(m * n, 3));
        let buffer = |o: Operand| match o {
            Operand::X => &x,
            Operand::W => &w,
            Operand::Dy => &dy,
        };
        let run = |p: Product| {
            let plan = plan(p, m, n, k);
            col_major(&plan, buffer(plan.a), buffer(plan.b))
        };
        // The products by their definitions, row-major.
        let mut y = vec![0.0; m * n];
        let mut dx = vec![0.0; m * k];
        let mut dw = vec![0.0; n * k];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    y[i * n + j] += x[i * k + l] * w[j * k + l];
                    dx[i * k + l] += dy[i * n + j] * w[j * k + l];
                    dw[j * k + l] += dy[i * n + j] * x[i * k + l];
                }
            }
        }
        assert_eq!(run(Product::Forward), y, "y = x w^T");
        assert_eq!(run(Product::InputGrad), dx, "dx = dy w");
        assert_eq!(run(Product::WeightGrad), dw, "dw = dy^T x");
    }

    /// Every operand is read within its buffer: the last element a plan can address is the
    /// last of the buffer.
    #[test]
    fn plans_stay_inside_their_operands() {
        let (m, n, k) = (6usize, 2usize, 9usize);
        let len = |o: Operand| match o {
            Operand::X => m * k,
            Operand::W => n * k,
            Operand::Dy => m * n,
        };
        for p in [Product::Forward, Product::InputGrad, Product::WeightGrad] {
            let c = plan(p, m, n, k);
            let (ar, ac) = if c.transpose_a { (c.inner, c.rows) } else { (c.rows, c.inner) };
            let (br, bc) = if c.transpose_b { (c.cols, c.inner) } else { (c.inner, c.cols) };
            assert!(c.lda >= ar && c.ldb >= br, "{p:?}: leading dimensions");
            assert_eq!(c.lda * ac, len(c.a), "{p:?}: a");
            assert_eq!(c.ldb * bc, len(c.b), "{p:?}: b");
        }
    }
}
