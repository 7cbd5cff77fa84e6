//! The one inference path and what runs save for it: evaluation and detection give the same
//! boxes for the same image; a BERT loaded from a Hugging Face folder trains and round-trips
//! through checkpoints; weights files missing names are an error; an EMA run evaluates and
//! detects with its EMA weights.

use candle_core::{DType, Device, Tensor};
use glip_core::{ImageBatch, TextBatch};
use glip_train::config::Registry;
use glip_train::experiment::run_experiment;
use glip_train::infer::{shapes_detections, Detector, Grounded, Predictor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[path = "common/tiny_dense.rs"]
mod tiny_dense;
use tiny_dense::config;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glip-infer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn quiet(_: &str) {}

/// The tiny dense model with random weights, its inference spec and its tokenizer.
fn untrained() -> (
    glip_train::run_config::ExperimentConfig,
    glip_train::GlipModel,
    glip_train::infer::InferenceSpec,
    glip_text::Tokenizer,
) {
    let cfg = config(&[]);
    let model = Registry::new()
        .build_trainable(&cfg.model, &candle_nn::VarMap::new(), 0, &Device::Cpu)
        .unwrap();
    let spec = cfg.inference_spec(&model).unwrap();
    let tok = glip_text::Tokenizer::from_file(&cfg.model.tokenizer().unwrap()).unwrap();
    (cfg, model, spec, tok)
}

/// Evaluation (16 images a pass, every category in the prompt) and `detect` on one image give
/// the same boxes, scores and phrases: both go through `Predictor::detect_batch`.
#[test]
fn evaluation_and_detect_give_the_same_boxes_for_the_same_image() {
    let (cfg, model, spec, tok) = untrained();
    let dev = Device::Cpu;
    assert_eq!(spec.post.nms_iou, Some(0.6), "a dense head's NMS");
    let p = Predictor::new(&model, &spec, &tok, &dev);
    let ds = glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val).unwrap();
    let cats = glip_data::Dataset::categories(&ds).to_vec();
    let evaluated: Vec<Vec<Grounded>> =
        shapes_detections(&p, &ds, 5).unwrap().into_iter().map(|(found, _)| found).collect();
    let alone: Vec<Vec<Grounded>> =
        (0..5).map(|k| p.detect(&ds.render(k).0, &cats, &spec.post).unwrap()).collect();
    assert_same_detections(&alone, &evaluated);
}

/// Each image's detections alone and from a batch: the same phrases, scores within 1e-5 and
/// boxes within 1e-3 pixels (a batch and a single image may sum in another order: f32
/// round-off only), and some to compare.
fn assert_same_detections(alone: &[Vec<Grounded>], batched: &[Vec<Grounded>]) {
    assert_eq!(alone.len(), batched.len());
    let mut compared = 0;
    for (k, (alone, batched)) in alone.iter().zip(batched).enumerate() {
        assert_eq!(alone.len(), batched.len(), "image {k}");
        for (a, b) in alone.iter().zip(batched) {
            assert_eq!(a.phrase, b.phrase, "image {k}");
            assert!((a.score - b.score).abs() <= 1e-5, "image {k}: {} vs {}", a.score, b.score);
            for (x, y) in a.bbox.iter().zip(b.bbox) {
                assert!((x - y).abs() <= 1e-3, "image {k}: {:?} vs {:?}", a.bbox, b.bbox);
            }
            compared += 1;
        }
    }
    assert!(compared > 0, "random weights still give boxes at threshold 0");
}

/// A COCO folder's images of two sizes, interleaved, pass in same-size batches
/// (`Predictor::coco_folder_detections`) and each gets what `detect` finds in it alone.
#[test]
fn a_coco_folder_is_detected_in_same_size_batches_as_image_by_image() {
    let (cfg, model, spec, tok) = untrained();
    let dev = Device::Cpu;
    let p = Predictor::new(&model, &spec, &tok, &dev);
    let shapes =
        glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val).unwrap();
    let cats = glip_data::Dataset::categories(&shapes).to_vec();
    let side = cfg.data.shapes.image_size;
    let dir = tmp("coco-batches");
    let mut images = Vec::new();
    let mut records = Vec::new();
    for k in 0..5 {
        let (img, _) = shapes.render(k);
        // Every other image wider: it resizes to another size than the square ones.
        let img = match k % 2 {
            1 => image::imageops::resize(
                &img,
                side * 4 / 3,
                side,
                image::imageops::FilterType::Triangle,
            ),
            _ => img,
        };
        let name = format!("{k}.png");
        img.save(dir.join(&name)).unwrap();
        records.push(serde_json::json!({"id": k + 1, "file_name": name, "width": img.width(), "height": img.height()}));
        images.push(img);
    }
    let categories: Vec<_> =
        cats.iter().enumerate().map(|(i, c)| serde_json::json!({"id": i + 1, "name": c})).collect();
    let gt = dir.join("gt.json");
    let doc = serde_json::json!({"images": records, "annotations": [], "categories": categories});
    std::fs::write(&gt, doc.to_string()).unwrap();
    let ds = glip_data::CocoDataset::open(&gt, &dir, glip_data::ErrorPolicy::Fail).unwrap();
    let mut calls = Vec::new();
    let batched = p.coco_folder_detections(&ds, &spec.post, |i, n| calls.push((i, n))).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(calls, [(5, 5)]);
    let alone: Vec<Vec<Grounded>> =
        images.iter().map(|img| p.detect(img, &cats, &spec.post).unwrap()).collect();
    assert_same_detections(&alone, &batched);
}

fn checkpoint(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("checkpoint.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// A BERT from a Hugging Face folder (the fixtures' bert-tiny) trains with the model and is
/// saved in its checkpoints; the run is served from the checkpoint alone.
#[test]
fn a_folder_bert_trains_and_round_trips_through_the_checkpoint() {
    let folder = glip_testing::fixture("bert-tiny");
    let text = format!(
        "model.text = {{ folder = '{}', tokenizer = '{}' }}",
        folder.display(),
        folder.join("tokenizer.json").display()
    );
    let cfg = config(&[&text]);
    let dir = tmp("folder-bert");
    run_experiment(&cfg, &dir, false, &mut quiet).unwrap();
    let ckpt = checkpoint(&dir);
    let original =
        candle_core::safetensors::load(folder.join("model.safetensors"), &Device::Cpu).unwrap();
    let name = "encoder.layer.0.attention.self.query.weight";
    let trained = ckpt.get(&format!("text.{name}")).expect("the BERT is in the checkpoint");
    let before = original[name].to_dtype(DType::F32).unwrap();
    assert!(max_abs_diff(trained, &before) > 0.0, "the BERT's weights changed");
    assert!(ckpt.contains_key(&format!("optim.m.text.{name}")), "its optimizer state is saved");
    // Served from the checkpoint: every parameter is there; the trained weights are used.
    let det = Detector::load(&dir, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[101u32, 2417, 4418, 102]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 4), DType::U8, &Device::Cpu).unwrap();
    let served = det.model.text.forward(&ids, &mask, false).unwrap().tokens;
    let fresh = glip_text::Bert::from_folder(&folder, &Device::Cpu).unwrap();
    let untrained = glip_core::TextEncoder::forward(&fresh, &ids, &mask, false).unwrap().tokens;
    assert!(max_abs_diff(&served, &untrained) > 0.0, "detect uses the trained BERT");
    std::fs::remove_dir_all(&dir).ok();
}

/// A `weights` file without some of the names under its prefix is an error listing them, unless
/// `allow_missing` names their prefix.
#[test]
fn names_missing_from_a_weights_file_are_an_error_unless_allowed() {
    let dir = tmp("missing");
    let cfg = config(&[]);
    let vm = candle_nn::VarMap::new();
    Registry::new().build_trainable(&cfg.model, &vm, 0, &Device::Cpu).unwrap();
    // The backbone's weights without layer3.
    let backbone: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("backbone.").map(|k| (k.to_string(), v.as_tensor().clone()))
        })
        .filter(|(k, _)| !k.starts_with("layer3."))
        .collect();
    let file = dir.join("backbone.safetensors");
    candle_core::safetensors::save(&backbone, &file).unwrap();
    let mut cfg = cfg.model.clone();
    cfg.weights.insert("backbone".into(), file);
    let e = Registry::new()
        .build_trainable(&cfg, &candle_nn::VarMap::new(), 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    let layer3 =
        vm.data().lock().unwrap().keys().filter(|k| k.starts_with("backbone.layer3.")).count();
    assert!(e.contains(&format!("model.weights: {layer3} parameters")), "{e}");
    assert!(e.contains("backbone.layer3.0.bn1.bias"), "{e}");
    assert!(e.contains("allow_missing"), "{e}");
    cfg.allow_missing = vec!["backbone.layer3.".into()];
    Registry::new().build_trainable(&cfg, &candle_nn::VarMap::new(), 0, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

fn forward_logits(model: &glip_train::GlipModel) -> Tensor {
    let dev = Device::Cpu;
    let v: Vec<f32> = (0..3 * 48 * 48).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let pixels = Tensor::from_vec(v, (1, 3, 48, 48), &dev).unwrap();
    let images = ImageBatch::unpadded(pixels).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 7, 2]], &dev).unwrap();
    let mask = Tensor::ones((1, 4), DType::U8, &dev).unwrap();
    let text = TextBatch::new(ids, mask, vec![vec![(0, 0); 4]], vec![String::new()]).unwrap();
    let out = model.forward(&images, &text, false).unwrap();
    out.pred.pred_logits
}

/// With `optim.ema_decay`, evaluation during training and `detect` use the EMA weights.
#[test]
fn an_ema_run_evaluates_and_detects_with_its_ema_weights() {
    let cfg = config(&["optim.ema_decay = 0.5", "optim.lr = 1e-2"]);
    let dir = tmp("ema");
    let result = run_experiment(&cfg, &dir, false, &mut quiet).unwrap();
    let ckpt = checkpoint(&dir);
    let raw: HashMap<String, Tensor> = ckpt
        .iter()
        .filter(|(k, _)| !k.starts_with("optim."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut ema = raw.clone();
    for (k, v) in &ckpt {
        if let Some(n) = k.strip_prefix("optim.ema.") {
            ema.insert(n.to_string(), v.clone());
        }
    }
    let r = Registry::new();
    let dev = Device::Cpu;
    let raw_model = glip_train::infer::model_from_weights(&r, &cfg.model, raw, &dev).unwrap();
    let ema_model = glip_train::infer::model_from_weights(&r, &cfg.model, ema, &dev).unwrap();
    let det = Detector::load(&dir, &dev).unwrap();
    assert!(det.spec.ema);
    let (served, e, w) =
        (forward_logits(&det.model), forward_logits(&ema_model), forward_logits(&raw_model));
    assert_eq!(max_abs_diff(&served, &e), 0.0, "detect serves the EMA weights");
    assert!(max_abs_diff(&e, &w) > 0.0, "the EMA differs from the last weights");
    // The run's own evaluation is the EMA model's.
    let p = det.predictor();
    let ds = glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val).unwrap();
    let ev = glip_train::infer::evaluate_shapes(&p, &ds, 5, &dir.join("scratch")).unwrap();
    let last = result.last().unwrap();
    assert!(
        (ev.coco.get("AP") - last.val.get("AP")).abs() < 1e-12,
        "{} vs {}",
        ev.coco.get("AP"),
        last.val.get("AP")
    );
    assert_eq!(ev.recall, last.recall);
    std::fs::remove_dir_all(&dir).ok();
}

/// Library callers can hand `detect` what no decoder makes: an image with a side of 0 pixels
/// (it was given boxes), no image at all. Each is an error or an empty answer, never a panic.
#[test]
fn degenerate_images_are_an_error_not_a_panic() {
    let (_, model, spec, tok) = untrained();
    let dev = Device::Cpu;
    let p = Predictor::new(&model, &spec, &tok, &dev);
    let phrases = vec!["red circle".to_string()];
    for (w, h) in [(0, 0), (0, 10), (10, 0)] {
        let img = image::RgbImage::new(w, h);
        let err = p.detect(&img, &phrases, &spec.post).unwrap_err().to_string();
        assert!(err.contains(&format!("{w}x{h}")), "{w}x{h}: {err}");
    }
    assert!(p.detect_batch(&[], &phrases, &spec.post).unwrap().is_empty());
    // The smallest real image is served.
    let one = image::RgbImage::new(1, 1);
    assert!(p.detect(&one, &phrases, &spec.post).is_ok());
}

/// A loaded detector can move to, and be shared between, threads (a server's workers); a
/// `GraphCache` of CUDA graphs is kept beside it by the thread that uses it.
#[test]
fn a_detector_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Detector>();
}

/// A caption is grounded as a detection prompt is when it is one: `ground_batch` on the
/// detection prompt's caption and spans gives what `detect_batch` gives for its phrases (the
/// same pass), and a phrase given as two spans covering the same tokens as one span gives the
/// same boxes and scores.
#[test]
fn a_caption_grounds_its_phrases_as_the_same_detection_prompt_does() {
    let (cfg, model, spec, tok) = untrained();
    let dev = Device::Cpu;
    let p = Predictor::new(&model, &spec, &tok, &dev);
    let ds = glip_data::ShapesDataset::new(cfg.data.shapes.clone(), glip_data::Split::Val).unwrap();
    let images: Vec<image::RgbImage> = (0..3).map(|k| ds.render(k).0).collect();
    let names = vec!["red circle".to_string(), "blue square".to_string()];
    let prompt = glip_core::prompt::Prompt::detection(&names, ". ").unwrap();
    let spans: Vec<Vec<(usize, usize)>> = prompt.spans.iter().map(|&s| vec![s]).collect();
    let grounded = p.ground_batch(&images, &prompt.caption, &spans, &spec.post).unwrap();
    let detected = p.detect_batch(&images, &names, &spec.post).unwrap();
    assert_same_detections(&detected, &grounded);
    // "red circle" as the spans of "red" and "circle": the same tokens, the same phrase.
    let split = vec![vec![(0, 3), (4, 10)], spans[1].clone()];
    let regrounded = p.ground_batch(&images, &prompt.caption, &split, &spec.post).unwrap();
    assert_same_detections(&grounded, &regrounded);
}

/// What cannot be grounded is an error that says why: caption grounding evaluated on a
/// fixed-class run, no phrase, a span outside the caption, a phrase of spaces only (it covers no
/// token), a caption over the token budget (captions are never truncated, which would cut
/// phrases off).
#[test]
fn captions_that_cannot_be_grounded_are_errors() {
    let (_, model, spec, tok) = untrained();
    let dev = Device::Cpu;
    let p = Predictor::new(&model, &spec, &tok, &dev);
    let img = vec![image::RgbImage::new(32, 32)];
    let caption = "a red circle";
    let long = "red ".repeat(tok.max_tokens() + 1);
    // A fixed-class head's run labels boxes with classes: caption grounding refuses it.
    let class_spec =
        glip_train::infer::InferenceSpec { class_names: vec!["red circle".into()], ..spec.clone() };
    let with_classes = Predictor::new(&model, &class_spec, &tok, &dev);
    let e = with_classes
        .evaluate_grounding(Path::new("val.jsonl"), Path::new("."), &spec.post, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a token head"), "{e}");
    for (caption, spans, want) in [
        (caption, vec![], "at least one phrase"),
        (caption, vec![vec![(2, 40)]], "outside the caption"),
        (caption, vec![vec![(5, 6)]], "covers no token"),
        (long.as_str(), vec![vec![(0, 3)]], "over the budget"),
    ] {
        let e = p.ground_batch(&img, caption, &spans, &spec.post).unwrap_err().to_string();
        assert!(e.contains(want), "{spans:?}: {e}");
    }
}

/// The phrases of a grounding record: regions with the same spans (in any order) are one
/// phrase with all their boxes, in order of first appearance.
#[test]
fn regions_with_the_same_spans_are_one_phrase() {
    let b = |x: f32| [x, 0.0, x + 1.0, 1.0];
    let regions = vec![
        (b(0.0), vec![(0, 3)]),
        (b(1.0), vec![(4, 7), (9, 12)]),
        (b(2.0), vec![(0, 3)]),
        (b(3.0), vec![(9, 12), (4, 7)]),
    ];
    let phrases = glip_train::infer::record_phrases(&regions);
    assert_eq!(
        phrases,
        vec![(vec![(0, 3)], vec![b(0.0), b(2.0)]), (vec![(4, 7), (9, 12)], vec![b(1.0), b(3.0)])]
    );
}
