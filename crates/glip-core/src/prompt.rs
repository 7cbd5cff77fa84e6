//! GLIP prompts and positive maps, exactly as `build_prompt` / `positive_map` in
//! `reference/glip_ref.py`, and the tokenizer interface the data pipeline needs.
//!
//! They live here, at the bottom, because both the text crate (which tokenises) and the data
//! crate (which builds prompts from datasets) use them and may not depend on each other.

/// What is wrong with a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    /// A phrase span does not lie inside its caption.
    #[error("span {index} = [{start}, {end}) is empty or outside the caption of {len} characters")]
    BadSpan { index: usize, start: usize, end: usize, len: usize },
    /// A category name is empty.
    #[error("category {index} has an empty name")]
    EmptyCategory { index: usize },
    /// A caption's phrase marking (`[...]`) is wrong.
    #[error("{problem} at character {at} of {text:?} (mark each phrase as [phrase]: \"a [dog] on a [sofa]\")")]
    Marking { text: String, at: usize, problem: &'static str },
}

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
    pub fn caption(caption: &str, spans: Vec<(usize, usize)>) -> Result<Self, PromptError> {
        let n = caption.chars().count();
        check_spans(&spans, n)?;
        Ok(Self { caption: caption.to_string(), spans })
    }

    /// A caption whose phrases are marked with brackets, `"a [red circle] left of a [blue
    /// square]"`: the caption without them and each marked phrase's span in it, in order.
    /// Brackets are not nested, each phrase holds a character besides spaces, and there is at
    /// least one.
    pub fn marked(text: &str) -> Result<Self, PromptError> {
        let fail = |at, problem| PromptError::Marking { text: text.to_string(), at, problem };
        let mut caption = String::with_capacity(text.len());
        let mut spans = Vec::new();
        let mut open: Option<(usize, usize)> = None; // (position in text, start in caption)
        let mut len = 0usize; // the caption's length in characters
        for (at, c) in text.chars().enumerate() {
            match (c, open) {
                ('[', None) => open = Some((at, len)),
                ('[', Some(_)) => return Err(fail(at, "'[' inside a phrase")),
                (']', None) => return Err(fail(at, "']' without '['")),
                (']', Some((from, start))) => {
                    let phrase: String = caption.chars().skip(start).collect();
                    if phrase.trim().is_empty() {
                        return Err(fail(from, "empty phrase"));
                    }
                    spans.push((start, len));
                    open = None;
                }
                (c, _) => {
                    caption.push(c);
                    len += 1;
                }
            }
        }
        if let Some((from, _)) = open {
            return Err(fail(from, "'[' not closed"));
        }
        if spans.is_empty() {
            return Err(fail(0, "no phrase marked"));
        }
        Ok(Self { caption, spans })
    }

    /// The text of each phrase (empty for a span outside the caption: the fields are public, so
    /// a hand-made prompt may hold one).
    pub fn phrases(&self) -> Vec<String> {
        let chars: Vec<char> = self.caption.chars().collect();
        self.spans.iter().map(|&s| phrase_text(&chars, &[s])).collect()
    }

    /// GLIP's detection prompt `"person. bicycle. car."` with each name's span (`build_prompt`).
    pub fn detection<S: AsRef<str>>(
        categories: &[S],
        separator: &str,
    ) -> Result<Self, PromptError> {
        let mut caption = String::new();
        let mut spans = Vec::with_capacity(categories.len());
        let mut len = 0usize; // in characters, as Python's len
        for (i, name) in categories.iter().enumerate() {
            let name = name.as_ref();
            if name.trim().is_empty() {
                return Err(PromptError::EmptyCategory { index: i });
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

/// The text of a phrase made of `spans` of a caption's `chars` (ODVG's `tokens_positive`): the
/// pieces joined by a space; a span outside the caption gives nothing.
pub fn phrase_text(chars: &[char], spans: &[(usize, usize)]) -> String {
    let pieces: Vec<String> = spans
        .iter()
        .map(|&(s, e)| chars.get(s..e).map(|c| c.iter().collect()).unwrap_or_default())
        .collect();
    pieces.join(" ")
}

/// Checks that every span is non-empty and inside a caption of `len` characters.
pub fn check_spans(spans: &[(usize, usize)], len: usize) -> Result<(), PromptError> {
    for (i, &(s, e)) in spans.iter().enumerate() {
        if s >= e || e > len {
            return Err(PromptError::BadSpan { index: i, start: s, end: e, len });
        }
    }
    Ok(())
}

/// `[n_spans][num_tokens]` 0/1 map: token `t` is positive for a span when their character ranges
/// overlap (`positive_map` in the reference); special and padding tokens (empty ranges) never are.
pub fn positive_map(
    offsets: &[(usize, usize)],
    spans: &[(usize, usize)],
    num_tokens: usize,
) -> Vec<Vec<f32>> {
    spans.iter().map(|&s| positive_row(offsets, &[s], num_tokens)).collect()
}

/// One row of a positive map for a phrase made of several spans (ODVG's `tokens_positive`).
pub fn positive_row(
    offsets: &[(usize, usize)],
    spans: &[(usize, usize)],
    num_tokens: usize,
) -> Vec<f32> {
    let mut row = vec![0f32; num_tokens];
    for &(s, e) in spans {
        for (t, &(ts, te)) in offsets.iter().enumerate().take(num_tokens) {
            if te > ts && ts < e && te > s {
                row[t] = 1.0;
            }
        }
    }
    row
}

/// Tokenisation as the data pipeline needs it: ids and character offsets, and the budget.
pub trait CaptionTokenizer: Send + Sync {
    /// Token ids and per-token character spans of `caption`, special tokens included; an error
    /// (as text) when the caption cannot be tokenised within the budget.
    fn encode_caption(&self, caption: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>), String>;
    /// Number of tokens of `caption`, special tokens included.
    fn count_tokens(&self, caption: &str) -> Result<usize, String>;
    /// The token budget per caption.
    fn token_budget(&self) -> usize;
}
