//! AdamW with parameter groups, warm-up and decay schedules, gradient-norm clipping and an
//! optional EMA of the weights, with state that is saved and restored.
//!
//! candle's `AdamW` decays every variable, has no groups, no clipping, no schedule, and its
//! moments cannot be saved (CANDLE-NOTES.md); a resumable trainer needs all of that, so the
//! update is written here, following `torch.optim.AdamW`.

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Multiply by `gamma` every `every` steps.
    Step {
        /// Steps between decays.
        every: u64,
        /// Factor.
        gamma: f64,
    },
    /// Multiply by `gamma` at each of the `milestones`, step numbers counted from the start
    /// of training (warm-up included): the steps after milestone `m` run at the lower rate,
    /// as maskrcnn-benchmark's `WarmupMultiStepLR` (GLIP's `SOLVER.STEPS`) and DETR's
    /// `lr_drop` have it. `{ type = "multistep", milestones = [2000, 2600], gamma = 0.1 }`.
    MultiStep {
        /// Increasing step numbers.
        milestones: Vec<u64>,
        /// Factor. Default 0.1.
        #[serde(default = "d_gamma")]
        gamma: f64,
    },
    /// Cosine from the base rate to `min_ratio` times it at `total` steps.
    Cosine {
        /// Steps to the end of the cosine.
        total: u64,
        /// Final fraction of the base rate.
        #[serde(default)]
        min_ratio: f64,
    },
}

/// Optimiser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate. Default 1e-4.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Learning rate of parameters under `backbone.`. Default 1e-5.
    #[serde(default = "d_lr_small")]
    pub backbone_lr: f64,
    /// Learning rate of parameters under `text.`. Default 1e-5.
    #[serde(default = "d_lr_small")]
    pub text_lr: f64,
    /// Decoupled weight decay, applied to matrices and kernels only (never to norms, biases
    /// and other 1-D or scalar parameters). Default 1e-4.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Adam betas. Default (0.9, 0.999).
    #[serde(default = "d_betas")]
    pub betas: (f64, f64),
    /// Adam epsilon. Default 1e-8.
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Linear warm-up steps. Default 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decay after warm-up. Default constant.
    #[serde(default = "d_schedule")]
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (0: off). Default 0.1 (DETR).
    #[serde(default = "d_clip")]
    pub clip_norm: f64,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999).
    #[serde(default)]
    pub ema_decay: Option<f64>,
}

fn d_lr() -> f64 {
    1e-4
}
fn d_lr_small() -> f64 {
    1e-5
}
fn d_wd() -> f64 {
    1e-4
}
fn d_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn d_eps() -> f64 {
    1e-8
}
fn d_schedule() -> Schedule {
    Schedule::Constant
}
fn d_gamma() -> f64 {
    0.1
}
fn d_clip() -> f64 {
    0.1
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: d_lr(),
            backbone_lr: d_lr_small(),
            text_lr: d_lr_small(),
            weight_decay: d_wd(),
            betas: d_betas(),
            eps: d_eps(),
            warmup_steps: 0,
            schedule: d_schedule(),
            clip_norm: d_clip(),
            ema_decay: None,
        }
    }
}

impl OptimConfig {
    /// The multiplier of the base rates at `step` (1-based): warm-up, then the schedule.
    pub fn lr_factor(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return step as f64 / self.warmup_steps as f64;
        }
        let s = step - self.warmup_steps.min(step);
        match &self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Step { every, gamma } => gamma.powi((s / (*every).max(1)) as i32),
            Schedule::MultiStep { milestones, gamma } => {
                gamma.powi(milestones.iter().filter(|&&m| m < step).count() as i32)
            }
            Schedule::Cosine { total, min_ratio } => {
                let p = (s as f64 / (*total).max(1) as f64).min(1.0);
                min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}

/// The group a parameter belongs to, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Group {
    /// `backbone.*`.
    Backbone,
    /// `text.*`.
    Text,
    /// Everything else.
    Rest,
}

impl Group {
    /// The group of a parameter name.
    pub fn of(name: &str) -> Self {
        if name.starts_with("backbone.") {
            Group::Backbone
        } else if name.starts_with("text.") {
            Group::Text
        } else {
            Group::Rest
        }
    }
}

struct Param {
    name: String,
    var: Var,
    group: Group,
    decay: bool,
    /// `(2, shape...)`: Adam's first and second moments, made at the parameter's first gradient
    /// (zeros then, as from the start): a frozen parameter never has any.
    moments: Option<Tensor>,
    /// The EMA of the weights (`ema_decay`), made at the parameter's first gradient as a copy
    /// of its weights then (unchanged since the start): a frozen parameter has none.
    ema: Option<Tensor>,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Base learning rate used.
    pub lr: f64,
}

/// AdamW over named variables.
pub struct AdamW {
    params: Vec<Param>,
    cfg: OptimConfig,
    step: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("step", &self.step)
            .finish()
    }
}

impl AdamW {
    /// An optimiser over `vars` (name, variable); `frozen` names are left out.
    pub fn new(vars: Vec<(String, Var)>, cfg: OptimConfig) -> Result<Self> {
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let t = var.as_tensor();
            params.push(Param {
                group: Group::of(&name),
                decay: t.rank() >= 2,
                moments: None,
                ema: None,
                name,
                var,
            });
        }
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { params, cfg, step: 0 })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Whether parameter `name` is weight-decayed.
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.params.iter().find(|p| p.name == name).map(|p| p.decay)
    }

    fn group_lr(&self, g: Group) -> f64 {
        match g {
            Group::Backbone => self.cfg.backbone_lr,
            Group::Text => self.cfg.text_lr,
            Group::Rest => self.cfg.lr,
        }
    }

    /// One update from `grads`: clip the global norm, then AdamW with the scheduled rates, then
    /// the EMA. Parameters without a gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats> {
        let norm_sq = self.grad_norm_sq(grads)?.to_scalar::<f64>()?;
        self.step_with_norm(grads, norm_sq.sqrt())
    }

    /// The squared global norm of the gradients of the parameters, a scalar f64 tensor on
    /// their device: nothing is read back, so a trainer can read it with the loss in one copy
    /// (one wait for a GPU per step) and pass its root to [`AdamW::step_with_norm`].
    pub fn grad_norm_sq(&self, grads: &GradStore) -> Result<Tensor> {
        let present: Vec<&Tensor> =
            self.params.iter().filter_map(|p| grads.get(p.var.as_tensor())).collect();
        let device = self.params.first().map_or(Device::Cpu, |p| p.var.device().clone());
        glip_kernels::optim::sum_squares_all_on(&present, &device)
    }

    /// [`AdamW::step`] with the global gradient norm already known (the root of
    /// [`AdamW::grad_norm_sq`] of the same gradients).
    pub fn step_with_norm(&mut self, grads: &GradStore, grad_norm: f64) -> Result<StepStats> {
        self.step += 1;
        let t = self.step;
        let clip = if self.cfg.clip_norm > 0.0 && grad_norm > self.cfg.clip_norm {
            self.cfg.clip_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let factor = self.cfg.lr_factor(t);
        let (b1, b2) = self.cfg.betas;
        let (bc1, bc2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        let lrs: Vec<f64> = self.params.iter().map(|p| self.group_lr(p.group) * factor).collect();
        // Every parameter with a gradient in one update (one kernel launch on a GPU).
        let keeps_ema = self.cfg.ema_decay.is_some();
        let mut items = Vec::with_capacity(self.params.len());
        for (p, lr) in self.params.iter_mut().zip(lrs) {
            let Some(g) = grads.get(p.var.as_tensor()) else { continue };
            if keeps_ema && p.ema.is_none() {
                p.ema = Some(p.var.as_tensor().copy()?.detach());
            }
            let h = glip_kernels::optim::AdamWStep {
                clip,
                b1,
                b2,
                bc1,
                bc2,
                lr,
                weight_decay: if p.decay { self.cfg.weight_decay } else { 0.0 },
                eps: self.cfg.eps,
            };
            let moments = match &mut p.moments {
                Some(m) => m,
                empty => empty.insert(glip_kernels::optim::moments_like(p.var.as_tensor())?),
            };
            items.push((&p.var, moments, g, h));
        }
        glip_kernels::optim::adamw_update_all(&mut items)?;
        drop(items);
        if let Some(d) = self.cfg.ema_decay {
            for p in &mut self.params {
                if let (Some(e), true) = (p.ema.as_mut(), grads.get(p.var.as_tensor()).is_some()) {
                    glip_kernels::optim::ema_update(e, p.var.as_tensor(), d)?;
                }
            }
        }
        Ok(StepStats { grad_norm, lr: self.cfg.lr * factor })
    }

    /// The EMA weights by parameter name (empty without EMA).
    pub fn ema(&self) -> Result<HashMap<String, Tensor>> {
        // Copies: the averages are updated in place by the next step.
        let mut out = HashMap::new();
        for p in &self.params {
            if let Some(e) = &p.ema {
                out.insert(p.name.clone(), e.copy()?);
            }
        }
        Ok(out)
    }

    /// Moments (`m.<name>`, `v.<name>`), EMA (`ema.<name>`) and the step, for a checkpoint.
    pub fn state(&self) -> Result<(HashMap<String, Tensor>, u64)> {
        let mut out = HashMap::new();
        for p in &self.params {
            // Copies: the moments are updated in place by the next step.
            if let Some(m) = &p.moments {
                out.insert(format!("m.{}", p.name), m.get(0)?.copy()?);
                out.insert(format!("v.{}", p.name), m.get(1)?.copy()?);
            }
            if let Some(e) = &p.ema {
                out.insert(format!("ema.{}", p.name), e.copy()?);
            }
        }
        Ok((out, self.step))
    }

    /// Restores what [`AdamW::state`] returned. A parameter with neither moment had no
    /// gradient yet (a frozen one); one moment without the other, or a mis-shaped one, is an
    /// error naming it.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        step: u64,
        device: &Device,
    ) -> Result<()> {
        for p in &mut self.params {
            let t = p.var.as_tensor();
            let keys = [format!("m.{}", p.name), format!("v.{}", p.name)];
            let halves: Vec<Option<&Tensor>> = keys.iter().map(|k| state.get(k)).collect();
            p.moments = match halves[..] {
                [None, None] => None,
                [Some(m), Some(v)] => {
                    let mut both = Vec::with_capacity(2);
                    for (key, h) in keys.iter().zip([m, v]) {
                        if h.dims() != t.dims() {
                            candle_core::bail!(
                                "optimizer state {key}: shape {:?}, parameter has {:?}",
                                h.dims(),
                                t.dims()
                            );
                        }
                        both.push(h.to_device(device)?.to_dtype(t.dtype())?);
                    }
                    // A new tensor: the in-place updates never write into the caller's.
                    Some(Tensor::stack(&both, 0)?)
                }
                _ => {
                    let (have, lack) = if halves[0].is_some() {
                        (&keys[0], &keys[1])
                    } else {
                        (&keys[1], &keys[0])
                    };
                    candle_core::bail!("optimizer state has {have} but no {lack}")
                }
            };
            // None when the run had none for it (no gradient yet, or no EMA).
            p.ema = match state.get(&format!("ema.{}", p.name)) {
                Some(t) if self.cfg.ema_decay.is_some() => Some(t.to_device(device)?.copy()?),
                _ => None,
            };
        }
        self.step = step;
        Ok(())
    }
}

/// Saves tensors as safetensors with [`crate::write_atomic`], so that an existing file is
/// replaced whole or not at all.
pub fn save_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let mut named: Vec<(&String, &Tensor)> = tensors.iter().collect();
    named.sort_by_key(|(k, _)| *k);
    let bytes = safetensors::serialize(named, None)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    crate::write_atomic(path, &bytes).map_err(|e| candle_core::Error::Msg(e.to_string()))
}
