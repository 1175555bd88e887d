//! The `gatebill` binary: parses the command line and hands over to `cli`.

use clap::Parser;

/// mimalloc instead of the system allocator: bills and batches allocate
/// and free on many threads; glibc's malloc and free were about a quarter
/// of the CPU samples while bills were computed (`perf`, BENCHMARKS.md).
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
