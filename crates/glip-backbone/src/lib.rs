//! Image backbones for glip-rs: ResNet-18/34/50/101 and MobileNetV2 with torchvision's
//! parameter names, so torchvision checkpoints load without a renaming table.
//!
//! # Owns
//! Convolutional feature extractors implementing [`glip_core::Backbone`], frozen or trainable
//! batch norm, `freeze_at`, and a differentiable stem max-pool (candle has none for a 3x3
//! stride-2 window, see [`layers::max_pool_3x3_s2_p1`]).
//!
//! # Must not know about
//! Text, transformers, heads, losses, datasets or training loops.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use glip_backbone::{ResNet, ResNetConfig, ResNetDepth};
//! use glip_core::Backbone;
//!
//! let vm = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
//! let net = ResNet::new(ResNetConfig::new(ResNetDepth::Resnet18), vb).unwrap();
//! let x = Tensor::zeros((1, 3, 64, 96), DType::F32, &Device::Cpu).unwrap();
//! let levels = net.forward(&x, false).unwrap();
//! assert_eq!(levels[3].tensor.dims(), &[1, 512, 2, 3]);
//! assert_eq!(net.strides(), vec![4, 8, 16, 32]);
//! ```

pub mod layers;
pub mod mobilenet;
pub mod resnet;

pub use mobilenet::MobileNetV2;
pub use resnet::{ResNet, ResNetConfig, ResNetDepth};
