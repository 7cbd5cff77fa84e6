//! `glip`: the command-line front end of glip-rs.
//!
//! Subcommands arrive with the issues that make them work; this binary pretends nothing.

use clap::Parser;

/// Grounded object detection in the style of GLIP.
#[derive(Parser, Debug)]
#[command(name = "glip", version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!("glip {}: no subcommands yet", env!("CARGO_PKG_VERSION"));
}
