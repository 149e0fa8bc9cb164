//! Aggregators for tests: configs, in-process servers, provisioning, report submission, and
//! reading back what they stored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hush_aggregator::store::{BatchAggregation, Store};
use hush_aggregator::{Aggregator, AggregatorConfig, LeaderConfig, Secrets, client};
use hush_client::ClientTask;
use hush_protocol::dp::decode_signed;
use hush_protocol::onion::{Hop, Route};
use hush_protocol::proto::v1::leader_ingest_client::LeaderIngestClient;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::{Clock, HpkeKeypair, Role, TaskConfig, Time, VerifyKey};
use tempfile::TempDir;

/// The admin token test aggregators accept.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The leader-helper token of test aggregators.
pub const PEER_TOKEN: &str = "test-peer-token-0123456789";

/// Secrets of test aggregators.
pub fn secrets() -> Secrets {
    Secrets {
        admin_token: ADMIN_TOKEN.into(),
        peer_token: PEER_TOKEN.into(),
    }
}

/// A config for tests: small jobs, fast retries.
pub fn aggregator_config(
    dir: &Path,
    listen: SocketAddr,
    helper_url: Option<String>,
) -> AggregatorConfig {
    aggregator_config_with(dir, listen, helper_url, "")
}

/// [`aggregator_config`] with `top` (top-level keys and sections other than `[leader]`, e.g.
/// a `[server]` section) added.
pub fn aggregator_config_with(
    dir: &Path,
    listen: SocketAddr,
    helper_url: Option<String>,
    top: &str,
) -> AggregatorConfig {
    let mut text = format!(
        "listen = \"{listen}\"\ndata_dir = \"{}\"\ncache_mb = 32\nmaintenance_interval_s = 3600\n{top}\n",
        dir.join("data").display()
    );
    if let Some(url) = helper_url {
        text.push_str(&format!(
            "[leader]\nhelper_url = \"{url}\"\njob_size = 100\nmax_concurrent_jobs = 2\n\
             job_poll_interval_ms = 50\nretry_initial_ms = 50\nretry_max_ms = 400\nhelper_timeout_ms = 10000\n"
        ));
    }
    AggregatorConfig::from_toml(&text).expect("valid test config")
}

/// The `[leader]` section of a config.
pub fn leader_section(c: &AggregatorConfig) -> &LeaderConfig {
    c.leader.as_ref().expect("a leader config")
}

/// `http://addr`.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A leader and a helper running in this process, each with its own temporary directory.
#[derive(Debug)]
pub struct InProcessPair {
    /// The leader.
    pub leader: Aggregator,
    /// The helper.
    pub helper: Aggregator,
    /// The leader's directory.
    pub leader_dir: TempDir,
    /// The helper's directory.
    pub helper_dir: TempDir,
}

impl InProcessPair {
    /// Starts a helper, then a leader pointing at it.
    pub async fn start(clock: Arc<dyn Clock>) -> Self {
        let helper_dir = tempfile::tempdir().unwrap();
        let leader_dir = tempfile::tempdir().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let helper = Aggregator::start(
            Role::Helper,
            aggregator_config(helper_dir.path(), any, None),
            secrets(),
            clock.clone(),
        )
        .await
        .expect("helper starts");
        let leader = Aggregator::start(
            Role::Leader,
            aggregator_config(leader_dir.path(), any, Some(url(helper.local_addr()))),
            secrets(),
            clock,
        )
        .await
        .expect("leader starts");
        Self {
            leader,
            helper,
            leader_dir,
            helper_dir,
        }
    }

    /// The leader's URL.
    pub fn leader_url(&self) -> String {
        url(self.leader.local_addr())
    }

    /// The helper's URL.
    pub fn helper_url(&self) -> String {
        url(self.helper.local_addr())
    }

    /// Stops both gracefully and starts them again on the same directories (new ports).
    pub async fn restart(self, clock: Arc<dyn Clock>) -> Self {
        let (leader_dir, helper_dir) = self.shutdown().await;
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let helper = Aggregator::start(
            Role::Helper,
            aggregator_config(helper_dir.path(), any, None),
            secrets(),
            clock.clone(),
        )
        .await
        .expect("helper restarts");
        let leader = Aggregator::start(
            Role::Leader,
            aggregator_config(leader_dir.path(), any, Some(url(helper.local_addr()))),
            secrets(),
            clock,
        )
        .await
        .expect("leader restarts");
        Self {
            leader,
            helper,
            leader_dir,
            helper_dir,
        }
    }

    /// Stops both gracefully and returns their directories.
    pub async fn shutdown(self) -> (TempDir, TempDir) {
        self.leader.shutdown().await.expect("leader stops cleanly");
        self.helper.shutdown().await.expect("helper stops cleanly");
        (self.leader_dir, self.helper_dir)
    }
}

/// Provisions `task` on both aggregators with `key`.
pub async fn provision(leader_url: &str, helper_url: &str, task: &TaskConfig, key: &VerifyKey) {
    for (u, role) in [(leader_url, Role::Leader), (helper_url, Role::Helper)] {
        let created = client::admin(u, ADMIN_TOKEN, None)
            .unwrap()
            .create_task(pb::CreateTaskRequest {
                task: Some(task.into()),
                vdaf_verify_key: key.as_bytes().to_vec().into(),
                role: role.as_str().into(),
            })
            .await
            .unwrap_or_else(|e| panic!("provisioning the {role}: {e}"))
            .into_inner()
            .created;
        assert!(created, "task was new on the {role}");
    }
}

/// A client for `task` that seals to the aggregators' published HPKE configs. Its route has one
/// placeholder shuffler: tests that submit reports straight to the leader never wrap them.
pub async fn client_task(leader_url: &str, helper_url: &str, task: &TaskConfig) -> ClientTask {
    let leader = client::hpke_configs(leader_url, None)
        .await
        .expect("leader configs")[0]
        .clone();
    let helper = client::hpke_configs(helper_url, None)
        .await
        .expect("helper configs")[0]
        .clone();
    let route = Route::new(
        vec![Hop {
            name: "shuffler".into(),
            config: HpkeKeypair::generate(1).config().clone(),
        }],
        "leader",
    )
    .unwrap();
    ClientTask::new(task.clone(), leader, helper, route).expect("client task")
}

/// Sets `tenant`'s collector token on both aggregators.
pub async fn set_tenant_token(leader_url: &str, helper_url: &str, tenant: &str, token: &str) {
    for u in [leader_url, helper_url] {
        client::admin(u, ADMIN_TOKEN, None)
            .unwrap()
            .set_tenant_token(pb::SetTenantTokenRequest {
                tenant: tenant.into(),
                token: token.into(),
            })
            .await
            .expect("setting a tenant token");
    }
}

/// Asks the leader to collect `interval` of `task` with a collector `token`.
pub async fn collect(
    leader_url: &str,
    token: Option<&str>,
    task: &TaskConfig,
    interval: &hush_protocol::Interval,
    collection_id: Option<[u8; 16]>,
    purpose: pb::BudgetPurpose,
) -> Result<pb::CollectResponse, tonic::Status> {
    let mut c =
        pb::collection_client::CollectionClient::new(client::channel(leader_url, None).unwrap());
    let mut req = tonic::Request::new(pb::CollectRequest {
        task_id: task.id().as_bytes().to_vec().into(),
        interval: Some(interval.into()),
        collection_id: collection_id.map(|c| c.to_vec()).unwrap_or_default().into(),
        purpose: purpose as i32,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    c.collect(req).await.map(|r| r.into_inner())
}

/// Outcomes counted by the leader's ingest responses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngestCounts {
    /// Reports accepted.
    pub accepted: u64,
    /// Reports refused, by reason.
    pub rejected: BTreeMap<RejectReason, u64>,
}

/// Submits report encodings to the leader in batches of `batch`.
pub async fn submit(leader_url: &str, reports: &[Vec<u8>], batch: usize) -> IngestCounts {
    let mut c = LeaderIngestClient::new(client::channel(leader_url, None).unwrap())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let mut out = IngestCounts::default();
    for chunk in reports.chunks(batch.max(1)) {
        let req = pb::SubmitReportsRequest {
            reports: chunk.iter().map(|r| r.clone().into()).collect(),
        };
        // The leader pushes back when too many reports wait for aggregation: wait and retry,
        // as the last shuffler does.
        let resp = loop {
            match c.submit_reports(req.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(s) => panic!("ingest failed: {s}"),
            }
        };
        out.accepted += resp.accepted;
        for r in resp.rejected {
            *out.rejected
                .entry(RejectReason::try_from(r.reason).unwrap())
                .or_default() += r.count;
        }
    }
    out
}

/// A task's counters at an aggregator (`None`: the global counters).
pub async fn stats(url: &str, task: Option<&TaskConfig>) -> pb::TaskStats {
    client::admin(url, ADMIN_TOKEN, None)
        .unwrap()
        .get_task_stats(pb::GetTaskStatsRequest {
            task_id: task
                .map(|t| t.id().as_bytes().to_vec())
                .unwrap_or_default()
                .into(),
        })
        .await
        .expect("stats")
        .into_inner()
}

/// Rejections in `stats`, by reason.
pub fn rejections(stats: &pb::TaskStats) -> BTreeMap<RejectReason, u64> {
    stats
        .rejected
        .iter()
        .map(|r| (RejectReason::try_from(r.reason).unwrap(), r.count))
        .collect()
}

/// Waits until the leader has no pending reports of `task`, i.e. every accepted report went
/// through a committed aggregation job.
pub async fn wait_drained(leader_url: &str, task: &TaskConfig, timeout: Duration) -> pb::TaskStats {
    let start = Instant::now();
    loop {
        let s = stats(leader_url, Some(task)).await;
        if s.reports_pending == 0 {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "{} reports still pending after {timeout:?}: {s:?}",
            s.reports_pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What both aggregators stored for a task, after they stopped.
#[derive(Debug)]
pub struct Stored {
    /// The leader's batches by window.
    pub leader: BTreeMap<Time, BatchAggregation>,
    /// The helper's batches by window.
    pub helper: BTreeMap<Time, BatchAggregation>,
}

impl Stored {
    /// Reads the batches of `task` from both data directories (the servers must be stopped).
    pub async fn read(leader_dir: &Path, helper_dir: &Path, task: &TaskConfig) -> Self {
        let read = async |d: &Path| {
            Store::open(&d.join("data"), 16)
                .expect("store opens")
                .batches(&task.id())
                .await
                .expect("batches")
        };
        Self {
            leader: read(leader_dir).await,
            helper: read(helper_dir).await,
        }
    }

    /// Checks that both sides aggregated the same reports in every window and returns the
    /// unsharded sum over all windows and the report count.
    pub fn unshard(&self, len: usize) -> (Vec<i64>, u64) {
        assert_eq!(
            self.leader.keys().collect::<Vec<_>>(),
            self.helper.keys().collect::<Vec<_>>(),
            "same windows"
        );
        let mut total = BatchAggregation::empty(len);
        for (w, l) in &self.leader {
            let h = &self.helper[w];
            assert_eq!(
                l.report_count, h.report_count,
                "report counts of window {w} differ"
            );
            assert_eq!(
                l.checksum, h.checksum,
                "report id checksums of window {w} differ"
            );
            total.merge(l).unwrap();
            total.share.merge(&h.share).unwrap();
        }
        (decode_signed(&total.share).unwrap(), total.report_count)
    }
}

/// A tenant's results service acting as the key directory of a plaintext cascade, on
/// 127.0.0.1 with its database in a temporary directory. `shufflers` are (name, URL) in route
/// order; `task` is written as its one task file.
#[derive(Debug)]
pub struct Directory {
    /// The running service.
    pub service: hush_collector::ResultsService,
    /// Its directory (config, task file, database).
    pub dir: TempDir,
}

impl Directory {
    /// Starts it on `listen` (epochs of `epoch_s`; keys are fetched on its first tick).
    pub async fn start(
        listen: SocketAddr,
        leader_url: &str,
        helper_url: &str,
        shufflers: &[(&str, String)],
        task: &TaskConfig,
        epoch_s: u64,
        clock: Arc<dyn Clock>,
    ) -> Self {
        use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
        let dir = tempfile::tempdir().unwrap();
        let task_file = dir.path().join("task.toml");
        std::fs::write(&task_file, toml::to_string(task.params()).unwrap()).unwrap();
        let hops: Vec<String> = shufflers
            .iter()
            .map(|(n, u)| format!("{{ name = \"{n}\", url = \"{u}\", max_wait_ms = 100 }}"))
            .collect();
        let config = ResultsConfig::from_toml(&format!(
            "tenant = \"{}\"\nlisten_grpc = \"{listen}\"\nlisten_http = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nleader_url = \"{leader_url}\"\ntask_files = [\"{}\"]\n\
             poll_interval_ms = 50\n\
             [cascade]\nhelper_url = \"{helper_url}\"\nkey_epoch_s = {epoch_s}\nshufflers = [{}]\n",
            task.tenant(),
            dir.path().join("data").display(),
            task_file.display(),
            hops.join(", ")
        ))
        .expect("a valid directory config");
        let service = ResultsService::start(
            config,
            ResultsSecrets {
                tenant_token: "directory-test-token-0123456789".into(),
                collector_key: HpkeKeypair::generate(1),
                api_token: None,
                read_token: "directory-read-token-0123456789".into(),
            },
            clock,
        )
        .await
        .expect("the key directory starts");
        Self { service, dir }
    }

    /// Waits until the directory has fetched its first key set (at most 30 s).
    pub async fn wait_ready(&self) {
        let start = Instant::now();
        while self.service.key_set().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the key directory never got a key set"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The directory's gRPC URL (plaintext).
    pub fn url(&self) -> String {
        url(self.service.grpc_addr())
    }

    /// Stops it.
    pub async fn shutdown(self) {
        self.service.shutdown().await.expect("the directory stops");
    }
}
