//! Parity of the tokenizer and BERT with Hugging Face (`reference/make_fixtures.py`: `BertTokenizerFast`,
//! `BertModel`), at the fixture README's forward tolerance `|a - b| <= 1e-4 + 1e-3 * |b|`.

use candle_core::{DType, Result, Tensor};
use glip_testing::{assert_forward_close, fixture, load};
use glip_text::bert::mean_pool_normalized;
use glip_text::{Bert, Tokenizer};
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("bert-tiny/tokenizer.json")).unwrap()
}

#[test]
fn tokenization_matches_hugging_face_ids_and_offsets() {
    let tok = tokenizer();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tokenization.json")).unwrap())
            .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want_ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let want_off: Vec<(usize, usize)> = case["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize))
            .collect();
        let e = tok.encode_truncated(text).unwrap();
        assert_eq!(e.ids, want_ids, "ids of {text:?}");
        assert_eq!(e.offsets, want_off, "offsets of {text:?}");
        if want_ids.len() == 256 {
            // The 300-word case: the fixture truncates; our plain `encode` refuses instead.
            assert!(tok.encode(text).is_err());
        }
    }
}

fn ids_and_mask(io: &std::collections::HashMap<String, Tensor>) -> Result<(Tensor, Tensor)> {
    Ok((io["input_ids"].to_dtype(DType::U32)?, io["attention_mask"].to_dtype(DType::U8)?))
}

#[test]
fn bert_tiny_matches_last_hidden_state_and_pooler() -> Result<()> {
    let dev = glip_testing::device();
    let bert = Bert::from_folder(&fixture("bert-tiny"), &dev).unwrap();
    let io = load("bert-tiny_io.safetensors", &dev)?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (h, pooled) = bert.forward_ids(&ids, &mask, false)?;
    assert_forward_close("last_hidden_state", &h, &io["last_hidden_state"])?;
    assert_forward_close("pooler_output", &pooled.unwrap(), &io["pooler_output"])?;
    Ok(())
}

/// Where `cargo xtask fetch-models` puts the real all-MiniLM-L6-v2.
fn minilm_dir() -> PathBuf {
    let cache = std::env::var_os("GLIP_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/glip-rs")
    });
    cache.join("models/all-minilm-l6-v2")
}

#[test]
fn real_minilm_matches_sentence_transformers() -> Result<()> {
    let dir = minilm_dir();
    if !dir.join("model.safetensors").exists() {
        eprintln!("SKIP real_minilm_matches_sentence_transformers: {} absent; run `cargo xtask fetch-models`", dir.display());
        return Ok(());
    }
    let dev = glip_testing::device();
    let bert = Bert::from_folder(&dir, &dev).unwrap();
    let io = load("minilm_io.safetensors", &dev)?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (h, _) = bert.forward_ids(&ids, &mask, false)?;
    assert_forward_close("last_hidden_state", &h, &io["last_hidden_state"])?;
    let s = mean_pool_normalized(&h, &mask)?;
    assert_forward_close("sentence_embedding", &s, &io["sentence_embedding"])?;
    // The fixture's tokenizer is MiniLM's: the real model's folder ships the same vocabulary.
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode("person. bicycle. car.").unwrap().ids,
        tokenizer().encode("person. bicycle. car.").unwrap().ids
    );
    Ok(())
}
