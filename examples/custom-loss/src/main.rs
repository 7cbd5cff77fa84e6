//! `custom-glip`: the whole `glip` command line (train, experiment with `--set` and ablation
//! grids, eval, detect, inspect, ...) with this crate's components registered beside the
//! built-ins.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    glip_cli::main_with(glip_example_custom_loss::registry())
}
