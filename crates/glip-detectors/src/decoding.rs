//! The built-in [`Detector`]s that decode queries (the dense head is
//! [`crate::DenseHead`]):
//! - [`DecoderDetector`]: the seed's design. A query generator turns the text (and image) into
//!   queries, the transformer's decoder refines them, box and class/token heads predict.
//! - [`QuerySelection`]: Grounding DINO's language-guided query selection. Encoder tokens are
//!   scored by their best alignment with the prompt's tokens; the top K become the decoder's
//!   queries, each with a reference box predicted from its token; every decoder layer refines
//!   its reference box (iterative refinement) and predicts, for auxiliary losses.

use crate::denoising::{DenoisingConfig, DenoisingQueries};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use glip_core::validate::{Checker, Validate};
use glip_core::{
    BoxHead, ClassHead, DenoisingOutput, Detector, Encoded, ModelOutput, Prediction,
    QueryGenerator, QueryInputs,
};
use glip_heads::{MlpBoxHead, TokenAlignmentHead};
use glip_kernels::nn::{LayerNorm, Linear};
use glip_transformer::TransformerConfig;
use glip_transformer::{DecoderLayer, DecoderLayerOptions, DecoderMemory, SamplingLevels};

/// The seed's design: query generator, the transformer's decoder, box and class heads.
pub struct DecoderDetector {
    /// Query generator.
    pub query_generator: Box<dyn QueryGenerator>,
    /// Box head.
    pub box_head: Box<dyn BoxHead>,
    /// Class or token head.
    pub class_head: Box<dyn ClassHead>,
    /// Return every decoder layer's predictions for auxiliary losses.
    pub aux_outputs: bool,
}

impl std::fmt::Debug for DecoderDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderDetector")
            .field("aux_outputs", &self.aux_outputs)
            .finish_non_exhaustive()
    }
}

impl Detector for DecoderDetector {
    fn forward(
        &self,
        x: &Encoded<'_>,
        train: bool,
        trace: &mut dyn FnMut(&str, &[usize]),
    ) -> Result<ModelOutput> {
        let queries = self.query_generator.forward(
            &QueryInputs { text: x.text, memory: x.memory, memory_mask: x.memory_mask },
            train,
        )?;
        trace("queries (content)", queries.content.dims());
        let hs_all = x.transformer.decode(&queries, x.memory, x.memory_mask, x.pos, train)?;
        for (i, h) in hs_all.iter().enumerate() {
            trace(&format!("decoder layer {i}"), h.dims());
        }
        let Some(hs) = hs_all.last().cloned() else {
            candle_core::bail!("the decoder has no layer")
        };
        let predict = |hs: &Tensor| -> Result<Prediction> {
            Prediction::new(self.box_head.forward(hs)?, self.class_head.forward(hs, x.text)?)
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
            x.memory.clone(),
            x.text.mask.to_dtype(DType::U8)?,
        )
    }
}

/// `log(x / (1 - x))`, with `x` kept inside `[eps, 1 - eps]`.
pub fn inverse_sigmoid(x: &Tensor) -> Result<Tensor> {
    let eps = 1e-4;
    let x = x.clamp(eps, 1.0 - eps)?;
    x.log()? - (1.0 - &x)?.log()?
}

/// Sine embedding of normalised boxes `(b, q, 4)` -> `(b, q, 4 * d / 2)`: each coordinate
/// scaled by 2 pi and embedded with `d / 2` interleaved sines and cosines (temperature
/// 10000), as DAB-DETR and Grounding DINO embed their reference boxes.
pub fn box_sine_embedding(boxes: &Tensor, d: usize) -> Result<Tensor> {
    let half = d / 2;
    let dev = boxes.device();
    let dim_t: Vec<f32> =
        (0..half).map(|i| 10000f32.powf(2.0 * (i / 2) as f32 / half as f32).recip()).collect();
    let phase: Vec<f32> =
        (0..half).map(|i| if i % 2 == 0 { 0.0 } else { std::f32::consts::FRAC_PI_2 }).collect();
    let freq = Tensor::from_vec(dim_t, half, dev)?;
    let phase = Tensor::from_vec(phase, half, dev)?;
    let (b, q, _) = boxes.dims3()?;
    // sin(x + pi/2) = cos(x): one sine over all channels.
    let x = (boxes.unsqueeze(D::Minus1)? * (2.0 * std::f64::consts::PI))?; // (b, q, 4, 1)
    let e = x.broadcast_mul(&freq)?.broadcast_add(&phase)?.sin()?; // (b, q, 4, half)
    e.reshape((b, q, 4 * half))
}

/// Options of [`QuerySelection`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySelectionConfig {
    /// Side of the anchor each encoder token's box is predicted from, in strides. Default 2.
    #[serde(default = "two")]
    pub anchor_scale: f64,
    /// What the decoder's queries start from. Default `selected`.
    #[serde(default)]
    pub content: QueryContent,
    /// DINO's contrastive denoising queries in training (off unless `groups` is set; see
    /// [`crate::denoising`]).
    #[serde(default)]
    pub denoising: DenoisingConfig,
    /// Grounding DINO's text cross-attention in every decoder layer (`ca_text`, between the
    /// self-attention and the image cross-attention; the prompt's tokens projected to the
    /// model's width by `text_proj`). Default false.
    #[serde(default)]
    pub text_cross_attention: bool,
    /// DINO's "look forward twice": in training, layer `i`'s boxes refine layer `i - 1`'s
    /// boxes as they were predicted (not detached), so each box loss also trains the layer
    /// before; the next layer's reference stays detached. The same values, other gradients.
    /// Default false.
    #[serde(default)]
    pub look_forward_twice: bool,
    /// How the decoder's queries read the image: `global` (multi-head attention over every
    /// image token, the default) or `deformable` (Deformable DETR's multi-scale deformable
    /// attention, as Grounding DINO's decoder: `deformable_points` samples per head and level
    /// around each query's reference box).
    #[serde(default)]
    pub image_attention: ImageAttentionKind,
    /// Samples per head and level of deformable image attention (Grounding DINO's
    /// `dec_n_points`). Default 4.
    #[serde(default = "four")]
    pub deformable_points: usize,
}

/// How query selection's decoder layers attend to the image tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageAttentionKind {
    /// Multi-head attention over every image token, with the image positions on the keys.
    #[default]
    Global,
    /// Multi-scale deformable attention around each query's reference box (`cross_attn`).
    Deformable,
}

/// The content part of query selection's decoder queries; their positions are always the
/// selected tokens' boxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueryContent {
    /// The selected encoder tokens' features, detached (Deformable DETR's two-stage queries).
    #[default]
    Selected,
    /// `num_queries` learned embeddings, the same for every image: DINO's mixed query
    /// selection, which Grounding DINO uses (the selected tokens' features are single
    /// locations' and may describe an object poorly; the boxes carry where to look).
    Learned,
}

fn two() -> f64 {
    2.0
}

fn four() -> usize {
    4
}

impl Validate for QuerySelectionConfig {
    fn validate(&self, c: &mut Checker) {
        // The anchor's side in strides: a box of side 0 has no logit-space reference.
        c.finite_above("anchor_scale", self.anchor_scale, 0.0, 1e4);
        c.section("denoising", &self.denoising);
        c.in_range("deformable_points", self.deformable_points, 1, 64);
    }
}

impl Default for QuerySelectionConfig {
    fn default() -> Self {
        Self {
            anchor_scale: 2.0,
            content: QueryContent::default(),
            denoising: DenoisingConfig::default(),
            text_cross_attention: false,
            look_forward_twice: false,
            image_attention: ImageAttentionKind::default(),
            deformable_points: four(),
        }
    }
}

/// Grounding DINO's language-guided query selection with iterative box refinement
/// (`query_selection.*`): `enc_output` + `enc_norm`, `enc_token_head`, `enc_bbox_embed` score
/// and box every encoder token; `decoder.layers.N`, `decoder.norm`, `ref_point_head` (an MLP
/// over the reference box's sine embedding, the queries' positions), `bbox_embed` (the
/// refinement, shared by the layers), `token_head`; with learned content, `tgt_embed
/// (num_queries, d)`; with denoising, `dn_content` (a query's content from its phrase, text
/// width to `d`); with text cross-attention, `text_proj` (text width to `d`) and each layer's
/// `ca_text`, `catext_norm`; with deformable image attention, each layer's `cross_attn` in
/// place of its `multihead_attn`.
#[derive(Debug, Clone)]
pub struct QuerySelection {
    enc_output: Linear,
    enc_norm: LayerNorm,
    enc_token_head: TokenAlignmentHead,
    enc_bbox_embed: MlpBoxHead,
    layers: Vec<DecoderLayer>,
    norm: LayerNorm,
    ref_point_head: [Linear; 2],
    bbox_embed: MlpBoxHead,
    token_head: TokenAlignmentHead,
    dn_content: Option<Linear>,
    text_proj: Option<Linear>,
    tgt_embed: Option<Tensor>,
    num_queries: usize,
    aux_outputs: bool,
    d: usize,
    levels: usize,
    config: QuerySelectionConfig,
}

impl QuerySelection {
    /// `num_queries` queries over `tc.d_model`-wide tokens from `levels` feature levels,
    /// `tc.num_decoder_layers` decoder layers.
    pub fn new(
        tc: &TransformerConfig,
        text_dim: usize,
        num_queries: usize,
        aux_outputs: bool,
        levels: usize,
        config: QuerySelectionConfig,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let d = tc.d_model;
        if tc.num_decoder_layers == 0 {
            candle_core::bail!("query selection needs at least one decoder layer (model.transformer.num_decoder_layers)");
        }
        if !d.is_multiple_of(2) {
            candle_core::bail!("query selection: d_model {d} is odd");
        }
        let options = DecoderLayerOptions {
            text_attention: config.text_cross_attention,
            deformable: match config.image_attention {
                ImageAttentionKind::Global => None,
                ImageAttentionKind::Deformable => Some((levels, config.deformable_points)),
            },
        };
        let layers = (0..tc.num_decoder_layers)
            .map(|i| DecoderLayer::with_options(tc, options, vb.pp(format!("decoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            enc_output: Linear::new(d, d, vb.pp("enc_output"))?,
            enc_norm: LayerNorm::new(d, 1e-5, vb.pp("enc_norm"))?,
            enc_token_head: TokenAlignmentHead::new(text_dim, d, vb.pp("enc_token_head"))?,
            enc_bbox_embed: MlpBoxHead::new(d, vb.pp("enc_bbox_embed"))?,
            layers,
            norm: LayerNorm::new(d, 1e-5, vb.pp("decoder.norm"))?,
            ref_point_head: [
                Linear::new(2 * d, d, vb.pp("ref_point_head.layers.0"))?,
                Linear::new(d, d, vb.pp("ref_point_head.layers.1"))?,
            ],
            bbox_embed: MlpBoxHead::new(d, vb.pp("bbox_embed"))?,
            token_head: TokenAlignmentHead::new(text_dim, d, vb.pp("token_head"))?,
            dn_content: match config.denoising.groups {
                0 => None,
                _ => Some(Linear::new(text_dim, d, vb.pp("dn_content"))?),
            },
            text_proj: match config.text_cross_attention {
                true => Some(Linear::new(text_dim, d, vb.pp("text_proj"))?),
                false => None,
            },
            tgt_embed: match config.content {
                QueryContent::Selected => None,
                QueryContent::Learned => Some(vb.get_with_hints(
                    (num_queries, d),
                    "tgt_embed",
                    candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 },
                )?),
            },
            num_queries,
            aux_outputs,
            d,
            levels,
            config,
        })
    }

    fn query_pos(&self, reference: &Tensor) -> Result<Tensor> {
        let e = box_sine_embedding(reference, self.d)?;
        let h = glip_kernels::fused::relu(&self.ref_point_head[0].forward(&e)?)?;
        self.ref_point_head[1].forward(&h)
    }
}

/// `x (b, s, c)` at `idx (b, k)` -> `(b, k, c)`.
fn gather_rows(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let (b, k) = idx.dims2()?;
    x.gather(&idx.unsqueeze(D::Minus1)?.broadcast_as((b, k, c))?.contiguous()?, 1)
}

impl Detector for QuerySelection {
    fn forward(
        &self,
        x: &Encoded<'_>,
        train: bool,
        trace: &mut dyn FnMut(&str, &[usize]),
    ) -> Result<ModelOutput> {
        let s = x.memory.dim(1)?;
        let k = self.num_queries.min(s);
        let enc = self.enc_norm.forward(&self.enc_output.forward(x.memory)?)?;
        let enc_logits = self.enc_token_head.logits(&enc, &x.text.tokens)?; // (b, s, t)
                                                                            // Best alignment with a real token; padded tokens and padded image positions never win.
        let neg = |m: &Tensor| -> Result<Tensor> { (m.to_dtype(DType::F32)? - 1.0)? * 1e9 };
        let text_bias = neg(&x.text.mask)?.unsqueeze(1)?;
        let mut score = enc_logits.detach().broadcast_add(&text_bias)?.max(D::Minus1)?;
        if let Some(m) = x.memory_mask {
            score = (score + neg(m)?)?;
        }
        // Each image's `k` best-aligned real tokens, best first, found on the device.
        let idx = glip_kernels::topk::top_k_indices(&score, k)?;
        trace("query selection: selected tokens", idx.dims());
        // Anchors: the token's point with a square of `anchor_scale` strides.
        let (points, strides, _) =
            crate::dense::locations(x.levels, x.image_sizes, x.memory.device())?;
        let wh = (strides * self.config.anchor_scale)?;
        let anchors = Tensor::cat(&[points, wh], D::Minus1)?; // (b, s, 4)
        let enc_boxes = candle_nn::ops::sigmoid(
            &(self.enc_bbox_embed.forward_logits(&enc)? + inverse_sigmoid(&anchors)?)?,
        )?;
        let sel_boxes = gather_rows(&enc_boxes, &idx)?;
        let sel_logits = gather_rows(&enc_logits, &idx)?;
        let interm = Prediction::new(sel_boxes.clone(), sel_logits)?;
        trace("query selection: reference boxes", sel_boxes.dims());
        let mut tgt = match &self.tgt_embed {
            None => gather_rows(&enc, &idx)?.detach(),
            Some(e) => {
                let (b, d) = (x.memory.dim(0)?, self.d);
                e.narrow(0, 0, k)?.unsqueeze(0)?.broadcast_as((b, k, d))?.contiguous()?
            }
        };
        let mut reference = sel_boxes.detach();
        // Denoising queries (training with targets only) before the selected ones, masked
        // apart from them.
        let dn = match (train, x.targets, &self.dn_content) {
            (true, Some(targets), Some(content)) => {
                let t = x.text.tokens.dim(1)?;
                let seed = glip_kernels::nn::next_seed();
                DenoisingQueries::new(targets, t, &self.config.denoising, seed)?
                    .map(|mut q| -> Result<_> {
                        let (b, dev) = (targets.len(), x.memory.device());
                        let phrases = std::mem::take(&mut q.phrases);
                        let phrases = Tensor::from_vec(phrases, (b, q.n, t), dev)?
                            .to_dtype(x.text.tokens.dtype())?;
                        let c = content.forward(&phrases.matmul(&x.text.tokens)?)?;
                        let boxes =
                            Tensor::from_vec(std::mem::take(&mut q.boxes), (b, q.n, 4), dev)?;
                        tgt = Tensor::cat(&[c.to_dtype(tgt.dtype())?, tgt.clone()], 1)?;
                        reference = Tensor::cat(&[boxes, reference.clone()], 1)?;
                        trace("denoising queries", &[b, q.n, self.d]);
                        Ok((q.attention_bias(k, dev)?, q))
                    })
                    .transpose()?
            }
            _ => None,
        };
        let nd = dn.as_ref().map_or(0, |(_, q)| q.n);
        // With text cross-attention: the prompt's tokens at the model's width, and their mask.
        let text = match &self.text_proj {
            Some(p) => Some((
                p.forward(&x.text.tokens)?.to_dtype(x.memory.dtype())?,
                x.text.mask.to_dtype(DType::U8)?,
            )),
            None => None,
        };
        // With deformable image attention: where the layers sample.
        let levels = match self.config.image_attention {
            ImageAttentionKind::Global => None,
            ImageAttentionKind::Deformable if x.levels.len() != self.levels => candle_core::bail!(
                "query selection's deformable attention was built for {} feature levels and \
                 was given {}",
                self.levels,
                x.levels.len()
            ),
            ImageAttentionKind::Deformable => {
                Some(SamplingLevels::cached(x.levels, x.image_sizes, x.memory.device())?)
            }
        };
        let mem = DecoderMemory {
            text: text.as_ref().map(|(t, m)| (t, m)),
            levels: levels.as_ref(),
            ..DecoderMemory::image(x.memory, x.memory_mask, x.pos)
        };
        let mut preds = Vec::with_capacity(self.layers.len());
        let mut dn_preds = Vec::new();
        let mut hs = tgt.clone();
        // The previous layer's refined boxes as predicted, for look forward twice.
        let mut predicted: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let qpos = self.query_pos(&reference)?;
            let bias = dn.as_ref().map(|(bias, _)| bias);
            tgt = layer.forward_at(&tgt, Some(&qpos), Some(&reference), &mem, bias, train)?;
            hs = self.norm.forward(&tgt)?;
            let delta = self.bbox_embed.forward_logits(&hs)?;
            let refined = candle_nn::ops::sigmoid(&(&delta + inverse_sigmoid(&reference)?)?)?;
            // Look forward twice: the same values from the previous layer's boxes before their
            // detach, so this layer's box losses reach that layer's refinement too.
            let boxes = match &predicted {
                Some(prev) => candle_nn::ops::sigmoid(&(&delta + inverse_sigmoid(prev)?)?)?,
                None => refined.clone(),
            };
            let logits = self.token_head.logits(&hs, &x.text.tokens)?;
            trace(&format!("decoder layer {i} (refined boxes)"), boxes.dims());
            reference = refined.detach();
            if train && self.config.look_forward_twice {
                predicted = Some(refined);
            }
            if nd > 0 {
                let last = i + 1 == self.layers.len();
                if self.aux_outputs || last {
                    dn_preds
                        .push(Prediction::new(boxes.narrow(1, 0, nd)?, logits.narrow(1, 0, nd)?)?);
                }
                preds.push(Prediction::new(boxes.narrow(1, nd, k)?, logits.narrow(1, nd, k)?)?);
            } else {
                preds.push(Prediction::new(boxes, logits)?);
            }
        }
        if nd > 0 {
            hs = hs.narrow(1, nd, k)?;
        }
        let pred = preds.pop().expect("at least one layer");
        trace("pred_boxes", pred.pred_boxes.dims());
        trace("pred_logits", pred.pred_logits.dims());
        // The selection's own prediction is always supervised (it is what trains the encoder
        // heads that choose the queries); earlier decoder layers only with auxiliary losses.
        let mut aux = vec![interm];
        if self.aux_outputs {
            aux.extend(preds);
        }
        let mut out = ModelOutput::new(
            pred,
            glip_core::LogitsKind::Tokens,
            aux,
            hs,
            x.memory.clone(),
            x.text.mask.to_dtype(DType::U8)?,
        )?;
        if let Some((_, q)) = dn {
            out.extensions.insert(DenoisingOutput::new(dn_preds, q.matches, q.groups)?);
        }
        Ok(out)
    }

    /// It runs its own decoder layers (each refines the previous layer's boxes): the
    /// transformer is built without any.
    fn uses_decoder(&self) -> bool {
        false
    }
}
