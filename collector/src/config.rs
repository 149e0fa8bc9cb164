//! The results service's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::detect::DetectorConfig;
use hush_server::tls::TlsFiles;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `hush results --config FILE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsConfig {
    /// The tenant whose tasks this service collects.
    pub tenant: String,
    /// Address of the gRPC `Results` service.
    pub listen_grpc: SocketAddr,
    /// Address of the HTTP/JSON API.
    pub listen_http: SocketAddr,
    /// Directory of the sled database of released results; created if missing.
    pub data_dir: PathBuf,
    /// The leader's gRPC URL.
    pub leader_url: String,
    /// The CA certificate(s) that alone may sign the leader's certificate, for collections and
    /// the leader's HPKE configs. Without it any CA of `[tls] ca` may, so an operator whose CA
    /// is in that bundle could answer for the leader (docs/threat-model.md).
    #[serde(default)]
    pub leader_ca: Option<PathBuf>,
    /// Task files (TOML, as given to `hush task create`) of the tasks to collect. Relative
    /// paths are relative to the config file.
    pub task_files: Vec<PathBuf>,
    /// Environment variable holding the tenant's collector bearer token.
    #[serde(default = "defaults::tenant_token_env")]
    pub tenant_token_env: String,
    /// Environment variable holding the collector's HPKE key pair (from `hush keygen`).
    #[serde(default = "defaults::collector_key_env")]
    pub collector_key_env: String,
    /// Environment variable holding the token that allows ad-hoc collections through this
    /// service's APIs. Unset: ad-hoc collection is disabled.
    #[serde(default = "defaults::api_token_env")]
    pub api_token_env: String,
    /// Environment variable holding the token every read of the results APIs must present
    /// (`authorization: Bearer ...`); required. The ad-hoc token reads too.
    #[serde(default = "defaults::read_token_env")]
    pub read_token_env: String,
    /// How long after a window closes it is collected, in seconds: reports still in the
    /// cascade have this long to arrive; later ones are refused and counted as late. With a
    /// `[cascade]` section it defaults to what the cascade can hold a report
    /// ([`CascadeConfig::min_collect_delay_s`]) and may not be shorter; without one, 30 s.
    #[serde(default)]
    pub collect_delay_s: Option<u64>,
    /// How often the scheduler looks for windows to collect, in milliseconds.
    #[serde(default = "defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// sled page cache, in MiB.
    #[serde(default = "defaults::cache_mb")]
    pub cache_mb: u64,
    /// Anomaly detection on every released window.
    #[serde(default)]
    pub detection: DetectionConfig,
    /// The collector's certificate, key and trusted CAs, presented to the leader. Without it
    /// the link is plaintext, which `hush results` allows only with `--insecure`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Set by `hush results --insecure`, never from the file: allows plaintext listeners on
    /// addresses other than loopback.
    #[serde(skip)]
    pub insecure: bool,
    /// The tenant's route through the mixnet: this service serves its clients the key set of
    /// every party on it (the key directory), and the collection delay follows its timing.
    #[serde(default)]
    pub cascade: Option<CascadeConfig>,
    /// Requests, streams and connections served at once (gRPC and HTTP).
    #[serde(default)]
    pub server: hush_server::serve::ServerLimits,
    /// The Prometheus endpoint (`[metrics] listen`); off by default.
    #[serde(default)]
    pub metrics: hush_server::metrics::MetricsConfig,
    /// The leader's allowed clock skew (its `clock_skew_s`): late reports of a window can arrive
    /// until its end plus the task's report expiry plus this; only then is the late count
    /// asked for.
    #[serde(default = "defaults::clock_skew_s")]
    pub clock_skew_s: u64,
}

/// `[cascade]`: the tenant's route, for the key directory and the collection delay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// The shufflers in route order (clients send to the first).
    pub shufflers: Vec<ShufflerHop>,
    /// The leader's name in onion routes (its HPKE configs come from `leader_url`).
    #[serde(default = "defaults::leader_name")]
    pub leader_name: String,
    /// The helper's gRPC URL, for its HPKE configs.
    pub helper_url: String,
    /// The CA certificate(s) that alone may sign the helper's certificate (as `leader_ca`).
    #[serde(default)]
    pub helper_ca: Option<PathBuf>,
    /// Length of a key epoch, in seconds: every client of the tenant gets the same key set for
    /// a whole epoch. Parties should keep a retired key at least two epochs plus the clients'
    /// refresh interval (their `key_grace_period_s`, a day by default, does; nothing checks it
    /// across operators).
    #[serde(default = "defaults::key_epoch_s")]
    pub key_epoch_s: u64,
    /// The longest random delay the tenant's clients wait before an upload (their runtime's
    /// `max_jitter`), in milliseconds.
    #[serde(default = "defaults::client_max_jitter_ms")]
    pub client_max_jitter_ms: u64,
    /// How often the tenant's clients close windows (their runtime's `tick`), in milliseconds.
    #[serde(default = "defaults::client_tick_ms")]
    pub client_tick_ms: u64,
}

/// One shuffler of the route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShufflerHop {
    /// Its name in onion routes.
    pub name: String,
    /// Its gRPC URL, for its HPKE configs.
    pub url: String,
    /// The CA certificate(s) that alone may sign its certificate (as `leader_ca`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Its `[mix] max_wait_ms`: the longest a packet waits there in a batch that reached
    /// `min_batch_size`.
    #[serde(default = "defaults::max_wait_ms")]
    pub max_wait_ms: u64,
}

/// Time each hop may add for forwarding and retries, besides its batch wait.
pub const HOP_SLACK_MS: u64 = 1_000;
/// Time the leader may take to aggregate what arrived, besides the cascade.
pub const AGGREGATION_SLACK_S: u64 = 5;

impl CascadeConfig {
    /// The shortest collection delay that lets every report the cascade releases in time reach
    /// the leader: the clients' tick and jitter, each hop's `max_wait_ms` plus
    /// [`HOP_SLACK_MS`], rounded up to a second, plus [`AGGREGATION_SLACK_S`]. A batch below a
    /// shuffler's `min_batch_size` is never released by timeout: its reports can still arrive
    /// late and are counted as such.
    pub fn min_collect_delay_s(&self) -> u64 {
        let hold_ms = self.client_tick_ms
            + self.client_max_jitter_ms
            + self
                .shufflers
                .iter()
                .map(|h| h.max_wait_ms + HOP_SLACK_MS)
                .sum::<u64>();
        hold_ms.div_ceil(1_000) + AGGREGATION_SLACK_S
    }
}

/// `[detection]`: how released windows are tested for anomalies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionConfig {
    /// False-alarm rate, baseline length and watched quantile.
    #[serde(flatten)]
    pub detector: DetectorConfig,
    /// Counters tested as a rate: errors over the requests counted by latency tasks. A counter
    /// not listed here is tested as a count.
    #[serde(default)]
    pub error_rates: Vec<ErrorRate>,
}

/// A counter task (by name) whose rate is taken over the events of latency tasks (by name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRate {
    /// The counter task's name.
    pub errors: String,
    /// The latency tasks whose events are the requests.
    pub requests: Vec<String>,
}

mod defaults {
    pub(super) fn tenant_token_env() -> String {
        "HUSH_TENANT_TOKEN".into()
    }
    pub(super) fn collector_key_env() -> String {
        "HUSH_COLLECTOR_KEY".into()
    }
    pub(super) fn api_token_env() -> String {
        "HUSH_RESULTS_TOKEN".into()
    }
    pub(super) fn read_token_env() -> String {
        "HUSH_RESULTS_READ_TOKEN".into()
    }
    pub(super) fn clock_skew_s() -> u64 {
        300
    }
    pub(super) fn leader_name() -> String {
        "leader".into()
    }
    pub(super) fn key_epoch_s() -> u64 {
        600
    }
    pub(super) fn client_max_jitter_ms() -> u64 {
        2_000
    }
    pub(super) fn client_tick_ms() -> u64 {
        250
    }
    pub(super) fn max_wait_ms() -> u64 {
        30_000
    }
    pub(super) fn poll_interval_ms() -> u64 {
        1_000
    }
    pub(super) fn cache_mb() -> u64 {
        32
    }
}

impl ResultsConfig {
    /// Reads and checks a config file; relative paths in it (`data_dir`, `task_files`, the
    /// `[tls]` files) are relative to its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("reading {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in &mut c.task_files {
            *f = hush_server::tls::resolve_path(base, f);
        }
        let cascade = c.cascade.as_mut();
        let pins = c
            .leader_ca
            .iter_mut()
            .chain(cascade.into_iter().flat_map(|k| {
                k.helper_ca
                    .iter_mut()
                    .chain(k.shufflers.iter_mut().filter_map(|h| h.ca.as_mut()))
            }));
        for f in pins {
            *f = hush_server::tls::resolve_path(base, f);
        }
        hush_server::tls::resolve_server_paths(base, &mut c.data_dir, c.tls.as_mut())
            .map_err(Error::config)?;
        Ok(c)
    }

    /// Parses and checks a config.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).map_err(|e| Error::config(e.to_string()))?;
        hush_protocol::link::check_scheme(&c.leader_url, c.tls.is_some(), "leader_url")
            .map_err(|e| Error::config(e.to_string()))?;
        c.detection
            .detector
            .validate()
            .map_err(|e| Error::config(e.to_string()))?;
        if c.task_files.is_empty() {
            return Err(Error::config("task_files lists no task".into()));
        }
        if c.tls.is_none() && c.pinned_cas().next().is_some() {
            return Err(Error::config(
                "leader_ca, helper_ca and a shuffler's ca pin a party's certificate to a CA: \
                 they need a [tls] section"
                    .into(),
            ));
        }
        if c.poll_interval_ms == 0 {
            return Err(Error::config("poll_interval_ms must be positive".into()));
        }
        c.server.check().map_err(Error::config)?;
        if let Some(cascade) = &c.cascade {
            if cascade.shufflers.is_empty() {
                return Err(Error::config(
                    "cascade.shufflers lists no shuffler: clients send to the first".into(),
                ));
            }
            if cascade.key_epoch_s == 0 {
                return Err(Error::config("cascade.key_epoch_s must be positive".into()));
            }
            let tls = c.tls.is_some();
            hush_protocol::link::check_scheme(&cascade.helper_url, tls, "cascade.helper_url")
                .map_err(|e| Error::config(e.to_string()))?;
            for h in &cascade.shufflers {
                hush_protocol::link::check_scheme(&h.url, tls, "cascade.shufflers.url")
                    .map_err(|e| Error::config(e.to_string()))?;
            }
            let min = cascade.min_collect_delay_s();
            if let Some(d) = c.collect_delay_s
                && d < min
            {
                return Err(Error::config(format!(
                    "collect_delay_s = {d} is shorter than the cascade can hold a report ({min} s: \
                     client tick {} ms + jitter {} ms + each shuffler's max_wait_ms + {HOP_SLACK_MS} ms, \
                     plus {AGGREGATION_SLACK_S} s to aggregate); reports arriving later would be \
                     refused as late. Raise it to at least {min}, or lower the shufflers' max_wait_ms",
                    cascade.client_tick_ms, cascade.client_max_jitter_ms
                )));
            }
        }
        Ok(c)
    }

    /// Every pinned CA file (`leader_ca`, `[cascade] helper_ca`, each shuffler's `ca`).
    pub fn pinned_cas(&self) -> impl Iterator<Item = &PathBuf> {
        self.leader_ca
            .iter()
            .chain(self.cascade.iter().flat_map(|k| {
                k.helper_ca
                    .iter()
                    .chain(k.shufflers.iter().filter_map(|h| h.ca.as_ref()))
            }))
    }

    /// Whether each party the service connects to has its CA pinned.
    pub fn every_party_pinned(&self) -> bool {
        self.leader_ca.is_some()
            && self
                .cascade
                .as_ref()
                .is_none_or(|k| k.helper_ca.is_some() && k.shufflers.iter().all(|h| h.ca.is_some()))
    }

    /// The collection delay in force: the configured one, else what the cascade needs, else
    /// 30 s.
    pub fn collect_delay_s(&self) -> u64 {
        self.collect_delay_s.unwrap_or_else(|| {
            self.cascade
                .as_ref()
                .map_or(30, CascadeConfig::min_collect_delay_s)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
        data_dir = \"/tmp/x\"\nleader_url = \"http://127.0.0.1:1\"\ntask_files = [\"t.toml\"]\n";
    const CASCADE: &str = "[cascade]\nhelper_url = \"http://127.0.0.1:2\"\n\
        shufflers = [{ name = \"a\", url = \"http://127.0.0.1:3\", max_wait_ms = 2000 },\
        { name = \"b\", url = \"http://127.0.0.1:4\", max_wait_ms = 3000 }]\n";

    #[test]
    fn the_collection_delay_follows_the_cascade() {
        let c = ResultsConfig::from_toml(&format!("{BASE}{CASCADE}")).unwrap();
        // 250 + 2000 + (2000 + 1000) + (3000 + 1000) = 9250 ms → 10 s, + 5 s.
        assert_eq!(c.collect_delay_s(), 15);
        let ok =
            ResultsConfig::from_toml(&format!("{BASE}collect_delay_s = 60\n{CASCADE}")).unwrap();
        assert_eq!(ok.collect_delay_s(), 60);
        let e = ResultsConfig::from_toml(&format!("{BASE}collect_delay_s = 14\n{CASCADE}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("collect_delay_s = 14") && e.contains("at least 15"),
            "{e}"
        );
        // Without a cascade: the old default.
        assert_eq!(
            ResultsConfig::from_toml(BASE).unwrap().collect_delay_s(),
            30
        );
    }
}
