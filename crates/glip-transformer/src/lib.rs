//! Transformer pieces of glip-rs: multi-head attention with PyTorch's packed parameters,
//! encoder and decoder layers with `torch.nn.Transformer` names, positional encodings, query
//! generators and image-text fusion.
//!
//! # Owns
//! Implementations of [`glip_core::Transformer`], [`glip_core::QueryGenerator`] and
//! [`glip_core::Fusion`].
//!
//! # Must not know about
//! Which backbone or text encoder produced its inputs, heads, losses, datasets.
