//! The whole-config check: every shipped config passes it, a broken one reports every rule with
//! its key, and the memory floor never counts more parameters than the built model has.

use glip_train::config::Registry;
use glip_train::experiment::{apply_overrides, config_from_table, load_config, resolve_paths};
use glip_train::run_config::ExperimentConfig;
use glip_train::validate::{available_memory, validate, MemoryFloor};
use std::path::{Path, PathBuf};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

/// `configs/shapes.toml` (the default experiment) with overrides.
fn shapes(sets: &[&str]) -> ExperimentConfig {
    let path = configs_dir().join("shapes.toml");
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    apply_overrides(&mut doc, &sets).unwrap();
    let mut cfg = config_from_table(doc).unwrap();
    resolve_paths(&mut cfg, &configs_dir());
    cfg
}

#[test]
fn the_shipped_configs_pass() {
    for e in std::fs::read_dir(configs_dir()).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let mut cfg = load_config(&path).unwrap();
        resolve_paths(&mut cfg, &configs_dir());
        cfg.check(&Registry::new()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn every_broken_rule_is_reported_with_its_key() {
    let cfg = shapes(&[
        "data.batch_size=0",
        "model.transformer.nhead=3",
        "model.feature_levels=[1, 5]",
        "optim.betas=[0.9, 1.5]",
        "data.shapes.val_images=0",
    ]);
    let problems = validate(&cfg).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "model.feature_levels",
            "model.transformer.nhead",
            "data.batch_size",
            "data.shapes.val_images",
            "optim.betas[1]"
        ],
        "{problems}"
    );
    // Level 5 of a 3-stage ResNet: the rule says how many there are.
    assert!(problems[0].to_string().contains("which has 3 (0 to 2)"), "{problems}");
    // The registry's own check (unknown types) joins the list.
    let mut cfg = shapes(&["data.batch_size=0", "model.detector={type=\"nope\"}"]);
    let err = cfg.check(&Registry::new()).unwrap_err().to_string();
    assert!(err.contains("2 problems") && err.contains("unknown type \"nope\""), "{err}");
}

#[test]
fn odvg_data_is_checked_before_anything_runs() {
    let d = std::env::temp_dir().join(format!("glip-validate-odvg-{}", std::process::id()));
    std::fs::create_dir_all(d.join("images")).unwrap();
    for f in ["train.jsonl", "val.json", "labels.json"] {
        std::fs::write(d.join(f), "").unwrap();
    }
    let odvg = |extra: &str| {
        format!(
            "data.odvg={{train=\"{0}/train.jsonl\",train_images=\"{0}/images\",val_annotations=\"{0}/val.json\",val_images=\"{0}/images\"{extra}}}",
            d.display()
        )
    };
    // Files that exist: no problem, and the synthetic task's own rules no longer apply.
    let ok = shapes(&[&odvg(""), "data.shapes.val_images=0"]);
    let ok_lm = shapes(&[&odvg(&format!(",label_map=\"{}/labels.json\"", d.display()))]);
    let missing = shapes(&[
        &odvg(",label_map=\"nope.json\""),
        "model.head={type=\"class\", num_classes=20}",
        "model.detector={type=\"decoder\"}",
    ]);
    let both = shapes(&[
        &odvg(""),
        "data.coco={train_annotations=\"a\",train_images=\"b\",val_annotations=\"c\",val_images=\"d\"}",
    ]);
    let (ok, ok_lm, missing, both) =
        (validate(&ok), validate(&ok_lm), validate(&missing), validate(&both));
    let mut gone = shapes(&[&odvg("")]);
    std::fs::remove_dir_all(&d).unwrap();
    assert!(ok.is_ok() && ok_lm.is_ok(), "{ok:?} {ok_lm:?}");
    let problems = missing.unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["data.odvg.label_map", "model.head"], "{problems}");
    assert!(problems[1].rule.contains("use the token head"), "{problems}");
    let problems = both.unwrap_err();
    assert_eq!(problems.iter().next().map(|p| p.key.as_str()), Some("data.odvg"), "{problems}");
    assert!(problems.to_string().contains("data.coco or on data.odvg, not both"), "{problems}");
    // Every file of the section, named by its key.
    gone.data.odvg.as_mut().unwrap().label_map = Some(d.join("labels.json"));
    let problems = validate(&gone).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "data.odvg.train",
            "data.odvg.train_images",
            "data.odvg.label_map",
            "data.odvg.val_annotations",
            "data.odvg.val_images"
        ],
        "{problems}"
    );
}

#[test]
fn the_memory_floor_never_counts_more_parameters_than_the_model_has() {
    for sets in [
        &[][..],
        &["model.detector={type=\"decoder\"}", "model.query_generator={type=\"learned\"}"],
        &["model.detector={type=\"query-selection\"}", "model.fusion={type=\"none\"}"],
        &["model.backbone.depth=50", "model.backbone.stages=4", "model.feature_levels=[2, 3]"],
        &["model.text.intermediate=512", "model.transformer.dim_feedforward=1024"],
        &[
            "model.transformer.encoder_attention=\"deformable\"",
            "model.transformer.encoder_points=1",
        ],
        &[
            "model.transformer.num_encoder_layers=0",
            "model.fusion={type=\"feature-enhancer\", layers=3, heads=4, text_feedforward=7}",
        ],
        &[
            "model.transformer.encoder_attention=\"deformable\"",
            "model.fusion={type=\"feature-enhancer\", heads=4, embed=32}",
        ],
    ] {
        let cfg = shapes(sets);
        let varmap = candle_nn::VarMap::new();
        Registry::new().build_trainable(&cfg.model, &varmap, 0, &candle_core::Device::Cpu).unwrap();
        let built: usize = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| !glip_train::trainer::is_buffer(n))
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum();
        let floor = MemoryFloor::of(&cfg);
        assert!(
            floor.parameters as usize <= built,
            "{sets:?}: floor {} > built {built}",
            floor.parameters
        );
        // The backbone alone is counted exactly, so the floor is not vacuous.
        assert!(floor.parameters > 2_700_000, "{sets:?}: floor {}", floor.parameters);
        assert_eq!(floor.state_bytes, floor.parameters as f64 * 16.0, "{sets:?}");
    }
}

#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_anything_is_built() {
    // One encoder layer of width 65,536 (the largest width allowed): 4 d^2 = 1.7e10 weights,
    // 275 GB with gradients and Adam's moments.
    let cfg = shapes(&[
        "model.transformer.d_model=65536",
        "model.transformer.nhead=1",
        "model.transformer.num_encoder_layers=1",
        "model.fusion={type=\"none\"}",
        "run.device=\"cpu\"",
    ]);
    let floor = MemoryFloor::of(&cfg);
    assert!(floor.state_bytes > 2.7e11, "{floor:?}");
    match available_memory() {
        Some(avail) if avail < floor.bytes() => {
            let problems = validate(&cfg).unwrap_err();
            let msg = problems.to_string();
            assert!(
                msg.contains("model: this run needs at least") && msg.contains("GiB available"),
                "{msg}"
            );
        }
        other => eprintln!("SKIP: this machine has {other:?} bytes available, the run would fit"),
    }
    // A batch of 4096 images of 8192 pixels: 3.3 TB of input alone.
    let cfg = shapes(&[
        "data.batch_size=4096",
        "data.shapes.train_images=4096",
        "data.shapes.image_size=8192",
        "run.device=\"cpu\"",
    ]);
    let floor = MemoryFloor::of(&cfg);
    assert!(floor.activation_bytes > 3.2e12, "{floor:?}");
    if available_memory().is_some_and(|a| a < floor.bytes()) {
        let msg = validate(&cfg).unwrap_err().to_string();
        assert!(
            msg.contains("data.batch_size = 4096") && msg.contains("lower the batch size"),
            "{msg}"
        );
    }
}

/// The encoder's attention in the memory floor: a global one keeps a (tokens x tokens) score
/// matrix per head and layer, a deformable one (in the encoder or in a feature enhancer's image
/// layers) a few numbers per token, so a deformable encoder at real image sizes is not refused
/// for memory it would never use. Batch 8 of 1024 px images, C3 and C4: 20,480 tokens.
#[test]
fn the_memory_floor_counts_score_matrices_of_global_attention_only() {
    let big = ["data.shapes.image_size=1024", "data.batch_size=8"];
    let floor = |extra: &[&str]| MemoryFloor::of(&shapes(&[&big[..], extra].concat()));
    let (tokens, heads, layers, batch) = (20_480.0f64, 4.0, 2.0, 8.0);
    let scores = 4.0 * batch * layers * heads * tokens * tokens;
    let global = floor(&[]);
    assert!(global.activation_bytes >= scores, "{global:?} against {scores:e} bytes of scores");
    let deformable = floor(&["model.transformer.encoder_attention=\"deformable\""]);
    assert!(deformable.activation_bytes < scores / 100.0, "{deformable:?}");
    // A feature enhancer's image layers are encoder layers: global ones are counted, deformable
    // ones are not.
    let enhancer = "model.fusion={type=\"feature-enhancer\", layers=2, heads=4}";
    let g = floor(&["model.transformer.num_encoder_layers=0", enhancer]);
    assert!(g.activation_bytes >= scores, "{g:?}");
    let d = floor(&[
        "model.transformer.num_encoder_layers=0",
        "model.transformer.encoder_attention=\"deformable\"",
        enhancer,
    ]);
    assert!(d.activation_bytes < scores / 100.0, "{d:?}");
}
