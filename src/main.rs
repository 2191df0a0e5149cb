//! The `cistern` binary.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's allocator: the exchange path allocates many
/// small short-lived buffers (form fields, claims, JSON), and glibc's free
/// lists and consolidation showed as ~6% of the server's CPU under load
/// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = cistern::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cistern: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cistern::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cistern: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

/// Transparent huge pages make every 2 MiB region the allocator touches
/// resident whole: 14 MB of an idle server's 32 MB RSS, and more per
/// connection under load (BENCHMARKS.md, proxy memory). A small heap gains
/// nothing from them. mimalloc is built without its `MADV_HUGEPAGE` advice
/// (feature `no_thp`: its first arena is touched before `main`), and this
/// opts the process out on hosts where huge pages are on for everything.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        // Only memory use is at stake: say so and go on.
        eprintln!("cistern: cannot opt out of transparent huge pages: {e}");
    }
}
