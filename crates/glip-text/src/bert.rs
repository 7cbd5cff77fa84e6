//! A trainable BERT with Hugging Face names.
//!
//! candle-transformers' BERT uses the fused LayerNorm, which passes no gradient
//! (CANDLE-NOTES.md), so this crate owns the forward pass, built from `glip_kernels::nn`'s
//! differentiable pieces.

use crate::TextError;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Embedding, Init, Module, VarBuilder};
use glip_core::{TextEncoder, TextFeatures, TextSegments};
use glip_kernels::nn::{dropout, mask_to_bias, softmax_last, LayerNorm, Linear};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a Hugging Face `config.json` that BERT needs; other fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width `d`.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Heads per layer.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Longest sequence.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// `gelu` (erf) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states (training only).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities (training only).
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
}

fn default_max_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_act() -> String {
    "gelu".into()
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f32 {
    0.1
}

impl BertConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> std::result::Result<Self, TextError> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| TextError::Io { path: path.to_path_buf(), source: e })?;
        serde_json::from_str(&s)
            .map_err(|e| TextError::Config { path: path.to_path_buf(), msg: e.to_string() })
    }

    /// A small BERT, for tests and the synthetic task.
    pub fn tiny(vocab_size: usize, hidden: usize, layers: usize, heads: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: hidden * 2,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }
}

fn embedding(n: usize, d: usize, vb: VarBuilder<'_>) -> Result<Embedding> {
    // PyTorch's nn.Embedding and BERT's _init_weights: N(0, 0.02).
    let w = vb.get_with_hints((n, d), "weight", Init::Randn { mean: 0.0, stdev: 0.02 })?;
    Ok(Embedding::new(w, d))
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// BERT: embeddings, encoder, optional pooler.
#[derive(Debug, Clone)]
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    config: BertConfig,
}

impl Bert {
    /// Builds from `vb`; names with or without a `bert.` prefix. The pooler is loaded when
    /// `pooler` is true (it must then exist in a loaded file).
    pub fn new(config: BertConfig, vb: VarBuilder<'_>, pooler: bool) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let d = config.hidden_size;
        if config.num_attention_heads == 0 || !d.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "bert: hidden_size {d} is not divisible by num_attention_heads {}",
                config.num_attention_heads
            );
        }
        let e = vb.pp("embeddings");
        let word = embedding(config.vocab_size, d, e.pp("word_embeddings"))?;
        let position = embedding(config.max_position_embeddings, d, e.pp("position_embeddings"))?;
        let token_type = embedding(config.type_vocab_size, d, e.pp("token_type_embeddings"))?;
        let emb_norm = LayerNorm::new(d, config.layer_norm_eps, e.pp("LayerNorm"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                Ok(Layer {
                    query: Linear::new(d, d, a.pp("self.query"))?,
                    key: Linear::new(d, d, a.pp("self.key"))?,
                    value: Linear::new(d, d, a.pp("self.value"))?,
                    attn_out: Linear::new(d, d, a.pp("output.dense"))?,
                    attn_norm: LayerNorm::new(d, config.layer_norm_eps, a.pp("output.LayerNorm"))?,
                    intermediate: Linear::new(
                        d,
                        config.intermediate_size,
                        l.pp("intermediate.dense"),
                    )?,
                    output: Linear::new(config.intermediate_size, d, l.pp("output.dense"))?,
                    out_norm: LayerNorm::new(d, config.layer_norm_eps, l.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooler = if pooler { Some(Linear::new(d, d, vb.pp("pooler.dense"))?) } else { None };
        Ok(Self { word, position, token_type, emb_norm, layers, pooler, config })
    }

    /// Loads a Hugging Face folder: `config.json` and `model.safetensors` (or
    /// `pytorch_model.bin`). The pooler is used when the file has one.
    pub fn from_folder(dir: &Path, device: &Device) -> std::result::Result<Self, TextError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let file = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| TextError::Missing { path: dir.join("model.safetensors") })?;
        let vb = glip_core::weights::open(&file, DType::F32, device)?;
        let has_pooler = vb.contains_tensor("pooler.dense.weight")
            || vb.contains_tensor("bert.pooler.dense.weight");
        Ok(Self::new(config, vb, has_pooler)?)
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        match self.config.hidden_act.as_str() {
            "relu" => glip_kernels::fused::relu(x),
            "gelu_new" | "gelu_pytorch_tanh" => x.gelu(),
            _ => glip_kernels::fused::gelu_erf(x),
        }
    }

    /// `input_ids (b, t)` u32, `attention_mask (b, t)` -> last hidden state `(b, t, d)` and the
    /// pooled output `(b, d)` when the model has a pooler.
    pub fn forward_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_ids_in(input_ids, attention_mask, None, train)
    }

    /// [`Bert::forward_ids`] with each token attending only to its sub-sentence and its
    /// position counted in it, when `segments` are given (Grounding DINO calls Hugging Face's
    /// BERT with the same `(b, t, t)` attention mask and `position_ids`).
    pub fn forward_ids_in(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        segments: Option<&TextSegments>,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = input_ids.dims2()?;
        let cfg = &self.config;
        if t > cfg.max_position_embeddings {
            candle_core::bail!(
                "bert: {t} tokens exceed max_position_embeddings {}",
                cfg.max_position_embeddings
            );
        }
        let dev = input_ids.device();
        let position = match segments {
            Some(s) => {
                if s.positions.dims() != [b, t] {
                    candle_core::bail!(
                        "bert: sub-sentences of {:?} tokens for input ids of ({b}, {t})",
                        s.positions.dims()
                    );
                }
                self.position.forward(&s.positions)?
            }
            None => self.position.forward(&Tensor::arange(0u32, t as u32, dev)?)?.unsqueeze(0)?,
        };
        let types = Tensor::zeros((b, t), DType::U32, dev)?;
        let x = self
            .word
            .forward(input_ids)?
            .broadcast_add(&position)?
            .add(&self.token_type.forward(&types)?)?;
        let mut x = dropout(&self.emb_norm.forward(&x)?, cfg.hidden_dropout_prob, train)?;
        // Made where the composed attention first needs it: the key mask's, or the
        // sub-sentences' (which keeps every padding token to itself, so needs no key mask).
        let mut bias: Option<Tensor> = None;
        let make_bias = |dtype: DType| match segments {
            Some(s) => s.attention_bias(dtype)?.unsqueeze(1),
            None => mask_to_bias(attention_mask, dtype),
        };
        let h = cfg.num_attention_heads;
        let dh = cfg.hidden_size / h;
        let scale = 1.0 / (dh as f64).sqrt();
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()
        };
        let attend_dropout = if train { cfg.attention_probs_dropout_prob } else { 0.0 };
        for l in &self.layers {
            let (q, k, v) = (l.query.forward(&x)?, l.key.forward(&x)?, l.value.forward(&x)?);
            // Inference on CUDA: the core in one launch, the mask's bias added inside.
            let fused = if attend_dropout == 0.0 && segments.is_none() {
                let at = glip_kernels::attention::ScaleAt::Scores;
                glip_kernels::attention::fused(&q, &k, &v, Some(attention_mask), h, scale, at)?
            } else {
                None
            };
            let ctx = match fused {
                Some(ctx) => ctx,
                None => {
                    let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
                    let bias = match &bias {
                        Some(bias) => bias,
                        None => bias.insert(make_bias(x.dtype())?),
                    };
                    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(bias)?;
                    let p = dropout(&softmax_last(&scores)?, attend_dropout, train)?;
                    p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, cfg.hidden_size))?
                }
            };
            let a = dropout(&l.attn_out.forward(&ctx)?, cfg.hidden_dropout_prob, train)?;
            let a = l.attn_norm.forward_residual(&a, &x)?;
            let f = self.act(&l.intermediate.forward(&a)?)?;
            let f = dropout(&l.output.forward(&f)?, cfg.hidden_dropout_prob, train)?;
            x = l.out_norm.forward_residual(&f, &a)?;
        }
        let pooled = match &self.pooler {
            Some(p) => Some(p.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()?),
            None => None,
        };
        Ok((x, pooled))
    }
}

/// Sentence embedding as sentence-transformers computes it: the mean of the token features over
/// real tokens, L2-normalised. `tokens (b, t, d)`, `mask (b, t)` -> `(b, d)`.
pub fn mean_pool_normalized(tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(tokens.dtype())?.unsqueeze(D::Minus1)?;
    let sum = tokens.broadcast_mul(&m)?.sum(1)?;
    let n = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    glip_kernels::nn::l2_normalize(&sum.broadcast_div(&n)?)
}

impl TextEncoder for Bert {
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<TextFeatures> {
        let (tokens, pooled) = self.forward_ids(input_ids, attention_mask, train)?;
        TextFeatures::new(tokens, pooled, attention_mask.clone())
    }

    fn forward_segmented(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        segments: &TextSegments,
        train: bool,
    ) -> Result<TextFeatures> {
        let (tokens, pooled) =
            self.forward_ids_in(input_ids, attention_mask, Some(segments), train)?;
        TextFeatures::new(tokens, pooled, attention_mask.clone())
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}
