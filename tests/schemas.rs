//! The JSON Schemas in `schemas/` accept the spec's examples and the bills
//! the core produces, and reject what the decoder rejects.

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{decode_account, BillRecord, BillStatus, Rules};
use serde_json::Value;
use std::collections::BTreeMap;

fn validator(name: &str) -> jsonschema::Validator {
    let path = format!("{}/schemas/{name}", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{errors:#?}\n{instance:#}");
}

const SPEC_EVENT: &str = r#"{
  "request_id": "c0a8011e-5f7d-4b7e-9d1a-3f0e6c1a2b3c", "account_id": "1250000001",
  "service_id": "service-8xk2ab", "api_id": "api-41d9qz", "region": "ap-guangzhou",
  "time": "2020-11-05T10:15:30.123+08:00", "client_network": "public", "frontend_error": false,
  "status": 200, "request_bytes": 512, "response_bytes": 10000,
  "backend": {"type": "http", "region": "ap-guangzhou", "in_cloud": true, "address": "private",
              "request_bytes": 2000, "response_bytes": 9000}
}"#;

const SPEC_ACCOUNT: &str = r#"{
  "account_id": "1250000001", "activated_at": "2019-11-10T17:13:14+08:00",
  "resource_packs": [{"id": "pk-001", "item": "calls", "quantity": 5000000,
     "valid_from": "2020-03-01T00:00:00+08:00", "valid_until": "2021-03-01T00:00:00+08:00"}]
}"#;

#[test]
fn spec_examples_validate() {
    assert_valid(&validator("access-event.schema.json"), &serde_json::from_str(SPEC_EVENT).unwrap());
    assert_valid(&validator("account-record.schema.json"), &serde_json::from_str(SPEC_ACCOUNT).unwrap());
}

#[test]
fn schema_rejects_what_the_decoder_rejects() {
    let v = validator("access-event.schema.json");
    for broken in [
        SPEC_EVENT.replace("\"account_id\": \"1250000001\",", ""),
        SPEC_EVENT.replace("\"request_bytes\": 512", "\"request_bytes\": -1"),
        SPEC_EVENT.replace("\"in_cloud\": true,", ""),
        SPEC_EVENT.replace("\"type\": \"http\"", "\"type\": \"mock\""),
    ] {
        let value: Value = serde_json::from_str(&broken).unwrap();
        assert!(!v.is_valid(&value), "schema accepted {broken}");
        assert!(gatebill::billing::reference::decode_and_classify(broken.as_bytes()).is_err());
    }
}

#[test]
fn generated_bills_validate() {
    // Price versions and account terms (rule book 11) put every optional
    // field on some bills: price_version, pricing_terms, a line's discount.
    let versions = "[prices]\nid = \"list-1\"\n[[price_versions]]\nid = \"list-2\"\neffective_from = \"2020-07-01T00:00:00+08:00\"\n\
                    calls = [{ price = \"0.05\" }]\ntraffic_default = [{ price = \"0.50\" }]\n";
    let rules = gatebill::billing::BillingConfig::from_toml(versions).unwrap().validate().unwrap();
    let with_terms = SPEC_ACCOUNT.trim_end().trim_end_matches('}').to_string()
        + r#", "pricing": [{"id": "deal", "effective_from": "2020-03", "effective_until": "2020-06", "discount": "0.15"},
                          {"effective_from": "2020-09", "prices": {"calls": [{"up_to": 5, "price": "0.01"}, {"price": "0.02"}],
                           "traffic_default": [{"price": "0.30"}], "traffic_regions": {"ap-beijing": [{"price": "0.20"}]}}}]}"#;
    assert_valid(&validator("account-record.schema.json"), &serde_json::from_str(&with_terms).unwrap());
    let account = decode_account(with_terms.as_bytes()).unwrap();
    assert_eq!(account.pricing.len(), 2);
    let msgs: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            SPEC_EVENT
                .replace("c0a8011e-5f7d-4b7e-9d1a-3f0e6c1a2b3c", &format!("r{i}"))
                .replace("2020-11-05T10:15:30.123+08:00", &format!("2020-{:02}-05T10:15:30+08:00", 1 + i % 12))
                .replace("\"response_bytes\": 10000", &format!("\"response_bytes\": {}", 50_000_000 * (i % 7)))
                .replace("\"region\": \"ap-guangzhou\", \"in_cloud\"", "\"region\": \"ap-beijing\", \"in_cloud\"")
                .replace("\"address\": \"private\"", "\"address\": \"public\"")
                .into_bytes()
        })
        .collect();
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), &rules);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    let accounts = BTreeMap::from([("1250000001".to_string(), account)]);
    let all = bills(&r.ledger, &accounts, &rules);
    assert_eq!(all.len(), 12);
    assert_eq!(all.iter().filter(|b| b.content.charges.iter().any(|c| c.discount.is_some())).count(), 3, "March to May");
    assert_eq!(all.iter().filter(|b| b.content.price_version.as_deref() == Some("list-2")).count(), 6);
    assert_eq!(all.iter().filter(|b| !b.content.pricing_terms.is_empty()).count(), 7);
    let v = validator("bill-record.schema.json");
    for (i, b) in all.into_iter().enumerate() {
        let record = BillRecord { content: b.content, revision: 1 + i as u64, status: BillStatus::Final, content_hash: b.content_hash };
        let json = serde_json::to_value(&record).unwrap();
        assert_valid(&v, &json);
        // The wire form reads back to the same record.
        let back: BillRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
    }
}

#[test]
fn dead_letter_header_schema_lists_every_reason_code_and_accepts_real_dead_letters() {
    use gatebill::billing::RejectReason;
    use gatebill::pipeline::{InputMessage, Pipeline, Settings};
    let path = format!("{}/schemas/dead-letter-headers.schema.json", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let listed: Vec<&str> =
        schema["properties"]["gatebill.reason"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let codes: Vec<&str> = RejectReason::ALL.iter().map(|r| r.code()).collect();
    assert_eq!(listed, codes);

    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(gatebill::store::Store::open(dir.path()).unwrap());
    let mut cfg = gatebill::config::Config::default();
    cfg.kafka.input_topic = "events".into();
    let mut p = Pipeline::new(store, Rules::default(), Settings::from_config(&cfg), gatebill::metrics::Metrics::new()).unwrap();
    let future = SPEC_EVENT.replace("2020-11-05T10:15:30.123+08:00", "9999-01-01T00:00:00+08:00");
    // Over the producer's limit (cut to fit), and a tombstone.
    let large = [&b"{"[..], &vec![b' '; 1_100_000]].concat();
    let payloads: [Option<&[u8]>; 5] = [Some(b"{not json"), Some(future.as_bytes()), Some(b"[]"), Some(&large), None];
    let msgs: Vec<InputMessage> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| InputMessage {
            topic: "events",
            partition: 3,
            offset: i as i64,
            key: Some(b"1250000001"),
            payload: *p,
            headers: vec![("trace".into(), b"abc".to_vec()), ("gatebill.reason".into(), b"forged".to_vec())],
        })
        .collect();
    assert_eq!(p.process(&msgs).unwrap().rejected, 5);
    let v = validator("dead-letter-headers.schema.json");
    let mut reasons = Vec::new();
    let mut cut = Vec::new();
    // The outbox also holds the batch's changelog records.
    for (_, r) in p.outbox().unwrap().into_iter().filter(|(_, r)| r.topic == cfg.kafka.dead_letter_topic) {
        let headers: serde_json::Map<String, Value> =
            r.headers.iter().map(|(k, v)| (k.clone(), Value::String(String::from_utf8(v.clone()).unwrap()))).collect();
        let headers = Value::Object(headers);
        assert_valid(&v, &headers);
        reasons.push(headers["gatebill.reason"].as_str().unwrap().to_string());
        cut.push(headers.get("gatebill.truncated").map(|v| v.as_str().unwrap().to_string()));
        assert_eq!(headers["original.gatebill.reason"], "forged");
    }
    assert_eq!(reasons, vec!["malformed_json", "future_time", "invalid_value", "malformed_json", "malformed_json"]);
    assert_eq!(cut, vec![None, None, None, Some("payload".to_string()), None]);
}

/// Fields that do not apply to the backend type validate whatever their
/// value, as the decoder ignores them; where they apply they are typed.
#[test]
fn backend_fields_that_do_not_apply_are_not_typed() {
    let v = validator("access-event.schema.json");
    let http = r#"{"type": "http", "region": "ap-guangzhou", "in_cloud": true, "address": "private",
              "request_bytes": 2000, "response_bytes": 9000}"#;
    let with = |backend: &str| SPEC_EVENT.replace(http, backend);
    for ignored in [
        with(r#"{"type": "scf", "region": "ap-beijing", "address": "n/a", "in_cloud": "x", "request_bytes": 1, "response_bytes": 2}"#),
        with(r#"{"type": "http", "region": 5, "in_cloud": false, "address": "public", "request_bytes": 1, "response_bytes": 2}"#),
        with(r#"{"type": "mock", "region": [], "in_cloud": "n/a", "address": 0}"#),
    ] {
        assert_ne!(ignored, SPEC_EVENT);
        assert_valid(&v, &serde_json::from_str(&ignored).unwrap());
        assert!(gatebill::billing::reference::decode_and_classify(ignored.as_bytes()).is_ok(), "{ignored}");
    }
    for typed in [
        with(r#"{"type": "scf", "region": 5, "request_bytes": 1, "response_bytes": 2}"#),
        with(r#"{"type": "http", "region": 5, "in_cloud": true, "address": "public", "request_bytes": 1, "response_bytes": 2}"#),
        with(r#"{"type": "http", "in_cloud": "x", "address": "public", "request_bytes": 1, "response_bytes": 2}"#),
        with(r#"{"type": "http", "in_cloud": false, "address": "n/a", "request_bytes": 1, "response_bytes": 2}"#),
    ] {
        assert_ne!(typed, SPEC_EVENT);
        assert!(!v.is_valid(&serde_json::from_str(&typed).unwrap()), "schema accepted {typed}");
        assert!(gatebill::billing::reference::decode_and_classify(typed.as_bytes()).is_err(), "{typed}");
    }
}

/// Alert records of every kind, as the pipeline emits them, validate
/// against `schemas/alert-record.schema.json`.
#[test]
fn emitted_alerts_validate() {
    use gatebill::pipeline::{now_ms, InputMessage, Pipeline, Settings};
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(gatebill::store::Store::open(dir.path()).unwrap());
    let mut cfg = gatebill::config::Config::default();
    cfg.kafka.input_topic = "events".into();
    cfg.billing.trial_periods.clear();
    cfg.billing.alerts.spend_thresholds = vec!["0.01".into()];
    let rules = cfg.billing.validate().unwrap();
    let mut p = Pipeline::new(store, rules, Settings::from_config(&cfg), gatebill::metrics::Metrics::new()).unwrap();
    // The seed account (in its free tier) with a pack and a spend line of its own.
    let account = r#"{"account_id": "1250000001", "activated_at": "2019-11-10T17:13:14+08:00", "spend_alerts": ["0.05"],
        "resource_packs": [{"id": "pk-9", "item": "calls", "quantity": 10, "valid_from": "2020-01-01T00:00:00+08:00", "valid_until": "2021-01-01T00:00:00+08:00"}]}"#;
    let msg = InputMessage {
        topic: "gateway-accounts",
        partition: 0,
        offset: 0,
        key: Some(b"1250000001"),
        payload: Some(account.as_bytes()),
        headers: vec![],
    };
    p.apply_accounts(&[msg]).unwrap();
    // 3 GiB in one hour: the free GiB runs out there, and 2 GiB cost 1.60 (both lines passed).
    let event = |i: usize, calls_hour: &str, bytes: u64| {
        SPEC_EVENT
            .replace("c0a8011e-5f7d-4b7e-9d1a-3f0e6c1a2b3c", &format!("r{i}"))
            .replace("2020-11-05T10:15:30.123+08:00", calls_hour)
            .replace("\"response_bytes\": 10000", &format!("\"response_bytes\": {bytes}"))
            .replace("\"address\": \"private\"", "\"address\": \"public\"")
            .into_bytes()
    };
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| event(i, "2020-06-05T10:00:00+08:00", 1 << 30)).collect();
    let msgs: Vec<InputMessage> = payloads
        .iter()
        .enumerate()
        .map(|(i, pl)| InputMessage {
            topic: "events",
            partition: 0,
            offset: i as i64,
            key: Some(b"1250000001"),
            payload: Some(pl),
            headers: vec![],
        })
        .collect();
    p.process(&msgs).unwrap();
    p.emit(now_ms(), true).unwrap();
    let v = validator("alert-record.schema.json");
    let mut kinds = Vec::new();
    for (_, r) in p.outbox().unwrap().into_iter().filter(|(_, r)| r.topic == cfg.kafka.alerts_topic) {
        let a: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_valid(&v, &a);
        kinds.push(format!("{} {}", a["kind"].as_str().unwrap(), a["subject"].as_str().unwrap()));
    }
    kinds.sort();
    assert_eq!(kinds, ["free_tier_exhausted public_out_bytes", "spend_threshold 0.01", "spend_threshold 0.05"]);
}
