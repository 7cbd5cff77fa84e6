//! Timing of the seed model, the same work as `../shared/reference/bench_torch.py`: same presets,
//! random weights, random token ids, the same three targets per image; a training step is
//! forward, the DETR criterion, backward, gradient-norm clipping at 0.1 and an AdamW step with
//! the backbone stem and layer1 frozen (backbone and text lr 1e-5, the rest 1e-4).

use crate::config::{
    BackboneConfig, BertParams, BoxHeadConfig, ClassParams, DetectorConfig, FusionConfig,
    HeadConfig, ModelConfig, NoParams, QueryGeneratorConfig, ResnetParams, TextConfig,
    TransformerSlot,
};
use crate::optim::{AdamW, OptimConfig, Schedule};
use crate::trainer::trainable_vars;
use candle_core::{DType, Device, Result, Tensor};
use glip_core::{Criterion, ImageBatch, Target, TextBatch};
use glip_loss::{HungarianMatcher, LossConfig, SetCriterion};
use glip_transformer::TransformerConfig;
use serde::Serialize;
use std::time::Instant;

/// The presets of `bench_torch.py`.
pub const PRESETS: [&str; 2] = ["seed-r50", "seed-r18"];

/// The model of a preset: the seed tutorial's architecture (C5 features, 1x1 input projection,
/// no positional encoding, no auxiliary outputs, dropout 0.1, fixed-class head).
pub fn preset(name: &str) -> Result<ModelConfig> {
    // (depth, text hidden, text layers, text heads, d, heads, enc, dec, ff, queries, classes)
    let p = match name {
        "seed-r50" => (50, 768, 12, 12, 256, 8, 6, 6, 2048, 100, 91),
        "seed-r18" => (18, 256, 4, 4, 128, 4, 3, 3, 512, 50, 10),
        other => candle_core::bail!("bench: unknown preset {other:?} ({})", PRESETS.join(", ")),
    };
    let (depth, th, tl, tn, d, nh, enc, dec, ff, queries, classes) = p;
    Ok(ModelConfig {
        backbone: BackboneConfig::Resnet(ResnetParams {
            depth,
            freeze_at: 2,
            trainable_bn: false,
            stages: 4,
        })
        .into(),
        feature_level: None,
        feature_levels: None,
        fpn: false,
        detector: DetectorConfig::Decoder(NoParams {}).into(),
        text: TextConfig::Bert(BertParams {
            tokenizer: Default::default(),
            folder: None,
            hidden: Some(th),
            layers: Some(tl),
            heads: Some(tn),
            intermediate: Some(4 * th),
            vocab_size: Some(30522),
            dropout: 0.1,
            frozen: false,
        })
        .into(),
        transformer: TransformerSlot::Detr(TransformerConfig {
            dropout: 0.1,
            ..TransformerConfig::new(d, nh, enc, dec, ff)
        })
        .into(),
        num_queries: queries,
        query_generator: QueryGeneratorConfig::Seed(NoParams {}).into(),
        fusion: FusionConfig::None(NoParams {}).into(),
        text_attention: Default::default(),
        box_head: BoxHeadConfig::Linear(NoParams {}).into(),
        head: HeadConfig::Class(ClassParams { num_classes: classes }).into(),
        position_encoding: false,
        aux_loss: false,
        weights: Default::default(),
        allow_missing: Vec::new(),
        freeze: Vec::new(),
        trainable: None,
        prompt_positions: 0,
    })
}

/// What to time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchSpec {
    /// A preset name.
    pub preset: String,
    /// `infer` or `train`.
    pub train: bool,
    /// Images per batch.
    pub batch: usize,
    /// Square image side.
    pub size: usize,
    /// Timed iterations (after one warm-up).
    pub iters: usize,
    /// What convolutions' products (and inference's linear layers) compute in.
    pub precision: crate::Precision,
    /// TF32 for f32 products on CUDA ([`glip_kernels::cuda::set_tf32`]).
    pub tf32: bool,
    /// Also time each phase of an iteration (forward, loss, backward, optimiser), the device
    /// synchronised at each boundary: where the time goes (the synchronisations take away the
    /// overlap of host and GPU between phases, so the phases can add up to more than a plain
    /// iteration).
    pub phases: bool,
    /// Inference on CUDA: record the forward pass (and the softmax) as a CUDA graph after the
    /// warm-up and time its replays ([`glip_kernels::graph`]; each iteration copies the inputs
    /// into the graph's buffers and the outputs out). Ignored elsewhere; a pass that cannot be
    /// recorded is timed eagerly, with the reason on stderr.
    pub graph: bool,
}

/// The timings, as `bench_torch.py` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Preset.
    pub preset: String,
    /// `infer` or `train`.
    pub mode: &'static str,
    /// Batch.
    pub batch: usize,
    /// Image side.
    pub size: usize,
    /// Median seconds per iteration.
    pub median_s: f64,
    /// Fastest iteration.
    pub min_s: f64,
    /// `f32` or `bf16` (what the convolutions computed in).
    pub precision: &'static str,
    /// Whether f32 products on CUDA could use TF32.
    pub tf32: bool,
    /// Whether the timed iterations replayed a CUDA graph ([`BenchSpec::graph`]).
    pub graph: bool,
    /// Training: the loss of the warm-up step and of the last timed step (the same batch
    /// every step, so it falls as AdamW fits it; a sanity check of the step's arithmetic, read
    /// back outside the timed region).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<[f32; 2]>,
    /// With `phases`: median seconds of each phase, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Vec<(String, f64)>>,
    /// Every timed iteration.
    pub times: Vec<f64>,
    /// `candle` and its version.
    pub candle: &'static str,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Worker threads (`RAYON_NUM_THREADS`).
    pub threads: usize,
}

/// A deterministic stand-in for torch's `randn`/`randint` inputs (the timing does not depend
/// on the values).
fn inputs(spec: &BenchSpec, dev: &Device) -> Result<(ImageBatch, TextBatch, Vec<Target>)> {
    let mut rng = glip_core::rng::Rng::new(0);
    let (b, s, t) = (spec.batch, spec.size, 16);
    let pixels: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.normal()).collect();
    let images = ImageBatch::unpadded(Tensor::from_vec(pixels, (b, 3, s, s), dev)?)?;
    let mut ids = Vec::with_capacity(b * t);
    for _ in 0..b {
        ids.push(101u32);
        ids.extend((1..t - 1).map(|_| 1000 + rng.below(29000) as u32));
        ids.push(102);
    }
    let text = TextBatch::new(
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::ones((b, t), DType::U8, dev)?,
        vec![vec![(0, 0); t]; b],
        vec![String::new(); b],
    )?;
    // Made on the host and moved, as the collate does: the criterion reads the labels there.
    let host = &Device::Cpu;
    let boxes =
        Tensor::new(&[[0.3f32, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4], [0.5, 0.2, 0.1, 0.1]], host)?;
    let labels = Tensor::new(&[1u32, 5, 7], host)?;
    let targets = (0..b)
        .map(|_| Target::new(boxes.clone(), Some(labels.clone()), None)?.to_device(dev))
        .collect::<Result<Vec<_>>>()?;
    Ok((images, text, targets))
}

/// The median of `xs` (NaN for none).
fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Phase boundaries of one iteration: with `on`, each [`Marks::mark`] waits for the device and
/// records the seconds since the last one.
struct Marks<'a> {
    on: bool,
    dev: &'a Device,
    last: Instant,
    times: Vec<(&'static str, f64)>,
}

impl Marks<'_> {
    fn mark(&mut self, name: &'static str) -> Result<()> {
        if self.on {
            self.dev.synchronize()?;
            let now = Instant::now();
            self.times.push((name, (now - self.last).as_secs_f64()));
            self.last = now;
        }
        Ok(())
    }
}

/// Builds the preset with random weights and times `spec.iters` iterations after one warm-up.
pub fn run(spec: &BenchSpec, dev: &Device) -> Result<BenchResult> {
    let (precision, _) = crate::resolve_precision(spec.precision, dev);
    let tf32 = spec.tf32 && dev.is_cuda();
    glip_kernels::cuda::set_tf32(tf32);
    let cfg = preset(&spec.preset)?;
    let varmap = candle_nn::VarMap::new();
    let registry = crate::config::Registry::new();
    let model = registry.build_trainable(&cfg, &varmap, 0, dev)?;
    // Inference times the model without a backprop graph, as bench_torch.py's torch.no_grad.
    let frozen = if spec.train {
        None
    } else {
        Some(
            crate::infer::inference_model(&registry, &cfg, &varmap, dev)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        )
    };
    let (images, text, targets) = inputs(spec, dev)?;
    let criterion = SetCriterion::new(
        LossConfig { aux_loss: false, ..LossConfig::detr() },
        Box::new(HungarianMatcher),
    );
    let mut opt = if spec.train {
        let vars = trainable_vars(&varmap);
        let oc = OptimConfig {
            lr: 1e-4,
            backbone_lr: 1e-5,
            text_lr: 1e-5,
            weight_decay: 1e-4,
            clip_norm: 0.1,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            ..OptimConfig::default()
        };
        Some(AdamW::new(vars, oc)?)
    } else {
        None
    };
    // Per timed iteration, each phase's seconds (with `spec.phases`).
    let mut phase_times: Vec<Vec<(&'static str, f64)>> = Vec::new();
    // Inference as a function of its tensors (what a CUDA graph records): pixels, mask, token
    // ids, attention mask -> class probabilities, boxes.
    let infer = |t: &[Tensor]| -> Result<Vec<Tensor>> {
        let model = frozen.as_ref().unwrap_or(&model);
        let images = images.with_tensors(t[0].clone(), t[1].clone())?;
        let text = TextBatch::new(
            t[2].clone(),
            t[3].clone(),
            text.offsets.clone(),
            text.captions.clone(),
        )?;
        let out = model.forward(&images, &text, false)?;
        Ok(vec![candle_nn::ops::softmax_last_dim(&out.pred.pred_logits)?, out.pred.pred_boxes])
    };
    let infer_inputs = || {
        vec![
            images.pixels.clone(),
            images.mask.clone(),
            text.input_ids.clone(),
            text.attention_mask.clone(),
        ]
    };
    // Set in the warm-up when a graph was recorded.
    let mut graph: Option<glip_kernels::graph::Graph> = None;
    let want_graph = spec.graph && !spec.train && dev.is_cuda() && glip_kernels::graph::allowed();
    // A step, returning its loss when it trains.
    let mut step = |record: bool| -> Result<Option<Tensor>> {
        let mut marks = Marks { on: spec.phases, dev, last: Instant::now(), times: Vec::new() };
        let mut loss = None;
        match opt.as_mut() {
            None if !record && want_graph => {
                // The warm-up: eager, then recorded (or eager alone when it cannot be), over
                // buffers of the graph's own, so that each timed replay copies the inputs in.
                let buffers = infer_inputs().iter().map(Tensor::copy).collect::<Result<_>>()?;
                match glip_kernels::graph::capture(buffers, infer) {
                    Ok((g, _)) => graph = Some(g),
                    Err(e) => eprintln!("bench: timing eager launches: {e}"),
                }
                marks.mark("forward")?;
            }
            None => {
                match &graph {
                    Some(g) => g.run(&infer_inputs())?,
                    None => infer(&infer_inputs())?,
                };
                marks.mark("forward")?;
            }
            Some(opt) => {
                // One scope per step: the weights change between steps.
                let out = glip_kernels::bf16::autocast(precision, || {
                    model.forward(&images, &text, true)
                })?;
                marks.mark("forward")?;
                let losses = criterion.forward(&out, &targets)?;
                marks.mark("loss")?;
                let grads = losses.total.backward()?;
                marks.mark("backward")?;
                opt.step(&grads)?;
                marks.mark("optimizer")?;
                // Detached: the step's graph is not kept alive by it.
                loss = Some(losses.total.detach());
            }
        }
        if record && spec.phases {
            phase_times.push(marks.times);
        }
        dev.synchronize()?;
        Ok(loss)
    };
    // One scope for the warm-up and the timed iterations: bf16 weights are packed in the
    // warm-up (as a bf16 model would be stored), then reused.
    let scope = if spec.train { crate::Precision::F32 } else { precision };
    let (times, first, last) = glip_kernels::bf16::autocast(scope, || -> Result<_> {
        let first = step(false)?;
        let mut last = None;
        let mut times = Vec::with_capacity(spec.iters);
        // The timed iterations, for a profiler attached (the warm-up left out).
        glip_kernels::cuda::profiler_range(dev, true)?;
        for _ in 0..spec.iters {
            let t = Instant::now();
            last = step(true)?;
            times.push(t.elapsed().as_secs_f64());
        }
        glip_kernels::cuda::profiler_range(dev, false)?;
        Ok((times, first, last))
    })?;
    // Read back after the timing (each read waits for the device).
    let loss = match (first, last) {
        (Some(a), Some(b)) => Some([a.to_scalar::<f32>()?, b.to_scalar::<f32>()?]),
        _ => None,
    };
    let graph = want_graph && graph.is_some();
    let phases = spec.phases.then(|| {
        let names: Vec<&str> =
            phase_times.first().map(|p| p.iter().map(|m| m.0).collect()).unwrap_or_default();
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let t: Vec<f64> = phase_times.iter().map(|p| p[i].1).collect();
                (name.to_string(), median(&t))
            })
            .collect()
    });
    let fastest = times.iter().copied().min_by(f64::total_cmp).unwrap_or(f64::NAN);
    Ok(BenchResult {
        preset: spec.preset.clone(),
        mode: if spec.train { "train" } else { "infer" },
        batch: spec.batch,
        size: spec.size,
        median_s: median(&times),
        min_s: fastest,
        precision: precision.name(),
        tf32,
        graph,
        loss,
        phases,
        times,
        candle: "candle 0.11.1",
        device: if dev.is_cpu() { "cpu".into() } else { format!("{dev:?}") },
        threads: std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    })
}
