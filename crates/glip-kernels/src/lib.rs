//! The compute kernels and layers of glip-rs, each behind one function that picks its
//! implementation by device and dtype: custom CPU ops in f32 (with closed-form backwards) where
//! candle's own are slow or drop gradients, cuDNN for convolutions on CUDA (the `cudnn`
//! feature), candle's composition elsewhere. A CUDA implementation of each goes here, beside the
//! CPU one.
//!
//! # What this crate owns
//! - [`bf16`]: a bf16 gemm with f32 sums for AVX512_BF16 CPUs (run-time dispatch) and the
//!   `autocast` scope that puts gradient-free convolutions on it.
//! - [`conv`]: 2-D convolution as im2col + gemm image by image (forward, input and weight
//!   gradients) and depthwise convolution, its products written by `gemm` (crate-private:
//!   products into uninitialised output).
//! - [`cuda`]: the GPU side: TF32, bf16 autocast on CUDA, the convolution's dispatch; with the
//!   `cudnn` feature, convolution forward and both gradients through cuDNN (`cudnn`, private).
//! - [`norm`]: training-mode batch norm as one op with its backward.
//! - [`fused`]: softmax over the last axis and layer norm, with gradients.
//! - [`pool`]: the ResNet stem's 3x3 stride-2 max-pool with its backward.
//! - [`optim`]: AdamW's moment and weight updates and the EMA in place (on CUDA one kernel each,
//!   `cuda_optim`, private, compiled with NVRTC), gradient norms in one pass.
//! - [`nn`]: `Linear` (one op with its backward on the CPU), `LayerNorm`, seeded dropout, L2
//!   normalisation: the layers the model crates build on.
//!
//! # What it must not know about
//! Models, components, data, losses.

pub mod affine;
pub mod bf16;
pub mod conv;
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_launch;
#[cfg(feature = "cuda")]
mod cuda_layers;
#[cfg(feature = "cuda")]
mod cuda_optim;
mod cuda_source;
#[cfg(feature = "cudnn")]
mod cudnn;
pub mod fused;
mod gemm;
pub mod nn;
pub mod norm;
pub mod optim;
pub mod pool;
