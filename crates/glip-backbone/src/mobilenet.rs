//! torchvision MobileNetV2 (`features.N...`, `classifier.1`), returning the stride 8/16/32
//! feature maps (after `features.6`, `features.13`, `features.18`) and optionally the ImageNet
//! logits.

use crate::layers::{BatchNorm2d, Conv};
use candle_core::{Result, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};
use glip_core::{Backbone, FeatureMap};

/// conv -> batch norm -> optional ReLU6 (torchvision `Conv2dNormActivation`).
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv,
    bn: BatchNorm2d,
    relu6: bool,
}

impl ConvBn {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn.forward(&self.conv.forward(x)?, train)?;
        if self.relu6 {
            y.clamp(0f32, 6f32)
        } else {
            Ok(y)
        }
    }
}

#[derive(Debug, Clone)]
struct InvertedResidual {
    layers: Vec<ConvBn>,
    residual: bool,
}

/// MobileNetV2 with frozen batch norm by default.
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    last: ConvBn,
    classifier: Option<Linear>,
}

// (expansion t, channels c, repeats n, first stride s), torchvision's table.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

impl MobileNetV2 {
    /// Builds from `vb` (names `features.0.0.weight`, ...). With `classifier`, also loads
    /// `classifier.1` for ImageNet logits. `trainable_bn` switches frozen batch norm off.
    pub fn new(vb: VarBuilder<'_>, classifier: bool, trainable_bn: bool) -> Result<Self> {
        let frozen_bn = !trainable_bn;
        let f = vb.pp("features");
        let cbn = |vb: VarBuilder<'_>, ci, co, k, s, g, relu6| -> Result<ConvBn> {
            Ok(ConvBn {
                conv: Conv::new(vb.pp("0"), ci, co, k, s, (k - 1) / 2, g, false, false)?,
                bn: BatchNorm2d::new(co, frozen_bn, vb.pp("1"))?,
                relu6,
            })
        };
        let stem = cbn(f.pp("0"), 3, 32, 3, 2, 1, true)?;
        let mut blocks = Vec::new();
        let mut cin = 32;
        let mut idx = 1;
        for (t, c, n, s) in SETTINGS {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let hidden = cin * t;
                let b = f.pp(idx.to_string()).pp("conv");
                let mut layers = Vec::new();
                let mut k = 0;
                if t != 1 {
                    layers.push(cbn(b.pp(k.to_string()), cin, hidden, 1, 1, 1, true)?);
                    k += 1;
                }
                layers.push(cbn(b.pp(k.to_string()), hidden, hidden, 3, stride, hidden, true)?);
                // Projection: a bare conv at `conv.{k+1}` and its batch norm at `conv.{k+2}`.
                layers.push(ConvBn {
                    conv: Conv::new(
                        b.pp((k + 1).to_string()),
                        hidden,
                        c,
                        1,
                        1,
                        0,
                        1,
                        false,
                        false,
                    )?,
                    bn: BatchNorm2d::new(c, frozen_bn, b.pp((k + 2).to_string()))?,
                    relu6: false,
                });
                blocks.push(InvertedResidual { layers, residual: stride == 1 && cin == c });
                cin = c;
                idx += 1;
            }
        }
        let last = cbn(f.pp("18"), 320, 1280, 1, 1, 1, true)?;
        let classifier = if classifier {
            Some(candle_nn::linear(1280, 1000, vb.pp("classifier").pp("1"))?)
        } else {
            None
        };
        Ok(Self { stem, blocks, last, classifier })
    }

    /// `x (b, 3, h, w)` -> feature maps after `features.6`, `.13`, `.18` (strides 8, 16, 32).
    pub fn forward_levels(&self, x: &Tensor, train: bool) -> Result<[Tensor; 3]> {
        let mut x = self.stem.forward(x, train)?;
        let mut taps = Vec::with_capacity(3);
        for (i, b) in self.blocks.iter().enumerate() {
            let mut y = x.clone();
            for l in &b.layers {
                y = l.forward(&y, train)?;
            }
            x = if b.residual { (x + y)? } else { y };
            // blocks[i] is features.{i + 1}
            if i + 1 == 6 || i + 1 == 13 {
                taps.push(x.clone());
            }
        }
        taps.push(self.last.forward(&x, train)?);
        let [a, b, c]: [Tensor; 3] = taps.try_into().expect("three taps");
        Ok([a, b, c])
    }

    /// ImageNet logits `(b, 1000)` from the stride-32 map (global average pool, `classifier.1`).
    pub fn logits(&self, c5: &Tensor) -> Result<Tensor> {
        let Some(fc) = &self.classifier else {
            candle_core::bail!("MobileNetV2 built without its classifier: no logits")
        };
        fc.forward(&c5.mean(D::Minus1)?.mean(D::Minus1)?)
    }
}

impl Backbone for MobileNetV2 {
    fn forward(&self, images: &Tensor, train: bool) -> Result<Vec<FeatureMap>> {
        let levels = self.forward_levels(images, train)?;
        Ok(levels
            .into_iter()
            .zip([8, 16, 32])
            .map(|(tensor, stride)| FeatureMap { tensor, stride })
            .collect())
    }

    fn out_channels(&self) -> Vec<usize> {
        vec![32, 96, 1280]
    }

    fn strides(&self) -> Vec<usize> {
        vec![8, 16, 32]
    }
}
