//! Output shapes of the backbones for any batch and image size.
//!
//! Image padding is not tested for invariance here: a convolution's output near a padded border
//! depends on the padding (as in DETR); padding invariance is guaranteed from the transformer on,
//! where the mask removes padded tokens (see glip-transformer's tests).

use candle_core::{Device, Tensor};
use glip_backbone::{MobileNetV2, ResNet, ResNetConfig, ResNetDepth};
use glip_core::Backbone;
use glip_testing::fresh_vars;
use proptest::prelude::*;

fn down(x: usize) -> usize {
    (x - 1) / 2 + 1
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn resnet_and_mobilenet_level_shapes(b in 1usize..3, h in 17usize..80, w in 17usize..80) {
        let (_vm, vb) = fresh_vars();
        let net = ResNet::new(ResNetConfig::new(ResNetDepth::Resnet18), vb.pp("r")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (b, 3, h, w), &Device::Cpu).unwrap();
        let levels = net.forward(&x, false).unwrap();
        let (mut eh, mut ew) = (down(down(h)), down(down(w)));
        for (i, l) in levels.iter().enumerate() {
            if i > 0 { eh = down(eh); ew = down(ew); }
            prop_assert_eq!(l.tensor.dims(), &[b, net.out_channels()[i], eh, ew]);
            prop_assert_eq!(l.stride, 4 << i);
        }
        let mnet = MobileNetV2::new(vb.pp("m"), false, false).unwrap();
        let levels = mnet.forward(&x, false).unwrap();
        let (mut eh, mut ew) = (down(down(down(h))), down(down(down(w))));
        for (i, l) in levels.iter().enumerate() {
            if i > 0 { eh = down(eh); ew = down(ew); }
            prop_assert_eq!(l.tensor.dims(), &[b, mnet.out_channels()[i], eh, ew]);
        }
    }
}
