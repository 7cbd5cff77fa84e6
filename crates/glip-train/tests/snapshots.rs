//! Snapshots of the resolved config of every shipped config: what a run writes to
//! `config.resolved.toml` (every slot's type and every default filled in), so that a change of a
//! default or of a config's meaning shows up in review. Paths are left as the configs write
//! them (relative), so the snapshots are the same on every machine. Update with
//! `INSTA_UPDATE=always cargo test -p glip-train --test snapshots` and review the diff.

use glip_train::config::Registry;
use glip_train::experiment::{load_config, resolve_paths};
use std::path::Path;

#[test]
fn resolved_configs_of_the_shipped_configs() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"));
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    for path in names {
        let cfg = load_config(&path).unwrap_or_else(|e| panic!("{e}"));
        // Checked with its paths resolved (the files it names must exist), as a run does;
        // the snapshot keeps them as written. The check fills in registered components'
        // defaults only, and the shipped configs use built-ins.
        let mut checked = cfg.clone();
        resolve_paths(&mut checked, dir);
        checked.check(&Registry::new()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        insta::assert_snapshot!(format!("resolved-{stem}"), toml::to_string(&cfg).unwrap());
    }
}
