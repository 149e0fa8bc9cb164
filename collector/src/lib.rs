//! # hush-collector
//!
//! The collector, the party a tenant runs: it holds the tenant's collector key, asks the leader
//! for each closed window, combines the two aggregators' noisy shares into statistics with
//! confidence intervals ([`estimate`]), runs anomaly detection on them ([`detect`]), and serves
//! them. It never sees a report, a share of one report or a client's address, and it shares no
//! code with the aggregators beyond the wire formats (hush-protocol) and server plumbing
//! (hush-server).
//!
//! The results service (`hush results`): holds a tenant's collector key, collects each closed
//! window of each of the tenant's tasks on a schedule, stores the released noisy aggregates in
//! sled, and serves them over gRPC (`hush.v1.Results`) and HTTP/JSON (axum).
//!
//! Each window is collected once, `collect_delay_s` after it closes (by default what the
//! `[cascade]` can hold a report), with a collection id derived from the task and window, so a
//! crash between collecting and storing repeats the same collection and gets the same answer
//! without spending budget twice. Once no more late reports can arrive for a window (its end
//! plus the task's report expiry and the leader's clock skew), its noisy late-report count is
//! asked for once and stored with the window. With a `[cascade]` section the service is also
//! its tenant's key directory ([`directory`]). A window the aggregators
//! refuse for good (too few reports, budget spent) is recorded as skipped with the reason. An
//! ad-hoc collection of a custom interval spends budget; the APIs allow it only with the
//! service's API token and say what it spent.

mod config;
pub mod dashboard;
pub mod detect;
mod detection;
mod directory;
pub mod error;
pub mod estimate;
mod exposition;
pub mod http;
pub mod paging;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hush_protocol::collect::{Collected, open_collection};
use hush_protocol::link::AddBearer;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::collection_client::CollectionClient;
use hush_protocol::proto::v1::key_directory_server::KeyDirectoryServer;
use hush_protocol::proto::v1::results_server::{Results, ResultsServer};
use hush_protocol::{Clock, HpkeKeypair, Interval, Keyring, TaskConfig, TaskId, TaskParams, Time};
use hush_server::auth::{bearer_token, token_hash, token_matches};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ClientTlsConfig;
use tonic::{Request, Response, Status};

pub use config::{
    AGGREGATION_SLACK_S, CascadeConfig, DetectionConfig, ErrorRate, HOP_SLACK_MS, ResultsConfig,
    ShufflerHop,
};
pub use store::{Page, PageRequest, ResultsStore};

use crate::error::{Error, Result};

/// The secrets of a results service, which never come from its config file.
#[derive(Clone)]
pub struct ResultsSecrets {
    /// The tenant's collector bearer token.
    pub tenant_token: String,
    /// The collector's HPKE key pair.
    pub collector_key: HpkeKeypair,
    /// The token that allows ad-hoc collections; None disables them.
    pub api_token: Option<String>,
    /// The token every read of the results APIs must present.
    pub read_token: String,
}

impl std::fmt::Debug for ResultsSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResultsSecrets(<redacted>)")
    }
}

/// Builds the result of a window from a collected aggregate: signed noisy counts, quantiles
/// and totals with 95% confidence intervals that account for the DP noise.
pub fn window_result(task: &TaskConfig, c: &Collected, ad_hoc: bool) -> pb::WindowResult {
    let sd = c.noise_stddev;
    let est = |e: estimate::Estimate| pb::Estimate {
        value: e.value,
        ci_low: e.ci_low,
        ci_high: e.ci_high,
    };
    let mut withheld = Vec::new();
    let mut q = |p: f64| {
        if !task.kind().is_histogram() {
            return None;
        }
        // The release decision reads the report count, whose noise is the count's own.
        let per_report = match task.kind() {
            hush_protocol::MeasurementKind::EventHistogram => 1,
            _ => task.contribution_bound(),
        };
        let volume = c
            .report_count
            .map(|n| estimate::events_from_reports(n as f64, per_report));
        match estimate::quantile_ms(&c.values, task.bucket_bounds_us(), p, sd, volume) {
            Ok(e) => Some(est(e)),
            Err(why) => {
                withheld.push(why.0);
                None
            }
        }
    };
    let (p50_ms, p95_ms, p99_ms) = (q(0.50), q(0.95), q(0.99));
    pb::WindowResult {
        task_id: task.id().as_bytes().to_vec().into(),
        interval: Some((&c.interval).into()),
        reports: c.report_count.map(|n| {
            est(estimate::Estimate {
                value: n as f64,
                ci_low: n as f64 - hush_protocol::dp::Z_95 * c.count_noise_stddev,
                ci_high: n as f64 + hush_protocol::dp::Z_95 * c.count_noise_stddev,
            })
        }),
        late_reports: None,
        noisy_counts: c.values.clone(),
        bucket_bounds_us: task.bucket_bounds_us().to_vec(),
        noise_stddev: sd,
        // What the collection spent at each aggregator: the aggregate's and the count's ε.
        epsilon_micro: task.epsilon_per_collection().micros(),
        p50_ms,
        p95_ms,
        p99_ms,
        total: Some(est(estimate::total(&c.values, sd))),
        ad_hoc,
        withheld,
    }
}

/// State shared by the scheduler and the APIs.
#[derive(Debug)]
pub struct Shared {
    config: ResultsConfig,
    store: ResultsStore,
    tasks: BTreeMap<TaskId, TaskConfig>,
    keyring: Keyring,
    secrets: ResultsSecrets,
    clock: Arc<dyn Clock>,
    /// The collector's side of the link to the leader.
    tls: Option<ClientTlsConfig>,
    /// The key directory, with a `[cascade]` section.
    directory: Option<directory::Directory>,
    /// Health as the gRPC health protocol and `/readyz` report it.
    probes: hush_server::probe::Probes,
}

/// The client side of a link to a party: the `[tls]` identity trusting only the CA file `ca`
/// when one is pinned (`what` names the setting), the whole bundle otherwise; `None` without
/// TLS.
fn party_tls(
    material: Option<&hush_server::tls::TlsMaterial>,
    ca: Option<&PathBuf>,
    what: &str,
) -> Result<Option<ClientTlsConfig>> {
    let Some(m) = material else {
        return Ok(None);
    };
    let Some(path) = ca else {
        return Ok(Some(m.client()));
    };
    let pem = std::fs::read(path)
        .map_err(|e| Error::config(format!("reading {what} {}: {e}", path.display())))?;
    let pinned = m
        .with_ca(pem)
        .map_err(|e| Error::config(format!("{what} {}: {e}", path.display())))?;
    Ok(Some(pinned.client()))
}

/// What a refusal of the leader means for a collection: for good, or worth another try.
fn leader_failure(s: Status) -> CollectFailure {
    match s.code() {
        tonic::Code::FailedPrecondition
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::InvalidArgument => CollectFailure::Refused(s.message().to_owned()),
        _ => CollectFailure::Retry(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Why a collection did not give a result.
#[derive(Debug)]
pub enum CollectFailure {
    /// The aggregators refused it for good (FAILED_PRECONDITION): too few reports, budget
    /// spent, or the aggregators disagree.
    Refused(String),
    /// It may work later.
    Retry(String),
}

impl Shared {
    /// Whether `token` may read released results: the read token, or the ad-hoc token.
    fn check_read(&self, token: Option<&str>) -> Result<()> {
        let Some(t) = token else {
            return Err(Error::Unauthenticated(format!(
                "reading results needs the read token: send \"authorization: Bearer <token>\" \
                 (the service's {})",
                self.config.read_token_env
            )));
        };
        let ok = token_matches(t, &token_hash(&self.secrets.read_token))
            || self
                .secrets
                .api_token
                .as_deref()
                .is_some_and(|a| token_matches(t, &token_hash(a)));
        if ok {
            Ok(())
        } else {
            Err(Error::Unauthenticated("wrong read token".into()))
        }
    }

    fn task(&self, id: &TaskId) -> Result<&TaskConfig> {
        self.tasks.get(id).ok_or(Error::UnknownTask(*id))
    }

    /// The leader's `Collection` service, called with the tenant's token.
    fn leader(
        &self,
    ) -> std::result::Result<
        CollectionClient<InterceptedService<tonic::transport::Channel, AddBearer>>,
        CollectFailure,
    > {
        let channel =
            hush_protocol::link::channel(&self.config.leader_url, self.tls.as_ref(), "leader_url")
                .map_err(|e| CollectFailure::Retry(e.to_string()))?;
        let auth = AddBearer::new(&self.secrets.tenant_token).map_err(|_| {
            CollectFailure::Refused("the tenant token is not valid header text".into())
        })?;
        Ok(CollectionClient::with_interceptor(channel, auth))
    }

    /// Collects `interval` of `task` from the leader and decodes it.
    async fn collect(
        &self,
        task: &TaskConfig,
        interval: &Interval,
        collection_id: Option<[u8; 16]>,
        purpose: pb::BudgetPurpose,
    ) -> std::result::Result<(Collected, u64), CollectFailure> {
        let req = Request::new(pb::CollectRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            interval: Some(interval.into()),
            collection_id: collection_id.map(|c| c.to_vec()).unwrap_or_default().into(),
            purpose: purpose as i32,
        });
        let started = std::time::Instant::now();
        let out = async {
            let resp = self
                .leader()?
                .max_decoding_message_size(hush_protocol::collect::MAX_COLLECTION_BYTES)
                .collect(req)
                .await
                .map_err(leader_failure)?
                .into_inner();
            let c = open_collection(task, &self.keyring, &resp)
                .map_err(|e| CollectFailure::Refused(e.to_string()))?;
            Ok((c, resp.budget_left_micro))
        }
        .await;
        {
            use hush_server::metrics::names;
            let outcome = match &out {
                Ok(_) => "released",
                Err(CollectFailure::Refused(_)) => "refused",
                Err(CollectFailure::Retry(_)) => "failed",
            };
            let purpose = match purpose {
                pb::BudgetPurpose::Alert => "alert",
                _ => "routine",
            };
            metrics::counter!(names::COLLECTIONS, "purpose" => purpose, "outcome" => outcome)
                .increment(1);
            metrics::histogram!(names::COLLECTION_SECONDS).record(started.elapsed().as_secs_f64());
        }
        out
    }

    /// What is left of `task`'s budget over `interval` (default: its newest released window,
    /// or the current one), from the leader's ledger; spends nothing.
    async fn budget(&self, task: &TaskId, interval: Option<Interval>) -> Result<pb::BudgetAnswer> {
        let config = self.task(task)?;
        let interval = match interval {
            Some(i) => i,
            None => {
                let start = match self.store.newest_window_start(task)? {
                    Some(s) => Time::from_secs(s),
                    None => config.window_of(self.clock.now()),
                };
                Interval::new(start, config.time_precision_s())
                    .map_err(|e| Error::InvalidRequest(e.to_string()))?
            }
        };
        let req = pb::GetBudgetRequest {
            task_id: task.as_bytes().to_vec().into(),
            interval: Some((&interval).into()),
        };
        let mut leader = self.leader().map_err(|f| match f {
            CollectFailure::Refused(why) => Error::InvalidRequest(why),
            CollectFailure::Retry(why) => Error::NotReady(why),
        })?;
        Ok(leader.get_budget(req).await?.into_inner())
    }

    /// Asks the leader for the noisy late-report count of a collected window.
    async fn late_count(
        &self,
        task: &TaskConfig,
        interval: &Interval,
    ) -> std::result::Result<pb::Estimate, CollectFailure> {
        let req = Request::new(pb::LateCountRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            interval: Some(interval.into()),
        });
        let r = self
            .leader()?
            .collect_late_count(req)
            .await
            .map_err(leader_failure)?
            .into_inner();
        // Noise from the leader alone: the helper never sees a late report.
        let sd = hush_protocol::dp::discrete_laplace_variance(hush_protocol::dp::laplace_scale(
            r.sensitivity,
            hush_protocol::Epsilon::from_micros(r.epsilon_micro),
        ))
        .sqrt();
        let v = r.noisy_late_reports as f64;
        Ok(pb::Estimate {
            value: v,
            ci_low: v - hush_protocol::dp::Z_95 * sd,
            ci_high: v + hush_protocol::dp::Z_95 * sd,
        })
    }

    /// Asks for the late counts of every released window whose late reports are all in.
    async fn late_counts(&self, task: &TaskConfig, now: Time) {
        let id = task.id();
        let precision = task.time_precision_s();
        loop {
            let cursor = match self.store.cursor_or_init(&id, task.window_of(now)) {
                Ok(c) => c,
                Err(_) => return,
            };
            let start = match self.store.late_cursor_or_init(&id, cursor) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "reading the late-count cursor failed");
                    return;
                }
            };
            // Only windows the collection cursor has passed, once their late reports are in.
            let next = start.add_secs(precision);
            if next > cursor
                || next
                    .add_secs(task.report_expiry_s())
                    .add_secs(self.config.clock_skew_s)
                    > now
            {
                return;
            }
            let late = match self.store.window(&id, start) {
                Ok(Some(_)) => {
                    let Ok(interval) = Interval::new(start, precision) else {
                        return;
                    };
                    match self.late_count(task, &interval).await {
                        Ok(e) => Some(e),
                        Err(CollectFailure::Refused(why)) => {
                            tracing::info!(task = %id, window = start.as_secs(), %why, "no late count for the window");
                            None
                        }
                        Err(CollectFailure::Retry(why)) => {
                            tracing::debug!(task = %id, window = start.as_secs(), %why, "late count not available yet");
                            return;
                        }
                    }
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error = %e, "reading a window failed");
                    return;
                }
            };
            if let Err(e) = self.store.put_late(&id, start, next, late).await {
                tracing::error!(error = %e, "storing a late count failed");
                return;
            }
        }
    }

    /// Collects every window of every task that closed at least `collect_delay_s` ago.
    async fn tick(&self) {
        let now = self.clock.now();
        if let Some(d) = &self.directory {
            d.refresh(now).await;
        }
        for task in self.tasks.values() {
            let id = task.id();
            // Released results past the task's retention go, as the aggregators' do.
            if let Some(cutoff) = task.aggregate_cutoff(now) {
                match self.store.expire(&id, cutoff).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(task = %id, released = n, "retention deleted released results")
                    }
                    Err(e) => tracing::error!(error = %e, "deleting expired results failed"),
                }
            }
            let precision = task.time_precision_s();
            loop {
                // A task seen for the first time starts with the current window.
                let start = match self.store.cursor_or_init(&id, task.window_of(now)) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the results cursor failed");
                        break;
                    }
                };
                let next = start.add_secs(precision);
                if next.add_secs(self.config.collect_delay_s()) > now {
                    break;
                }
                let interval = match Interval::new(start, precision) {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::error!(error = %e, "bad window");
                        break;
                    }
                };
                let cid = window_collection_id(&id, start);
                let outcome = self
                    .collect(task, &interval, Some(cid), pb::BudgetPurpose::Routine)
                    .await;
                let windows = hush_server::metrics::names::WINDOWS_RELEASED;
                let stored = match outcome {
                    Ok((c, _)) => {
                        tracing::info!(task = %id, window = start.as_secs(), noisy_reports = ?c.report_count, "collected a window");
                        metrics::counter!(windows, "outcome" => "released").increment(1);
                        self.store
                            .put_window(&id, start, next, &window_result(task, &c, false))
                            .await
                    }
                    Err(CollectFailure::Refused(why)) => {
                        tracing::info!(task = %id, window = start.as_secs(), %why, "window has no result");
                        metrics::counter!(windows, "outcome" => "skipped").increment(1);
                        self.store.skip_window(&id, start, next, &why).await
                    }
                    Err(CollectFailure::Retry(why)) => {
                        tracing::warn!(task = %id, window = start.as_secs(), %why, "collection failed; will retry");
                        break;
                    }
                };
                if let Err(e) = stored {
                    tracing::error!(error = %e, "storing a result failed");
                    break;
                }
            }
        }
        for task in self.tasks.values() {
            self.late_counts(task, now).await;
        }
        if let Err(e) = self.detect().await {
            tracing::error!(error = %e, "anomaly detection failed; will retry");
        }
    }

    /// Whether `token` is the API token that may spend budget.
    pub(crate) fn check_api(&self, token: Option<&str>) -> Result<()> {
        let Some(expected) = &self.secrets.api_token else {
            return Err(Error::Disabled(format!(
                "ad-hoc collection is disabled: set {} for this service to allow it",
                self.config.api_token_env
            )));
        };
        match token {
            Some(t) if token_matches(t, &token_hash(expected)) => Ok(()),
            Some(_) => Err(Error::Unauthenticated("wrong API token".into())),
            None => Err(Error::Unauthenticated(
                "ad-hoc collection spends privacy budget: send \"authorization: Bearer <API token>\"".into(),
            )),
        }
    }

    /// An ad-hoc collection: spends budget, stores and returns the result and the budget left.
    async fn ad_hoc(
        &self,
        token: Option<&str>,
        task: &TaskId,
        interval: Interval,
        purpose: pb::BudgetPurpose,
    ) -> Result<(pb::WindowResult, u64)> {
        self.check_api(token)?;
        let task = self.task(task)?.clone();
        match self.collect(&task, &interval, None, purpose).await {
            Ok((c, left)) => {
                let r = window_result(&task, &c, true);
                self.store.put_ad_hoc(&task.id(), &r).await?;
                tracing::info!(task = %task.id(), start = interval.start().as_secs(), duration = interval.duration(), epsilon = %c.epsilon, "ad-hoc collection spent budget");
                Ok((r, left))
            }
            Err(CollectFailure::Refused(m)) => Err(Error::InvalidRequest(m)),
            Err(CollectFailure::Retry(m)) => Err(Error::NotReady(m)),
        }
    }
}

/// The collection id of a scheduled window: the same for every attempt.
pub fn window_collection_id(task: &TaskId, start: Time) -> [u8; 16] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"hush/1 window collection");
    ctx.update(task.as_bytes());
    ctx.update(&start.as_secs().to_be_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&ctx.finish().as_ref()[..16]);
    id
}

/// Reads the task files of a config; every task must belong to the configured tenant, and
/// every task named by `[detection] error_rates` must be among them.
pub fn load_tasks(config: &ResultsConfig) -> Result<BTreeMap<TaskId, TaskConfig>> {
    let mut tasks = BTreeMap::new();
    for f in &config.task_files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::config(format!("reading {}: {e}", f.display())))?;
        let params: TaskParams =
            toml::from_str(&text).map_err(|e| Error::config(format!("{}: {e}", f.display())))?;
        let t =
            TaskConfig::new(params).map_err(|e| Error::config(format!("{}: {e}", f.display())))?;
        if t.tenant() != config.tenant {
            return Err(Error::config(format!(
                "{}: task {} belongs to tenant {:?}, not {:?}",
                f.display(),
                t.id(),
                t.tenant(),
                config.tenant
            )));
        }
        tasks.insert(t.id(), t);
    }
    detection::check(
        &config.detection.error_rates,
        &tasks.values().map(|t| (t.name(), t)).collect(),
    )?;
    Ok(tasks)
}

#[derive(Clone, Debug)]
struct ResultsGrpc(Arc<Shared>);

fn task_id(b: &[u8]) -> std::result::Result<TaskId, Status> {
    TaskId::try_from(b).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Results for ResultsGrpc {
    async fn list_windows(
        &self,
        request: Request<pb::ListWindowsRequest>,
    ) -> std::result::Result<Response<pb::ListWindowsResponse>, Status> {
        self.0.check_read(bearer_token(&request))?;
        let r = request.into_inner();
        let id = task_id(&r.task_id)?;
        self.0.task(&id)?;
        let req = paging::page_request(r.from, r.to, r.page_size, &r.page_token)?;
        let page = self.0.store.windows_page(&id, &req)?;
        Ok(Response::new(pb::ListWindowsResponse {
            next_page_token: paging::next_token(page.next.as_deref()),
            windows: page.items,
        }))
    }

    async fn get_window(
        &self,
        request: Request<pb::GetWindowRequest>,
    ) -> std::result::Result<Response<pb::WindowResult>, Status> {
        self.0.check_read(bearer_token(&request))?;
        let r = request.into_inner();
        let id = task_id(&r.task_id)?;
        self.0.task(&id)?;
        let start = Time::from_secs(r.window_start);
        match self.0.store.window(&id, start)? {
            Some(w) => Ok(Response::new(w)),
            None => Err(Status::not_found(
                match self.0.store.skipped(&id, start)? {
                    Some(why) => format!("window {} has no result: {why}", start.as_secs()),
                    None => format!("window {} is not collected yet", start.as_secs()),
                },
            )),
        }
    }

    async fn collect_ad_hoc(
        &self,
        request: Request<pb::CollectAdHocRequest>,
    ) -> std::result::Result<Response<pb::WindowResult>, Status> {
        let token = bearer_token(&request).map(str::to_owned);
        let r = request.into_inner();
        let id = task_id(&r.task_id)?;
        let interval = Interval::try_from(
            r.interval
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("interval is missing"))?,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let purpose = match pb::BudgetPurpose::try_from(r.purpose) {
            Ok(pb::BudgetPurpose::Routine) => pb::BudgetPurpose::Routine,
            Ok(_) => pb::BudgetPurpose::Alert,
            Err(_) => return Err(Status::invalid_argument("unknown budget purpose")),
        };
        let (w, left) = self
            .0
            .ad_hoc(token.as_deref(), &id, interval, purpose)
            .await?;
        let mut resp = Response::new(w);
        resp.metadata_mut()
            .insert("hush-budget-left-micro", left.into());
        Ok(resp)
    }

    async fn get_budget(
        &self,
        request: Request<pb::GetBudgetRequest>,
    ) -> std::result::Result<Response<pb::BudgetAnswer>, Status> {
        self.0.check_read(bearer_token(&request))?;
        let r = request.into_inner();
        let id = task_id(&r.task_id)?;
        let interval = match &r.interval {
            Some(i) => {
                Some(Interval::try_from(i).map_err(|e| Status::invalid_argument(e.to_string()))?)
            }
            None => None,
        };
        Ok(Response::new(self.0.budget(&id, interval).await?))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> std::result::Result<Response<pb::ListAlertsResponse>, Status> {
        self.0.check_read(bearer_token(&request))?;
        let r = request.into_inner();
        let task = if r.task_id.is_empty() {
            None
        } else {
            let id = task_id(&r.task_id)?;
            self.0.task(&id).map_err(Status::from)?;
            Some(id)
        };
        let req = paging::page_request(r.from, r.to, r.page_size, &r.page_token)?;
        let tasks: Vec<TaskId> = match task {
            Some(t) => vec![t],
            None => self.0.tasks.keys().copied().collect(),
        };
        let page = self.0.store.alerts_page(&tasks, &req)?;
        Ok(Response::new(pb::ListAlertsResponse {
            next_page_token: paging::next_token(page.next.as_deref()),
            alerts: page.items,
        }))
    }
}

/// A running results service.
#[derive(Debug)]
pub struct ResultsService {
    peers: hush_server::tls::PeerLog,
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: Option<SocketAddr>,
    inner: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    join: JoinHandle<Result<()>>,
}

impl ResultsService {
    /// Reads the task files, opens the database, binds both listeners and starts the scheduler.
    pub async fn start(
        config: ResultsConfig,
        secrets: ResultsSecrets,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let tasks = load_tasks(&config)?;
        let material = hush_server::tls::read_tls(config.tls.as_ref())
            .map_err(|e| Error::config(e.to_string()))?;
        if material.is_none() && !config.insecure {
            for (what, a) in [
                ("listen_grpc", config.listen_grpc),
                ("listen_http", config.listen_http),
            ] {
                if !a.ip().is_loopback() {
                    return Err(Error::config(format!(
                        "{what} = {a} is not a loopback address and the config has no [tls]: \
                         the results APIs would carry tokens and results in clear. Add a [tls] \
                         section, listen on 127.0.0.1, or pass --insecure"
                    )));
                }
            }
        }
        let store = ResultsStore::open(&config.data_dir, config.cache_mb)?;
        let grpc_l = TcpListener::bind(config.listen_grpc)
            .await
            .map_err(|e| Error::config(format!("cannot listen on {}: {e}", config.listen_grpc)))?;
        let http_l = TcpListener::bind(config.listen_http)
            .await
            .map_err(|e| Error::config(format!("cannot listen on {}: {e}", config.listen_http)))?;
        let (grpc, http) = (grpc_l.local_addr()?, http_l.local_addr()?);
        let pin = |ca: Option<&PathBuf>, who: &str| party_tls(material.as_ref(), ca, who);
        let party = directory::PartyTls {
            leader: pin(config.leader_ca.as_ref(), "leader_ca")?,
            helper: pin(
                config.cascade.as_ref().and_then(|c| c.helper_ca.as_ref()),
                "helper_ca",
            )?,
            shufflers: match &config.cascade {
                Some(c) => c
                    .shufflers
                    .iter()
                    .map(|h| pin(h.ca.as_ref(), &format!("the ca of shuffler {:?}", h.name)))
                    .collect::<Result<_>>()?,
                None => Vec::new(),
            },
        };
        if let Some(m) = &material
            && String::from_utf8_lossy(m.ca_pem())
                .matches("BEGIN CERTIFICATE")
                .count()
                > 1
            && !config.every_party_pinned()
        {
            tracing::warn!(
                "[tls] ca holds several CAs and not every party's CA is pinned (leader_ca, \
                 [cascade] helper_ca, each shuffler's ca): a party whose CA is in the bundle \
                 could answer for another and have clients seal to its key (docs/threat-model.md)"
            );
        }
        let tls = party.leader.clone();
        let directory = match &config.cascade {
            Some(c) => Some(directory::Directory::new(
                c.clone(),
                config.leader_url.clone(),
                party,
                store.clone(),
            )?),
            None => None,
        };
        let names = [
            hush_protocol::proto::v1::results_server::SERVICE_NAME,
            hush_protocol::proto::v1::key_directory_server::SERVICE_NAME,
        ];
        let (probes, probe_svcs) =
            hush_server::probe::Probes::new(&names, config.server.reflection).await?;
        let inner = Arc::new(Shared {
            probes,
            keyring: Keyring::new(vec![secrets.collector_key.clone()]),
            config,
            store,
            tasks,
            secrets,
            clock,
            tls,
            directory,
        });
        let (tx, rx) = watch::channel(false);

        // The results API is served over TLS with the same certificate when one is configured
        // (server-authenticated: dashboards present no certificate).
        let peers = hush_server::tls::PeerLog::default();
        let grpc_router = inner
            .config
            .server
            .apply(
                tonic::transport::Server::builder(),
                hush_server::trace::RequestSpans::new("results", &names),
            )
            .layer(peers.layer())
            .add_service(probe_svcs.health)
            .add_optional_service(probe_svcs.reflection)
            .add_service(ResultsServer::new(ResultsGrpc(inner.clone())))
            .add_service(KeyDirectoryServer::new(directory::DirectoryGrpc(
                inner.clone(),
            )));
        let grpc_incoming = inner
            .config
            .server
            .incoming(grpc_l, material.as_ref())
            .map_err(|e| Error::config(e.to_string()))?;
        let grpc_signal = inner
            .probes
            .drain_signal(rx.clone(), inner.config.server.drain_grace_ms);
        let grpc_server =
            async move { hush_server::serve_incoming!(grpc_router, grpc_incoming, grpc_signal) };
        let metrics = {
            let gauges = hush_server::metrics::StoreGauges::new(inner.store.db().clone());
            let inner = inner.clone();
            hush_server::metrics::MetricsServer::start(
                &inner.config.metrics.clone(),
                "results",
                Arc::new(move || gauges.record()),
                rx.clone(),
            )
            .await?
        };
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr());
        // The HTTP/JSON API: HTTPS with the same certificate when [tls] is set.
        let mut hrx = rx.clone();
        let router = http::router(inner.clone());
        let http_server: std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>,
        > = match &material {
            Some(m) => {
                let config = axum_server::tls_rustls::RustlsConfig::from_config(
                    m.https_server().map_err(|e| Error::config(e.to_string()))?,
                );
                let handle = axum_server::Handle::new();
                let h2 = handle.clone();
                tokio::spawn(async move {
                    let _ = hrx.wait_for(|v| *v).await;
                    h2.graceful_shutdown(Some(Duration::from_secs(10)));
                });
                let server = axum_server::from_tcp_rustls(http_l.into_std()?, config)?
                    .handle(handle)
                    .serve(router.into_make_service());
                Box::pin(server)
            }
            None => Box::pin(
                axum::serve(http_l, router)
                    .with_graceful_shutdown(async move {
                        let _ = hrx.wait_for(|v| *v).await;
                    })
                    .into_future(),
            ),
        };
        let sched = scheduler(inner.clone(), rx.clone());
        let join = tokio::spawn(async move {
            let (g, h, ()) = tokio::join!(grpc_server, http_server, sched);
            if let Some(m) = metrics {
                m.join().await;
            }
            g.map_err(|e| Error::from(std::io::Error::other(e)))?;
            h?;
            Ok(())
        });
        tracing::info!(%grpc, %http, tasks = inner.tasks.len(), "results service listening");
        Ok(Self {
            peers,
            grpc,
            http,
            metrics: metrics_addr,
            inner,
            shutdown: tx,
            join,
        })
    }

    /// The gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The address of the Prometheus endpoint, if `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// The database of released results.
    pub fn store(&self) -> &ResultsStore {
        &self.inner.store
    }

    /// Who connected to the gRPC listener so far (services' clients are anonymous).
    pub fn peers(&self) -> &hush_server::tls::PeerLog {
        &self.peers
    }

    /// The key set the key directory serves now, if it is one and has one.
    pub fn key_set(&self) -> Option<hush_protocol::directory::KeySet> {
        self.inner.directory.as_ref().and_then(|d| d.current())
    }

    /// Stops serving and collecting.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        self.join.await?
    }
}

async fn scheduler(inner: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(inner.config.poll_interval_ms);
    loop {
        let now = inner.clock.now().as_secs();
        inner
            .probes
            .store_written(inner.store.probe_write(now).await.is_ok())
            .await;
        inner.tick().await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}
