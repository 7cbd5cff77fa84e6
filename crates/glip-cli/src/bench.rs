//! `glip bench`: times the seed model as `../shared/reference/bench_torch.py` does, printing the
//! same JSON line so the two compare side by side.

use anyhow::Result;
use clap::Args;
use glip_train::bench::{run, BenchSpec};

/// `glip bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// `seed-r50` or `seed-r18`.
    #[arg(long, default_value = "seed-r50", value_parser = glip_train::bench::PRESETS)]
    preset: String,
    /// `infer` (no gradients) or `train` (forward, criterion, backward, clip, AdamW).
    #[arg(long, default_value = "infer", value_parser = ["infer", "train"])]
    mode: String,
    /// Images per batch.
    #[arg(long, default_value_t = 2, value_parser = crate::count(1, glip_core::validate::limits::BATCH as u64))]
    batch: usize,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 384, value_parser = crate::count(32, glip_core::validate::limits::IMAGE_SIDE as u64))]
    size: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 5, value_parser = crate::count(1, 1_000_000))]
    iters: usize,
    #[command(flatten)]
    compute: crate::Compute,
    /// Also time each phase (forward, loss, backward, optimiser; the device synchronised at
    /// each boundary) and print their medians in `phases`.
    #[arg(long)]
    phases: bool,
    /// Inference on CUDA: time replays of the pass recorded as a CUDA graph after the warm-up
    /// (one launch for the whole pass; inputs copied in, outputs copied out each iteration).
    /// `bench_torch.py` times eager launches. A pass that cannot be recorded is timed eagerly,
    /// with the reason; `graph` in the output says which ran. No effect on the CPU or in
    /// training.
    #[arg(long)]
    cuda_graph: bool,
}

/// Runs `glip bench`.
pub fn run_bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.batch > 0 && a.size >= 32, "--batch must be >= 1 and --size >= 32");
    let spec = BenchSpec {
        preset: a.preset,
        train: a.mode == "train",
        batch: a.batch,
        size: a.size,
        iters: a.iters,
        precision: a.compute.precision,
        tf32: a.compute.tf32,
        phases: a.phases,
        graph: a.cuda_graph,
    };
    if a.cuda_graph && a.mode == "train" {
        eprintln!("warning: --cuda-graph applies to inference only; timing eager training steps");
    }
    let (dev, _) = a.compute.resolve()?;
    if spec.graph && !spec.train && !dev.is_cuda() {
        eprintln!("warning: --cuda-graph applies on CUDA only; timing eager launches on {dev:?}");
    }
    let r = run(&spec, &dev)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
