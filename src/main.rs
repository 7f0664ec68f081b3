//! The `scriptd` binary: parses the command line and hands it to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    scriptd::cli::run(scriptd::cli::Cli::parse())
}
