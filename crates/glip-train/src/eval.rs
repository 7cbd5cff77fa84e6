//! Evaluation: COCO bbox mAP through the `hotcoco` crate (measured bit-identical to
//! pycocotools on the fixture cases), and Recall@k for caption grounding.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The twelve COCO summary numbers, in pycocotools' order.
pub const COCO_STAT_NAMES: [&str; 12] =
    ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];

/// COCO bbox results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoMetrics {
    /// The twelve summary numbers by name (`AP`, `AP50`, ... `ARl`); -1 where undefined.
    pub stats: BTreeMap<String, f64>,
    /// AP of each category id (area all, 100 detections); -1 for a category without ground truth.
    pub per_category_ap: BTreeMap<u64, f64>,
    /// AP50 of each category id, the same way (IoU 0.5 alone).
    #[serde(default)]
    pub per_category_ap50: BTreeMap<u64, f64>,
    /// The ground truth's name of each category id.
    #[serde(default)]
    pub category_names: BTreeMap<u64, String>,
}

impl CocoMetrics {
    /// One summary number by name.
    pub fn get(&self, name: &str) -> f64 {
        self.stats.get(name).copied().unwrap_or(-1.0)
    }

    /// The mean AP50 of the categories named `names` that have ground truth here (-1 when none
    /// has): the held-out (novel) categories' AP50 of an open-vocabulary split.
    pub fn mean_ap50_of(&self, names: &[String]) -> f64 {
        let v: Vec<f64> = self
            .per_category()
            .into_iter()
            .filter(|&(_, name, _, ap50)| ap50 >= 0.0 && names.iter().any(|n| n == name))
            .map(|(_, _, _, ap50)| ap50)
            .collect();
        if v.is_empty() {
            -1.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }

    /// Every evaluated category in id order: id, name (empty when the ground truth has none),
    /// AP and AP50 (-1 without ground truth).
    pub fn per_category(&self) -> Vec<(u64, &str, f64, f64)> {
        self.per_category_ap
            .iter()
            .map(|(&id, &ap)| {
                let name = self.category_names.get(&id).map_or("", String::as_str);
                (id, name, ap, self.per_category_ap50.get(&id).copied().unwrap_or(-1.0))
            })
            .collect()
    }
}

/// An evaluation failure, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// hotcoco refused an input.
    #[error("{path}: {msg}")]
    Coco { path: String, msg: String },
}

fn err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Coco { path: path.display().to_string(), msg: e.to_string() }
}

/// One detection in COCO results format (`bbox` is `x, y, w, h` in pixels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoDetection {
    /// Image id of the ground truth.
    pub image_id: u64,
    /// Category id of the ground truth.
    pub category_id: u64,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// Score.
    pub score: f64,
}

/// Evaluates `dets` against the ground truth file `gt` (COCO bbox protocol).
pub fn evaluate_coco(gt: &Path, dets: &[CocoDetection]) -> Result<CocoMetrics, EvalError> {
    let coco = hotcoco::COCO::new(gt).map_err(|e| err(gt, e))?;
    let anns: Vec<hotcoco::types::Annotation> =
        serde_json::from_value(serde_json::to_value(dets).map_err(|e| err(gt, e))?)
            .map_err(|e| err(gt, e))?;
    let res = coco.load_res_anns(anns).map_err(|e| err(gt, format!("detections: {e}")))?;
    summarize(coco, res, gt)
}

/// Reads a ground-truth file as [`evaluate_coco`] will, to find a fault in it before the work
/// that ends in an evaluation.
pub fn check_ground_truth(gt: &Path) -> Result<(), EvalError> {
    hotcoco::COCO::new(gt).map(|_| ()).map_err(|e| err(gt, e))
}

/// Evaluates a COCO results file against a ground truth file, as `pycocotools` would.
pub fn evaluate_coco_files(gt: &Path, dets: &Path) -> Result<CocoMetrics, EvalError> {
    let coco = hotcoco::COCO::new(gt).map_err(|e| err(gt, e))?;
    let text = std::fs::read_to_string(dets).map_err(|e| err(dets, e))?;
    let entries = check_results(&text, &coco.get_img_ids(&[], &[])).map_err(|e| err(dets, e))?;
    let empty = entries == 0;
    let res = if empty { coco.load_res_anns(Vec::new()) } else { coco.load_res(dets) }
        .map_err(|e| err(dets, e))?;
    summarize(coco, res, gt)
}

/// What pycocotools' `loadRes` asserts of a bbox results file before it evaluates (a list of
/// detections, each of an image of the ground truth) and what its reader assumes (a box of four
/// numbers), said with the entry at fault; the number of detections.
fn check_results(text: &str, gt_images: &[u64]) -> Result<usize, String> {
    #[derive(Deserialize)]
    struct Entry {
        image_id: u64,
        /// Read to check that there are four numbers.
        #[serde(rename = "bbox")]
        _bbox: [f64; 4],
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("not a COCO results list (a JSON list of detections): {e}"))?;
    let known: std::collections::HashSet<u64> = gt_images.iter().copied().collect();
    for (i, v) in list.iter().enumerate() {
        let e: Entry =
            serde_json::from_value(v.clone()).map_err(|e| format!("detection {i}: {e}"))?;
        if !known.contains(&e.image_id) {
            return Err(format!(
                "detection {i}: image_id {} is not an image of the ground truth (pycocotools refuses such a file)",
                e.image_id
            ));
        }
    }
    Ok(list.len())
}

fn summarize(gt: hotcoco::COCO, dt: hotcoco::COCO, path: &Path) -> Result<CocoMetrics, EvalError> {
    let category_names = gt.dataset.categories.iter().map(|c| (c.id, c.name.clone())).collect();
    let mut ev = hotcoco::COCOeval::new(gt, dt, hotcoco::params::IouType::Bbox);
    ev.evaluate().map_err(|e| err(path, e))?;
    ev.accumulate();
    ev.summarize_lines();
    let stats = ev.stats().ok_or_else(|| err(path, "no statistics computed"))?;
    let stats: BTreeMap<String, f64> =
        COCO_STAT_NAMES.iter().map(|s| s.to_string()).zip(stats.iter().copied()).collect();
    let (mut per_category_ap, mut per_category_ap50) = (BTreeMap::new(), BTreeMap::new());
    if let Some(acc) = ev.accumulated() {
        let a = ev.params.all_area_idx();
        let m = ev.params.max_det_idx();
        // pycocotools' summary: the mean of the interpolated precisions that are defined (> -1)
        // over the IoU thresholds `ts` and the recall thresholds, here of one category.
        let mean = |k: usize, ts: std::ops::Range<usize>| {
            let (mut sum, mut n) = (0.0, 0usize);
            for t in ts {
                for r in 0..acc.shape.r {
                    let p = acc.precision[acc.precision_idx(t, r, k, a, m)];
                    if p > -1.0 {
                        sum += p;
                        n += 1;
                    }
                }
            }
            if n > 0 {
                sum / n as f64
            } else {
                -1.0
            }
        };
        let at50 = ev.params.iou_thrs.iter().position(|&t| (t - 0.5).abs() < 1e-12);
        for (k, &cat) in acc.cat_ids.iter().enumerate() {
            per_category_ap.insert(cat, mean(k, 0..acc.shape.t));
            if let Some(t) = at50 {
                per_category_ap50.insert(cat, mean(k, t..t + 1));
            }
        }
    }
    Ok(CocoMetrics { stats, per_category_ap, per_category_ap50, category_names })
}

/// Recall@k for caption grounding (Flickr30k Entities style): for each phrase with ground-truth
/// boxes, whether any of its `k` best-scored predicted boxes has IoU >= 0.5 with one of them.
/// `phrases` holds, per phrase, its predicted boxes sorted by descending score and its ground
/// truth boxes (xyxy). Returns recall for each `k` in `ks`.
pub fn recall_at_k(phrases: &[(Vec<[f32; 4]>, Vec<[f32; 4]>)], ks: &[usize]) -> Vec<f64> {
    ks.iter()
        .map(|&k| {
            let (mut hit, mut n) = (0usize, 0usize);
            for (pred, gt) in phrases {
                if gt.is_empty() {
                    continue;
                }
                n += 1;
                if pred
                    .iter()
                    .take(k)
                    .any(|p| gt.iter().any(|g| glip_core::boxes::iou_f32(*p, *g) >= 0.5))
                {
                    hit += 1;
                }
            }
            if n == 0 {
                0.0
            } else {
                hit as f64 / n as f64
            }
        })
        .collect()
}
