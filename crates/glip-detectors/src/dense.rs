//! GLIP's dense one-stage head: every location of every level of the fused image tokens
//! predicts a box relative to its point (FCOS's `l, t, r, b` distances, in strides) and
//! region-word alignment logits against the prompt's tokens (the [`TokenAlignmentHead`]),
//! optionally a centerness logit. Assignment and losses live in `glip-loss`.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use glip_core::validate::{limits, Checker, Validate};
use glip_core::{DenseOutput, Detector, Encoded, LevelShape, ModelOutput, Prediction};
use glip_heads::TokenAlignmentHead;
use glip_kernels::nn::Linear;
use serde::{Deserialize, Serialize};

/// Options of the dense head.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseHeadConfig {
    /// 3x3 convolutions (+ ReLU) of each branch's tower (GLIP's and FCOS's separate towers for
    /// the box and the token branch), run on every level with the same weights. Default 0: the
    /// branches read the fused tokens directly (on the shapes task, 250 steps at lr 5e-4: val
    /// AP50 0.07 with one layer per tower, 0.17 without; see docs/results).
    #[serde(default)]
    pub tower: usize,
    /// Predict FCOS's centerness (scores become `sqrt(score * centerness)`). Default false.
    #[serde(default)]
    pub centerness: bool,
}

/// The dense head (`dense_head.*`): `cls_tower.N.{weight,bias}` then `token_head`;
/// `bbox_tower.N.{weight,bias}` then `bbox_pred` and `centerness`.
#[derive(Debug, Clone)]
pub struct DenseHead {
    cls_tower: Vec<(Tensor, Tensor)>,
    bbox_tower: Vec<(Tensor, Tensor)>,
    bbox_pred: Linear,
    centerness: Option<Linear>,
    token_head: TokenAlignmentHead,
}

/// Largest log-distance predicted: `exp(12)` strides is far outside any image, so the clamp
/// only guards against overflow and never binds in training.
const MAX_LOG_DISTANCE: f64 = 12.0;

impl Validate for DenseHeadConfig {
    fn validate(&self, c: &mut Checker) {
        c.in_range("tower", self.tower, 0, limits::LAYERS);
    }
}

impl DenseHead {
    /// A head over `d`-wide image tokens and `text_dim`-wide text tokens.
    pub fn new(
        d: usize,
        text_dim: usize,
        cfg: &DenseHeadConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let bound = 1.0 / ((9 * d) as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        let tower = |name: &str| {
            (0..cfg.tower)
                .map(|i| {
                    let v = vb.pp(format!("{name}.{i}"));
                    Ok((
                        v.get_with_hints((d, d, 3, 3), "weight", init)?,
                        v.get_with_hints(d, "bias", init)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()
        };
        // Small weights and a zero bias: every location starts with a box of one stride to
        // each side (distance exp(0) strides), whatever the features.
        let bv = vb.pp("bbox_pred");
        let small = Init::Randn { mean: 0.0, stdev: 0.01 };
        let bbox_pred = Linear::from_tensors(
            bv.get_with_hints((4, d), "weight", small)?,
            Some(bv.get_with_hints(4, "bias", Init::Const(0.0))?),
        );
        let centerness =
            if cfg.centerness { Some(Linear::new(d, 1, vb.pp("centerness"))?) } else { None };
        Ok(Self {
            cls_tower: tower("cls_tower")?,
            bbox_tower: tower("bbox_tower")?,
            bbox_pred,
            centerness,
            token_head: TokenAlignmentHead::new(text_dim, d, vb.pp("token_head"))?,
        })
    }

    /// A tower over every level: `(b, s, d)` -> `(b, s, d)`.
    fn features(
        tower: &[(Tensor, Tensor)],
        memory: &Tensor,
        levels: &[LevelShape],
    ) -> Result<Tensor> {
        if tower.is_empty() {
            return Ok(memory.clone());
        }
        let (b, _, d) = memory.dims3()?;
        let mut out = Vec::with_capacity(levels.len());
        let mut off = 0;
        for l in levels {
            let n = l.h * l.w;
            let mut x = memory.narrow(1, off, n)?.transpose(1, 2)?.reshape((b, d, l.h, l.w))?;
            for (w, bias) in tower {
                x = glip_kernels::fused::relu(
                    &glip_kernels::conv::conv2d(&x, w, 1, 1)?
                        .broadcast_add(&bias.reshape((1, d, 1, 1))?)?,
                )?;
            }
            out.push(x.flatten_from(2)?.transpose(1, 2)?);
            off += n;
        }
        Tensor::cat(&out, 1)?.contiguous()
    }
}

/// Location centres and strides of `levels` (every level row-major, finest first), normalised
/// by each image's size: `points (b, s, 2)`, `strides (b, s, 2)`, and each location's level.
pub fn locations(
    levels: &[LevelShape],
    image_sizes: &[(f32, f32)],
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let s: usize = levels.iter().map(|l| l.h * l.w).sum();
    let b = image_sizes.len();
    let pts = LevelShape::token_centres(levels, image_sizes);
    let mut strides = Vec::with_capacity(b * s * 2);
    for &(w, h) in image_sizes {
        for l in levels {
            let st = l.stride as f32;
            strides.extend(std::iter::repeat_n([st / w, st / h], l.h * l.w).flatten());
        }
    }
    let level: Vec<usize> = match b {
        0 => Vec::new(),
        _ => levels
            .iter()
            .enumerate()
            .flat_map(|(li, l)| std::iter::repeat_n(li, l.h * l.w))
            .collect(),
    };
    Ok((
        Tensor::from_vec(pts, (b, s, 2), device)?,
        Tensor::from_vec(strides, (b, s, 2), device)?,
        level,
    ))
}

/// [`locations`] made on the host and copied to a device.
#[derive(Clone)]
struct Located {
    host_points: Tensor,
    host_strides: Tensor,
    points: Tensor,
    strides: Tensor,
    level: Vec<usize>,
}

/// Locations kept per thread, the most recent first: fixed-size batches (training, the
/// evaluation of a synthetic split) need one.
const KEPT_LOCATIONS: usize = 4;

type LocationKey = (glip_core::LevelsKey, candle_core::DeviceLocation);

thread_local! {
    static LOCATIONS: std::cell::RefCell<glip_kernels::graph::Recent<LocationKey, Located>> =
        const { std::cell::RefCell::new(glip_kernels::graph::Recent::new(KEPT_LOCATIONS)) };
}

/// [`locations`] on the host and on `device`, kept per thread for the last few level shapes and
/// image sizes: on a GPU each forward pass would otherwise upload them again (and a CUDA graph
/// cannot record that upload; a kept copy is [`glip_kernels::graph::keep_alive`]d instead).
fn device_locations(
    levels: &[LevelShape],
    image_sizes: &[(f32, f32)],
    device: &candle_core::Device,
) -> Result<Located> {
    let key: LocationKey = (LevelShape::key(levels, image_sizes), device.location());
    LOCATIONS.with(|k| {
        k.borrow_mut().get_or_make(
            key,
            |_| {
                let (host_points, host_strides, level) =
                    locations(levels, image_sizes, &candle_core::Device::Cpu)?;
                let (points, strides) =
                    (host_points.to_device(device)?, host_strides.to_device(device)?);
                Ok(Located { host_points, host_strides, points, strides, level })
            },
            |l| vec![&l.points, &l.strides],
        )
    })
}

impl Detector for DenseHead {
    fn forward(
        &self,
        x: &Encoded<'_>,
        _train: bool,
        trace: &mut dyn FnMut(&str, &[usize]),
    ) -> Result<ModelOutput> {
        let feat = Self::features(&self.cls_tower, x.memory, x.levels)?;
        let bfeat = Self::features(&self.bbox_tower, x.memory, x.levels)?;
        trace("dense head: token tower", feat.dims());
        trace("dense head: box tower", bfeat.dims());
        // Made on the host and kept there too: the dense criterion assigns on the host.
        let Located { host_points, host_strides, points, strides, level } =
            device_locations(x.levels, x.image_sizes, x.memory.device())?;
        // Distances l, t, r, b in strides -> normalised (x0, y0, x1, y1) -> cxcywh.
        let dist =
            self.bbox_pred.forward(&bfeat)?.clamp(-MAX_LOG_DISTANCE, MAX_LOG_DISTANCE)?.exp()?;
        let s2 = Tensor::cat(&[&strides, &strides], D::Minus1)?; // (b, s, 4)
        let dist = (dist * s2)?;
        let lt = dist.narrow(D::Minus1, 0, 2)?;
        let rb = dist.narrow(D::Minus1, 2, 2)?;
        let center = (&points + ((&rb - &lt)? * 0.5)?)?;
        let size = (lt + rb)?;
        let boxes = Tensor::cat(&[center, size], D::Minus1)?;
        let logits = self.token_head.logits(&feat, &x.text.tokens)?;
        trace("dense head: boxes (one per location)", boxes.dims());
        trace("dense head: token logits", logits.dims());
        let centerness = match &self.centerness {
            Some(c) => Some(c.forward(&bfeat)?.squeeze(D::Minus1)?),
            None => None,
        };
        let out = ModelOutput::new(
            Prediction::new(boxes, logits)?,
            glip_core::LogitsKind::Tokens,
            Vec::new(),
            feat,
            x.memory.clone(),
            x.text.mask.to_dtype(DType::U8)?,
        )?;
        out.with_dense(
            DenseOutput::new(points, strides, level, centerness)?
                .with_host_copies(host_points, host_strides)?,
        )
    }

    /// GLIP's per-category NMS at IoU 0.6.
    fn default_nms(&self) -> Option<f32> {
        Some(0.6)
    }

    /// With centerness, FCOS's `sqrt(score * sigmoid(centerness))`.
    fn score(&self, out: &ModelOutput, per_category: Tensor) -> Result<Tensor> {
        match out.dense().and_then(|d| d.centerness.as_ref()) {
            Some(ctr) => {
                let c = candle_nn::ops::sigmoid(ctr)?.unsqueeze(2)?; // (b, q, 1)
                per_category.broadcast_mul(&c)?.sqrt()
            }
            None => Ok(per_category),
        }
    }

    fn uses_decoder(&self) -> bool {
        false
    }

    fn default_criterion(&self) -> &str {
        "dense"
    }
}
