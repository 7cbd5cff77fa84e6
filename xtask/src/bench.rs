//! `cargo xtask bench-vs-torch [--iters N]`: `glip bench` (release build) and
//! `reference/bench_torch.py` (the reference's venv) on the same presets, side by side in one
//! run on this machine's cores, and the table of their ratios. Inference rows also time glip
//! with `--precision bf16` (against PyTorch's f32) where the CPU has AVX512_BF16.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// The rows: (preset, mode, batch, size).
const ROWS: &[(&str, &str, usize, usize)] = &[
    ("seed-r18", "infer", 4, 256),
    ("seed-r18", "train", 4, 256),
    ("seed-r50", "infer", 2, 384),
    ("seed-r50", "train", 2, 384),
    ("seed-r18", "train", 8, 128),
];

/// The last JSON line of a bench's output.
fn json_of(out: &[u8], what: &str) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(out);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{what} printed no JSON"))?;
    Ok(serde_json::from_str(line)?)
}

fn median_of(out: &[u8], what: &str) -> Result<f64> {
    json_of(out, what)?["median_s"].as_f64().with_context(|| format!("{what}: no median_s"))
}

/// `glip bench` with `args`; its output.
fn glip_bench(glip: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(glip).arg("bench").args(args).args(["--device", "cpu"]).output()?;
    if !out.status.success() {
        bail!("glip bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// Runs both sides and prints the table.
pub fn run(iters: usize) -> Result<()> {
    let root = crate::fixtures::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let s = Command::new(&cargo)
        .args(["build", "--release", "-p", "glip-cli", "--bin", "glip"])
        .current_dir(&root)
        .status()?;
    if !s.success() {
        bail!("cargo build --release -p glip-cli failed");
    }
    let target: std::path::PathBuf =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let glip = target.join("release/glip");
    let python = crate::fixtures::python()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "| preset | mode | batch | size | glip s | PyTorch s | glip / PyTorch | glip bf16 s | bf16 / PyTorch f32 |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(preset, mode, batch, size) in ROWS {
        let (b, sz, it) = (batch.to_string(), size.to_string(), iters.to_string());
        let common =
            ["--preset", preset, "--mode", mode, "--batch", &b, "--size", &sz, "--iters", &it];
        let ours = glip_bench(&glip, &common)?;
        // bf16 only where it ran as bf16 (the JSON says what the convolutions computed in).
        let bf16 = if mode == "infer" {
            let out = glip_bench(&glip, &[&common[..], &["--precision", "bf16"]].concat())?;
            let v = json_of(&out.stdout, "glip bench --precision bf16")?;
            (v["precision"] == "bf16").then(|| v["median_s"].as_f64()).flatten()
        } else {
            None
        };
        let theirs = Command::new(&python)
            .arg(root.join("reference/bench_torch.py"))
            .args(common)
            .args(["--threads", &threads.to_string()])
            .output()?;
        if !theirs.status.success() {
            bail!("bench_torch.py failed: {}", String::from_utf8_lossy(&theirs.stderr));
        }
        let (g, t) =
            (median_of(&ours.stdout, "glip bench")?, median_of(&theirs.stdout, "bench_torch.py")?);
        let (bs, br) = match bf16 {
            Some(s) => (format!("{s:.3}"), format!("{:.2}x", s / t)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {preset} | {mode} | {batch} | {size} | {g:.3} | {t:.3} | {:.2}x | {bs} | {br} |",
            g / t
        );
    }
    println!("\nmedians of {iters} iterations after one warm-up, {threads} threads each");
    Ok(())
}
