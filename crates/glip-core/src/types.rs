//! The values that cross crate boundaries, each checking its shapes on construction.
//!
//! Conventions (the same as `reference/glip_ref.py`): pixels are NCHW f32 normalised with ImageNet
//! mean/std; boxes are normalised `(cx, cy, w, h)` in `[0, 1]`; token ids are `u32`; masks are
//! `u8` with 1 for a real pixel or token and 0 for padding.

use crate::shape::Contract;
use candle_core::{DType, Device, Result, Tensor, TensorId};

/// A host (CPU) copy of a device tensor, kept beside it by whoever had the values on the host
/// anyway (the collate, which builds every batch there): code that needs the values on the
/// host (masks, box assignment) reads the copy instead of waiting for the device. The copy is
/// tied to the tensor it mirrors by id, so it is never used for a tensor that has been
/// replaced.
#[derive(Debug, Clone)]
struct HostCopy {
    of: TensorId,
    host: Tensor,
}

impl HostCopy {
    /// `t` itself when it is on the CPU (the host copy of a host tensor is the tensor).
    fn of_cpu(t: &Tensor) -> Option<Self> {
        t.device().is_cpu().then(|| Self { of: t.id(), host: t.clone() })
    }

    /// `t` moved to `device`, keeping `t`'s host copy (or `t`, when it is on the CPU).
    fn moved(t: &Tensor, copy: Option<&Self>, device: &Device) -> Result<(Tensor, Option<Self>)> {
        let host = match copy.filter(|c| c.of == t.id()) {
            Some(c) => Some(c.host.clone()),
            None => t.device().is_cpu().then(|| t.clone()),
        };
        let moved = t.to_device(device)?;
        let copy = host.map(|host| Self { of: moved.id(), host });
        Ok((moved, copy))
    }

    /// [`HostCopy::moved`] for an optional tensor (none stays none).
    fn moved_optional(
        t: Option<&Tensor>,
        copy: Option<&Self>,
        device: &Device,
    ) -> Result<(Option<Tensor>, Option<Self>)> {
        match t {
            Some(t) => Self::moved(t, copy, device).map(|(t, c)| (Some(t), c)),
            None => Ok((None, None)),
        }
    }

    /// The host values of `t`: the copy when it mirrors `t`, else `t` read from its device.
    fn read(t: &Tensor, copy: Option<&Self>) -> Result<Tensor> {
        match copy.filter(|c| c.of == t.id()) {
            Some(c) => Ok(c.host.clone()),
            None => t.to_device(&Device::Cpu),
        }
    }
}

fn expect_dtype(name: &str, t: &Tensor, dtypes: &[DType]) -> Result<()> {
    if dtypes.contains(&t.dtype()) {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "{name}: dtype {:?}, expected one of {dtypes:?}",
            t.dtype()
        )))
    }
}

/// Checks that `new` can stand in for `old` (a buffer for a tensor): the same shape, dtype and
/// device; the error names `what` and both.
pub fn check_stands_in(what: &str, new: &Tensor, old: &Tensor) -> Result<()> {
    if new.dims() == old.dims()
        && new.dtype() == old.dtype()
        && new.device().same_device(old.device())
    {
        return Ok(());
    }
    candle_core::bail!(
        "{what} is {:?} {:?} on {:?}, in place of {:?} {:?} on {:?}",
        new.dims(),
        new.dtype(),
        new.device().location(),
        old.dims(),
        old.dtype(),
        old.device().location()
    )
}

/// A batch of images padded to a common size.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `(b, 3, h, w)` f32, normalised.
    pub pixels: Tensor,
    /// `(b, h, w)` u8, 1 where the pixel is real, 0 where it is padding.
    pub mask: Tensor,
    host_mask: Option<HostCopy>,
}

impl ImageBatch {
    /// Checks `pixels (b, 3, h, w)` and `mask (b, h, w)` agree.
    pub fn new(pixels: Tensor, mask: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pixels", &pixels, "b 3 h w")?;
        c.tensor("mask", &mask, "b h w")?;
        expect_dtype("pixels", &pixels, &[DType::F32, DType::F16, DType::BF16])?;
        expect_dtype("mask", &mask, &[DType::U8])?;
        let host_mask = HostCopy::of_cpu(&mask);
        Ok(Self { pixels, mask, host_mask })
    }

    /// The batch on `device`, keeping the mask's host copy (see [`ImageBatch::host_mask`]).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let (mask, host_mask) = HostCopy::moved(&self.mask, self.host_mask.as_ref(), device)?;
        Ok(Self { pixels: self.pixels.to_device(device)?, mask, host_mask })
    }

    /// The mask on the CPU: the host copy kept when the batch was built on the host and
    /// moved with [`ImageBatch::to_device`] (no wait for the device), else the mask read back.
    pub fn host_mask(&self) -> Result<Tensor> {
        HostCopy::read(&self.mask, self.host_mask.as_ref())
    }

    /// This batch over other tensors of the same shapes, dtypes and device that hold the same
    /// values (a CUDA graph's input buffers, copied from this batch): the mask's host copy, if
    /// there is one, now mirrors `mask`. Different values are the caller's error: what reads
    /// the host copy would see this batch's mask.
    pub fn with_tensors(&self, pixels: Tensor, mask: Tensor) -> Result<Self> {
        check_stands_in("image batch: pixels", &pixels, &self.pixels)?;
        check_stands_in("image batch: mask", &mask, &self.mask)?;
        let host = self.host_mask.as_ref().filter(|c| c.of == self.mask.id());
        let host_mask = host.map(|c| HostCopy { of: mask.id(), host: c.host.clone() });
        Ok(Self { pixels, mask, host_mask })
    }

    /// A batch with no padding: the mask is all ones.
    pub fn unpadded(pixels: Tensor) -> Result<Self> {
        let (b, _, h, w) = pixels.dims4()?;
        let mask = Tensor::ones((b, h, w), DType::U8, pixels.device())?;
        let host = Tensor::ones((b, h, w), DType::U8, &Device::Cpu)?;
        let mut batch = Self::new(pixels, mask)?;
        batch.host_mask = Some(HostCopy { of: batch.mask.id(), host });
        Ok(batch)
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        self.pixels.dims()[0]
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch of tokenised captions padded to a common length.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// `(b, t)` u32 token ids.
    pub input_ids: Tensor,
    /// `(b, t)` u8, 1 for real tokens.
    pub attention_mask: Tensor,
    /// Per caption, per token, the character span `[start, end)` in the caption
    /// (`(0, 0)` for special and padding tokens); `b` lists of `t` spans.
    pub offsets: Vec<Vec<(usize, usize)>>,
    /// The captions themselves, `b` of them.
    pub captions: Vec<String>,
}

impl TextBatch {
    /// Checks ids and mask are `(b, t)` and the offsets and captions agree with them.
    pub fn new(
        input_ids: Tensor,
        attention_mask: Tensor,
        offsets: Vec<Vec<(usize, usize)>>,
        captions: Vec<String>,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("input_ids", &input_ids, "b t")?;
        c.tensor("attention_mask", &attention_mask, "b t")?;
        expect_dtype("input_ids", &input_ids, &[DType::U32])?;
        expect_dtype("attention_mask", &attention_mask, &[DType::U8])?;
        c.check("offsets", &[offsets.len()], "b")?;
        c.check("captions", &[captions.len()], "b")?;
        for (i, o) in offsets.iter().enumerate() {
            c.check(&format!("offsets[{i}]"), &[o.len()], "t")?;
        }
        Ok(Self { input_ids, attention_mask, offsets, captions })
    }

    /// Padded token count `t`.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.dims()[1]
    }

    /// The captions' sub-sentences ([`TextSegments::from_offsets`]), on `device`.
    pub fn sub_sentences(&self, device: &Device) -> Result<TextSegments> {
        TextSegments::from_offsets(&self.offsets, &self.captions, device)
    }
}

/// Grounding DINO's sub-sentences of a batch of captions: which tokens may attend to which in
/// the text's self-attention, and each token's position, counted from its sub-sentence's first
/// token. A sub-sentence runs to and including a token that is `.` or `?` (the separators of
/// a detection prompt, `"cat. dog."`) or to the token before a special one; special and
/// padding tokens (`[CLS]`, `[SEP]`, `[PAD]`: an empty character span) are sub-sentences of
/// one token at position 0. The features of one category's tokens then do not depend on the
/// other categories of the prompt or on their order.
///
/// Grounding DINO's `generate_masks_with_special_tokens_and_transfer_map` makes the same
/// groups for captions that end with a separator, the prompts it builds; for a caption that
/// does not, it joins the last sub-sentence to `[SEP]` when the caption is padded and leaves
/// each of its tokens alone when it is not. Here the last sub-sentence is one group either way.
#[derive(Debug, Clone)]
pub struct TextSegments {
    /// `(b, t)` u32: each token's position in its sub-sentence.
    pub positions: Tensor,
    /// `(b, t)` u32: the index of the first token of each token's sub-sentence (tokens attend
    /// to each other where these are equal).
    pub starts: Tensor,
}

impl TextSegments {
    /// Checks that `positions` and `starts` are `(b, t)` u32 on one device.
    pub fn new(positions: Tensor, starts: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("sub-sentence positions", &positions, "b t")?;
        c.tensor("sub-sentence starts", &starts, "b t")?;
        expect_dtype("sub-sentence positions", &positions, &[DType::U32])?;
        expect_dtype("sub-sentence starts", &starts, &[DType::U32])?;
        if !positions.device().same_device(starts.device()) {
            candle_core::bail!("sub-sentence positions and starts are on different devices");
        }
        Ok(Self { positions, starts })
    }

    /// The sub-sentences of tokenised captions: per caption, its tokens' character spans (as
    /// [`TextBatch::offsets`], all of one length `t`) and the caption they index.
    pub fn from_offsets(
        offsets: &[Vec<(usize, usize)>],
        captions: &[String],
        device: &Device,
    ) -> Result<Self> {
        if offsets.len() != captions.len() {
            candle_core::bail!(
                "sub-sentences: {} token lists for {} captions",
                offsets.len(),
                captions.len()
            );
        }
        let t = offsets.first().map_or(0, Vec::len);
        let (mut positions, mut starts) =
            (Vec::with_capacity(offsets.len() * t), Vec::with_capacity(offsets.len() * t));
        for (i, (spans, caption)) in offsets.iter().zip(captions).enumerate() {
            if spans.len() != t {
                candle_core::bail!(
                    "sub-sentences: caption {i} has {} tokens, caption 0 {t}",
                    spans.len()
                );
            }
            for (start, position) in sub_sentences(spans, caption) {
                starts.push(start);
                positions.push(position);
            }
        }
        let b = offsets.len();
        Self::new(
            Tensor::from_vec(positions, (b, t), device)?,
            Tensor::from_vec(starts, (b, t), device)?,
        )
    }

    /// `(b, t, t)` additive attention bias in `dtype`: 0 where query token `i` may attend to
    /// key token `j` (the same sub-sentence), `f32::MIN` elsewhere (as
    /// `glip_kernels::nn::mask_to_bias`; made in f32 and cast, so `-inf` in bf16, whose own
    /// `0 * f32::MIN` would be NaN). Every token may attend to itself, so no row is masked
    /// whole; a padding token, alone in its group, needs no key mask besides.
    pub fn attention_bias(&self, dtype: DType) -> Result<Tensor> {
        let s = &self.starts;
        let same = s.unsqueeze(2)?.broadcast_eq(&s.unsqueeze(1)?)?.to_dtype(DType::F32)?;
        ((1.0 - same)? * f32::MIN as f64)?.to_dtype(dtype)
    }

    /// The same sub-sentences on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            positions: self.positions.to_device(device)?,
            starts: self.starts.to_device(device)?,
        })
    }
}

/// [`TextSegments`] of one caption: per token, the index of its sub-sentence's first token and
/// its position in it. `spans` are the tokens' character spans in `caption` (empty for special
/// and padding tokens).
pub fn sub_sentences(spans: &[(usize, usize)], caption: &str) -> Vec<(u32, u32)> {
    let chars: Vec<char> = caption.chars().collect();
    let separator = |s: usize, e: usize| matches!(chars.get(s..e), Some(['.' | '?']));
    let mut open: Option<usize> = None;
    spans
        .iter()
        .enumerate()
        .map(|(i, &(s, e))| {
            if s >= e {
                open = None;
                return (i as u32, 0);
            }
            let start = *open.get_or_insert(i);
            if separator(s, e) {
                open = None;
            }
            (start as u32, (i - start) as u32)
        })
        .collect()
}

/// The ground truth of one image.
#[derive(Debug, Clone)]
pub struct Target {
    /// `(n, 4)` f32 normalised cxcywh.
    pub boxes: Tensor,
    /// `(n,)` u32 class indices, for fixed-class heads.
    pub labels: Option<Tensor>,
    /// `(n, t)` f32 0/1: which tokens of the caption each box grounds, for token heads.
    pub positive_map: Option<Tensor>,
    host: [Option<HostCopy>; 3],
}

impl Target {
    /// Checks `boxes (n, 4)`, `labels (n,)` and `positive_map (n, t)`.
    pub fn new(
        boxes: Tensor,
        labels: Option<Tensor>,
        positive_map: Option<Tensor>,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("boxes", &boxes, "n 4")?;
        if let Some(l) = &labels {
            c.tensor("labels", l, "n")?;
            expect_dtype("labels", l, &[DType::U32, DType::I64])?;
        }
        if let Some(p) = &positive_map {
            c.tensor("positive_map", p, "n t")?;
        }
        let host = [
            HostCopy::of_cpu(&boxes),
            labels.as_ref().and_then(HostCopy::of_cpu),
            positive_map.as_ref().and_then(HostCopy::of_cpu),
        ];
        Ok(Self { boxes, labels, positive_map, host })
    }

    /// The target on `device`, keeping host copies (see [`Target::host_boxes`]).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let [hb, hl, hp] = &self.host;
        let (boxes, hb) = HostCopy::moved(&self.boxes, hb.as_ref(), device)?;
        let (labels, hl) = HostCopy::moved_optional(self.labels.as_ref(), hl.as_ref(), device)?;
        let (positive_map, hp) =
            HostCopy::moved_optional(self.positive_map.as_ref(), hp.as_ref(), device)?;
        Ok(Self { boxes, labels, positive_map, host: [hb, hl, hp] })
    }

    /// `boxes` on the CPU: the host copy kept when the target was built on the host and moved
    /// with [`Target::to_device`] (no wait for the device), else the boxes read back.
    pub fn host_boxes(&self) -> Result<Tensor> {
        HostCopy::read(&self.boxes, self.host[0].as_ref())
    }

    /// `labels` on the CPU, as [`Target::host_boxes`].
    pub fn host_labels(&self) -> Result<Option<Tensor>> {
        self.labels.as_ref().map(|l| HostCopy::read(l, self.host[1].as_ref())).transpose()
    }

    /// `positive_map` on the CPU, as [`Target::host_boxes`].
    pub fn host_positive_map(&self) -> Result<Option<Tensor>> {
        self.positive_map.as_ref().map(|p| HostCopy::read(p, self.host[2].as_ref())).transpose()
    }

    /// Number of boxes.
    pub fn len(&self) -> usize {
        self.boxes.dims()[0]
    }

    /// Whether the image has no object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One backbone output level.
#[derive(Debug, Clone)]
pub struct FeatureMap {
    /// `(b, c, h, w)`: f32, or bf16 where the backbone keeps bf16 activations (inside a bf16
    /// autocast on CUDA); whoever takes it casts it to the dtype it computes in.
    pub tensor: Tensor,
    /// Its stride in input pixels (4 for C2, 32 for C5).
    pub stride: usize,
}

/// What a text encoder returns.
#[derive(Debug, Clone)]
pub struct TextFeatures {
    /// `(b, t, d_text)` last hidden state.
    pub tokens: Tensor,
    /// `(b, d_text)` pooled sentence vector (BERT's `tanh(dense(CLS))`), when the model has one.
    pub pooled: Option<Tensor>,
    /// `(b, t)` u8 attention mask, 1 for real tokens.
    pub mask: Tensor,
}

impl TextFeatures {
    /// Checks `tokens (b, t, d)`, `pooled (b, d)` and `mask (b, t)`.
    pub fn new(tokens: Tensor, pooled: Option<Tensor>, mask: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("text tokens", &tokens, "b t d")?;
        if let Some(p) = &pooled {
            c.tensor("pooled text", p, "b d")?;
        }
        c.tensor("text mask", &mask, "b t")?;
        Ok(Self { tokens, pooled, mask })
    }
}

/// What the logits of a model output range over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsKind {
    /// `num_classes + 1` softmax logits, the last being "no object".
    Classes(usize),
    /// One sigmoid logit per text token (GLIP's region-word alignment).
    Tokens,
}

/// Boxes and logits of one decoder layer.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// `(b, q, 4)` normalised cxcywh in `[0, 1]`.
    pub pred_boxes: Tensor,
    /// `(b, q, c)` class logits or `(b, q, t)` token logits.
    pub pred_logits: Tensor,
}

impl Prediction {
    /// Checks `pred_boxes (b, q, 4)` against `pred_logits (b, q, _)`.
    pub fn new(pred_boxes: Tensor, pred_logits: Tensor) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pred_boxes", &pred_boxes, "b q 4")?;
        c.tensor("pred_logits", &pred_logits, "b q _")?;
        Ok(Self { pred_boxes, pred_logits })
    }
}

/// Everything a detector returns.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// The final prediction.
    pub pred: Prediction,
    /// What `pred.pred_logits` ranges over.
    pub logits_kind: LogitsKind,
    /// Predictions of the earlier decoder layers, first layer first, for auxiliary losses;
    /// empty when the model does not return them.
    pub aux: Vec<Prediction>,
    /// `(b, q, d)` decoder output of the last layer.
    pub hs: Tensor,
    /// `(b, s, d)` encoder output (after fusion).
    pub memory: Tensor,
    /// `(b, t)` u8 text mask the token logits were computed against.
    pub text_mask: Tensor,
    /// What a particular design adds for its own criterion or scoring (a dense head's
    /// locations, [`DenseOutput`]), keyed by type: a new design adds its own type here
    /// without editing this struct.
    pub extensions: Extensions,
}

/// A map from a type to one value of that type: the design-specific outputs of a detector.
#[derive(Clone, Default)]
pub struct Extensions {
    map: Vec<(std::any::TypeId, &'static str, std::sync::Arc<dyn std::any::Any + Send + Sync>)>,
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.map.iter().map(|(_, name, _)| name)).finish()
    }
}

impl Extensions {
    /// Stores `value`, replacing any earlier value of its type.
    pub fn insert<T: std::any::Any + Send + Sync>(&mut self, value: T) {
        let id = std::any::TypeId::of::<T>();
        self.map.retain(|(k, _, _)| *k != id);
        self.map.push((id, std::any::type_name::<T>(), std::sync::Arc::new(value)));
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        let id = std::any::TypeId::of::<T>();
        self.map.iter().find(|(k, _, _)| *k == id).and_then(|(_, _, v)| v.downcast_ref::<T>())
    }

    /// Removes the value of type `T`.
    pub fn remove<T: std::any::Any + Send + Sync>(&mut self) {
        let id = std::any::TypeId::of::<T>();
        self.map.retain(|(k, _, _)| *k != id);
    }
}

/// The locations of a dense head: one query per feature-map location, every level's
/// locations in turn (row-major, finest level first).
#[derive(Debug, Clone)]
pub struct DenseOutput {
    /// `(b, q, 2)` f32 location centres `(x, y)`, normalised by each image's real size.
    pub points: Tensor,
    /// `(b, q, 2)` f32 the location's stride along x and y, normalised the same way.
    pub strides: Tensor,
    /// Index of each location's level, `q` of them.
    pub level: Vec<usize>,
    /// `(b, q)` centerness logits, when the head predicts them (FCOS).
    pub centerness: Option<Tensor>,
    host: [Option<HostCopy>; 2],
}

impl DenseOutput {
    /// Checks `points (b, q, 2)`, `strides (b, q, 2)`, `level (q,)`, `centerness (b, q)`.
    pub fn new(
        points: Tensor,
        strides: Tensor,
        level: Vec<usize>,
        centerness: Option<Tensor>,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("points", &points, "b q 2")?;
        c.tensor("strides", &strides, "b q 2")?;
        c.check("level", &[level.len()], "q")?;
        if let Some(t) = &centerness {
            c.tensor("centerness", t, "b q")?;
        }
        let host = [HostCopy::of_cpu(&points), HostCopy::of_cpu(&strides)];
        Ok(Self { points, strides, level, centerness, host })
    }

    /// Keeps `points` and `strides` as they were made on the host, the CPU tensors the
    /// device ones were copied from (see [`DenseOutput::host_points`]).
    pub fn with_host_copies(mut self, points: Tensor, strides: Tensor) -> Result<Self> {
        for (name, host, dev) in
            [("points", &points, &self.points), ("strides", &strides, &self.strides)]
        {
            if !host.device().is_cpu() || host.dims() != dev.dims() {
                candle_core::bail!(
                    "dense output: the host copy of {name} must be a CPU tensor of shape {:?}, got {:?} on {:?}",
                    dev.dims(),
                    host.dims(),
                    host.device().location()
                )
            }
        }
        self.host = [
            Some(HostCopy { of: self.points.id(), host: points }),
            Some(HostCopy { of: self.strides.id(), host: strides }),
        ];
        Ok(self)
    }

    /// `points` on the CPU: the host copy where the head made them there (no wait for the
    /// device), else read back.
    pub fn host_points(&self) -> Result<Tensor> {
        HostCopy::read(&self.points, self.host[0].as_ref())
    }

    /// `strides` on the CPU, as [`DenseOutput::host_points`].
    pub fn host_strides(&self) -> Result<Tensor> {
        HostCopy::read(&self.strides, self.host[1].as_ref())
    }
}

/// The denoising queries of a training step (DN-DETR; DINO's contrastive denoising): noised
/// copies of the targets fed to the decoder beside its queries, each to be decoded back to the
/// target it was made from (a positive) or to nothing (a negative, noised further), with the
/// assignment known rather than matched. A detector that makes them stores this in
/// [`ModelOutput::extensions`]; the `set` criterion adds their losses (`loss_*_dn`).
#[derive(Debug, Clone)]
pub struct DenoisingOutput {
    /// Their predictions, `(b, n, 4)` boxes and `(b, n, t)` logits: every decoder layer's
    /// when the detector returns auxiliary outputs, the last layer last; else the last alone.
    pub preds: Vec<Prediction>,
    /// Per image, which of the `n` queries reconstructs which target (the positives; the
    /// others, negatives and padding, are trained to predict nothing).
    pub matches: Vec<Match>,
    /// How many noised copies of each target there are: the loss normalises by the target
    /// count times this, as DINO does.
    pub groups: usize,
}

impl DenoisingOutput {
    /// Checks that every layer's prediction has the same `(b, n)` and that each image's
    /// matches point inside it.
    pub fn new(preds: Vec<Prediction>, matches: Vec<Match>, groups: usize) -> Result<Self> {
        let Some(first) = preds.first() else {
            candle_core::bail!("denoising output without any prediction")
        };
        let (b, n, _) = first.pred_boxes.dims3()?;
        for p in &preds {
            let (pb, pn, _) = p.pred_boxes.dims3()?;
            if (pb, pn) != (b, n) {
                candle_core::bail!("denoising predictions of ({pb}, {pn}) and ({b}, {n}) queries")
            }
        }
        if matches.len() != b || matches.iter().any(|m| m.query.iter().any(|&q| q >= n)) {
            candle_core::bail!("denoising matches for {} images outside ({b}, {n})", matches.len())
        }
        Ok(Self { preds, matches, groups })
    }
}

impl ModelOutput {
    /// Checks every shape against one contract: `b`, `q`, `t` agree throughout.
    pub fn new(
        pred: Prediction,
        logits_kind: LogitsKind,
        aux: Vec<Prediction>,
        hs: Tensor,
        memory: Tensor,
        text_mask: Tensor,
    ) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pred_boxes", &pred.pred_boxes, "b q 4")?;
        match logits_kind {
            LogitsKind::Classes(n) => c.bind("c", n + 1, "num_classes + 1")?,
            LogitsKind::Tokens => {
                c.bind("c", text_mask.dims().get(1).copied().unwrap_or(0), "text mask")?
            }
        }
        c.tensor("pred_logits", &pred.pred_logits, "b q c")?;
        for (i, a) in aux.iter().enumerate() {
            c.tensor(&format!("aux[{i}].pred_boxes"), &a.pred_boxes, "b q 4")?;
            c.tensor(&format!("aux[{i}].pred_logits"), &a.pred_logits, "b q c")?;
        }
        c.tensor("hs", &hs, "b q d")?;
        c.tensor("memory", &memory, "b s d")?;
        c.tensor("text_mask", &text_mask, "b _")?;
        Ok(Self {
            pred,
            logits_kind,
            aux,
            hs,
            memory,
            text_mask,
            extensions: Extensions::default(),
        })
    }

    /// The same output with the locations of a dense head, checked against `pred`.
    pub fn with_dense(mut self, dense: DenseOutput) -> Result<Self> {
        let mut c = Contract::new();
        c.tensor("pred_boxes", &self.pred.pred_boxes, "b q 4")?;
        c.tensor("dense points", &dense.points, "b q 2")?;
        self.extensions.insert(dense);
        Ok(self)
    }

    /// The locations of a dense head, if the detector is one.
    pub fn dense(&self) -> Option<&DenseOutput> {
        self.extensions.get::<DenseOutput>()
    }
}

/// A Hungarian (or other) assignment for one image: `query[i]` is matched to `target[i]`,
/// sorted by query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Matched query indices, ascending.
    pub query: Vec<usize>,
    /// The target index of each matched query.
    pub target: Vec<usize>,
}

/// A criterion's result: built with [`Losses::new`] (and [`Losses::normalised_by`]), so that a
/// criterion in another crate keeps compiling when a field is added (`#[non_exhaustive]`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Losses {
    /// The weighted scalar to call `backward` on.
    pub total: Tensor,
    /// Each unweighted term by name (`loss_ce`, `loss_bbox`, ...), aux terms suffixed `_<layer>`.
    pub terms: Vec<(String, Tensor)>,
    /// The final layer's matches, one per image.
    pub matches: Vec<Match>,
    /// The count the whole loss is normalised by, when one count normalises every term (the
    /// matched boxes, the positive locations): each term is then a sum over the batch divided
    /// by `max(normaliser, 1)`. Gradient accumulation (`run.accumulate`) uses it to normalise
    /// a step by the count of all its batches, as one large batch would be (and as GLIP's and
    /// DETR's distributed training all-reduce the count). `None` when the terms are
    /// normalised otherwise (a mean over queries, say): each batch then weighs alike.
    pub normaliser: Option<f64>,
}

impl Losses {
    /// The weighted `total`, each unweighted term by name, and the final layer's matches (one
    /// per image); no normaliser.
    pub fn new(total: Tensor, terms: Vec<(String, Tensor)>, matches: Vec<Match>) -> Self {
        Self { total, terms, matches, normaliser: None }
    }

    /// With the count the whole loss is normalised by ([`Losses::normaliser`]).
    pub fn normalised_by(self, count: f64) -> Self {
        Self { normaliser: Some(count), ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u8s(t: &Tensor) -> Vec<u8> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A batch built on the host keeps its mask as the host copy through `to_device`; a mask
    /// replaced afterwards is read afresh, never answered by the stale copy.
    #[test]
    fn the_host_mask_is_the_mask_until_it_is_replaced() -> Result<()> {
        let dev = Device::Cpu;
        let pixels = Tensor::zeros((2, 3, 2, 3), DType::F32, &dev)?;
        let mask = Tensor::from_vec(vec![1u8, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1], (2, 2, 3), &dev)?;
        let batch = ImageBatch::new(pixels.clone(), mask.clone())?.to_device(&dev)?;
        assert_eq!(batch.host_mask()?.id(), mask.id(), "the host copy is the mask itself");
        let mut replaced = batch.clone();
        replaced.mask = Tensor::zeros((2, 2, 3), DType::U8, &dev)?;
        assert_eq!(u8s(&replaced.host_mask()?), vec![0; 12], "a stale host copy was used");
        let unpadded = ImageBatch::unpadded(pixels)?;
        assert_eq!(u8s(&unpadded.host_mask()?), vec![1; 12]);
        Ok(())
    }

    /// `with_tensors` moves the mask's host copy to the new mask (a CUDA graph's input buffer
    /// holding the same values), and refuses tensors of another shape or dtype by name.
    #[test]
    fn with_tensors_keeps_the_host_mask_for_the_new_mask() -> Result<()> {
        let dev = Device::Cpu;
        let batch = ImageBatch::unpadded(Tensor::zeros((2, 3, 2, 3), DType::F32, &dev)?)?;
        let (pixels, mask) = (batch.pixels.copy()?, Tensor::zeros((2, 2, 3), DType::U8, &dev)?);
        let moved = batch.with_tensors(pixels.clone(), mask.clone())?;
        assert_eq!(moved.mask.id(), mask.id());
        // The copy answers for the new mask (its values are the caller's promise), so the
        // host copy of the ones is what is read, not the zeros.
        assert_eq!(u8s(&moved.host_mask()?), vec![1; 12]);
        let e = batch.with_tensors(pixels.clone(), mask.to_dtype(DType::F32)?).unwrap_err();
        assert!(
            e.to_string().contains("mask is [2, 2, 3] F32 on Cpu, in place of [2, 2, 3] U8"),
            "{e}"
        );
        let e = batch.with_tensors(pixels.narrow(0, 0, 1)?, mask).unwrap_err();
        assert!(e.to_string().contains("pixels is [1, 3, 2, 3]"), "{e}");
        Ok(())
    }

    /// Target host copies follow boxes, labels and the positive map; a missing one stays
    /// missing, a replaced one is read afresh.
    #[test]
    fn target_host_copies_follow_their_tensors() -> Result<()> {
        let dev = Device::Cpu;
        let boxes = Tensor::new(&[[0.5f32, 0.5, 0.2, 0.2]], &dev)?;
        let pm = Tensor::new(&[[0f32, 1.0, 1.0]], &dev)?;
        let t = Target::new(boxes.clone(), None, Some(pm.clone()))?.to_device(&dev)?;
        assert_eq!(t.host_boxes()?.id(), boxes.id());
        assert!(t.host_labels()?.is_none());
        assert_eq!(t.host_positive_map()?.map(|p| p.id()), Some(pm.id()));
        let mut r = t.clone();
        r.boxes = Tensor::new(&[[0.1f32, 0.1, 0.1, 0.1]], &dev)?;
        assert_eq!(r.host_boxes()?.to_vec2::<f32>()?, vec![vec![0.1f32; 4]]);
        Ok(())
    }

    /// A dense output's host copies must match the device tensors' shapes.
    #[test]
    fn dense_host_copies_are_checked() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::zeros((1, 4, 2), DType::F32, &dev)?;
        let d = DenseOutput::new(p.clone(), p.clone(), vec![0; 4], None)?;
        let wrong = Tensor::zeros((1, 3, 2), DType::F32, &dev)?;
        let e = d.clone().with_host_copies(wrong, p.clone()).unwrap_err().to_string();
        assert!(e.contains("host copy of points") && e.contains("[1, 4, 2]"), "{e}");
        let ok = d.with_host_copies(p.copy()?, p.copy()?)?;
        assert_eq!(ok.host_points()?.dims(), &[1, 4, 2]);
        Ok(())
    }

    /// Hand-worked sub-sentences: "cat. dog" tokenised as [CLS] cat . dog [SEP] [PAD], and
    /// "a?b" as [CLS] a ? b [SEP]: separators close their sub-sentence, a caption's last one
    /// needs none, specials and padding stand alone at position 0.
    #[test]
    fn sub_sentences_close_at_separators_and_specials() -> Result<()> {
        let spans = [(0, 0), (0, 3), (3, 4), (5, 8), (0, 0), (0, 0)];
        assert_eq!(
            sub_sentences(&spans, "cat. dog"),
            [(0, 0), (1, 0), (1, 1), (3, 0), (4, 0), (5, 0)]
        );
        assert_eq!(
            sub_sentences(&[(0, 0), (0, 1), (1, 2), (2, 3), (0, 0)], "a?b"),
            [(0, 0), (1, 0), (1, 1), (3, 0), (4, 0)]
        );
        // A caption without separators is one sub-sentence between [CLS] and [SEP].
        assert_eq!(
            sub_sentences(&[(0, 0), (0, 1), (2, 3), (0, 0)], "a b"),
            [(0, 0), (1, 0), (1, 1), (3, 0)]
        );
        let dev = Device::Cpu;
        let s = TextSegments::from_offsets(
            &[spans.to_vec(), spans.to_vec()],
            &["cat. dog".into(), "cat? dog".into()],
            &dev,
        )?;
        assert_eq!(s.starts.to_vec2::<u32>()?[1], [0, 1, 1, 3, 4, 5]);
        // The bias: 0 within a sub-sentence (and on the diagonal), f32::MIN across.
        let bias = s.attention_bias(DType::F32)?.to_vec3::<f32>()?;
        let open: Vec<Vec<bool>> =
            bias[0].iter().map(|r| r.iter().map(|&v| v == 0.0).collect()).collect();
        for (i, row) in open.iter().enumerate() {
            for (j, &o) in row.iter().enumerate() {
                let same = matches!((i, j), (1 | 2, 1 | 2)) || i == j;
                assert_eq!(o, same, "({i}, {j})");
                assert!(o || bias[0][i][j] == f32::MIN);
            }
        }
        // In bf16: 0 and -inf (f32::MIN rounds to it), never NaN.
        let b16 = s.attention_bias(DType::BF16)?.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        assert!(b16.iter().flatten().flatten().all(|&v| v == 0.0 || v == f32::NEG_INFINITY));
        let err = TextSegments::from_offsets(
            &[spans.to_vec(), vec![(0, 0)]],
            &["a".into(), "b".into()],
            &dev,
        )
        .unwrap_err();
        assert!(err.to_string().contains("caption 1 has 1 tokens"), "{err}");
        Ok(())
    }
}
