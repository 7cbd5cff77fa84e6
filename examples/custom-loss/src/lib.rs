//! A worked example of extending glip-rs from your own crate: a new criterion and a new query
//! generator, registered under new names, run through the `glip` command line built on
//! [`glip_cli::main_with`] (`src/main.rs`, the binary `custom-glip`) in an ablation grid beside
//! the built-ins (`ablation.toml`).
//!
//! - `inside-box` (a criterion for the dense head, `loss.criterion = {type = "inside-box"}`):
//!   every location whose point lies inside a ground-truth box is assigned to the smallest
//!   such box (FCOS without center sampling or scale ranges); binary cross-entropy on the
//!   region-word logits against that box's tokens, L1 on the boxes of the assigned locations,
//!   both normalised by the number of assigned locations.
//! - `mean-text` (a query generator for the decoder design,
//!   `model.query_generator = {type = "mean-text"}`): each query is a learned embedding plus a
//!   linear map of the prompt's mean token feature.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use glip_core::{
    Criterion, Losses, Match, ModelOutput, Queries, QueryGenerator, QueryInputs, Target,
};
use glip_train::config::Registry;
use serde::{Deserialize, Serialize};

/// The built-ins and this crate's components.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register_criterion("inside-box", |_, p: InsideBoxParams, ()| {
        Ok(Box::new(InsideBox(p)) as Box<dyn Criterion>)
    });
    r.register_query_generator("mean-text", |ctx, _: MeanTextParams, vb| {
        Ok(Box::new(MeanTextQueries::new(ctx.text_dim, ctx.d_model, ctx.model.num_queries, vb)?)
            as Box<dyn QueryGenerator>)
    });
    r
}

/// Weights of the `inside-box` criterion.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsideBoxParams {
    /// Weight of the token cross-entropy. Default 1.
    #[serde(default = "one")]
    pub w_cls: f64,
    /// Weight of the box L1. Default 2.
    #[serde(default = "two")]
    pub w_box: f64,
}

fn one() -> f64 {
    1.0
}

fn two() -> f64 {
    2.0
}

/// The `inside-box` criterion.
#[derive(Debug, Clone, Copy)]
pub struct InsideBox(pub InsideBoxParams);

/// `(x0, y0, x1, y1)` of a cxcywh box.
fn corners(b: &[f32]) -> [f32; 4] {
    [b[0] - b[2] / 2.0, b[1] - b[3] / 2.0, b[0] + b[2] / 2.0, b[1] + b[3] / 2.0]
}

impl InsideBox {
    /// For every location of one image, the smallest ground-truth box containing its point.
    pub fn assign(points: &[[f32; 2]], boxes: &[[f32; 4]]) -> Vec<Option<usize>> {
        points
            .iter()
            .map(|p| {
                boxes
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| {
                        let [x0, y0, x1, y1] = corners(&b[..]);
                        p[0] > x0 && p[0] < x1 && p[1] > y0 && p[1] < y1
                    })
                    .min_by(|(_, a), (_, b)| (a[2] * a[3]).total_cmp(&(b[2] * b[3])))
                    .map(|(k, _)| k)
            })
            .collect()
    }
}

impl Criterion for InsideBox {
    fn forward(&self, out: &ModelOutput, targets: &[Target]) -> Result<Losses> {
        let Some(dense) = out.dense() else {
            candle_core::bail!(
                "loss.criterion \"inside-box\" needs a dense head's locations (model.detector.type = \"dense\")"
            )
        };
        let logits = &out.pred.pred_logits;
        let (b, q, t) = logits.dims3()?;
        let dev = logits.device();
        let points: Vec<Vec<f32>> = dense.points.to_dtype(DType::F32)?.flatten_to(1)?.to_vec2()?;
        let mut cls_target = vec![0f32; b * q * t];
        let (mut pos, mut gt_boxes) = (Vec::<u32>::new(), Vec::<f32>::new());
        let mut matches = Vec::with_capacity(b);
        for (i, target) in targets.iter().enumerate().take(b) {
            let pts: Vec<[f32; 2]> =
                points[i * q..(i + 1) * q].iter().map(|p| [p[0], p[1]]).collect();
            let boxes: Vec<[f32; 4]> = target
                .boxes
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .into_iter()
                .map(|v| [v[0], v[1], v[2], v[3]])
                .collect();
            let pm: Vec<Vec<f32>> = match &target.positive_map {
                Some(pm) => pm.to_dtype(DType::F32)?.to_vec2()?,
                None => candle_core::bail!("loss.criterion \"inside-box\" needs token targets (model.head.type = \"token\")"),
            };
            let mut m = Match::default();
            for (j, a) in Self::assign(&pts, &boxes).into_iter().enumerate() {
                let Some(k) = a else { continue };
                let n = pm[k].len().min(t);
                let o = (i * q + j) * t;
                cls_target[o..o + n].copy_from_slice(&pm[k][..n]);
                pos.push((i * q + j) as u32);
                gt_boxes.extend_from_slice(&boxes[k]);
                m.query.push(j);
                m.target.push(k);
            }
            matches.push(m);
        }
        let count = pos.len();
        let num_pos = count.max(1) as f64;
        // Binary cross-entropy with logits, stable form: max(x, 0) - x y + log(1 + exp(-|x|)).
        let y = Tensor::from_vec(cls_target, (b, q, t), dev)?;
        let bce =
            ((logits.relu()? - (logits * &y)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let mask = out.text_mask.to_dtype(DType::F32)?.unsqueeze(1)?;
        let cls = (bce.broadcast_mul(&mask)?.sum_all()? / num_pos)?;
        let l1 = if pos.is_empty() {
            out.pred.pred_boxes.sum_all()?.affine(0.0, 0.0)?
        } else {
            let n = pos.len();
            let idx = Tensor::from_vec(pos, n, dev)?;
            let pred = out.pred.pred_boxes.reshape((b * q, 4))?.index_select(&idx, 0)?;
            let gt = Tensor::from_vec(gt_boxes, (n, 4), dev)?;
            ((pred - gt)?.abs()?.sum_all()? / num_pos)?
        };
        let total = ((&cls * self.0.w_cls)? + (&l1 * self.0.w_box)?)?;
        let terms = vec![("loss_cls".into(), cls), ("loss_bbox".into(), l1)];
        // Both terms are sums divided by `max(count, 1)`: an accumulated step
        // (`run.accumulate`) is then normalised by the count of all its batches.
        Ok(Losses::new(total, terms, matches).normalised_by(count as f64))
    }
}

/// `mean-text` takes no parameters (a misspelt one is an error).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeanTextParams {}

/// Queries from the prompt's mean token: `embed[k] + W mean(text tokens)`.
#[derive(Debug, Clone)]
pub struct MeanTextQueries {
    embed: Tensor,
    proj: candle_nn::Linear,
}

impl MeanTextQueries {
    /// `text_dim`-wide text in, `n` queries of width `d` out.
    pub fn new(text_dim: usize, d: usize, n: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let embed =
            vb.get_with_hints((n, d), "embed", candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 })?;
        Ok(Self { embed, proj: candle_nn::linear(text_dim, d, vb.pp("proj"))? })
    }
}

impl QueryGenerator for MeanTextQueries {
    fn forward(&self, inputs: &QueryInputs<'_>, _train: bool) -> Result<Queries> {
        let text = inputs.text;
        let mask = text.mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (b, t, 1)
        let sum = text.tokens.broadcast_mul(&mask)?.sum(1)?; // (b, dt)
        let mean = sum.broadcast_div(&mask.sum(1)?.clamp(1.0, f64::INFINITY)?)?;
        let m = candle_nn::Module::forward(&self.proj, &mean)?.unsqueeze(1)?; // (b, 1, d)
        let content = self.embed.unsqueeze(0)?.broadcast_add(&m)?;
        Ok(Queries { content, pos: None, reference_boxes: None })
    }

    fn num_queries(&self) -> usize {
        self.embed.dims()[0]
    }
}
