//! The command line: one documented function per subcommand. Flags are
//! turned into a [`Checked`] configuration once, before anything runs: each
//! flag over its `GATEBILL_*` variable over the file over the default
//! ([`Config::resolve`](crate::config::Config::resolve)).

use crate::billing::BillStatus;
use crate::config::{process_env, Checked, Env, KafkaConfig, Overrides};
use crate::gen::GenSpec;
use crate::inspect::{self, BillTable, Filter};
use crate::worker::{self, Mode, RunOptions};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// gatebill: API-gateway usage to monthly bills, exactly once.
///
/// Reads gateway access events from Kafka, aggregates calls and public
/// outbound bytes per account and billing month in RocksDB, deducts the free
/// tier and resource packs, prices the rest, and writes bill records to an
/// output topic. Quick start: `gatebill demo`.
#[derive(Parser, Debug)]
#[command(name = "gatebill", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the worker in a consumer group until SIGINT/SIGTERM.
    ///
    /// Resumes every partition from the offset stored in the state directory
    /// (never from the group's offset); a partition without stored state is
    /// rebuilt from the beginning of the input topic.
    Run(RunArgs),
    /// Replay the input topic into a state directory and output topic, then exit.
    ///
    /// Reads from the earliest offsets (or --from) to the end offsets seen at
    /// start. A state directory that already holds offsets resumes from them.
    /// Bills are computed once, when the end is reached (no provisional bills
    /// of a half-read history). With --input-file, each write batch holds
    /// worker.file_batch_size lines (100,000 by default).
    Replay(ReplayArgs),
    /// Show the latest revision of every bill on the output topic.
    Inspect(InspectArgs),
    /// Explain one account-month's bill: hour by hour (billing time zone),
    /// the calls and public bytes per region, what the free tier, each pack
    /// and each trial took, where each price tier began, and each charge
    /// line's arithmetic.
    ///
    /// Reads the state directory of the worker that owns the account's
    /// partition, read-only (a RocksDB secondary open, no lock): the worker
    /// may be running (it is not disturbed; what it wrote up to now is
    /// shown) or stopped. Uses the configuration's billing rules, which must
    /// be the worker's.
    Explain(ExplainArgs),
    /// Start an embedded Kafka-protocol broker for local use (no Docker).
    ///
    /// librdkafka's mock cluster: it speaks the real Kafka protocol to any
    /// client, but keeps at most about 5 MB (100,000 message sets) per
    /// partition and silently deletes older data, and forgets everything
    /// when stopped. For large data use a real broker (see README).
    DevBroker(DevBrokerArgs),
    /// Write generated access events and account records to a broker.
    Gen(GenArgs),
    /// One command, nothing to set up: embedded broker, traffic, worker, bill table.
    Demo(DemoArgs),
    /// Compact a (stopped worker's) state directory and print its size per column family.
    ///
    /// Sums usage deltas into one value per account-month and drops deleted
    /// data. Worth running after a large replay; the worker does the same
    /// gradually in the background.
    Compact(CompactArgs),
    /// Benchmark floor: read a topic to its end with the worker's consumer settings, count, print the rate.
    #[command(hide = true)]
    CountTopic(CountTopicArgs),
}

/// `gatebill compact`
#[derive(Args, Debug)]
pub struct CompactArgs {
    /// Configuration file (TOML), for worker.state_dir. [env: GATEBILL_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    /// RocksDB state directory. [env: GATEBILL_STATE_DIR]
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// `gatebill explain`
#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Account id.
    account: String,
    /// Month, YYYY-MM (calendar month in the billing time zone).
    month: crate::billing::Month,
    /// Configuration file (TOML), for worker.state_dir and the billing rules. [env: GATEBILL_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    /// RocksDB state directory of the worker. [env: GATEBILL_STATE_DIR]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print JSON (one object) instead of tables.
    #[arg(long)]
    json: bool,
}

/// `gatebill count-topic` (benchmarks)
#[derive(Args, Debug)]
pub struct CountTopicArgs {
    /// Configuration file (TOML). [env: GATEBILL_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers. [env: GATEBILL_BROKERS]
    #[arg(long)]
    brokers: Option<String>,
    /// Topic to read (default: the input topic).
    #[arg(long)]
    topic: Option<String>,
    /// Do not stop at the end offsets the broker reports: read until no
    /// message came for SECS seconds, counting every message (for brokers
    /// whose end offsets stop short, such as tansu, and for logs that end in
    /// a transaction marker, never delivered as a message).
    #[arg(long, value_name = "SECS")]
    until_idle: Option<u64>,
}

/// The four topic flags, of `run`, `replay` and `dev-broker`.
#[derive(Args, Debug, Clone, Default)]
pub struct TopicArgs {
    /// Topic of access events (key = account_id). [env: GATEBILL_INPUT_TOPIC]
    #[arg(long)]
    pub input_topic: Option<String>,
    /// Compacted topic of account records. [env: GATEBILL_ACCOUNTS_TOPIC]
    #[arg(long)]
    pub accounts_topic: Option<String>,
    /// Topic the bill records are written to. [env: GATEBILL_OUTPUT_TOPIC]
    #[arg(long)]
    pub output_topic: Option<String>,
    /// Topic rejected messages are written to, with reason headers. [env: GATEBILL_DEAD_LETTER_TOPIC]
    #[arg(long)]
    pub dead_letter_topic: Option<String>,
}

/// Flags shared by `run` and `replay`. No flag has a default of its own:
/// an absent flag leaves the environment's value, else the file's, else
/// the default of `Config` (see [`Config::resolve`](crate::config::Config::resolve)).
#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Configuration file (TOML); see gatebill.example.toml. [env: GATEBILL_CONFIG]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT...]. [env: GATEBILL_BROKERS]
    #[arg(long)]
    pub brokers: Option<String>,
    #[command(flatten)]
    pub topics: TopicArgs,
    /// RocksDB state directory (locked while in use). [env: GATEBILL_STATE_DIR]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Consumer group id. [env: GATEBILL_GROUP_ID]
    #[arg(long)]
    pub group_id: Option<String>,
    /// Address of /metrics and /healthz ("" disables). [env: GATEBILL_METRICS_ADDRESS]
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// Log JSON lines. [env: GATEBILL_JSON_LOGS=true|false]
    #[arg(long)]
    pub json_logs: bool,
}

/// A subcommand whose flags override the common settings.
pub trait CommonFlags {
    /// `--config`, and the other flags given as the top layer of the configuration.
    fn flags(&self) -> (Option<&Path>, Overrides);
    /// The configuration to run with: defaults, then the file, then the
    /// `GATEBILL_*` environment, then the flags.
    fn settle(&self, env: Env) -> Result<Checked> {
        let (file, flags) = self.flags();
        Ok(crate::config::Config::resolve(file, env, flags)?)
    }
}

impl TopicArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            input_topic: self.input_topic.clone(),
            accounts_topic: self.accounts_topic.clone(),
            output_topic: self.output_topic.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            ..Overrides::default()
        }
    }
}

impl CommonFlags for CommonArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (
            self.config.as_deref(),
            Overrides {
                brokers: self.brokers.clone(),
                state_dir: self.state_dir.clone(),
                group_id: self.group_id.clone(),
                metrics_address: self.metrics_address.clone(),
                json_logs: self.json_logs.then_some(true),
                ..self.topics.overrides()
            },
        )
    }
}

impl CommonFlags for InspectArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (
            self.config.as_deref(),
            Overrides { brokers: self.brokers.clone(), output_topic: self.output_topic.clone(), ..Overrides::default() },
        )
    }
}

impl CommonFlags for GenArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (
            self.config.as_deref(),
            Overrides {
                brokers: self.brokers.clone(),
                input_topic: self.input_topic.clone(),
                accounts_topic: self.accounts_topic.clone(),
                ..Overrides::default()
            },
        )
    }
}

impl CommonFlags for DevBrokerArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (self.config.as_deref(), Overrides { partitions: self.partitions, ..self.topics.overrides() })
    }
}

impl CommonFlags for CompactArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (self.config.as_deref(), Overrides { state_dir: self.state_dir.clone(), ..Overrides::default() })
    }
}

impl CommonFlags for ExplainArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (self.config.as_deref(), Overrides { state_dir: self.state_dir.clone(), ..Overrides::default() })
    }
}

impl CommonFlags for CountTopicArgs {
    fn flags(&self) -> (Option<&Path>, Overrides) {
        (self.config.as_deref(), Overrides { brokers: self.brokers.clone(), ..Overrides::default() })
    }
}

impl Command {
    /// The configuration of the subcommand; `None` for `demo`, which sets
    /// up its own.
    pub fn settle(&self, env: Env) -> Option<Result<Checked>> {
        Some(match self {
            Command::Run(a) => a.common.settle(env),
            Command::Replay(a) => a.common.settle(env),
            Command::Inspect(a) => a.settle(env),
            Command::DevBroker(a) => a.settle(env),
            Command::Gen(a) => a.settle(env),
            Command::Compact(a) => a.settle(env),
            Command::Explain(a) => a.settle(env),
            Command::CountTopic(a) => a.settle(env),
            Command::Demo(_) => return None,
        })
    }
}

/// Any error of a command, shown to the user as is.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;
/// Result of a command.
pub type Result<T> = std::result::Result<T, CliError>;

/// `gatebill run`
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
}

/// `gatebill replay`
#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Start partitions without stored state at this time (RFC 3339) instead of the earliest offset.
    #[arg(long, conflicts_with = "input_file")]
    from: Option<String>,
    /// Read access events from this newline-delimited JSON file (plain or
    /// gzip; `-` for stdin) instead of the input topic.
    #[arg(long)]
    input_file: Option<PathBuf>,
    /// With --input-file: write bills to this NDJSON file (dead letters to
    /// FILE.dead-letters) instead of the output topic.
    #[arg(long, requires = "input_file")]
    output_file: Option<PathBuf>,
    /// With --input-file: account records, one JSON object per line, in the
    /// accounts topic's format (plain or gzip); a later line for an account
    /// replaces an earlier one, bad lines are dead-lettered. Without it the
    /// accounts topic is read when brokers are given (--brokers,
    /// GATEBILL_BROKERS, kafka.brokers in the configuration file, or bills
    /// going to the output topic); an empty accounts topic is an error.
    #[arg(long, requires = "input_file", conflicts_with = "no_accounts")]
    accounts_file: Option<PathBuf>,
    /// With --input-file: bill every account as unknown (no free tier, no
    /// packs) on purpose, reading no account records.
    #[arg(long, requires = "input_file")]
    no_accounts: bool,
}

/// The error of `replay --input-file` given no account records.
const NO_ACCOUNTS: &str = "replay --input-file needs the account records, or it bills every account as unknown (no free tier, \
no packs). Pass --accounts-file FILE (account records, one JSON object per line, plain or gzip; `gatebill gen --output-file` \
writes one beside the events), or --brokers to read the accounts topic, or --no-accounts to bill every account as unknown on purpose";

/// `gatebill inspect`
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Configuration file (TOML): brokers, topics, [kafka.properties] (TLS, SASL). [env: GATEBILL_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers. [env: GATEBILL_BROKERS]
    #[arg(long)]
    brokers: Option<String>,
    /// Topic of bill records. [env: GATEBILL_OUTPUT_TOPIC]
    #[arg(long)]
    output_topic: Option<String>,
    /// Only this account.
    #[arg(long)]
    account: Option<String>,
    /// Only this month, YYYY-MM.
    #[arg(long)]
    month: Option<crate::billing::Month>,
    /// Only this status: provisional, final or restated.
    #[arg(long, value_parser = parse_status)]
    status: Option<BillStatus>,
    /// One JSON bill record per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep watching and print new revisions (or alerts) as they arrive.
    #[arg(long)]
    follow: bool,
    /// Show the usage alerts on kafka.alerts_topic instead of the bills
    /// (with --account and --month as filters).
    #[arg(long)]
    alerts: bool,
}

fn parse_status(s: &str) -> std::result::Result<BillStatus, String> {
    match s {
        "provisional" => Ok(BillStatus::Provisional),
        "final" => Ok(BillStatus::Final),
        "restated" => Ok(BillStatus::Restated),
        _ => Err(format!("`{s}` is not a status; use provisional, final or restated")),
    }
}

/// `gatebill dev-broker`
#[derive(Args, Debug)]
pub struct DevBrokerArgs {
    /// Configuration file (TOML): the topics to create and kafka.partitions;
    /// give the worker the same one. [env: GATEBILL_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    topics: TopicArgs,
    /// Partitions of each topic (kafka.partitions).
    #[arg(long)]
    partitions: Option<i32>,
}

/// `gatebill gen`
#[derive(Args, Debug)]
pub struct GenArgs {
    /// Configuration file (TOML): brokers, topics, [kafka.properties]. [env: GATEBILL_CONFIG]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers. [env: GATEBILL_BROKERS]
    #[arg(long)]
    brokers: Option<String>,
    /// Topic of access events. [env: GATEBILL_INPUT_TOPIC]
    #[arg(long)]
    input_topic: Option<String>,
    /// Topic of account records. [env: GATEBILL_ACCOUNTS_TOPIC]
    #[arg(long)]
    accounts_topic: Option<String>,
    /// Messages to write (duplicates and malformed included).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Accounts (the first is the spec's seed account, activated 2019-11-10 17:13:14; every fifth has a
    /// calls pack; some have pricing terms: a 10% discount from 2020-11, or their own prices for 2020-12 to 2021-02).
    #[arg(long, default_value_t = 1_000)]
    accounts: u64,
    /// Zipf exponent of account popularity; 0 is uniform.
    #[arg(long, default_value_t = 1.0)]
    skew: f64,
    /// First event time (RFC 3339).
    #[arg(long, default_value = "2020-11-01T00:00:00+08:00")]
    start: String,
    /// Days of event time.
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Share of messages repeating an earlier event exactly.
    #[arg(long, default_value_t = 0.01)]
    duplicates: f64,
    /// Share of malformed messages.
    #[arg(long, default_value_t = 0.001)]
    malformed: f64,
    /// Random seed (same seed, same messages).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Messages per second; 0 is as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Do not write account records.
    #[arg(long)]
    no_accounts: bool,
    /// Write the events to this NDJSON file instead of a broker (gzip when it
    /// ends in .gz); for `replay --input-file` and benchmarks.
    #[arg(long)]
    output_file: Option<PathBuf>,
}

/// `gatebill demo`
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Events to generate.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Accounts.
    #[arg(long, default_value_t = 200)]
    accounts: u64,
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stop requested: finishing the batch, then writing, flushing and committing");
}

/// Sets up logging.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rdkafka=warn".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Dispatches a parsed command line.
pub async fn main(cli: Cli) -> Result<()> {
    let cfg = cli.command.settle(&process_env).transpose()?.unwrap_or_default();
    match cli.command {
        Command::Run(_) => run(cfg).await,
        Command::Replay(a) => replay(a, cfg).await,
        Command::Inspect(a) => inspect(a, cfg.into_config().kafka).await,
        Command::DevBroker(_) => dev_broker(cfg.into_config().kafka).await,
        Command::Gen(a) => gen(a, cfg.into_config().kafka).await,
        Command::Demo(a) => {
            init_logging(false);
            crate::traffic::demo(a.events, a.accounts).await
        }
        Command::CountTopic(a) => count_topic(a, cfg.into_config().kafka),
        Command::Compact(_) => compact(&cfg.worker.state_dir),
        Command::Explain(a) => {
            let x = crate::explain::from_state_dir(&cfg.worker.state_dir, &a.account, a.month, cfg.rules())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&x)?);
            } else {
                print!("{}", crate::explain::render(&x));
            }
            Ok(())
        }
    }
}

/// `gatebill compact`: compacts every column family, prints bytes on disk.
fn compact(state_dir: &Path) -> Result<()> {
    if !state_dir.join("CURRENT").exists() {
        return Err(format!("{} is not a gatebill state directory (no RocksDB CURRENT file)", state_dir.display()).into());
    }
    let store = crate::store::Store::open(state_dir)?;
    let sizes = store.compact_all()?;
    let mut table = comfy_table::Table::new();
    table.set_header(["column family", "bytes on disk"]);
    for (cf, bytes) in &sizes {
        table.add_row([cf.to_string(), bytes.to_string()]);
    }
    println!("{table}");
    println!("total {}", sizes.iter().map(|(_, b)| b).sum::<u64>());
    Ok(())
}

/// A time flag's value (RFC 3339) as epoch milliseconds, or an error saying
/// what the flag expects.
fn rfc3339_ms(flag: &str, value: &str) -> std::result::Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(value).map(|t| t.timestamp_millis()).map_err(|e| {
        format!(
            "{flag} `{value}` is not an RFC 3339 time ({e}); give a date, a time and a UTC offset, \
             e.g. 2020-11-01T00:00:00+08:00 or 2020-11-01T00:00:00Z"
        )
    })
}

/// `gatebill run`: the long-lived worker.
async fn run(cfg: Checked) -> Result<()> {
    init_logging(cfg.metrics.json_logs);
    let s = worker::run(&cfg, RunOptions::new(Mode::Live), shutdown_signal()).await?;
    tracing::info!(
        batches = s.batches,
        billed = s.billed,
        rejected = s.rejected,
        duplicates = s.duplicates,
        bills = s.bills_emitted,
        "stopped"
    );
    Ok(())
}

/// `gatebill replay`: bounded run.
async fn replay(a: ReplayArgs, cfg: Checked) -> Result<()> {
    init_logging(cfg.metrics.json_logs);
    let from_ms = a.from.as_deref().map(|t| rfc3339_ms("--from", t)).transpose()?;
    let started = std::time::Instant::now();
    let progress = std::io::stderr().is_terminal();
    let s = match &a.input_file {
        Some(input) => {
            let sink = match &a.output_file {
                Some(out) => crate::file_replay::Sink::File(out.clone()),
                None => crate::file_replay::Sink::Kafka,
            };
            // Brokers named anywhere (flag, environment, configuration
            // file), or bills going to the output topic anyway.
            let brokers_given = a.common.brokers.is_some()
                || process_env("GATEBILL_BROKERS").is_some()
                || cfg.kafka.brokers != crate::config::KafkaConfig::default().brokers
                || a.output_file.is_none();
            let accounts = match (&a.accounts_file, a.no_accounts) {
                (Some(f), _) => crate::file_replay::Accounts::File(f.clone()),
                (None, true) => crate::file_replay::Accounts::None,
                (None, false) if brokers_given => crate::file_replay::Accounts::Topic,
                (None, false) => return Err(NO_ACCOUNTS.into()),
            };
            crate::file_replay::replay_file(&cfg, input, accounts, sink, progress, shutdown_signal()).await?
        }
        None => worker::run(&cfg, RunOptions::new(Mode::Replay { from_ms, progress }), shutdown_signal()).await?,
    };
    println!("{}", replay_summary(&s, started.elapsed().as_secs_f64()));
    if s.interrupted {
        return Err(format!(
            "replay interrupted before the end of its input after {} messages: no bill was emitted (bills of a partly read \
             input would be published as final); what was read is kept in {}: run the same command again to resume where it stopped",
            s.messages,
            cfg.worker.state_dir.display()
        )
        .into());
    }
    Ok(())
}

/// The line `replay` ends with.
fn replay_summary(s: &worker::RunSummary, secs: f64) -> String {
    let blank =
        if s.blank_lines > 0 { format!("; {} blank lines skipped", crate::metrics::thousands(s.blank_lines)) } else { String::new() };
    format!(
        "replayed {} messages in {:.1} s ({} msg/s): {} billed, {} duplicates, {} dead-lettered, {} bill records emitted{blank}",
        s.messages,
        secs,
        crate::metrics::thousands((s.messages as f64 / secs.max(1e-9)).round() as u64),
        s.billed,
        s.duplicates,
        s.rejected,
        s.bills_emitted
    )
}

/// `gatebill inspect`: latest bills as a table or JSON.
async fn inspect(a: InspectArgs, k: KafkaConfig) -> Result<()> {
    init_logging(false);
    if a.alerts {
        return inspect_alerts(a, k).await;
    }
    let filter = Filter { account: a.account.clone(), month: a.month.map(|m| m.to_string()), status: a.status };
    let (consumer, ends) = inspect::open(&k, &k.output_topic)?;
    let mut table = BillTable::default();
    inspect::read_to_end(&consumer, ends, &mut table, Duration::from_secs(60));
    let shown: Vec<_> = table.latest.values().filter(|r| filter.accepts(r)).collect();
    if a.json {
        for r in &shown {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!("{}", inspect::render_table(shown.iter().copied()));
        println!("{} bill(s) shown of {} on {}", shown.len(), table.latest.len(), k.output_topic);
    }
    if table.unreadable > 0 {
        eprintln!("warning: {} record(s) on {} are not bill records", table.unreadable, k.output_topic);
    }
    if a.follow {
        follow(&consumer, |m| {
            let Some(r) = rdkafka::Message::payload(m).and_then(|p| table.offer(p)).filter(|r| filter.accepts(r)) else { return Ok(()) };
            if a.json {
                println!("{}", serde_json::to_string(r)?);
            } else {
                println!("{}", inspect::render_table([r]));
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Hands every new message of `consumer` to `each` until SIGINT/SIGTERM
/// (`inspect --follow`).
async fn follow(
    consumer: &rdkafka::consumer::BaseConsumer,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<()>,
) -> Result<()> {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        while let Some(Ok(m)) = rdkafka::consumer::BaseConsumer::poll(consumer, Duration::ZERO) {
            each(&m)?;
        }
    }
}

/// `gatebill inspect --alerts`: every alert on the alerts topic (each
/// identity is written once), filtered, as a table or JSON lines; with
/// `--follow`, new ones as they arrive.
async fn inspect_alerts(a: InspectArgs, k: KafkaConfig) -> Result<()> {
    let month = a.month.map(|m| m.to_string());
    let accepts = |v: &serde_json::Value| {
        a.account.as_deref().is_none_or(|x| v["account_id"] == x) && month.as_deref().is_none_or(|m| v["month"] == m)
    };
    let (consumer, ends) = inspect::open(&k, &k.alerts_topic)?;
    let mut alerts = Vec::new();
    let mut unreadable = 0u64;
    let parse = |payload: Option<&[u8]>| {
        payload.and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok()).filter(|v| v.get("kind").is_some())
    };
    let Ok(_) = crate::kafka::read_to_end(&consumer, ends, Duration::from_secs(60), |m| {
        match parse(rdkafka::Message::payload(m)) {
            Some(v) => alerts.push(v),
            None => unreadable += 1,
        }
        Ok::<_, std::convert::Infallible>(())
    });
    let total = alerts.len();
    alerts.retain(|v| accepts(v));
    if a.json {
        for v in &alerts {
            println!("{v}");
        }
    } else {
        println!("{}", inspect::render_alerts(&alerts));
        println!("{} alert(s) shown of {total} on {}", alerts.len(), k.alerts_topic);
    }
    if unreadable > 0 {
        eprintln!("warning: {unreadable} record(s) on {} are not alert records", k.alerts_topic);
    }
    if a.follow {
        follow(&consumer, |m| {
            if let Some(v) = parse(rdkafka::Message::payload(m)).filter(|v| accepts(v)) {
                if a.json {
                    println!("{v}");
                } else {
                    println!("{}", inspect::render_alerts(std::slice::from_ref(&v)));
                }
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// `gatebill dev-broker`: a mock Kafka cluster until interrupted.
async fn dev_broker(k: KafkaConfig) -> Result<()> {
    init_logging(false);
    let cluster = crate::traffic::dev_cluster(&k)?;
    println!("bootstrap={}", cluster.bootstrap_servers());
    eprintln!(
        "gatebill dev-broker: librdkafka's mock cluster, topics {} with {} partitions.\n\
         It cannot create other topics: give workers the same topic names (the same --config or topic flags).\n\
         LIMIT: it keeps at most about 5 MB (100,000 message sets) per partition and silently deletes\n\
         older data; everything is lost when it stops. Fine for trying gatebill; for more data use a\n\
         real broker (docker compose up) or tansu (see README). Press Ctrl-C to stop.",
        k.topics().join(", "),
        k.partitions
    );
    shutdown_signal().await;
    drop(cluster);
    Ok(())
}

/// `gatebill gen`: writes generated traffic.
async fn gen(a: GenArgs, k: KafkaConfig) -> Result<()> {
    init_logging(false);
    let start_ms = rfc3339_ms("--start", &a.start)?;
    if !(0.0..=1.0).contains(&(a.duplicates + a.malformed)) {
        return Err("--duplicates plus --malformed must be between 0 and 1".into());
    }
    let spec = GenSpec {
        events: a.events,
        accounts: a.accounts.max(1),
        skew: a.skew,
        start_ms,
        days: a.days,
        duplicates: a.duplicates,
        malformed: a.malformed,
        seed: a.seed,
    };
    if let Some(path) = &a.output_file {
        let t = crate::traffic::write_file(path, &spec)?;
        println!(
            "wrote {} messages to {}: {} unique events, {} duplicates, {} malformed",
            t.messages,
            path.display(),
            t.unique_events,
            t.duplicates,
            t.malformed
        );
        if !a.no_accounts {
            let accounts = crate::traffic::accounts_file_for(path);
            crate::traffic::write_accounts_file(&accounts, &spec)?;
            println!(
                "wrote {} account records to {} (replay them with --accounts-file {})",
                spec.accounts,
                accounts.display(),
                accounts.display()
            );
        }
        return Ok(());
    }
    let t = crate::traffic::generate(&k, &spec, !a.no_accounts, a.rate).await?;
    println!(
        "wrote {} messages to {}: {} unique events, {} duplicates, {} malformed; {} account records to {}",
        t.messages,
        k.input_topic,
        t.unique_events,
        t.duplicates,
        t.malformed,
        if a.no_accounts { 0 } else { spec.accounts },
        k.accounts_topic
    );
    Ok(())
}

/// The benchmark floor: a consumer that only reads and counts.
fn count_topic(a: CountTopicArgs, k: KafkaConfig) -> Result<()> {
    let topic = a.topic.unwrap_or_else(|| k.input_topic.clone());
    let consumer = crate::kafka::plain_consumer(&k, "gatebill-count")?;
    crate::kafka::require_topic(&consumer, &k.brokers, &topic)?;
    let (ends, total) = crate::kafka::assign_to_end(&consumer, &topic, |p, low, _| {
        if low != 0 {
            return Err(CliError::from(format!("partition {p} starts at offset {low}: the broker deleted data; counts would be wrong")));
        }
        Ok(low)
    })?;
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    let mut count = |m: &rdkafka::message::BorrowedMessage<'_>| {
        bytes += (rdkafka::Message::key(m).map_or(0, <[u8]>::len) + rdkafka::Message::payload(m).map_or(0, <[u8]>::len)) as u64;
        Ok::<_, CliError>(())
    };
    let (read, secs) = match a.until_idle {
        Some(idle) => {
            // Every assigned partition, to whatever comes; the rate's
            // time ends at the last message, not after the idle wait.
            let (mut read, mut last) = (crate::kafka::ReadToEnd::default(), started);
            while last.elapsed() < Duration::from_secs(idle) {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        read.read += 1;
                        last = std::time::Instant::now();
                        count(&m)?;
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "error while counting {topic}"),
                    None => {}
                }
            }
            (read, (last - started).as_secs_f64())
        }
        None => (crate::kafka::read_to_end(&consumer, ends, Duration::from_secs(10), count)?, started.elapsed().as_secs_f64()),
    };
    if !read.unfinished.is_empty() {
        return Err(format!("no message for 10 s before the end offsets of partitions {:?}", read.unfinished).into());
    }
    println!(
        "counted {} of {total} messages ({bytes} bytes of keys and values) in {secs:.2} s: {:.0} msg/s",
        read.read,
        read.read as f64 / secs
    );
    Ok(())
}

#[cfg(test)]
mod operator_mistakes {
    use super::*;

    #[test]
    fn gen_start_yesterday_says_which_format_it_expects() {
        assert_eq!(
            rfc3339_ms("--start", "yesterday").unwrap_err(),
            "--start `yesterday` is not an RFC 3339 time (premature end of input); give a date, a time and a UTC offset, \
             e.g. 2020-11-01T00:00:00+08:00 or 2020-11-01T00:00:00Z"
        );
        assert_eq!(rfc3339_ms("--start", "2020-11-01T00:00:00+08:00"), Ok(1_604_160_000_000));
    }

    #[test]
    fn replay_summary_counts_blank_lines_and_rounds_the_rate() {
        let s = worker::RunSummary {
            messages: 2_000_000,
            billed: 1_990_000,
            duplicates: 9_000,
            rejected: 1_000,
            bills_emitted: 500,
            ..Default::default()
        };
        assert_eq!(
            replay_summary(&s, 1.8223),
            "replayed 2000000 messages in 1.8 s (1,097,514 msg/s): 1990000 billed, 9000 duplicates, 1000 dead-lettered, 500 bill records emitted"
        );
        let s = worker::RunSummary { blank_lines: 3, ..s };
        assert!(replay_summary(&s, 1.8223).ends_with("500 bill records emitted; 3 blank lines skipped"));
    }

    #[test]
    fn inspect_month_must_be_yyyy_mm_as_in_explain() {
        for bad in ["2020-13", "nov"] {
            let err = Cli::try_parse_from(["gatebill", "inspect", "--month", bad]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "invalid value '{bad}' for '--month <MONTH>': `{bad}` is not a month; expected YYYY-MM, e.g. 2020-11"
                )),
                "{text}"
            );
        }
        let cli = Cli::try_parse_from(["gatebill", "inspect", "--month", "2020-11", "--follow"]).unwrap();
        let Command::Inspect(a) = cli.command else { panic!("inspect") };
        assert_eq!(a.month.map(|m| m.to_string()).as_deref(), Some("2020-11"));
    }
}

/// Flags over the environment over the file over the defaults, for every
/// subcommand that takes the common flags.
#[cfg(test)]
mod config_precedence {
    use super::*;
    use crate::config::Config;
    use std::collections::HashMap;

    /// A file giving every common setting a value of its own.
    const FILE: &str = r#"
        [kafka]
        brokers = "file:9092"
        input_topic = "file-events"
        accounts_topic = "file-accounts"
        output_topic = "file-bills"
        dead_letter_topic = "file-dead-letters"
        group_id = "file-group"
        partitions = 3
        [worker]
        state_dir = "file-state"
        [metrics]
        address = "file:9898"
        json_logs = true
    "#;

    /// The configuration `gatebill <argv>` runs with in environment `env`.
    fn settle(argv: &[&str], env: &[(&str, &str)]) -> Result<Checked> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cli = Cli::try_parse_from(std::iter::once("gatebill").chain(argv.iter().copied()))?;
        cli.command.settle(&|name| env.get(name).cloned()).expect("takes the common flags")
    }

    /// A setting as a flag, a variable, and where it lands in [`Config`].
    struct Setting {
        flag: &'static str,
        var: &'static str,
        get: fn(&Config) -> String,
        in_file: &'static str,
    }

    const fn setting(flag: &'static str, var: &'static str, get: fn(&Config) -> String, in_file: &'static str) -> Setting {
        Setting { flag, var, get, in_file }
    }
    const BROKERS: Setting = setting("--brokers", "GATEBILL_BROKERS", |c| c.kafka.brokers.clone(), "file:9092");
    const INPUT: Setting = setting("--input-topic", "GATEBILL_INPUT_TOPIC", |c| c.kafka.input_topic.clone(), "file-events");
    const ACCOUNTS: Setting = setting("--accounts-topic", "GATEBILL_ACCOUNTS_TOPIC", |c| c.kafka.accounts_topic.clone(), "file-accounts");
    const OUTPUT: Setting = setting("--output-topic", "GATEBILL_OUTPUT_TOPIC", |c| c.kafka.output_topic.clone(), "file-bills");
    const DEAD: Setting =
        setting("--dead-letter-topic", "GATEBILL_DEAD_LETTER_TOPIC", |c| c.kafka.dead_letter_topic.clone(), "file-dead-letters");
    const GROUP: Setting = setting("--group-id", "GATEBILL_GROUP_ID", |c| c.kafka.group_id.clone(), "file-group");
    const STATE: Setting = setting("--state-dir", "GATEBILL_STATE_DIR", |c| c.worker.state_dir.display().to_string(), "file-state");
    const METRICS: Setting = setting("--metrics-address", "GATEBILL_METRICS_ADDRESS", |c| c.metrics.address.clone(), "file:9898");

    /// Checks each layer of each setting of `gatebill <command>`: the
    /// default alone, the file over it, the variable over the file, the
    /// flag over the variable. Each setting comes with its default.
    fn check(command: &[&str], settings: &[(Setting, &str)]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatebill.toml");
        std::fs::write(&path, FILE).unwrap();
        let file = path.to_str().unwrap();
        fn join<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
            a.iter().chain(b).copied().collect()
        }
        for (s, default) in settings {
            let get = |argv: &[&str], env: &[(&str, &str)]| (s.get)(&settle(argv, env).unwrap());
            assert_eq!(get(&join(command, &[]), &[]), *default, "{command:?} {}: default", s.flag);
            assert_eq!(get(&join(command, &["--config", file]), &[]), s.in_file, "{command:?} {}: file over default", s.flag);
            assert_eq!(get(&join(command, &[]), &[("GATEBILL_CONFIG", file)]), s.in_file, "{command:?} {}: GATEBILL_CONFIG", s.flag);
            assert_eq!(
                get(&join(command, &["--config", file]), &[(s.var, "env-value")]),
                "env-value",
                "{command:?} {}: env over file",
                s.flag
            );
            assert_eq!(
                get(&join(command, &[s.flag, "flag-value"]), &[(s.var, "env-value")]),
                "flag-value",
                "{command:?} {}: flag over env",
                s.flag
            );
            assert_eq!(
                get(&join(command, &["--config", file, s.flag, "flag-value"]), &[(s.var, "env-value")]),
                "flag-value",
                "{command:?} {}: flag over env and file",
                s.flag
            );
            // A variable a subcommand has no flag for still overrides the file.
            let other = if s.var == "GATEBILL_GROUP_ID" { ("GATEBILL_BROKERS", "env-brokers") } else { ("GATEBILL_GROUP_ID", "env-group") };
            let c = settle(&join(command, &["--config", file]), &[other]).unwrap();
            assert_eq!((s.get)(&c), s.in_file);
        }
    }

    /// The settings of `run` and `replay`, with their defaults.
    fn worker_settings() -> Vec<(Setting, &'static str)> {
        vec![
            (BROKERS, "127.0.0.1:9092"),
            (INPUT, "gateway-events"),
            (ACCOUNTS, "gateway-accounts"),
            (OUTPUT, "gateway-bills"),
            (DEAD, "gateway-dead-letters"),
            (GROUP, "gatebill"),
            (STATE, "gatebill-state"),
            (METRICS, "127.0.0.1:9898"),
        ]
    }

    #[test]
    fn run_config_order() {
        check(&["run"], &worker_settings());
    }

    #[test]
    fn replay_config_order() {
        check(&["replay"], &worker_settings());
        check(&["replay", "--input-file", "events.ndjson"], &[(BROKERS, "127.0.0.1:9092"), (OUTPUT, "gateway-bills")]);
    }

    #[test]
    fn inspect_config_order() {
        check(&["inspect"], &[(BROKERS, "127.0.0.1:9092"), (OUTPUT, "gateway-bills")]);
        // The bug of issue 9: the file's brokers were replaced by the flag's default.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[kafka]\nbrokers = \"kafka-1:9092\"\n").unwrap();
        let c = settle(&["inspect", "--config", path.to_str().unwrap()], &[]).unwrap();
        assert_eq!(c.kafka.brokers, "kafka-1:9092");
    }

    #[test]
    fn gen_config_order() {
        check(&["gen"], &[(BROKERS, "127.0.0.1:9092"), (INPUT, "gateway-events"), (ACCOUNTS, "gateway-accounts")]);
    }

    #[test]
    fn dev_broker_config_order() {
        check(
            &["dev-broker"],
            &[(INPUT, "gateway-events"), (ACCOUNTS, "gateway-accounts"), (OUTPUT, "gateway-bills"), (DEAD, "gateway-dead-letters")],
        );
        // Partitions: a flag and the file, no variable.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatebill.toml");
        std::fs::write(&path, FILE).unwrap();
        let file = path.to_str().unwrap();
        let partitions = |argv: &[&str]| settle(argv, &[]).unwrap().kafka.partitions;
        assert_eq!(partitions(&["dev-broker"]), 6);
        assert_eq!(partitions(&["dev-broker", "--config", file]), 3);
        assert_eq!(partitions(&["dev-broker", "--config", file, "--partitions", "2"]), 2);
    }

    #[test]
    fn compact_config_order() {
        check(&["compact"], &[(STATE, "gatebill-state")]);
    }

    #[test]
    fn count_topic_config_order() {
        check(&["count-topic"], &[(BROKERS, "127.0.0.1:9092")]);
    }

    #[test]
    fn config_flag_beats_gatebill_config() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(&a, "[kafka]\nbrokers = \"a:1\"\n").unwrap();
        std::fs::write(&b, "[kafka]\nbrokers = \"b:1\"\n").unwrap();
        let c = settle(&["run", "--config", a.to_str().unwrap()], &[("GATEBILL_CONFIG", b.to_str().unwrap())]).unwrap();
        assert_eq!(c.kafka.brokers, "a:1");
    }

    #[test]
    fn json_logs_config_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gatebill.toml");
        std::fs::write(&path, FILE).unwrap();
        let file = path.to_str().unwrap();
        for command in ["run", "replay"] {
            let json = |argv: &[&str], env: &[(&str, &str)]| settle(argv, env).unwrap().metrics.json_logs;
            assert!(!json(&[command], &[]));
            assert!(json(&[command, "--config", file], &[]));
            assert!(!json(&[command, "--config", file], &[("GATEBILL_JSON_LOGS", "false")]));
            assert!(json(&[command], &[("GATEBILL_JSON_LOGS", "1")]));
            assert!(json(&[command, "--config", file, "--json-logs"], &[("GATEBILL_JSON_LOGS", "false")]));
        }
        let err = settle(&["run"], &[("GATEBILL_JSON_LOGS", "maybe")]).unwrap_err().to_string();
        assert_eq!(err, "invalid configuration: GATEBILL_JSON_LOGS=`maybe`: use true or false");
    }

    #[test]
    fn an_empty_metrics_address_from_the_environment_disables_the_endpoint() {
        let c = settle(&["run"], &[("GATEBILL_METRICS_ADDRESS", "")]).unwrap();
        assert_eq!(c.metrics.address, "");
    }
}
