//! Parser robustness: arbitrary bytes and mutated valid messages never panic
//! and always yield either a value or a typed error with a reason code.

use gatebill::billing::reference::decode_and_classify;
use gatebill::billing::{decode_account, RejectReason};
use proptest::prelude::*;

const VALID_EVENT: &str = r#"{"request_id":"c0a8011e","account_id":"1250000001","service_id":"service-8xk2ab","api_id":"api-41d9qz","region":"ap-guangzhou","time":"2020-11-05T10:15:30.123+08:00","client_network":"public","frontend_error":false,"status":200,"request_bytes":512,"response_bytes":10000,"backend":{"type":"http","region":"ap-guangzhou","in_cloud":true,"address":"private","request_bytes":2000,"response_bytes":9000}}"#;
const VALID_ACCOUNT: &str = r#"{"account_id":"1250000001","activated_at":"2019-11-10T17:13:14+08:00","resource_packs":[{"id":"pk-001","item":"calls","quantity":5000000,"valid_from":"2020-03-01T00:00:00+08:00","valid_until":"2021-03-01T00:00:00+08:00"}]}"#;

/// (field, a JSON value that is wrong for it).
fn wrong_values() -> Vec<(&'static str, &'static str)> {
    let any_type = ["null", "-1", "1.5", "[]", "{}", "true"];
    let mut out = Vec::new();
    for f in ["request_id", "account_id", "region"] {
        out.extend(any_type.iter().filter(|v| **v != "-1" && **v != "1.5").map(|v| (f, *v)));
        out.extend([(f, "\"\""), (f, "7")]);
    }
    for v in any_type.iter().chain(&["\"\"", "\"2020-13-45T99:00:00Z\"", "253402300800000", "\"yesterday\""]) {
        out.push(("time", *v));
    }
    for v in any_type.iter().chain(&["\"\"", "\"intranet\""]) {
        out.push(("client_network", *v));
    }
    for f in ["request_bytes", "response_bytes"] {
        for v in any_type.iter().chain(&["\"5\"", "18446744073709551616", "9007199254740992", "1e3"]) {
            out.push((f, *v));
        }
    }
    for v in any_type.iter().chain(&["\"http\""]) {
        out.push(("backend", *v));
    }
    out
}

fn check_event(bytes: &[u8]) {
    match decode_and_classify(bytes) {
        Ok((e, m)) => {
            assert!(!e.account_id.is_empty() && !e.request_id.is_empty());
            assert!(m.public_out_bytes < 1 << 55);
        }
        Err(err) => {
            assert!(RejectReason::ALL.contains(&err.reason));
            assert!(!err.detail.is_empty());
        }
    }
}

fn mutate(base: &str, ops: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut b = base.as_bytes().to_vec();
    for &(pos, kind, byte) in ops {
        if b.is_empty() {
            break;
        }
        let p = pos % b.len();
        match kind % 4 {
            0 => b[p] = byte,
            1 => {
                b.remove(p);
            }
            2 => b.insert(p, byte),
            _ => b.truncate(p),
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_event(&bytes);
        let _ = decode_account(&bytes);
    }

    #[test]
    fn mutated_valid_events_never_panic(ops in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)) {
        check_event(&mutate(VALID_EVENT, &ops));
        let _ = decode_account(&mutate(VALID_ACCOUNT, &ops));
    }

    #[test]
    fn a_wrong_value_in_any_field_is_a_typed_rejection((field, value) in prop::sample::select(wrong_values())) {
        let mut v: serde_json::Value = serde_json::from_str(VALID_EVENT).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        let bytes = serde_json::to_vec(&v).unwrap();
        let err = decode_and_classify(&bytes).expect_err("every replacement is invalid");
        prop_assert!(matches!(err.reason, RejectReason::MissingField | RejectReason::InvalidValue), "{field}={value}: {err}");
    }
}

#[test]
fn hostile_shapes_have_actionable_reasons() {
    let cases: Vec<(Vec<u8>, RejectReason)> = vec![
        (vec![0xff, 0xfe, b'{'], RejectReason::MalformedJson),
        (VALID_EVENT.as_bytes()[..VALID_EVENT.len() / 2].to_vec(), RejectReason::MalformedJson),
        (format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes(), RejectReason::MissingField),
        (format!("{}{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes(), RejectReason::MalformedJson),
        (format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(), RejectReason::InvalidValue),
        (
            VALID_EVENT.replace("\"ap-guangzhou\",\"time\"", &format!("\"{}\",\"time\"", "x".repeat(1 << 20))).into_bytes(),
            RejectReason::InvalidValue,
        ),
        (b"null".to_vec(), RejectReason::InvalidValue),
        (b"".to_vec(), RejectReason::MalformedJson),
    ];
    for (bytes, reason) in cases {
        let err = decode_and_classify(&bytes).unwrap_err();
        assert_eq!(err.reason, reason, "{err}");
        assert!(err.to_string().len() < 400, "detail stays short: {}", err.to_string().len());
    }
}
