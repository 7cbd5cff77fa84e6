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
    /// `glip_data::Loader::sharded`), or a researcher inspects or edits them.
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

    /// Restores parameters, optimiser state and the step from the run folder's checkpoint.
    pub fn resume(&mut self) -> Result<(), TrainError> {
        let path = self.dir.join("checkpoint.safetensors");
        let t =
            candle_core::safetensors::load(&path, &self.device).map_err(|e| self.io(&path, e))?;
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
        let total_name = "loss".to_string();
        loader.for_steps(from, to, |s, batch| -> Result<bool, TrainError> {
            glip_kernels::nn::seed_dropout(
                glip_core::rng::Rng::for_sample(self.loader.seed, s, 0).next_u64(),
            );
            // One autocast scope per step: the weights change between steps.
            let out = glip_kernels::bf16::autocast(self.precision, || {
                self.model.forward(&batch.images, &batch.text, true)
            })?;
            let losses = self.criterion.forward(&out, &batch.targets)?;
            let mut grads = losses.total.backward()?;
            if let Some(f) = self.on_grads.as_mut() {
                f(&mut grads)?;
            }
            // Every term's value and the gradient norm in one copy from the device, once the
            // whole backward is queued: one wait for a GPU per step. Nothing non-finite is
            // applied: the update waits for the check.
            let named: Vec<(&String, &Tensor)> = losses
                .terms
                .iter()
                .map(|(n, t)| (n, t))
                .chain(std::iter::once((&total_name, &losses.total)))
                .collect();
            let mut scalars =
                named.iter().map(|(_, t)| t.to_dtype(DType::F64)).collect::<Result<Vec<_>, _>>()?;
            scalars.push(self.optimizer.grad_norm_sq(&grads)?);
            let mut read: Vec<f64> = Tensor::stack(&scalars, 0)?.to_vec1()?;
            let grad_norm = read.pop().unwrap_or(0.0).sqrt();
            let mut values = std::collections::BTreeMap::new();
            for ((name, _), v) in named.into_iter().zip(read) {
                // The terms are f32 (or bf16) on the device: exact in f64 and back.
                let v = v as f32;
                if !v.is_finite() {
                    return Err(TrainError::NonFinite {
                        step: s + 1,
                        term: name.clone(),
                        value: v,
                        dir: self.dir.clone(),
                    });
                }
                values.insert(name.clone(), v);
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
            window.1 += batch.image_ids.len();
            if let Some(f) = self.on_step.as_mut() {
                f(self.step, values["loss"]);
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
