//! Assembly and training of glip-rs: builds a model from the component crates, trains it,
//! evaluates it.
//!
//! # Owns
//! The only `match` on component config enums, the optimiser, checkpoints, logging and
//! evaluation.
//!
//! # Must not know about
//! Command-line parsing or experiment grids (those are glip-cli's and xtask's).

pub mod bench;
pub mod config;
pub mod detectors;
pub mod eval;
pub mod experiment;
pub mod infer;
pub mod model;
pub mod optim;
pub mod seed;
pub mod trainer;

pub use model::GlipModel;
