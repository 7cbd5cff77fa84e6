//! The best `k` of each row, best first, on the device the scores are on: Grounding DINO's
//! query selection picks its queries this way in every forward, so on a GPU the indices must
//! not go through the host (a read there waits for everything queued before it).

use candle_core::{DType, Result, Tensor};

/// The `k` best of `candidates` by `score`, best first: by score descending under
/// `f32::total_cmp` (a positive NaN above `+inf`), the lower index first among equal scores,
/// which is the order of a stable sort of all of them truncated to `k`; in `O(n + k log k)`
/// (a selection, then a sort of the `k`).
pub fn best_k(mut candidates: Vec<usize>, k: usize, score: impl Fn(usize) -> f32) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    let order = |x: &usize, y: &usize| score(*y).total_cmp(&score(*x)).then(x.cmp(y));
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k - 1, order);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(order);
    candidates
}

/// Each row's `k` best indices, best first: `x (rows, s)` -> `(rows, k)` u32 on `x`'s device,
/// in [`best_k`]'s order (the choice `torch.topk` makes, with ties resolved by index). On CUDA
/// one kernel and nothing read back (`cuda_source::TOP_K`: every element's rank counted
/// against its row, `O(s^2)` comparisons a row, for rows of thousands such as query
/// selection's memory tokens); elsewhere (and with `GLIP_CUDA_COMPOSED`) on the host.
pub fn top_k_indices(x: &Tensor, k: usize) -> Result<Tensor> {
    let (rows, s) = x.dims2()?;
    if k > s {
        candle_core::bail!("top-k: {k} of a row of {s}");
    }
    let x = x.to_dtype(DType::F32)?;
    #[cfg(feature = "cuda")]
    if crate::cuda::own_kernels(&x) && k > 0 {
        return x.contiguous()?.apply_op1_no_bwd(&crate::cuda_layers::TopK { k });
    }
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let mut idx = Vec::with_capacity(rows * k);
    for row in v.chunks_exact(s.max(1)).take(rows) {
        idx.extend(best_k((0..s).collect(), k, |i| row[i]).into_iter().map(|i| i as u32));
    }
    Tensor::from_vec(idx, (rows, k), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use proptest::prelude::*;

    /// Scores with ties, both zeros and NaNs and infinities of both signs, from a few codes.
    fn coded(codes: &[u8]) -> Vec<f32> {
        const TABLE: [f32; 9] =
            [f32::NAN, f32::NEG_INFINITY, -0.0, 0.0, 0.5, 0.5, 0.9, f32::INFINITY, -f32::NAN];
        codes.iter().map(|&c| TABLE[c as usize % TABLE.len()]).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Each row is a stable sort by descending `total_cmp`, truncated to `k`.
        #[test]
        fn top_k_is_a_stable_sort_truncated(
            rows in 1usize..4,
            s in 1usize..40,
            codes in prop::collection::vec(0u8..9, 160),
            k_frac in 0.0f64..=1.0,
        ) {
            let k = (k_frac * s as f64) as usize;
            let v = coded(&codes[..rows * s]);
            let x = Tensor::from_vec(v.clone(), (rows, s), &Device::Cpu).unwrap();
            let got: Vec<Vec<u32>> = top_k_indices(&x, k).unwrap().to_vec2().unwrap();
            for (r, got) in got.iter().enumerate() {
                let row = &v[r * s..(r + 1) * s];
                let mut want: Vec<u32> = (0..s as u32).collect();
                want.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                want.truncate(k);
                prop_assert_eq!(got, &want);
            }
        }
    }

    #[test]
    fn more_than_a_row_is_an_error() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = top_k_indices(&x, 4).unwrap_err().to_string();
        assert!(e.contains("4 of a row of 3"), "{e}");
        assert_eq!(top_k_indices(&x, 0).unwrap().dims(), &[2, 0]);
    }
}
