//! The traffic generator behind `gatebill gen`, the demo, tests and
//! benchmarks: deterministic (seeded) access events and account records,
//! with skew, duplicates and malformed messages in chosen shares.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The account of the spec's seed example: activated 2019-11-10 17:13:14 Beijing time.
pub const SEED_ACCOUNT: &str = "1250000001";
/// Its activation time.
pub const SEED_ACTIVATION: &str = "2019-11-10T17:13:14+08:00";
/// How many recent events duplicates are drawn from.
const RECENT: usize = 64;
const REGIONS: [&str; 3] = ["ap-beijing", "ap-guangzhou", "ap-shanghai"];

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenSpec {
    /// Events to write (duplicates and malformed messages included).
    pub events: u64,
    /// Accounts; the first is always the seed account.
    pub accounts: u64,
    /// Zipf exponent of account popularity (0 = uniform).
    pub skew: f64,
    /// First event time, epoch ms.
    pub start_ms: i64,
    /// Length of the time range, days.
    pub days: u32,
    /// Share of messages that repeat an earlier event exactly.
    pub duplicates: f64,
    /// Share of messages that are malformed.
    pub malformed: f64,
    /// Random seed.
    pub seed: u64,
}

/// One generated message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenMessage {
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Vec<u8>,
}

/// Counts the generator knows about what it wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenTruth {
    /// Messages written.
    pub messages: u64,
    /// Distinct valid events.
    pub unique_events: u64,
    /// Exact repeats of earlier events.
    pub duplicates: u64,
    /// Malformed messages.
    pub malformed: u64,
}

/// Account records: the seed account, then accounts activated over 2019-2020,
/// every fifth with a calls pack.
pub fn accounts(n: u64, seed: u64) -> Vec<GenMessage> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xacc0);
    (0..n)
        .map(|i| {
            let id = account_id(i);
            let activated = if i == 0 {
                SEED_ACTIVATION.to_string()
            } else {
                let t = 1_546_272_000 + rng.random_range(0..(2 * 365 * 86_400i64));
                chrono::DateTime::from_timestamp(t, 0).expect("valid").to_rfc3339()
            };
            let packs = if i % 5 == 3 {
                format!(
                    r#"[{{"id":"pk-{i}","item":"calls","quantity":{},"valid_from":"2019-01-01T00:00:00+08:00","valid_until":"2022-01-01T00:00:00+08:00"}}]"#,
                    rng.random_range(1_000..100_000)
                )
            } else {
                "[]".to_string()
            };
            // Pricing terms (rule book 11.3) on some accounts: a 10% discount
            // from November 2020, or own prices for December 2020 to February 2021.
            let pricing = match (i % 7, i % 11) {
                (4, _) => r#","pricing":[{"id":"discount-10","effective_from":"2020-11","discount":"0.10"}]"#,
                (_, 6) => {
                    r#","pricing":[{"id":"own-prices","effective_from":"2020-12","effective_until":"2021-03","prices":{"calls":[{"up_to":10000000,"price":"0.05"},{"price":"0.03"}],"traffic_default":[{"price":"0.60"}]}}]"#
                }
                _ => "",
            };
            let payload = format!(r#"{{"account_id":"{id}","activated_at":"{activated}","resource_packs":{packs}{pricing}}}"#);
            GenMessage { key: Some(id.into_bytes()), payload: payload.into_bytes() }
        })
        .collect()
}

/// The id of the i-th generated account.
pub fn account_id(i: u64) -> String {
    (1_250_000_001 + i).to_string()
}

/// A Zipf-like sampler over `n` items.
struct Popularity {
    cumulative: Vec<f64>,
}

impl Popularity {
    fn new(n: u64, s: f64) -> Popularity {
        let mut acc = 0.0;
        let cumulative = (0..n.max(1))
            .map(|i| {
                acc += 1.0 / ((i + 1) as f64).powf(s);
                acc
            })
            .collect();
        Popularity { cumulative }
    }
    fn sample(&self, rng: &mut SmallRng) -> u64 {
        let x = rng.random::<f64>() * self.cumulative.last().copied().unwrap_or(1.0);
        self.cumulative.partition_point(|c| *c < x).min(self.cumulative.len() - 1) as u64
    }
}

/// Generates the event stream, calling `sink` for each message in order.
pub fn events(spec: &GenSpec, mut sink: impl FnMut(GenMessage)) -> GenTruth {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let pop = Popularity::new(spec.accounts, spec.skew);
    let span_ms = i64::from(spec.days.max(1)) * 86_400_000;
    let mut truth = GenTruth::default();
    // A ring of recent valid events to repeat as duplicates (redeliveries
    // are close in time to the original, as in real gateway logs).
    let mut recent: Vec<GenMessage> = Vec::with_capacity(RECENT);
    for i in 0..spec.events {
        truth.messages += 1;
        let roll: f64 = rng.random();
        if roll < spec.malformed {
            truth.malformed += 1;
            sink(malformed(i, &mut rng));
            continue;
        }
        if roll < spec.malformed + spec.duplicates && !recent.is_empty() {
            truth.duplicates += 1;
            let m = recent[rng.random_range(0..recent.len())].clone();
            sink(m);
            continue;
        }
        let account = account_id(pop.sample(&mut rng));
        // Roughly in time order, as gateways write logs, with 10 minutes of jitter.
        let t = spec.start_ms + (span_ms as f64 * i as f64 / spec.events.max(1) as f64) as i64 + rng.random_range(0..600_000);
        let t = t.min(spec.start_ms + span_ms - 1);
        let region = REGIONS[rng.random_range(0..REGIONS.len())];
        let backend = match rng.random_range(0..20) {
            0..=9 => format!(
                r#"{{"type":"http","region":"{region}","in_cloud":true,"address":"private","request_bytes":{},"response_bytes":{}}}"#,
                rng.random_range(100..4_000),
                rng.random_range(200..30_000)
            ),
            10..=13 => format!(
                r#"{{"type":"http","in_cloud":false,"address":"public","request_bytes":{},"response_bytes":{}}}"#,
                rng.random_range(100..4_000),
                rng.random_range(200..30_000)
            ),
            14..=16 => format!(
                r#"{{"type":"scf","region":"{}","request_bytes":{},"response_bytes":{}}}"#,
                REGIONS[rng.random_range(0..REGIONS.len())],
                rng.random_range(100..4_000),
                rng.random_range(200..30_000)
            ),
            _ => r#"{"type":"mock"}"#.to_string(),
        };
        let payload = format!(
            r#"{{"request_id":"{:x}-{i:x}","account_id":"{account}","service_id":"service-{}","api_id":"api-{}","region":"{region}","time":{t},"client_network":"{}","frontend_error":{},"status":200,"request_bytes":{},"response_bytes":{},"backend":{backend}}}"#,
            spec.seed,
            rng.random_range(0..50),
            rng.random_range(0..500),
            if rng.random_range(0..10) == 0 { "private" } else { "public" },
            rng.random_range(0..50) == 0,
            rng.random_range(100..2_000),
            rng.random_range(200..20_000),
        );
        let m = GenMessage { key: Some(account.into_bytes()), payload: payload.into_bytes() };
        truth.unique_events += 1;
        if recent.len() < RECENT {
            recent.push(m.clone());
        } else {
            let slot = rng.random_range(0..recent.len());
            recent[slot] = m.clone();
        }
        sink(m);
    }
    truth
}

fn malformed(i: u64, rng: &mut SmallRng) -> GenMessage {
    let account = account_id(rng.random_range(0..3));
    let good = format!(
        r#"{{"request_id":"bad-{i:x}","account_id":"{account}","region":"ap-guangzhou","time":"2020-11-05T10:15:30+08:00","client_network":"public","request_bytes":1,"response_bytes":1,"backend":{{"type":"mock"}}}}"#
    );
    let payload = match i % 6 {
        0 => good.as_bytes()[..good.len() / 2].to_vec(),
        1 => vec![0xff, 0xfe, b'{', b'}'],
        2 => good.replace(r#""region":"ap-guangzhou","#, "").into_bytes(),
        3 => good.replace(r#""request_bytes":1"#, r#""request_bytes":-1"#).into_bytes(),
        4 => good
            .replace(
                r#"{"type":"mock"}"#,
                r#"{"type":"http","region":"ap-beijing","in_cloud":true,"address":"private","request_bytes":1,"response_bytes":1}"#,
            )
            .into_bytes(),
        _ => good.replace("2020-11-05T10:15:30+08:00", "yesterday").into_bytes(),
    };
    GenMessage { key: Some(account.into_bytes()), payload }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_determinism() {
        let spec = GenSpec {
            events: 10_000,
            accounts: 50,
            skew: 1.0,
            start_ms: 1_604_160_000_000,
            days: 30,
            duplicates: 0.05,
            malformed: 0.01,
            seed: 7,
        };
        let mut a = Vec::new();
        let truth = events(&spec, |m| a.push(m));
        let mut b = Vec::new();
        events(&spec, |m| b.push(m));
        assert_eq!(a, b);
        assert_eq!(truth.messages, 10_000);
        assert_eq!(truth.unique_events + truth.duplicates + truth.malformed, 10_000);
        assert!((400..600).contains(&truth.duplicates), "{truth:?}");
        assert!((50..150).contains(&truth.malformed), "{truth:?}");
        // The reference agrees with the generator's own counts.
        let r = crate::billing::reference::aggregate_messages(a.iter().map(|m| m.payload.as_slice()), &Default::default());
        assert_eq!(r.rejected.len() as u64, truth.malformed);
        assert_eq!(r.duplicates, truth.duplicates);
        let calls: u64 = r.ledger.values().flat_map(|m| m.values()).map(|u| u.calls()).sum();
        assert_eq!(calls, truth.unique_events);
    }
}
