//! GLIP prompts and positive maps, exactly as `build_prompt` / `positive_map` in
//! `glip_reference.py`.

use crate::tokenizer::{Encoded, Tokenizer};
use crate::TextError;

/// A caption and the character span of each phrase in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The caption.
    pub caption: String,
    /// `[start, end)` character span of each phrase (category name), in order.
    pub spans: Vec<(usize, usize)>,
}

impl Prompt {
    /// A free caption with given phrase spans (character indices); spans outside the caption
    /// or empty are errors.
    pub fn caption(caption: &str, spans: Vec<(usize, usize)>) -> Result<Self, TextError> {
        let n = caption.chars().count();
        for (i, &(s, e)) in spans.iter().enumerate() {
            if s >= e || e > n {
                return Err(TextError::BadSpan { index: i, start: s, end: e, len: n });
            }
        }
        Ok(Self { caption: caption.to_string(), spans })
    }

    /// GLIP's detection prompt `"person. bicycle. car."` with each name's span (`build_prompt`).
    pub fn detection<S: AsRef<str>>(categories: &[S], separator: &str) -> Result<Self, TextError> {
        let mut caption = String::new();
        let mut spans = Vec::with_capacity(categories.len());
        let mut len = 0usize; // in characters, as Python's len
        for (i, name) in categories.iter().enumerate() {
            let name = name.as_ref();
            if name.trim().is_empty() {
                return Err(TextError::EmptyCategory { index: i });
            }
            let start = len;
            caption.push_str(name);
            len += name.chars().count();
            spans.push((start, len));
            if i + 1 < categories.len() {
                caption.push_str(separator);
                len += separator.chars().count();
            }
        }
        caption.push('.');
        Ok(Self { caption, spans })
    }
}

/// `[n_spans][num_tokens]` 0/1 map: token `t` is positive for a span when their character ranges
/// overlap (`positive_map` in the reference); special and padding tokens (empty ranges) never are.
pub fn positive_map(
    offsets: &[(usize, usize)],
    spans: &[(usize, usize)],
    num_tokens: usize,
) -> Vec<Vec<f32>> {
    spans
        .iter()
        .map(|&(s, e)| {
            let mut row = vec![0f32; num_tokens];
            for (t, &(ts, te)) in offsets.iter().enumerate().take(num_tokens) {
                if te > ts && ts < e && te > s {
                    row[t] = 1.0;
                }
            }
            row
        })
        .collect()
}

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
