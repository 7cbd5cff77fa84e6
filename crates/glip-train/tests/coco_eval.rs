//! COCO evaluation against pycocotools' own numbers (`coco/caseK/expected.json` of the
//! fixtures, written by `reference/make_fixtures.py`): the 12 summary numbers and per-category AP, to 1e-12;
//! per-category AP50 through its mean, pycocotools' AP50; the category names.

use glip_testing::fixture;
use glip_train::eval::{evaluate_coco_files, recall_at_k, COCO_STAT_NAMES};

#[test]
fn hotcoco_matches_pycocotools_on_every_fixture_case() {
    for k in 0..4 {
        let dir = fixture(&format!("coco/case{k}"));
        let got = evaluate_coco_files(&dir.join("gt.json"), &dir.join("dets.json")).unwrap();
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        for name in COCO_STAT_NAMES {
            let w = want["stats"][name].as_f64().unwrap();
            assert!(
                (got.get(name) - w).abs() <= 1e-12,
                "case{k} {name}: {} vs pycocotools {w}",
                got.get(name)
            );
        }
        for (cat, w) in want["per_category_AP"].as_object().unwrap() {
            let g = got.per_category_ap[&cat.parse::<u64>().unwrap()];
            assert!((g - w.as_f64().unwrap()).abs() <= 1e-12, "case{k} category {cat}: {g} vs {w}");
        }
        // Per-category AP50 (no pycocotools figure in the fixtures): pycocotools' AP50 is the
        // mean of the defined precisions at IoU 0.5 over categories and recall thresholds, the
        // same 101 of them for every category with ground truth, so it is the mean of the
        // categories' AP50s; checked against pycocotools' AP50 at 1e-12.
        let defined: Vec<f64> =
            got.per_category_ap50.values().copied().filter(|&v| v > -1.0).collect();
        assert!(!defined.is_empty(), "case{k}");
        let mean = defined.iter().sum::<f64>() / defined.len() as f64;
        let w = want["stats"]["AP50"].as_f64().unwrap();
        assert!((mean - w).abs() <= 1e-12, "case{k}: mean per-category AP50 {mean} vs AP50 {w}");
        assert_eq!(
            got.per_category_ap50.keys().collect::<Vec<_>>(),
            got.per_category_ap.keys().collect::<Vec<_>>()
        );
        // The names are the ground truth's.
        let gt: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("gt.json")).unwrap()).unwrap();
        for c in gt["categories"].as_array().unwrap() {
            let id = c["id"].as_u64().unwrap();
            assert_eq!(got.category_names[&id], c["name"].as_str().unwrap(), "case{k}");
        }
    }
}

#[test]
fn recall_at_k_counts_phrases_hit_within_k() {
    let g = [0.0f32, 0.0, 10.0, 10.0];
    let miss = [50.0f32, 50.0, 60.0, 60.0];
    let phrases =
        vec![(vec![miss, g], vec![g]), (vec![g], vec![g]), (vec![miss], vec![g]), (vec![], vec![])];
    assert_eq!(recall_at_k(&phrases, &[1, 2, 10]), vec![1.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0]);
}
