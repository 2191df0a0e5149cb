//! The `cistern` binary.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's allocator: the exchange path allocates many
/// small short-lived buffers (form fields, claims, JSON), and glibc's free
/// lists and consolidation showed as ~6% of the server's CPU under load
/// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cistern::cli::Cli::parse();
    match cistern::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cistern: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
