//! The client's configuration as a service keeps it in its own config file (any serde format;
//! TOML shown), and [`HushClient::from_config`] that builds the whole runtime from it:
//!
//! ```toml
//! [hush]
//! shuffler_url = "https://shuffler-a.operator-c.example:7101"
//! key_directory = "https://results.acme.example:7201"
//! tls_ca = "operators-ca.pem"                      # relative to the config file's folder
//!
//! [[hush.latency]]
//! service = "checkout"
//! operation = "POST /pay"
//! task_file = "task-checkout-latency.toml"         # the task file the operators provisioned
//!
//! [[hush.counter]]
//! name = "errors"
//! task_file = "task-errors.toml"
//!
//! [hush.runtime]                                   # optional; these are the defaults
//! tick_ms = 250
//! max_jitter_ms = 2000
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use hush_protocol::{TaskConfig, TaskParams};
use serde::{Deserialize, Serialize};

use crate::runtime::{Endpoints, HushClient, KeySource, RuntimeConfig, RuntimeError};

/// A configuration that cannot be used, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file the configuration names cannot be read.
    #[error("cannot read {what} {path:?}: {source}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The path, as resolved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid TOML for what it should hold.
    #[error("{path:?} is not a valid {what}: {reason}")]
    Parse {
        /// What the file should hold.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A metric names neither or both of `task` and `task_file`.
    #[error("{metric}: give exactly one of task (inline task parameters) or task_file")]
    TaskSource {
        /// The metric.
        metric: String,
    },
    /// A task's parameters are refused.
    #[error("{metric}: {source}")]
    Task {
        /// The metric.
        metric: String,
        /// Why.
        #[source]
        source: hush_protocol::task::TaskConfigError,
    },
    /// The runtime refused to start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Where a metric's task comes from: inline parameters or a task file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSource {
    /// The task's parameters inline.
    #[serde(default)]
    pub task: Option<TaskParams>,
    /// A task file (`docs/samples/task-*.toml`), relative to the config file's folder.
    #[serde(default)]
    pub task_file: Option<PathBuf>,
}

/// A latency metric: one operation of one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyMetric {
    /// The service.
    pub service: String,
    /// The operation (e.g. a route).
    pub operation: String,
    /// Its task.
    #[serde(flatten)]
    pub source: TaskSource,
}

/// A counter metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterMetric {
    /// The counter's name.
    pub name: String,
    /// Its task.
    #[serde(flatten)]
    pub source: TaskSource,
}

/// Tuning of the background work, in plain numbers (see [`RuntimeConfig`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Most measurements waiting for upload.
    pub queue_capacity: usize,
    /// Most packets per upload request.
    pub max_batch: usize,
    /// How often windows are checked, in ms.
    pub tick_ms: u64,
    /// Longest random delay before an upload, in ms.
    pub max_jitter_ms: u64,
    /// First retry delay, in ms.
    pub retry_initial_ms: u64,
    /// Longest retry delay, in ms.
    pub retry_max_ms: u64,
    /// How often the key set is fetched again, in seconds.
    pub refresh_interval_s: u64,
    /// Deadline of one request, in ms.
    pub request_timeout_ms: u64,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        let d = RuntimeConfig::default();
        let ms = |x: Duration| x.as_millis() as u64;
        Self {
            queue_capacity: d.queue_capacity,
            max_batch: d.max_batch,
            tick_ms: ms(d.tick),
            max_jitter_ms: ms(d.max_jitter),
            retry_initial_ms: ms(d.retry_initial),
            retry_max_ms: ms(d.retry_max),
            refresh_interval_s: d.refresh_interval.as_secs(),
            request_timeout_ms: ms(d.request_timeout),
        }
    }
}

impl From<&RuntimeSettings> for RuntimeConfig {
    fn from(s: &RuntimeSettings) -> Self {
        Self {
            queue_capacity: s.queue_capacity,
            max_batch: s.max_batch,
            tick: Duration::from_millis(s.tick_ms),
            max_jitter: Duration::from_millis(s.max_jitter_ms),
            retry_initial: Duration::from_millis(s.retry_initial_ms),
            retry_max: Duration::from_millis(s.retry_max_ms),
            refresh_interval: Duration::from_secs(s.refresh_interval_s),
            request_timeout: Duration::from_millis(s.request_timeout_ms),
        }
    }
}

/// The client's configuration: where to send, where keys come from, and the metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The first shuffler's gRPC URL.
    pub shuffler_url: String,
    /// The tenant's key directory (its results service's gRPC URL).
    pub key_directory: String,
    /// The CA bundle (PEM file) that signs the servers' certificates; without it URLs are
    /// plaintext `http://`.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Latency metrics.
    #[serde(default)]
    pub latency: Vec<LatencyMetric>,
    /// Counter metrics.
    #[serde(default)]
    pub counter: Vec<CounterMetric>,
    /// Tuning.
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// Where relative paths are resolved (the config file's folder; set by
    /// [`ClientConfig::from_file`], the current directory otherwise).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

impl ClientConfig {
    /// Reads a TOML file holding only the client's configuration; relative paths in it resolve
    /// against its folder. (A service with its own config embeds [`ClientConfig`] as a section
    /// and sets `base_dir`.)
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = String::from_utf8_lossy(&read("the client config", path)?).into_owned();
        let mut c: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            what: "client config",
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        c.base_dir = path.parent().map(Path::to_owned);
        Ok(c)
    }

    /// Reads and checks every metric's task (not the CA): what [`HushClient::from_config`]
    /// would refuse, before starting anything.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.tasks().map(|_| ())
    }

    /// Every metric's task, latency metrics first, read and checked.
    pub fn tasks(&self) -> Result<Vec<TaskConfig>, ConfigError> {
        let latency = self
            .latency
            .iter()
            .map(|m| self.task(&format!("latency {} {}", m.service, m.operation), &m.source));
        let counters = self
            .counter
            .iter()
            .map(|m| self.task(&format!("counter {}", m.name), &m.source));
        latency.chain(counters).collect()
    }

    fn resolve(&self, p: &Path) -> PathBuf {
        match &self.base_dir {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_owned(),
        }
    }

    fn task(&self, metric: &str, s: &TaskSource) -> Result<TaskConfig, ConfigError> {
        let params = match (&s.task, &s.task_file) {
            (Some(p), None) => p.clone(),
            (None, Some(f)) => {
                let path = self.resolve(f);
                let text = String::from_utf8_lossy(&read("task_file", &path)?).into_owned();
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    what: "task file",
                    path,
                    reason: e.to_string(),
                })?
            }
            _ => {
                return Err(ConfigError::TaskSource {
                    metric: metric.to_owned(),
                });
            }
        };
        TaskConfig::new(params).map_err(|source| ConfigError::Task {
            metric: metric.to_owned(),
            source,
        })
    }
}

impl HushClient {
    /// Builds and starts the whole runtime from a configuration: reads the CA and the task
    /// files, registers every metric, and starts fetching keys from the key directory.
    pub async fn from_config(config: &ClientConfig) -> Result<HushClient, ConfigError> {
        let tls_ca = match &config.tls_ca {
            Some(p) => Some(read("tls_ca", &config.resolve(p))?),
            None => None,
        };
        let mut b = HushClient::builder(Endpoints {
            shuffler_url: config.shuffler_url.clone(),
            keys: KeySource::Directory(config.key_directory.clone()),
            tls_ca,
        })
        .config(RuntimeConfig::from(&config.runtime));
        for m in &config.latency {
            let name = format!("latency {} {}", m.service, m.operation);
            b = b.latency_task(&m.service, &m.operation, config.task(&name, &m.source)?);
        }
        for m in &config.counter {
            let name = format!("counter {}", m.name);
            b = b.counter_task(&m.name, config.task(&name, &m.source)?);
        }
        Ok(b.start().await?)
    }
}
