//! `glip`: the command-line front end of glip-rs, with the built-in components (see the
//! library's `main_with` for a binary with your own).

/// mimalloc keeps freed pages for reuse: a training step allocates and frees hundreds of
/// megabytes of convolution columns and gradients, which glibc's allocator returned to the
/// system and faulted back in every step (page faults and memset were 9 % of a `perf` profile
/// of a dense-head step; 0.90 s -> 0.78 s of backward with glibc told to keep them).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    glip_cli::main_with(glip_cli::Registry::new())
}
