//! torchvision ResNet-18/34/50/101 bodies returning C2..C5.

use crate::layers::{max_pool_3x3_s2_p1, BatchNorm2d, Conv};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use glip_core::{Backbone, FeatureMap};
use serde::{Deserialize, Serialize};

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResNetDepth {
    /// BasicBlock [2, 2, 2, 2].
    Resnet18,
    /// BasicBlock [3, 4, 6, 3].
    Resnet34,
    /// Bottleneck [3, 4, 6, 3].
    Resnet50,
    /// Bottleneck [3, 4, 23, 3].
    Resnet101,
}

impl ResNetDepth {
    fn blocks(self) -> [usize; 4] {
        match self {
            Self::Resnet18 => [2, 2, 2, 2],
            Self::Resnet34 | Self::Resnet50 => [3, 4, 6, 3],
            Self::Resnet101 => [3, 4, 23, 3],
        }
    }

    fn bottleneck(self) -> bool {
        matches!(self, Self::Resnet50 | Self::Resnet101)
    }

    /// Channels of C2..C5.
    pub fn channels(self) -> [usize; 4] {
        let e = if self.bottleneck() { 4 } else { 1 };
        [64 * e, 128 * e, 256 * e, 512 * e]
    }
}

/// ResNet options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Which ResNet.
    pub depth: ResNetDepth,
    /// Freeze the stages before this one (DETR/detectron2): 0 nothing, 1 the stem, 2 the stem and
    /// layer1, ... 5 everything. Default 2.
    #[serde(default = "default_freeze_at")]
    pub freeze_at: usize,
    /// Train batch norm (batch statistics) instead of FrozenBatchNorm2d. Default false.
    #[serde(default)]
    pub trainable_bn: bool,
    /// Stages built and run, 1 (C2) to 4 (C5). Default 4. A detector using C3 and C4 only
    /// saves layer4's parameters and compute with 3.
    #[serde(default = "four")]
    pub stages: usize,
}

fn default_freeze_at() -> usize {
    2
}

fn four() -> usize {
    4
}

impl ResNetConfig {
    /// `depth` with the defaults: stem and layer1 frozen, frozen batch norm.
    pub fn new(depth: ResNetDepth) -> Self {
        Self { depth, freeze_at: default_freeze_at(), trainable_bn: false, stages: 4 }
    }
}

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv, BatchNorm2d)>,
    downsample: Option<(Conv, BatchNorm2d)>,
}

impl Block {
    fn new(
        vb: VarBuilder<'_>,
        bottleneck: bool,
        cin: usize,
        planes: usize,
        stride: usize,
        frozen: bool,
        frozen_bn: bool,
    ) -> Result<Self> {
        let cout = if bottleneck { planes * 4 } else { planes };
        // (name index, cin, cout, kernel, stride, padding): torchvision puts the stride on the
        // 3x3 conv (ResNet v1.5).
        let spec: Vec<(usize, usize, usize, usize, usize, usize)> = if bottleneck {
            vec![
                (1, cin, planes, 1, 1, 0),
                (2, planes, planes, 3, stride, 1),
                (3, planes, cout, 1, 1, 0),
            ]
        } else {
            vec![(1, cin, planes, 3, stride, 1), (2, planes, planes, 3, 1, 1)]
        };
        let convs = spec
            .into_iter()
            .map(|(i, ci, co, k, s, p)| {
                let c = Conv::new(vb.pp(format!("conv{i}")), ci, co, k, s, p, 1, false, frozen)?;
                let bn = BatchNorm2d::new(co, frozen_bn, vb.pp(format!("bn{i}")))?;
                Ok((c, bn))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || cin != cout {
            let d = vb.pp("downsample");
            Some((
                Conv::new(d.pp("0"), cin, cout, 1, stride, 0, 1, false, frozen)?,
                BatchNorm2d::new(cout, frozen_bn, d.pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some(((last_conv, last_bn), inner)) = self.convs.split_last() else {
            candle_core::bail!("a residual block without convolutions")
        };
        let mut y = x.clone();
        for (c, bn) in inner {
            y = bn.forward_relu(&c.forward(&y)?, train, None)?;
        }
        let identity = match &self.downsample {
            Some((c, bn)) => bn.forward(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        last_bn.forward_relu(&last_conv.forward(&y)?, train, Some(&identity))
    }
}

/// A torchvision ResNet without `avgpool`/`fc`: `conv1`, `bn1`, `layer1..4`.
#[derive(Debug, Clone)]
pub struct ResNet {
    conv1: Conv,
    bn1: BatchNorm2d,
    layers: Vec<Vec<Block>>,
    config: ResNetConfig,
}

impl ResNet {
    /// Builds the body from `vb` (names without prefix: `conv1.weight`, `layer1.0.conv1.weight`).
    pub fn new(config: ResNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let depth = config.depth;
        let frozen_bn = !config.trainable_bn;
        let stem_frozen = config.freeze_at >= 1;
        let conv1 = Conv::new(vb.pp("conv1"), 3, 64, 7, 2, 3, 1, false, stem_frozen)?;
        let bn1 = BatchNorm2d::new(64, frozen_bn || stem_frozen, vb.pp("bn1"))?;
        if !(1..=4).contains(&config.stages) {
            candle_core::bail!("resnet: stages = {} (1 to 4)", config.stages);
        }
        let mut cin = 64;
        let mut layers: Vec<Vec<Block>> = vec![Vec::new(); config.stages];
        for (li, n) in depth.blocks().into_iter().enumerate().take(config.stages) {
            let planes = 64 << li;
            let frozen = config.freeze_at >= li + 2;
            let lvb = vb.pp(format!("layer{}", li + 1));
            for bi in 0..n {
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                let block = Block::new(
                    lvb.pp(bi.to_string()),
                    depth.bottleneck(),
                    cin,
                    planes,
                    stride,
                    frozen,
                    frozen_bn || frozen,
                )?;
                cin = if depth.bottleneck() { planes * 4 } else { planes };
                layers[li].push(block);
            }
        }
        Ok(Self { conv1, bn1, layers, config })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// `x (b, 3, h, w)` -> `[C2, C3, C4, C5]` with strides 4, 8, 16, 32 (the first `stages`), in
    /// [`glip_kernels::bf16::activation_dtype`] (bf16 inside a bf16 autocast on CUDA, else f32),
    /// each contiguous.
    pub fn forward_levels(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        // bf16 activations where they pay (a bf16 autocast on CUDA): one cast of the image here
        // instead of two around every convolution.
        let x = x.to_dtype(glip_kernels::bf16::activation_dtype(x))?;
        let x = self.bn1.forward_relu(&self.conv1.forward(&x)?, train, None)?;
        let mut x = max_pool_3x3_s2_p1(&x)?;
        // Channels-last from here to the levels where asked (`GLIP_CHANNELS_LAST=1`: bf16
        // convolutions without cuDNN's transposes; glip_kernels::layout). The stem stays NCHW
        // (its 3-channel input, and the pool's kernel): one copy after the pool.
        if glip_kernels::layout::backbone_channels_last(&x) {
            x = glip_kernels::layout::to_channels_last(&x)?;
        }
        let mut out: Vec<Tensor> = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            for block in layer {
                x = block.forward(&x, train)?;
            }
            // What reads the levels takes NCHW: one copy a level from channels-last.
            out.push(x.contiguous()?);
        }
        Ok(out)
    }
}

impl Backbone for ResNet {
    fn forward(&self, images: &Tensor, train: bool) -> Result<Vec<FeatureMap>> {
        let levels = self.forward_levels(images, train)?;
        Ok(levels
            .into_iter()
            .zip([4, 8, 16, 32])
            .map(|(tensor, stride)| FeatureMap { tensor, stride })
            .collect())
    }

    fn out_channels(&self) -> Vec<usize> {
        self.config.depth.channels()[..self.config.stages].to_vec()
    }

    fn strides(&self) -> Vec<usize> {
        [4, 8, 16, 32][..self.config.stages].to_vec()
    }
}
