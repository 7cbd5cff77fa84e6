//! The workspace builds candle-core with one patch to its backward pass (vendor/README.md): a
//! tensor's first gradient contribution is stored as it is instead of being added to a tensor
//! of zeros. These check what the patch must keep: the gradients' values (exact: each is a
//! product or a sum of exact small integers times one random factor, so any change of sign,
//! lost or doubled contribution shows), that a gradient is contiguous even when its one
//! contribution was a strided view (glip's kernels take contiguous operands), and that two
//! gradients that came from one contribution do not share a buffer that the optimiser's in-place
//! updates could write twice. The patch's later parts: a narrow's contributions written into one
//! zeroed buffer in place where their ranges are disjoint (else summed as before), and no
//! gradient computed for an operand that does not track one.

use candle_core::{Device, Result, Tensor, Var, D};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()
}

#[test]
fn first_contributions_keep_their_sign_and_value() -> Result<()> {
    let dev = Device::Cpu;
    let a = Var::randn(0f32, 1., (3, 4), &dev)?;
    let b = Var::randn(0f32, 1., (3, 4), &dev)?;
    let r = Tensor::randn(0f32, 1., (3, 4), &dev)?;
    // d/da sum((a - b) r) = r, d/db = -r: the subtraction's first contribution is negated.
    let g = ((a.as_tensor() - b.as_tensor())? * &r)?.sum_all()?.backward()?;
    assert_eq!(max_abs_diff(g.get(&a).unwrap(), &r)?, 0.0);
    assert_eq!(max_abs_diff(g.get(&b).unwrap(), &r.neg()?)?, 0.0);
    // A tensor used twice gets both contributions: d/da sum((a + a) r) = 2 r.
    let g = ((a.as_tensor() + a.as_tensor())? * &r)?.sum_all()?.backward()?;
    assert_eq!(max_abs_diff(g.get(&a).unwrap(), &(&r * 2.)?)?, 0.0);
    // Broadcast: a (4,) bias added to 3 rows gets the sum over the rows.
    let bias = Var::randn(0f32, 1., 4, &dev)?;
    let g = (a.as_tensor().broadcast_add(bias.as_tensor())? * &r)?.sum_all()?.backward()?;
    assert!(max_abs_diff(g.get(&bias).unwrap(), &r.sum(0)?)? <= 1e-6);
    Ok(())
}

#[test]
fn a_gradient_from_a_strided_view_is_contiguous() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::randn(0f32, 1., (3, 5), &dev)?;
    let r = Tensor::randn(0f32, 1., (5, 3), &dev)?;
    // w's only contribution is the transpose of r: a strided view before it is stored.
    let g = (w.as_tensor().t()? * &r)?.sum_all()?.backward()?;
    let gw = g.get(&w).unwrap();
    assert!(gw.is_contiguous(), "the stored gradient is a strided view");
    assert_eq!(max_abs_diff(gw, &r.t()?)?, 0.0);
    Ok(())
}

/// Small integers as f32: every sum and product of a few of them is exact.
fn integers(shape: (usize, usize), dev: &Device) -> Result<Tensor> {
    (Tensor::randn(0f32, 3., shape, dev)?).round()
}

/// `sum(narrow(p, dim, start, len) * r)` for each `(dim, start, len, r)`.
fn narrowed_loss(p: &Tensor, parts: &[(usize, usize, usize, &Tensor)]) -> Result<Tensor> {
    let mut total = Tensor::zeros((), candle_core::DType::F32, p.device())?;
    for &(dim, start, len, r) in parts {
        total = (total + (p.narrow(dim, start, len)? * r)?.sum_all()?)?;
    }
    Ok(total)
}

/// The gradient `narrowed_loss` should give: each `r` added into its range of zeros.
fn expected(shape: (usize, usize), parts: &[(usize, usize, usize, &Tensor)]) -> Result<Vec<f32>> {
    let (rows, cols) = shape;
    let mut g = vec![0f32; rows * cols];
    for &(dim, start, _, r) in parts {
        let rv: Vec<Vec<f32>> = r.to_vec2()?;
        for (i, row) in rv.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let (a, b) = if dim == 0 { (start + i, j) } else { (i, start + j) };
                g[a * cols + b] += v;
            }
        }
    }
    Ok(g)
}

/// A parameter narrowed several times (the q, k and v blocks of an attention's packed
/// projection; a gap left untouched; overlapping ranges; the other axis; a range spanning the
/// axis) gets the exact sum of its contributions, zeros elsewhere, in a contiguous buffer of
/// its own.
#[test]
fn narrow_contributions_sum_exactly_in_any_arrangement() -> Result<()> {
    let dev = Device::Cpu;
    let shape = (9, 4);
    let p = Var::from_tensor(&integers(shape, &dev)?)?;
    let r = |rows, cols| integers((rows, cols), &dev);
    let (a, b, c) = (r(3, 4)?, r(3, 4)?, r(3, 4)?);
    let (wide, whole, cols) = (r(5, 4)?, r(9, 4)?, r(9, 2)?);
    let cases: Vec<Vec<(usize, usize, usize, &Tensor)>> = vec![
        // Disjoint thirds, in order and out of order.
        vec![(0, 0, 3, &a), (0, 3, 3, &b), (0, 6, 3, &c)],
        vec![(0, 6, 3, &c), (0, 0, 3, &a), (0, 3, 3, &b)],
        // A gap between two ranges stays zero.
        vec![(0, 0, 3, &a), (0, 6, 3, &c)],
        // Overlapping ranges sum where they overlap.
        vec![(0, 0, 3, &a), (0, 1, 5, &wide), (0, 6, 3, &c)],
        // The same range twice.
        vec![(0, 3, 3, &b), (0, 3, 3, &a)],
        // The other axis, then rows: a second axis takes the general path.
        vec![(1, 1, 2, &cols), (0, 0, 3, &a), (0, 3, 3, &b)],
        // A narrow spanning the axis (a whole-tensor contribution) among partial ones.
        vec![(0, 0, 3, &a), (0, 0, 9, &whole), (0, 6, 3, &c)],
        vec![(0, 0, 9, &whole), (0, 0, 3, &a)],
    ];
    for (k, parts) in cases.iter().enumerate() {
        let g = narrowed_loss(p.as_tensor(), parts)?.backward()?;
        let gp = g.get(&p).expect("the parameter's gradient");
        assert!(gp.is_contiguous(), "case {k}: a strided gradient");
        let got: Vec<f32> = gp.flatten_all()?.to_vec1()?;
        assert_eq!(got, expected(shape, parts)?, "case {k}");
    }
    // A direct use of the parameter besides its narrows: the sum of both.
    let direct = r(9, 4)?;
    let loss = (narrowed_loss(p.as_tensor(), &[(0, 0, 3, &a), (0, 3, 3, &b)])?
        + (p.as_tensor() * &direct)?.sum_all()?)?;
    let g = loss.backward()?;
    let mut want = expected(shape, &[(0, 0, 3, &a), (0, 3, 3, &b)])?;
    let dv: Vec<f32> = direct.flatten_all()?.to_vec1()?;
    want.iter_mut().zip(&dv).for_each(|(w, d)| *w += d);
    assert_eq!(g.get(&p).unwrap().flatten_all()?.to_vec1::<f32>()?, want);
    Ok(())
}

/// An operand that tracks no gradient (a dropout mask, a constant, a condition's branch) gets
/// none, and the tracked one's is unchanged: `x * m`, `x / m`, `m / x`, `max(x, m)`, `x @ m`,
/// `m @ x` and `where(c, x, m)`.
#[test]
fn untracked_operands_get_no_gradient() -> Result<()> {
    let dev = Device::Cpu;
    // Integers in 5..=15: never zero (`m / x`'s gradient divides by `x^2`; unclamped, a draw of
    // -10 from the unseeded normal made it infinite and the difference NaN, about 1 run in 200).
    let x = Var::from_tensor(&(integers((3, 3), &dev)?.clamp(-5f32, 5f32)? + 10.)?)?;
    let xt = x.as_tensor();
    // Never equal to x (a maximum's gradient halves at ties): x plus or minus a half.
    let half = Tensor::new(&[[0.5f32, -0.5, 0.5], [-0.5, 0.5, -0.5], [0.5, -0.5, 0.5]], &dev)?;
    let m = (xt.detach() + half)?;
    let cond = xt.ge(10.)?;
    type Case<'a> = (&'a str, Tensor, Tensor);
    let ones = Tensor::ones((3, 3), candle_core::DType::F32, &dev)?;
    let cases: Vec<Case<'_>> = vec![
        ("x * m", (xt * &m)?, m.clone()),
        ("x / m", (xt / &m)?, m.recip()?),
        ("m / x", (&m / xt)?, (&m / xt.sqr()?)?.neg()?),
        ("max(x, m)", xt.maximum(&m)?, xt.ge(&m)?.to_dtype(candle_core::DType::F32)?),
        ("x @ m", xt.matmul(&m)?, ones.matmul(&m.t()?)?),
        ("m @ x", m.matmul(xt)?, m.t()?.matmul(&ones)?),
        ("where(c, x, m)", cond.where_cond(xt, &m)?, cond.to_dtype(candle_core::DType::F32)?),
    ];
    for (what, y, want) in cases {
        let g = y.sum_all()?.backward()?;
        assert!(g.get(&m).is_none(), "{what}: the constant got a gradient");
        let d = max_abs_diff(g.get(&x).expect("x's gradient"), &want)?;
        // The same operations as before the patch: the same values, bit for bit.
        assert_eq!(d, 0.0, "{what}: x's gradient off by {d}");
    }
    Ok(())
}
