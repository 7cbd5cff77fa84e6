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
//! - [`deformable`]: multi-scale deformable attention's sampling, forward and backward.
//! - [`pool`]: the ResNet stem's 3x3 stride-2 max-pool with its backward.
//! - [`optim`]: AdamW's moment and weight updates and the EMA in place (on CUDA one kernel each,
//!   `cuda_optim`, private, compiled with NVRTC), gradient norms in one pass.
//! - [`topk`]: each row's best `k`, best first (on CUDA one kernel, nothing read back).
//! - `buf` and `reduce` (crate-private): the CPU kernels' outputs zeroed chunk by chunk on the
//!   threads that write them, and their row and plane sums and maxima in interleaved partial
//!   results (independent chains where there was one chain of dependent additions).
//! - [`nn`]: `Linear` (one op with its backward on the CPU), `LayerNorm`, seeded dropout, L2
//!   normalisation: the layers the model crates build on.
//!
//! # What it must not know about
//! Models, components, data, losses.

/// Inside an `impl CustomOp1/2/3`, the op's `cuda_fwd` (compiled with the `cuda` feature):
/// `$body` with `$me` for the op and each operand as a `(storage, layout)` pair.
macro_rules! cuda_fwd {
    (|$me:ident, $a:ident| $body:expr) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let ($me, $a) = (self, (s1, l1));
            $body
        }
    };
    (|$me:ident, $a:ident, $b:ident| $body:expr) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CudaStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let ($me, $a, $b) = (self, (s1, l1), (s2, l2));
            $body
        }
    };
    (|$me:ident, $a:ident, $b:ident, $c:ident| $body:expr) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CudaStorage,
            l2: &candle_core::Layout,
            s3: &candle_core::CudaStorage,
            l3: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let ($me, $a, $b, $c) = (self, (s1, l1), (s2, l2), (s3, l3));
            $body
        }
    };
}

/// The error of a `cuda_op!` op's CPU forward.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_only(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name} runs on CUDA only (its CPU path is another op)"))
}

/// Implements a candle custom op that runs only on CUDA: `cpu_fwd` is an error naming it,
/// `cuda_fwd` is `$fwd` over the operands as `(storage, layout)` pairs (with `$me` for the op),
/// and `bwd`, where given, is `$bwd` (with `$me` for the op too).
#[cfg(feature = "cuda")]
macro_rules! cuda_op {
    (CustomOp1 for $ty:ty, $name:literal, |$me:ident, $a:ident| $fwd:expr
     $(, bwd |$ba:ident, $by:ident, $bg:ident| $bwd:expr)?) => {
        impl candle_core::CustomOp1 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                Err($crate::cuda_only($name))
            }

            cuda_fwd!(|$me, $a| $fwd);

            $(fn bwd(&self, $ba: &candle_core::Tensor, $by: &candle_core::Tensor, $bg: &candle_core::Tensor) -> candle_core::Result<Option<candle_core::Tensor>> {
                let $me = self;
                let _ = $me;
                $bwd
            })?
        }
    };
    (CustomOp2 for $ty:ty, $name:literal, |$me:ident, $a:ident, $b:ident| $fwd:expr
     $(, bwd |$ba:ident, $bb:ident, $by:ident, $bg:ident| $bwd:expr)?) => {
        impl candle_core::CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                Err($crate::cuda_only($name))
            }

            cuda_fwd!(|$me, $a, $b| $fwd);

            $(fn bwd(
                &self,
                $ba: &candle_core::Tensor,
                $bb: &candle_core::Tensor,
                $by: &candle_core::Tensor,
                $bg: &candle_core::Tensor,
            ) -> candle_core::Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
                let $me = self;
                let _ = $me;
                $bwd
            })?
        }
    };
    (CustomOp3 for $ty:ty, $name:literal, |$me:ident, $a:ident, $b:ident, $c:ident| $fwd:expr
     $(, bwd |$ba:ident, $bb:ident, $bc:ident, $by:ident, $bg:ident| $bwd:expr)?) => {
        impl candle_core::CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
                _: &candle_core::CpuStorage,
                _: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                Err($crate::cuda_only($name))
            }

            cuda_fwd!(|$me, $a, $b, $c| $fwd);

            $(fn bwd(
                &self,
                $ba: &candle_core::Tensor,
                $bb: &candle_core::Tensor,
                $bc: &candle_core::Tensor,
                $by: &candle_core::Tensor,
                $bg: &candle_core::Tensor,
            ) -> candle_core::Result<(
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
                Option<candle_core::Tensor>,
            )> {
                let $me = self;
                let _ = $me;
                $bwd
            })?
        }
    };
}

/// Runs `f` with this thread's `flag` set, then restores what it was (also when `f` panics):
/// the switches tests use to force a data flow on the CPU.
fn with_flag_set<T>(
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore(&'static std::thread::LocalKey<std::cell::Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|c| c.replace(true)));
    f()
}

pub mod affine;
pub mod attention;
pub mod bf16;
mod buf;
pub mod conv;
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_launch;
#[cfg(feature = "cuda")]
mod cuda_layers;
#[cfg(feature = "cuda")]
mod cuda_linear;
#[cfg(feature = "cuda")]
mod cuda_optim;
mod cuda_source;
#[cfg(feature = "cudnn")]
mod cudnn;
pub mod deformable;
mod exp;
pub mod fused;
mod gemm;
pub mod graph;
pub mod layout;
mod linear_plan;
pub mod nn;
pub mod norm;
pub mod optim;
pub mod pool;
mod reduce;
pub mod topk;
