//! The training loop: batches from a [`glip_data::Loader`], the model, a criterion, AdamW;
//! JSON-lines logging, atomic checkpoints with optimizer state, exact resume, and a stop with
//! the step and loss term named when a loss is not finite.

use crate::optim::{save_atomic, AdamW, OptimConfig};
use crate::GlipModel;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use glip_core::Criterion;
use glip_data::Loader;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps in all.
    pub steps: u64,
    /// Log every this many steps. Default 10.
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Checkpoint every this many steps (0: only at the end). Default 500.
    #[serde(default = "five_hundred")]
    pub checkpoint_every: u64,
    /// Batches per optimiser step (gradient accumulation). Default 1. With `n > 1`, a step
    /// runs forward and backward on `n` consecutive batches of `data.batch_size`, one at a
    /// time (the memory of one batch), so a step sees `n * batch_size` images. When the
    /// criterion normalises its loss by one count (`Losses::normaliser`: the dense
    /// criterion's positive locations, the set criterion's matched boxes with a token head),
    /// the step is normalised by the count of all `n` batches: batch `i`'s gradient weighs
    /// `max(c_i, 1) / max(c_1 + .. + c_n, 1)`, the large batch's loss exactly (as GLIP's and
    /// DETR's distributed training all-reduce the count). Otherwise (fixed-class
    /// cross-entropy, a criterion without a count) the step applies the mean of the batches'
    /// gradients. Logged losses are weighed alike. Batch norm's statistics are per batch and
    /// its running statistics move once per batch. `steps`, the schedule, logging,
    /// checkpoints and evaluation count optimiser steps.
    #[serde(default = "one")]
    pub accumulate: u64,
}

fn one() -> u64 {
    1
}
fn ten() -> u64 {
    10
}
fn five_hundred() -> u64 {
    500
}

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A loss term is NaN or infinite; the last good checkpoint is kept.
    #[error("step {step}: loss term {term} is {value}; stopped (the last good checkpoint is kept in {dir})")]
    NonFinite { step: u64, term: String, value: f32, dir: PathBuf },
    /// The losses are finite but the global gradient norm is not; nothing was applied, the
    /// last good checkpoint is kept.
    #[error("step {step}: the gradient norm is {value} (the losses are finite); stopped before the update (the last good checkpoint is kept in {dir})")]
    NonFiniteGradient { step: u64, value: f64, dir: PathBuf },
    /// A data error.
    #[error(transparent)]
    Data(#[from] glip_data::DataError),
    /// A tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file error.
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
}

/// What a checkpoint's json side holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Steps done.
    pub step: u64,
    /// The loader's seed (the data order and transforms derive from it and the step).
    pub seed: u64,
    /// The fully resolved experiment config, as the run saw it.
    pub config: serde_json::Value,
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Step (1-based).
    pub step: u64,
    /// Each loss term and `loss`, by name (written in name order, the same every line).
    pub losses: std::collections::BTreeMap<String, f32>,
    /// Base learning rate.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training images per second over the logging window.
    pub images_per_s: f64,
}

/// Trains `model` (whose parameters live in `varmap`).
pub struct Trainer<'a> {
    /// The model.
    pub model: &'a GlipModel,
    /// Its parameters.
    pub varmap: &'a candle_nn::VarMap,
    /// The loss.
    pub criterion: &'a dyn Criterion,
    /// Training batches.
    pub loader: &'a Loader,
    /// Optimiser.
    pub optimizer: AdamW,
    /// Loop settings.
    pub config: TrainConfig,
    /// Run folder: `log.jsonl`, `checkpoint.safetensors`, `checkpoint.json`.
    pub dir: PathBuf,
    /// Resolved config saved in checkpoints.
    pub resolved: serde_json::Value,
    /// Device.
    pub device: Device,
    /// Called after each logged step (progress display, evaluation hooks).
    pub on_log: Option<Box<dyn FnMut(&LogLine) + 'a>>,
    /// Called after every step with the step number and the total loss (progress bars).
    pub on_step: Option<Box<dyn FnMut(u64, f32) + 'a>>,
    /// Called with each step's gradients between backward and the optimiser's update: where a
    /// data-parallel run all-reduces them across processes (each on its shard of the data,
    /// `glip_data::Loader::sharded`), or a researcher inspects or edits them. They are the
    /// step's, over its `config.accumulate` batches and divided by this process's count (see
    /// [`TrainConfig::accumulate`]): their mean across processes weighs every process alike,
    /// where DETR and GLIP all-reduce the count before dividing.
    #[allow(clippy::type_complexity)]
    pub on_grads: Option<Box<dyn FnMut(&mut GradStore) -> candle_core::Result<()> + 'a>>,
    /// Stop after the step that ends past this instant (a time budget), checkpointing.
    pub deadline: Option<std::time::Instant>,
    /// What the forward pass's convolutions compute in (f32 unless set; see
    /// `glip_kernels::bf16`).
    pub precision: crate::Precision,
    step: u64,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Trainable variables by name, frozen ones (not variables) left out.
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<(String, candle_core::Var)> =
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Batch-norm running statistics: variables of the model, but buffers, not parameters.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// What the optimizer updates: every variable of `varmap` but the buffers, by name.
pub fn trainable_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    named_vars(varmap).into_iter().filter(|(n, _)| !is_buffer(n)).collect()
}

/// Detaches every gradient of `grads`. A variable's gradient leaves candle's backward still
/// recording the product that made it, whose operands are the batch's activations, each with
/// its own graph back to the input (candle detaches every other node's gradient as it goes, not
/// the variables'). Kept past the batch (gradient accumulation), that held the whole forward
/// graph of the batch while the next one ran: measured on the default experiment, a peak of
/// 891 MB at 2 x 8 images against 539 MB at 8 (875 MB at 16); detached, 600 MB.
fn detach_all(grads: &mut GradStore) {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
}

/// Multiplies every gradient of `grads` by `factor` (one rounding each), detached as in
/// [`detach_all`].
fn scale_all(grads: &mut GradStore, factor: f64) -> candle_core::Result<()> {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(|g| g.detach().affine(factor, 0.0)).transpose()? {
            grads.insert_id(id, g);
        }
    }
    Ok(())
}

impl<'a> Trainer<'a> {
    /// A trainer starting at step 0 with a fresh optimiser over every variable of `varmap`
    /// (batch-norm running statistics excluded).
    pub fn new(
        model: &'a GlipModel,
        varmap: &'a candle_nn::VarMap,
        criterion: &'a dyn Criterion,
        loader: &'a Loader,
        optim: OptimConfig,
        config: TrainConfig,
        dir: &Path,
        resolved: serde_json::Value,
        device: Device,
    ) -> candle_core::Result<Self> {
        let vars = trainable_vars(varmap);
        Ok(Self {
            model,
            varmap,
            criterion,
            loader,
            optimizer: AdamW::new(vars, optim)?,
            config,
            dir: dir.to_path_buf(),
            resolved,
            device,
            on_log: None,
            on_step: None,
            on_grads: None,
            deadline: None,
            precision: crate::Precision::F32,
            step: 0,
        })
    }

    /// Steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    fn io(&self, path: &Path, e: impl std::fmt::Display) -> TrainError {
        TrainError::Io { path: path.to_path_buf(), msg: e.to_string() }
    }

    /// Writes `checkpoint.safetensors` (parameters, optimiser moments under `optim.`) and
    /// `checkpoint.json`, each through a temporary file and a rename.
    pub fn save_checkpoint(&self) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        let mut t: HashMap<String, Tensor> =
            named_vars(self.varmap).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let (state, step) = self.optimizer.state()?;
        t.extend(state.into_iter().map(|(k, v)| (format!("optim.{k}"), v)));
        save_atomic(&t, &self.dir.join("checkpoint.safetensors"))?;
        let meta = CheckpointMeta { step, seed: self.loader.seed, config: self.resolved.clone() };
        let json = self.dir.join("checkpoint.json");
        let text = serde_json::to_string_pretty(&meta).expect("json");
        crate::write_atomic(&json, text.as_bytes()).map_err(|e| self.io(&json, e))
    }

    /// Writes the weights inference uses to `path`, atomically, under the model's names: every
    /// parameter and buffer, a parameter as the optimiser's EMA of it where it keeps one. A
    /// checkpoint without the optimiser's state, which inference (and `model.weights`) loads
    /// as it loads a checkpoint.
    pub fn save_weights(&self, path: &Path) -> Result<(), TrainError> {
        let mut t: HashMap<String, Tensor> =
            named_vars(self.varmap).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        t.extend(self.optimizer.ema()?);
        Ok(save_atomic(&t, path)?)
    }

    /// Restores parameters, optimiser state and the step from the run folder's checkpoint.
    pub fn resume(&mut self) -> Result<(), TrainError> {
        let path = self.dir.join("checkpoint.safetensors");
        let t = glip_core::weights::load_all(&path, &self.device).map_err(|e| self.io(&path, e))?;
        let json = self.dir.join("checkpoint.json");
        let meta: CheckpointMeta =
            serde_json::from_str(&std::fs::read_to_string(&json).map_err(|e| self.io(&json, e))?)
                .map_err(|e| self.io(&json, e))?;
        for (name, var) in named_vars(self.varmap) {
            let v = t
                .get(&name)
                .ok_or_else(|| self.io(&path, format!("checkpoint has no parameter {name}")))?;
            if v.dims() != var.as_tensor().dims() {
                return Err(self.io(
                    &path,
                    format!(
                        "{name}: shape {:?} in the checkpoint, {:?} in the model",
                        v.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(v)?;
        }
        let state: HashMap<String, Tensor> = t
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("optim.").map(|k| (k.to_string(), v)))
            .collect();
        self.optimizer.load_state(&state, meta.step, &self.device)?;
        self.step = meta.step;
        Ok(())
    }

    /// Runs until `config.steps` (or the deadline), appending to `log.jsonl`.
    pub fn run(&mut self) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        let log_path = self.dir.join("log.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| self.io(&log_path, e))?;
        let mut window = (std::time::Instant::now(), 0usize);
        let loader = self.loader;
        let (from, to) = (self.step, self.config.steps);
        const TOTAL: &str = "loss";
        let n = self.config.accumulate.max(1);
        // Across the `n` batches of one step: the weighed sums of their gradients and, per
        // loss term (the total under "loss"), of its values, kept on the device as f64; and
        // the sum of their counts.
        type Pending = (GradStore, std::collections::BTreeMap<String, Tensor>, f64);
        let mut pending: Option<Pending> = None;
        loader.for_steps(from * n, to * n, |t, batch| -> Result<bool, TrainError> {
            // `t` counts batches; with `n == 1` it is the step.
            let (s, last) = (t / n, t % n == n - 1);
            glip_kernels::nn::seed_dropout(
                glip_core::rng::Rng::for_sample(self.loader.seed, t, 0).next_u64(),
            );
            // One autocast scope per batch: the weights change between steps.
            let out = glip_kernels::bf16::autocast(self.precision, || {
                self.model.forward_train(&batch.images, &batch.text, &batch.targets)
            })?;
            let losses = self.criterion.forward(&out, &batch.targets)?;
            let mut grads = losses.total.backward()?;
            // The batch's weight in its step, and its count. A loss normalised by a count `c`
            // is the batch's sum divided by `max(c, 1)`: weighed by that and divided by the
            // step's count, the batches' sums make the large batch's loss. Without a count
            // every batch weighs 1 and counts 1: the step takes their mean.
            let (weight, count) = match losses.normaliser {
                Some(c) if n > 1 => (c.max(1.0), c),
                _ => (1.0, 1.0),
            };
            if weight != 1.0 {
                // Each gradient is the batch's own (as computed alone) times its weight: one
                // rounding, not a different backward.
                scale_all(&mut grads, weight)?;
            }
            let terms = losses
                .terms
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .chain(std::iter::once((TOTAL, &losses.total)))
                // Detached: a term kept to the step's end must not keep its batch's graph.
                // In f64 an f32 value times an integer count is exact.
                .map(|(k, v)| {
                    let v = v.detach().to_dtype(DType::F64)?;
                    Ok((k.to_string(), if weight != 1.0 { v.affine(weight, 0.0)? } else { v }))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            window.1 += batch.image_ids.len();
            let (mut grads, sums, counted) = match pending.take() {
                None => (grads, terms.into_iter().collect(), count),
                Some((mut acc, mut sums, counted)) => {
                    acc.extend(grads)?;
                    for (k, v) in terms {
                        let sum = match sums.remove(&k) {
                            Some(prev) => (prev + v)?,
                            None => v,
                        };
                        sums.insert(k, sum);
                    }
                    (acc, sums, counted + count)
                }
            };
            if !last {
                // Kept for the next batch: without the graph of this one.
                detach_all(&mut grads);
                pending = Some((grads, sums, counted));
                return Ok(true);
            }
            // The step's normaliser: 1 for one batch a step; `n` for the mean of `n`
            // batches without a count (for n = 2, 4, 8, ... a power of two: the mean is then
            // the sum times 1/n with no further rounding).
            let divisor = counted.max(1.0);
            if divisor != 1.0 {
                scale_all(&mut grads, 1.0 / divisor)?;
            }
            if let Some(f) = self.on_grads.as_mut() {
                f(&mut grads)?;
            }
            // Every term's value and the gradient norm in one copy from the device, once the
            // whole backward is queued: one wait for a GPU per step. Nothing non-finite is
            // applied: the update waits for the check.
            let mut scalars: Vec<Tensor> = sums.values().cloned().collect();
            scalars.push(self.optimizer.grad_norm_sq(&grads)?);
            let mut read: Vec<f64> = Tensor::stack(&scalars, 0)?.to_vec1()?;
            let grad_norm = read.pop().unwrap_or(0.0).sqrt();
            // The terms are f32 (or bf16) on the device: exact in f64 and back (a step over
            // `n` batches rounds once, to f32).
            let values: std::collections::BTreeMap<String, f32> =
                sums.keys().cloned().zip(read.into_iter().map(|v| (v / divisor) as f32)).collect();
            // A term that is not finite makes the total so too: name the term first.
            let bad = values.iter().filter(|(_, v)| !v.is_finite());
            if let Some((name, &v)) = bad.min_by_key(|(name, _)| name.as_str() == TOTAL) {
                return Err(TrainError::NonFinite {
                    step: s + 1,
                    term: name.clone(),
                    value: v,
                    dir: self.dir.clone(),
                });
            }
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFiniteGradient {
                    step: s + 1,
                    value: grad_norm,
                    dir: self.dir.clone(),
                });
            }
            let stats = self.optimizer.step_with_norm(&grads, grad_norm)?;
            self.step += 1;
            if let Some(f) = self.on_step.as_mut() {
                f(self.step, values[TOTAL]);
            }
            if self.step.is_multiple_of(self.config.log_every.max(1))
                || self.step == self.config.steps
            {
                let line = LogLine {
                    step: self.step,
                    losses: values,
                    lr: stats.lr,
                    grad_norm: stats.grad_norm,
                    images_per_s: window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9),
                };
                writeln!(log, "{}", serde_json::to_string(&line).expect("json"))
                    .map_err(|e| self.io(&log_path, e))?;
                if let Some(f) = self.on_log.as_mut() {
                    f(&line);
                }
                window = (std::time::Instant::now(), 0);
            }
            if self.config.checkpoint_every > 0
                && self.step.is_multiple_of(self.config.checkpoint_every)
            {
                self.save_checkpoint()?;
            }
            Ok(self.deadline.is_none_or(|d| std::time::Instant::now() < d))
        })?;
        self.save_checkpoint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient of `w1` in `sum(w1 * (w2 * c))` is `w2 * c` times the incoming gradient: it
    /// records that product, so it holds `w2 * c` (an activation) and its graph; detached, it
    /// holds neither, and its values are the same.
    #[test]
    fn detached_gradients_hold_no_graph() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w1 = candle_core::Var::new(&[1f32, 2., 3.], &dev)?;
        let w2 = candle_core::Var::new(&[4f32, 5., 6.], &dev)?;
        let c = Tensor::new(&[0.5f32, 0.25, 2.], &dev)?;
        let y = w1.as_tensor().mul(&w2.as_tensor().mul(&c)?)?.sum_all()?;
        let mut grads = y.backward()?;
        let before = grads.get(w1.as_tensor()).expect("a gradient").clone();
        assert!(before.track_op(), "candle no longer leaves a variable's gradient attached");
        detach_all(&mut grads);
        let after = grads.get(w1.as_tensor()).expect("a gradient");
        assert!(!after.track_op());
        assert_eq!(after.to_vec1::<f32>()?, before.to_vec1::<f32>()?);
        assert_eq!(after.to_vec1::<f32>()?, vec![2., 1.25, 12.]);
        Ok(())
    }
}
