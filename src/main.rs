//! The `scriptd` binary: parses the command line and hands it to the library.

use clap::Parser;

/// The daemon and its engine hosts allocate many small, short-lived blocks per event; see
/// the allocator's line in Cargo.toml. (The JavaScript engines keep their own heaps.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    scriptd::cli::run(scriptd::cli::Cli::parse())
}
