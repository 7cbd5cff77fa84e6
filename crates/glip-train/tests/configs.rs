//! Every config shipped in `configs/` parses (unknown keys are errors) and names files that
//! exist.

use glip_train::experiment::{load_config, resolve_paths};
use std::path::Path;

#[test]
fn shipped_configs_parse_and_their_files_exist() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"));
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let mut cfg = load_config(&p).unwrap_or_else(|e| panic!("{e}"));
        resolve_paths(&mut cfg, dir);
        let tok = cfg.model.tokenizer().expect("a tokenizer");
        assert!(tok.exists(), "{}: tokenizer {} missing", p.display(), tok.display());
        n += 1;
    }
    assert!(n >= 2);
}

/// A relative path resolves against the folder it was written in: the config's own paths
/// against the config's folder, an override's against the folder that comes with it (the
/// working directory for a command line's `--set`, an ablation file's folder for its `set`),
/// the last override of the path or of a table above it deciding; absolute paths stay.
#[test]
fn paths_resolve_against_the_folder_they_were_written_in() {
    use glip_train::experiment::{apply_overrides, config_from_table, resolve_paths_set};
    let configs =
        std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs")).unwrap();
    let tmp = std::env::temp_dir().join(format!("glip-paths-{}", std::process::id()));
    let (cli, ablation) = (tmp.join("cli"), tmp.join("ablation"));
    std::fs::create_dir_all(&cli).unwrap();
    std::fs::create_dir_all(&ablation).unwrap();
    let (cli, ablation) =
        (std::fs::canonicalize(&cli).unwrap(), std::fs::canonicalize(&ablation).unwrap());
    let sets: Vec<(String, std::path::PathBuf)> = [
        (r#"model.weights={backbone="b.safetensors", text="old.safetensors"}"#, &ablation),
        (r#"model.weights.text="t.safetensors""#, &cli),
        (r#"model.weights.fusion="/abs/f.safetensors""#, &cli),
        (r#"data.val_grounding={odvg="g.json", images="imgs"}"#, &ablation),
        ("run.steps=3", &cli),
    ]
    .into_iter()
    .map(|(s, d)| (s.to_string(), d.clone()))
    .collect();
    let path = configs.join("shapes.toml");
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    apply_overrides(&mut doc, &sets.iter().map(|s| s.0.clone()).collect::<Vec<_>>()).unwrap();
    let mut cfg = config_from_table(doc).unwrap();
    resolve_paths_set(&mut cfg, path.parent().unwrap(), &sets);
    std::fs::remove_dir_all(&tmp).ok();
    assert_eq!(cfg.model.tokenizer().unwrap(), configs.join("shapes-tokenizer.json"));
    let w = &cfg.model.weights;
    assert_eq!(w["backbone"], ablation.join("b.safetensors"));
    assert_eq!(w["text"], cli.join("t.safetensors"));
    assert_eq!(w["fusion"], std::path::Path::new("/abs/f.safetensors"));
    let g = cfg.data.val_grounding.as_ref().unwrap();
    assert_eq!((&g.odvg, &g.images), (&ablation.join("g.json"), &ablation.join("imgs")));
}

/// A config that names a `base` is its base with the file's values over it: values replace,
/// tables merge key by key, a component table of another `type` replaces the base's whole, a
/// chain of bases merges in order; each relative path resolves against the folder of the file
/// that wrote it (an absolute `base` keeps its paths absolute).
#[test]
fn a_config_is_its_base_with_its_own_values_over_it() {
    use glip_train::experiment::{config_from_table, read_config_doc, resolve_paths_set};
    let configs =
        std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs")).unwrap();
    let tmp = std::env::temp_dir().join(format!("glip-base-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("sub")).unwrap();
    let tmp = std::fs::canonicalize(&tmp).unwrap();
    let write = |name: &str, text: &str| std::fs::write(tmp.join(name), text).unwrap();
    let shapes = configs.join("shapes.toml");
    write(
        "mid.toml",
        &format!(
            "base = {:?}\nname = \"mid\"\n[model.detector]\ntower = 2\n[data.coco]\n\
             train_annotations = \"ann/train.json\"\ntrain_images = \"img\"\n\
             val_annotations = \"ann/val.json\"\nval_images = \"img\"\n[run]\nsteps = 7\n",
            shapes.display()
        ),
    );
    write(
        "sub/leaf.toml",
        "base = \"../mid.toml\"\n[model]\nfeature_levels = [2]\n[model.detector]\n\
         centerness = true\n[model.fusion]\ntype = \"none\"\n[data.coco]\nval_images = \"v\"\n",
    );
    let leaf = tmp.join("sub/leaf.toml");
    let merged = glip_train::experiment::load_config(&leaf).unwrap_or_else(|e| panic!("{e}"));

    // The same config written out by hand in one document.
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&shapes).unwrap()).unwrap();
    glip_train::experiment::apply_overrides(
        &mut doc,
        &[
            "name=\"mid\"",
            "model.detector.tower=2",
            "run.steps=7",
            "model.feature_levels=[2]",
            "model.detector.centerness=true",
            "model.fusion={type=\"none\"}",
            "model.text.tokenizer=\"shapes-tokenizer.json\"",
        ]
        .map(String::from),
    )
    .unwrap();
    let mut by_hand = config_from_table(doc).unwrap();
    by_hand.data.coco = merged.data.coco.clone();
    by_hand.model.text = merged.model.text.clone();
    assert_eq!(toml::to_string(&merged).unwrap(), toml::to_string(&by_hand).unwrap());
    assert_eq!(merged.model.tokenizer().unwrap(), configs.join("shapes-tokenizer.json"));
    // `load_config` keeps the file's own paths as written and a base's relative to the file.
    let c = merged.data.coco.as_ref().unwrap();
    let up = std::path::Path::new("..");
    assert_eq!(c.train_annotations, up.join("ann/train.json"));
    assert_eq!((&c.train_images, &c.val_images), (&up.join("img"), &"v".into()));

    // What the command line resolves: every path absolute, against its own file's folder.
    let read = read_config_doc(&leaf).unwrap();
    let mut cfg = read.to_config(&leaf).unwrap();
    resolve_paths_set(&mut cfg, leaf.parent().unwrap(), &read.origins());
    let c = cfg.data.coco.as_ref().unwrap();
    assert_eq!(c.train_annotations, tmp.join("ann/train.json"));
    assert_eq!((&c.train_images, &c.val_images), (&tmp.join("img"), &tmp.join("sub/v")));
    assert_eq!(read.file_of("model.detector.centerness"), Some(leaf.as_path()));
    assert_eq!(read.file_of("run.steps"), Some(tmp.join("sub/../mid.toml").as_path()));

    // A component of another type replaces the base's table: the dense head's `tower` would not
    // fit query selection.
    write("qs.toml", "base = \"mid.toml\"\n[model.detector]\ntype = \"query-selection\"\n");
    let qs = glip_train::experiment::load_config(&tmp.join("qs.toml"));
    std::fs::remove_dir_all(&tmp).ok();
    let detector = toml::to_string(&qs.unwrap_or_else(|e| panic!("{e}")).model).unwrap();
    assert!(detector.contains("type = \"query-selection\""), "{detector}");
    assert!(!detector.contains("tower"), "{detector}");
}

/// A base that is missing, not a path, loops or nests too deep, and a bad key in a base, are
/// errors naming the file.
#[test]
fn bad_bases_are_errors_naming_the_file() {
    use glip_train::experiment::{load_config, MAX_BASE_DEPTH};
    let tmp = std::env::temp_dir().join(format!("glip-bad-base-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let write = |name: &str, text: &str| std::fs::write(tmp.join(name), text).unwrap();
    let err = |name: &str| match load_config(&tmp.join(name)) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    };
    let shapes = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/shapes.toml");
    write("missing.toml", "base = \"nope.toml\"\n");
    write("number.toml", "base = 3\n");
    write("a.toml", "base = \"b.toml\"\n");
    write("b.toml", "base = \"a.toml\"\n");
    write("bad.toml", &format!("base = {shapes:?}\n[optim]\nlrr = 1\n"));
    write("child.toml", "base = \"bad.toml\"\nname = \"c\"\n");
    // d1 -> d2 -> ... -> dMAX -> shapes.toml: d2's chain holds MAX files, d1's one more.
    for i in 1..MAX_BASE_DEPTH {
        write(&format!("d{i}.toml"), &format!("base = \"d{}.toml\"\n", i + 1));
    }
    write(&format!("d{MAX_BASE_DEPTH}.toml"), &format!("base = {shapes:?}\n"));
    let errors = [
        err("missing.toml"),
        err("number.toml"),
        err("a.toml"),
        err("child.toml"),
        err("d1.toml"),
        load_config(&tmp.join("d2.toml")).map(|_| String::new()).unwrap_or_else(|e| e.to_string()),
    ];
    std::fs::remove_dir_all(&tmp).ok();
    let [missing, number, looped, bad, deep, shallow] = errors;
    assert!(
        missing.contains("missing.toml: base = \"nope.toml\"") && missing.contains("nope.toml:"),
        "{missing}"
    );
    assert!(number.contains("number.toml: base: must be the path of a config file"), "{number}");
    assert!(
        looped.contains("a.toml -> ") && looped.contains("b.toml -> ") && looped.contains("loops"),
        "{looped}"
    );
    assert!(bad.contains("bad.toml: optim.lrr: unknown field"), "{bad}");
    assert!(deep.contains(&format!("more than {MAX_BASE_DEPTH} config files")), "{deep}");
    assert_eq!(shallow, "", "a chain of {MAX_BASE_DEPTH} files is allowed");
}
