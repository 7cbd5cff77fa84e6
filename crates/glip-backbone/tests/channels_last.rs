//! Channels-last activations through the ResNet (`glip_kernels::layout`; on a GPU
//! `GLIP_CHANNELS_LAST=1` with bf16 activations): from the stem's pool to the levels every
//! convolution and batch norm takes and gives channels-last tensors. Here it is forced on the
//! CPU (`with_channels_last`), where each op computes on an NCHW copy: the same arithmetic on
//! the same values, so the levels and every parameter's gradient must equal the NCHW run's bit
//! for bit, in f32 and in the bf16 data flow, with frozen and with trainable batch norm. The
//! cuDNN NHWC convolutions themselves are checked on a GPU (glip-train's `tests/cuda.rs`), the
//! affine kernel over the channels-last storage under the CUDA emulation (glip-kernels).

use candle_core::{DType, Device, Result, Tensor};
use glip_backbone::{ResNet, ResNetConfig, ResNetDepth};
use glip_core::Backbone;
use glip_kernels::bf16::with_bf16_activations;
use glip_kernels::layout::with_channels_last;
use glip_testing::fresh_vars;

/// The levels (as f32 values) and every gradient of one forward and backward pass.
type Pass = (Vec<Vec<f32>>, Vec<(String, Vec<f32>)>);

/// One forward pass of `net` on `x` (in training), and the backward of `sum(level * probe)`
/// over the levels, with channels-last activations or not, in the bf16 data flow or not.
fn pass(
    net: &ResNet,
    vm: &candle_nn::VarMap,
    x: &Tensor,
    probes: &[Tensor],
    channels_last: bool,
    bf16: bool,
) -> Result<Pass> {
    let forward = || net.forward(x, true);
    let levels = match (channels_last, bf16) {
        (true, true) => with_channels_last(|| with_bf16_activations(forward))?,
        (true, false) => with_channels_last(forward)?,
        (false, true) => with_bf16_activations(forward)?,
        (false, false) => forward()?,
    };
    let mut values = Vec::new();
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for (l, p) in levels.iter().zip(probes) {
        assert!(l.tensor.is_contiguous(), "a level handed on channels-last");
        let t = l.tensor.to_dtype(DType::F32)?;
        values.push(t.flatten_all()?.to_vec1()?);
        loss = (loss + (t * p)?.sum_all()?)?;
    }
    let grads = loss.backward()?;
    let mut g: Vec<(String, Vec<f32>)> = Vec::new();
    for (name, v) in vm.data().lock().expect("varmap lock").iter() {
        if let Some(t) = grads.get(v.as_tensor()) {
            g.push((name.clone(), t.flatten_all()?.to_vec1()?));
        }
    }
    g.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((values, g))
}

#[test]
fn resnet_levels_and_gradients_do_not_depend_on_the_layout() -> Result<()> {
    let x = Tensor::randn(0f32, 1.0, (2, 3, 40, 56), &Device::Cpu)?;
    for trainable_bn in [false, true] {
        let cfg =
            ResNetConfig { depth: ResNetDepth::Resnet18, freeze_at: 0, trainable_bn, stages: 4 };
        let (vm, vb) = fresh_vars();
        let net = ResNet::new(cfg, vb)?;
        let probes = net
            .forward(&x, false)?
            .iter()
            .map(|l| Tensor::randn(0f32, 1.0, l.tensor.dims(), &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        for bf16 in [false, true] {
            let what = format!("trainable_bn {trainable_bn}, bf16 activations {bf16}");
            // A trainable batch norm in training moves its running statistics, which the
            // forward pass does not read: the two passes see the same weights.
            let nchw = pass(&net, &vm, &x, &probes, false, bf16)?;
            let cl = pass(&net, &vm, &x, &probes, true, bf16)?;
            assert_eq!(nchw.0, cl.0, "{what}: levels");
            assert!(!nchw.1.is_empty());
            assert_eq!(nchw.1.len(), cl.1.len(), "{what}: the same parameters learn");
            for ((name, a), (_, b)) in nchw.1.iter().zip(&cl.1) {
                assert_eq!(a, b, "{what}: the gradient of {name}");
            }
        }
    }
    Ok(())
}
