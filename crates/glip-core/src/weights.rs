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
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
}
