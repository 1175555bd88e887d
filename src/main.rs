//! The `gatebill` binary: parses the command line and hands over to `cli`.

use clap::Parser;

/// mimalloc instead of the system allocator: bills and batches allocate
/// and free on many threads, where glibc's malloc spent a quarter of the
/// emission's CPU (BENCHMARKS.md, performance round 3).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = gatebill::cli::Cli::parse();
    if let Err(e) = gatebill::cli::main(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
