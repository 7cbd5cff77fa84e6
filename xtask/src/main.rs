//! `cargo xtask`: project automation that runs the same here and in CI.

mod fetch;
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Tidy => tidy::run(),
        Cmd::FetchModels => fetch::run(),
    }
}
