//! Losses of glip-rs: Hungarian matching, box and classification terms, the DETR and
//! grounding criteria of `reference/glip_ref.py`, and the dense head's FCOS/ATSS criterion.
//!
//! # Owns
//! Implementations of [`glip_core::Matcher`] and [`glip_core::Criterion`].
//!
//! # Must not know about
//! Datasets, file formats, the model's internals: it sees only [`glip_core::ModelOutput`]
//! and [`glip_core::Target`].
//!
//! ```
//! use glip_loss::matcher::hungarian;
//! // The greedy choice (row 0 takes column 0) is not the optimum.
//! let m = hungarian(&[1.0, 2.0, 2.0, 10.0], 2, 2).unwrap();
//! assert_eq!((m.query, m.target), (vec![0, 1], vec![1, 0]));
//! ```

pub mod criterion;
pub mod dense;
pub mod matcher;
pub mod terms;

pub use criterion::{LossConfig, SetCriterion};
pub use dense::{Assigner, DenseCriterion, DenseLossConfig};
pub use matcher::{HungarianMatcher, OrderedMatcher};
