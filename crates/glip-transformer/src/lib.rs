//! Transformer pieces of glip-rs: multi-head attention with PyTorch's packed parameters,
//! Deformable DETR's multi-scale deformable attention, encoder and decoder layers with `torch.nn.Transformer` names, DETR's sine positional
//! encoding, query generators and image-text fusion (GLIP's bi-attention, Grounding DINO's feature
//! enhancer).
//!
//! # Owns
//! Implementations of [`glip_core::Transformer`], [`glip_core::QueryGenerator`] and
//! [`glip_core::Fusion`].
//!
//! # Must not know about
//! Which backbone or text encoder produced its inputs, heads, losses, datasets.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use glip_core::{Queries, Transformer};
//! use glip_transformer::{DetrTransformer, TransformerConfig};
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let t = DetrTransformer::new(TransformerConfig::new(32, 4, 1, 2, 64), vb).unwrap();
//! let src = Tensor::randn(0f32, 1.0, (2, 12, 32), &Device::Cpu).unwrap();
//! let memory = t.encode(&src, None, None, false).unwrap();
//! let q = Queries { content: Tensor::zeros((2, 5, 32), DType::F32, &Device::Cpu).unwrap(), pos: None, reference_boxes: None };
//! let hs = t.decode(&q, &memory, None, None, false).unwrap();
//! assert_eq!(hs.len(), 2);
//! assert_eq!(hs[1].dims(), &[2, 5, 32]);
//! ```

pub mod attention;
pub mod deformable;
pub mod fusion;
pub mod position;
pub mod query;
pub mod transformer;

pub use attention::MultiheadAttention;
pub use deformable::{DeformableAttention, Reference, SamplingLevels};
pub use fusion::{
    BiAttentionFusion, FeatureEnhancer, FeatureEnhancerConfig, FusionResidual, NoFusion,
};
pub use position::{downsample_mask, sine_position_encoding, text_sine_positions};
pub use query::{LearnedQueries, SeedQueries, TextAttendQueries};
pub use transformer::{
    Activation, DecoderLayer, DecoderLayerOptions, DecoderMemory, DetrTransformer,
    EncoderAttentionKind, EncoderLayer, EncoderLevels, TransformerConfig,
};
