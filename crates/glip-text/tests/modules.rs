//! BERT's gradients, shapes and text-padding invariance; prompts and positive maps against the
//! reference's rules (`detection_prompt`, `positive_map` in `reference/glip_ref.py`).

use candle_core::{DType, Device, Result, Tensor};
use glip_core::TextEncoder;
use glip_testing::{
    assert_close, assert_every_parameter_learns, fixture, fresh_vars, load, probe_loss,
};
use glip_text::{chunked_detection_prompts, positive_map, Bert, BertConfig, Prompt, Tokenizer};
use proptest::prelude::*;

fn tiny(vb: candle_nn::VarBuilder<'_>) -> Bert {
    Bert::new(BertConfig::tiny(50, 32, 2, 4), vb, true).unwrap()
}

#[test]
fn every_bert_parameter_learns() -> Result<()> {
    let (vm, vb) = fresh_vars();
    let bert = tiny(vb);
    let ids = Tensor::new(&[[1u32, 5, 7, 9, 2, 0], [1, 3, 2, 0, 0, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], &Device::Cpu)?;
    let f = bert.forward(&ids, &mask, true)?;
    let loss = (probe_loss(&f.tokens)? + probe_loss(f.pooled.as_ref().unwrap())?)?;
    assert_every_parameter_learns(&vm, &loss.backward()?, |_| false)
}

#[test]
fn bert_loads_names_with_a_bert_prefix() -> Result<()> {
    let dev = Device::Cpu;
    let plain = candle_core::safetensors::load(fixture("bert-tiny/model.safetensors"), &dev)?;
    let prefixed =
        plain.iter().map(|(k, v)| (format!("bert.{k}"), v.to_dtype(DType::F32).unwrap())).collect();
    let vb = candle_nn::VarBuilder::from_tensors(prefixed, DType::F32, &dev);
    let cfg = BertConfig::from_file(&fixture("bert-tiny/config.json")).unwrap();
    let bert = Bert::new(cfg, vb, true)?;
    let io = load("bert-tiny_io.safetensors", &dev)?;
    let (h, _) = bert.forward_ids(
        &io["input_ids"].to_dtype(DType::U32)?,
        &io["attention_mask"].to_dtype(DType::U8)?,
        false,
    )?;
    glip_testing::assert_forward_close("prefixed last_hidden_state", &h, &io["last_hidden_state"])
}

/// Grounding DINO's reason for sub-sentences: a category's token features do not depend on the
/// other categories of the prompt or their order. bert-tiny (the fixture's weights) encodes
/// "cat. dog." and "zebra crossing. dog. cat." in one batch: "cat ." gets the same features in
/// both at the fixture README's forward tolerance (the two rows differ in the masked terms of
/// their sums, exact zeros, and in the length those sums run over); with whole captions they
/// differ.
#[test]
fn sub_sentence_features_do_not_depend_on_the_other_categories() -> Result<()> {
    let dev = Device::Cpu;
    let bert = Bert::from_folder(&fixture("bert-tiny"), &dev).unwrap();
    let tok = Tokenizer::from_file(&fixture("bert-tiny/tokenizer.json")).unwrap();
    let captions = ["cat. dog.".to_string(), "zebra crossing. dog. cat.".to_string()];
    let batch = tok.batch(&captions, &dev).unwrap();
    // The two tokens "cat" and "." of each caption.
    let at = |i: usize| -> usize {
        let c = captions[i].find("cat").unwrap();
        batch.offsets[i].iter().position(|&span| span == (c, c + 3)).unwrap()
    };
    let cat = |t: &Tensor, i: usize| t.get(i).and_then(|r| r.narrow(0, at(i), 2));
    let segments = batch.sub_sentences(&dev)?;
    let f = bert.forward_segmented(&batch.input_ids, &batch.attention_mask, &segments, false)?;
    glip_testing::assert_forward_close(
        "cat. in two prompts",
        &cat(&f.tokens, 0)?,
        &cat(&f.tokens, 1)?,
    )?;
    let whole = bert.forward(&batch.input_ids, &batch.attention_mask, false)?;
    let (a, b) = (cat(&whole.tokens, 0)?, cat(&whole.tokens, 1)?);
    let excess = ((&a - &b)?.abs()? - (b.abs()? * 1e-3)?)?;
    let beyond = (excess - 1e-4)?.max_all()?.to_scalar::<f32>()?;
    assert!(beyond > 0.0, "whole captions: cat's features do not depend on the prompt");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn bert_shapes_and_padding_invariance(b in 1usize..4, t in 1usize..12, extra in 1usize..6, seed in 0u64..1000) {
        let (_vm, vb) = fresh_vars();
        let bert = tiny(vb);
        let dev = Device::Cpu;
        let ids: Vec<u32> = (0..b * t).map(|i| ((i as u64 * 7 + seed) % 50) as u32).collect();
        let x = Tensor::from_vec(ids.clone(), (b, t), &dev).unwrap();
        let m = Tensor::ones((b, t), DType::U8, &dev).unwrap();
        let f = bert.forward(&x, &m, false).unwrap();
        prop_assert_eq!(f.tokens.dims(), &[b, t, 32]);
        prop_assert_eq!(f.pooled.as_ref().unwrap().dims(), &[b, 32]);
        // Append `extra` padding tokens with arbitrary ids: real positions must not change.
        let xp = Tensor::cat(&[x, Tensor::full(3u32, (b, extra), &dev).unwrap()], 1).unwrap();
        let mp = Tensor::cat(&[m, Tensor::zeros((b, extra), DType::U8, &dev).unwrap()], 1).unwrap();
        let fp = bert.forward(&xp, &mp, false).unwrap();
        assert_close("real tokens under padding", &fp.tokens.narrow(1, 0, t).unwrap(), &f.tokens, 1e-5, 1e-5).unwrap();
        assert_close("pooled under padding", fp.pooled.as_ref().unwrap(), f.pooled.as_ref().unwrap(), 1e-5, 1e-5).unwrap();
    }

    #[test]
    fn positive_maps_point_only_at_real_tokens_of_their_span(
        names in prop::collection::vec("[a-z]{1,8}( [a-z]{1,8})?", 1..8), pad in 0usize..5,
    ) {
        let tok = Tokenizer::from_file(&fixture("bert-tiny/tokenizer.json")).unwrap();
        let p = Prompt::detection(&names, ". ").unwrap();
        let e = tok.encode(&p.caption).unwrap();
        let n = e.ids.len() + pad;
        let pm = positive_map(&e.offsets, &p.spans, n);
        let chars: Vec<char> = p.caption.chars().collect();
        for (row, &(s, end)) in pm.iter().zip(&p.spans) {
            prop_assert!(row.contains(&1.0), "a name with no token");
            for (ti, &v) in row.iter().enumerate() {
                if v == 1.0 {
                    prop_assert!(ti > 0 && ti + 1 < e.ids.len(), "special or padding token {} marked", ti);
                    let (a, b) = e.offsets[ti];
                    prop_assert!(a < end && b > s);
                    let piece: String = chars[a..b].iter().collect();
                    prop_assert!(p.caption.chars().skip(s).take(end - s).collect::<String>().contains(piece.trim_start_matches("##")));
                }
            }
        }
    }
}

#[test]
fn positive_maps_match_the_reference_targets() -> Result<()> {
    let tok = Tokenizer::from_file(&fixture("bert-tiny/tokenizer.json")).unwrap();
    let io = load("seed-tiny/io.safetensors", &Device::Cpu)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("seed-tiny/io.json")).unwrap())
            .unwrap();
    let cats: Vec<String> = meta["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let t = io["input_ids"].dims()[1];
    // Image b's prompt holds categories `subset[b]`; its targets' labels index `cats`.
    let subsets: [&[usize]; 3] = [&[0, 1, 2, 3, 4], &[0, 1], &[2, 3, 4]];
    for (b, subset) in subsets.iter().enumerate() {
        let names: Vec<&str> = subset.iter().map(|&i| cats[i].as_str()).collect();
        let p = Prompt::detection(&names, ". ").unwrap();
        assert_eq!(p.caption, meta["prompts"][b].as_str().unwrap());
        let e = tok.encode(&p.caption).unwrap();
        let ids: Vec<i64> = io["input_ids"].get(b)?.to_vec1()?;
        assert_eq!(
            e.ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            ids[..e.ids.len()].to_vec()
        );
        let labels: Vec<i64> = io[&format!("target{b}.labels")].to_vec1()?;
        let spans: Vec<(usize, usize)> = labels
            .iter()
            .map(|&l| p.spans[subset.iter().position(|&c| c as i64 == l).unwrap()])
            .collect();
        let pm = positive_map(&e.offsets, &spans, t);
        let want: Vec<Vec<f32>> = if labels.is_empty() {
            vec![]
        } else {
            io[&format!("target{b}.positive_map")].to_vec2()?
        };
        assert_eq!(pm, want, "image {b}");
    }
    Ok(())
}

#[test]
fn long_vocabularies_are_chunked_never_truncated() {
    let mut tok = Tokenizer::from_file(&fixture("bert-tiny/tokenizer.json")).unwrap();
    tok.set_max_tokens(32);
    let names: Vec<String> = (0..40).map(|i| format!("thing number {i}")).collect();
    let chunks = chunked_detection_prompts(&tok, &names, ". ").unwrap();
    assert!(chunks.len() > 1);
    let mut seen: Vec<usize> = chunks.iter().flat_map(|c| c.categories.clone()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..40).collect::<Vec<_>>(), "every category in exactly one chunk");
    for c in &chunks {
        assert!(c.encoding.ids.len() <= 32);
        assert_eq!(c.prompt.spans.len(), c.categories.len());
    }
    // A caption over budget is an error, not a silent cut.
    let err = tok.encode(&names.join(" ")).unwrap_err().to_string();
    assert!(err.contains("over the budget of 32"), "{err}");
}

#[test]
fn bad_spans_and_empty_names_are_errors() {
    assert!(Prompt::caption("a cat", vec![(2, 9)])
        .unwrap_err()
        .to_string()
        .contains("outside the caption"));
    assert!(Prompt::caption("a cat", vec![(3, 3)]).is_err());
    assert!(Prompt::detection(&["cat", " "], ". ").unwrap_err().to_string().contains("category 1"));
    // Character (not byte) spans: "é" is one character.
    let p = Prompt::detection(&["café", "dog"], ". ").unwrap();
    assert_eq!(p.spans, vec![(0, 4), (6, 9)]);
}

/// A word is known when the vocabulary has it whole or as real subwords, not when it is
/// spelled letter by letter or read as `[UNK]` (what `glip detect` warns about).
#[test]
fn words_spelled_letter_by_letter_or_unknown_are_not_known() {
    let tok = glip_text::Tokenizer::from_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/shapes-tokenizer.json"
    )))
    .unwrap();
    assert!(tok.knows("red") && tok.knows("circle") && tok.knows("a"));
    assert!(!tok.knows("dog"), "d ##o ##g carries nothing of a dog");
    assert!(!tok.knows("\u{4e2d}"), "[UNK]");
}
