//! The client runtime a service embeds: a metrics registry, per-window contribution bounds, and
//! a background uploader.
//!
//! ```no_run
//! # async fn demo(endpoints: hush_client::Endpoints, latency_task: hush_protocol::TaskConfig,
//! #               errors_task: hush_protocol::TaskConfig) -> Result<(), hush_client::RuntimeError> {
//! use std::time::Duration;
//! use hush_client::HushClient;
//!
//! let client = HushClient::builder(endpoints)
//!     .latency_task("checkout", "POST /pay", latency_task)
//!     .counter_task("errors", errors_task)
//!     .start()
//!     .await?;
//! client.latency("checkout", "POST /pay").record(Duration::from_millis(42));
//! client.counter("errors").add(1);
//! client.shutdown(Duration::from_secs(5)).await; // report the open window, then stop
//! # Ok(()) }
//! ```
//!
//! Recording only updates in-memory counts of the current window under a short lock: it never
//! blocks on I/O, never fails and never panics. A background task closes each window when the
//! clock passes its end and queues one measurement per report the task's kind calls for:
//! one per event (event histograms, at most `contribution_bound` events per window), or one per
//! window (window histograms and counters, bounded by `contribution_bound`; over the bound the
//! excess is dropped and counted, or clipped if the task says so). Counters and window
//! histograms report every window, with zero counts when nothing happened, so a report's
//! presence tells no party whether the service had, say, an error. The uploader takes batches
//! from the queue, turns them into onion packets with the current key set (shard, seal, wrap),
//! and sends them to the first shuffler after a random jitter, retrying the same bytes with
//! exponential backoff until the shuffler acknowledges. The queue is bounded: when it is full the
//! oldest measurement is dropped and counted.
//!
//! **Keys.** The client talks to exactly two servers: the first shuffler (to send packets) and
//! its tenant's key directory (the results service, run by the same tenant). It never connects
//! to the leader, the helper or a later shuffler, and never takes a key from the party that key
//! belongs to, so no party can hand one client a key of its own and recognize its reports. The
//! directory serves one identical key set per epoch to every client of the tenant (see
//! [`hush_protocol::directory`]); the client refreshes it every `refresh_interval`, and never
//! takes an ended epoch's set in place of a current one, nor one of an epoch that has not
//! begun. A client can instead be deployed with a pinned key set
//! ([`KeySource::Pinned`]), which it then never refreshes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hush_protocol::directory::KeySet;
use hush_protocol::proto::v1 as pb;
use hush_protocol::{Clock, Measurement, MeasurementKind, SystemClock, TaskConfig, TaskId, Time};
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;

use crate::report::{ClientError, ClientTask};

mod discovery;
mod export;
mod uploader;
mod window;

use discovery::channel;
pub use discovery::fetch_key_set;
use uploader::background;

/// Why the runtime could not start or fetch keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A URL is not usable.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The key directory did not answer with a usable key set.
    #[error("fetching the key set from the key directory {url} failed: {status}")]
    Keys {
        /// The server.
        url: String,
        /// Its answer.
        status: String,
    },
    /// A task does not fit the route (e.g. its packet size is too small).
    #[error("task {task}: {source}")]
    Task {
        /// The task.
        task: TaskId,
        /// Why.
        source: ClientError,
    },
    /// Two metrics were registered under the same name.
    #[error("metric {0:?} is registered twice")]
    Duplicate(String),
}

/// Where the client gets the key set it seals to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The gRPC URL of the tenant's key directory (its results service): one identical key set
    /// per epoch for every client of the tenant, refreshed every `refresh_interval`.
    Directory(String),
    /// A key set deployed with the client (e.g. in its task bundle); never refreshed, so the
    /// parties' keys must outlive the deployment.
    Pinned(KeySet),
}

/// Where the client sends reports and gets keys. There is no leader or helper address: a
/// client never talks to an aggregator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The first shuffler's gRPC URL: the only party that receives the client's packets.
    pub shuffler_url: String,
    /// Where the key set comes from.
    pub keys: KeySource,
    /// The CA certificates (PEM) that sign the first shuffler's and the directory's
    /// certificates. With it every URL must be `https://` and servers are verified against it;
    /// without it URLs are plaintext `http://` (tests, `--insecure` deployments).
    pub tls_ca: Option<Vec<u8>>,
}

/// Tuning of the background work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Most measurements waiting for upload; past it the oldest is dropped and counted.
    pub queue_capacity: usize,
    /// Most packets per upload request.
    pub max_batch: usize,
    /// How often windows are checked for closing and the queue for work.
    pub tick: Duration,
    /// Longest random delay before an upload, so a fleet does not send at the same instant.
    pub max_jitter: Duration,
    /// First retry delay; doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// How often the key set is fetched again from the key directory.
    pub refresh_interval: Duration,
    /// Deadline of one request.
    pub request_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_batch: 500,
            tick: Duration::from_millis(250),
            max_jitter: Duration::from_secs(2),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            refresh_interval: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of what the client did. Every recorded event ends in exactly one of: a report in a
/// packet, dropped over the bound, dropped from a full queue, or still queued.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Events or counts recorded (latencies: events; counters: the amounts added).
    pub recorded: u64,
    /// Recorded amounts dropped because the window was over the task's contribution bound.
    pub dropped_over_bound: u64,
    /// Measurements dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Measurements queued and not yet sent.
    pub queued: u64,
    /// Reports sealed into packets.
    pub reports_sent: u64,
    /// Packets the first shuffler accepted.
    pub accepted: u64,
    /// Packets the first shuffler refused, by reason.
    pub rejected: Vec<(pb::RejectReason, u64)>,
    /// Upload attempts that failed and were retried.
    pub upload_retries: u64,
    /// Records against metrics that were never registered.
    pub unknown_metric: u64,
}

#[derive(Debug, Default)]
struct Counters {
    recorded: AtomicU64,
    dropped_over_bound: AtomicU64,
    dropped_queue_full: AtomicU64,
    reports_sent: AtomicU64,
    accepted: AtomicU64,
    upload_retries: AtomicU64,
    unknown_metric: AtomicU64,
    rejected: Mutex<HashMap<i32, u64>>,
}

#[derive(Debug)]
struct WindowState {
    window: Time,
    counts: Vec<u64>,
    total: u64,
    /// Something was recorded in this window, possibly a zero count: the window is reported.
    touched: bool,
}

#[derive(Debug)]
struct Metric {
    task: TaskConfig,
    state: Mutex<WindowState>,
}

#[derive(Debug)]
struct Queued {
    task: TaskId,
    measurement: Measurement,
    time: Time,
}

#[derive(Debug)]
struct Inner {
    endpoints: Endpoints,
    config: RuntimeConfig,
    clock: Arc<dyn Clock>,
    metrics: HashMap<String, Arc<Metric>>,
    tasks: HashMap<TaskId, TaskConfig>,
    queue: Mutex<VecDeque<Queued>>,
    closed: Mutex<Vec<(Arc<Metric>, WindowState)>>,
    in_flight: AtomicU64,
    keys: RwLock<Option<KeySet>>,
    counters: Counters,
    wake: Notify,
    idle: Notify,
    shutdown: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A latency metric of one service operation.
#[derive(Clone, Debug)]
pub struct Latency {
    inner: Arc<Inner>,
    metric: Option<Arc<Metric>>,
}

impl Latency {
    /// Records one request's latency in the current window. Never blocks on I/O, never fails.
    pub fn record(&self, latency: Duration) {
        match &self.metric {
            Some(m) => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.inner.record(m, m.task.bucket_of(us), 1);
            }
            None => {
                self.inner
                    .counters
                    .unknown_metric
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A counter metric.
#[derive(Clone, Debug)]
pub struct Counter {
    inner: Arc<Inner>,
    metric: Option<Arc<Metric>>,
}

impl Counter {
    /// Adds `n` to the current window's count (up to the task's bound). Never fails. A
    /// registered counter reports every window, zero if `add` was never called, so neither the
    /// shufflers nor the leader learn from a report's presence that the service had, say, an
    /// error.
    pub fn add(&self, n: u64) {
        match &self.metric {
            Some(m) => self.inner.record(m, 0, n),
            None => {
                self.inner
                    .counters
                    .unknown_metric
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Registers metrics and starts a [`HushClient`].
#[derive(Debug)]
pub struct Builder {
    endpoints: Endpoints,
    config: RuntimeConfig,
    clock: Arc<dyn Clock>,
    keys: Option<KeySet>,
    metrics: Vec<(String, TaskConfig)>,
    channel: Option<Channel>,
}

fn latency_key(service: &str, operation: &str) -> String {
    format!("latency\u{0}{service}\u{0}{operation}")
}

fn counter_key(name: &str) -> String {
    format!("counter\u{0}{name}")
}

impl Builder {
    /// Latencies of `operation` of `service` go to `task` (an event or window histogram).
    pub fn latency_task(mut self, service: &str, operation: &str, task: TaskConfig) -> Self {
        self.metrics.push((latency_key(service, operation), task));
        self
    }

    /// Counts of `name` go to `task` (a counter).
    pub fn counter_task(mut self, name: &str, task: TaskConfig) -> Self {
        self.metrics.push((counter_key(name), task));
        self
    }

    /// Background tuning.
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// The clock windows follow (the system clock by default).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A key set fetched beforehand from the key directory (e.g. shared by many clients in one
    /// process); refreshed later as usual.
    pub fn keys(mut self, keys: KeySet) -> Self {
        self.keys = Some(keys);
        self
    }

    /// A connection to the first shuffler to use (e.g. shared by many clients in one process)
    /// instead of opening one.
    pub fn channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Starts the background uploader on the current tokio runtime. Fetches HPKE configs if none
    /// were given; if the servers are unreachable the client still starts, records and queues,
    /// and fetches the configs later.
    pub async fn start(self) -> Result<HushClient, RuntimeError> {
        let mut metrics = HashMap::new();
        let mut tasks = HashMap::new();
        for (key, task) in self.metrics {
            let len = if task.kind() == MeasurementKind::Counter {
                1
            } else {
                task.output_len()
            };
            let m = Arc::new(Metric {
                state: Mutex::new(WindowState {
                    window: task.window_of(self.clock.now()),
                    counts: vec![0; len],
                    total: 0,
                    touched: false,
                }),
                task: task.clone(),
            });
            if metrics.insert(key.clone(), m).is_some() {
                return Err(RuntimeError::Duplicate(key.replace('\u{0}', " ")));
            }
            tasks.insert(task.id(), task);
        }
        let ca = self.endpoints.tls_ca.as_deref();
        channel(
            &self.endpoints.shuffler_url,
            ca,
            self.config.request_timeout,
        )?;
        let keys = match (self.keys, &self.endpoints.keys) {
            (_, KeySource::Pinned(k)) => Some(k.clone()),
            (Some(k), KeySource::Directory(_)) => Some(k),
            (None, KeySource::Directory(url)) => {
                match fetch_key_set(url, ca, self.config.request_timeout).await {
                    Ok(k) => Some(k),
                    Err(RuntimeError::Url { url, reason }) => {
                        return Err(RuntimeError::Url { url, reason });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no key set yet; recording continues and uploads wait");
                        None
                    }
                }
            }
        };
        // Check up front that every task's reports fit its packet size on this route.
        if let Some(k) = &keys {
            let route = k.route().map_err(|e| RuntimeError::Task {
                task: TaskId::from([0; 32]),
                source: e.into(),
            })?;
            for t in tasks.values() {
                ClientTask::new(
                    t.clone(),
                    k.leader.1.clone(),
                    k.helper.clone(),
                    route.clone(),
                )
                .map_err(|source| RuntimeError::Task {
                    task: t.id(),
                    source,
                })?;
            }
        }
        let (tx, rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            endpoints: self.endpoints,
            config: self.config,
            clock: self.clock,
            metrics,
            tasks,
            queue: Mutex::new(VecDeque::new()),
            closed: Mutex::new(Vec::new()),
            in_flight: AtomicU64::new(0),
            keys: RwLock::new(keys),
            counters: Counters::default(),
            wake: Notify::new(),
            idle: Notify::new(),
            shutdown: tx,
        });
        let task = tokio::spawn(background(inner.clone(), rx, self.channel));
        Ok(HushClient {
            inner,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }
}

/// A service's handle to hush. Cheap to clone; every clone shares the registry and uploader.
#[derive(Clone, Debug)]
pub struct HushClient {
    inner: Arc<Inner>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl HushClient {
    /// Starts building a client that reports through `endpoints`.
    pub fn builder(endpoints: Endpoints) -> Builder {
        Builder {
            endpoints,
            config: RuntimeConfig::default(),
            clock: Arc::new(SystemClock),
            keys: None,
            metrics: Vec::new(),
            channel: None,
        }
    }

    /// The latency metric of `operation` of `service`. An unregistered one records nothing and
    /// is counted in [`ClientStats::unknown_metric`].
    pub fn latency(&self, service: &str, operation: &str) -> Latency {
        Latency {
            inner: self.inner.clone(),
            metric: self
                .inner
                .metrics
                .get(&latency_key(service, operation))
                .cloned(),
        }
    }

    /// The counter `name`.
    pub fn counter(&self, name: &str) -> Counter {
        Counter {
            inner: self.inner.clone(),
            metric: self.inner.metrics.get(&counter_key(name)).cloned(),
        }
    }

    /// The key set the client seals to now (`None` before the first one arrived). Compare its
    /// [`KeySet::digest`] with other clients' to check that the directory served all alike.
    pub fn key_set(&self) -> Option<KeySet> {
        lock_read(&self.inner.keys).clone()
    }

    /// What the client did so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let mut rejected: Vec<(pb::RejectReason, u64)> = lock(&c.rejected)
            .iter()
            .map(|(r, n)| {
                (
                    pb::RejectReason::try_from(*r).unwrap_or(pb::RejectReason::Unspecified),
                    *n,
                )
            })
            .collect();
        rejected.sort();
        ClientStats {
            recorded: c.recorded.load(Ordering::Relaxed),
            dropped_over_bound: c.dropped_over_bound.load(Ordering::Relaxed),
            dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
            queued: lock(&self.inner.queue).len() as u64
                + self.inner.in_flight.load(Ordering::Relaxed),
            reports_sent: c.reports_sent.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            rejected,
            upload_retries: c.upload_retries.load(Ordering::Relaxed),
            unknown_metric: c.unknown_metric.load(Ordering::Relaxed),
        }
    }

    /// Waits until every closed window is uploaded and acknowledged, or `timeout` passes;
    /// returns whether everything went out.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.inner.idle.notified();
            self.inner.close_windows(false);
            self.inner.queue_closed();
            let busy = !lock(&self.inner.queue).is_empty()
                || self.inner.in_flight.load(Ordering::Relaxed) > 0;
            if !busy {
                return true;
            }
            self.inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }

    /// Reports the open windows too, uploads for up to `timeout`, and stops the background
    /// task. Returns whether everything went out.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.inner.close_windows(true);
        self.inner.queue_closed();
        let done = self.flush(timeout).await;
        let _ = self.inner.shutdown.send(true);
        let task = lock(&self.task).take();
        if let Some(t) = task {
            let _ = t.await;
        }
        done
    }
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
