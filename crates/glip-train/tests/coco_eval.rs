//! COCO evaluation against pycocotools' own numbers (`coco/caseK/expected.json` of the
//! fixtures, written by `reference/make_fixtures.py`): the 12 summary numbers and per-category AP, to 1e-12.

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
