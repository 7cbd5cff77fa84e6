//! The detector assembled from components: any backbone, text encoder, query generator,
//! fusion, transformer and heads behind the `glip_core` traits.

use candle_core::{DType, Result, Tensor};
use glip_backbone::layers::Conv;
use glip_core::{Backbone, Contract};
use glip_core::{
    BoxHead, ClassHead, Fusion, ImageBatch, ModelOutput, Prediction, QueryGenerator, QueryInputs,
    TextBatch, TextEncoder, TextFeatures, Transformer,
};
use glip_transformer::{downsample_mask, sine_position_encoding};

/// A GLIP-style detector: image -> backbone level -> 1x1 `input_proj` -> encoder -> fusion
/// with the text -> decoder over text-made queries -> box and class/token heads.
pub struct GlipModel {
    /// Image feature extractor.
    pub backbone: Box<dyn Backbone>,
    /// Which backbone level feeds the transformer (index into its outputs; the seed uses C5).
    pub feature_level: usize,
    /// 1x1 convolution from the level's channels to `d`.
    pub input_proj: Conv,
    /// Text encoder.
    pub text: Box<dyn TextEncoder>,
    /// Query generator.
    pub query_generator: Box<dyn QueryGenerator>,
    /// Encoder-decoder.
    pub transformer: Box<dyn Transformer>,
    /// Image-text fusion on the encoder output.
    pub fusion: Box<dyn Fusion>,
    /// Box head.
    pub box_head: Box<dyn BoxHead>,
    /// Class or token head.
    pub class_head: Box<dyn ClassHead>,
    /// Add DETR's sine positional encoding in attention (the seed has none).
    pub position_encoding: bool,
    /// Return every decoder layer's predictions for auxiliary losses.
    pub aux_outputs: bool,
    /// Transformer width.
    pub d_model: usize,
}

impl std::fmt::Debug for GlipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlipModel")
            .field("feature_level", &self.feature_level)
            .field("d_model", &self.d_model)
            .field("position_encoding", &self.position_encoding)
            .field("aux_outputs", &self.aux_outputs)
            .finish_non_exhaustive()
    }
}

fn any_padding(mask: &Tensor) -> Result<bool> {
    Ok(mask.flatten_all()?.min(0)?.to_scalar::<u8>()? == 0)
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
        let mut c = Contract::new();
        c.tensor("images", &images.pixels, "b 3 h w")?;
        c.tensor("input_ids", &text.input_ids, "b t")?;
        trace("images", images.pixels.dims());
        trace("text.input_ids", text.input_ids.dims());
        let levels = self.backbone.forward(&images.pixels, train)?;
        for (i, l) in levels.iter().enumerate() {
            trace(&format!("backbone level {i} (stride {})", l.stride), l.tensor.dims());
        }
        let Some(level) = levels.get(self.feature_level) else {
            candle_core::bail!(
                "feature_level {} but the backbone returns {} levels",
                self.feature_level,
                levels.len()
            )
        };
        let f = self.input_proj.forward(&level.tensor)?;
        trace(&format!("input_proj (level {})", self.feature_level), f.dims());
        let (b, d, h, w) = f.dims4()?;
        let src = f.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // (b, s, d)
        let fmask = downsample_mask(&images.mask, h, w)?;
        let mask = if any_padding(&fmask)? { Some(fmask.reshape((b, h * w))?) } else { None };
        let pos = if self.position_encoding {
            Some(sine_position_encoding(&fmask, d, 10000.0)?)
        } else {
            None
        };
        let tf = self.text.forward(&text.input_ids, &text.attention_mask, train)?;
        trace("text.tokens", tf.tokens.dims());
        if let Some(p) = &tf.pooled {
            trace("text.pooled", p.dims());
        }
        trace("encoder input (image tokens)", src.dims());
        let memory = self.transformer.encode(&src, mask.as_ref(), pos.as_ref(), train)?;
        trace("encoder output (memory)", memory.dims());
        let (memory, tokens) =
            self.fusion.forward(&memory, mask.as_ref(), &tf.tokens, &tf.mask, train)?;
        trace("fusion: memory", memory.dims());
        trace("fusion: text tokens", tokens.dims());
        let tf = TextFeatures::new(tokens, tf.pooled, tf.mask)?;
        let queries = self.query_generator.forward(
            &QueryInputs { text: &tf, memory: &memory, memory_mask: mask.as_ref() },
            train,
        )?;
        trace("queries (content)", queries.content.dims());
        let hs_all =
            self.transformer.decode(&queries, &memory, mask.as_ref(), pos.as_ref(), train)?;
        for (i, h) in hs_all.iter().enumerate() {
            trace(&format!("decoder layer {i}"), h.dims());
        }
        let Some(hs) = hs_all.last().cloned() else {
            candle_core::bail!("the decoder has no layer")
        };
        let predict = |hs: &Tensor| -> Result<Prediction> {
            Prediction::new(self.box_head.forward(hs)?, self.class_head.forward(hs, &tf)?)
        };
        let pred = predict(&hs)?;
        trace("pred_boxes", pred.pred_boxes.dims());
        trace("pred_logits", pred.pred_logits.dims());
        let aux = if self.aux_outputs {
            hs_all[..hs_all.len() - 1].iter().map(predict).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        ModelOutput::new(
            pred,
            self.class_head.logits_kind(),
            aux,
            hs,
            memory,
            tf.mask.to_dtype(DType::U8)?,
        )
    }
}
