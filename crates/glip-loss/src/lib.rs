//! Losses of glip-rs: Hungarian matching, box and classification terms, and the DETR and
//! grounding criteria of `glip_reference.py`.
//!
//! # Owns
//! Implementations of [`glip_core::Matcher`] and [`glip_core::Criterion`].
//!
//! # Must not know about
//! Datasets, file formats, the model's internals: it sees only [`glip_core::ModelOutput`]
//! and [`glip_core::Target`].
