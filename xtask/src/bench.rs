//! `cargo xtask bench-vs-torch [--iters N] [--rounds R] [--cuda [--compute-cap N] [--toolkit
//! T]]`: `glip bench` (release build) and `reference/bench_torch.py` (the reference's venv) on
//! the same presets, side by side in one run on this machine's cores, and the table of their
//! ratios.
//! Every row also times glip with `--precision bf16` (against PyTorch's f32) where the CPU has
//! AVX512_BF16 (training rows too: a convolution's gradients are bf16 products there). With
//! `--cuda`, the same on the GPU: glip built as `cargo xtask experiment --cuda` builds it, the
//! presets of issue 13's targets, PyTorch on the same GPU.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// A row: (preset, mode, batch, size).
type Row = (&'static str, &'static str, usize, usize);

/// The CPU's rows.
const ROWS: &[Row] = &[
    ("seed-r18", "infer", 4, 256),
    ("seed-r18", "train", 4, 256),
    ("seed-r50", "infer", 2, 384),
    ("seed-r50", "train", 2, 384),
    ("seed-r18", "train", 8, 128),
];

/// The GPU's rows: issue 13's targets (PyTorch on the H200: seed-r50 b8 @512 0.031 s inference,
/// 0.083 s a training step; seed-r18 b32 @256 0.0115 s and 0.081 s; seed-r18 b8 @128 0.060 s).
const GPU_ROWS: &[Row] = &[
    ("seed-r50", "infer", 8, 512),
    ("seed-r50", "train", 8, 512),
    ("seed-r18", "infer", 32, 256),
    ("seed-r18", "train", 32, 256),
    ("seed-r18", "train", 8, 128),
];

/// Where both sides compute: `cpu`, or `cuda` with the toolkit's variables glip runs with.
struct Target<'a> {
    device: &'static str,
    env: &'a [crate::cuda::EnvVar],
}

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

/// The `glip bench` command with `args` on `at`.
fn bench_command(glip: &std::path::Path, at: &Target<'_>, args: &[&str]) -> Command {
    let mut cmd = Command::new(glip);
    cmd.arg("bench").args(args).args(["--device", at.device]);
    crate::experiment::set_env(&mut cmd, at.env);
    cmd
}

/// `glip bench` with `args` on `at`; its output.
fn glip_bench(
    glip: &std::path::Path,
    at: &Target<'_>,
    args: &[&str],
) -> Result<std::process::Output> {
    let out = bench_command(glip, at, args).output()?;
    if !out.status.success() {
        bail!("glip bench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

/// The median of `v` (not empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One row's medians in one round: glip f32, glip bf16 (where it ran as bf16), PyTorch.
fn one_round(
    glip: &std::path::Path,
    python: &std::path::Path,
    root: &std::path::Path,
    at: &Target<'_>,
    (preset, mode, batch, size): Row,
    iters: usize,
    threads: usize,
) -> Result<(f64, Option<f64>, f64)> {
    let (b, sz, it) = (batch.to_string(), size.to_string(), iters.to_string());
    let common = ["--preset", preset, "--mode", mode, "--batch", &b, "--size", &sz, "--iters", &it];
    let ours = glip_bench(glip, at, &common)?;
    // bf16 only where it ran as bf16 (the JSON says what the convolutions computed in).
    let out = glip_bench(glip, at, &[&common[..], &["--precision", "bf16"]].concat())?;
    let v = json_of(&out.stdout, "glip bench --precision bf16")?;
    let bf16 = (v["precision"] == "bf16").then(|| v["median_s"].as_f64()).flatten();
    let theirs = Command::new(python)
        .arg(root.join("reference/bench_torch.py"))
        .args(common)
        .args(["--threads", &threads.to_string(), "--device", at.device])
        .output()?;
    if !theirs.status.success() {
        bail!("bench_torch.py failed: {}", String::from_utf8_lossy(&theirs.stderr));
    }
    Ok((median_of(&ours.stdout, "glip bench")?, bf16, median_of(&theirs.stdout, "bench_torch.py")?))
}

/// Runs both sides, `rounds` times over all rows, and prints the table (medians over the
/// rounds; with several rounds, each round's f32 ratio too).
pub fn run(iters: usize, rounds: usize, gpu: &crate::experiment::CudaBuild) -> Result<()> {
    if rounds == 0 || iters == 0 {
        bail!("--iters and --rounds must be at least 1");
    }
    let root = crate::fixtures::workspace_root();
    let env = gpu.environment()?;
    let glip = crate::experiment::build(&root, "glip", env.as_ref())?;
    let (cuda, env) = (env.is_some(), env.map(|e| e.vars).unwrap_or_default());
    let python = crate::fixtures::python()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (at, rows) = if cuda {
        (Target { device: "cuda", env: &env }, GPU_ROWS)
    } else {
        (Target { device: "cpu", env: &[] }, ROWS)
    };
    let mut results: Vec<Vec<(f64, Option<f64>, f64)>> = vec![Vec::new(); rows.len()];
    for r in 0..rounds {
        if rounds > 1 {
            eprintln!("round {} of {rounds}", r + 1);
        }
        for (i, &row) in rows.iter().enumerate() {
            results[i].push(one_round(&glip, &python, &root, &at, row, iters, threads)?);
        }
    }
    let per_round = if rounds > 1 { " f32 ratio per round |" } else { "" };
    println!(
        "| preset | mode | batch | size | glip s | PyTorch s | glip / PyTorch | glip bf16 s | bf16 / PyTorch f32 |{per_round}"
    );
    let sep = if rounds > 1 { " --- |" } else { "" };
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |{sep}");
    for (&(preset, mode, batch, size), res) in rows.iter().zip(&results) {
        let g = median(&res.iter().map(|r| r.0).collect::<Vec<_>>());
        let t = median(&res.iter().map(|r| r.2).collect::<Vec<_>>());
        let bf: Vec<f64> = res.iter().filter_map(|r| r.1).collect();
        let (bs, br) = if bf.is_empty() {
            ("-".into(), "-".into())
        } else {
            let s = median(&bf);
            (format!("{s:.3}"), format!("{:.2}x", s / t))
        };
        let rounds_col = if rounds > 1 {
            let v: Vec<String> = res.iter().map(|r| format!("{:.2}", r.0 / r.2)).collect();
            format!(" {} |", v.join(" / "))
        } else {
            String::new()
        };
        println!(
            "| {preset} | {mode} | {batch} | {size} | {g:.3} | {t:.3} | {:.2}x | {bs} | {br} |{rounds_col}",
            g / t
        );
    }
    println!(
        "\nmedians of {iters} iterations after one warm-up, {}; medians over {rounds} round(s), glip and PyTorch alternating",
        if cuda { "on cuda:0".to_string() } else { format!("{threads} threads each") }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glip_benches_on_the_target_with_its_libraries() {
        let env = [crate::cuda::EnvVar::set("CUDA_COMPUTE_CAP", "86")];
        let glip = std::path::Path::new("glip");
        for (at, envs) in
            [(Target { device: "cpu", env: &[] }, 0), (Target { device: "cuda", env: &env }, 1)]
        {
            let cmd = bench_command(glip, &at, &["--iters", "3"]);
            let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            assert_eq!(args, ["bench", "--iters", "3", "--device", at.device]);
            assert_eq!(cmd.get_envs().count(), envs, "{}", at.device);
        }
    }
}
