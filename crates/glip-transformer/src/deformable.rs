//! Deformable DETR's multi-scale deformable attention with box references, as Deformable
//! DETR's two-stage decoder and Grounding DINO's decoder use it: each head of each query
//! samples a few points on every level around the query's box instead of attending to every
//! image token. Its names and initialisation are Deformable DETR's `MSDeformAttn`
//! (`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`); the PyTorch reference
//! is `DeformableAttention` in `reference/glip_ref.py`, which samples with `F.grid_sample`.
//!
//! Sampling: every sample reads the four tokens around it, weighted by its bilinear weights
//! times its attention weight, and each query sums its samples, linear in the number of samples
//! and independent of the number of image tokens. In f32 on the CPU and on CUDA one op of ours
//! does it, forward and backward ([`glip_kernels::deformable::sample`]: Deformable DETR writes a
//! kernel for it too); elsewhere ([`glip_kernels::deformable::takes`]: values in bf16,
//! determinism asked for on CUDA) candle's ops (`gathered`: a row copy of every sample's four
//! tokens and a batched product with their weights). On the CPU, a training step's image
//! cross-attention (d 256, 8 heads, 300 queries, batch 2, 4 points) takes 0.18 s over the
//! 17,600 tokens of an 800 x 1066 image against 1.0 s for global attention, 0.05 s against
//! 0.23 s at 512 px, and 0.024 s against 0.009 s over the shapes task's 320 tokens with
//! candle's ops (`cargo bench -p glip-benches --bench models -- decoder_image_attention`, an
//! Intel Xeon); see docs/results for the op's figures.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use glip_core::LevelShape;
use glip_kernels::nn::Linear;

/// Where deformable attention samples: the levels of the image tokens (finest first, each
/// row-major, as [`glip_core::Encoded`] lays them out) and every image's real size in each
/// level's columns and rows. Made once per batch shape ([`SamplingLevels::cached`]); every
/// layer reads it.
#[derive(Debug, Clone)]
pub struct SamplingLevels {
    levels: Vec<LevelShape>,
    /// `(b, s, 2)`: every token's centre, normalised by its image's size.
    centres: Tensor,
    /// `[0, 1]`: a sample's two neighbours along an axis.
    corner: Tensor,
    /// `(b, 1, 1, L, 1, 2)`: an image's width and height over each level's stride, which turns
    /// a normalised location into columns and rows.
    scale: Tensor,
    /// `(1, 1, 1, L, 1, 1)` f32 each: the last column, the last row, the level's width, and
    /// the index of its first token.
    last_col: Tensor,
    last_row: Tensor,
    width: Tensor,
    start: Tensor,
}

impl SamplingLevels {
    /// `levels` (finest first) of a batch whose images are `image_sizes` `(width, height)`
    /// pixels (unpadded).
    pub fn new(levels: &[LevelShape], image_sizes: &[(f32, f32)], device: &Device) -> Result<Self> {
        if levels.is_empty() {
            candle_core::bail!("deformable attention: no levels to sample");
        }
        if levels.iter().any(|l| l.h == 0 || l.w == 0 || l.stride == 0) {
            candle_core::bail!("deformable attention: an empty level in {levels:?}");
        }
        let nl = levels.len();
        let scale: Vec<f32> = image_sizes
            .iter()
            .flat_map(|&(w, h)| {
                levels.iter().flat_map(move |l| [w / l.stride as f32, h / l.stride as f32])
            })
            .collect();
        let per_level = |f: &dyn Fn(&LevelShape) -> f32| -> Result<Tensor> {
            let v: Vec<f32> = levels.iter().map(f).collect();
            Tensor::from_vec(v, (1, 1, 1, nl, 1, 1), device)
        };
        let mut start = Vec::with_capacity(nl);
        let mut at = 0usize;
        for l in levels {
            start.push(at as f32);
            at += l.h * l.w;
        }
        if at >= 1 << 24 {
            // Token indices are computed in f32, exact below 2^24.
            candle_core::bail!("deformable attention: {at} image tokens, more than 2^24");
        }
        let centres = LevelShape::token_centres(levels, image_sizes);
        Ok(Self {
            levels: levels.to_vec(),
            centres: Tensor::from_vec(centres, (image_sizes.len(), at, 2), device)?,
            corner: Tensor::new(&[0f32, 1.0], device)?,
            scale: Tensor::from_vec(scale, (image_sizes.len(), 1, 1, nl, 1, 2), device)?,
            last_col: per_level(&|l| l.w as f32 - 1.0)?,
            last_row: per_level(&|l| l.h as f32 - 1.0)?,
            width: per_level(&|l| l.w as f32)?,
            start: Tensor::from_vec(start, (1, 1, 1, nl, 1, 1), device)?,
        })
    }

    /// The levels.
    pub fn levels(&self) -> &[LevelShape] {
        &self.levels
    }

    /// `(n, 1)` u32: `i * s` for `i < n`, the first row of the `i`-th image and head in a
    /// table of `n` blocks of `s` rows. Kept per thread as the levels are: every deformable
    /// layer asks for it at every step, and a CUDA graph cannot record its upload.
    fn row_offsets(n: usize, s: usize, device: &Device) -> Result<Tensor> {
        if n * s > u32::MAX as usize {
            candle_core::bail!("deformable attention: {n} x {s} value rows, more than u32 indexes");
        }
        OFFSETS.with(|k| {
            k.borrow_mut().get_or_make(
                (n, s, device.location()),
                |_| {
                    let v: Vec<u32> = (0..n).map(|i| (i * s) as u32).collect();
                    Tensor::from_vec(v, (n, 1), device)
                },
                |t| vec![t],
            )
        })
    }

    /// The levels as [`glip_kernels::deformable::sample`] reads them: each one's first token.
    fn kernel_levels(&self) -> Vec<glip_kernels::deformable::Level> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.levels.len());
        for l in &self.levels {
            out.push(glip_kernels::deformable::Level { h: l.h, w: l.w, start });
            start += l.h * l.w;
        }
        out
    }

    /// Image tokens over all levels.
    pub fn tokens(&self) -> usize {
        self.levels.iter().map(|l| l.h * l.w).sum()
    }

    /// Every token's centre `(b, s, 2)`, normalised by its image's size (column `j` of a level
    /// of stride `t` at `(j + 0.5) * t / width`): the reference points of an encoder's
    /// deformable self-attention. A padded token's lies past 1.
    pub fn token_centres(&self) -> &Tensor {
        &self.centres
    }

    /// [`SamplingLevels::new`], kept per thread for the last few level shapes and image sizes:
    /// on a GPU each forward pass would otherwise upload it again, and a CUDA graph cannot
    /// record an upload of the centres (a kept copy is
    /// [`glip_kernels::graph::keep_alive`]d instead).
    pub fn cached(
        levels: &[LevelShape],
        image_sizes: &[(f32, f32)],
        device: &Device,
    ) -> Result<Self> {
        let key: Key = (LevelShape::key(levels, image_sizes), device.location());
        KEPT.with(|k| {
            k.borrow_mut().get_or_make(
                key,
                |_| Self::new(levels, image_sizes, device),
                |s| {
                    vec![
                        &s.centres,
                        &s.corner,
                        &s.scale,
                        &s.last_col,
                        &s.last_row,
                        &s.width,
                        &s.start,
                    ]
                },
            )
        })
    }
}

type Key = (glip_core::LevelsKey, candle_core::DeviceLocation);

thread_local! {
    static KEPT: std::cell::RefCell<glip_kernels::graph::Recent<Key, SamplingLevels>> =
        const { std::cell::RefCell::new(glip_kernels::graph::Recent::new(4)) };
    static OFFSETS: std::cell::RefCell<
        glip_kernels::graph::Recent<(usize, usize, candle_core::DeviceLocation), Tensor>,
    > = const { std::cell::RefCell::new(glip_kernels::graph::Recent::new(4)) };
}

/// Where a query's samples are placed.
#[derive(Debug, Clone, Copy)]
pub enum Reference<'a> {
    /// `(b, q, 4)` boxes (cx, cy, w, h normalised by each image's size): a sample sits at
    /// `xy + offset / points * wh / 2` (a decoder's queries, Deformable DETR's two-stage).
    Boxes(&'a Tensor),
    /// `(b, q, 2)` points (normalised likewise): a sample sits `offset` tokens of its level away
    /// (an encoder's tokens, [`SamplingLevels::token_centres`]).
    Points(&'a Tensor),
}

/// Deformable DETR's multi-scale deformable attention over `levels` levels, `points` samples
/// per head and level, around each query's reference box.
#[derive(Debug, Clone)]
pub struct DeformableAttention {
    sampling_offsets: Linear,
    attention_weights: Linear,
    value_proj: Linear,
    output_proj: Linear,
    heads: usize,
    levels: usize,
    points: usize,
    d: usize,
}

impl DeformableAttention {
    /// Loads or makes `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj` of
    /// width `d`. New parameters start as Deformable DETR's: zero offset weights with the
    /// offsets' bias on one ray per head (the direction `2 pi h / heads` scaled so that its
    /// larger coordinate is 1, the `i`-th point `i + 1` along it), zero attention weights (all
    /// samples weigh the same), Xavier-uniform projections with zero biases.
    pub fn new(
        d: usize,
        heads: usize,
        levels: usize,
        points: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        if heads == 0 || !d.is_multiple_of(heads) {
            candle_core::bail!("deformable attention: width {d} is not divisible by {heads} heads");
        }
        if levels == 0 || points == 0 {
            candle_core::bail!("deformable attention: {levels} levels x {points} points");
        }
        let samples = heads * levels * points;
        let zeros = Init::Const(0.0);
        let fresh = !vb.contains_tensor("sampling_offsets.bias");
        let offsets_bias = vb.get_with_hints(2 * samples, "sampling_offsets.bias", zeros)?;
        if fresh {
            // candle's initialisers cannot state this pattern: the new parameter is written in
            // place once (a loaded one keeps its values).
            let grid = Tensor::from_vec(ray_grid(heads, levels, points), 2 * samples, vb.device())?;
            offsets_bias.slice_set(&grid.to_dtype(offsets_bias.dtype())?, 0, 0)?;
        }
        let xavier = Init::Uniform { lo: -(3.0 / d as f64).sqrt(), up: (3.0 / d as f64).sqrt() };
        let linear = |name: &str, dout: usize, init: Init| -> Result<Linear> {
            let vb = vb.pp(name);
            Ok(Linear::from_tensors(
                vb.get_with_hints((dout, d), "weight", init)?,
                Some(vb.get_with_hints(dout, "bias", zeros)?),
            ))
        };
        Ok(Self {
            sampling_offsets: Linear::from_tensors(
                vb.get_with_hints((2 * samples, d), "sampling_offsets.weight", zeros)?,
                Some(offsets_bias),
            ),
            attention_weights: linear("attention_weights", samples, zeros)?,
            value_proj: linear("value_proj", d, xavier)?,
            output_proj: linear("output_proj", d, xavier)?,
            heads,
            levels,
            points,
            d,
        })
    }

    /// Samples per head and level.
    pub fn points(&self) -> usize {
        self.points
    }

    /// `query (b, q, d)` (positions added) at `reference` over `value (b, s, d)`, the tokens
    /// of `at`'s levels, with `value_mask (b, s)` u8 (1 for real tokens; padded ones are zero
    /// values) -> `(b, q, d)`.
    ///
    /// A sample of head `h`, level `l`, point `p` sits at `xy + offset / points * wh / 2`
    /// ([`Reference::Boxes`]) or `offset` tokens from `xy` ([`Reference::Points`]); a
    /// normalised `x` is column `x * width / stride - 0.5` of its level (column `j` is centred
    /// on pixel `(j + 0.5) * stride`), and it reads its four neighbouring tokens bilinearly,
    /// zero outside the level (`grid_sample`'s zero padding, `align_corners = False`).
    pub fn forward(
        &self,
        query: &Tensor,
        reference: Reference<'_>,
        value: &Tensor,
        value_mask: Option<&Tensor>,
        at: &SamplingLevels,
    ) -> Result<Tensor> {
        let (b, q, d) = query.dims3()?;
        let (nh, nl, np) = (self.heads, self.levels, self.points);
        let s = value.dim(1)?;
        let (reference_dims, width) = match reference {
            Reference::Boxes(r) => (r.dims(), 4),
            Reference::Points(r) => (r.dims(), 2),
        };
        if d != self.d || value.dims() != [b, s, d] || reference_dims != [b, q, width] {
            candle_core::bail!(
                "deformable attention of width {}: query {:?}, reference {:?}, value {:?}",
                self.d,
                query.dims(),
                reference_dims,
                value.dims()
            );
        }
        if at.levels.len() != nl || at.tokens() != s || at.scale.dim(0)? != b {
            candle_core::bail!(
                "deformable attention over {nl} levels: {} levels of {} tokens for {} images, \
                 values {:?}",
                at.levels.len(),
                at.tokens(),
                at.scale.dim(0)?,
                value.dims()
            );
        }
        let dh = d / nh;
        let mut v = self.value_proj.forward(value)?;
        if let Some(m) = value_mask {
            v = v.broadcast_mul(&m.to_dtype(v.dtype())?.unsqueeze(D::Minus1)?)?;
        }
        // (b * heads, s, dh): one row of values per token and head.
        let v =
            v.reshape((b, s, nh, dh))?.transpose(1, 2)?.contiguous()?.reshape((b * nh, s, dh))?;
        // Heads before queries from here on: (b, heads, q, levels, points, ...).
        let offsets = self
            .sampling_offsets
            .forward(query)?
            .to_dtype(DType::F32)?
            .reshape((b, q, nh, nl, np, 2))?
            .transpose(1, 2)?;
        let weights = self.attention_weights.forward(query)?.to_dtype(DType::F32)?;
        let weights = glip_kernels::fused::softmax_last(&weights.reshape((b, q, nh, nl * np))?)?
            .reshape((b, q, nh, nl, np, 1))?
            .transpose(1, 2)?;
        // Every sample in its level's columns and rows: (b, nh, q, nl, np, 2).
        let units = match reference {
            Reference::Boxes(boxes) => {
                let boxes = boxes.to_dtype(DType::F32)?.reshape((b, 1, q, 1, 1, 4))?;
                let centre = boxes.narrow(D::Minus1, 0, 2)?;
                let reach = (boxes.narrow(D::Minus1, 2, 2)? * (0.5 / np as f64))?;
                let loc = centre.broadcast_add(&offsets.broadcast_mul(&reach)?)?;
                (loc.broadcast_mul(&at.scale)? - 0.5)?
            }
            Reference::Points(points) => {
                let points = points.to_dtype(DType::F32)?.reshape((b, 1, q, 1, 1, 2))?;
                (points.broadcast_mul(&at.scale)? - 0.5)?.broadcast_add(&offsets)?
            }
        };
        // (b * heads, q, dh): each query's weighted sum of its samples' bilinear reads.
        let out = if glip_kernels::deformable::takes(&v, nl) {
            let samples =
                Tensor::cat(&[&units, &weights], D::Minus1)?.reshape((b * nh, q, nl, np, 3))?;
            glip_kernels::deformable::sample(&v, &samples, &at.kernel_levels())?
        } else {
            gathered(&v, &units, &weights, at)?
        };
        let out = out.reshape((b, nh, q, dh))?.transpose(1, 2)?.reshape((b, q, d))?;
        self.output_proj.forward(&out)
    }
}

/// [`DeformableAttention::forward`]'s sampling in candle's ops, for devices and dtypes
/// without [`glip_kernels::deformable::sample`]: `v (b * heads, s, dh)`, `units (b, heads, q,
/// levels, points, 2)` (columns and rows) and `weights (b, heads, q, levels, points, 1)` ->
/// `(b * heads, q, dh)`. Every sample reads the four tokens around it as a row copy (one
/// `index_select` of `queries x levels x points x 4` rows per image and head) weighted in one
/// batched product; the gradients reach the values through the row copy (rows added back,
/// `index_add`), the locations and the attention weights through the bilinear weights.
fn gathered(v: &Tensor, units: &Tensor, weights: &Tensor, at: &SamplingLevels) -> Result<Tensor> {
    let &[b, nh, q, nl, np, _] = units.dims() else {
        candle_core::bail!("deformable sampling: locations {:?}", units.dims())
    };
    let (s, dh) = (v.dim(1)?, v.dim(2)?);
    // The token to the left of (above) each sample, and the sample's distance past it; no
    // gradient through the floor, the bilinear weights carry it.
    let lo = units.detach().floor()?;
    let frac = (units - &lo)?;
    let corner = &at.corner;
    // Per axis, the two neighbours' coordinates and weights (zero outside the level):
    // (b, nh, q, nl, np, 2).
    let axis = |i: usize, last: &Tensor| -> Result<(Tensor, Tensor)> {
        let c = lo.narrow(D::Minus1, i, 1)?.broadcast_add(corner)?;
        let f = frac.narrow(D::Minus1, i, 1)?;
        let w = Tensor::cat(&[(1.0 - &f)?, f], D::Minus1)?;
        let inside =
            c.ge(0f32)?.to_dtype(DType::F32)? * c.broadcast_le(last)?.to_dtype(DType::F32)?;
        Ok((c.clamp(0f32, f32::MAX)?.broadcast_minimum(last)?, (w * inside?)?))
    };
    let (cols, wx) = axis(0, &at.last_col)?;
    let (rows, wy) = axis(1, &at.last_row)?;
    // The four neighbours (rows x columns): (b, nh, q, nl, np, 2, 2).
    let w = wy
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&wx.unsqueeze(D::Minus2)?)?
        .broadcast_mul(&weights.unsqueeze(D::Minus1)?)?;
    let row_start = rows.broadcast_mul(&at.width)?.broadcast_add(&at.start)?;
    let idx = row_start.unsqueeze(D::Minus1)?.broadcast_add(&cols.unsqueeze(D::Minus2)?)?;
    let k = nl * np * 4;
    // Rows of the values as one `(b * heads * s, dh)` table: each image's and head's
    // indices offset by its first row (in u32: past 2^24 rows f32 would not be exact).
    let idx = idx.to_dtype(DType::U32)?.reshape((b * nh, q * k))?;
    let idx =
        idx.broadcast_add(&SamplingLevels::row_offsets(b * nh, s, v.device())?)?.flatten_all()?;
    let w = w.to_dtype(v.dtype())?.reshape((b * nh * q, 1, k))?;
    // One row copied per sample (its backward adds rows back, `index_add`).
    let sampled = v.reshape((b * nh * s, dh))?.index_select(&idx, 0)?;
    let out = w.matmul(&sampled.reshape((b * nh * q, k, dh))?)?;
    out.reshape((b * nh, q, dh))
}

/// Deformable DETR's initial offsets' bias, `(heads, levels, points, 2)` flattened.
fn ray_grid(heads: usize, levels: usize, points: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * levels * points * 2);
    for h in 0..heads {
        let theta = h as f32 * (2.0 * std::f32::consts::PI / heads as f32);
        let (x, y) = (theta.cos(), theta.sin());
        let m = x.abs().max(y.abs());
        for _ in 0..levels {
            for p in 0..points {
                let k = (p + 1) as f32;
                out.extend([x / m * k, y / m * k]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use glip_testing::{assert_close, lcg_values};

    /// The CPU op (`glip_kernels::deformable::sample`) against candle's ops (`gathered`, the path
    /// of bf16 values and of determinism on CUDA): outputs and the gradients of the values, the
    /// locations and the attention weights, with samples inside, on and outside two levels (integer
    /// coordinates among them). The two sum the same f32 products in other orders. Values and the
    /// output's gradient are within 1 and each query's attention weights sum to 1 (a softmax), so a
    /// query's output sums k = levels x points x 4 = 24 terms of total size <= 1: each path within
    /// k x 2^-24, the two within 2 k 2^-24 = 2.9e-6. A value row's gradient sums at most q k = 120
    /// terms of total size <= q = 5 (each query's weights sum to 1): 2 x 120 x 5 x 2^-24 = 7.2e-5.
    /// A location's or weight's gradient is a few (<= 4) products with dot products of dh = 8 terms
    /// of size <= 1: 2 x (8 + 4) x 8 x 2^-24 = 1.1e-5.
    #[test]
    fn cpu_op_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let levels = [LevelShape { h: 3, w: 4, stride: 8 }, LevelShape { h: 2, w: 2, stride: 16 }];
        let at = SamplingLevels::new(&levels, &[(32.0, 24.0), (32.0, 24.0)], &dev)?;
        let (b, nh, q, nl, np, dh, s) = (2, 2, 5, 2, 3, 8, 16);
        // Values in (-2, 2) halved: within 1.
        let halved = |n: usize, seed: u32, shape: &[usize]| -> Result<Tensor> {
            Tensor::from_vec(lcg_values(n, seed), shape, &dev)? * 0.5
        };
        let v = Var::from_tensor(&halved(b * nh * s * dh, 1, &[b * nh, s, dh])?)?;
        // Columns and rows from -2 to 5 in steps of 0.25: whole numbers, fractions, outside.
        let n = b * nh * q * nl * np * 2;
        let units: Vec<f32> = (0..n).map(|i| -2.0 + ((i * 11) % 29) as f32 * 0.25).collect();
        let units = Var::from_vec(units, (b, nh, q, nl, np, 2), &dev)?;
        let logits = halved(b * nh * q * nl * np, 2, &[b, nh, q, nl * np])?;
        let weights = Var::from_tensor(
            &candle_nn::ops::softmax(&logits, D::Minus1)?.reshape((b, nh, q, nl, np, 1))?,
        )?;
        let r = halved(b * nh * q * dh, 3, &[b * nh, q, dh])?;
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let (vt, ut, wt) = (v.as_tensor(), units.as_tensor(), weights.as_tensor());
            let out = if fused {
                let samples = Tensor::cat(&[ut, wt], D::Minus1)?.reshape((b * nh, q, nl, np, 3))?;
                glip_kernels::deformable::sample(vt, &samples, &at.kernel_levels())?
            } else {
                gathered(vt, ut, wt, &at)?
            };
            let grads = (&out * &r)?.sum_all()?.backward()?;
            let grad = |x: &Var| grads.get(x).cloned().expect("a gradient");
            Ok(vec![out, grad(&v), grad(&units), grad(&weights)])
        };
        let (ours, theirs) = (run(true)?, run(false)?);
        let eps = f32::EPSILON / 2.0;
        let names = ["output", "values' gradient", "locations' gradient", "weights' gradient"];
        let atol = [48.0 * eps, 1200.0 * eps, 192.0 * eps, 192.0 * eps];
        for ((name, atol), (a, b)) in names.iter().zip(atol).zip(ours.iter().zip(&theirs)) {
            assert_close(name, a, b, atol, 0.0)?;
        }
        // The samples reach every kind of place: some outside (zero), some inside.
        let outside = theirs[2].abs()?.flatten_all()?.to_vec1::<f32>()?;
        assert!(outside.contains(&0.0) && outside.iter().any(|&g| g != 0.0));
        Ok(())
    }
}
