//! A tiny dense model on 48-pixel shapes, for the inference tests on the CPU
//! (`tests/inference.rs`) and on the GPU (`tests/cuda.rs`).

use glip_train::experiment::ExperimentConfig;
use std::path::Path;

/// A dense model (centerness on, so the detector's own scoring is exercised) on 48-pixel
/// shapes; `text` is the `[model.text]` table.
pub fn config(text: &str, extra: &str) -> ExperimentConfig {
    let doc = format!(
        r#"
name = "tiny-dense"
[model]
num_queries = 4
position_encoding = true
feature_levels = [1, 2]
[model.backbone]
type = "resnet"
depth = 18
freeze_at = 0
trainable_bn = true
stages = 3
[model.text]
{text}
[model.transformer]
d_model = 16
nhead = 2
num_encoder_layers = 1
num_decoder_layers = 1
dim_feedforward = 32
[model.fusion]
type = "bi-attention"
heads = 2
[model.detector]
type = "dense"
centerness = true
[model.head]
type = "token"
[data]
batch_size = 2
[data.shapes]
image_size = 48
train_images = 4
val_images = 5
[run]
steps = 2
eval_every = 2
log_every = 1
checkpoint_every = 0
{extra}
"#
    );
    glip_train::experiment::config_from_table(toml::from_str(&doc).unwrap()).unwrap()
}

pub fn shapes_text() -> String {
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/shapes-tokenizer.json");
    format!("tokenizer = \"{}\"\nhidden = 16\nlayers = 1\nheads = 2", tok.display())
}
