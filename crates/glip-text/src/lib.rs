//! Text side of glip-rs: the tokenizer (with character offsets), a trainable BERT with
//! Hugging Face names, GLIP prompts and positive maps.
//!
//! # Owns
//! Turning captions into token ids, offsets and token features implementing
//! [`glip_core::TextEncoder`], and the prompt/positive-map rules of `reference/glip_ref.py`.
//!
//! # Must not know about
//! Images, backbones, the detection transformer, losses or datasets.
//!
//! ```
//! use glip_text::prompt::{positive_map, Prompt};
//!
//! let p = Prompt::detection(&["red circle", "blue square"], ". ").unwrap();
//! assert_eq!(p.caption, "red circle. blue square.");
//! assert_eq!(p.spans, vec![(0, 10), (12, 23)]);
//! // [CLS] red circle . blue square . [SEP]
//! let offsets = [(0, 0), (0, 3), (4, 10), (10, 11), (12, 16), (17, 23), (23, 24), (0, 0)];
//! let pm = positive_map(&offsets, &p.spans, 8);
//! assert_eq!(pm[1], vec![0., 0., 0., 0., 1., 1., 0., 0.]);
//! ```

pub mod bert;
pub mod prompt;
pub mod tokenizer;

pub use bert::{Bert, BertConfig};
pub use prompt::{chunked_detection_prompts, positive_map, Prompt};
pub use tokenizer::{Encoded, Tokenizer, MAX_TOKENS};

use std::path::PathBuf;

/// What can go wrong on the text side, with the file or text concerned.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The tokenizer file could not be read or parsed.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Tokenisation failed.
    #[error("tokenizing {text:?}: {msg}")]
    Encode { text: String, msg: String },
    /// A caption is over the token budget.
    #[error("caption {text:?}... has {tokens} tokens, over the budget of {max}: split it (detection prompts are chunked automatically)")]
    TooLong { text: String, tokens: usize, max: usize },
    /// A prompt is malformed.
    #[error(transparent)]
    Prompt(#[from] glip_core::prompt::PromptError),
    /// A config file is malformed.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A required file is missing.
    #[error("{path}: not found")]
    Missing { path: PathBuf },
    /// An I/O error.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
