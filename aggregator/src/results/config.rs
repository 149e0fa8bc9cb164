//! The results service's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hush_protocol::detect::DetectorConfig;
use hush_protocol::tls::TlsFiles;
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
    /// How long after a window closes it is collected, in seconds: reports still in the
    /// cascade have this long to arrive; later ones are refused.
    #[serde(default = "defaults::collect_delay_s")]
    pub collect_delay_s: u64,
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
    pub(super) fn collect_delay_s() -> u64 {
        30
    }
    pub(super) fn poll_interval_ms() -> u64 {
        1_000
    }
    pub(super) fn cache_mb() -> u64 {
        32
    }
}

impl ResultsConfig {
    /// Reads and checks a config file; task file paths become relative to its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in &mut c.task_files {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(c)
    }

    /// Parses and checks a config.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        crate::config::check_url_scheme(&c.leader_url, c.tls.is_some(), "leader_url")?;
        c.detection
            .detector
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        if c.task_files.is_empty() {
            return Err(Error::Config("task_files lists no task".into()));
        }
        if c.poll_interval_ms == 0 {
            return Err(Error::Config("poll_interval_ms must be positive".into()));
        }
        Ok(c)
    }
}
