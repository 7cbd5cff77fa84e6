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
