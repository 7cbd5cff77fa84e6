//! Random `--set` overrides on a valid config: keys drawn from its resolved config (every leaf and
//! every table), values of wrong types, zeros, negatives, huge numbers, NaN and infinities. Each
//! case reads the config, checks it, and when it passes builds the model and trains one step
//! (with its evaluation): either it works or it returns an error, never a panic.
//!
//! In process, through the same calls `glip experiment` makes (`apply_overrides`,
//! `config_from_table`, `ExperimentConfig::check`, `run_experiment_with`); the case count is
//! bounded (`PROPTEST_CASES`, default 128) so that CI stays fast; `GLIP_FUZZ_SHOW=1` prints each
//! case's override before it runs.

use glip_train::config::Registry;
use glip_train::experiment::{
    apply_overrides, config_from_table, resolve_paths, run_experiment_with,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Values as `--set` reads them (TOML value syntax).
const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "7",
    "1099511627776",
    "9223372036854775807",
    "-9223372036854775808",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "-0.5",
    "1e30",
    "\"text\"",
    "\"\"",
    "true",
    "[]",
    "[0]",
    "[1, 2]",
    "{}",
    "{type=\"nope\"}",
    "{type=\"dense\"}",
];

/// Values near `v` of its own type: zero, negated, doubled, ten times (a thousand for a float),
/// one more, emptied. Sizes far out of range are the generic values' part.
fn mutations(v: &toml::Value) -> Vec<String> {
    use toml::Value as V;
    match v {
        V::Integer(n) => vec![0, -n, n * 2, n.saturating_mul(10), n + 1, n - 1]
            .into_iter()
            .map(|x| x.to_string())
            .collect(),
        V::Float(x) => [0.0, -x, x * 2.0, x * 1000.0, x + 1.0, f64::NAN]
            .iter()
            .map(|f| V::Float(*f).to_string())
            .collect(),
        V::Boolean(b) => vec![(!b).to_string()],
        V::String(s) => vec!["\"\"".into(), V::String(format!("{s}x")).to_string()],
        V::Array(a) => {
            let mut out = vec!["[]".to_string()];
            if let Some(first) = a.first() {
                let twice = V::Array(vec![first.clone(), first.clone()]);
                out.push(twice.to_string());
                out.extend(mutations(first).into_iter().map(|m| format!("[{m}]")));
            }
            out
        }
        V::Table(_) => vec!["{}".into()],
        V::Datetime(_) => vec![],
    }
}

/// Every key path of a TOML table: the tables themselves and their leaves.
fn key_paths(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if let toml::Value::Table(inner) = v {
            key_paths(inner, &key, out);
        }
        out.push(key);
    }
}

#[test]
fn random_overrides_build_and_train_or_fail_cleanly() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-inputs");
    let base_path = corpus.join("tiny.toml");
    let base: toml::Table = toml::from_str(&std::fs::read_to_string(&base_path).unwrap()).unwrap();
    let registry = Registry::new();
    // The keys of the resolved config: every default written out, as config.resolved.toml has.
    let mut resolved = config_from_table(base.clone()).unwrap();
    resolve_paths(&mut resolved, &corpus);
    resolved.check(&registry).unwrap();
    let resolved: toml::Table = toml::Table::try_from(&resolved).unwrap();
    let mut keys = Vec::new();
    key_paths(&resolved, "", &mut keys);
    keys.extend(["post.top_k", "post.score_threshold", "post.nms_iou"].map(String::from));
    assert!(keys.len() > 60, "only {} keys in the resolved config", keys.len());
    // For each key: the generic values, then values near its resolved one.
    let lookup = |key: &str| {
        let mut v = Some(&resolved);
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts.split_last().unwrap();
        for p in tables {
            v = v.and_then(|t| t.get(*p)).and_then(toml::Value::as_table);
        }
        v.and_then(|t| t.get(*last)).cloned()
    };
    let values: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let mut vs: Vec<String> = VALUES.iter().map(|v| v.to_string()).collect();
            vs.extend(lookup(k).map(|v| mutations(&v)).unwrap_or_default());
            vs
        })
        .collect();

    let show = std::env::var_os("GLIP_FUZZ_SHOW").is_some();
    let root = std::env::temp_dir().join(format!("glip-override-fuzz-{}", std::process::id()));
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128);
    let mut runner =
        TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let (read_err, check_err, trained, run_err) =
        (Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0));
    let n = Cell::new(0);
    // Half the draws from the generic values, half from the key's own neighbourhood.
    let strategy = (0..keys.len(), any::<bool>(), any::<prop::sample::Index>());
    let result = runner.run(&strategy, |(k, near, i)| {
        let vs = &values[k];
        let v = if near && vs.len() > VALUES.len() {
            &vs[VALUES.len() + i.index(vs.len() - VALUES.len())]
        } else {
            &vs[i.index(VALUES.len())]
        };
        let set = format!("{}={v}", keys[k]);
        if show {
            eprintln!("case {}: --set {set}", n.get());
        }
        let dir = root.join(format!("case-{}", n.get()));
        n.set(n.get() + 1);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut doc = base.clone();
            if apply_overrides(&mut doc, std::slice::from_ref(&set)).is_err() {
                return read_err.set(read_err.get() + 1);
            }
            let Ok(mut cfg) = config_from_table(doc) else {
                return read_err.set(read_err.get() + 1);
            };
            resolve_paths(&mut cfg, &corpus);
            if cfg.check(&registry).is_err() {
                return check_err.set(check_err.get() + 1);
            }
            // One step whatever the override said of the loop's length.
            cfg.run.train.steps = 1;
            let mut quiet = |_: &str| {};
            match run_experiment_with(&registry, &cfg, &dir, false, &mut quiet) {
                Ok(_) => trained.set(trained.get() + 1),
                Err(e) => {
                    if show {
                        eprintln!("  stopped: {e}");
                    }
                    run_err.set(run_err.get() + 1)
                }
            }
        }));
        let _ = std::fs::remove_dir_all(&dir);
        prop_assert!(outcome.is_ok(), "--set {set} panicked");
        Ok(())
    });
    eprintln!(
        "override fuzz: {} cases over {} keys, {} generic values and {} near the keys' own: {} \
         unreadable, {} rejected by the check, {} built and trained a step, {} stopped with an \
         error in the run",
        n.get(),
        keys.len(),
        VALUES.len(),
        values.iter().map(|v| v.len() - VALUES.len()).sum::<usize>(),
        read_err.get(),
        check_err.get(),
        trained.get(),
        run_err.get()
    );
    std::fs::remove_dir_all(&root).ok();
    result.unwrap();
}
