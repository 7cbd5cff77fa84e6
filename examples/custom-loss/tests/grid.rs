//! The example's binary, built on `glip_cli::main_with`, runs its own criterion and query
//! generator through an ablation grid beside the built-ins: every cell trains, evaluates and
//! lands in the table and the plot; a registered component's defaults appear in the resolved
//! config.

use std::path::Path;
use std::process::Command;

fn custom_glip() -> Command {
    Command::new(env!("CARGO_BIN_EXE_custom-glip"))
}

#[test]
fn the_example_ablation_runs_its_own_components_beside_the_built_ins() {
    let out = std::env::temp_dir().join(format!("glip-example-grid-{}", std::process::id()));
    let ablation = Path::new(env!("CARGO_MANIFEST_DIR")).join("ablation.toml");
    // The example's grid, shrunk to two steps on a few small images.
    let tiny = [
        "run.steps=2",
        "run.eval_every=2",
        "run.log_every=1",
        "run.checkpoint_every=0",
        "run.time_budget_min=10",
        "data.batch_size=2",
        "data.shapes.image_size=64",
        "data.shapes.train_images=8",
        "data.shapes.val_images=4",
    ];
    let mut cmd = custom_glip();
    cmd.arg("experiment").arg(&ablation).arg("--out").arg(&out);
    for s in tiny {
        cmd.args(["--set", s]);
    }
    let o = cmd.output().expect("custom-glip runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let table = std::fs::read_to_string(out.join("ablation.md")).unwrap();
    for cell in ["dense", "inside-box-2.0", "decoder-mean-text"] {
        assert!(table.contains(cell), "{cell} missing from the table:\n{table}");
        let results = out.join(cell).join("results.json");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
        assert_eq!(r["steps"], 2, "{cell}");
        assert!(r["val"]["AP50"].as_f64().is_some(), "{cell}");
    }
    assert!(out.join("ablation.svg").exists() && out.join("ablation.csv").exists());
    // The registered criterion's defaults are written out with the run.
    let resolved =
        std::fs::read_to_string(out.join("inside-box-2.0").join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("type = \"inside-box\""), "{resolved}");
    assert!(resolved.contains("w_cls = 1.0") && resolved.contains("w_box = 2.0"), "{resolved}");
    let resolved =
        std::fs::read_to_string(out.join("decoder-mean-text").join("config.resolved.toml"))
            .unwrap();
    assert!(resolved.contains("type = \"mean-text\""), "{resolved}");
    // The run serves through the same binary (its registry builds `mean-text` again).
    let img = out.join("probe.png");
    image_like_png(&img);
    let o = custom_glip()
        .args(["detect", "--run"])
        .arg(out.join("decoder-mean-text"))
        .args(["--prompt", "red circle", "--threshold", "0", "--out"])
        .arg(out.join("drawn"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn a_misspelt_parameter_of_a_registered_criterion_stops_the_grid_before_training() {
    let out = std::env::temp_dir().join(format!("glip-example-bad-{}", std::process::id()));
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/shapes.toml");
    let o = custom_glip()
        .arg("experiment")
        .arg(&config)
        .args(["--set", "loss.criterion={type=\"inside-box\", w_bx=2.0}", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("loss.criterion") && stderr.contains("w_bx"), "{stderr}");
    assert!(!out.join("log.jsonl").exists(), "nothing trained");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn inside_box_assigns_each_point_to_the_smallest_box_containing_it() {
    use glip_example_custom_loss::InsideBox;
    let boxes = [[0.5, 0.5, 0.8, 0.8], [0.4, 0.4, 0.2, 0.2]]; // cxcywh
    let points = [[0.41, 0.42], [0.7, 0.7], [0.95, 0.95]];
    assert_eq!(InsideBox::assign(&points, &boxes), [Some(1), Some(0), None]);
}

/// A 32x32 gradient PNG.
fn image_like_png(path: &Path) {
    let img =
        image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 128]));
    img.save(path).unwrap();
}
