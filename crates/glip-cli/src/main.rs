//! `glip`: the command-line front end of glip-rs.

mod data;

use clap::{Parser, Subcommand};

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Data(c) => data::run(c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
