//! GLIP prompts and positive maps (defined in `glip_core::prompt`, re-exported here), and
//! detection prompts chunked to the token budget.

use crate::tokenizer::{Encoded, Tokenizer};
use crate::TextError;
pub use glip_core::prompt::{positive_map, positive_row, Prompt, PromptError};

/// A detection prompt cut into chunks that each fit the tokenizer's budget.
#[derive(Debug, Clone)]
pub struct PromptChunk {
    /// Indices into the category list of the names in this chunk.
    pub categories: Vec<usize>,
    /// The chunk's prompt.
    pub prompt: Prompt,
    /// Its tokenisation.
    pub encoding: Encoded,
}

/// Builds detection prompts over `categories`, as few chunks as the token budget allows, each
/// run separately by the model: a long vocabulary is never silently truncated. A single name
/// that does not fit on its own is an error.
pub fn chunked_detection_prompts<S: AsRef<str>>(
    tokenizer: &Tokenizer,
    categories: &[S],
    separator: &str,
) -> Result<Vec<PromptChunk>, TextError> {
    let mut chunks = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let names =
        |idx: &[usize]| idx.iter().map(|&i| categories[i].as_ref().to_string()).collect::<Vec<_>>();
    for i in 0..categories.len() {
        let mut trial = current.clone();
        trial.push(i);
        let p = Prompt::detection(&names(&trial), separator)?;
        if tokenizer.count(&p.caption)? <= tokenizer.max_tokens() {
            current = trial;
            continue;
        }
        if current.is_empty() {
            // The name alone is over budget: report it through encode's error.
            tokenizer.encode(&p.caption)?;
        }
        let p = Prompt::detection(&names(&current), separator)?;
        let encoding = tokenizer.encode(&p.caption)?;
        chunks.push(PromptChunk { categories: std::mem::take(&mut current), prompt: p, encoding });
        current.push(i);
    }
    if !current.is_empty() {
        let p = Prompt::detection(&names(&current), separator)?;
        let encoding = tokenizer.encode(&p.caption)?;
        chunks.push(PromptChunk { categories: current, prompt: p, encoding });
    }
    Ok(chunks)
}
