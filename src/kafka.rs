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
use rdkafka::producer::{FutureProducer, FutureRecord};
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

/// The producer for bills and dead letters: idempotent, acks=all, lz4.
pub fn producer(k: &KafkaConfig) -> Result<FutureProducer, KafkaSetupError> {
    client_config(
        k,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.type", "lz4"),
            ("linger.ms", "5"),
            ("message.timeout.ms", "30000"),
        ],
    )
    .create()
    .map_err(err("creating the producer"))
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
    client_config(
        k,
        &[("group.id", group), ("enable.auto.commit", "false"), ("enable.partition.eof", "false"), READ_COMMITTED, FETCH_QUEUE_BACKOFF],
    )
    .create()
    .map_err(err("creating a consumer"))
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

/// Everything a worker talks to Kafka with, from the checked configuration
/// in one call: the four topics made sure of ([`ensure_topics`]), then the
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

/// Makes sure the four topics exist: creates the missing ones (accounts and
/// bills compacted) or reports them, as configured.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), KafkaSetupError> {
    ensure_these_topics(k, &[&k.input_topic, &k.accounts_topic, &k.output_topic, &k.dead_letter_topic]).await
}

/// How long the broker gets to create missing topics. A real broker takes
/// well under a second; the dev broker never answers.
pub const CREATE_TOPICS_TIMEOUT: Duration = Duration::from_secs(15);

/// [`ensure_topics`] for some of the four topics of `k`.
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
            if *t == k.accounts_topic || *t == k.output_topic {
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
    let mut delivered = Vec::with_capacity(records.len());
    let mut in_flight = Vec::with_capacity(records.len());
    for (key, rec) in records {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (k, v) in &rec.headers {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&rec.topic).payload(&rec.payload[..]).headers(headers);
        if let Some(k) = &rec.key {
            fr = fr.key(&k[..]);
        }
        loop {
            match producer.send_result(fr) {
                Ok(f) => {
                    in_flight.push((key, rec, f));
                    break;
                }
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    // Drain what is in flight before queueing more.
                    for (k, r, f) in in_flight.drain(..) {
                        if let Ok(Ok(_)) = f.await {
                            delivered.push((k.clone(), r.clone()));
                        }
                    }
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, topic = %rec.topic, "cannot queue record; it stays in the outbox");
                    break;
                }
            }
        }
    }
    for (k, r, f) in in_flight {
        match f.await {
            Ok(Ok(_)) => delivered.push((k.clone(), r.clone())),
            Ok(Err((e, _))) => tracing::warn!(error = %e, topic = %r.topic, "delivery failed; the record stays in the outbox"),
            Err(_) => tracing::warn!(topic = %r.topic, "delivery cancelled; the record stays in the outbox"),
        }
    }
    delivered
}

/// Headers of a message as owned pairs.
pub fn owned_headers<H: Headers>(h: Option<&H>) -> Vec<(String, Vec<u8>)> {
    let Some(h) = h else { return Vec::new() };
    h.iter().map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()
}
