//! The scenario file of `hush sim` (TOML).

use std::path::Path;

use anyhow::{Context, bail};
use hush_collector::detect::DetectorConfig;
use hush_protocol::task::log_spaced_bounds;
use serde::{Deserialize, Serialize};

/// What to simulate and which parameters to sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    /// Seed of every random draw: the same seed gives the same CSV.
    pub(crate) seed: u64,
    /// Windows per run.
    pub(crate) windows: usize,
    /// Runs per parameter combination.
    pub(crate) repetitions: usize,
    /// ε each aggregator spends per window (swept).
    pub(crate) epsilons: Vec<f64>,
    /// Requests per window of the service under test (swept).
    pub(crate) events_per_window: Vec<u64>,
    /// Requests one service instance reports per window: the window histogram's contribution
    /// bound, which sets the DP sensitivity (2 × bound under replacement).
    #[serde(default = "defaults::events_per_client")]
    pub(crate) events_per_client: u64,
    /// Requests one instance serves per window, if more than `events_per_client`: the excess
    /// is dropped by the client (the sampling loss of a lower bound). Default: the bound.
    #[serde(default)]
    pub(crate) requests_per_instance: Option<u64>,
    /// Fewest reports (instances) a window needs to be released.
    #[serde(default = "defaults::min_batch_size")]
    pub(crate) min_batch_size: u64,
    /// Percent of each collection's ε spent on the noisy report count, as in the task (the
    /// histogram's noise gets the rest).
    #[serde(default = "defaults::count_epsilon_percent")]
    pub(crate) count_epsilon_percent: u8,
    /// Windows after an anomaly starts within which detection counts toward power.
    #[serde(default = "defaults::detect_within")]
    pub(crate) detect_within: usize,
    /// Latency buckets.
    pub(crate) buckets: Buckets,
    /// The detectors' settings (the same as the results service's `[detection]`).
    #[serde(default)]
    pub(crate) detection: DetectorConfig,
    /// The services.
    pub(crate) services: Vec<Service>,
    /// Anomalies, each swept over its magnitudes (one anomaly at a time).
    pub(crate) anomalies: Vec<Anomaly>,
}

mod defaults {
    pub(super) fn events_per_client() -> u64 {
        20
    }
    pub(super) fn min_batch_size() -> u64 {
        100
    }
    pub(super) fn detect_within() -> usize {
        2
    }
    pub(super) fn count_epsilon_percent() -> u8 {
        hush_protocol::task::defaults::count_epsilon_percent()
    }
}

/// Log-spaced latency buckets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Buckets {
    /// The first bucket bound, ms.
    pub(crate) min_ms: f64,
    /// The last bucket bound, ms (above it: the open last bucket).
    pub(crate) max_ms: f64,
    /// Number of buckets.
    pub(crate) count: usize,
}

/// A service with log-normal latencies, or a mixture of log-normals (`mix`: cache hits and
/// misses, a heavy tail).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Service {
    /// Its name.
    pub(crate) name: String,
    /// Median latency, ms (one log-normal; leave out with `mix`).
    #[serde(default)]
    pub(crate) median_ms: f64,
    /// Standard deviation of the log latency (with `median_ms`).
    #[serde(default)]
    pub(crate) sigma: f64,
    /// A mixture of log-normals instead of one: each request comes from one component, chosen
    /// with probability `weight` (the weights add up to 1).
    #[serde(default)]
    pub(crate) mix: Vec<Component>,
    /// Fraction of requests that fail.
    pub(crate) error_rate: f64,
}

/// One log-normal component of a service's latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Component {
    /// Probability that a request comes from this component.
    pub(crate) weight: f64,
    /// Median latency, ms.
    pub(crate) median_ms: f64,
    /// Standard deviation of the log latency.
    pub(crate) sigma: f64,
}

impl Service {
    /// The log-normal components (one without `mix`).
    pub(crate) fn components(&self) -> Vec<Component> {
        if self.mix.is_empty() {
            vec![Component {
                weight: 1.0,
                median_ms: self.median_ms,
                sigma: self.sigma,
            }]
        } else {
            self.mix.clone()
        }
    }

    /// P(latency ≤ `ms`).
    pub(crate) fn cdf(&self, ms: f64) -> f64 {
        if ms <= 0.0 {
            return 0.0;
        }
        self.components()
            .iter()
            .map(|c| {
                c.weight
                    * hush_collector::detect::normal_cdf((ms.ln() - c.median_ms.ln()) / c.sigma)
            })
            .sum()
    }

    /// The latency quantile `q`, ms (bisection on the log scale).
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        let (mut lo, mut hi) = (1e-6_f64.ln(), 1e9_f64.ln());
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if self.cdf(mid.exp()) < q {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (0.5 * (lo + hi)).exp()
    }

    /// One latency, ms.
    pub(crate) fn sample_ms(&self, rng: &mut impl rand::Rng) -> f64 {
        let comps = self.components();
        let mut u: f64 = rng.random();
        let c = comps
            .iter()
            .find(|c| {
                u -= c.weight;
                u < 0.0
            })
            .unwrap_or(&comps[comps.len() - 1]);
        let z: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, rng);
        (c.median_ms.ln() + c.sigma * z).exp()
    }

    /// A short description: "log-normal, median 60 ms, σ 0.42" or the mixture's parts.
    pub(crate) fn shape(&self) -> String {
        if self.mix.is_empty() {
            format!("log-normal, median {} ms, σ {}", self.median_ms, self.sigma)
        } else {
            let parts: Vec<String> = self
                .mix
                .iter()
                .map(|c| {
                    format!(
                        "{:.0}% median {} ms σ {}",
                        100.0 * c.weight,
                        c.median_ms,
                        c.sigma
                    )
                })
                .collect();
            format!("log-normal mix: {}", parts.join(", "))
        }
    }
}

/// An injected change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AnomalyKind {
    /// Every request of the service gets `magnitude` ms slower (the p95 moves by as much).
    LatencyShift,
    /// The error rate rises by `magnitude` (absolute, e.g. 0.01 = one point).
    ErrorSpike,
}

impl AnomalyKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::LatencyShift => "latency_shift",
            Self::ErrorSpike => "error_spike",
        }
    }

    pub(crate) fn unit(self) -> &'static str {
        match self {
            Self::LatencyShift => "ms",
            Self::ErrorSpike => "error-rate points",
        }
    }
}

/// One anomaly and the magnitudes to try (0: none, for the false-alarm baseline).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Anomaly {
    /// What changes.
    pub(crate) kind: AnomalyKind,
    /// Which service (by name).
    pub(crate) service: String,
    /// The first window with the change (0-based).
    pub(crate) start_window: usize,
    /// Magnitudes to sweep.
    pub(crate) magnitudes: Vec<f64>,
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub(crate) fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the scenario {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and checks a scenario.
    pub(crate) fn from_toml(text: &str) -> anyhow::Result<Self> {
        let s: Self = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.detection.validate()?;
        if self.windows == 0 || self.repetitions == 0 {
            bail!("windows and repetitions must be positive");
        }
        if self.epsilons.is_empty() || self.epsilons.iter().any(|e| !(*e > 0.0 && *e <= 100.0)) {
            bail!("epsilons must be a non-empty list of values in (0, 100]");
        }
        if self.events_per_client == 0 {
            bail!("events_per_client must be positive");
        }
        for n in &self.events_per_window {
            let instances = n / self.events_per_client;
            if instances < self.min_batch_size {
                bail!(
                    "events_per_window {n} is {instances} instances of {} events, fewer than \
                     min_batch_size {}: no window would be released",
                    self.events_per_client,
                    self.min_batch_size
                );
            }
            if *n > 100_000_000 {
                bail!("events_per_window {n} is above the supported 10^8");
            }
        }
        if self.requests_per_instance.is_some_and(|r| r == 0) {
            bail!("requests_per_instance must be positive");
        }
        if self.events_per_window.is_empty() {
            bail!("events_per_window must list at least one value");
        }
        let b = &self.buckets;
        if !(b.min_ms > 0.0 && b.max_ms > b.min_ms && (2..=1_000).contains(&b.count)) {
            bail!("buckets need 0 < min_ms < max_ms and 2 to 1000 buckets");
        }
        for s in &self.services {
            if !(0.0..1.0).contains(&s.error_rate) {
                bail!("service {:?}: error_rate must lie in [0, 1)", s.name);
            }
            if !s.mix.is_empty() && (s.median_ms != 0.0 || s.sigma != 0.0) {
                bail!(
                    "service {:?}: give either median_ms and sigma or mix, not both",
                    s.name
                );
            }
            let comps = s.components();
            if comps
                .iter()
                .any(|c| !(c.median_ms > 0.0 && c.sigma > 0.0 && c.weight > 0.0))
            {
                bail!(
                    "service {:?}: every median_ms, sigma and weight must be positive",
                    s.name
                );
            }
            let total: f64 = comps.iter().map(|c| c.weight).sum();
            if (total - 1.0).abs() > 1e-6 {
                bail!(
                    "service {:?}: the mix's weights add up to {total}, not 1",
                    s.name
                );
            }
        }
        if self.anomalies.is_empty() {
            bail!("list at least one anomaly to sweep");
        }
        for a in &self.anomalies {
            if self.service(&a.service).is_none() {
                bail!(
                    "anomaly on {:?}: no service of that name in [[services]]",
                    a.service
                );
            }
            if a.start_window < self.detection.min_baseline_windows
                || a.start_window >= self.windows
            {
                bail!(
                    "anomaly on {:?}: start_window {} must leave min_baseline_windows ({}) before \
                     it and lie before windows ({})",
                    a.service,
                    a.start_window,
                    self.detection.min_baseline_windows,
                    self.windows
                );
            }
            if a.magnitudes.is_empty() || a.magnitudes.iter().any(|m| m.is_nan() || *m < 0.0) {
                bail!("anomaly on {:?}: magnitudes must be ≥ 0", a.service);
            }
            if a.kind == AnomalyKind::ErrorSpike {
                let base = self
                    .service(&a.service)
                    .map(|s| s.error_rate)
                    .unwrap_or(0.0);
                if a.magnitudes.iter().any(|m| base + m >= 1.0) {
                    bail!(
                        "anomaly on {:?}: error rate plus magnitude must stay below 1",
                        a.service
                    );
                }
            }
        }
        Ok(())
    }

    /// The service called `name`.
    pub(crate) fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The bucket bounds in microseconds.
    pub(crate) fn bounds_us(&self) -> Vec<u64> {
        let b = &self.buckets;
        log_spaced_bounds(
            (b.min_ms * 1_000.0) as u64,
            (b.max_ms * 1_000.0) as u64,
            b.count,
        )
    }

    /// The DP sensitivity of a window histogram or counter with this bound.
    pub(crate) fn sensitivity(&self) -> u64 {
        2 * self.events_per_client
    }

    /// Requests one instance serves per window.
    pub(crate) fn requests_per_instance(&self) -> u64 {
        self.requests_per_instance.unwrap_or(self.events_per_client)
    }

    /// Of `events` requests in a window, how many the released histogram counts: each
    /// instance reports at most `events_per_client` of its `requests_per_instance`.
    pub(crate) fn counted_events(&self, events: u64) -> u64 {
        let r = self.requests_per_instance().max(1);
        let kept = self.events_per_client.min(r);
        ((events as f64) * kept as f64 / r as f64).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../scenarios/default.toml");

    #[test]
    fn the_default_scenario_parses() {
        let s = Scenario::from_toml(DEFAULT).unwrap();
        assert_eq!(s.epsilons, vec![0.1, 0.5, 1.0, 2.0]);
        assert_eq!(s.bounds_us().len() + 1, s.buckets.count);
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        for (edit, want) in [
            (
                ("min_batch_size = 100", "min_batch_size = 100000"),
                "min_batch_size",
            ),
            (("start_window = 8", "start_window = 0"), "start_window"),
            (
                ("service = \"checkout\"", "service = \"nope\""),
                "no service",
            ),
            (
                ("epsilons = [0.1, 0.5, 1.0, 2.0]", "epsilons = []"),
                "epsilons",
            ),
        ] {
            assert!(DEFAULT.contains(edit.0), "{}", edit.0);
            let err = Scenario::from_toml(&DEFAULT.replacen(edit.0, edit.1, 1)).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        assert!(Scenario::from_toml(&format!("{DEFAULT}\nunknown = 1\n")).is_err());
    }
}
