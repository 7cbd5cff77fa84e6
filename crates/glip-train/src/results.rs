//! What a run reports: every evaluation, the results written to `results.json`, and the
//! progress a front end shows while it trains.

use crate::eval::CocoMetrics;
use crate::trainer::LogLine;
use serde::{Deserialize, Serialize};

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Step.
    pub step: u64,
    /// Training minutes so far (evaluation excluded).
    pub train_minutes: f64,
    /// COCO numbers on the validation images.
    pub val: CocoMetrics,
    /// AP50 on the held-out colour-shape pairs only (-1 without any).
    pub heldout_ap50: f64,
    /// Recall@1, @5, @10 of phrase grounding (see [`crate::infer::Evaluation::recall`]).
    #[serde(default)]
    pub recall: [f64; 3],
    /// Phrase grounding on the captions of `data.val_grounding` (absent without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<crate::infer::CaptionRecall>,
}

/// What a run reports while it works (a progress bar, log lines).
pub trait Progress {
    /// A one-line message (an evaluation result, the budget reached).
    fn message(&mut self, msg: &str);
    /// Training from step `from` to step `to` of `total` begins.
    fn segment(&mut self, _from: u64, _to: u64, _total: u64) {}
    /// A step is done.
    fn step(&mut self, _step: u64, _loss: f32) {}
    /// A logged step (every `log_every`).
    fn log(&mut self, _line: &LogLine) {}
}

/// Messages to a closure; steps and logs ignored.
impl<F: FnMut(&str)> Progress for F {
    fn message(&mut self, msg: &str) {
        self(msg)
    }
}

/// The outcome of a run, written to `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentResult {
    /// The config's name.
    pub name: String,
    /// Steps trained.
    pub steps: u64,
    /// Wall-clock seconds of the run (training and evaluation).
    pub wall_s: f64,
    /// Minutes of training (evaluation excluded).
    pub train_minutes: f64,
    /// Every evaluation, in order.
    pub evals: Vec<EvalPoint>,
    /// The categories held out of training ([`crate::experiment::ExperimentConfig::held_out`]).
    #[serde(default)]
    pub held_out: Vec<String>,
}

impl ExperimentResult {
    /// The last evaluation.
    pub fn last(&self) -> Option<&EvalPoint> {
        self.evals.last()
    }

    /// The evaluation with the best validation AP50.
    pub fn best(&self) -> Option<&EvalPoint> {
        self.evals.iter().max_by(|a, b| a.val.get("AP50").total_cmp(&b.val.get("AP50")))
    }

    /// `results.json`: `val` (AP, AP50 and the other COCO numbers of the last evaluation, and AP
    /// per category id), `recall` (Recall@k of the category prompts), `caption_recall` (Recall@k on
    /// `data.val_grounding`'s captions, null without them), `heldout.AP50` (and `best_AP50`, and
    /// `categories`: their names), `best`, `steps`, `wall_s`, `train_minutes`, and every
    /// evaluation.
    pub fn to_json(&self) -> serde_json::Value {
        let val = |p: Option<&EvalPoint>| match p {
            Some(p) => {
                let mut m: serde_json::Map<_, _> = crate::eval::COCO_STAT_NAMES
                    .iter()
                    .map(|n| (n.to_string(), serde_json::json!(p.val.get(n))))
                    .collect();
                m.insert("per_category_AP".into(), serde_json::json!(p.val.per_category_ap));
                m.insert("per_category_AP50".into(), serde_json::json!(p.val.per_category_ap50));
                m.insert("category_names".into(), serde_json::json!(p.val.category_names));
                serde_json::Value::Object(m)
            }
            None => serde_json::Value::Null,
        };
        let heldout_best =
            self.evals.iter().map(|p| p.heldout_ap50).fold(f64::NEG_INFINITY, f64::max);
        let recall = |p: Option<&EvalPoint>| {
            p.map(|p| serde_json::json!({"R@1": p.recall[0], "R@5": p.recall[1], "R@10": p.recall[2]}))
        };
        let caption = self.last().and_then(|p| p.caption.as_ref()).map(|c| {
            serde_json::json!({"R@1": c.recall[0], "R@5": c.recall[1], "R@10": c.recall[2], "phrases": c.phrases, "captions": c.captions})
        });
        let evals: Vec<serde_json::Value> = self
            .evals
            .iter()
            .map(|p| {
                let mut e = serde_json::json!({"step": p.step, "train_minutes": p.train_minutes, "AP": p.val.get("AP"), "AP50": p.val.get("AP50"), "heldout_AP50": p.heldout_ap50, "R@1": p.recall[0]});
                if let Some(c) = &p.caption {
                    e["caption_R@1"] = serde_json::json!(c.recall[0]);
                }
                e
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "recall": recall(self.last()),
            "caption_recall": caption,
            "val": val(self.last()),
            "heldout": {"AP50": self.last().map(|p| p.heldout_ap50), "best_AP50": heldout_best.is_finite().then_some(heldout_best), "categories": self.held_out},
            "best": self.best().map(|p| serde_json::json!({"step": p.step, "train_minutes": p.train_minutes, "AP50": p.val.get("AP50"), "AP": p.val.get("AP"), "heldout_AP50": p.heldout_ap50})),
            "steps": self.steps,
            "wall_s": self.wall_s,
            "train_minutes": self.train_minutes,
            "evals": evals,
        })
    }
}
