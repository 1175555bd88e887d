//! The `gatebill` binary: parses the command line and hands over to `cli`.

use clap::Parser;

/// mimalloc instead of the system allocator: bills and batches allocate
/// and free on many threads; glibc's malloc and free were about a quarter
/// of the CPU samples while bills were computed (`perf`, BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tune_c_heap();
    let cli = gatebill::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(gatebill::cli::main(cli)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// glibc's malloc serves what Rust does not allocate: RocksDB (memtable
/// arena blocks, block cache entries) and librdkafka. By default it raises
/// its mmap threshold to the size of each large block freed (up to 32 MB),
/// so after the first memtable flush the next memtables' blocks come from
/// its heaps, which keep freed memory: a long-running worker's RSS then
/// climbed with every flush (the 30-minute soak, BENCHMARKS.md). A fixed
/// 128 KiB threshold keeps large blocks in their own mappings, returned to
/// the system when freed, and two arenas (not 8 per core) bound the heaps
/// glibc keeps per thread. Measured with the same settings as environment
/// variables: RSS follows the memtables down at each flush, CPU unchanged
/// (BENCHMARKS.md). A setting in the environment (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_ARENA_MAX`) is left to win.
fn tune_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
        const ARENA_MAX: libc::c_int = 2;
        // SAFETY: mallopt only changes glibc's allocator parameters; called
        // before any other thread exists.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
            if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
                libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
            }
        }
    }
}
