//! The committed bad-input corpus (`tests/bad-inputs/cases.toml`: configs, overrides, command-line
//! arguments, prompts, images, checkpoints, run folders, COCO/ODVG files) through the `glip`
//! binary: every case must exit non-zero with a message naming what is wrong and where (each
//! `expect` string on stderr), and none may panic. Cases marked `ok` are valid inputs that must
//! keep working (and print their `expect` strings, if any). A case's `absent` strings must not be
//! in its output (work that should not have started). `GLIP_CORPUS_SHOW=1` prints every
//! case's message, for reading them all. Cases run with `RUST_BACKTRACE=1`, and no message may
//! carry a backtrace. A refused command changes nothing it was given: the trained run and every
//! broken copy of it are as they were after each bad-input case (files, sizes, modification times).

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Corpus {
    case: Vec<Case>,
    variant: Vec<Variant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    args: Vec<String>,
    #[serde(default)]
    expect: Vec<String>,
    /// Strings the output must not hold (work that should not have started: `step 1: loss`).
    #[serde(default)]
    absent: Vec<String>,
    #[serde(default)]
    ok: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Variant {
    name: String,
    file: String,
    action: String,
    #[serde(default)]
    tensor: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    pointer: Option<String>,
    #[serde(default)]
    value: Option<toml::Value>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-inputs")
}

/// Runs `glip`: the exit code and what it printed (stderr, then stdout: `glip data check` lists
/// the problems it found on stdout).
fn glip(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_glip"))
        .args(args)
        // As in a developer's shell: panics show their frames, error messages stay messages.
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("run glip");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}

/// Files with their sizes and modification times.
type Snapshot = std::collections::BTreeMap<PathBuf, (u64, std::time::SystemTime)>;

/// Every file under `dirs` with its size and modification time: a write, even of the same
/// bytes (an atomic write renames a new file into place), shows.
fn snapshot(dirs: &[&Path]) -> Snapshot {
    fn walk(dir: &Path, into: &mut Snapshot) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let meta = std::fs::metadata(&path).unwrap();
            if meta.is_dir() {
                walk(&path, into);
            } else {
                into.insert(path, (meta.len(), meta.modified().unwrap()));
            }
        }
    }
    let mut files = Snapshot::new();
    for d in dirs {
        walk(d, &mut files);
    }
    files
}

/// `safetensors` bytes with `f` applied to the tensor list (name, dtype, shape, data).
fn rewrite_tensors(
    bytes: &[u8],
    f: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("the run's checkpoint reads");
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    f(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"))
        })
        .collect();
    safetensors::serialize(views, None).expect("serialise")
}

fn find<'a>(
    tensors: &'a mut [(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
    name: &str,
) -> &'a mut (String, safetensors::Dtype, Vec<usize>, Vec<u8>) {
    tensors.iter_mut().find(|t| t.0 == name).unwrap_or_else(|| panic!("no tensor {name}"))
}

/// A copy of `run` with one file broken as `v` says.
fn make_variant(run: &Path, v: &Variant, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for e in std::fs::read_dir(run).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), into.join(e.file_name())).unwrap();
        }
    }
    let path = into.join(&v.file);
    let bytes = std::fs::read(&path).unwrap();
    let tensor = || v.tensor.as_deref().expect("a tensor action names its tensor");
    let new: Option<Vec<u8>> = match v.action.as_str() {
        "truncate" => Some(bytes[..bytes.len() / 2].to_vec()),
        "garbage" => {
            Some((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect())
        }
        "empty" => Some(Vec::new()),
        "remove" => None,
        "text" => Some(v.text.clone().expect("text").into_bytes()),
        "header-lie" => {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
            Some(b)
        }
        "drop-tensor" => Some(rewrite_tensors(&bytes, |ts| ts.retain(|t| t.0 != tensor()))),
        "shape-tensor" => Some(rewrite_tensors(&bytes, |ts| {
            let t = find(ts, tensor());
            t.2 = vec![1];
            t.3 = t.3[..4].to_vec();
        })),
        "int-tensor" => Some(rewrite_tensors(&bytes, |ts| {
            let t = find(ts, tensor());
            t.1 = safetensors::Dtype::I64;
            t.3 = t.3.iter().flat_map(|&b| [b, 0]).collect();
        })),
        "json-set" => {
            let mut j: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let pointer = v.pointer.as_deref().expect("pointer");
            let value = serde_json::to_value(v.value.clone().expect("value")).unwrap();
            *j.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer} in {}", v.file)) = value;
            Some(serde_json::to_vec_pretty(&j).unwrap())
        }
        other => panic!("variant {}: unknown action {other:?}", v.name),
    };
    match new {
        Some(b) => std::fs::write(&path, b).unwrap(),
        None => std::fs::remove_file(&path).unwrap(),
    }
}

#[test]
fn every_bad_input_gets_a_clear_error_and_none_panics() {
    let corpus_path = corpus_dir().join("cases.toml");
    let corpus: Corpus = toml::from_str(&std::fs::read_to_string(&corpus_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", corpus_path.display()));
    let root = std::env::temp_dir().join(format!("glip-bad-inputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let corpus_str = corpus_dir().to_string_lossy().into_owned();
    let tiny = corpus_dir().join("tiny.toml");

    // One trained run (one step) to detect with and to break.
    let run = root.join("run");
    let (code, err) = glip(&[
        "experiment".into(),
        tiny.to_string_lossy().into(),
        "--out".into(),
        run.to_string_lossy().into(),
    ]);
    assert_eq!(code, Some(0), "the corpus's base run failed:\n{err}");
    let mut variants = std::collections::HashMap::new();
    for v in &corpus.variant {
        let dir = root.join("variants").join(&v.name);
        make_variant(&run, v, &dir);
        assert!(variants.insert(v.name.clone(), dir).is_none(), "variant {} twice", v.name);
    }

    let long_phrase = vec!["red"; 2000].join(" ");
    let names = ["red", "green", "blue", "yellow", "purple"];
    let shapes = ["circle", "square", "triangle", "star"];
    let many_phrases = (0..400)
        .map(|i| format!("{} {} {i}", names[i % 5], shapes[(i / 5) % 4]))
        .collect::<Vec<_>>()
        .join(". ");
    let mut failures = Vec::new();
    let (mut bad, mut good) = (0, 0);
    for (i, case) in corpus.case.iter().enumerate() {
        let scratch = root.join(format!("case-{i}"));
        std::fs::create_dir_all(&scratch).unwrap();
        let args: Vec<String> = case
            .args
            .iter()
            .map(|a| {
                let mut a = a
                    .replace("{tiny}", &tiny.to_string_lossy())
                    .replace("{corpus}", &corpus_str)
                    .replace("{scratch}", &scratch.to_string_lossy())
                    .replace("{run}", &run.to_string_lossy())
                    .replace("{long_phrase}", &long_phrase)
                    .replace("{many_phrases}", &many_phrases);
                while let Some(start) = a.find("{variant:") {
                    let end = start + a[start..].find('}').expect("closing brace");
                    let name = &a[start + 9..end];
                    let dir = variants.get(name).unwrap_or_else(|| panic!("no variant {name}"));
                    a.replace_range(start..=end, &dir.to_string_lossy());
                }
                a
            })
            .collect();
        let given = [run.as_path(), &root.join("variants")];
        let before = (!case.ok).then(|| snapshot(&given));
        let (code, err) = glip(&args);
        if std::env::var_os("GLIP_CORPUS_SHOW").is_some() {
            eprintln!("--- {} (exit {code:?})\n{}", case.name, err.trim());
        }
        let mut wrong = Vec::new();
        if err.contains("panicked") || code == Some(101) || code.is_none() {
            wrong.push(format!("panicked or was killed (exit {code:?})"));
        }
        // A backtrace's frames (`  0: candle_core::error::Error::bt`) in an error's message.
        if !err.contains("panicked") && err.lines().any(|l| l.trim_start().starts_with("0: ")) {
            wrong.push("the message carries a backtrace".into());
        }
        for a in &case.absent {
            if err.contains(a.as_str()) {
                wrong.push(format!("output holds {a:?}"));
            }
        }
        if case.ok {
            good += 1;
            if code != Some(0) {
                wrong.push(format!("valid input failed (exit {code:?})"));
            }
            for e in &case.expect {
                if !err.contains(e.as_str()) {
                    wrong.push(format!("output lacks {e:?}"));
                }
            }
        } else {
            bad += 1;
            if code == Some(0) {
                wrong.push("bad input was accepted (exit 0)".into());
            }
            for e in &case.expect {
                if !err.contains(e.as_str()) {
                    wrong.push(format!("message lacks {e:?}"));
                }
            }
            if case.expect.is_empty() {
                wrong.push("a bad-input case must say what its message names".into());
            }
            let after = snapshot(&given);
            let before = before.expect("taken for a bad-input case");
            let files: std::collections::BTreeSet<&PathBuf> =
                before.keys().chain(after.keys()).collect();
            let changed: Vec<String> = files
                .into_iter()
                .filter(|f| before.get(*f) != after.get(*f))
                .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
                .collect();
            if !changed.is_empty() {
                wrong.push(format!("the refused command changed {}", changed.join(", ")));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "case {:?}: {}\n  stderr: {}",
                case.name,
                wrong.join("; "),
                err.trim()
            ));
        }
    }
    eprintln!(
        "bad-input corpus: {bad} bad inputs and {good} valid ones, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&root).ok();
}
