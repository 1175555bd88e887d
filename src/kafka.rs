//! Kafka plumbing, in one place: client configuration, a worker's clients
//! ([`worker_clients`]), topic creation, producing the outbox, and the
//! bounded read ([`assign_to_end`], then [`read_to_end`]).

use crate::config::KafkaConfig;
use crate::store::OutboxRecord;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A Kafka failure with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// A helper thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(String),
    /// Client creation or a request failed.
    #[error("kafka: {what}: {source}; check --brokers and the [kafka.properties] security settings")]
    Client {
        /// What was being done.
        what: String,
        /// The client error.
        source: rdkafka::error::KafkaError,
    },
    /// The changelog's partitions do not match the input's.
    #[error(
        "kafka: the changelog topic {changelog} has {changelog_partitions} partitions and the input topic {input} has \
         {input_partitions}; they must be equal (input partition p's state lives in changelog partition p). Create the \
         changelog with {input_partitions} partitions under another name (kafka.changelog_topic) and start from empty \
         state directories, or give the input its old partition count back"
    )]
    ChangelogPartitions {
        /// Changelog topic.
        changelog: String,
        /// Its partitions.
        changelog_partitions: i32,
        /// Input topic.
        input: String,
        /// Its partitions.
        input_partitions: i32,
    },
    /// A topic to read does not exist (`inspect`, `count-topic`).
    #[error(
        "kafka: topic {topic} does not exist on the broker at {brokers} (it has {existing}); check the topic name \
         (--output-topic, --topic, the configuration file or GATEBILL_*_TOPIC) and --brokers"
    )]
    NoSuchTopic {
        /// The topic asked for.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
        /// The topics that exist, for the message (`no topics`, or their names).
        existing: String,
    },
    /// Topics are missing and creation is off.
    #[error("kafka: topic(s) {0} do not exist; create them (see docker-compose.yml) or set kafka.create_topics = true")]
    MissingTopics(String),
    /// The broker did not create the missing topics: it refused, or it
    /// cannot (`gatebill dev-broker`, librdkafka's mock cluster, has no
    /// controller and lets the request time out).
    #[error(
        "kafka: the broker at {brokers} did not create the missing topic(s) {topics} ({reason}). Create them on the \
         broker, or name topics that exist (--config, the topic flags or GATEBILL_*_TOPIC). If the broker is `gatebill \
         dev-broker`, which cannot create topics on request, restart it with the same topic names: the same --config \
         file, or --input-topic/--accounts-topic/--output-topic/--dead-letter-topic"
    )]
    CreateFailed {
        /// The bootstrap servers.
        brokers: String,
        /// The missing topics, comma-separated.
        topics: String,
        /// The broker's answer, or the admin client's error.
        reason: String,
    },
}

/// Base client configuration: bootstrap servers, then the user's properties.
pub fn client_config(k: &KafkaConfig, own: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, value) in own {
        c.set(*key, *value);
    }
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

fn err(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaSetupError {
    let what = what.into();
    move |source| KafkaSetupError::Client { what, source }
}

/// Settings of every gatebill producer: idempotent, acks=all, lz4.
const PRODUCER: [(&str, &str); 5] =
    [("enable.idempotence", "true"), ("acks", "all"), ("compression.type", "lz4"), ("linger.ms", "5"), ("message.timeout.ms", "30000")];

/// The producer for bills and dead letters ([`PRODUCER`] settings).
pub fn producer(k: &KafkaConfig) -> Result<FutureProducer, KafkaSetupError> {
    client_config(k, &PRODUCER).create().map_err(err("creating the producer"))
}

/// How long librdkafka waits before fetching again for a partition whose
/// local queue was over its thresholds (default 1,000 ms). The worker drains
/// its queue in bursts (a batch, then a write), so the default starved the
/// next batch: 10 ms halved the time to read 500,000 messages (3.8 s to
/// 1.8 s on the embedded broker). `[kafka.properties]` can override it.
pub const FETCH_QUEUE_BACKOFF: (&str, &str) = ("fetch.queue.backoff.ms", "10");

/// Every gatebill reader sees only committed transactional data (librdkafka's
/// default too, set here so no `[kafka.properties]` default elsewhere can
/// change it unnoticed; a user's explicit setting still wins).
pub const READ_COMMITTED: (&str, &str) = ("isolation.level", "read_committed");

/// A consumer without group membership, for reading topics by assignment.
pub fn plain_consumer(k: &KafkaConfig, group: &str) -> Result<BaseConsumer, KafkaSetupError> {
    assigning_consumer(k, group, None).map_err(err("creating a consumer"))
}

/// [`plain_consumer`]'s settings, plus `extra`.
fn assigning_consumer(k: &KafkaConfig, group: &str, extra: Option<(&str, &str)>) -> Result<BaseConsumer, rdkafka::error::KafkaError> {
    let mut own =
        vec![("group.id", group), ("enable.auto.commit", "false"), ("enable.partition.eof", "false"), READ_COMMITTED, FETCH_QUEUE_BACKOFF];
    own.extend(extra);
    client_config(k, &own).create()
}

/// A consumer for reading changelog partitions to their ends: like
/// [`plain_consumer`], but the broker answers a fetch at once when it has
/// nothing more (`fetch.wait.max.ms` 10 instead of 500), so that finding a
/// partition's end (often behind a transaction marker, which is never
/// delivered as a message) costs milliseconds, not half a second.
pub fn restore_consumer(k: &KafkaConfig, group: &str) -> Result<BaseConsumer, KafkaSetupError> {
    assigning_consumer(k, group, Some(("fetch.wait.max.ms", "10"))).map_err(err("creating the changelog consumer"))
}

/// The clients of one worker, built together by [`worker_clients`].
pub struct WorkerClients<C: ConsumerContext + 'static> {
    /// Bills and dead letters ([`producer`]).
    pub producer: FutureProducer,
    /// The input topic, as a member of the consumer group; `context` places
    /// each assigned partition.
    pub events: StreamConsumer<C>,
    /// The accounts topic, read by assignment (every worker reads all of it).
    pub accounts: BaseConsumer,
    /// End offsets of the input topic, for lag and idleness, asked from a
    /// thread of its own.
    pub lag: BaseConsumer,
}

/// How much the event consumer prefetches (librdkafka's default is 64 MB):
/// a batch of 50,000 gateway events is about 17 MB, so 16 MB keeps the next
/// batch coming while it is written, and a Kafka replay of the bench's
/// 500,000 events peaks 60-80 MB lower (234-241 MB against 315-317 MB, no
/// slower). `[kafka.properties]` overrides it.
pub const PREFETCH: (&str, &str) = ("queued.max.messages.kbytes", "16384");

/// Everything a worker talks to Kafka with, from the checked configuration
/// in one call: the five topics made sure of ([`ensure_topics`]), then the
/// producer and the three consumers.
pub async fn worker_clients<C: ConsumerContext + 'static>(k: &KafkaConfig, context: C) -> Result<WorkerClients<C>, KafkaSetupError> {
    ensure_topics(k).await?;
    let events = client_config(
        k,
        &[
            ("group.id", k.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            ("fetch.min.bytes", "1"),
            READ_COMMITTED,
            FETCH_QUEUE_BACKOFF,
            PREFETCH,
        ],
    )
    .create_with_context(context)
    .map_err(err("creating the event consumer"))?;
    Ok(WorkerClients {
        producer: producer(k)?,
        events,
        accounts: plain_consumer(k, &format!("{}-accounts", k.group_id))?,
        lag: plain_consumer(k, &format!("{}-lag", k.group_id))?,
    })
}

/// Partition counts of topics, from cluster metadata (absent = no such topic).
pub fn partition_counts<X: ConsumerContext + 'static>(
    consumer: &impl Consumer<X>,
    topics: &[&str],
) -> Result<BTreeMap<String, i32>, KafkaSetupError> {
    let md = consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(err("fetching cluster metadata"))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| topics.contains(&t.name()) && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Fails with [`KafkaSetupError::NoSuchTopic`] unless `topic` exists with
/// at least one partition: a read of a topic that does not exist would
/// otherwise find nothing and say nothing.
pub fn require_topic<X: ConsumerContext + 'static>(consumer: &impl Consumer<X>, brokers: &str, topic: &str) -> Result<(), KafkaSetupError> {
    let md = consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(err("fetching cluster metadata"))?;
    let found = md.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if found {
        return Ok(());
    }
    let mut names: Vec<&str> = md.topics().iter().map(|t| t.name()).filter(|n| !n.starts_with("__")).collect();
    names.sort_unstable();
    let existing = match names.len() {
        0 => "no topics".to_string(),
        n if n <= 20 => format!("topics {}", names.join(", ")),
        n => format!("{n} topics, among them {}", names[..20].join(", ")),
    };
    Err(KafkaSetupError::NoSuchTopic { topic: topic.to_string(), brokers: brokers.to_string(), existing })
}

/// Where a bounded read stops: for each partition with something to read,
/// the end offset seen when it was assigned.
pub type Ends = BTreeMap<i32, i64>;

/// The first half of every bounded read ("from a start offset to the end
/// offsets seen at start"): assigns each partition of `topic` to `consumer`
/// from the offset `start` picks for it, given the partition, its log start
/// and its end (never below the log start), and returns the end offsets seen
/// now of the partitions with something to read, and how many messages that
/// is. Some brokers report ends early (tansu 0.6.0: the last batch's base
/// offset + 1), so callers count what they really read.
pub fn assign_to_end<X, E>(
    consumer: &impl Consumer<X>,
    topic: &str,
    mut start: impl FnMut(i32, i64, i64) -> Result<i64, E>,
) -> Result<(Ends, u64), E>
where
    X: ConsumerContext + 'static,
    E: From<KafkaSetupError>,
{
    let n = partition_counts(consumer, &[topic])?.get(topic).copied().unwrap_or(0);
    let mut tpl = TopicPartitionList::new();
    let mut ends = Ends::new();
    let mut total = 0u64;
    for p in 0..n {
        let (low, high) =
            consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map_err(err(&format!("reading the end of {topic}/{p}")))?;
        let from = start(p, low, high)?.max(low);
        if from < high {
            ends.insert(p, high);
            total += (high - from) as u64;
        }
        tpl.add_partition_offset(topic, p, Offset::Offset(from)).expect("a valid offset");
    }
    consumer.assign(&tpl).map_err(err(&format!("assigning {topic}")))?;
    Ok((ends, total))
}

/// What [`read_to_end`] read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadToEnd {
    /// Messages read, every one counted.
    pub read: u64,
    /// Partitions that did not reach their end (no message for the idle limit).
    pub unfinished: Vec<i32>,
}

/// The second half of a bounded read: polls `consumer` (assigned by
/// [`assign_to_end`]) until every partition in `ends` reached its end, or no
/// message came for `idle`, handing each message to `f`.
pub fn read_to_end<E>(
    consumer: &BaseConsumer,
    mut ends: Ends,
    idle: Duration,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<ReadToEnd, E> {
    let mut read = 0u64;
    let mut last = Instant::now();
    while !ends.is_empty() && last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                read += 1;
                last = Instant::now();
                if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                    ends.remove(&m.partition());
                }
                f(&m)?;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "error while reading a topic to its end"),
            None => {}
        }
    }
    Ok(ReadToEnd { read, unfinished: ends.into_keys().collect() })
}

/// Reads one partition of `topic` from `from` (never below its log start)
/// to the end offset seen now, handing each message to `f`; stops early
/// when no message came for `idle`. Returns the messages read (every one
/// counted: some brokers report ends early) and, when it was reached, that
/// end offset. The end is judged by the consumer's position too, so a log
/// that ends in a transaction marker is read to its end.
pub fn read_partition<E>(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    idle: Duration,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<(u64, Option<i64>), E>
where
    E: From<KafkaSetupError>,
{
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(err(format!("reading the end of {topic}/{partition}")))?;
    let from = from.max(low);
    if from >= high {
        return Ok((0, Some(high)));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from)).expect("a valid offset");
    consumer.assign(&tpl).map_err(err(format!("assigning {topic}/{partition}")))?;
    let mut read = 0u64;
    let mut last = Instant::now();
    let reached = |c: &BaseConsumer| {
        c.position()
            .ok()
            .is_some_and(|p| p.find_partition(topic, partition).is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= high)))
    };
    let done = loop {
        if last.elapsed() >= idle {
            break false;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                read += 1;
                last = Instant::now();
                let end = m.offset() + 1 >= high;
                f(&m)?;
                if end {
                    break true;
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "error while reading {topic}/{partition}"),
            None => {
                if reached(consumer) {
                    break true;
                }
            }
        }
    };
    let _ = consumer.unassign();
    Ok((read, done.then_some(high)))
}

/// Makes sure the six topics exist: creates the missing ones (accounts,
/// bills and the changelog compacted) or reports them, as configured; and
/// that the changelog has as many partitions as the input.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), KafkaSetupError> {
    ensure_these_topics(k, &k.topics()).await?;
    let consumer = plain_consumer(k, "gatebill-metadata")?;
    let counts = partition_counts(&consumer, &[&k.input_topic, &k.changelog_topic])?;
    match (counts.get(&k.input_topic), counts.get(&k.changelog_topic)) {
        (Some(i), Some(c)) if i != c => Err(KafkaSetupError::ChangelogPartitions {
            changelog: k.changelog_topic.clone(),
            changelog_partitions: *c,
            input: k.input_topic.clone(),
            input_partitions: *i,
        }),
        _ => Ok(()),
    }
}

/// How long the broker gets to create missing topics. A real broker takes
/// well under a second; the dev broker never answers.
pub const CREATE_TOPICS_TIMEOUT: Duration = Duration::from_secs(15);

/// [`ensure_topics`] for some of the five topics of `k`.
pub async fn ensure_these_topics(k: &KafkaConfig, wanted: &[&str]) -> Result<(), KafkaSetupError> {
    let consumer = plain_consumer(k, "gatebill-metadata")?;
    let existing = partition_counts(&consumer, wanted)?;
    let missing: Vec<&str> = wanted.iter().copied().filter(|t| !existing.contains_key(*t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !k.create_topics {
        return Err(KafkaSetupError::MissingTopics(missing.join(", ")));
    }
    let failed = |reason: String| KafkaSetupError::CreateFailed { brokers: k.brokers.clone(), topics: missing.join(", "), reason };
    tracing::info!(topics = %missing.join(", "), partitions = k.partitions, "creating missing topics");
    let admin: AdminClient<DefaultClientContext> = client_config(k, &[]).create().map_err(err("creating the admin client"))?;
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|t| {
            let nt = NewTopic::new(t, k.partitions, TopicReplication::Fixed(k.replication));
            if *t == k.accounts_topic || *t == k.output_topic || *t == k.changelog_topic {
                nt.set("cleanup.policy", "compact")
            } else {
                nt
            }
        })
        .collect();
    let options = AdminOptions::new().request_timeout(Some(CREATE_TOPICS_TIMEOUT));
    let results = admin.create_topics(&new, &options).await.map_err(|e| failed(e.to_string()))?;
    let refused: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err())
        .filter(|(_, code)| *code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)
        .map(|(topic, code)| format!("{topic}: {code}"))
        .collect();
    if !refused.is_empty() {
        return Err(failed(refused.join("; ")));
    }
    tracing::info!(topics = %missing.join(", "), partitions = k.partitions, "created missing topics");
    Ok(())
}

/// Produces records and waits for every acknowledgement. Returns the ones
/// delivered; failures are logged and stay in the outbox for the next try.
pub async fn produce_all(producer: &FutureProducer, records: &[(Vec<u8>, OutboxRecord)]) -> Vec<(Vec<u8>, OutboxRecord)> {
    let refs: Vec<&OutboxRecord> = records.iter().map(|(_, r)| r).collect();
    let acked = produce_acked(producer, &refs).await;
    records.iter().zip(acked).filter(|(_, a)| *a).map(|(r, _)| r.clone()).collect()
}

/// Produces records and waits for every acknowledgement: one flag per
/// record, in order, true where the broker acknowledged it. Nothing is
/// copied but into librdkafka's queue; failures are logged.
pub async fn produce_acked(producer: &FutureProducer, records: &[&OutboxRecord]) -> Vec<bool> {
    produce_acked_marking(producer, records, |_| false).await
}

/// [`produce_acked`]; records for which `unconfirmed` holds carry the
/// [`crate::changelog::UNCONFIRMED`] header too.
async fn produce_acked_marking(
    producer: &FutureProducer,
    records: &[&OutboxRecord],
    unconfirmed: impl Fn(&OutboxRecord) -> bool,
) -> Vec<bool> {
    let mut acked = Vec::with_capacity(records.len());
    let mut in_flight = Vec::with_capacity(records.len());
    for &rec in records {
        let i = acked.len();
        acked.push(false);
        let mark = unconfirmed(rec);
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len() + usize::from(mark));
        // A changelog tombstone goes out as its key with no value.
        let mut tombstone = false;
        for (k, v) in &rec.headers {
            if k == crate::changelog::TOMBSTONE {
                tombstone = true;
                continue;
            }
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        if mark {
            headers = headers.insert(Header { key: crate::changelog::UNCONFIRMED, value: Some(&b"1"[..]) });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&rec.topic).headers(headers);
        if !tombstone {
            fr = fr.payload(&rec.payload[..]);
        }
        if let Some(k) = &rec.key {
            fr = fr.key(&k[..]);
        }
        if let Some(p) = rec.partition {
            fr = fr.partition(p);
        }
        loop {
            match producer.send_result(fr) {
                Ok(f) => {
                    in_flight.push((i, rec, f));
                    break;
                }
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    // Wait for what is in flight before queueing more.
                    await_acks(&mut in_flight, &mut acked).await;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic = %rec.topic, "cannot queue record; it stays in the outbox");
                    break;
                }
            }
        }
    }
    await_acks(&mut in_flight, &mut acked).await;
    acked
}

async fn await_acks(in_flight: &mut Vec<(usize, &OutboxRecord, rdkafka::producer::DeliveryFuture)>, acked: &mut [bool]) {
    for (i, r, f) in in_flight.drain(..) {
        match f.await {
            Ok(Ok(_)) => acked[i] = true,
            Ok(Err((e, _))) => tracing::warn!(error = %e, topic = %r.topic, "delivery failed; the record stays in the outbox"),
            Err(_) => tracing::warn!(topic = %r.topic, "delivery cancelled; the record stays in the outbox"),
        }
    }
}

/// Headers of a message as owned pairs.
pub fn owned_headers<H: Headers>(h: Option<&H>) -> Vec<(String, Vec<u8>)> {
    let Some(h) = h else { return Vec::new() };
    h.iter().map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()
}

/// How long a transactional call may block before it counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// Commits of one transaction retried when the broker says "retry".
const TXN_COMMIT_TRIES: u32 = 5;

/// Aborts of one transaction tried when the broker says "retry", and how
/// long each may block: a worker whose abort keeps failing stops after
/// about 30 s ([`TxnError::Unusable`]).
const TXN_ABORT_TRIES: u32 = 3;
const TXN_ABORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a transactional producer that gets no answer (a broker that
/// drops a fenced producer's connections instead of refusing it, as tansu
/// may) takes to give up and stop the worker: offsets and every commit try
/// each wait [`TXN_TIMEOUT`], then every abort try [`TXN_ABORT_TIMEOUT`].
pub const TXN_GIVE_UP: Duration =
    Duration::from_secs(TXN_TIMEOUT.as_secs() * (TXN_COMMIT_TRIES as u64 + 1) + TXN_ABORT_TIMEOUT.as_secs() * TXN_ABORT_TRIES as u64);

/// Why a transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Aborted (or never committed): nothing of it becomes visible to
    /// `read_committed` readers. The caller forgets the staged state and
    /// reads the input again from its stored positions.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// The producer is fenced or failed fatally: nothing it writes can
    /// commit any more.
    #[error(
        "the transactional producer can no longer commit ({0}): another worker with the same transactional.id \
         started, or the broker ended this producer's epoch. This worker stops; its partitions are \
         served by the group's other workers. Restart it to rejoin (give each worker its own \
         kafka.transactional_id, or leave it empty)"
    )]
    Fenced(String),
    /// Aborting failed: the producer's state is unknown. On Kafka a fenced
    /// producer's abort fails fatally (then it is [`TxnError::Fenced`]);
    /// some brokers time out or drop the connection instead.
    #[error(
        "the transactional producer could not abort its transaction ({0}), so its state is unknown. This \
         worker stops without writing the batch; its partitions are served by the group's other workers. \
         Restart it: the new producer's registration aborts whatever this one left open"
    )]
    Unusable(String),
}

/// What a failed transactional call asks for.
fn txn_failure(e: &rdkafka::error::KafkaError) -> (bool, bool) {
    // (fatal, retriable)
    match e {
        rdkafka::error::KafkaError::Transaction(r) => (r.is_fatal(), r.is_retriable() && !r.txn_requires_abort()),
        _ => (false, false),
    }
}

/// The transactional producer of one worker: every call that blocks runs
/// off the async reactor.
#[derive(Clone)]
pub struct Transactional {
    producer: FutureProducer,
    /// Produced and acknowledged first in a transaction (see [`Transactional::commit`]).
    changelog_topic: String,
}

/// The `transactional.id` of a worker: the configured one, or the group id
/// with a hash of the host name and the state directory (stable across a
/// worker's restarts, distinct for two workers on one host).
pub fn transactional_id(k: &KafkaConfig, state_dir: &std::path::Path) -> String {
    if !k.transactional_id.is_empty() {
        return k.transactional_id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_default();
    let dir = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = xxhash_rust::xxh3::xxh3_64(format!("{}\n{}", host.trim(), dir.display()).as_bytes());
    format!("{}-{digest:016x}", k.group_id)
}

impl Transactional {
    /// A transactional producer ([`PRODUCER`] settings) registered with
    /// the broker: `init_transactions` fences any earlier producer with the
    /// same id and aborts its open transaction.
    pub async fn start(k: &KafkaConfig, id: &str) -> Result<Transactional, KafkaSetupError> {
        let mut own = vec![("transactional.id", id), ("transaction.timeout.ms", "60000")];
        own.extend(PRODUCER);
        let producer: FutureProducer = client_config(k, &own).create().map_err(err("creating the transactional producer"))?;
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(TXN_TIMEOUT))
            .await
            .map_err(|e| KafkaSetupError::Thread(e.to_string()))?
            .map_err(err(format!("registering transactional.id {id} (the broker needs transactions: Kafka >= 2.5 or Redpanda; or set kafka.transactions = false)")))?;
        Ok(Transactional { producer, changelog_topic: k.changelog_topic.clone() })
    }

    /// One transaction: `records`, then (when `offsets` is not empty) the
    /// consumer group's offsets, committed together. Commit errors the
    /// broker calls retriable are retried; anything else aborts.
    ///
    /// The changelog records are produced and acknowledged before the
    /// others, bill states with the [`crate::changelog::UNCONFIRMED`]
    /// header; once the others are acknowledged, the bill states are
    /// produced again without it. On a broker that shows records of open or
    /// aborted transactions (the mock cluster, tansu), a bill a reader may
    /// have seen then always has its state in the changelog, so the next
    /// owner of the partition continues the revisions above it; and a state
    /// whose bill may not have reached the output topic is known as such,
    /// so that owner sends the bill again (`changelog::Restore::offer_bill`).
    pub async fn commit(
        &self,
        records: &[OutboxRecord],
        offsets: TopicPartitionList,
        group: Option<rdkafka::consumer::ConsumerGroupMetadata>,
    ) -> Result<(), TxnError> {
        if let Err(e) = self.producer.begin_transaction() {
            let (fatal, _) = txn_failure(&e);
            return Err(if fatal { TxnError::Fenced(e.to_string()) } else { TxnError::Aborted(format!("begin: {e}")) });
        }
        let (first, then): (Vec<&OutboxRecord>, Vec<&OutboxRecord>) = records.iter().partition(|r| r.topic == self.changelog_topic);
        let confirm: Vec<&OutboxRecord> =
            first.iter().copied().filter(|r| crate::changelog::needs_confirmation(r.key.as_deref())).collect();
        let mut delivered = self.produce_marked(&first, true).await;
        if delivered == first.len() {
            delivered += self.produce(&then).await;
        }
        if delivered == records.len() {
            delivered += self.produce(&confirm).await;
        }
        if delivered < records.len() + confirm.len() {
            return Err(self
                .abort(format!("{} of {} records not delivered", records.len() + confirm.len() - delivered, records.len() + confirm.len()))
                .await);
        }
        if let (true, Some(group)) = (offsets.count() > 0, group) {
            let p = self.producer.clone();
            let sent = tokio::task::spawn_blocking(move || p.send_offsets_to_transaction(&offsets, &group, TXN_TIMEOUT)).await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if txn_failure(&e).0 {
                        return Err(TxnError::Fenced(e.to_string()));
                    }
                    return Err(self.abort(format!("the input offsets were not accepted: {e}")).await);
                }
                Err(e) => return Err(self.abort(e.to_string()).await),
            }
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let p = self.producer.clone();
            let done = tokio::task::spawn_blocking(move || p.commit_transaction(TXN_TIMEOUT)).await;
            match done {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    let (fatal, retriable) = txn_failure(&e);
                    if fatal {
                        return Err(TxnError::Fenced(e.to_string()));
                    }
                    if retriable && tries < TXN_COMMIT_TRIES {
                        tracing::warn!(error = %e, tries, "committing the transaction failed; retrying");
                        continue;
                    }
                    return Err(self.abort(format!("commit: {e}")).await);
                }
                Err(e) => return Err(self.abort(e.to_string()).await),
            }
        }
    }

    /// A fault point for tests (`fault-injection` feature): begins a
    /// transaction and produces `records` without committing it (the process then stops as a crash
    /// would; the next `init_transactions` with this id aborts it).
    #[cfg(feature = "fault-injection")]
    pub async fn produce_only(&self, records: &[OutboxRecord]) {
        if self.producer.begin_transaction().is_ok() {
            self.produce(&records.iter().collect::<Vec<_>>()).await;
        }
    }

    /// A fault point for tests (`fault-injection` feature): begins a
    /// transaction and produces what
    /// [`Transactional::commit`] produces before any other record (the
    /// changelog's), then nothing more: a writer that died between.
    #[cfg(feature = "fault-injection")]
    pub async fn produce_changelog_only(&self, records: &[OutboxRecord]) {
        if self.producer.begin_transaction().is_ok() {
            let first: Vec<&OutboxRecord> = records.iter().filter(|r| r.topic == self.changelog_topic).collect();
            self.produce_marked(&first, true).await;
        }
    }

    /// Produces `records` into the open transaction; returns how many were
    /// delivered.
    async fn produce(&self, records: &[&OutboxRecord]) -> usize {
        self.produce_marked(records, false).await
    }

    /// [`Transactional::produce`]; with `unconfirmed`, bill states carry
    /// the [`crate::changelog::UNCONFIRMED`] header.
    async fn produce_marked(&self, records: &[&OutboxRecord], unconfirmed: bool) -> usize {
        if records.is_empty() {
            return 0;
        }
        let mark = |r: &OutboxRecord| unconfirmed && crate::changelog::needs_confirmation(r.key.as_deref());
        produce_acked_marking(&self.producer, records, mark).await.into_iter().filter(|a| *a).count()
    }

    /// Aborts the open transaction; returns why, as the error to hand up.
    /// An abort the broker calls retriable (a timeout, a coordinator
    /// moving) is tried [`TXN_ABORT_TRIES`] times.
    async fn abort(&self, why: String) -> TxnError {
        let mut tries = 0;
        loop {
            tries += 1;
            let p = self.producer.clone();
            match tokio::task::spawn_blocking(move || p.abort_transaction(TXN_ABORT_TIMEOUT)).await {
                Ok(Ok(())) => return TxnError::Aborted(why),
                Ok(Err(e)) if txn_failure(&e).0 => return TxnError::Fenced(format!("{why}; then abort: {e}")),
                Ok(Err(e)) if tries < TXN_ABORT_TRIES && matches!(&e, rdkafka::error::KafkaError::Transaction(r) if r.is_retriable()) => {
                    tracing::warn!(error = %e, tries, "aborting the transaction failed; retrying");
                }
                // A producer whose abort failed cannot be trusted with the next
                // transaction (tansu, for one, drops a fenced producer's abort).
                Ok(Err(e)) => return TxnError::Unusable(format!("{why}; then abort ({tries} tries): {e}")),
                Err(e) => return TxnError::Unusable(format!("{why}; then abort: {e}")),
            }
        }
    }
}
