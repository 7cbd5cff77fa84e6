//! DETR's 2-D sine positional encoding (`PositionEmbeddingSine`, normalised, scale 2*pi).

use candle_core::{Device, DeviceLocation, Result, Tensor};
use glip_kernels::graph::Recent;
use std::cell::RefCell;

/// What an encoding was computed from.
#[derive(PartialEq)]
struct Key {
    mask: Vec<u8>,
    dims: (usize, usize, usize, usize),
    temperature: u64,
    device: DeviceLocation,
}

/// Encodings kept per thread, the most recent first: one per feature level of a batch, which
/// in fixed-size training (the same masks every step) are all a run needs.
const KEPT: usize = 4;

thread_local! {
    static KEEP: RefCell<Recent<Key, Tensor>> = const { RefCell::new(Recent::new(KEPT)) };
}

/// Sine positional encoding of a `(b, h, w)` u8 valid-pixel mask at feature resolution:
/// `(b, h * w, d)` with `d/2` channels for y then `d/2` for x, each interleaving sin and cos,
/// cumulative positions normalised to `(0, 2*pi]` over the valid area.
///
/// Computed on the host (in f64) and copied to `device`, so the last few are kept (per
/// thread, keyed by the mask's contents, sizes, temperature and device): on a GPU the
/// computation would otherwise run every step while the device waits. Pass the mask on the
/// CPU (e.g. [`glip_core::ImageBatch::host_mask`] downsampled): a mask on a GPU is read back,
/// which waits for the device.
pub fn sine_position_encoding(
    mask: &Tensor,
    d: usize,
    temperature: f64,
    device: &Device,
) -> Result<Tensor> {
    if !d.is_multiple_of(4) {
        candle_core::bail!("sine positional encoding: width {d} is not a multiple of 4");
    }
    let (b, h, w) = mask.dims3()?;
    let m: Vec<u8> = mask.flatten_all()?.to_vec1()?;
    let key = Key {
        mask: m,
        dims: (b, h, w, d),
        temperature: temperature.to_bits(),
        device: device.location(),
    };
    KEEP.with(|k| {
        k.borrow_mut().get_or_make(
            key,
            |key| compute_sine(&key.mask, (b, h, w), d, temperature, device),
            |t| vec![t],
        )
    })
}

fn compute_sine(
    m: &[u8],
    (b, h, w): (usize, usize, usize),
    d: usize,
    temperature: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let npf = d / 2;
    let dim_t: Vec<f64> =
        (0..npf).map(|i| temperature.powf(2.0 * (i / 2) as f64 / npf as f64)).collect();
    let eps = 1e-6;
    let scale = 2.0 * std::f64::consts::PI;
    let mut out = vec![0f32; b * h * w * d];
    for bi in 0..b {
        let mm = &m[bi * h * w..(bi + 1) * h * w];
        // cumulative sums of the mask along y and x
        let mut ye = vec![0f64; h * w];
        let mut xe = vec![0f64; h * w];
        for i in 0..h {
            for j in 0..w {
                let v = mm[i * w + j] as f64;
                ye[i * w + j] = v + if i > 0 { ye[(i - 1) * w + j] } else { 0.0 };
                xe[i * w + j] = v + if j > 0 { xe[i * w + j - 1] } else { 0.0 };
            }
        }
        for i in 0..h {
            for j in 0..w {
                let y = ye[i * w + j] / (ye[(h - 1) * w + j] + eps) * scale;
                let x = xe[i * w + j] / (xe[i * w + w - 1] + eps) * scale;
                let o = &mut out[((bi * h + i) * w + j) * d..((bi * h + i) * w + j + 1) * d];
                for k in 0..npf {
                    let (py, px) = (y / dim_t[k], x / dim_t[k]);
                    let (vy, vx) =
                        if k % 2 == 0 { (py.sin(), px.sin()) } else { (py.cos(), px.cos()) };
                    o[k] = vy as f32;
                    o[npf + k] = vx as f32;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, h * w, d), device)
}

/// Grounding DINO's sine positions of `t` text tokens of width `d` (its `get_sine_pos_embed`
/// of the positions `0..t`, the `pos_text` its text layers add to their queries and keys):
/// `(t, d)` with feature `2i` of position `n` `sin(2 pi n / temperature^(2i / d))` and feature
/// `2i + 1` the cosine of the same angle. Made on the host in f64 and kept per thread, as
/// [`sine_position_encoding`]'s.
pub fn text_sine_positions(
    t: usize,
    d: usize,
    temperature: f64,
    device: &Device,
) -> Result<Tensor> {
    if !d.is_multiple_of(2) {
        candle_core::bail!("text sine positions: width {d} is not even");
    }
    let key =
        TextKey { dims: (t, d), temperature: temperature.to_bits(), device: device.location() };
    KEEP_TEXT.with(|k| {
        k.borrow_mut().get_or_make(
            key,
            |_| {
                let scale = 2.0 * std::f64::consts::PI;
                let mut out = Vec::with_capacity(t * d);
                for n in 0..t {
                    for i in 0..d {
                        let angle =
                            n as f64 * scale / temperature.powf((2 * (i / 2)) as f64 / d as f64);
                        out.push(if i % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
                    }
                }
                Tensor::from_vec(out, (t, d), device)
            },
            |t| vec![t],
        )
    })
}

/// What text positions were made for.
#[derive(PartialEq)]
struct TextKey {
    dims: (usize, usize),
    temperature: u64,
    device: DeviceLocation,
}

thread_local! {
    static KEEP_TEXT: RefCell<Recent<TextKey, Tensor>> = const { RefCell::new(Recent::new(KEPT)) };
}

/// Downsamples a `(b, H, W)` pixel mask to `(h, w)` by nearest neighbour (DETR's
/// `F.interpolate(mask, size)`).
pub fn downsample_mask(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, hh, ww) = mask.dims3()?;
    let m: Vec<u8> = mask.flatten_all()?.to_vec1()?;
    let mut out = vec![0u8; b * h * w];
    for bi in 0..b {
        for i in 0..h {
            let si = (i * hh) / h;
            for j in 0..w {
                let sj = (j * ww) / w;
                out[(bi * h + i) * w + j] = m[(bi * hh + si) * ww + sj];
            }
        }
    }
    Tensor::from_vec(out, (b, h, w), mask.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn mask(b: usize, h: usize, w: usize, real_w: usize) -> Tensor {
        let v: Vec<u8> = (0..b * h * w).map(|i| u8::from(i % w < real_w)).collect();
        Tensor::from_vec(v, (b, h, w), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The same mask gives the kept tensor itself; another mask, width or temperature a freshly
    /// computed one with its own values; a kept encoding equals a fresh computation.
    #[test]
    fn encodings_are_kept_per_mask_and_equal_a_fresh_computation() -> Result<()> {
        let (a, b) = (mask(2, 4, 6, 6), mask(2, 4, 6, 4));
        let first = sine_position_encoding(&a, 8, 10000.0, &Device::Cpu)?;
        let again = sine_position_encoding(&a, 8, 10000.0, &Device::Cpu)?;
        assert_eq!(first.id(), again.id(), "the same mask was computed again");
        let other = sine_position_encoding(&b, 8, 10000.0, &Device::Cpu)?;
        assert_ne!(values(&other), values(&first), "another mask, the same encoding");
        let wider = sine_position_encoding(&a, 12, 10000.0, &Device::Cpu)?;
        assert_eq!(wider.dims(), &[2, 24, 12]);
        let warmer = sine_position_encoding(&a, 8, 20.0, &Device::Cpu)?;
        assert_ne!(values(&warmer), values(&first));
        let fresh = compute_sine(
            &values(&a.to_dtype(DType::F32)?).iter().map(|&v| v as u8).collect::<Vec<_>>(),
            (2, 4, 6),
            8,
            10000.0,
            &Device::Cpu,
        )?;
        assert_eq!(values(&fresh), values(&first));
        // Four other keys later the first is no longer kept.
        for d in [16, 20, 24, 28] {
            sine_position_encoding(&a, d, 10000.0, &Device::Cpu)?;
        }
        assert_ne!(sine_position_encoding(&a, 8, 10000.0, &Device::Cpu)?.id(), first.id());
        Ok(())
    }
}
