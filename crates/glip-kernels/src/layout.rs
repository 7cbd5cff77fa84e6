//! Channels-last activations: a `(b, c, h, w)` tensor whose elements are stored in `(b, h, w,
//! c)` order (PyTorch's `torch.channels_last` memory format), as a candle view: the
//! `(b, h, w, c)` storage permuted to `(b, c, h, w)`, no copy.
//!
//! Why: cuDNN's bf16 tensor-core convolutions on sm_80 and later read and write NHWC. Handed
//! NCHW bf16 tensors, cuDNN 9 transposes the input (`nchwToNhwcKernel`) and the output
//! (`nhwcToNchwKernel`) around each of them: in the H200 profile of 2026-12-04 (seed-r18
//! inference, batch 32 at 256 px, bf16) 55 transposes an iteration, 9 % of the device's kernel
//! time, each a launch and an allocation on a host that was the bottleneck. With channels-last
//! activations through the ResNet (`GLIP_CHANNELS_LAST=1`, [`backbone_channels_last`]) each
//! convolution takes and gives NHWC ([`crate::conv::conv2d`]), the frozen batch norm's affine
//! map, ReLU and residual sum run on the same storage ([`crate::affine::channel_affine`]), and the
//! backbone hands its levels on as contiguous NCHW tensors (one copy a level).
//!
//! The rule every op of this crate keeps: a channels-last input gives a channels-last output,
//! on every device (on the CPU, where nothing gains from it, by computing on an NCHW copy and
//! laying the result out channels-last again), so a model's values do not depend on the layout.

use candle_core::{Result, Shape, Tensor};
use std::cell::Cell;

/// Whether `x` is a 4-D tensor stored channels-last and not also contiguous (a tensor with
/// one channel, or one pixel, is both: it counts as contiguous).
pub fn is_channels_last(x: &Tensor) -> bool {
    let (Ok((b, c, h, w)), [sb, sc, sh, sw]) = (x.dims4(), x.stride()) else {
        return false;
    };
    !x.is_contiguous() && Shape::from((b, h, w, c)).is_contiguous(&[*sb, *sh, *sw, *sc])
}

/// `x (b, c, h, w)` stored channels-last: `x` itself when it is, else a copy.
pub fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    // With one channel or one pixel the two layouts are one storage order.
    if is_channels_last(x) || x.is_contiguous() && (c == 1 || h * w == 1) {
        return Ok(x.clone());
    }
    x.permute((0, 2, 3, 1))?.contiguous()?.permute((0, 3, 1, 2))
}

/// The `(b, h, w, c)` view of a channels-last `x (b, c, h, w)` (contiguous, no copy).
pub(crate) fn nhwc_view(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))
}

/// `f(x)` with a channels-last `x` computed on an NCHW copy and the result laid out
/// channels-last again; `f(x)` as it is otherwise. For the ops that gain nothing from the
/// layout (the CPU's) and keep the rule of this module.
pub(crate) fn keeping_layout(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if is_channels_last(x) {
        to_channels_last(&f(&x.contiguous()?)?)
    } else {
        f(x)
    }
}

thread_local! {
    /// Whether [`with_channels_last`] asked for channels-last activations on every device.
    static FORCE: Cell<bool> = const { Cell::new(false) };
}

/// Whether a ResNet keeps the activations `x` channels-last from its stem's pool to its levels:
/// with `GLIP_CHANNELS_LAST=1`, for bf16 activations on CUDA in a `cudnn` build
/// ([`crate::bf16::activation_dtype`]). Off by default until a GPU has measured it (the device
/// check's `CL_AB=1` rows); [`with_channels_last`] turns it on anywhere, for tests.
pub fn backbone_channels_last(x: &Tensor) -> bool {
    if FORCE.with(Cell::get) {
        return x.rank() == 4;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("GLIP_CHANNELS_LAST").is_ok_and(|v| v == "1"));
    on && crate::cuda::CUDNN
        && x.device().is_cuda()
        && x.dtype() == candle_core::DType::BF16
        && x.rank() == 4
}

/// Runs `f` with [`backbone_channels_last`] on for every tensor on every device, the CPU
/// included (there each op computes on an NCHW copy): for tests that a model's values do not
/// depend on the layout. Restores the previous setting.
pub fn with_channels_last<T>(f: impl FnOnce() -> T) -> T {
    crate::with_flag_set(&FORCE, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn channels_last_is_a_view_of_nhwc_storage_with_the_same_values() -> Result<()> {
        let x = Tensor::arange(0f32, 120.0, &Device::Cpu)?.reshape((2, 3, 4, 5))?;
        assert!(!is_channels_last(&x));
        let cl = to_channels_last(&x)?;
        assert!(is_channels_last(&cl) && !cl.is_contiguous());
        assert_eq!(cl.dims(), x.dims());
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
            Ok(a.flatten_all()?.to_vec1::<f32>()?
                == b.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
        };
        assert!(same(&x, &cl)?);
        // Stored as (b, h, w, c): the storage order is x.permute(0, 2, 3, 1)'s.
        let stored = nhwc_view(&cl)?;
        assert!(stored.is_contiguous());
        assert!(same(&x.permute((0, 2, 3, 1))?.contiguous()?, &stored)?);
        // Already channels-last: the same tensor.
        assert_eq!(to_channels_last(&cl)?.id(), cl.id());
        // One channel or one pixel: both layouts are one order, contiguous wins.
        for shape in [(2, 1, 4, 5), (2, 3, 1, 1)] {
            let t = Tensor::zeros(shape, DType::F32, &Device::Cpu)?;
            assert!(!is_channels_last(&t));
            assert_eq!(to_channels_last(&t)?.id(), t.id(), "{shape:?}");
        }
        // Other ranks and other permutations are not channels-last.
        assert!(!is_channels_last(&x.flatten_all()?));
        assert!(!is_channels_last(&x.transpose(2, 3)?));
        assert!(!is_channels_last(&x.narrow(3, 0, 2)?));
        Ok(())
    }

    #[test]
    fn keeping_layout_gives_back_the_layout_it_was_given() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu)?;
        let double = |t: &Tensor| -> Result<Tensor> {
            assert!(t.is_contiguous());
            t * 2.0
        };
        let y = keeping_layout(&to_channels_last(&x)?, double)?;
        assert!(is_channels_last(&y));
        let z = keeping_layout(&x, double)?;
        assert!(z.is_contiguous());
        let d = (y - z)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    /// The values and gradients of `f` on `x` and on `x` laid out channels-last, bit for bit
    /// (the CPU computes both on the same NCHW values), and the result's layout.
    fn same_either_layout(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        let v = candle_core::Var::from_tensor(x)?;
        let probe = Tensor::randn(0f32, 1.0, f(x)?.shape(), x.device())?;
        let mut out = Vec::new();
        for cl in [false, true] {
            let input = if cl { to_channels_last(v.as_tensor())? } else { v.as_tensor().clone() };
            let y = f(&input)?;
            assert_eq!(is_channels_last(&y), cl, "the result keeps the input's layout");
            let g = (&y * &probe)?.sum_all()?.backward()?;
            let g = g.get(v.as_tensor()).expect("a gradient").flatten_all()?.to_vec1::<f32>()?;
            out.push((y.flatten_all()?.to_vec1::<f32>()?, g));
        }
        assert_eq!(out[0].0, out[1].0, "values");
        assert_eq!(out[0].1, out[1].1, "gradients");
        Ok(())
    }

    #[test]
    fn cpu_convolutions_and_the_affine_map_keep_a_channels_last_layout() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 9, 7), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (5, 6, 3, 3), &dev)?;
        same_either_layout(&x, |x| crate::conv::conv2d(x, &w, 2, 1))?;
        let wg = Tensor::randn(0f32, 0.3, (6, 3, 3, 3), &dev)?;
        same_either_layout(&x, |x| crate::conv::conv2d_grouped(x, &wg, 1, 1, 2))?;
        let ss = Tensor::randn(0f32, 1.0, (2, 6), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (2, 6, 9, 7), &dev)?;
        for relu in [false, true] {
            same_either_layout(&x, |x| crate::affine::channel_affine(x, &ss, None, relu))?;
            // The residual in either layout: laid out as x.
            for r in [r.clone(), to_channels_last(&r)?] {
                same_either_layout(&x, |x| crate::affine::channel_affine(x, &ss, Some(&r), relu))?;
            }
        }
        Ok(())
    }

    #[test]
    fn the_backbone_switch_is_off_on_the_cpu_unless_forced() -> Result<()> {
        let x = Tensor::zeros((1, 3, 4, 4), DType::BF16, &Device::Cpu)?;
        assert!(!backbone_channels_last(&x));
        assert!(with_channels_last(|| backbone_channels_last(&x)));
        assert!(!with_channels_last(|| backbone_channels_last(&x.flatten_all().unwrap())));
        assert!(!backbone_channels_last(&x), "restored");
        Ok(())
    }
}
