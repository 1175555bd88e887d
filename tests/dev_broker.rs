//! `gatebill dev-broker` with the user's topic names (from the same config
//! file and from flags): a worker given the same names bills on them, and a
//! worker given other names is told what to do.

mod common;

use clap::Parser;
use common::{assert_bills_match, read_bills, read_dead_letters, traffic, tune};
use gatebill::cli::Cli;
use gatebill::config::Config;
use gatebill::worker::{self, Mode, RunOptions};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// A `gatebill dev-broker` process, killed when dropped.
struct DevBroker {
    child: Child,
    bootstrap: String,
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary's `dev-broker` with `args` (and no `GATEBILL_*`
/// variable of the test's environment) and reads its bootstrap address.
fn dev_broker(args: &[&str]) -> DevBroker {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatebill"));
    cmd.arg("dev-broker").args(args).stdout(Stdio::piped()).stderr(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GATEBILL_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let bootstrap = line.trim().strip_prefix("bootstrap=").unwrap_or_else(|| panic!("dev-broker printed `{line}`")).to_string();
    DevBroker { child, bootstrap }
}

/// The configuration of `gatebill <argv>` with an empty environment.
fn settle(argv: &[&str]) -> Config {
    let cli = Cli::try_parse_from(std::iter::once("gatebill").chain(argv.iter().copied())).unwrap();
    cli.command.settle(&|_| None).unwrap().unwrap().into_config()
}

fn topics(cfg: &Config) -> Vec<String> {
    let consumer = gatebill::kafka::plain_consumer(&cfg.kafka, "probe").unwrap();
    let md = rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, std::time::Duration::from_secs(10)).unwrap();
    let mut names: Vec<String> = md.topics().iter().map(|t| t.name().to_string()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_bills_on_the_dev_brokers_custom_topics() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acme.toml");
    std::fs::write(&file, "[kafka]\ninput_topic = \"acme-events\"\naccounts_topic = \"acme-accounts\"\npartitions = 3\n").unwrap();
    let file = file.to_str().unwrap();
    // Two topics from the file, two from flags.
    let broker = dev_broker(&["--config", file, "--output-topic", "acme-bills", "--dead-letter-topic", "acme-rejects"]);
    let mut cfg = settle(&[
        "replay",
        "--config",
        file,
        "--brokers",
        &broker.bootstrap,
        "--output-topic",
        "acme-bills",
        "--dead-letter-topic",
        "acme-rejects",
    ]);
    tune(&mut cfg, dir.path(), "acme");
    assert_eq!(topics(&cfg), ["acme-accounts", "acme-bills", "acme-events", "acme-rejects", "gatebill-changelog", "gateway-alerts"]);

    let (truth, expected) = traffic(&cfg, 7, 3_000, 3, 30, 1.0).await;
    let s = common::replay(&cfg).await;
    assert_eq!((s.messages, s.billed, s.duplicates, s.rejected), (3_000, truth.unique_events, truth.duplicates, truth.malformed), "{s:?}");
    assert_eq!(truth.unique_events + truth.duplicates + truth.malformed, 3_000);
    assert!(!expected.is_empty());
    let table = read_bills(&cfg, "acme-bills");
    assert_bills_match(&table, &expected);
    common::assert_no_repeated_bills(&table);
    common::assert_dead_letters_once(&read_dead_letters(&cfg), truth.malformed);
    // Nothing went anywhere else: no topic was created on the way.
    assert_eq!(topics(&cfg), ["acme-accounts", "acme-bills", "acme-events", "acme-rejects", "gatebill-changelog", "gateway-alerts"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_topics_the_dev_broker_lacks_is_told_what_to_do() {
    let broker = dev_broker(&["--partitions", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = settle(&["run", "--brokers", &broker.bootstrap, "--output-topic", "bills", "--dead-letter-topic", "rejects"]);
    tune(&mut cfg, dir.path(), "other");
    let err = worker::run(&cfg.clone().checked().unwrap(), RunOptions { mode: Mode::Live, fault: None }, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not create the missing topic(s) bills, rejects ("), "{err}");
    assert!(
        err.ends_with(
            "If the broker is `gatebill dev-broker`, which cannot create topics on request, restart it with the same topic \
             names: the same --config file, or --input-topic/--accounts-topic/--output-topic/--dead-letter-topic"
        ),
        "{err}"
    );
}
