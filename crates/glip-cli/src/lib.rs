//! The `glip` command line as a library: [`main_with`] runs every subcommand (train,
//! experiment with `--set` and ablation grids, eval, detect, inspect, bench, data) with a
//! [`Registry`] that may hold a researcher's own components. A ten-line binary:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     let mut registry = glip_train::config::Registry::new();
//!     // registry.register_criterion("mine", |ctx, p: MyParams, ()| ...);
//!     glip_cli::main_with(registry)
//! }
//! ```

mod bench;
mod data;
mod detect;
mod eval;
mod experiment;
mod inspect;
mod progress;
mod report;
mod train;

use clap::{Parser, Subcommand};
pub use glip_train::config::Registry;

/// A number in `[0, 1]` (`--threshold`, `--nms`): clap names the argument on error.
pub(crate) fn parse_unit(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not in [0, 1]")),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// A count in `lo..=hi` (`--batch`, `--top-k`, `--iters`): clap names the argument on error.
pub(crate) fn count(lo: u64, hi: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(lo..=hi)
}

/// An image side in pixels, `16..=8192` (`--size`).
pub(crate) fn image_side() -> clap::builder::RangedU64ValueParser<usize> {
    count(16, glip_core::validate::limits::IMAGE_SIDE as u64)
}

/// `--device` words (`auto`, `cpu`, `cuda`, `cuda:N`).
pub(crate) fn parse_device(s: &str) -> Result<glip_train::device::DeviceSpec, String> {
    s.parse().map_err(|e: glip_train::Error| e.to_string())
}

/// `--precision` words (`f32`, `bf16`).
pub(crate) fn parse_precision(s: &str) -> Result<glip_train::Precision, String> {
    s.parse()
}

/// Where and how `detect`, `eval` and `bench` compute (flattened into their arguments).
#[derive(clap::Args, Debug)]
pub(crate) struct Compute {
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, value_parser = parse_device)]
    device: Option<glip_train::device::DeviceSpec>,
    /// What convolutions and linear layers compute in: f32, or bf16 (inputs and weights rounded
    /// to bf16, f32 sums): on CUDA (compute capability 8.0 and newer) forward and backward; on a
    /// CPU with AVX512_BF16 (AMX where there is) convolutions forward and backward, and linear
    /// layers in inference; on other CPUs and GPUs f32, with a warning. Weights, and in
    /// training the optimiser, stay f32.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub(crate) precision: glip_train::Precision,
    /// On CUDA, let f32 convolutions and matrix products use TF32 tensor cores (PyTorch's
    /// default for convolutions; `run.tf32` in configs). No effect on the CPU or in bf16.
    #[arg(long)]
    pub(crate) tf32: bool,
}

impl Compute {
    /// The device, with TF32 set as asked where it applies, and the precision that takes effect
    /// there; a warning on stderr for each flag that cannot take effect on it.
    pub(crate) fn resolve(&self) -> anyhow::Result<(candle_core::Device, glip_train::Precision)> {
        let (device, note) = self.device.unwrap_or_default().resolve_noted()?;
        if let Some(why) = note {
            eprintln!("warning: --device {why}");
        }
        if self.tf32 && !device.is_cuda() {
            eprintln!("warning: --tf32 applies on CUDA only; computing in plain f32 on {device:?}");
        }
        glip_train::set_tf32(self.tf32 && device.is_cuda());
        let (precision, why) = glip_train::resolve_precision(self.precision, &device);
        if let Some(why) = why {
            eprintln!("warning: --precision {}: {why}", self.precision);
        }
        Ok((device, precision))
    }
}

/// `--cuda-graph` on `device`: a cache of CUDA graphs for the passes on CUDA; elsewhere a
/// warning and none.
pub(crate) fn graphs_on(
    on: bool,
    device: &candle_core::Device,
) -> Option<glip_train::infer::GraphCache> {
    if on && !device.is_cuda() {
        eprintln!("warning: --cuda-graph applies on CUDA only; launching eagerly on {device:?}");
    }
    (on && device.is_cuda()).then(glip_train::infer::GraphCache::new)
}

/// The summary of what `--cuda-graph` did, on stderr.
pub(crate) fn report_graphs(graphs: Option<&glip_train::infer::GraphCache>) {
    if let Some(g) = graphs {
        eprintln!("{}", g.report());
    }
}

/// Grounded object detection in the style of GLIP.
#[derive(Parser, Debug)]
#[command(name = "glip", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Dataset tools: validate COCO/ODVG, export the synthetic task.
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Train (and evaluate) one experiment config.
    Train(train::TrainArgs),
    /// Run an experiment config or an ablation grid: results.json/md, a table and plots.
    Experiment(experiment::ExperimentArgs),
    /// Evaluate a trained run (synthetic validation split, or a COCO folder).
    Eval(eval::EvalArgs),
    /// Ground the phrases of a prompt in images: JSON, and the images with boxes drawn.
    Detect(detect::DetectArgs),
    /// Parameter counts per component and the tensor shapes flowing through a config's model.
    Inspect(inspect::InspectArgs),
    /// Evaluate any COCO results file against COCO ground truth (bbox), as pycocotools does.
    CocoEval(CocoEvalArgs),
    /// Time the seed model (same presets and work as bench_torch.py); prints one JSON line.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct CocoEvalArgs {
    /// Ground truth (COCO detection json).
    #[arg(long)]
    gt: std::path::PathBuf,
    /// Detections (COCO results json: a list of {image_id, category_id, bbox, score}).
    #[arg(long)]
    dets: std::path::PathBuf,
    /// Print one JSON object with the 12 numbers instead of pycocotools' table.
    #[arg(long)]
    json: bool,
}

fn coco_eval(a: CocoEvalArgs) -> anyhow::Result<()> {
    use glip_train::eval::{evaluate_coco_files, COCO_STAT_NAMES};
    let m = evaluate_coco_files(&a.gt, &a.dets)?;
    if a.json {
        let obj: serde_json::Map<String, serde_json::Value> =
            COCO_STAT_NAMES.iter().map(|n| (n.to_string(), serde_json::json!(m.get(n)))).collect();
        println!("{}", serde_json::Value::Object(obj));
        return Ok(());
    }
    let rows = [
        ("Average Precision", "AP", "0.50:0.95", "all", 100),
        ("Average Precision", "AP", "0.50", "all", 100),
        ("Average Precision", "AP", "0.75", "all", 100),
        ("Average Precision", "AP", "0.50:0.95", "small", 100),
        ("Average Precision", "AP", "0.50:0.95", "medium", 100),
        ("Average Precision", "AP", "0.50:0.95", "large", 100),
        ("Average Recall", "AR", "0.50:0.95", "all", 1),
        ("Average Recall", "AR", "0.50:0.95", "all", 10),
        ("Average Recall", "AR", "0.50:0.95", "all", 100),
        ("Average Recall", "AR", "0.50:0.95", "small", 100),
        ("Average Recall", "AR", "0.50:0.95", "medium", 100),
        ("Average Recall", "AR", "0.50:0.95", "large", 100),
    ];
    for ((long, short, iou, area, dets), name) in rows.iter().zip(COCO_STAT_NAMES) {
        println!(
            " {:<18} ({}) @[ IoU={:<9} | area={:>6} | maxDets={:>3} ] = {:.3}",
            long,
            short,
            iou,
            area,
            dets,
            m.get(name)
        );
    }
    Ok(())
}

/// candle asks for its thread count on every matmul and convolution; without
/// `RAYON_NUM_THREADS` it re-reads `/proc/cpuinfo` each time (measured: half of a training
/// step's time, in the kernel) and counts physical cores only (one on a 2-vCPU machine). Set it
/// once, before any thread starts, to the logical CPUs available.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Makes the calling thread (the process's main thread) worker 0 of rayon's global pool, of
/// `RAYON_NUM_THREADS` threads in all, when that is more than one. A training step's work is
/// mostly parallel calls (candle's element-wise maps, the gemm crate, this workspace's
/// kernels); from a thread outside the pool each one is handed to the pool and the caller
/// sleeps on a lock until a worker has finished it, while from a worker it is split in place
/// and the other workers steal their share. With one thread the pool keeps its
/// own worker: the main thread blocks on the data loader's channel while the loader's thread
/// hands its decoding to the pool, which a pool made only of the blocked thread would never
/// run. Does nothing if the global pool already exists.
pub fn join_thread_pool() {
    if let Some(n) = pool_to_join(std::env::var("RAYON_NUM_THREADS").ok().as_deref()) {
        // An error means the pool exists (a caller set it up first): keep it.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).use_current_thread().build_global();
    }
}

/// The size of the pool [`join_thread_pool`] makes from `RAYON_NUM_THREADS`: that count when
/// it is 2 or more, else none (one thread, or a value rayon itself does not read: rayon parses
/// it as it is, `0` meaning its default).
fn pool_to_join(threads: Option<&str>) -> Option<usize> {
    threads?.parse().ok().filter(|&n: &usize| n >= 2)
}

/// candle ships its CUDA kernels as PTX, which the driver compiles for the GPU when a module is
/// first loaded (17-21 s for a model's kernels, measured on the H100 of `../shared/docs/CUDA.md`)
/// and keeps in its JIT cache for later processes: let that cache (256 MiB by default) hold all
/// of them, up to the driver's limit of 4 GiB, unless `CUDA_CACHE_MAXSIZE` says otherwise. Set
/// before the first CUDA call; nothing changes for a CPU-only build.
pub fn keep_compiled_kernels() {
    if glip_train::device::cuda_built() && std::env::var_os("CUDA_CACHE_MAXSIZE").is_none() {
        std::env::set_var("CUDA_CACHE_MAXSIZE", (4u64 << 30).to_string());
    }
}

/// Leaves errors' backtraces off unless `RUST_LIB_BACKTRACE` asks for them. candle captures a
/// backtrace into every error it makes (`bail!`, a shape that does not fit) when
/// `RUST_BACKTRACE` is set, and its message carries it: with `RUST_BACKTRACE=1` in a shell, a
/// checkpoint of the wrong shape printed 15 lines of frames inside the one-line error. std
/// reads `RUST_LIB_BACKTRACE` before `RUST_BACKTRACE` for captured backtraces and only
/// `RUST_BACKTRACE` for panics, so panics keep theirs; `RUST_LIB_BACKTRACE=1` brings the
/// errors' back for debugging glip itself.
pub fn quiet_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Called first thing in `main_with`, before any thread exists.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// mimalloc's `purge_delay` option (its index in `mi_option_e`, the same in mimalloc 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc (glip's allocator) to keep freed memory for reuse instead of returning it to
/// the system after 10 ms: a training step frees and reallocates the same large buffers, and
/// faulting them back in (the kernel zeroing fresh pages) was 30 % of a `perf` profile of the
/// default experiment's step. `MIMALLOC_PURGE_DELAY` in the environment still wins.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        #[allow(
            unsafe_code,
            reason = "mimalloc's option API is C; called before any thread starts"
        )]
        // SAFETY: sets a process-wide option; nothing else touches mimalloc's options
        // concurrently (this runs first thing in main, before any thread).
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
        };
    }
}

/// Runs the `glip` command line (arguments from the process) with `registry`'s components;
/// returns the exit code (errors are printed to stderr).
pub fn main_with(registry: Registry) -> std::process::ExitCode {
    quiet_error_backtraces();
    keep_freed_memory();
    pin_thread_count();
    join_thread_pool();
    keep_compiled_kernels();
    run_args(&registry, std::env::args_os())
}

/// [`main_with`] on explicit arguments (the first is the program name).
pub fn run_args<I, T>(registry: &Registry, args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
    let result = match cli.cmd {
        Cmd::Data(c) => data::run(c),
        Cmd::CocoEval(a) => coco_eval(a),
        Cmd::Train(a) => train::run(registry, a),
        Cmd::Experiment(a) => experiment::run(registry, a),
        Cmd::Eval(a) => eval::run(registry, a),
        Cmd::Detect(a) => detect::run(registry, a),
        Cmd::Inspect(a) => inspect::run(registry, a),
        Cmd::Bench(a) => bench::run_bench(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A folder that output goes into (`--out`, or its default) must be one, or not exist yet: a
/// file there is refused before any work starts, rather than after the model is built.
pub(crate) fn check_out_folder(dir: &std::path::Path, what: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "{}: a file, not a folder ({what} go into a folder; --out names another)",
            dir.display()
        );
    }
    Ok(())
}

/// An error and its causes, `: `-joined as anyhow's `{:#}` joins them, but without a cause
/// that the message before it already ends with: errors that print their source in their own
/// message (`path: No such file or directory`, as thiserror's `{path}: {source}` does) and
/// also give it as their `source()` would otherwise say it twice.
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pool_to_join;

    /// An error that prints its source and also gives it as `source()`.
    #[derive(Debug)]
    struct WithSource(std::io::Error);

    impl std::fmt::Display for WithSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "data/a.json: {}", self.0)
        }
    }

    impl std::error::Error for WithSource {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(WithSource(io())).context("--coco");
        assert_eq!(super::error_chain(&e), "--coco: data/a.json: no such file");
        // Causes that their parents do not print are all kept, in order, as `{:#}` has them.
        let e = anyhow::Error::new(io()).context("reading data/a.json").context("--coco");
        assert_eq!(super::error_chain(&e), format!("{e:#}"));
        assert_eq!(super::error_chain(&e), "--coco: reading data/a.json: no such file");
    }

    #[test]
    fn only_a_pool_of_two_or_more_threads_is_joined() {
        assert_eq!(pool_to_join(Some("2")), Some(2));
        assert_eq!(pool_to_join(Some("16")), Some(16));
        for one_or_unread in
            [None, Some("1"), Some("0"), Some(""), Some(" 2"), Some("two"), Some("-3")]
        {
            assert_eq!(pool_to_join(one_or_unread), None, "{one_or_unread:?}");
        }
    }
}
