//! `glip data export-shapes` and `glip data check` end to end.

use std::process::Command;

fn glip(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_glip")).args(args).output().unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn export_then_check_passes_and_a_broken_copy_fails_listing_every_problem() {
    let dir = std::env::temp_dir().join(format!("glip-cli-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let (ok, out) = glip(&[
        "data",
        "export-shapes",
        "--out",
        d,
        "--train-images",
        "6",
        "--val-images",
        "2",
        "--format",
        "both",
    ]);
    assert!(ok, "{out}");
    let gt = dir.join("train/annotations.json");
    let imgs = dir.join("train/images");
    let (ok, out) = glip(&[
        "data",
        "check",
        "--coco",
        gt.to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("6 records, no problem found"), "{out}");
    let (ok, out) = glip(&[
        "data",
        "check",
        "--odvg",
        dir.join("val/odvg.jsonl").to_str().unwrap(),
        "--label-map",
        dir.join("val/label_map.json").to_str().unwrap(),
        "--images",
        dir.join("val").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    // Break it: a zero-size box, an unknown category, a missing image.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gt).unwrap()).unwrap();
    v["annotations"][0]["bbox"][2] = 0.into();
    v["annotations"][1]["category_id"] = 99.into();
    std::fs::write(&gt, v.to_string()).unwrap();
    std::fs::remove_file(imgs.join("000003.png")).unwrap();
    let (ok, out) = glip(&[
        "data",
        "check",
        "--coco",
        gt.to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("annotation id 1: box with zero or negative size"), "{out}");
    assert!(out.contains("annotation id 2: unknown category id 99"), "{out}");
    assert!(out.contains("image id 4 (000003.png)"), "{out}");
    assert!(out.contains("3 problem(s) in 6 records"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn coco_eval_prints_the_twelve_numbers_and_json() {
    let dir = glip_testing::fixture("coco/case1");
    let (gt, dets) = (dir.join("gt.json"), dir.join("dets.json"));
    let (ok, out) = glip(&[
        "coco-eval",
        "--gt",
        gt.to_str().unwrap(),
        "--dets",
        dets.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for k in
        ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    {
        assert_eq!(v[k].as_f64(), want["stats"][k].as_f64(), "{k}");
    }
    let (ok, out) =
        glip(&["coco-eval", "--gt", gt.to_str().unwrap(), "--dets", dets.to_str().unwrap()]);
    assert!(
        ok && out.lines().count() == 12
            && out
                .contains("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"),
        "{out}"
    );
    let (ok, out) =
        glip(&["coco-eval", "--gt", "/nonexistent/gt.json", "--dets", dets.to_str().unwrap()]);
    assert!(!ok && out.contains("/nonexistent/gt.json"), "{out}");
}
