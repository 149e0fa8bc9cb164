//! Task configuration: what one kind of measurement of one tenant looks like, and the privacy and
//! batching rules its aggregates obey.
//!
//! A [`TaskConfig`] is public: clients, shufflers, both aggregators and the collector hold the same
//! one. The secret that only the two aggregators share (the Prio3 verification key) is kept apart
//! from it by the aggregators.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::hpke::HpkeConfig;
use crate::ids::{Interval, IntervalError, TaskId, Time};

/// Why a task configuration is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskConfigError {
    /// A field has a value outside what hush supports.
    #[error("invalid task field {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> TaskConfigError {
    TaskConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The kind of measurement a task aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasurementKind {
    /// One report per event, holding the event's bucket (Prio3Histogram).
    EventHistogram,
    /// One report per client window, holding its bucket counts with an L1 bound
    /// (Prio3L1BoundSum).
    WindowHistogram,
    /// One report per client window, holding a bounded count (Prio3L1BoundSum of length 1).
    Counter,
}

impl MeasurementKind {
    /// Whether the task's aggregate is a latency histogram.
    pub fn is_histogram(self) -> bool {
        !matches!(self, MeasurementKind::Counter)
    }
}

/// A privacy parameter ε, held exactly in millionths so budgets add up without rounding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epsilon(u64);

impl Epsilon {
    /// ε = `micros` / 1,000,000.
    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// ε as a float; non-finite or negative values and values below one millionth are refused.
    pub fn from_f64(eps: f64) -> Result<Self, TaskConfigError> {
        if !eps.is_finite() || eps <= 0.0 || eps > 1e9 {
            return Err(invalid(
                "epsilon",
                format!("{eps} is not a positive finite number"),
            ));
        }
        let micros = (eps * 1e6).round() as u64;
        if micros == 0 {
            return Err(invalid(
                "epsilon",
                format!("{eps} is below the resolution of 1e-6"),
            ));
        }
        Ok(Self(micros))
    }

    /// Millionths of ε.
    pub const fn micros(self) -> u64 {
        self.0
    }

    /// ε as a float.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }

    /// `self - other`, or zero.
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// `self + other`, saturating.
    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for Epsilon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{frac:06}");
            write!(f, "{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

impl fmt::Debug for Epsilon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ε={self}")
    }
}

impl Serialize for Epsilon {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.as_f64())
    }
}

impl<'de> Deserialize<'de> for Epsilon {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Epsilon::from_f64(v).map_err(serde::de::Error::custom)
    }
}

/// The most buckets a histogram task may have.
pub const MAX_BUCKETS: usize = 1024;
/// The smallest and largest packet sizes a task may set.
pub const PACKET_SIZE_RANGE: std::ops::RangeInclusive<u32> = 256..=1 << 20;

/// The raw, unchecked fields of a task as they appear in a TOML file or an admin request. Turn it
/// into a [`TaskConfig`] with [`TaskConfig::new`], which checks every field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskParams {
    /// The task id; a fresh random id if absent.
    #[serde(default = "TaskId::random")]
    pub task_id: TaskId,
    /// The tenant that owns the task: lowercase letters, digits, '-' and '_'.
    pub tenant: String,
    /// A human-readable name.
    #[serde(default)]
    pub name: String,
    /// What is measured.
    pub kind: MeasurementKind,
    /// Histogram bucket upper bounds in microseconds, strictly increasing; empty for counters.
    #[serde(default)]
    pub bucket_bounds_us: Vec<u64>,
    /// The most one client may contribute per window (events, or the counter's value).
    pub contribution_bound: u64,
    /// Clip values over the bound instead of refusing them.
    #[serde(default)]
    pub clip_contributions: bool,
    /// Window length and report time precision, in seconds.
    #[serde(default = "defaults::time_precision_s")]
    pub time_precision_s: u64,
    /// The fewest reports an aggregate may contain.
    #[serde(default = "defaults::min_batch_size")]
    pub min_batch_size: u64,
    /// ε spent by one collection.
    #[serde(default = "defaults::epsilon_per_collection")]
    pub epsilon_per_collection: Epsilon,
    /// Total ε that may be spent on one time bucket.
    #[serde(default = "defaults::epsilon_budget")]
    pub epsilon_budget: Epsilon,
    /// How old a report may be when it reaches an aggregator, in seconds.
    #[serde(default = "defaults::report_expiry_s")]
    pub report_expiry_s: u64,
    /// Exact size of every onion packet of the task, in bytes.
    #[serde(default = "defaults::packet_size")]
    pub packet_size: u32,
    /// The collector's HPKE config: aggregate shares are sealed to it.
    pub collector_hpke_config: HpkeConfig,
    /// Percent of the budget reserved for alert drill-downs.
    #[serde(default = "defaults::alert_budget_percent")]
    pub alert_budget_percent: u8,
    /// How long released aggregates are kept, in seconds; 0 keeps them forever.
    #[serde(default = "defaults::retention_s")]
    pub retention_s: u64,
    /// Percent of each collection's ε spent on the noisy report count (the rest calibrates the
    /// aggregate's noise); 0 releases no report count.
    #[serde(default = "defaults::count_epsilon_percent")]
    pub count_epsilon_percent: u8,
    /// Most collections of one batch (interval) in all purposes; 0 allows one routine
    /// collection plus as many alert drill-downs as the alert budget pays for, 1 is DAP's strict
    /// collect-once rule.
    #[serde(default)]
    pub max_collections_per_batch: u32,
}

/// Default values of optional task fields.
pub mod defaults {
    use super::Epsilon;

    /// One-minute windows.
    pub fn time_precision_s() -> u64 {
        60
    }
    /// At least 100 reports per aggregate.
    pub fn min_batch_size() -> u64 {
        100
    }
    /// ε = 1 per collection.
    pub fn epsilon_per_collection() -> Epsilon {
        Epsilon::from_micros(1_000_000)
    }
    /// ε = 10 per time bucket in total.
    pub fn epsilon_budget() -> Epsilon {
        Epsilon::from_micros(10_000_000)
    }
    /// Reports older than an hour are refused.
    pub fn report_expiry_s() -> u64 {
        3_600
    }
    /// 4 KiB packets: room for a Histogram(64) report through four hops.
    pub fn packet_size() -> u32 {
        4_096
    }
    /// 30% routine, 70% alert drill-downs.
    pub fn alert_budget_percent() -> u8 {
        70
    }
    /// Keep released aggregates for 30 days.
    pub fn retention_s() -> u64 {
        30 * 86_400
    }
    /// 10% of each collection's ε goes to the report count.
    pub fn count_epsilon_percent() -> u8 {
        10
    }
}

/// The most a task's count may take of each collection's ε, in percent.
pub const MAX_COUNT_EPSILON_PERCENT: u8 = 50;

/// What a collection spends its budget on: routine collection of closed windows, or alert
/// drill-downs. Each has its own share of a window's budget and its own ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetPurpose {
    /// Routine collection (once per batch).
    Routine,
    /// Alert drill-downs (`alert_budget_percent` of the budget).
    Alert,
}

impl BudgetPurpose {
    /// Both purposes.
    pub const ALL: [BudgetPurpose; 2] = [BudgetPurpose::Routine, BudgetPurpose::Alert];

    /// Its byte in stored keys (the privacy ledger): 0 routine, 1 alert.
    pub fn code(self) -> u8 {
        match self {
            BudgetPurpose::Routine => 0,
            BudgetPurpose::Alert => 1,
        }
    }

    /// Its name in messages and the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            BudgetPurpose::Routine => "routine",
            BudgetPurpose::Alert => "alert",
        }
    }

    /// From the wire; unspecified means routine.
    pub fn from_proto(p: i32) -> Result<Self, String> {
        match crate::proto::v1::BudgetPurpose::try_from(p) {
            Ok(
                crate::proto::v1::BudgetPurpose::Unspecified
                | crate::proto::v1::BudgetPurpose::Routine,
            ) => Ok(BudgetPurpose::Routine),
            Ok(crate::proto::v1::BudgetPurpose::Alert) => Ok(BudgetPurpose::Alert),
            Err(_) => Err(format!("unknown budget purpose {p}")),
        }
    }

    /// On the wire.
    pub fn to_proto(self) -> crate::proto::v1::BudgetPurpose {
        match self {
            BudgetPurpose::Routine => crate::proto::v1::BudgetPurpose::Routine,
            BudgetPurpose::Alert => crate::proto::v1::BudgetPurpose::Alert,
        }
    }
}

/// A checked task configuration. Fields are private and were validated by [`TaskConfig::new`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TaskParams", into = "TaskParams")]
pub struct TaskConfig {
    p: TaskParams,
}

impl TaskConfig {
    /// Checks `p` and makes a task of it.
    pub fn new(p: TaskParams) -> Result<Self, TaskConfigError> {
        let t = &p.tenant;
        if t.is_empty()
            || t.len() > 64
            || !t
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "tenant",
                format!("{t:?} must be 1 to 64 characters of a-z, 0-9, '-' or '_'"),
            ));
        }
        if p.name.len() > 256 {
            return Err(invalid("name", "longer than 256 bytes"));
        }
        match p.kind {
            MeasurementKind::EventHistogram | MeasurementKind::WindowHistogram => {
                if p.bucket_bounds_us.is_empty() {
                    return Err(invalid(
                        "bucket_bounds_us",
                        "a histogram needs at least one bound",
                    ));
                }
                if p.bucket_bounds_us.len() + 1 > MAX_BUCKETS {
                    return Err(invalid(
                        "bucket_bounds_us",
                        format!(
                            "{} bounds make more than {MAX_BUCKETS} buckets",
                            p.bucket_bounds_us.len()
                        ),
                    ));
                }
                if let Some(w) = p.bucket_bounds_us.windows(2).find(|w| w[0] >= w[1]) {
                    return Err(invalid(
                        "bucket_bounds_us",
                        format!(
                            "must increase strictly, but {} is followed by {}",
                            w[0], w[1]
                        ),
                    ));
                }
                if p.bucket_bounds_us[0] == 0 {
                    return Err(invalid(
                        "bucket_bounds_us",
                        "the first bound must be above 0",
                    ));
                }
            }
            MeasurementKind::Counter => {
                if !p.bucket_bounds_us.is_empty() {
                    return Err(invalid(
                        "bucket_bounds_us",
                        "a counter has no buckets; leave it empty",
                    ));
                }
            }
        }
        if p.contribution_bound == 0 || p.contribution_bound > u32::MAX as u64 {
            return Err(invalid("contribution_bound", "must be in 1..=4294967295"));
        }
        if p.time_precision_s == 0 {
            return Err(invalid("time_precision_s", "must be at least 1 second"));
        }
        if p.min_batch_size == 0 {
            return Err(invalid("min_batch_size", "must be at least 1"));
        }
        if p.epsilon_per_collection.micros() == 0 || p.epsilon_budget.micros() == 0 {
            return Err(invalid("epsilon", "must be positive"));
        }
        if p.epsilon_per_collection > p.epsilon_budget {
            return Err(invalid(
                "epsilon_per_collection",
                format!(
                    "{} exceeds the total budget {}",
                    p.epsilon_per_collection, p.epsilon_budget
                ),
            ));
        }
        if p.report_expiry_s == 0 {
            return Err(invalid("report_expiry_s", "must be at least 1 second"));
        }
        if !PACKET_SIZE_RANGE.contains(&p.packet_size) {
            return Err(invalid(
                "packet_size",
                format!("{} is outside {PACKET_SIZE_RANGE:?}", p.packet_size),
            ));
        }
        if p.alert_budget_percent > 100 {
            return Err(invalid("alert_budget_percent", "must be at most 100"));
        }
        if p.count_epsilon_percent > MAX_COUNT_EPSILON_PERCENT {
            return Err(invalid(
                "count_epsilon_percent",
                format!("must be at most {MAX_COUNT_EPSILON_PERCENT}"),
            ));
        }
        if p.count_epsilon_percent > 0
            && (p.epsilon_per_collection.micros() * u64::from(p.count_epsilon_percent)) < 100
        {
            return Err(invalid(
                "count_epsilon_percent",
                "leaves the report count less than one millionth of ε; raise it or set 0 (no count)",
            ));
        }
        p.collector_hpke_config
            .validate()
            .map_err(|e| invalid("collector_hpke_config", e.to_string()))?;
        Ok(Self { p })
    }

    /// The raw fields.
    pub fn params(&self) -> &TaskParams {
        &self.p
    }
    /// The task id.
    pub fn id(&self) -> TaskId {
        self.p.task_id
    }
    /// The owning tenant.
    pub fn tenant(&self) -> &str {
        &self.p.tenant
    }
    /// The human name.
    pub fn name(&self) -> &str {
        &self.p.name
    }
    /// The measurement kind.
    pub fn kind(&self) -> MeasurementKind {
        self.p.kind
    }
    /// Bucket upper bounds in microseconds.
    pub fn bucket_bounds_us(&self) -> &[u64] {
        &self.p.bucket_bounds_us
    }
    /// Number of entries in the aggregate: buckets, or 1 for a counter.
    pub fn output_len(&self) -> usize {
        match self.p.kind {
            MeasurementKind::Counter => 1,
            _ => self.p.bucket_bounds_us.len() + 1,
        }
    }
    /// The per-client, per-window contribution bound.
    pub fn contribution_bound(&self) -> u64 {
        self.p.contribution_bound
    }
    /// Whether over-bound values are clipped rather than refused.
    pub fn clip_contributions(&self) -> bool {
        self.p.clip_contributions
    }
    /// Window length and time precision in seconds.
    pub fn time_precision_s(&self) -> u64 {
        self.p.time_precision_s
    }
    /// Minimum reports per aggregate.
    pub fn min_batch_size(&self) -> u64 {
        self.p.min_batch_size
    }
    /// ε per collection.
    pub fn epsilon_per_collection(&self) -> Epsilon {
        self.p.epsilon_per_collection
    }
    /// Total ε per time bucket.
    pub fn epsilon_budget(&self) -> Epsilon {
        self.p.epsilon_budget
    }
    /// The part of the budget for a purpose: the alert share is `alert_budget_percent`, routine
    /// the rest.
    pub fn budget_for(&self, purpose: BudgetPurpose) -> Epsilon {
        let total = self.p.epsilon_budget.micros() as u128;
        let alert_part = total * self.p.alert_budget_percent as u128 / 100;
        Epsilon::from_micros(match purpose {
            BudgetPurpose::Alert => alert_part,
            BudgetPurpose::Routine => total - alert_part,
        } as u64)
    }
    /// Report expiry in seconds.
    pub fn report_expiry_s(&self) -> u64 {
        self.p.report_expiry_s
    }
    /// Packet size in bytes.
    pub fn packet_size(&self) -> usize {
        self.p.packet_size as usize
    }
    /// The collector's HPKE config.
    pub fn collector_hpke_config(&self) -> &HpkeConfig {
        &self.p.collector_hpke_config
    }
    /// Retention of released aggregates in seconds (0 = forever).
    pub fn retention_s(&self) -> u64 {
        self.p.retention_s
    }

    /// Windows that start before this are past the task's retention; `None` keeps them forever.
    pub fn aggregate_cutoff(&self, now: Time) -> Option<Time> {
        (self.retention_s() > 0).then(|| now.sub_secs(self.retention_s()))
    }

    /// The window holding `t`.
    pub fn window_of(&self, t: Time) -> Time {
        t.round_down(self.p.time_precision_s)
    }

    /// The window holding `t`, as an interval.
    pub fn window(&self, t: Time) -> Result<Interval, IntervalError> {
        Interval::new(self.window_of(t), self.p.time_precision_s)
    }

    /// Checks that `interval` is aligned to the task's time precision.
    pub fn check_interval(&self, interval: &Interval) -> Result<(), IntervalError> {
        interval.check_aligned(self.p.time_precision_s)
    }

    /// The bucket that a latency of `latency_us` microseconds falls into: bucket `i` holds
    /// `[bound[i-1], bound[i])`, the last bucket is open-ended. Counters have one bucket.
    pub fn bucket_of(&self, latency_us: u64) -> usize {
        self.p
            .bucket_bounds_us
            .partition_point(|b| *b <= latency_us)
    }

    /// The unit of privacy is one service instance's contribution to one window. Its L1
    /// sensitivity under substitution, which the aggregate's noise is calibrated to, is twice the
    /// contribution bound for every kind: an event histogram instance sends up to
    /// `contribution_bound` one-hot reports (each moves two buckets by one when substituted), the
    /// L1-bounded kinds send one report of L1 norm at most `contribution_bound`.
    pub fn sensitivity(&self) -> u64 {
        2 * self.p.contribution_bound
    }

    /// How many reports one instance sends per window at most: `contribution_bound` for an
    /// event histogram (one per event), 1 for the per-window kinds. It is the sensitivity of
    /// the report count.
    pub fn reports_per_instance(&self) -> u64 {
        match self.p.kind {
            MeasurementKind::EventHistogram => self.p.contribution_bound,
            _ => 1,
        }
    }

    /// Percent of each collection's ε spent on the report count (0: no count is released).
    pub fn count_epsilon_percent(&self) -> u8 {
        self.p.count_epsilon_percent
    }

    /// The ε of the noise on the aggregate: `epsilon_per_collection` less the count's part.
    pub fn aggregate_epsilon(&self) -> Epsilon {
        split_epsilon(self.p.epsilon_per_collection, self.p.count_epsilon_percent).0
    }

    /// The ε of the noise on the report count, if a count is released.
    pub fn count_epsilon(&self) -> Option<Epsilon> {
        split_epsilon(self.p.epsilon_per_collection, self.p.count_epsilon_percent).1
    }

    /// Most collections of one batch (0: one routine plus what the alert budget allows).
    pub fn max_collections_per_batch(&self) -> u32 {
        self.p.max_collections_per_batch
    }
}

impl TryFrom<TaskParams> for TaskConfig {
    type Error = TaskConfigError;
    fn try_from(p: TaskParams) -> Result<Self, TaskConfigError> {
        TaskConfig::new(p)
    }
}

impl From<TaskConfig> for TaskParams {
    fn from(t: TaskConfig) -> Self {
        t.p
    }
}

/// Splits one collection's ε into the aggregate's part and the report count's part
/// (`count_percent` of it, rounded down to a millionth; `None` for 0). The two add up to
/// `total`: a collection spends exactly `total` (basic composition).
pub fn split_epsilon(total: Epsilon, count_percent: u8) -> (Epsilon, Option<Epsilon>) {
    let count = (u128::from(total.micros()) * u128::from(count_percent) / 100) as u64;
    (
        Epsilon::from_micros(total.micros() - count),
        (count_percent > 0).then(|| Epsilon::from_micros(count)),
    )
}

/// `n - 1` bucket bounds spaced evenly on a log scale from `min_us` to `max_us`, rounded to whole
/// microseconds and made strictly increasing: the usual layout for latency histograms.
pub fn log_spaced_bounds(min_us: u64, max_us: u64, buckets: usize) -> Vec<u64> {
    let n = buckets.saturating_sub(1).max(1);
    let (lo, hi) = ((min_us.max(1)) as f64, (max_us.max(min_us + 1)) as f64);
    let mut out: Vec<u64> = Vec::with_capacity(n);
    for i in 0..n {
        let f = if n == 1 {
            0.0
        } else {
            i as f64 / (n - 1) as f64
        };
        let mut v = (lo * (hi / lo).powf(f)).round() as u64;
        if let Some(&last) = out.last()
            && v <= last
        {
            v = last + 1;
        }
        out.push(v);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hpke::HpkeKeypair;

    pub(crate) fn params(kind: MeasurementKind) -> TaskParams {
        TaskParams {
            task_id: TaskId::random(),
            tenant: "acme".into(),
            name: "checkout latency".into(),
            kind,
            bucket_bounds_us: if kind == MeasurementKind::Counter {
                vec![]
            } else {
                log_spaced_bounds(1_000, 10_000_000, 32)
            },
            contribution_bound: 10,
            clip_contributions: false,
            time_precision_s: 60,
            min_batch_size: 10,
            epsilon_per_collection: Epsilon::from_micros(1_000_000),
            epsilon_budget: Epsilon::from_micros(4_000_000),
            report_expiry_s: 3_600,
            packet_size: 4_096,
            collector_hpke_config: HpkeKeypair::generate(1).config().clone(),
            alert_budget_percent: 70,
            retention_s: 86_400,
            count_epsilon_percent: 10,
            max_collections_per_batch: 0,
        }
    }

    #[test]
    fn valid_task_and_buckets() {
        let t = TaskConfig::new(params(MeasurementKind::EventHistogram)).unwrap();
        assert_eq!(t.output_len(), 32);
        let b = t.bucket_bounds_us();
        assert_eq!(b[0], 1_000);
        assert_eq!(*b.last().unwrap(), 10_000_000);
        assert_eq!(t.bucket_of(0), 0);
        assert_eq!(t.bucket_of(999), 0);
        assert_eq!(t.bucket_of(1_000), 1);
        assert_eq!(t.bucket_of(u64::MAX), 31);
        // Ten events of one instance per window: the instance, not the event, is protected.
        assert_eq!(t.sensitivity(), 20);
        assert_eq!(t.reports_per_instance(), 10);
        assert_eq!(
            t.budget_for(BudgetPurpose::Routine),
            Epsilon::from_micros(1_200_000)
        );
        assert_eq!(
            t.budget_for(BudgetPurpose::Alert),
            Epsilon::from_micros(2_800_000)
        );
        for p in BudgetPurpose::ALL {
            assert_eq!(BudgetPurpose::from_proto(p.to_proto() as i32), Ok(p));
        }
        assert_eq!(BudgetPurpose::from_proto(0), Ok(BudgetPurpose::Routine));
        assert!(BudgetPurpose::from_proto(9).is_err());
        // 10% of ε = 1 goes to the report count.
        assert_eq!(t.aggregate_epsilon(), Epsilon::from_micros(900_000));
        assert_eq!(t.count_epsilon(), Some(Epsilon::from_micros(100_000)));
        let c = TaskConfig::new(params(MeasurementKind::Counter)).unwrap();
        assert_eq!((c.sensitivity(), c.reports_per_instance()), (20, 1));
        let mut p = params(MeasurementKind::Counter);
        p.count_epsilon_percent = 0;
        let none = TaskConfig::new(p).unwrap();
        assert_eq!(none.count_epsilon(), None);
        assert_eq!(none.aggregate_epsilon(), Epsilon::from_micros(1_000_000));
    }

    #[test]
    fn count_share_of_epsilon_is_checked() {
        let mut p = params(MeasurementKind::Counter);
        p.count_epsilon_percent = 51;
        let e = TaskConfig::new(p).unwrap_err().to_string();
        assert!(e.contains("count_epsilon_percent"), "{e}");
        let mut p = params(MeasurementKind::Counter);
        p.epsilon_per_collection = Epsilon::from_micros(5);
        p.count_epsilon_percent = 10;
        let e = TaskConfig::new(p).unwrap_err().to_string();
        assert!(e.contains("count_epsilon_percent"), "{e}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut p = params(MeasurementKind::EventHistogram);
        p.bucket_bounds_us = vec![5, 5];
        let e = TaskConfig::new(p).unwrap_err().to_string();
        assert!(
            e.contains("bucket_bounds_us") && e.contains("strictly"),
            "{e}"
        );

        let mut p = params(MeasurementKind::Counter);
        p.tenant = "Acme Corp".into();
        assert!(
            TaskConfig::new(p)
                .unwrap_err()
                .to_string()
                .contains("tenant")
        );

        let mut p = params(MeasurementKind::Counter);
        p.epsilon_per_collection = Epsilon::from_micros(5_000_000);
        assert!(
            TaskConfig::new(p)
                .unwrap_err()
                .to_string()
                .contains("exceeds")
        );

        let mut p = params(MeasurementKind::WindowHistogram);
        p.packet_size = 10;
        assert!(
            TaskConfig::new(p)
                .unwrap_err()
                .to_string()
                .contains("packet_size")
        );
    }

    #[test]
    fn toml_round_trip_with_defaults_and_unknown_fields_refused() {
        let kp = HpkeKeypair::generate(1);
        let text = format!(
            "tenant = \"acme\"\nkind = \"counter\"\ncontribution_bound = 5\n\
             epsilon_per_collection = 0.5\ncollector_hpke_config = \"{}\"\n",
            toml::Value::try_from(kp.config())
                .unwrap()
                .as_str()
                .unwrap()
        );
        let t: TaskConfig = toml::from_str(&text).unwrap();
        assert_eq!(t.epsilon_per_collection(), Epsilon::from_micros(500_000));
        assert_eq!(t.time_precision_s(), 60);
        let back: TaskConfig = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let bad = format!("{text}colour = \"blue\"\n");
        assert!(
            toml::from_str::<TaskConfig>(&bad)
                .unwrap_err()
                .to_string()
                .contains("colour")
        );
    }

    #[test]
    fn epsilon_prints_exactly() {
        assert_eq!(Epsilon::from_f64(0.1).unwrap().to_string(), "0.1");
        assert_eq!(Epsilon::from_f64(2.0).unwrap().to_string(), "2");
        assert_eq!(Epsilon::from_micros(1_250_000).to_string(), "1.25");
        assert!(Epsilon::from_f64(f64::NAN).is_err());
        assert!(Epsilon::from_f64(-1.0).is_err());
    }
}
