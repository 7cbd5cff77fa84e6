//! The bottom of the glip-rs workspace: tensor-shape contracts, the types that cross crate
//! boundaries, the component traits a researcher swaps, and box utilities.
//!
//! # What this crate owns
//! - [`shape`]: named-axis contracts (`"b q 4"`) whose errors name the tensor, the axis, what
//!   was expected and who bound it.
//! - [`types`]: image and text batches, targets, model outputs, matches and losses; each
//!   checks its shapes when built.
//! - [`traits`]: `Backbone`, `TextEncoder`, `QueryGenerator`, `Fusion`, `Transformer`, `Detector`,
//!   `BoxHead`, `ClassHead`, `Matcher`, `Criterion`.
//! - [`boxes`]: cxcywh/xyxy conversions, areas, IoU and GIoU (differentiable).
//! - [`prompt`]: captions from phrases and positive maps (which tokens ground which phrase).
//! - [`validate`]: config checks that name the key and the rule of every problem.
//! - [`weights`]: weight files (safetensors, PyTorch zip) and the trainable builder that
//!   initialises from them.
//!
//! The compute kernels and layers are `glip-kernels`'; the test helpers `glip-testing`'s.
//!
//! # What it must not know about
//! Any concrete model, dataset, file format or training loop. It depends on candle and nothing
//! of this workspace.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use glip_core::boxes::{box_iou, cxcywh_to_xyxy};
//!
//! let b = Tensor::new(&[[0.5f32, 0.5, 0.2, 0.4]], &Device::Cpu).unwrap();
//! let xyxy = cxcywh_to_xyxy(&b).unwrap();
//! assert_eq!(xyxy.to_vec2::<f32>().unwrap(), vec![vec![0.4, 0.3, 0.6, 0.7]]);
//! let iou = box_iou(&xyxy, &xyxy).unwrap().to_vec2::<f32>().unwrap();
//! assert!((iou[0][0] - 1.0).abs() < 1e-6);
//! ```

pub mod boxes;
pub mod prompt;
pub mod rng;
pub mod shape;
pub mod traits;
pub mod types;
pub mod validate;
pub mod weights;

pub use shape::{Contract, ShapeError};
pub use traits::*;
pub use types::*;
