//! Opening checkpoint files as candle `VarBuilder`s.
//!
//! Safetensors files are memory-mapped; PyTorch `.pth`/`.pt`/`.bin` files (the zip format that
//! `torch.save` writes since 1.6) go through candle's pickle reader. Names are used as stored,
//! so torchvision and Hugging Face files load as they are; a tensor of the wrong shape fails
//! with candle's message naming the key and both shapes.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::Path;

/// Opens `path` (by extension: `.safetensors`, or `.pth`/`.pt`/`.bin`).
pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let err = |e: candle_core::Error| e.context(format!("loading weights from {}", path.display()));
    match ext {
        "safetensors" => {
            mmap_safetensors(path, dtype, device).map_err(not_safetensors).map_err(err)
        }
        "pth" | "pt" | "bin" => VarBuilder::from_pth(path, dtype, device).map_err(err),
        _ => candle_core::bail!(
            "{}: unknown weight format {ext:?} (expected .safetensors, .pth, .pt or .bin)",
            path.display()
        ),
    }
}

/// Every tensor of a safetensors file (a checkpoint, with the optimiser's state where it has
/// one), on `device`. A file that is not safetensors, or was cut short, says so beside the
/// format's own reason ("header too large" alone does not tell a researcher what is wrong).
pub fn load_all(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(not_safetensors)
}

/// The format's errors (the header's length, its JSON, the tensors' offsets) read as what
/// they mean for the file; other errors (reading it, a dtype) pass as they are.
fn not_safetensors(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::SafeTensor(e) => {
            candle_core::Error::Msg(format!("not a safetensors file, or one cut short ({e})"))
        }
        // candle's memory-mapped reader adds the path, which `open`'s context names already.
        candle_core::Error::WithPath { inner, .. }
            if matches!(*inner, candle_core::Error::SafeTensor(_)) =>
        {
            not_safetensors(*inner)
        }
        e => e,
    }
}

#[allow(unsafe_code, reason = "memory-mapping is candle's only zero-copy safetensors reader")]
fn mmap_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the mapping is read-only; the file must not be truncated while the builder lives,
    // which holds for checkpoints that the training loop only ever replaces by rename.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
    Ok(VarBuilder::from_backend(Box::new(FloatParams(st)), dtype, device.clone()))
}

/// candle's memory-mapped reader, refusing a tensor that is not a float where a parameter is
/// asked for (files may hold integer buffers, such as Hugging Face's `position_ids`, that no
/// parameter reads).
struct FloatParams(candle_core::safetensors::MmapedSafetensors);

impl candle_nn::var_builder::SimpleBackend for FloatParams {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<candle_core::Tensor> {
        check_float(name, DType::try_from(self.0.get(name)?.dtype())?)?;
        candle_nn::var_builder::SimpleBackend::get(&self.0, s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<candle_core::Tensor> {
        candle_nn::var_builder::SimpleBackend::get_unchecked(&self.0, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

/// A stored parameter must be a float tensor: loading converts between float precisions
/// (a bf16 checkpoint serves an f32 model), but integers or booleans where a weight belongs mean
/// a file that is not what it claims, and converting them would hide it.
pub fn check_float(name: &str, dtype: DType) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        candle_core::bail!("tensor {name} is stored as {dtype:?}: a parameter must be a float tensor (f32, f16, bf16 or f64)")
    }
}

/// A checkpoint file (or part of one) that initialises the parameters under a prefix.
pub struct Source {
    /// Model-side prefix, e.g. `backbone` (empty for the whole model).
    pub prefix: String,
    /// The file's tensors (use `.pp(...)` on it to select a prefix inside the file).
    pub weights: VarBuilder<'static>,
    /// Where they come from, for errors (the file's path).
    pub origin: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("prefix", &self.prefix)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

struct Overlay {
    varmap: candle_nn::VarMap,
    sources: Vec<Source>,
    seed: u64,
    freeze: Freeze,
}

/// Which parameters a trainable builder hands out frozen: as detached views of their variables
/// (the same storage, so a checkpoint saves and restores them), through which no gradient is
/// computed and which the optimiser therefore leaves as they are. Prefixes are whole name
/// components: `backbone` covers `backbone.conv1.weight`, not `backbone2.x`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Freeze {
    /// Parameters under any of these prefixes are frozen.
    pub freeze: Vec<String>,
    /// If set, every parameter under none of these prefixes is frozen too.
    pub only: Option<Vec<String>>,
}

/// Whether `name` is `prefix` or lies under it (`prefix.` then more).
pub fn under_prefix(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

impl Freeze {
    /// Whether the rule freezes nothing (no prefix, no `only` list).
    pub fn is_empty(&self) -> bool {
        self.freeze.is_empty() && self.only.is_none()
    }

    /// Whether parameter `name` is frozen.
    pub fn frozen(&self, name: &str) -> bool {
        let under = |ps: &[String]| ps.iter().any(|p| under_prefix(name, p));
        under(&self.freeze) || self.only.as_ref().is_some_and(|only| !under(only))
    }
}

/// Draws an initial value for `name` from `init` with a generator seeded by `(seed, name)`:
/// the same model config and seed give the same weights, whatever the build order (candle's CPU
/// generator cannot be seeded).
fn seeded_init(
    init: candle_nn::Init,
    shape: &candle_core::Shape,
    name: &str,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<candle_core::Tensor> {
    use candle_nn::init::NormalOrUniform;
    let n = shape.elem_count();
    let h = name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut rng = crate::rng::Rng::for_sample(seed, h, 0);
    let (uniform, a, b) = match init {
        candle_nn::Init::Const(c) => {
            return (candle_core::Tensor::ones(shape, DType::F32, dev)? * c)?.to_dtype(dtype)
        }
        candle_nn::Init::Uniform { lo, up } => (true, lo, up),
        candle_nn::Init::Randn { mean, stdev } => (false, mean, stdev),
        candle_nn::Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => (true, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
                NormalOrUniform::Normal => (false, 0.0, std),
            }
        }
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            if uniform {
                (a + (b - a) * rng.uniform() as f64) as f32
            } else {
                (a + b * rng.normal() as f64) as f32
            }
        })
        .collect();
    candle_core::Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)
}

impl Overlay {
    /// `name`'s variable: the one `varmap` holds, else a new one initialised from a source or
    /// the seeded initialiser, registered.
    fn var(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<candle_core::Var> {
        if let Some(v) = self.varmap.data().lock().expect("varmap lock").get(name) {
            return Ok(v.clone());
        }
        let t = match self.source_for(name) {
            Some((src, rest)) => src
                .weights
                .get(s, rest)
                .map_err(|e| e.context(format!("initialising {name} from {}", src.origin)))?
                .to_dtype(dtype)?
                .to_device(dev)?,
            None => seeded_init(h, &s, name, self.seed, dtype, dev)?,
        };
        let var = candle_core::Var::from_tensor(&t)?;
        self.varmap.data().lock().expect("varmap lock").insert(name.to_string(), var.clone());
        Ok(var)
    }

    fn source_for<'a>(&'a self, name: &'a str) -> Option<(&'a Source, &'a str)> {
        self.sources.iter().rev().find_map(|s| {
            if s.prefix.is_empty() {
                return s.weights.contains_tensor(name).then_some((s, name));
            }
            let rest = name.strip_prefix(s.prefix.as_str())?.strip_prefix('.')?;
            s.weights.contains_tensor(rest).then_some((s, rest))
        })
    }
}

impl candle_nn::var_builder::SimpleBackend for Overlay {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<candle_core::Tensor> {
        let var = self.var(s, name, h, dtype, dev)?;
        Ok(match self.freeze.frozen(name) {
            true => var.as_tensor().detach(),
            false => var.as_tensor().clone(),
        })
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<candle_core::Tensor> {
        if let Some((src, rest)) = self.source_for(name) {
            return src.weights.get_unchecked_dtype(rest, dtype)?.to_device(dev);
        }
        candle_core::bail!("no tensor {name} in any checkpoint")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
            || self.source_for(name).is_some()
    }
}

/// A `VarBuilder` whose every tensor is a trainable variable registered in `varmap`,
/// initialised from the last of `sources` that holds it, or else from the module's own
/// initialiser drawn with a generator seeded by `(seed, name)`. Modules built from it are
/// trainable; modules that freeze parts detach them.
pub fn trainable(
    varmap: &candle_nn::VarMap,
    sources: Vec<Source>,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    trainable_with(varmap, sources, seed, Freeze::default(), dtype, device)
}

/// [`trainable`], with the parameters `freeze` names handed out frozen (still registered in
/// `varmap`, initialised the same way).
pub fn trainable_with(
    varmap: &candle_nn::VarMap,
    sources: Vec<Source>,
    seed: u64,
    freeze: Freeze,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Overlay { varmap: varmap.clone(), sources, seed, freeze }),
        dtype,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_whole_name_components() {
        let f = Freeze { freeze: vec!["backbone".into(), "text.embeddings".into()], only: None };
        assert!(f.frozen("backbone"));
        assert!(f.frozen("backbone.conv1.weight"));
        assert!(!f.frozen("backbone2.x"));
        assert!(f.frozen("text.embeddings.word_embeddings.weight"));
        assert!(!f.frozen("text.encoder.layer.0.output.dense.weight"));
        assert!(!f.frozen("detector.cls.bias"));
        let only = Freeze { freeze: vec!["prompt.x".into()], only: Some(vec!["prompt".into()]) };
        assert!(!only.frozen("prompt.offsets"));
        assert!(only.frozen("prompt.x"), "freeze applies on top of only");
        assert!(only.frozen("prompts.offsets"));
        assert!(only.frozen("backbone.conv1.weight"));
        assert!(!Freeze::default().frozen("anything"));
    }

    /// A frozen parameter is registered like any other (a checkpoint holds it) and handed out
    /// as a view of the same storage that records no gradient: updating the variable (a
    /// resume) shows through it, and a loss over it has no gradient for it.
    #[test]
    fn a_frozen_parameter_is_a_detached_view_of_its_variable() -> Result<()> {
        let vm = candle_nn::VarMap::new();
        let freeze = Freeze { freeze: vec!["a".into()], only: None };
        let vb = trainable_with(&vm, vec![], 7, freeze, DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(3, "a.w", candle_nn::Init::Const(1.0))?;
        let b = vb.get_with_hints(3, "b.w", candle_nn::Init::Const(2.0))?;
        assert!(!a.is_variable() && b.is_variable());
        let var = vm.data().lock().expect("lock")["a.w"].clone();
        var.set(&candle_core::Tensor::new(&[4f32, 5., 6.], &Device::Cpu)?)?;
        assert_eq!(a.to_vec1::<f32>()?, vec![4., 5., 6.]);
        let grads = (&a * &b)?.sum_all()?.backward()?;
        assert!(grads.get(&a).is_none() && grads.get(var.as_tensor()).is_none());
        assert_eq!(grads.get(&b).expect("b trains").to_vec1::<f32>()?, vec![4., 5., 6.]);
        Ok(())
    }
}
