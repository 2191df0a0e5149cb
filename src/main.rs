//! The `cistern` binary.

use std::process::ExitCode;

use clap::Parser;

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
