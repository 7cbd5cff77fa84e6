//! Multi-head attention's core, `softmax(q k^T s + bias) v` per head, in one CUDA launch for
//! inference ([`fused`]).
//!
//! Composed from candle's ops, the core is three copies splitting the heads, a scaling, two
//! products, the key mask's bias (a cast, two scalings and a broadcast sum), a softmax and a
//! copy merging the heads: up to twelve launches, each with an allocation, on a GPU whose
//! inference steps are bound by the host's launches (`docs/results/README.md`, GPU). The fused
//! kernel (`glip_attention` in `cuda_source::ATTENTION`) reads the projections where
//! they are and writes the merged heads. Training keeps the composition, whose backward candle
//! derives.

use candle_core::{Result, Tensor};

/// The widest head [`fused`] takes.
pub const MAX_HEAD_WIDTH: usize = crate::cuda_source::ATTENTION_MAX_HEAD;

/// Where attention's scale multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAt {
    /// The query, before the product (`torch.nn.MultiheadAttention`).
    Query,
    /// The scores, after it (Hugging Face BERT).
    Scores,
}

/// Whether [`fused`] may run (unless `GLIP_CUDA_ATTENTION` is `composed`, or
/// `GLIP_CUDA_COMPOSED` turns every fused kernel off; read once).
#[cfg(feature = "cuda")]
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        crate::cuda_layers::enabled()
            && std::env::var("GLIP_CUDA_ATTENTION").map_or(true, |v| v != "composed")
    })
}

/// `softmax(q k^T s + bias) v` per head, heads merged: `q (b, lq, d)`, `k`, `v (b, lk, d)` with
/// head `h` in columns `h d / heads ..`, `key_mask (b, lk)` (1 = attend; the bias is
/// `(1 - mask) f32::MIN`, as [`crate::nn::mask_to_bias`]), `scale` at `at`; `(b, lq, d)`.
///
/// `Some` where it ran as one launch: on CUDA, f32 operands whose rows are each contiguous and
/// evenly spaced (contiguous tensors, or column blocks of a packed projection), none of them
/// tracking a gradient (inference), at least one key, a head at most [`MAX_HEAD_WIDTH`] wide,
/// a u8 mask; `None` otherwise (the CPU, a training step), and the caller composes. The
/// kernel sums in another order than the composition (the online softmax, a tile of keys at a
/// time): the bound its tests derive is in glip-testing's `attention_reference`.
pub fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    heads: usize,
    scale: f64,
    at: ScaleAt,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if fusable(q, k, v, key_mask, heads) {
            let ops = [q, k, v];
            let at_scores = at == ScaleAt::Scores;
            return crate::cuda_layers::attention(ops, key_mask, heads, scale as f32, at_scores)
                .map(Some);
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (q, k, v, key_mask, heads, scale, at);
    Ok(None)
}

/// Whether [`fused`] may run on operands made from `x` by gradient-free layers: a `cuda` build,
/// `x` on CUDA and tracking no gradient, the fused kernels on. Callers use it to choose inputs
/// the fused core reads best (q, k and v out of one packed projection) before calling it.
pub fn may_fuse(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda() && !x.track_op() && enabled()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// The stride between consecutive rows of a `(b, l, w)` layout (across images where each has
/// one row) when each row is contiguous and the rows are evenly spaced: a contiguous tensor, or
/// a block of columns of one (q, k and v out of a packed projection); `None` otherwise.
#[cfg_attr(not(feature = "cuda"), allow(dead_code, reason = "read by the cuda build and tests"))]
pub(crate) fn row_stride(dims: &[usize], stride: &[usize]) -> Option<usize> {
    let (&[b, rows, w], &[sb, sr, sc]) = (dims, stride) else { return None };
    let ld = match (rows, b) {
        (1, 1) => w,
        (1, _) => sb,
        _ => sr,
    };
    ((w <= 1 || sc == 1) && (b <= 1 || sb == rows * ld) && ld >= w).then_some(ld)
}

/// The conditions of [`fused`].
#[cfg(feature = "cuda")]
fn fusable(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, heads: usize) -> bool {
    let (Ok((b, lq, d)), Ok((bk, lk, dk))) = (q.dims3(), k.dims3()) else { return false };
    let ops = [q, k, v];
    q.device().is_cuda()
        && enabled()
        && heads > 0
        && d % heads == 0
        && (1..=MAX_HEAD_WIDTH).contains(&(d / heads))
        && (bk, dk) == (b, d)
        // A grid's y extent (images x heads) is at most 65,535.
        && b * heads <= 65_535
        && v.dims() == k.dims()
        // A launch needs at least one image, query and key.
        && b > 0
        && lq > 0
        && lk > 0
        && ops.iter().all(|t| {
            t.dtype() == candle_core::DType::F32
                && row_stride(t.dims(), t.stride()).is_some()
                && !t.track_op()
        })
        && ops.iter().all(|t| t.device().same_device(q.device()))
        && mask.is_none_or(|m| {
            m.dtype() == candle_core::DType::U8
                && m.dims() == [b, lk]
                && m.is_contiguous()
                && m.device().same_device(q.device())
        })
}

#[cfg(test)]
mod tests {
    use super::row_stride;
    use candle_core::{DType, Device, Result, Tensor};

    fn stride_of(t: &Tensor) -> Option<usize> {
        row_stride(t.dims(), t.stride())
    }

    /// The layouts the fused core reads in place (contiguous tensors, column blocks of a packed
    /// projection, one row per image) and those it must not (a transposed view, columns that
    /// are not adjacent, rows of other spacing across images).
    #[test]
    fn row_stride_accepts_evenly_spaced_contiguous_rows_only() -> Result<()> {
        let dev = Device::Cpu;
        let packed = Tensor::zeros((2, 5, 12), DType::F32, &dev)?;
        assert_eq!(stride_of(&packed), Some(12));
        assert_eq!(stride_of(&packed.narrow(2, 4, 4)?), Some(12), "a column block");
        let one_row = Tensor::zeros((3, 1, 12), DType::F32, &dev)?;
        assert_eq!(stride_of(&one_row.narrow(2, 8, 4)?), Some(12), "one row per image");
        assert_eq!(stride_of(&Tensor::zeros((1, 1, 4), DType::F32, &dev)?), Some(4));
        assert_eq!(stride_of(&packed.transpose(1, 2)?), None, "a transposed view");
        let every_other = Tensor::zeros((2, 5, 4, 2), DType::F32, &dev)?.narrow(3, 0, 1)?;
        assert_eq!(stride_of(&every_other.squeeze(3)?), None, "columns two apart");
        assert_eq!(stride_of(&packed.narrow(1, 0, 3)?), None, "rows of images 5 rows apart");
        Ok(())
    }
}
