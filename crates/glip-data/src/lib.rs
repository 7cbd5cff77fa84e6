//! Data of glip-rs: COCO and ODVG readers, the embedded synthetic `shapes` task, transforms
//! and batching into [`glip_core::ImageBatch`] and [`glip_core::Target`].
//!
//! # Owns
//! Files (or a generator) to batches, and validating them with errors that name the file and
//! the record.
//!
//! # Must not know about
//! Models, losses, optimisers.
