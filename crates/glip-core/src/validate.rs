//! Config validation: every rule a value breaks, each naming its key (`data.shapes.train_images`)
//! and the rule, found before any model is built or any data made.
//!
//! A config section implements [`Validate`]; a section made of sections calls
//! [`Checker::section`] for each, so the keys come out whole. Rules that span sections (heads
//! dividing a width set elsewhere, feature levels against the backbone's stages) are written by
//! the type that holds both.
//!
//! Written here rather than with a validation crate (`garde`, `validator`): their derives want an
//! annotation on every field of some thirty config structs in eight crates, and half of the rules
//! here compare fields of different sections, which they express as custom functions anyway.
//!
//! ```
//! use glip_core::validate::{Checker, Validate};
//!
//! struct Data { batch_size: usize, lr: f64 }
//! impl Validate for Data {
//!     fn validate(&self, c: &mut Checker) {
//!         c.at_least("batch_size", self.batch_size, 1);
//!         c.finite_range("lr", self.lr, 0.0, 10.0);
//!     }
//! }
//! let mut c = Checker::new();
//! c.section("data", &Data { batch_size: 0, lr: f64::NAN });
//! let problems = c.finish().unwrap_err();
//! assert_eq!(problems.len(), 2);
//! assert_eq!(problems[0].to_string(), "data.batch_size = 0: must be at least 1");
//! assert!(problems[1].to_string().starts_with("data.lr = NaN"));
//! ```

use std::fmt::Display;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The whole key (`model.transformer.nhead`).
    pub key: String,
    /// The value as written, when there is one.
    pub value: Option<String>,
    /// The rule (`must be at least 1`).
    pub rule: String,
}

impl Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} = {}: {}", self.key, v, self.rule),
            None => write!(f, "{}: {}", self.key, self.rule),
        }
    }
}

/// Every problem of a config, one a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems:", all.len())?;
                for p in all {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Problems {}

impl std::ops::Deref for Problems {
    type Target = [Problem];
    fn deref(&self) -> &[Problem] {
        &self.0
    }
}

/// A config section that can check itself.
pub trait Validate {
    /// Reports every rule broken under `c`'s current key.
    fn validate(&self, c: &mut Checker);
}

/// Collects problems under a key prefix.
#[derive(Debug, Default)]
pub struct Checker {
    prefix: Vec<String>,
    problems: Vec<Problem>,
}

/// A number as a config would give it: `1e-300` rather than Display's 300 digits, and as
/// Display writes it otherwise (`0.5`, `1`, `inf`).
fn shown(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e16).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

impl Checker {
    /// An empty checker at the root.
    pub fn new() -> Self {
        Self::default()
    }

    /// The whole key of `key` under the current section.
    pub fn key(&self, key: &str) -> String {
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        if !key.is_empty() {
            parts.push(key);
        }
        parts.join(".")
    }

    /// Validates `v` as the section `key`.
    pub fn section(&mut self, key: &str, v: &(impl Validate + ?Sized)) {
        self.within(key, |c| v.validate(c));
    }

    /// Runs `f` with `key` as the current section.
    pub fn within(&mut self, key: &str, f: impl FnOnce(&mut Self)) {
        self.prefix.push(key.to_string());
        f(self);
        self.prefix.pop();
    }

    /// Reports that `key` (holding `value`) breaks `rule`.
    pub fn fail(&mut self, key: &str, value: impl Display, rule: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(Problem { key, value: Some(value.to_string()), rule: rule.into() });
    }

    /// Reports a rule about `key` as a whole (no single value to show).
    pub fn fail_rule(&mut self, key: &str, rule: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(Problem { key, value: None, rule: rule.into() });
    }

    /// `ok`, or `key` breaks `rule`.
    pub fn ensure(&mut self, ok: bool, key: &str, value: impl Display, rule: impl Into<String>) {
        if !ok {
            self.fail(key, value, rule);
        }
    }

    /// `v >= min`.
    pub fn at_least<T: PartialOrd + Display>(&mut self, key: &str, v: T, min: T) {
        if v < min {
            let rule = format!("must be at least {min}");
            self.fail(key, v, rule);
        }
    }

    /// `lo <= v <= hi` for a count or a size (`hi` bounds what fits in memory).
    pub fn in_range<T: PartialOrd + Display>(&mut self, key: &str, v: T, lo: T, hi: T) {
        if v < lo || v > hi {
            let rule = format!("must be in {lo}..={hi}");
            self.fail(key, v, rule);
        }
    }

    /// A finite `v` with `lo <= v <= hi`.
    pub fn finite_range(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        if !(v.is_finite() && lo <= v && v <= hi) {
            let rule = format!("must be a finite number in [{lo}, {hi}]");
            self.fail(key, shown(v), rule);
        }
    }

    /// A finite `v` with `lo < v <= hi`, still above `lo` once rounded to f32, the precision
    /// the model and the optimiser compute in (an `eps` of `1e-300` is 0 there: a division by
    /// zero). For a value used in f64 (a time), [`Checker::finite_above_f64`].
    pub fn finite_above(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        if !(v.is_finite() && lo < v && v <= hi) {
            self.finite_above_f64(key, v, lo, hi);
        } else if v as f32 <= lo as f32 {
            let rule = format!("must be above {lo} as an f32 too, the precision it is used in");
            self.fail(key, shown(v), rule);
        }
    }

    /// A finite `v` with `lo < v <= hi`, for a value used in f64.
    pub fn finite_above_f64(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        if !(v.is_finite() && lo < v && v <= hi) {
            let rule = format!("must be a finite number in ({lo}, {hi}]");
            self.fail(key, shown(v), rule);
        }
    }

    /// A probability: finite, in `[0, 1]`.
    pub fn probability(&mut self, key: &str, v: f64) {
        self.finite_range(key, v, 0.0, 1.0);
    }

    /// A dropout rate: finite, in `[0, 1)`.
    pub fn dropout(&mut self, key: &str, v: f64) {
        if !(v.is_finite() && (0.0..1.0).contains(&v)) {
            self.fail(key, shown(v), "must be a finite number in [0, 1)");
        }
    }

    /// A loss weight or cost: finite and not negative (`hi` bounds it away from overflow).
    pub fn weight(&mut self, key: &str, v: f64) {
        self.finite_range(key, v, 0.0, 1e6);
    }

    /// `width` is divisible by `heads` (attention splits the width among its heads).
    pub fn divides(&mut self, key: &str, heads: usize, width: usize, width_key: &str) {
        if heads > 0 && !width.is_multiple_of(heads) {
            let rule = format!("must divide {width_key} = {width}");
            self.fail(key, heads, rule);
        }
    }

    /// Whether nothing was reported so far.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems found, if any.
    pub fn finish(self) -> Result<(), Problems> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Problems(self.problems))
        }
    }
}

/// Bounds on sizes a config may ask for: each well above any model this framework trains on
/// one machine, and low enough that no product of two stays near `usize::MAX` or asks the
/// allocator for more than it can refuse gracefully.
pub mod limits {
    /// Image side in pixels (training resize, synthetic images, `inspect --size`).
    pub const IMAGE_SIDE: u32 = 8192;
    /// A width (`d_model`, BERT hidden, feed-forward).
    pub const WIDTH: usize = 65_536;
    /// Layers of a stack (encoder, decoder, BERT, tower).
    pub const LAYERS: usize = 256;
    /// Attention heads.
    pub const HEADS: usize = 1024;
    /// Object queries.
    pub const QUERIES: usize = 100_000;
    /// Images of one batch.
    pub const BATCH: usize = 4096;
    /// Images of a synthetic split.
    pub const IMAGES: usize = 100_000_000;
    /// Batches of one optimiser step (gradient accumulation; with at most `1 << 40` steps the
    /// count of batches stays far below `u64::MAX`).
    pub const ACCUMULATE: u64 = 65_536;
    /// Batches made ahead of the step (each holds a batch in memory).
    pub const PREFETCH: usize = 64;
    /// Times a mixed-in training source is repeated in one pass (`data.mix[i].repeat`).
    pub const REPEAT: usize = 1000;
    /// A vocabulary.
    pub const VOCAB: usize = 10_000_000;
    /// Classes of a fixed-class head.
    pub const CLASSES: usize = 1_000_000;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Inner(usize);
    impl Validate for Inner {
        fn validate(&self, c: &mut Checker) {
            c.in_range("n", self.0, 1, 4);
        }
    }

    #[test]
    fn keys_nest_and_every_problem_is_kept() {
        let mut c = Checker::new();
        c.within("model", |c| {
            c.section("backbone", &Inner(0));
            c.divides("nhead", 3, 16, "model.d_model");
            c.dropout("dropout", 1.0);
        });
        c.section("data", &Inner(2));
        c.weight("w", f64::INFINITY);
        let p = c.finish().unwrap_err();
        let lines: Vec<String> = p.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            lines,
            [
                "model.backbone.n = 0: must be in 1..=4",
                "model.nhead = 3: must divide model.d_model = 16",
                "model.dropout = 1: must be a finite number in [0, 1)",
                "w = inf: must be a finite number in [0, 1000000]",
            ]
        );
        assert!(p.to_string().starts_with("4 problems:\n  model.backbone.n"));
    }

    #[test]
    fn a_bound_above_holds_in_f32_too() {
        let mut c = Checker::new();
        c.finite_above("eps", 1e-300, 0.0, 1.0);
        c.finite_above("eps", 0.0, 0.0, 1.0);
        c.finite_above("scale", 1.0 + 1e-12, 1.0, 2.0);
        let p = c.finish().unwrap_err();
        let lines: Vec<String> = p.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "eps = 1e-300: must be above 0 as an f32 too, the precision it is used in",
                "eps = 0: must be a finite number in (0, 1]",
                "scale = 1.000000000001: must be above 1 as an f32 too, the precision it is used in",
            ]
        );
        // The smallest f32 above 0 passes; a value used in f64 is held to f64 alone.
        let mut c = Checker::new();
        c.finite_above("eps", f64::from(f32::from_bits(1)), 0.0, 1.0);
        c.finite_above_f64("minutes", 1e-300, 0.0, 1.0);
        assert!(c.finish().is_ok());
    }

    #[test]
    fn a_clean_section_passes() {
        let mut c = Checker::new();
        c.section("x", &Inner(3));
        c.probability("p", 0.0);
        c.finite_above("lr", 1e-4, 0.0, 1.0);
        assert!(c.finish().is_ok());
    }
}
