//! Every trainable parameter of the backbones receives a finite, non-zero gradient.

use candle_core::{Device, Result, Tensor};
use glip_backbone::{MobileNetV2, ResNet, ResNetConfig, ResNetDepth};
use glip_core::Backbone;
use glip_testing::{assert_every_parameter_learns, fresh_vars, probe_loss};

fn running_stat(n: &str) -> bool {
    n.ends_with("running_mean") || n.ends_with("running_var")
}

fn loss_of_all_levels(levels: &[glip_core::FeatureMap]) -> Result<Tensor> {
    let mut total = probe_loss(&levels[0].tensor)?;
    for l in &levels[1..] {
        total = (total + probe_loss(&l.tensor)?)?;
    }
    Ok(total)
}

#[test]
fn resnet18_fully_trainable_with_trainable_bn_learns_everywhere() -> Result<()> {
    for trainable_bn in [false, true] {
        let (vm, vb) = fresh_vars();
        let cfg =
            ResNetConfig { depth: ResNetDepth::Resnet18, freeze_at: 0, trainable_bn, stages: 4 };
        let net = ResNet::new(cfg, vb)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu)?;
        let grads = loss_of_all_levels(&net.forward(&x, true)?)?.backward()?;
        // Frozen batch norm's affine parameters are constants: only convolutions learn then.
        assert_every_parameter_learns(&vm, &grads, |n| {
            running_stat(n) || (!trainable_bn && (n.contains("bn") || n.contains("downsample.1")))
        })?;
    }
    Ok(())
}

#[test]
fn resnet50_bottleneck_learns_everywhere() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let cfg =
        ResNetConfig { depth: ResNetDepth::Resnet50, freeze_at: 0, trainable_bn: true, stages: 4 };
    let net = ResNet::new(cfg, vb)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu)?;
    let grads = loss_of_all_levels(&net.forward(&x, true)?)?.backward()?;
    assert_every_parameter_learns(&vm, &grads, running_stat)
}

#[test]
fn freeze_at_stops_gradients_before_the_stage() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let cfg =
        ResNetConfig { depth: ResNetDepth::Resnet18, freeze_at: 2, trainable_bn: false, stages: 4 };
    let net = ResNet::new(cfg, vb)?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 64), &Device::Cpu)?;
    let grads = loss_of_all_levels(&net.forward(&x, true)?)?.backward()?;
    let vars = vm.data().lock().unwrap();
    for (name, v) in vars.iter() {
        let frozen = name.starts_with("conv1")
            || name.starts_with("layer1")
            || name.contains("bn")
            || name.contains("downsample.1");
        assert_eq!(grads.get(v.as_tensor()).is_none(), frozen, "{name}");
    }
    Ok(())
}

#[test]
fn mobilenet_v2_with_trainable_bn_learns_everywhere() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let net = MobileNetV2::new(vb, true, true)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu)?;
    let levels = net.forward(&x, true)?;
    let loss = (loss_of_all_levels(&levels)? + probe_loss(&net.logits(&levels[2].tensor)?)?)?;
    assert_every_parameter_learns(&vm, &loss.backward()?, running_stat)
}

#[test]
fn trainable_bn_updates_running_statistics_in_training_only() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let cfg =
        ResNetConfig { depth: ResNetDepth::Resnet18, freeze_at: 0, trainable_bn: true, stages: 4 };
    let net = ResNet::new(cfg, vb)?;
    let x = (Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)? + 3.0)?;
    let read =
        || vm.data().lock().unwrap()["bn1.running_mean"].as_tensor().to_vec1::<f32>().unwrap();
    let before = read();
    net.forward(&x, false)?;
    assert_eq!(read(), before, "eval must not touch running statistics");
    net.forward(&x, true)?;
    assert_ne!(read(), before, "training must update running statistics");
    Ok(())
}
