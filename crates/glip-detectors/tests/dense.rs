//! The dense head: one prediction per location of every level, boxes around their points,
//! and every parameter learning.

use candle_core::{DType, Device, Result, Tensor};
use glip_core::{Detector, Encoded, LevelShape, Queries, TextFeatures, Transformer};
use glip_detectors::{DenseHead, DenseHeadConfig};
use glip_testing::{assert_every_parameter_learns, fresh_vars, probe_loss};
use proptest::prelude::*;

/// The dense head never decodes; an `Encoded` still names a transformer.
struct NoTransformer;

impl Transformer for NoTransformer {
    fn encode(
        &self,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
        _: bool,
    ) -> Result<Tensor> {
        candle_core::bail!("not used")
    }
    fn decode(
        &self,
        _: &Queries,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
        _: bool,
    ) -> Result<Vec<Tensor>> {
        candle_core::bail!("not used")
    }
}

fn text(b: usize, t: usize, d: usize) -> TextFeatures {
    let dev = Device::Cpu;
    TextFeatures::new(
        Tensor::randn(0f32, 1.0, (b, t, d), &dev).unwrap(),
        None,
        Tensor::ones((b, t), DType::U8, &dev).unwrap(),
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn one_box_per_location_centred_on_its_point_at_initialisation(
        b in 1usize..3, n_levels in 1usize..3, h in 1usize..6, w in 1usize..6, t in 2usize..7,
        tower in 0usize..2, centerness in any::<bool>(),
    ) {
        let (d, dt) = (16, 12);
        let (_vm, vb) = fresh_vars();
        let head = DenseHead::new(d, dt, &DenseHeadConfig { tower, centerness }, vb).unwrap();
        // Level k halves the previous one (rounding up), stride 8 * 2^k.
        let mut levels = vec![LevelShape { h, w, stride: 8 }];
        for k in 1..n_levels {
            let p = levels[k - 1];
            levels.push(LevelShape { h: p.h.div_ceil(2), w: p.w.div_ceil(2), stride: p.stride * 2 });
        }
        let s: usize = levels.iter().map(|l| l.h * l.w).sum();
        let memory = Tensor::randn(0f32, 1.0, (b, s, d), &Device::Cpu).unwrap();
        let sizes: Vec<(f32, f32)> = (0..b).map(|i| ((w * 8) as f32 - i as f32, (h * 8) as f32)).collect();
        let tf = text(b, t, dt);
        let x = Encoded { memory: &memory, memory_mask: None, pos: None, levels: &levels, image_sizes: &sizes, text: &tf, transformer: &NoTransformer, targets: None };
        let out = head.forward(&x, false, &mut |_, _| {}).unwrap();
        prop_assert_eq!(out.pred.pred_boxes.dims(), &[b, s, 4]);
        prop_assert_eq!(out.pred.pred_logits.dims(), &[b, s, t]);
        prop_assert!(out.aux.is_empty());
        let dense = out.dense().unwrap();
        prop_assert_eq!(dense.points.dims(), &[b, s, 2]);
        prop_assert_eq!(dense.level.len(), s);
        prop_assert!(dense.level.windows(2).all(|p| p[0] <= p[1]), "levels in order");
        prop_assert_eq!(dense.centerness.as_ref().map(|c| c.dims().to_vec()), centerness.then(|| vec![b, s]));
        // Small initial weights: distances close to exp(0) = one stride on every side.
        let boxes: Vec<Vec<Vec<f32>>> = out.pred.pred_boxes.to_vec3().unwrap();
        let pts: Vec<Vec<Vec<f32>>> = dense.points.to_vec3().unwrap();
        let st: Vec<Vec<Vec<f32>>> = dense.strides.to_vec3().unwrap();
        for i in 0..b {
            for q in 0..s {
                let (bx, p, sd) = (&boxes[i][q], &pts[i][q], &st[i][q]);
                prop_assert!((bx[0] - p[0]).abs() < 0.2 * sd[0] && (bx[1] - p[1]).abs() < 0.2 * sd[1], "box {:?} point {:?}", bx, p);
                prop_assert!((bx[2] / (2.0 * sd[0]) - 1.0).abs() < 0.2 && (bx[3] / (2.0 * sd[1]) - 1.0).abs() < 0.2, "box {:?} stride {:?}", bx, sd);
                // Points are the pixel centres of their stride cells, normalised by the image.
                prop_assert!(p[0] > 0.0 && p[1] > 0.0);
            }
        }
        prop_assert!((pts[0][0][0] - 4.0 / sizes[0].0).abs() < 1e-6);
        prop_assert_eq!(head.default_nms(), Some(0.6));
    }
}

#[test]
fn every_parameter_of_the_dense_head_learns() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let head = DenseHead::new(16, 12, &DenseHeadConfig { tower: 2, centerness: true }, vb)?;
    let levels = [LevelShape { h: 4, w: 3, stride: 8 }, LevelShape { h: 2, w: 2, stride: 16 }];
    let memory = Tensor::randn(0f32, 1.0, (2, 16, 16), &Device::Cpu)?;
    let tf = text(2, 5, 12);
    let sizes = [(24.0, 32.0), (24.0, 30.0)];
    let x = Encoded {
        memory: &memory,
        memory_mask: None,
        pos: None,
        levels: &levels,
        image_sizes: &sizes,
        text: &tf,
        transformer: &NoTransformer,
        targets: None,
    };
    let out = head.forward(&x, true, &mut |_, _| {})?;
    let ctr = out.dense().and_then(|d| d.centerness.clone()).expect("centerness");
    let loss = ((probe_loss(&out.pred.pred_boxes)? + probe_loss(&out.pred.pred_logits)?)?
        + probe_loss(&ctr)?)?;
    assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)
}
