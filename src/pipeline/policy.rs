//! The pipeline's decisions that need no store and no clock of their own:
//! when a partition's months close (its event-time watermark, or the wall
//! clock once the partition is idle), and which revision and status a
//! recomputed bill gets. Pure functions of their arguments, each tested
//! with a table of cases.

use crate::billing::BillStatus;

/// What the pipeline knows of one input partition, for the closing policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionClock {
    /// Largest trusted event time processed, epoch ms; `None` before any state.
    pub watermark_ms: Option<i64>,
    /// Next offset to process (0 when nothing was processed).
    pub next_offset: i64,
    /// The partition's end offset as last seen on the broker, if known.
    pub end_offset: Option<i64>,
    /// Wall-clock ms of the last input (or of the assignment) while assigned.
    pub last_input_ms: Option<i64>,
}

/// The effective event-time watermark of a partition: its largest event
/// time, or, once it is idle (assigned, caught up with its last known end
/// offset, and without input for `idle_after_ms`) or when `force_idle`, at
/// least the wall clock less `idle_after_ms`. A partition with a backlog is
/// never idle, however long it waits for its turn.
pub fn effective_watermark(c: &PartitionClock, now: i64, idle_after_ms: i64, force_idle: bool) -> Option<i64> {
    let caught_up = c.end_offset.is_some_and(|end| c.next_offset >= end);
    let quiet = c.last_input_ms.is_some_and(|t| now - t >= idle_after_ms);
    if force_idle || (caught_up && quiet) {
        let wall = now - idle_after_ms;
        Some(c.watermark_ms.map_or(wall, |wm| wm.max(wall)))
    } else {
        c.watermark_ms
    }
}

/// Whether a month that ends at `month_end_ms` is closed under `watermark_ms`:
/// the watermark has passed its end plus the grace period.
pub fn month_closed(month_end_ms: i64, grace_ms: i64, watermark_ms: Option<i64>) -> bool {
    watermark_ms.is_some_and(|wm| month_end_ms.saturating_add(grace_ms) <= wm)
}

/// The last record emitted for a bill key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emitted<'a> {
    /// Its revision.
    pub revision: u64,
    /// Its status.
    pub status: BillStatus,
    /// Its content hash.
    pub content_hash: &'a str,
}

/// The revision and status of the next record of a bill whose content hash
/// is now `content_hash` and whose month is `closed` or not; `None` when
/// nothing changed and nothing is to be emitted.
///
/// A bill is `provisional` until its month closes, then `final`; a change of
/// content after it was final (or restated) makes it `restated`. A bill
/// never goes back to `provisional`. Revisions start at 1 and grow by 1 per
/// emitted record.
///
/// A previous record whose hash starts with [`UNCONFIRMED_MARK`] may never
/// have reached the output topic (a state restored unconfirmed, see
/// `changelog::Restore::offer_bill`): it is judged as that record (its
/// status, the hash after the mark), and sent again even when nothing
/// changed.
pub fn next_record(prev: Option<Emitted<'_>>, content_hash: &str, closed: bool) -> Option<(u64, BillStatus)> {
    let (prev_hash, unconfirmed) = match prev.map(|p| p.content_hash) {
        Some(h) => h.strip_prefix(UNCONFIRMED_MARK).map_or((Some(h), false), |h| (Some(h), true)),
        None => (None, false),
    };
    let status = match prev {
        None | Some(Emitted { status: BillStatus::Provisional, .. }) if closed => BillStatus::Final,
        None | Some(Emitted { status: BillStatus::Provisional, .. }) => BillStatus::Provisional,
        Some(_) if prev_hash != Some(content_hash) => BillStatus::Restated,
        Some(p) => p.status,
    };
    match prev {
        Some(p) if prev_hash == Some(content_hash) && p.status == status && !unconfirmed => None,
        Some(p) => Some((p.revision + 1, status)),
        None => Some((1, status)),
    }
}

/// Prefix of a bill state's content hash: the record may not have reached
/// the output topic, send it again ([`next_record`]). Content hashes are hex.
pub const UNCONFIRMED_MARK: &str = "?";

#[cfg(test)]
mod tests {
    use super::*;
    use BillStatus::{Final, Provisional, Restated};

    fn check_next(prev: Option<(u64, BillStatus, &str)>, hash: &str, closed: bool, expect: Option<(u64, BillStatus)>) {
        let prev = prev.map(|(revision, status, content_hash)| Emitted { revision, status, content_hash });
        assert_eq!(next_record(prev, hash, closed), expect, "prev {prev:?}, hash {hash}, closed {closed}");
    }

    #[test]
    fn status_and_revision_rule() {
        // (previous record, content hash now, month closed) -> next record
        check_next(None, "a", false, Some((1, Provisional)));
        check_next(None, "a", true, Some((1, Final)));
        check_next(Some((1, Provisional, "a")), "a", false, None);
        check_next(Some((1, Provisional, "a")), "b", false, Some((2, Provisional)));
        check_next(Some((1, Provisional, "a")), "a", true, Some((2, Final)));
        check_next(Some((1, Provisional, "a")), "b", true, Some((2, Final)));
        check_next(Some((2, Final, "a")), "a", true, None);
        check_next(Some((2, Final, "a")), "b", true, Some((3, Restated)));
        // A final bill never reopens, even if its month no longer looks closed
        // (a restarted worker that has not seen its partitions yet).
        check_next(Some((2, Final, "a")), "a", false, None);
        check_next(Some((2, Final, "a")), "b", false, Some((3, Restated)));
        check_next(Some((3, Restated, "b")), "b", true, None);
        check_next(Some((3, Restated, "b")), "c", true, Some((4, Restated)));
        check_next(Some((3, Restated, "b")), "a", false, Some((4, Restated)));
        // Unconfirmed (maybe never seen): sent again, unchanged or not; a
        // final one stays final unless its content changed.
        check_next(Some((1, Provisional, "?a")), "a", false, Some((2, Provisional)));
        check_next(Some((1, Provisional, "?a")), "a", true, Some((2, Final)));
        check_next(Some((2, Final, "?a")), "a", false, Some((3, Final)));
        check_next(Some((2, Final, "?a")), "a", true, Some((3, Final)));
        check_next(Some((2, Final, "?a")), "b", true, Some((3, Restated)));
        check_next(Some((3, Restated, "?b")), "b", true, Some((4, Restated)));
    }

    fn check_watermark(c: PartitionClock, now: i64, force_idle: bool, expect: Option<i64>) {
        assert_eq!(effective_watermark(&c, now, 300_000, force_idle), expect, "{c:?} at {now}, force_idle {force_idle}");
    }

    #[test]
    fn watermark_policy() {
        let now = 10_000_000;
        let seen = PartitionClock { watermark_ms: Some(1_000), next_offset: 50, end_offset: Some(50), last_input_ms: Some(now - 300_000) };
        // Caught up and quiet for the idle time: the wall clock less the idle time.
        check_watermark(seen, now, false, Some(now - 300_000));
        // Quiet, but behind the end offset last seen: event time only.
        check_watermark(PartitionClock { end_offset: Some(51), ..seen }, now, false, Some(1_000));
        // Caught up, but input a moment ago: event time only.
        check_watermark(PartitionClock { last_input_ms: Some(now - 1), ..seen }, now, false, Some(1_000));
        // End offset unknown, or not assigned (no input clock): never idle.
        check_watermark(PartitionClock { end_offset: None, ..seen }, now, false, Some(1_000));
        check_watermark(PartitionClock { last_input_ms: None, ..seen }, now, false, Some(1_000));
        // Idle with event time ahead of the wall clock less the idle time: event time.
        check_watermark(PartitionClock { watermark_ms: Some(now), ..seen }, now, false, Some(now));
        // Nothing known: none, unless idleness is forced.
        check_watermark(PartitionClock::default(), now, false, None);
        check_watermark(PartitionClock::default(), now, true, Some(now - 300_000));
        check_watermark(PartitionClock { end_offset: Some(51), ..seen }, now, true, Some(now - 300_000));
    }

    #[test]
    fn month_closing_policy() {
        // (month end, grace, watermark) -> closed
        for (end, grace, wm, closed) in [
            (1_000, 10, None, false),
            (1_000, 10, Some(1_009), false),
            (1_000, 10, Some(1_010), true),
            (1_000, 0, Some(1_000), true),
            (i64::MAX - 5, 10, Some(i64::MAX), true),
        ] {
            assert_eq!(month_closed(end, grace, wm), closed, "end {end}, grace {grace}, watermark {wm:?}");
        }
    }
}
