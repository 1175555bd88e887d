//! The `gatebill` binary: parses the command line and hands over to `cli`.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = gatebill::cli::Cli::parse();
    if let Err(e) = gatebill::cli::main(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
