//! The billing calendar (spec section 3): months and local hours in the
//! billing time zone, and conversions between local dates and UTC instants.
//!
//! Instants are UTC epoch milliseconds (`i64`). An hour bucket is identified by
//! the UTC epoch second at which the *local* hour starts, so a repeated local
//! hour at a daylight-saving change is two distinct buckets and a half-hour
//! offset zone's hours start at hh:30 UTC.

use chrono::{Datelike, Duration, LocalResult, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use std::fmt;
use std::str::FromStr;

/// A calendar month in the billing time zone, e.g. `2020-11`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    /// Calendar year (1970..=9999 for anything derived from a valid event).
    pub year: i32,
    /// Month of the year, 1..=12.
    pub month: u32,
}

impl Month {
    /// Builds a month, returning `None` when `month` is not 1..=12.
    pub fn new(year: i32, month: u32) -> Option<Month> {
        (1..=12).contains(&month).then_some(Month { year, month })
    }

    /// The month after this one.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month { year: self.year + 1, month: 1 }
        } else {
            Month { year: self.year, month: self.month + 1 }
        }
    }

    /// The first day of the month.
    pub fn first_day(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).expect("valid month")
    }

    /// A compact ordinal (`year * 12 + month - 1`), used in storage keys.
    pub fn ordinal(self) -> u32 {
        (self.year as u32) * 12 + self.month - 1
    }

    /// Inverse of [`Month::ordinal`].
    pub fn from_ordinal(ordinal: u32) -> Month {
        Month { year: (ordinal / 12) as i32, month: ordinal % 12 + 1 }
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Month {
    type Err = String;
    fn from_str(s: &str) -> Result<Month, String> {
        let bad = || format!("`{s}` is not a month; expected YYYY-MM, e.g. 2020-11");
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        Month::new(year, month).ok_or_else(bad)
    }
}

/// The billing calendar: one IANA time zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BillingCalendar {
    /// The billing time zone (default `Asia/Shanghai`).
    pub tz: Tz,
}

impl Default for BillingCalendar {
    fn default() -> Self {
        BillingCalendar { tz: chrono_tz::Asia::Shanghai }
    }
}

impl BillingCalendar {
    /// A calendar in the given zone.
    pub fn new(tz: Tz) -> Self {
        BillingCalendar { tz }
    }

    /// The billing month of an instant (epoch milliseconds).
    pub fn month_of(&self, ts_ms: i64) -> Month {
        let local = self.tz.timestamp_millis_opt(ts_ms).single().expect("utc instant maps uniquely");
        Month { year: local.year(), month: local.month() }
    }

    /// The UTC epoch second at which the local hour containing `ts_ms` starts.
    pub fn hour_start(&self, ts_ms: i64) -> i64 {
        let local = self.tz.timestamp_millis_opt(ts_ms).single().expect("utc instant maps uniquely");
        // Minute and second of the local time already include any odd offset
        // (half-hour zones, historic offsets with seconds).
        let into_hour = i64::from(local.minute()) * 60 + i64::from(local.second());
        ts_ms.div_euclid(1000) - into_hour
    }

    /// The bucket key and month of an instant in one lookup.
    pub fn place(&self, ts_ms: i64) -> (Month, i64) {
        (self.month_of(ts_ms), self.hour_start(ts_ms))
    }

    /// The UTC epoch second of the first instant of a local date. When local
    /// midnight does not exist (a daylight-saving gap at midnight), the day
    /// starts at the first local time that exists.
    pub fn day_start(&self, date: NaiveDate) -> i64 {
        let mut t = date.and_hms_opt(0, 0, 0).expect("midnight");
        for _ in 0..48 {
            match self.tz.from_local_datetime(&t) {
                LocalResult::Single(d) => return d.timestamp(),
                LocalResult::Ambiguous(a, b) => return a.timestamp().min(b.timestamp()),
                LocalResult::None => t += Duration::minutes(30),
            }
        }
        // No zone has a day-long gap; fall back to UTC midnight.
        Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight")).timestamp()
    }

    /// The UTC epoch second at which a month starts.
    pub fn month_start(&self, month: Month) -> i64 {
        self.day_start(month.first_day())
    }

    /// The UTC epoch second at which a month ends (= the next month's start).
    pub fn month_end(&self, month: Month) -> i64 {
        self.month_start(month.next())
    }

    /// An instant given in epoch seconds as RFC 3339 in the billing time
    /// zone, e.g. `2020-06-12T15:00:00+08:00` (the seconds themselves
    /// where chrono cannot place it).
    pub fn local_rfc3339(&self, ts_secs: i64) -> String {
        self.tz.timestamp_opt(ts_secs, 0).single().map_or_else(|| ts_secs.to_string(), |t| t.to_rfc3339())
    }

    /// The local calendar date of an instant given in epoch seconds.
    pub fn local_date(&self, ts_secs: i64) -> NaiveDate {
        self.tz.timestamp_opt(ts_secs, 0).single().expect("utc instant maps uniquely").date_naive()
    }
}

/// Adds calendar months to a date, clamping the day to the target month's
/// length (29 Feb + 12 months = 28 Feb).
pub fn add_months(date: NaiveDate, months: u32) -> NaiveDate {
    let total = date.year() * 12 + date.month0() as i32 + months as i32;
    let (year, month) = (total.div_euclid(12), total.rem_euclid(12) as u32 + 1);
    let mut day = date.day();
    loop {
        if let Some(d) = NaiveDate::from_ymd_opt(year, month, day) {
            return d;
        }
        day -= 1;
    }
}

/// Length of a [`PlaceCache`] slot: 15 minutes, the finest granularity of
/// any UTC offset in use since 1972.
const SLOT_MS: i64 = 900_000;
const SLOTS: usize = 1 << 14;

/// [`BillingCalendar::place`] remembered per 15-minute slot of UTC time.
///
/// A slot is cached only when the zone's offset is the same at both of its
/// ends and a multiple of 15 minutes: then the whole slot maps into one local
/// 15-minute slot, hence one local hour and one local date, and every instant
/// in it has the same place. Slots with an offset change or an odd historic
/// offset (e.g. Monrovia's -0:44:30 before 1972) are computed every time.
/// Direct-mapped, 16,384 slots (170 days).
#[derive(Clone, Debug)]
pub struct PlaceCache {
    calendar: BillingCalendar,
    slots: Vec<(i64, Month, i64)>,
}

impl PlaceCache {
    /// An empty cache over a calendar.
    pub fn new(calendar: BillingCalendar) -> Self {
        PlaceCache { calendar, slots: vec![(i64::MIN, Month { year: 1970, month: 1 }, 0); SLOTS] }
    }

    /// The same as [`BillingCalendar::place`].
    pub fn place(&mut self, ts_ms: i64) -> (Month, i64) {
        let slot = ts_ms.div_euclid(SLOT_MS);
        let entry = &mut self.slots[slot.rem_euclid(SLOTS as i64) as usize];
        if entry.0 == slot {
            return (entry.1, entry.2);
        }
        let (start, end) = (slot * SLOT_MS, slot * SLOT_MS + SLOT_MS - 1);
        let offset = |ms: i64| {
            use chrono::Offset;
            self.calendar.tz.timestamp_millis_opt(ms).single().expect("utc instant maps uniquely").offset().fix().local_minus_utc()
        };
        let o = offset(start);
        if o == offset(end) && i64::from(o) % (SLOT_MS / 1000) == 0 {
            let (month, hour) = self.calendar.place(start);
            *entry = (slot, month, hour);
            (month, hour)
        } else {
            self.calendar.place(ts_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn month_boundary_in_shanghai() {
        let cal = BillingCalendar::default();
        assert_eq!(cal.month_of(ms("2020-01-31T16:30:00Z")), Month { year: 2020, month: 2 });
        assert_eq!(cal.month_of(ms("2020-01-31T15:59:59.999Z")), Month { year: 2020, month: 1 });
    }

    #[test]
    fn half_hour_zone_hours_start_at_half_past_utc() {
        let cal = BillingCalendar::new(chrono_tz::Asia::Kolkata);
        // 10:40 UTC is 16:10 IST; the local hour 16:00 IST starts at 10:30 UTC.
        assert_eq!(cal.hour_start(ms("2020-05-01T10:40:00Z")), ms("2020-05-01T10:30:00Z") / 1000);
    }

    #[test]
    fn repeated_dst_hour_is_two_buckets() {
        let cal = BillingCalendar::new(chrono_tz::America::New_York);
        // 2020-11-01 01:30 EDT (05:30Z) and 01:30 EST (06:30Z) are distinct hours.
        let a = cal.hour_start(ms("2020-11-01T05:30:00Z"));
        let b = cal.hour_start(ms("2020-11-01T06:30:00Z"));
        assert_eq!(a, ms("2020-11-01T05:00:00Z") / 1000);
        assert_eq!(b, ms("2020-11-01T06:00:00Z") / 1000);
    }

    #[test]
    fn midnight_gap_day_starts_at_first_existing_time() {
        // America/Santiago skipped 2019-09-08 00:00..01:00 local.
        let cal = BillingCalendar::new(chrono_tz::America::Santiago);
        let start = cal.day_start(NaiveDate::from_ymd_opt(2019, 9, 8).unwrap());
        assert_eq!(start, ms("2019-09-08T01:00:00-03:00") / 1000);
    }

    #[test]
    fn add_months_clamps_leap_day() {
        let d = NaiveDate::from_ymd_opt(2020, 2, 29).unwrap();
        assert_eq!(add_months(d, 12), NaiveDate::from_ymd_opt(2021, 2, 28).unwrap());
        let d = NaiveDate::from_ymd_opt(2019, 11, 10).unwrap();
        assert_eq!(add_months(d, 12), NaiveDate::from_ymd_opt(2020, 11, 10).unwrap());
    }

    #[test]
    fn month_parse_and_ordinal_roundtrip() {
        let m: Month = "2020-11".parse().unwrap();
        assert_eq!(m.to_string(), "2020-11");
        assert_eq!(Month::from_ordinal(m.ordinal()), m);
        assert!("2020-13".parse::<Month>().is_err());
        assert!("20-11".parse::<Month>().is_err());
    }

    #[test]
    fn place_cache_agrees_with_the_calendar_everywhere() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for tz in [
            chrono_tz::Asia::Shanghai,
            chrono_tz::Asia::Kolkata,
            chrono_tz::Australia::Lord_Howe,
            chrono_tz::America::St_Johns,
            chrono_tz::Africa::Monrovia,
            chrono_tz::Europe::London,
            chrono_tz::America::Havana,
        ] {
            let cal = BillingCalendar::new(tz);
            let mut cache = PlaceCache::new(cal);
            // Random instants since 1970, and dense ones around 1970-1973 (Monrovia's odd offset).
            for i in 0..60_000 {
                let t = if i % 2 == 0 { rng.random_range(0..4_102_444_800_000i64) } else { rng.random_range(0..100_000_000_000i64) };
                assert_eq!(cache.place(t), cal.place(t), "{tz} at {t}");
                assert_eq!(cache.place(t), cal.place(t), "{tz} at {t} (cached)");
            }
            // Every minute across a year of transitions.
            let start = 1_604_000_000_000i64;
            for m in 0..(366 * 24 * 60) {
                let t = start + m * 60_000 + 59_999 * (m % 2);
                assert_eq!(cache.place(t), cal.place(t), "{tz} at {t}");
            }
        }
    }
}
