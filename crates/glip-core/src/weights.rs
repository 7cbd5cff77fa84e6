//! Opening checkpoint files as candle `VarBuilder`s.
//!
//! Safetensors files are memory-mapped; PyTorch `.pth`/`.pt`/`.bin` files (the zip format that
//! `torch.save` writes since 1.6) go through candle's pickle reader. Names are used as stored,
//! so torchvision and Hugging Face files load as they are; a tensor of the wrong shape fails
//! with candle's message naming the key and both shapes.

use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use std::path::Path;

/// Opens `path` (by extension: `.safetensors`, or `.pth`/`.pt`/`.bin`).
pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let err = |e: candle_core::Error| e.context(format!("loading weights from {}", path.display()));
    match ext {
        "safetensors" => mmap_safetensors(path, dtype, device).map_err(err),
        "pth" | "pt" | "bin" => VarBuilder::from_pth(path, dtype, device).map_err(err),
        _ => candle_core::bail!(
            "{}: unknown weight format {ext:?} (expected .safetensors, .pth, .pt or .bin)",
            path.display()
        ),
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
        if let Some(t) = self.varmap.data().lock().expect("varmap lock").get(name) {
            return Ok(t.as_tensor().clone());
        }
        if let Some((src, rest)) = self.source_for(name) {
            let t = src
                .weights
                .get(s, rest)
                .map_err(|e| e.context(format!("initialising {name} from {}", src.origin)))?;
            let var = candle_core::Var::from_tensor(&t.to_dtype(dtype)?.to_device(dev)?)?;
            let out = var.as_tensor().clone();
            self.varmap.data().lock().expect("varmap lock").insert(name.to_string(), var);
            return Ok(out);
        }
        let t = seeded_init(h, &s, name, self.seed, dtype, dev)?;
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.varmap.data().lock().expect("varmap lock").insert(name.to_string(), var);
        Ok(out)
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
    VarBuilder::from_backend(
        Box::new(Overlay { varmap: varmap.clone(), sources, seed }),
        dtype,
        device.clone(),
    )
}
