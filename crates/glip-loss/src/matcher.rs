//! Assignment solvers behind [`glip_core::Matcher`]: the exact Hungarian optimum (the `lsap`
//! crate, a port of scipy's `linear_sum_assignment`) and the seed tutorial's ordered pairing.

use candle_core::{DType, Result, Tensor};
use glip_core::{Match, Matcher};

/// The exact minimum-cost assignment (scipy's algorithm via `lsap`): rectangular either way,
/// zero targets give no pairs. Never greedy.
#[derive(Debug, Clone, Copy, Default)]
pub struct HungarianMatcher;

/// Solves a `rows x cols` row-major cost matrix; pairs sorted by row.
pub fn hungarian(cost: &[f64], rows: usize, cols: usize) -> Result<Match> {
    if rows == 0 || cols == 0 {
        return Ok(Match::default());
    }
    if let Some(i) = cost.iter().position(|c| !c.is_finite()) {
        candle_core::bail!(
            "matching cost [{}, {}] is {} (not finite)",
            i / cols,
            i % cols,
            cost[i]
        );
    }
    let cost = cost.to_vec();
    let (r, c) = lsap::solve(rows, cols, &cost, false).map_err(|e| {
        candle_core::Error::Msg(format!("assignment of a {rows}x{cols} cost matrix failed: {e}"))
    })?;
    let mut pairs: Vec<(usize, usize)> = r.into_iter().zip(c).collect();
    pairs.sort_unstable();
    Ok(Match {
        query: pairs.iter().map(|p| p.0).collect(),
        target: pairs.iter().map(|p| p.1).collect(),
    })
}

impl Matcher for HungarianMatcher {
    fn assign(&self, cost: &Tensor) -> Result<Match> {
        let (q, n) = cost.dims2()?;
        let v: Vec<f64> = cost.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        hungarian(&v, q, n)
    }
}

/// The seed tutorial's pairing without matching: query `i` <-> target `i` for
/// `i < min(q, n)`; the other queries are "no object". Kept as the ablation that shows why
/// matching matters.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderedMatcher;

impl Matcher for OrderedMatcher {
    fn assign(&self, cost: &Tensor) -> Result<Match> {
        let (q, n) = cost.dims2()?;
        let k = q.min(n);
        Ok(Match { query: (0..k).collect(), target: (0..k).collect() })
    }
}
