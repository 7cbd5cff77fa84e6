//! `glip inspect`: a config's model, component by component: parameter counts and the shapes of
//! the tensors passed between components for a given input size.

use crate::train::read_config;
use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use glip_core::{ImageBatch, TextBatch};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `glip inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Experiment config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Square input side in pixels (default: the config's image size).
    #[arg(long, value_parser = crate::image_side())]
    size: Option<usize>,
    /// Batch size of the traced forward pass.
    #[arg(long, default_value_t = 1, value_parser = crate::count(1, glip_core::validate::limits::BATCH as u64))]
    batch: usize,
    /// A prompt for the traced pass (default: every shapes category).
    #[arg(long)]
    prompt: Option<String>,
    /// Override a config value: `key.path=value`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, value_parser = crate::parse_device)]
    device: Option<glip_train::device::DeviceSpec>,
    /// Print the config as a run would use it (its `base` chain and the overrides merged, every
    /// default filled in, paths absolute: a run's `config.resolved.toml`) and trace nothing.
    #[arg(long)]
    resolved: bool,
}

/// The component a parameter belongs to: the first segment of its name (`bbox_embed`,
/// `token_head`, ... are heads).
fn component(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

/// Runs `glip inspect`.
pub fn run(registry: &glip_train::config::Registry, a: InspectArgs) -> Result<()> {
    let mut cfg = read_config(&a.config, &a.sets)?;
    let origin = crate::train::config_origin(&a.config, &a.sets);
    cfg.check(registry).map_err(|e| anyhow!("{origin}: {e}"))?;
    let dev = cfg.run.device.or(a.device).resolve()?;
    let varmap = candle_nn::VarMap::new();
    let model = registry
        .build_trainable(&cfg.model, &varmap, 0, &dev)
        .map_err(|e| anyhow!("{}: {e}", a.config.display()))?;
    if a.resolved {
        glip_train::experiment::write_default_criterion(&mut cfg, &model)?;
        print!("{}", toml::to_string(&cfg)?);
        return Ok(());
    }
    // Per component: parameters, those `model.freeze` / `model.trainable` freeze, buffers.
    let rule = cfg.model.freeze_rule();
    let by_name = !rule.is_empty();
    let mut per: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let n = var.as_tensor().elem_count();
        let e = per.entry(component(name).to_string()).or_default();
        if glip_train::trainer::is_buffer(name) {
            e[2] += n;
        } else {
            e[0] += n;
            e[1] += if rule.frozen(name) { n } else { 0 };
        }
    }
    let row = |c: &str, [p, f, b]: [usize; 3]| match by_name {
        true => println!("{c:<20} {p:>14} {f:>14} {b:>12}"),
        false => println!("{c:<20} {p:>14} {b:>12}"),
    };
    match by_name {
        true => {
            println!("{:<20} {:>14} {:>14} {:>12}", "component", "parameters", "frozen", "buffers")
        }
        false => println!("{:<20} {:>14} {:>12}", "component", "parameters", "buffers"),
    }
    let mut total = [0; 3];
    for (c, counts) in &per {
        row(c, *counts);
        for (t, n) in total.iter_mut().zip(counts) {
            *t += n;
        }
    }
    row("total", total);
    if by_name {
        println!(
            "(frozen: by model.freeze / model.trainable; a backbone's freeze_at or frozen, or a \
             frozen text encoder, come on top)"
        );
    }
    println!();

    let size = a.size.unwrap_or(cfg.data.shapes.image_size as usize);
    let tok_path = cfg
        .model
        .tokenizer()
        .ok_or_else(|| anyhow!("{}: the model names no tokenizer", a.config.display()))?;
    let tok = glip_text::Tokenizer::from_file(&tok_path)?;
    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None => {
            let ds = glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val)?;
            glip_core::prompt::Prompt::detection(glip_data::Dataset::categories(&ds), ". ")?.caption
        }
    };
    let text: TextBatch = tok.batch(&vec![prompt; a.batch], &dev)?;
    let pixels = Tensor::zeros((a.batch, 3, size, size), DType::F32, &dev)?;
    let images = ImageBatch::unpadded(pixels)?;
    println!(
        "{:<36} shape (batch {}, {size}x{size} px, {} tokens)",
        "tensor",
        a.batch,
        text.num_tokens()
    );
    model.forward_traced(&images, &text, false, &mut |name, dims| {
        println!("{name:<36} {dims:?}");
    })?;
    Ok(())
}
