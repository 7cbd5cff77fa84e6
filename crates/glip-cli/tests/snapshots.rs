//! Snapshots of what `glip` prints: `glip inspect` of the seed tutorial's ResNet-50 model
//! (parameters per component and every tensor shape between components), and the JSON of
//! `glip detect` on a fixed checkpoint. Update with
//! `INSTA_UPDATE=always cargo test -p glip-cli --test snapshots` and review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn glip(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_glip")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn inspect_of_seed_r50() {
    let cfg = root().join("configs/seed-r50.toml");
    let (ok, out, err) = glip(&["inspect", "--config", cfg.to_str().unwrap(), "--size", "128"]);
    assert!(ok, "{err}");
    insta::assert_snapshot!(out);
}

/// The checkpoint: a tiny token-head model after one step at learning rate 0, so its weights
/// are the seeded initialisation (the same on every machine). The boxes' coordinates and
/// scores depend on the CPU's summation order in their last bits, and ties between random
/// scores can reorder them: they are checked for range and replaced by placeholders; the rest
/// of the JSON (fields, phrases, count, sizes, files) is the snapshot.
#[test]
fn detect_json_of_a_fixed_checkpoint() {
    let d = std::env::temp_dir().join(format!("glip-snap-detect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join("fixed.toml");
    let mut doc = glip_testing::tiny_experiment();
    let sets = [
        "name = \"fixed\"",
        "model.text.dropout = 0.0",
        "model.transformer.dropout = 0.0",
        "data.shapes.train_images = 2",
        "data.shapes.val_images = 2",
        "optim.lr = 0.0",
        "optim.backbone_lr = 0.0",
        "optim.text_lr = 0.0",
        "run.steps = 1",
        "run.eval_every = 1",
    ];
    glip_train::experiment::apply_overrides(&mut doc, &sets.map(String::from)).unwrap();
    std::fs::write(&cfg, toml::to_string(&doc).unwrap()).unwrap();
    let run = d.join("run");
    let (ok, _, err) =
        glip(&["train", "--config", cfg.to_str().unwrap(), "--out", run.to_str().unwrap()]);
    assert!(ok, "{err}");
    let shapes = d.join("shapes");
    let (ok, _, err) = glip(&[
        "data",
        "export-shapes",
        "--out",
        shapes.to_str().unwrap(),
        "--split",
        "val",
        "--val-images",
        "1",
        "--size",
        "48",
    ]);
    assert!(ok, "{err}");
    let img = shapes.join("val/images/000000.png");
    let (ok, out, err) = glip(&[
        "detect",
        "--run",
        run.to_str().unwrap(),
        "--prompt",
        "red circle. blue square. green star",
        "--threshold",
        "0",
        "--top-k",
        "4",
        "--out",
        d.join("drawn").to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for image in v.as_array_mut().unwrap() {
        for key in ["image", "drawn"] {
            let name = Path::new(image[key].as_str().unwrap()).file_name().unwrap();
            image[key] = serde_json::json!(format!("<dir>/{}", name.to_string_lossy()));
        }
        for det in image["detections"].as_array_mut().unwrap() {
            let s = det["score"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&s), "score {s}");
            det["score"] = serde_json::json!("<score in [0, 1]>");
            let b: Vec<f64> =
                det["bbox"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert!(
                b[0] <= b[2] && b[1] <= b[3] && b.iter().all(|x| (0.0..=48.0).contains(x)),
                "{b:?}"
            );
            det["bbox"] = serde_json::json!("<x0 <= x1, y0 <= y1 in the 48 x 48 image>");
            let i = det["phrase_index"].as_u64().unwrap() as usize;
            let phrases = ["red circle", "blue square", "green star"];
            assert_eq!(det["phrase"], phrases[i]);
            det["phrase"] = serde_json::json!("<the phrase of phrase_index>");
            det["phrase_index"] = serde_json::json!("<0..3>");
        }
    }
    insta::assert_snapshot!(serde_json::to_string_pretty(&v).unwrap());
    std::fs::remove_dir_all(&d).ok();
}
