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
