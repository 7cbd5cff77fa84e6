//! DETR's 2-D sine positional encoding (`PositionEmbeddingSine`, normalised, scale 2*pi).

use candle_core::{Result, Tensor};

/// Sine positional encoding of a `(b, h, w)` u8 valid-pixel mask at feature resolution:
/// `(b, h * w, d)` with `d/2` channels for y then `d/2` for x, each interleaving sin and cos,
/// cumulative positions normalised to `(0, 2*pi]` over the valid area.
pub fn sine_position_encoding(mask: &Tensor, d: usize, temperature: f64) -> Result<Tensor> {
    if !d.is_multiple_of(4) {
        candle_core::bail!("sine positional encoding: width {d} is not a multiple of 4");
    }
    let (b, h, w) = mask.dims3()?;
    let m: Vec<u8> = mask.flatten_all()?.to_vec1()?;
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
    Tensor::from_vec(out, (b, h * w, d), mask.device())
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
