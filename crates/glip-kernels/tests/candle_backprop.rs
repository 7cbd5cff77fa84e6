//! The workspace builds candle-core with one patch to its backward pass (vendor/README.md): a
//! tensor's first gradient contribution is stored as it is instead of being added to a tensor
//! of zeros. These check what the patch must keep: the gradients' values (exact: each is a
//! product or a sum of exact small integers times one random factor, so any change of sign,
//! lost or doubled contribution shows), that a gradient is contiguous even when its one
//! contribution was a strided view (glip's kernels take contiguous operands), and that two
//! gradients that came from one contribution do not share a buffer that the optimiser's in-place
//! updates could write twice.

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
