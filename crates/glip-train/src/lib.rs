//! Assembly and training of glip-rs: builds a model from the component crates, trains it,
//! evaluates it.
//!
//! # Owns
//! The component registry (every slot's factories, the built-ins registered like a user's),
//! the typed configs, the optimiser, checkpoints, logging, the one inference path and
//! evaluation.
//!
//! # Must not know about
//! Command-line parsing or experiment grids (those are glip-cli's and xtask's).

pub mod bench;
pub mod builtins;
pub mod config;
pub mod device;
pub mod eval;
pub mod experiment;
pub mod graphs;
pub mod infer;
pub mod model;
pub mod optim;
pub mod registry;
pub mod results;
pub mod run_config;
pub mod seed;
pub mod trainer;
pub mod validate;

pub use glip_kernels::bf16::{autocast, resolve as resolve_precision, Precision};
pub use glip_kernels::cuda::{set_deterministic, set_tf32};
pub use model::GlipModel;

use std::path::{Path, PathBuf};

/// What glip-train's public API returns when it fails: the key, file or step concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value is wrong.
    #[error("{key}: {msg}")]
    Config {
        /// The key (`model.detector`, `data.batch_size`).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A config breaks rules (every one is listed, each naming its key).
    #[error("{0}")]
    Invalid(glip_core::validate::Problems),
    /// A file could not be read or written, or its content is wrong.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// Tensor work failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Data loading failed.
    #[error(transparent)]
    Data(#[from] glip_data::DataError),
    /// Text processing failed.
    #[error(transparent)]
    Text(#[from] glip_text::TextError),
    /// Training stopped.
    #[error(transparent)]
    Train(#[from] trainer::TrainError),
    /// Evaluation failed.
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    /// Anything else, said in words.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// A file error.
    pub fn file(path: &Path, e: impl std::fmt::Display) -> Self {
        Error::File { path: path.to_path_buf(), msg: e.to_string() }
    }
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so that a reader
/// never sees a half-written file and a failed write leaves the old one in place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    Ok(glip_data::write_atomic(path, bytes)?)
}
