//! Prediction heads of glip-rs: box heads, the fixed-class head, GLIP's token-alignment head
//! and post-processing (scores per category, top-k, NMS, boxes back to pixels).
//!
//! # Owns
//! Implementations of [`glip_core::BoxHead`] and [`glip_core::ClassHead`].
//!
//! # Must not know about
//! How hidden states were produced, losses, datasets.
