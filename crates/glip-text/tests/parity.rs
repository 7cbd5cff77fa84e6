//! Parity of the tokenizer and BERT with Hugging Face (`reference/make_fixtures.py`: `BertTokenizerFast`,
//! `BertModel`), at the fixture README's forward tolerance `|a - b| <= 1e-4 + 1e-3 * |b|` (and
//! its gradient tolerance where gradients are compared).

use candle_core::{DType, Result, Tensor};
use glip_testing::{assert_forward_close, assert_grad_close, fixture, load};
use glip_text::bert::mean_pool_normalized;
use glip_text::{Bert, Tokenizer};
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixture("bert-tiny/tokenizer.json")).unwrap()
}

/// A fixture's `[[start, end], ...]` character spans.
fn spans(v: &serde_json::Value) -> Vec<(usize, usize)> {
    let span =
        |o: &serde_json::Value| (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
    v.as_array().unwrap().iter().map(span).collect()
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
        let want_off = spans(&case["offsets"]);
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

fn sub_sentence_cases() -> Vec<serde_json::Value> {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sub-sentence/cases.json")).unwrap())
            .unwrap();
    cases["cases"].as_array().unwrap().clone()
}

fn ints(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Grounding DINO's sub-sentences (`TextSegments::from_offsets`) of our tokenizer's padded batch
/// of `sub-sentence/cases.json`'s captions (detection prompts with and without a closing `.`,
/// a `?`, a `.` inside a name, no separator, an empty caption) against the reference's
/// `sub_sentences` on Hugging Face's offsets: the same offsets and the same integers, exactly.
#[test]
fn sub_sentences_match_the_reference() -> Result<()> {
    let cases = sub_sentence_cases();
    let captions: Vec<String> =
        cases.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
    let batch = tokenizer().batch(&captions, &candle_core::Device::Cpu).unwrap();
    let segments = batch.sub_sentences(&candle_core::Device::Cpu)?;
    let (starts, positions) =
        (segments.starts.to_vec2::<u32>()?, segments.positions.to_vec2::<u32>()?);
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(batch.offsets[i], spans(&case["offsets"]), "offsets of {:?}", captions[i]);
        assert_eq!(starts[i], ints(&case["starts"]), "starts of {:?}", captions[i]);
        assert_eq!(positions[i], ints(&case["positions"]), "positions of {:?}", captions[i]);
    }
    Ok(())
}

/// BERT given sub-sentences against Hugging Face's `BertModel` given Grounding DINO's `(b, t, t)`
/// attention mask and `position_ids` (`sub-sentence/bert-tiny_io.safetensors`): the last hidden
/// state (padding included: each padding token attends to itself in both) and the pooler at the
/// forward tolerance, and the gradients of `sum(h * weight) + sum(pooled * pool_weight)` for the
/// parameters `bert-tiny_io.json` lists (the position embeddings, read at per-token positions,
/// among them) at the gradient tolerance `1e-3 * max|b| + 1e-5`.
#[test]
fn bert_tiny_sub_sentences_match_hugging_face() -> Result<()> {
    let dev = glip_testing::device();
    let io = load("sub-sentence/bert-tiny_io.safetensors", &dev)?;
    let weights = load("bert-tiny/model.safetensors", &dev)?;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let config = glip_text::BertConfig::from_file(&fixture("bert-tiny/config.json")).unwrap();
    let bert = Bert::new(config, vb, true)?;
    {
        let vars = varmap.data().lock().expect("varmap lock");
        assert_eq!(vars.len(), weights.len(), "parameters");
        for (name, var) in vars.iter() {
            var.set(&weights[name].to_dtype(DType::F32)?)?;
        }
    }
    let (ids, mask) = ids_and_mask(&io)?;
    let segments = glip_core::TextSegments::new(
        io["positions"].to_dtype(DType::U32)?,
        io["starts"].to_dtype(DType::U32)?,
    )?;
    let (h, pooled) = bert.forward_ids_in(&ids, &mask, Some(&segments), false)?;
    let pooled = pooled.unwrap();
    assert_forward_close("last_hidden_state", &h, &io["last_hidden_state"])?;
    assert_forward_close("pooler_output", &pooled, &io["pooler_output"])?;
    let loss = ((&h * &io["weight"])?.sum_all()? + (&pooled * &io["pool_weight"])?.sum_all()?)?;
    let grads = loss.backward()?;
    let names: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sub-sentence/bert-tiny_io.json")).unwrap(),
    )
    .unwrap();
    let vars = varmap.data().lock().expect("varmap lock");
    let names = names["grads"].as_array().unwrap();
    assert_eq!(names.len(), 6);
    for name in names {
        let name = name.as_str().unwrap();
        let g = grads.get(vars[name].as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_grad_close(&format!("grad.{name}"), g, &io[&format!("grad.{name}")])?;
    }
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
