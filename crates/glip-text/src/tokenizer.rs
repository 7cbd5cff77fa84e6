//! WordPiece tokenisation from a Hugging Face `tokenizer.json`, keeping character offsets.

use crate::TextError;
use candle_core::{Device, Tensor};
use glip_core::TextBatch;
use std::path::Path;

/// GLIP's token budget per caption, `[CLS]` and `[SEP]` included.
pub const MAX_TOKENS: usize = 256;

/// One tokenised caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, `[CLS] ... [SEP]`.
    pub ids: Vec<u32>,
    /// Character span `[start, end)` of each token in the caption; `(0, 0)` for special tokens.
    pub offsets: Vec<(usize, usize)>,
    /// The token strings.
    pub tokens: Vec<String>,
}

/// A tokenizer with the file's own padding and truncation switched off: lengths are ours.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_tokens: usize,
}

impl Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TextError::Tokenizer { path: path.to_path_buf(), msg: e.to_string() })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TextError::Tokenizer { path: path.to_path_buf(), msg: e.to_string() })?;
        Ok(Self { inner, max_tokens: MAX_TOKENS })
    }

    /// Whether the vocabulary knows `word`: it tokenizes without `[UNK]` and not letter by
    /// letter (a WordPiece vocabulary spells a word it has never seen with single characters,
    /// which carry nothing of its meaning; real subwords such as `ground ##ing` are fine).
    pub fn knows(&self, word: &str) -> bool {
        let Ok(e) = self.inner.encode(word, false) else { return false };
        let unk = self.inner.token_to_id("[UNK]");
        if unk.is_some_and(|u| e.get_ids().contains(&u)) {
            return false;
        }
        let tokens = e.get_tokens();
        let spelled = tokens.len() > 1
            && tokens.iter().all(|t| t.trim_start_matches("##").chars().count() == 1);
        !spelled
    }

    /// Size of the vocabulary (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token budget (default [`MAX_TOKENS`]).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Changes the token budget (at least 2, for `[CLS]` and `[SEP]`).
    pub fn set_max_tokens(&mut self, n: usize) {
        self.max_tokens = n.max(2);
    }

    fn encode_full(&self, text: &str) -> Result<Encoded, TextError> {
        let enc = self.inner.encode_char_offsets(text, true).map_err(|e| TextError::Encode {
            text: text.chars().take(60).collect(),
            msg: e.to_string(),
        })?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
            tokens: enc.get_tokens().to_vec(),
        })
    }

    /// Tokenises `text`; a caption over the budget is an error, never silently cut.
    pub fn encode(&self, text: &str) -> Result<Encoded, TextError> {
        let e = self.encode_full(text)?;
        if e.ids.len() > self.max_tokens {
            return Err(TextError::TooLong {
                text: text.chars().take(60).collect(),
                tokens: e.ids.len(),
                max: self.max_tokens,
            });
        }
        Ok(e)
    }

    /// Tokenises `text` and keeps the first `max_tokens - 1` tokens plus the final `[SEP]`, as
    /// Hugging Face's `truncation=True` does; for callers that accept losing the tail.
    pub fn encode_truncated(&self, text: &str) -> Result<Encoded, TextError> {
        let mut e = self.encode_full(text)?;
        if e.ids.len() > self.max_tokens {
            let n = self.max_tokens;
            let (sep_id, sep_off, sep_tok) = (
                e.ids[e.ids.len() - 1],
                e.offsets[e.offsets.len() - 1],
                e.tokens[e.tokens.len() - 1].clone(),
            );
            e.ids.truncate(n - 1);
            e.offsets.truncate(n - 1);
            e.tokens.truncate(n - 1);
            e.ids.push(sep_id);
            e.offsets.push(sep_off);
            e.tokens.push(sep_tok);
        }
        Ok(e)
    }

    /// Number of tokens of `text`, special tokens included, without the budget check.
    pub fn count(&self, text: &str) -> Result<usize, TextError> {
        Ok(self.encode_full(text)?.ids.len())
    }

    /// Tokenises captions into a padded [`TextBatch`] (pad id 0, mask 0 on padding).
    pub fn batch(&self, captions: &[String], device: &Device) -> Result<TextBatch, TextError> {
        let encs = captions.iter().map(|c| self.encode(c)).collect::<Result<Vec<_>, _>>()?;
        Ok(pad_batch(&encs, captions, device)?)
    }
}

/// Pads encodings to their longest into a [`TextBatch`].
pub fn pad_batch(
    encs: &[Encoded],
    captions: &[String],
    device: &Device,
) -> candle_core::Result<TextBatch> {
    let t = encs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let b = encs.len();
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u8; b * t];
    let mut offsets = Vec::with_capacity(b);
    for (i, e) in encs.iter().enumerate() {
        ids[i * t..i * t + e.ids.len()].copy_from_slice(&e.ids);
        mask[i * t..i * t + e.ids.len()].fill(1);
        let mut o = e.offsets.clone();
        o.resize(t, (0, 0));
        offsets.push(o);
    }
    TextBatch::new(
        Tensor::from_vec(ids, (b, t), device)?,
        Tensor::from_vec(mask, (b, t), device)?,
        offsets,
        captions.to_vec(),
    )
}

impl glip_core::prompt::CaptionTokenizer for Tokenizer {
    fn encode_caption(&self, caption: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), String> {
        self.encode(caption).map(|e| (e.ids, e.offsets)).map_err(|e| e.to_string())
    }

    fn count_tokens(&self, caption: &str) -> Result<usize, String> {
        self.count(caption).map_err(|e| e.to_string())
    }

    fn token_budget(&self) -> usize {
        self.max_tokens
    }
}
