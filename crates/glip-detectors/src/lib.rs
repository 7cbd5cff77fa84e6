//! The built-in [`glip_core::Detector`]s: what turns the fused image and text tokens into
//! predictions, each with its own scoring and NMS default.
//! - [`DecoderDetector`]: the seed's design. A query generator turns the text (and image) into
//!   queries, the transformer's decoder refines them, box and class/token heads predict.
//! - [`DenseHead`]: GLIP's one-stage head. Every location of every level predicts a box from
//!   its point and region-word alignment logits (optionally FCOS's centerness).
//! - [`QuerySelection`]: Grounding DINO's language-guided query selection with box
//!   refinement through its own decoder layers, and DINO's contrastive denoising queries in
//!   training ([`denoising`]).
//!
//! # Must not know about
//! Configs, registries, losses, datasets (`glip-train` assembles and trains them).

pub mod decoding;
pub mod denoising;
pub mod dense;

pub use decoding::{
    DecoderDetector, ImageAttentionKind, QueryContent, QuerySelection, QuerySelectionConfig,
};
pub use denoising::DenoisingConfig;
pub use dense::{DenseHead, DenseHeadConfig};
