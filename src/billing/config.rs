//! Billing configuration (TOML via serde): every field documented, defaults
//! named, unknown keys rejected, and [`BillingConfig::validate`] turning it
//! into checked [`Rules`] or a clear [`ConfigError`].

use super::calendar::{BillingCalendar, Month};
use super::event::rfc3339_millis;
use super::money::{GB, MAX_PRICE_SCALE, MAX_UNIT_PRICE};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default billing time zone: bills are in Beijing time.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Shanghai";
/// Default currency code.
pub const DEFAULT_CURRENCY: &str = "CNY";
/// Default free calls per month.
pub const DEFAULT_FREE_CALLS: u64 = 1_000_000;
/// Default free public outbound bytes per month: 1 GB = 2^30 bytes.
pub const DEFAULT_FREE_BYTES: u64 = GB;
/// Default free-tier length in months after activation.
pub const DEFAULT_FREE_MONTHS: u32 = 12;
/// End (exclusive) of the default trial period: 2020-02-13 23:59:59 Beijing time, whole.
pub const DEFAULT_TRIAL_UNTIL: &str = "2020-02-14T00:00:00+08:00";

/// The billing section of the configuration file (`[billing]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// IANA time zone for months and hours. Default `Asia/Shanghai`.
    pub time_zone: String,
    /// Currency code written on bills. Default `CNY`.
    pub currency: String,
    /// The free tier (spec section 4).
    pub free_tier: FreeTierConfig,
    /// Trial periods: usage inside is reported but never charged (section 5).
    /// Default: one period ending 2020-02-13 23:59:59 Beijing time.
    pub trial_periods: Vec<TrialPeriodConfig>,
    /// Pay-as-you-go prices (section 7): the price version in force since
    /// always (section 11.1).
    pub prices: PricesConfig,
    /// Later price versions (section 11.1), each a complete price list in
    /// force from the start of a month until the next version's. Default:
    /// none (`[billing.prices]` prices every month).
    pub price_versions: Vec<PriceVersionConfig>,
    /// Usage alerts (section 12).
    pub alerts: AlertsConfig,
}

/// `[billing.alerts]`
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Spend lines for every account, decimal strings in the bill's
    /// currency, e.g. `["100.00", "1000.00"]`: an alert when a month's total
    /// reaches each. Default: none (an account record's `spend_alerts` add
    /// its own).
    pub spend_thresholds: Vec<String>,
}

/// `[[billing.price_versions]]`: a complete price list in force from
/// `effective_from` (section 11.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceVersionConfig {
    /// Named on every bill it prices (`price_version`); unique.
    pub id: String,
    /// RFC 3339: the first instant of a month in the billing time zone,
    /// e.g. `2021-01-01T00:00:00+08:00` for Asia/Shanghai.
    pub effective_from: String,
    /// Currency of this list. Default: `billing.currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Graduated call tiers, price per 10,000 calls.
    pub calls: Vec<TierConfig>,
    /// Traffic tiers for regions without their own entry, price per GB,
    /// bounds in GB.
    pub traffic_default: Vec<TierConfig>,
    /// Traffic tiers per gateway region. Default: none.
    #[serde(default)]
    pub traffic_regions: BTreeMap<String, Vec<TierConfig>>,
}

/// `[billing.free_tier]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreeTierConfig {
    /// Whether accounts get a free tier at all. Default true.
    pub enabled: bool,
    /// Free calls per calendar month. Default 1,000,000.
    pub calls_per_month: u64,
    /// Free public outbound bytes per calendar month. Default 1,073,741,824 (1 GB).
    pub public_out_bytes_per_month: u64,
    /// Length of the free period after activation, in months. Default 12.
    pub months: u32,
}

/// `[[billing.trial_periods]]`: a half-open window `[from, until)` of event time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialPeriodConfig {
    /// Start (inclusive), RFC 3339 with offset; absent means "since always".
    #[serde(default)]
    pub from: Option<String>,
    /// End (exclusive), RFC 3339 with offset. A period "ending 23:59:59" ends at the next midnight.
    pub until: String,
}

/// `[billing.prices]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricesConfig {
    /// The id bills priced by this list carry as `price_version`. Default:
    /// none, and bills priced by it carry no `price_version` (as before
    /// price versions existed, so adding a later version changes none of
    /// them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Graduated call tiers, price per 10,000 calls. Default 0.06 up to
    /// 10,000,000; 0.04 up to 100,000,000; 0.03 above.
    pub calls: Vec<TierConfig>,
    /// Graduated traffic tiers for regions without their own entry, price per
    /// GB, bounds (`up_to`) in GB. Default: 0.80 flat.
    pub traffic_default: Vec<TierConfig>,
    /// Traffic tiers per gateway region, e.g. `[[billing.prices.traffic_regions.ap-hongkong]]`.
    pub traffic_regions: BTreeMap<String, Vec<TierConfig>>,
}

/// One graduated tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Upper bound (inclusive) of this tier on the month's cumulative quantity
    /// (calls, or GB for traffic). Absent on the last tier: unbounded.
    #[serde(default)]
    pub up_to: Option<u64>,
    /// Unit price as a decimal string, e.g. `"0.06"` (a TOML float is refused:
    /// it may not be exact).
    #[serde(deserialize_with = "price_from_string", serialize_with = "rust_decimal::serde::str::serialize")]
    pub price: Decimal,
}

fn price_from_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    let s = String::deserialize(d)?;
    s.trim().parse::<Decimal>().map_err(|e| serde::de::Error::custom(format!("price `{s}` is not a decimal number: {e}")))
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            time_zone: DEFAULT_TIME_ZONE.into(),
            currency: DEFAULT_CURRENCY.into(),
            free_tier: FreeTierConfig::default(),
            trial_periods: vec![TrialPeriodConfig { from: None, until: DEFAULT_TRIAL_UNTIL.into() }],
            prices: PricesConfig::default(),
            price_versions: Vec::new(),
            alerts: AlertsConfig::default(),
        }
    }
}

impl Default for FreeTierConfig {
    fn default() -> Self {
        FreeTierConfig {
            enabled: true,
            calls_per_month: DEFAULT_FREE_CALLS,
            public_out_bytes_per_month: DEFAULT_FREE_BYTES,
            months: DEFAULT_FREE_MONTHS,
        }
    }
}

impl Default for PricesConfig {
    fn default() -> Self {
        let t = |up_to: Option<u64>, price: Decimal| TierConfig { up_to, price };
        PricesConfig {
            id: None,
            calls: vec![t(Some(10_000_000), Decimal::new(6, 2)), t(Some(100_000_000), Decimal::new(4, 2)), t(None, Decimal::new(3, 2))],
            traffic_default: vec![t(None, Decimal::new(80, 2))],
            traffic_regions: BTreeMap::new(),
        }
    }
}

/// A configuration that cannot be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The time zone is not an IANA name.
    #[error("billing.time_zone `{0}` is not an IANA time zone name (e.g. Asia/Shanghai, Europe/Berlin)")]
    UnknownTimeZone(String),
    /// A trial period bound is not RFC 3339.
    #[error("billing.trial_periods[{index}].{field} `{value}` is not an RFC 3339 time with offset (e.g. 2020-02-14T00:00:00+08:00)")]
    BadTime {
        /// Which period.
        index: usize,
        /// `from` or `until`.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// A trial period ends before it starts.
    #[error("billing.trial_periods[{0}]: `from` is not before `until`")]
    EmptyTrial(usize),
    /// Tiers are not a valid graduated list.
    #[error("billing.{list}: {problem}")]
    BadTiers {
        /// Which tier list.
        list: String,
        /// What is wrong.
        problem: String,
    },
    /// Other field problems.
    #[error("billing.{field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A price version that cannot be used.
    #[error("billing.price_versions[{index}] (id `{id}`): {problem}")]
    BadVersion {
        /// Position in `price_versions`, from 0.
        index: usize,
        /// Its id as given.
        id: String,
        /// What is wrong.
        problem: String,
    },
}

/// A graduated tier in base units (calls or bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Upper bound (inclusive) on the cumulative quantity in base units; `None` is unbounded.
    pub up_to: Option<u64>,
    /// Price per unit (10,000 calls or 1 GB).
    pub price: Decimal,
}

/// A checked price list: what one price version (or an account's own
/// prices) charges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceList {
    /// Currency code.
    pub currency: String,
    /// Call tiers (bounds in calls).
    pub call_tiers: Vec<Tier>,
    /// Default traffic tiers (bounds in bytes).
    pub traffic_default: Vec<Tier>,
    /// Per-region traffic tiers (bounds in bytes).
    pub traffic_regions: BTreeMap<String, Vec<Tier>>,
}

impl PriceList {
    /// The traffic tiers for a gateway region.
    pub fn traffic_tiers(&self, region: &str) -> &[Tier] {
        self.traffic_regions.get(region).unwrap_or(&self.traffic_default)
    }

    /// Checks tier lists given in the configuration's shape; `at` names
    /// where they are (`prices`, `price_versions[1]`) in errors.
    pub fn check(
        at: &str,
        currency: String,
        calls: &[TierConfig],
        traffic_default: &[TierConfig],
        traffic_regions: &BTreeMap<String, Vec<TierConfig>>,
    ) -> Result<PriceList, ConfigError> {
        let mut regions = BTreeMap::new();
        for (region, tiers) in traffic_regions {
            regions.insert(region.clone(), check_tiers(format!("{at}.traffic_regions.{region}"), tiers, GB)?);
        }
        Ok(PriceList {
            currency,
            call_tiers: check_tiers(format!("{at}.calls"), calls, 1)?,
            traffic_default: check_tiers(format!("{at}.traffic_default"), traffic_default, GB)?,
            traffic_regions: regions,
        })
    }
}

/// A price list and the months it prices (section 11.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceVersion {
    /// Written on the bills it prices; `None` for an unnamed
    /// `[billing.prices]` (its bills carry no `price_version`).
    pub id: Option<String>,
    /// The first month it prices; `None`: since always (only the first).
    pub from: Option<Month>,
    /// The prices.
    pub prices: PriceList,
}

/// The checked configuration the billing functions use.
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// The billing calendar.
    pub calendar: BillingCalendar,
    /// Time zone name as configured (written on bills).
    pub time_zone: String,
    /// Free tier, or `None` when disabled.
    pub free_tier: Option<FreeTierConfig>,
    /// Trial windows `[from, until)` in UTC epoch seconds. Each configured
    /// bound is rounded up to a whole second, which keeps
    /// `from <= hour_start < until` exact for whole-second hour starts: a
    /// period from 00:00:00.500 does not cover the hour starting 00:00:00,
    /// one until 00:00:00.500 does.
    pub trials: Vec<(i64, i64)>,
    /// The price versions, by first month: the first since always.
    pub versions: Vec<PriceVersion>,
    /// Spend lines for every account (`[billing.alerts]`), above 0.
    pub spend_thresholds: Vec<Decimal>,
    /// The configuration these rules were checked from (a store remembers
    /// it, to restate the months a change of rules changes: section 11.2).
    pub source: BillingConfig,
}

impl Default for Rules {
    fn default() -> Self {
        BillingConfig::default().validate().expect("defaults are valid")
    }
}

impl Rules {
    /// The price version in force at the first instant of `month`: the
    /// one that prices the whole month.
    pub fn version(&self, month: Month) -> &PriceVersion {
        let later = self.versions.partition_point(|v| v.from.is_none_or(|f| f <= month));
        &self.versions[later.max(1) - 1]
    }

    /// Whether a bill of `month` computed with `other` may differ from one
    /// computed with these rules from the same usage and account record:
    /// the free tier, trials or currency differ, or the month's price
    /// version (its id or prices). The time zone is not compared: usage is
    /// stored by the months and hours of the zone it was aggregated in.
    pub fn may_bill_differently(&self, other: &Rules, month: Month) -> bool {
        self.free_tier != other.free_tier || self.trials != other.trials || self.version(month) != other.version(month)
    }

    /// Whether an hour starting at `hour_start` (UTC seconds) is in a trial.
    pub fn in_trial(&self, hour_start: i64) -> bool {
        self.trials.iter().any(|(f, u)| *f <= hour_start && hour_start < *u)
    }
}

/// A spend line as given (a decimal string): above 0, at most 2 places.
pub fn spend_line(text: &str) -> Result<Decimal, String> {
    let d: Decimal = text.trim().parse().map_err(|_| format!("`{text}` is not a decimal number such as \"100.00\""))?;
    if d <= Decimal::ZERO || d.scale() > 2 || d > Decimal::from(MAX_UNIT_PRICE) * Decimal::from(1_000_000) {
        return Err(format!("`{text}` must be above 0, at most 10^12, with at most 2 decimal places"));
    }
    Ok(d.normalize())
}

pub(crate) fn check_tiers(list: String, tiers: &[TierConfig], unit: u64) -> Result<Vec<Tier>, ConfigError> {
    let bad = |problem: String| ConfigError::BadTiers { list: list.clone(), problem };
    if tiers.is_empty() {
        return Err(bad("at least one tier is required".into()));
    }
    let mut out = Vec::with_capacity(tiers.len());
    let mut prev = 0u64;
    for (i, t) in tiers.iter().enumerate() {
        if t.price.is_sign_negative() || t.price > Decimal::from(MAX_UNIT_PRICE) || t.price.scale() > MAX_PRICE_SCALE {
            return Err(bad(format!(
                "tier {}: price {} must be between 0 and {MAX_UNIT_PRICE} with at most {MAX_PRICE_SCALE} decimal places",
                i + 1,
                t.price
            )));
        }
        let last = i + 1 == tiers.len();
        let up_to = match (t.up_to, last) {
            (None, true) => None,
            (None, false) => return Err(bad(format!("tier {}: only the last tier may omit `up_to`", i + 1))),
            (Some(_), true) => return Err(bad("the last tier must omit `up_to` (it is unbounded)".into())),
            (Some(u), false) => {
                let u = u.checked_mul(unit).ok_or_else(|| bad(format!("tier {}: `up_to` is too large", i + 1)))?;
                if u <= prev {
                    return Err(bad(format!("tier {}: `up_to` must be greater than the previous tier's (tiers overlap)", i + 1)));
                }
                prev = u;
                Some(u)
            }
        };
        out.push(Tier { up_to, price: t.price });
    }
    Ok(out)
}

impl BillingConfig {
    /// Parses the `[billing]` table from TOML text.
    pub fn from_toml(text: &str) -> Result<BillingConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks every field and cross-field rule.
    pub fn validate(&self) -> Result<Rules, ConfigError> {
        let tz: Tz = self.time_zone.parse().map_err(|_| ConfigError::UnknownTimeZone(self.time_zone.clone()))?;
        if self.currency.trim().is_empty() {
            return Err(ConfigError::Invalid { field: "currency", problem: "must not be empty".into() });
        }
        if self.free_tier.enabled && self.free_tier.months == 0 {
            return Err(ConfigError::Invalid { field: "free_tier.months", problem: "must be at least 1 (or set enabled = false)".into() });
        }
        // Bounds in exact milliseconds (a leap second stays in the second it names).
        let parse = |index: usize, field: &'static str, value: &str| {
            rfc3339_millis(value).map_err(|_| ConfigError::BadTime { index, field, value: value.to_string() })
        };
        let mut trials = Vec::new();
        for (i, t) in self.trial_periods.iter().enumerate() {
            let from = match &t.from {
                Some(f) => Some(parse(i, "from", f)?),
                None => None,
            };
            let until = parse(i, "until", &t.until)?;
            if from.is_some_and(|f| f >= until) {
                return Err(ConfigError::EmptyTrial(i));
            }
            // Hour starts are whole seconds: against them, an exact bound
            // compares like the next whole second.
            let ceil_secs = |ms: i64| ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0);
            trials.push((from.map_or(i64::MIN, ceil_secs), ceil_secs(until)));
        }
        let calendar = BillingCalendar::new(tz);
        let p = &self.prices;
        let base = PriceList::check("prices", self.currency.clone(), &p.calls, &p.traffic_default, &p.traffic_regions)?;
        if p.id.as_ref().is_some_and(|id| id.trim().is_empty()) {
            return Err(ConfigError::Invalid { field: "prices.id", problem: "must not be empty (or leave it out)".into() });
        }
        let mut later = Vec::with_capacity(self.price_versions.len());
        for (index, v) in self.price_versions.iter().enumerate() {
            later.push((index, self.check_version(index, v, &calendar)?));
        }
        later.sort_by_key(|(i, v)| (v.from, *i));
        if let Some(pair) = later.windows(2).find(|w| w[0].1.from == w[1].1.from) {
            let ((_, first), (index, second)) = (&pair[0], &pair[1]);
            let problem = format!("takes effect in the same month as `{}`", first.id.as_deref().unwrap_or_default());
            return Err(ConfigError::BadVersion { index: *index, id: second.id.clone().unwrap_or_default(), problem });
        }
        let mut versions = vec![PriceVersion { id: p.id.clone(), from: None, prices: base }];
        versions.extend(later.into_iter().map(|(_, v)| v));
        let mut ids: Vec<&str> = versions.iter().filter_map(|v| v.id.as_deref()).collect();
        ids.sort_unstable();
        if let Some(twice) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid { field: "price_versions", problem: format!("the id `{}` is used twice", twice[0]) });
        }
        let mut spend_thresholds = Vec::with_capacity(self.alerts.spend_thresholds.len());
        for t in &self.alerts.spend_thresholds {
            spend_thresholds.push(spend_line(t).map_err(|problem| ConfigError::Invalid { field: "alerts.spend_thresholds", problem })?);
        }
        Ok(Rules {
            calendar,
            spend_thresholds,
            time_zone: self.time_zone.clone(),
            free_tier: self.free_tier.enabled.then(|| self.free_tier.clone()),
            trials,
            versions,
            source: self.clone(),
        })
    }

    /// Checks one `[[billing.price_versions]]` entry.
    fn check_version(&self, index: usize, v: &PriceVersionConfig, calendar: &BillingCalendar) -> Result<PriceVersion, ConfigError> {
        let bad = |problem: String| ConfigError::BadVersion { index, id: v.id.clone(), problem };
        if v.id.trim().is_empty() {
            return Err(bad("`id` must not be empty".into()));
        }
        let ms = rfc3339_millis(&v.effective_from)
            .map_err(|_| bad(format!("effective_from `{}` is not an RFC 3339 time with offset", v.effective_from)))?;
        let month = calendar.month_of(ms);
        if ms != calendar.month_start(month) * 1000 {
            let next = calendar.local_rfc3339(calendar.month_start(month.next()));
            return Err(bad(format!(
                "effective_from `{}` is not the first instant of a month in the billing time zone {} (the next is {next}): a month \
                 is priced by one version, so versions change at month starts",
                v.effective_from, self.time_zone
            )));
        }
        let currency = v.currency.clone().unwrap_or_else(|| self.currency.clone());
        if currency.trim().is_empty() {
            return Err(bad("`currency` must not be empty".into()));
        }
        let prices = PriceList::check(&format!("price_versions[{index}]"), currency, &v.calls, &v.traffic_default, &v.traffic_regions)?;
        Ok(PriceVersion { id: Some(v.id.clone()), from: Some(month), prices })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_match_the_spec() {
        let r = Rules::default();
        assert_eq!(r.time_zone, "Asia/Shanghai");
        assert_eq!(r.versions[0].prices.call_tiers.len(), 3);
        assert_eq!(r.free_tier.as_ref().unwrap().public_out_bytes_per_month, 1_073_741_824);
        assert_eq!(r.trials, vec![(i64::MIN, 1_581_609_600)]);
    }

    #[test]
    fn rejects_unknown_keys() {
        let err = BillingConfig::from_toml("time_zone = \"UTC\"\ntimezone = \"UTC\"").unwrap_err();
        assert!(err.to_string().contains("unknown field `timezone`"), "{err}");
    }

    #[test]
    fn rejects_float_prices() {
        let err = BillingConfig::from_toml("[prices]\ncalls = [{ price = 0.06 }]").unwrap_err();
        assert!(err.to_string().contains("price"), "{err}");
    }

    #[test]
    fn cross_field_errors_are_clear() {
        let cfg = BillingConfig { time_zone: "Mars/Olympus".into(), ..Default::default() };
        assert_eq!(cfg.validate().unwrap_err(), ConfigError::UnknownTimeZone("Mars/Olympus".into()));

        let cfg = BillingConfig::from_toml(
            "[prices]\ncalls = [{ up_to = 100, price = \"0.06\" }, { up_to = 50, price = \"0.04\" }, { price = \"0.03\" }]",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("tiers overlap"), "{err}");

        let cfg =
            BillingConfig::from_toml("[[trial_periods]]\nfrom = \"2020-02-14T00:00:00+08:00\"\nuntil = \"2020-02-01T00:00:00+08:00\"")
                .unwrap();
        assert_eq!(cfg.validate().unwrap_err(), ConfigError::EmptyTrial(0));

        let cfg = BillingConfig::from_toml("[prices]\ncalls = [{ price = \"-1\" }]").unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("between 0"));
    }

    #[test]
    fn trial_bounds_with_fractions_compare_exactly_with_hour_starts() {
        let cfg = BillingConfig::from_toml(
            "[[trial_periods]]\nfrom = \"2021-03-01T00:00:00.500+08:00\"\nuntil = \"2021-03-01T02:00:00.001+08:00\"\n\
             [[trial_periods]]\nfrom = \"2021-04-01T00:00:00+08:00\"\nuntil = \"2021-04-01T00:59:60.5+08:00\"",
        )
        .unwrap();
        let r = cfg.validate().unwrap();
        let h0 = 1_614_528_000; // 2021-03-01T00:00:00+08:00
        assert_eq!(r.trials[0], (h0 + 1, h0 + 7201));
        assert!(!r.in_trial(h0));
        assert!(r.in_trial(h0 + 3600));
        assert!(r.in_trial(h0 + 7200));
        assert!(!r.in_trial(h0 + 10_800));
        // A leap second in a bound is the second it names: until 00:59:59.999 (ceiled to 01:00:00).
        let april = 1_617_206_400; // 2021-04-01T00:00:00+08:00
        assert_eq!(r.trials[1], (april, april + 3600));
        assert!(!r.in_trial(april + 3600));
        // Emptiness is decided on the exact bounds.
        let cfg = BillingConfig::from_toml(
            "[[trial_periods]]\nfrom = \"2021-03-01T00:00:00.500+08:00\"\nuntil = \"2021-03-01T00:00:00.400+08:00\"",
        )
        .unwrap();
        assert_eq!(cfg.validate().unwrap_err(), ConfigError::EmptyTrial(0));
    }

    #[test]
    fn a_toml_file_overrides_defaults() {
        let cfg = BillingConfig::from_toml(
            "time_zone = \"Asia/Kolkata\"\ntrial_periods = []\n[free_tier]\nmonths = 6\n[prices.traffic_regions]\nap-hongkong = [{ up_to = 10, price = \"1.00\" }, { price = \"0.50\" }]",
        )
        .unwrap();
        let r = cfg.validate().unwrap();
        assert_eq!(r.free_tier.as_ref().unwrap().months, 6);
        assert!(r.trials.is_empty());
        assert_eq!(r.versions[0].prices.traffic_tiers("ap-hongkong")[0].up_to, Some(10 * GB));
        assert_eq!(r.versions[0].prices.traffic_tiers("ap-guangzhou")[0].price, Decimal::new(8, 1));
    }
}
