//! The model assembled from components: any backbone, text encoder, transformer, fusion and
//! detector behind the `glip_core` traits.

use candle_core::{Result, Tensor};
use glip_backbone::layers::Conv;
use glip_core::{Backbone, Contract};
use glip_core::{
    Detector, Encoded, Fusion, ImageBatch, LevelShape, ModelOutput, Target, TextBatch, TextEncoder,
    TextFeatures, TextSegments, TokenLayout, Transformer,
};
use glip_transformer::{downsample_mask, sine_position_encoding};

use crate::config::TextAttention;

/// A GLIP-style detector: image -> backbone levels -> 1x1 `input_proj` per level (optionally a
/// top-down FPN) -> encoder over the tokens of every level -> fusion with the text -> a
/// [`Detector`] (query decoder, dense head, query selection).
pub struct GlipModel {
    /// Image feature extractor.
    pub backbone: Box<dyn Backbone>,
    /// Which backbone levels feed the transformer (indices into its outputs, finest first; the
    /// seed uses C5 alone).
    pub feature_levels: Vec<usize>,
    /// 1x1 convolution from each level's channels to `d`.
    pub input_proj: Vec<Conv>,
    /// `(levels, d)` learned level embedding added to the positions of a multi-level model.
    pub level_embed: Option<Tensor>,
    /// Top-down FPN over the projected levels: each level plus the nearest-upsampled next one.
    pub fpn: bool,
    /// Text encoder.
    pub text: Box<dyn TextEncoder>,
    /// Encoder (and the decoder of detectors that use it).
    pub transformer: Box<dyn Transformer>,
    /// Image-text fusion on the encoder output.
    pub fusion: Box<dyn Fusion>,
    /// From the fused tokens to predictions.
    pub detector: Box<dyn Detector>,
    /// Add DETR's sine positional encoding in attention (the seed has none).
    pub position_encoding: bool,
    /// Transformer width.
    pub d_model: usize,
    /// GLIP's prompt tuning: `(positions, text width)` offsets added to the text encoder's
    /// token features (`model.prompt_positions`).
    pub prompt: Option<Tensor>,
    /// What text tokens attend to (`model.text_attention`): with `SubSentence`, the text
    /// encoder and the fusion get the captions' [`glip_core::TextSegments`].
    pub text_attention: TextAttention,
}

impl std::fmt::Debug for GlipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlipModel")
            .field("feature_levels", &self.feature_levels)
            .field("d_model", &self.d_model)
            .field("position_encoding", &self.position_encoding)
            .field("fpn", &self.fpn)
            .finish_non_exhaustive()
    }
}

fn any_padding(mask: &Tensor) -> Result<bool> {
    Ok(mask.flatten_all()?.min(0)?.to_scalar::<u8>()? == 0)
}

/// Nearest 2x upsampling of `x (b, c, h, w)` cropped to `(th, tw)` (differentiable: a
/// broadcast, candle has no backward for non-integer nearest scales).
fn upsample_to(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let up = x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, 2, w, 2))?.reshape((
        b,
        c,
        2 * h,
        2 * w,
    ))?;
    up.narrow(2, 0, th.min(2 * h))?.narrow(3, 0, tw.min(2 * w))
}

/// Real `(width, height)` of each image from its `(b, h, w)` pixel mask (padding is at the
/// right and bottom).
fn image_sizes(mask: &Tensor) -> Result<Vec<(f32, f32)>> {
    let (b, h, w) = mask.dims3()?;
    let m: Vec<u8> = mask.flatten_all()?.to_vec1()?;
    Ok((0..b)
        .map(|i| {
            let im = &m[i * h * w..(i + 1) * h * w];
            let width = im[..w].iter().filter(|&&v| v != 0).count().max(1);
            let height = (0..h).filter(|&r| im[r * w] != 0).count().max(1);
            (width as f32, height as f32)
        })
        .collect())
}

/// What a batch's sub-sentences are made from: its tokens' spans, its captions, the device.
type SegmentsKey = (Vec<Vec<(usize, usize)>>, Vec<String>, candle_core::DeviceLocation);

thread_local! {
    static SEGMENTS: std::cell::RefCell<glip_kernels::graph::Recent<SegmentsKey, TextSegments>> =
        const { std::cell::RefCell::new(glip_kernels::graph::Recent::new(4)) };
}

/// The batch's sub-sentences ([`TextBatch::sub_sentences`]), kept per thread for its captions:
/// made on the host and uploaded once for a prompt detection runs again and again, which a
/// CUDA graph's replays then read instead of recording an upload.
fn sub_sentences(text: &TextBatch) -> Result<TextSegments> {
    let dev = text.input_ids.device();
    let key = (text.offsets.clone(), text.captions.clone(), dev.location());
    SEGMENTS.with(|kept| {
        kept.borrow_mut().get_or_make(
            key,
            |_| text.sub_sentences(dev),
            |s| vec![&s.positions, &s.starts],
        )
    })
}

impl GlipModel {
    /// Runs the model on a batch. Padding in the image mask is masked out of every attention
    /// over image tokens; padding in the text mask out of every attention over text tokens.
    pub fn forward(
        &self,
        images: &ImageBatch,
        text: &TextBatch,
        train: bool,
    ) -> Result<ModelOutput> {
        self.forward_traced(images, text, train, &mut |_, _| {})
    }

    /// [`GlipModel::forward`], calling `trace(name, shape)` for every tensor passed between
    /// components (what `glip inspect` prints).
    pub fn forward_traced(
        &self,
        images: &ImageBatch,
        text: &TextBatch,
        train: bool,
        trace: &mut dyn FnMut(&str, &[usize]),
    ) -> Result<ModelOutput> {
        self.run(images, text, train, None, trace)
    }

    /// A training step's forward pass, the batch's `targets` given to the detector (for
    /// queries made from them: [`glip_core::DenoisingOutput`]).
    pub fn forward_train(
        &self,
        images: &ImageBatch,
        text: &TextBatch,
        targets: &[Target],
    ) -> Result<ModelOutput> {
        if targets.len() != images.len() {
            candle_core::bail!("{} targets for a batch of {} images", targets.len(), images.len())
        }
        self.run(images, text, true, Some(targets), &mut |_, _| {})
    }

    fn run(
        &self,
        images: &ImageBatch,
        text: &TextBatch,
        train: bool,
        targets: Option<&[Target]>,
        trace: &mut dyn FnMut(&str, &[usize]),
    ) -> Result<ModelOutput> {
        let mut c = Contract::new();
        c.tensor("images", &images.pixels, "b 3 h w")?;
        c.tensor("input_ids", &text.input_ids, "b t")?;
        trace("images", images.pixels.dims());
        trace("text.input_ids", text.input_ids.dims());
        let levels = self.backbone.forward(&images.pixels, train)?;
        for (i, l) in levels.iter().enumerate() {
            trace(&format!("backbone level {i} (stride {})", l.stride), l.tensor.dims());
        }
        let mut maps = Vec::with_capacity(self.feature_levels.len());
        let mut shapes = Vec::with_capacity(self.feature_levels.len());
        for (&li, proj) in self.feature_levels.iter().zip(&self.input_proj) {
            let Some(level) = levels.get(li) else {
                candle_core::bail!(
                    "feature level {li} but the backbone returns {} levels",
                    levels.len()
                )
            };
            // A bf16 level (bf16 activations) is projected in bf16, then cast: the projection
            // is narrower than the level.
            let f = proj.forward(&level.tensor)?.to_dtype(candle_core::DType::F32)?;
            trace(&format!("input_proj (level {li})"), f.dims());
            let (_, _, h, w) = f.dims4()?;
            shapes.push(LevelShape { h, w, stride: level.stride });
            maps.push(f);
        }
        if self.fpn {
            for k in (0..maps.len().saturating_sub(1)).rev() {
                let (_, _, h, w) = maps[k].dims4()?;
                maps[k] = (&maps[k] + upsample_to(&maps[k + 1], h, w)?)?;
                trace(&format!("fpn (level {})", self.feature_levels[k]), maps[k].dims());
            }
        }
        let b = images.len();
        let dev = images.pixels.device();
        // The masks, the positional encodings and the image sizes come from the mask's host
        // copy (kept by the collate): on a GPU nothing here waits for the device.
        let host_mask = images.host_mask()?;
        let (mut srcs, mut masks, mut poss) = (Vec::new(), Vec::new(), Vec::new());
        for (k, f) in maps.iter().enumerate() {
            let (_, d, h, w) = f.dims4()?;
            srcs.push(f.flatten_from(2)?.transpose(1, 2)?); // (b, h w, d)
            let fmask = downsample_mask(&host_mask, h, w)?;
            let mut pos = if self.position_encoding {
                Some(sine_position_encoding(&fmask, d, 10000.0, dev)?)
            } else {
                None
            };
            if let Some(e) = &self.level_embed {
                let le = e.get(k)?.reshape((1, 1, d))?.broadcast_as((b, h * w, d))?;
                pos = Some(match pos {
                    Some(p) => p.broadcast_add(&le)?,
                    None => le.contiguous()?,
                });
            }
            poss.push(pos);
            masks.push(fmask.reshape((b, h * w))?);
        }
        let src = Tensor::cat(&srcs, 1)?.contiguous()?; // (b, s, d)
        let fmask = Tensor::cat(&masks, 1)?;
        let mask = if any_padding(&fmask)? { Some(fmask.to_device(dev)?) } else { None };
        let pos = match poss.iter().all(Option::is_some) && !poss.is_empty() {
            true => Some(Tensor::cat(&poss.into_iter().flatten().collect::<Vec<_>>(), 1)?),
            false => None,
        };
        let segments = match self.text_attention {
            TextAttention::Sentence => None,
            TextAttention::SubSentence => Some(sub_sentences(text)?),
        };
        let mut tf = match &segments {
            Some(s) => {
                self.text.forward_segmented(&text.input_ids, &text.attention_mask, s, train)?
            }
            None => self.text.forward(&text.input_ids, &text.attention_mask, train)?,
        };
        if let Some(offsets) = &self.prompt {
            let (t, positions) = (tf.tokens.dim(1)?, offsets.dim(0)?);
            if t > positions {
                candle_core::bail!(
                    "a prompt of {t} tokens, but model.prompt_positions = {positions}: the prompt \
                     offsets cover that many positions"
                );
            }
            // In the tokens' dtype (f32 from the built-in BERT; a no-op then).
            let offsets = offsets.narrow(0, 0, t)?.to_dtype(tf.tokens.dtype())?;
            tf.tokens = tf.tokens.broadcast_add(&offsets.unsqueeze(0)?)?;
            trace("text.tokens + prompt offsets", tf.tokens.dims());
        }
        trace("text.tokens", tf.tokens.dims());
        if let Some(p) = &tf.pooled {
            trace("text.pooled", p.dims());
        }
        trace("encoder input (image tokens)", src.dims());
        let sizes = image_sizes(&host_mask)?;
        let memory = self.transformer.encode_levels(
            &src,
            mask.as_ref(),
            pos.as_ref(),
            &shapes,
            &sizes,
            train,
        )?;
        trace("encoder output (memory)", memory.dims());
        let layout = TokenLayout {
            pos: pos.as_ref(),
            levels: &shapes,
            image_sizes: &sizes,
            text: segments.as_ref(),
        };
        let (memory, tokens) =
            self.fusion.forward_at(&memory, mask.as_ref(), layout, &tf.tokens, &tf.mask, train)?;
        trace("fusion: memory", memory.dims());
        trace("fusion: text tokens", tokens.dims());
        let tf = TextFeatures::new(tokens, tf.pooled, tf.mask)?;
        self.detector.forward(
            &Encoded {
                memory: &memory,
                memory_mask: mask.as_ref(),
                pos: pos.as_ref(),
                levels: &shapes,
                image_sizes: &sizes,
                text: &tf,
                transformer: self.transformer.as_ref(),
                targets,
            },
            train,
            trace,
        )
    }
}
