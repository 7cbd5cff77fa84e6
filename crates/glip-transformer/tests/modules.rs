//! Gradients, shapes and padding invariance of the transformer crate's modules.

use candle_core::{DType, Device, Result, Tensor};
use glip_core::{
    Fusion, LevelShape, Queries, QueryGenerator, QueryInputs, TextFeatures, Transformer,
};
use glip_testing::{assert_close, assert_every_parameter_learns, fresh_vars, probe_loss};
use glip_transformer::{
    sine_position_encoding, Activation, BiAttentionFusion, DeformableAttention, DetrTransformer,
    EncoderAttentionKind, FeatureEnhancer, FeatureEnhancerConfig, FusionResidual, LearnedQueries,
    Reference, SamplingLevels, SeedQueries, TextAttendQueries, TransformerConfig,
};
use proptest::prelude::*;

const D: usize = 16;
const DT: usize = 12;

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn cfg(pre_norm: bool, activation: Activation) -> TransformerConfig {
    TransformerConfig { pre_norm, activation, ..TransformerConfig::new(D, 4, 2, 2, 32) }
}

/// `(b, n)` u8 mask with the first `real[i]` positions of row `i` set.
fn mask(real: &[usize], n: usize) -> Tensor {
    let v: Vec<u8> = real.iter().flat_map(|&r| (0..n).map(move |j| (j < r) as u8)).collect();
    Tensor::from_vec(v, (real.len(), n), &Device::Cpu).unwrap()
}

/// A two-layer feature enhancer over image tokens of width `D` (`kind` attention, one level)
/// and text of width `DT`.
fn enhancer(kind: EncoderAttentionKind, vb: candle_nn::VarBuilder<'static>) -> FeatureEnhancer {
    let image = TransformerConfig {
        dropout: 0.0,
        encoder_attention: kind,
        encoder_points: 2,
        ..cfg(false, Activation::Relu)
    };
    let config = FeatureEnhancerConfig {
        layers: 2,
        heads: 4,
        embed: Some(8),
        text_heads: 3,
        text_feedforward: 20,
    };
    FeatureEnhancer::new(&image, 1, DT, &config, vb).unwrap()
}

fn text(b: usize, t: usize) -> TextFeatures {
    TextFeatures::new(
        randn(&[b, t, DT]),
        Some(randn(&[b, DT])),
        Tensor::ones((b, t), DType::U8, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

#[test]
fn every_transformer_parameter_learns_post_and_pre_norm() -> Result<()> {
    for (pre, act) in [(false, Activation::Relu), (true, Activation::Gelu)] {
        let (vm, vb) = fresh_vars();
        let t = DetrTransformer::new(cfg(pre, act), vb)?;
        let (src, pos) = (randn(&[2, 9, D]), randn(&[2, 9, D]));
        let m = mask(&[9, 6], 9);
        let memory = t.encode(&src, Some(&m), Some(&pos), true)?;
        let q = Queries {
            content: randn(&[2, 5, D]),
            pos: Some(randn(&[2, 5, D])),
            reference_boxes: None,
        };
        let hs = t.decode(&q, &memory, Some(&m), Some(&pos), true)?;
        let mut loss = probe_loss(&memory)?;
        for h in &hs {
            loss = (loss + probe_loss(h)?)?;
        }
        assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)?;
    }
    Ok(())
}

#[test]
fn every_query_generator_and_fusion_parameter_learns() -> Result<()> {
    let tf = text(2, 7);
    let memory = randn(&[2, 9, D]);
    let inputs = QueryInputs { text: &tf, memory: &memory, memory_mask: None };
    let gens: Vec<(&str, Box<dyn Fn(candle_nn::VarBuilder<'static>) -> Box<dyn QueryGenerator>>)> = vec![
        ("seed", Box::new(|vb| Box::new(SeedQueries::new(DT, D, 5, vb).unwrap()))),
        ("learned", Box::new(|vb| Box::new(LearnedQueries::new(D, 5, vb).unwrap()))),
        ("text-attend", Box::new(|vb| Box::new(TextAttendQueries::new(DT, D, 5, 4, vb).unwrap()))),
    ];
    for (name, make) in gens {
        let (vm, vb) = fresh_vars();
        let g = make(vb);
        let q = g.forward(&inputs, true)?;
        assert_eq!(q.content.dims(), &[2, 5, D], "{name}");
        let mut loss = probe_loss(&q.content)?;
        if let Some(p) = &q.pos {
            loss = (loss + probe_loss(p)?)?;
        }
        assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)?;
    }
    for residual in [FusionResidual::Input, FusionResidual::Normed] {
        let (vm, vb) = fresh_vars();
        let f = BiAttentionFusion::new(D, DT, 16, 4, 0.1, vb)?.with_residual(residual);
        let (img, txt) = f.forward(&memory, None, &tf.tokens, &tf.mask, true)?;
        let loss = (probe_loss(&img)? + probe_loss(&txt)?)?;
        assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)?;
    }
    // The feature enhancer with either kind of image layer, its text whole or in sub-sentences
    // (pairs of tokens): every parameter of both layers.
    let pairs = glip_core::TextSegments::new(
        Tensor::from_vec((0..14u32).map(|i| i % 7 % 2).collect(), (2, 7), &Device::Cpu)?,
        Tensor::from_vec((0..14u32).map(|i| i % 7 / 2 * 2).collect(), (2, 7), &Device::Cpu)?,
    )?;
    let kinds = [EncoderAttentionKind::Global, EncoderAttentionKind::Deformable];
    for (kind, segments) in kinds.into_iter().flat_map(|k| [(k, None), (k, Some(&pairs))]) {
        let (vm, vb) = fresh_vars();
        let f = enhancer(kind, vb);
        let levels = [LevelShape { h: 3, w: 3, stride: 8 }];
        let layout = glip_core::TokenLayout {
            pos: Some(&memory),
            levels: &levels,
            image_sizes: &[(24.0, 24.0), (20.0, 17.0)],
            text: segments,
        };
        let (img, txt) = f.forward_at(&memory, None, layout, &tf.tokens, &tf.mask, true)?;
        let loss = (probe_loss(&img)? + probe_loss(&txt)?)?;
        assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)?;
    }
    Ok(())
}

#[test]
fn dropout_acts_in_training_only() -> Result<()> {
    let (_vm, vb) = fresh_vars();
    let t = DetrTransformer::new(
        TransformerConfig { dropout: 0.5, ..cfg(false, Activation::Relu) },
        vb,
    )?;
    let src = randn(&[1, 6, D]);
    let a = t.encode(&src, None, None, false)?;
    assert_close("eval is deterministic", &t.encode(&src, None, None, false)?, &a, 0.0, 0.0)?;
    let diff = (t.encode(&src, None, None, true)? - &a)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert!(diff > 1e-3, "training output equals eval output: dropout inactive");
    Ok(())
}

#[test]
fn sine_encoding_follows_detr() -> Result<()> {
    // One 2x3 unpadded map, d = 8: y_embed = row + 1 normalised by 2, x by 3, times 2*pi.
    let m = Tensor::ones((1, 2, 3), DType::U8, &Device::Cpu)?;
    let pos: Vec<Vec<f32>> =
        sine_position_encoding(&m, 8, 10000.0, &Device::Cpu)?.squeeze(0)?.to_vec2()?;
    let two_pi = 2.0 * std::f64::consts::PI;
    for (k, row) in pos.iter().enumerate() {
        let (i, j) = (k / 3, k % 3);
        let y = (i as f64 + 1.0) / (2.0 + 1e-6) * two_pi;
        let x = (j as f64 + 1.0) / (3.0 + 1e-6) * two_pi;
        let dim_t = |c: usize| 10000f64.powf(2.0 * (c / 2) as f64 / 4.0);
        let want: Vec<f32> = (0..4)
            .map(|c| if c % 2 == 0 { (y / dim_t(c)).sin() } else { (y / dim_t(c)).cos() } as f32)
            .chain((0..4).map(
                |c| if c % 2 == 0 { (x / dim_t(c)).sin() } else { (x / dim_t(c)).cos() } as f32,
            ))
            .collect();
        for (a, b) in row.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "position {k}: {row:?} vs {want:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Encoder and decoder: shapes for any batch/token/query count, and appending masked image
    /// tokens changes nothing at real positions.
    #[test]
    fn transformer_shapes_and_image_padding(b in 1usize..3, s in 1usize..10, extra in 1usize..5, q in 1usize..7, pre in any::<bool>()) {
        let (_vm, vb) = fresh_vars();
        let t = DetrTransformer::new(cfg(pre, Activation::Relu), vb).unwrap();
        let (src, pos) = (randn(&[b, s, D]), randn(&[b, s, D]));
        let queries = Queries { content: randn(&[b, q, D]), pos: Some(randn(&[b, q, D])), reference_boxes: None };
        let mem = t.encode(&src, None, Some(&pos), false).unwrap();
        let hs = t.decode(&queries, &mem, None, Some(&pos), false).unwrap();
        prop_assert_eq!(mem.dims(), &[b, s, D]);
        prop_assert_eq!(hs.len(), 2);
        prop_assert_eq!(hs[1].dims(), &[b, q, D]);
        let srcp = Tensor::cat(&[&src, &randn(&[b, extra, D])], 1).unwrap();
        let posp = Tensor::cat(&[&pos, &randn(&[b, extra, D])], 1).unwrap();
        let m = mask(&vec![s; b], s + extra);
        let memp = t.encode(&srcp, Some(&m), Some(&posp), false).unwrap();
        assert_close("memory at real tokens", &memp.narrow(1, 0, s).unwrap(), &mem, 1e-5, 1e-4).unwrap();
        let hsp = t.decode(&queries, &memp, Some(&m), Some(&posp), false).unwrap();
        assert_close("decoder output", &hsp[1], &hs[1], 1e-5, 1e-4).unwrap();
    }

    /// Fusion and text-attend queries: padding text or image tokens changes nothing real.
    #[test]
    fn fusion_and_queries_ignore_padding(b in 1usize..3, s in 1usize..8, t in 1usize..8, extra in 1usize..4) {
        let (_vm, vb) = fresh_vars();
        let f = BiAttentionFusion::new(D, DT, 16, 4, 0.0, vb.pp("fusion")).unwrap();
        let g = TextAttendQueries::new(DT, D, 4, 4, vb.pp("queries")).unwrap();
        let (img, txt) = (randn(&[b, s, D]), randn(&[b, t, DT]));
        let tm = Tensor::ones((b, t), DType::U8, &Device::Cpu).unwrap();
        let (fi, ft) = f.forward(&img, None, &txt, &tm, false).unwrap();
        prop_assert_eq!(fi.dims(), &[b, s, D]);
        prop_assert_eq!(ft.dims(), &[b, t, DT]);
        let imgp = Tensor::cat(&[&img, &randn(&[b, extra, D])], 1).unwrap();
        let txtp = Tensor::cat(&[&txt, &randn(&[b, extra, DT])], 1).unwrap();
        let (im, tmp) = (mask(&vec![s; b], s + extra), mask(&vec![t; b], t + extra));
        let (fip, ftp) = f.forward(&imgp, Some(&im), &txtp, &tmp, false).unwrap();
        assert_close("fused image", &fip.narrow(1, 0, s).unwrap(), &fi, 1e-5, 1e-4).unwrap();
        assert_close("fused text", &ftp.narrow(1, 0, t).unwrap(), &ft, 1e-5, 1e-4).unwrap();
        // Grounding DINO's feature enhancer (global image layers: a flat token list).
        let e = enhancer(EncoderAttentionKind::Global, vb.pp("enhancer"));
        let (ei, et) = e.forward(&img, None, &txt, &tm, false).unwrap();
        let (eip, etp) = e.forward(&imgp, Some(&im), &txtp, &tmp, false).unwrap();
        assert_close("enhanced image", &eip.narrow(1, 0, s).unwrap(), &ei, 1e-5, 1e-4).unwrap();
        assert_close("enhanced text", &etp.narrow(1, 0, t).unwrap(), &et, 1e-5, 1e-4).unwrap();
        let tf = TextFeatures::new(txt.clone(), None, tm).unwrap();
        let tfp = TextFeatures::new(txtp, None, tmp).unwrap();
        let q = g.forward(&QueryInputs { text: &tf, memory: &img, memory_mask: None }, false).unwrap();
        let qp = g.forward(&QueryInputs { text: &tfp, memory: &imgp, memory_mask: Some(&im) }, false).unwrap();
        prop_assert_eq!(q.content.dims(), &[b, 4, D]);
        assert_close("text-attend queries", &qp.content, &q.content, 1e-5, 1e-4).unwrap();
        // The seed and learned generators: (b, q, d) for any batch and query count.
        let tf = TextFeatures::new(txt, Some(randn(&[b, DT])), tf.mask.clone()).unwrap();
        let inputs = QueryInputs { text: &tf, memory: &img, memory_mask: None };
        let nq = s + t;
        let seed = SeedQueries::new(DT, D, nq, vb.pp("seed")).unwrap().forward(&inputs, false).unwrap();
        let learned = LearnedQueries::new(D, nq, vb.pp("learned")).unwrap().forward(&inputs, false).unwrap();
        prop_assert_eq!(seed.content.dims(), &[b, nq, D]);
        prop_assert_eq!(learned.pos.as_ref().unwrap().dims(), &[b, nq, D]);
    }
}

/// `(1, h * w, D)` tokens of a `(h, w)` grid inside a `(hp, wp)` one: the real ones at the top
/// left, random ones around them, and the `(1, hp * wp)` mask of the real ones.
fn embed_grid(real: &Tensor, (h, w): (usize, usize), (hp, wp): (usize, usize)) -> (Tensor, Tensor) {
    let noise = randn(&[hp, wp, D]);
    let real = real.reshape((h, w, D)).unwrap();
    let top =
        Tensor::cat(&[&real, &noise.narrow(0, 0, h).unwrap().narrow(1, w, wp - w).unwrap()], 1)
            .unwrap();
    let grid = Tensor::cat(&[&top, &noise.narrow(0, h, hp - h).unwrap()], 0).unwrap();
    let m: Vec<u8> = (0..hp * wp).map(|k| u8::from(k / wp < h && k % wp < w)).collect();
    (
        grid.reshape((1, hp * wp, D)).unwrap(),
        Tensor::from_vec(m, (1, hp * wp), &Device::Cpu).unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Deformable attention over an image alone and over the same image padded into a larger
    /// batch grid (its extra tokens random and masked): the same output, as sampling is placed
    /// by the image's own size and a padded token is a zero value, as a location outside the
    /// image's own grid is. Two levels (strides 8 and 16), random weights, boxes anywhere.
    #[test]
    fn deformable_attention_ignores_padding(h in 1usize..6, w in 1usize..6, eh in 0usize..4, ew in 1usize..4, cut_w in 0usize..8, cut_h in 0usize..8, q in 1usize..5, points in 1usize..4) {
        let (vm, vb) = fresh_vars();
        let attn = DeformableAttention::new(D, 4, 2, points, vb).unwrap();
        for var in vm.all_vars() {
            var.set(&(randn(var.dims()) * 0.5).unwrap()).unwrap();
        }
        // The image: w * 8 - cut_w by h * 8 - cut_h pixels, so h x w tokens at stride 8 and
        // their halves (rounded up) at 16.
        let size = ((w * 8 - cut_w) as f32, (h * 8 - cut_h) as f32);
        let grid = |h: usize, w: usize| [(h, w), (h.div_ceil(2), w.div_ceil(2))];
        let (alone, padded) = (grid(h, w), grid(h + eh, w + ew));
        let level = |(h, w): (usize, usize), stride| LevelShape { h, w, stride };
        let shapes = |g: [(usize, usize); 2]| [level(g[0], 8), level(g[1], 16)];
        let mut values = Vec::new();
        let (mut padded_values, mut masks) = (Vec::new(), Vec::new());
        for (a, p) in alone.into_iter().zip(padded) {
            let v = randn(&[1, a.0 * a.1, D]);
            let (vp, m) = embed_grid(&v, a, p);
            values.push(v);
            padded_values.push(vp);
            masks.push(m);
        }
        let value = Tensor::cat(&values, 1).unwrap();
        let (value_p, mask_p) = (Tensor::cat(&padded_values, 1).unwrap(), Tensor::cat(&masks, 1).unwrap());
        let query = randn(&[1, q, D]);
        let u = Tensor::rand(0f32, 1.0, (1, q, 4), &Device::Cpu).unwrap();
        let boxes = Tensor::cat(&[u.narrow(2, 0, 2).unwrap(), u.narrow(2, 2, 2).unwrap().affine(0.9, 0.05).unwrap()], 2).unwrap();
        let at = SamplingLevels::new(&shapes(alone), &[size], &Device::Cpu).unwrap();
        let at_p = SamplingLevels::new(&shapes(padded), &[size], &Device::Cpu).unwrap();
        let out = attn.forward(&query, Reference::Boxes(&boxes), &value, None, &at).unwrap();
        let out_p = attn.forward(&query, Reference::Boxes(&boxes), &value_p, Some(&mask_p), &at_p).unwrap();
        prop_assert_eq!(out.dims(), &[1, q, D]);
        assert_close("deformable attention, padded", &out_p, &out, 1e-5, 1e-4).unwrap();
    }
}

/// Every parameter of a new deformable attention learns (its offsets' and attention weights'
/// matrices start at zero).
#[test]
fn every_deformable_attention_parameter_learns() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let attn = DeformableAttention::new(D, 4, 2, 3, vb)?;
    let shapes = [LevelShape { h: 4, w: 4, stride: 8 }, LevelShape { h: 2, w: 2, stride: 16 }];
    let at = SamplingLevels::new(&shapes, &[(32.0, 32.0), (28.0, 20.0)], &Device::Cpu)?;
    let boxes = Tensor::rand(0f32, 1.0, (2, 5, 4), &Device::Cpu)?.affine(0.8, 0.1)?;
    let out =
        attn.forward(&randn(&[2, 5, D]), Reference::Boxes(&boxes), &randn(&[2, 20, D]), None, &at)?;
    let grads = probe_loss(&out)?.backward()?;
    assert_every_parameter_learns(&vm, &grads, |_| false)
}
