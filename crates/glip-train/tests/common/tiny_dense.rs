//! A tiny dense model on 48-pixel shapes, for the inference tests on the CPU
//! (`tests/inference.rs`) and on the GPU (`tests/cuda.rs`).

use glip_train::experiment::{apply_overrides, config_from_table, ExperimentConfig};

/// `glip_testing::tiny_experiment` with the dense design (centerness on, so the detector's own
/// scoring is exercised) over C3 and C4 with positional encodings and a fusion block, trained
/// 2 steps, then `sets` (`--set` overrides).
pub fn config(sets: &[&str]) -> ExperimentConfig {
    let dense = [
        "name = \"tiny-dense\"",
        "model.position_encoding = true",
        "model.feature_levels = [1, 2]",
        "model.backbone.freeze_at = 0",
        "model.backbone.trainable_bn = true",
        "model.backbone.stages = 3",
        "model.fusion.type = \"bi-attention\"",
        "model.fusion.heads = 2",
        "model.detector.type = \"dense\"",
        "model.detector.centerness = true",
        "data.shapes.val_images = 5",
        "run.steps = 2",
    ];
    let sets: Vec<String> = dense.iter().chain(sets).map(|s| s.to_string()).collect();
    let mut doc = glip_testing::tiny_experiment();
    apply_overrides(&mut doc, &sets).unwrap();
    config_from_table(doc).unwrap()
}
