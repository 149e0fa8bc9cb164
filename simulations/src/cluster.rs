//! The in-process cluster the demo, the pipeline mode of `hush sim`, the load harness, the soak
//! test and the benches share: helper, leader, two shufflers and a results service as real gRPC
//! servers on 127.0.0.1 with sled under one directory, TLS from a development CA, a tenant and
//! its tasks provisioned through the admin APIs, and the clients' endpoints.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hush_aggregator::{Aggregator, AggregatorConfig, Secrets, client as agg_client};
use hush_client::{Endpoints, HushClient, KeySet, KeySource, RuntimeConfig, fetch_key_set};
use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
use hush_protocol::proto::v1 as pb;
use hush_protocol::{
    Clock, Epsilon, HpkeKeypair, MeasurementKind, MockClock, Role, TaskConfig, TaskId, TaskParams,
    Time, VerifyKey,
};
use hush_shuffler::{ShufflerConfig, ShufflerNode};
use tonic::transport::ClientTlsConfig;

const ADMIN_TOKEN: &str = "demo-admin-token-not-secret";
const PEER_TOKEN: &str = "demo-peer-token-not-secret";
const TENANT_TOKEN: &str = "demo-tenant-token-not-secret";
/// The results service's read token (the API and the dashboard).
pub(crate) const READ_TOKEN: &str = "demo-read-token-not-secret";
/// The shufflers' `max_wait_ms` in the in-process cluster.
const MAX_WAIT_MS: u64 = 200;
/// A task of the in-process cluster's tenant ("demo"), as the demo and the pipeline mode of
/// `hush sim` provision them.
pub(crate) struct TaskSpec<'a> {
    pub(crate) name: &'a str,
    pub(crate) kind: MeasurementKind,
    /// Bucket bounds of a histogram (ignored for a counter).
    pub(crate) bounds_us: Vec<u64>,
    /// Events (or the count) one instance reports per window.
    pub(crate) bound: u64,
    pub(crate) window_s: u64,
    pub(crate) min_batch_size: u64,
    /// ε each aggregator spends per collection, and the task's whole budget.
    pub(crate) epsilon: f64,
    pub(crate) budget: f64,
    /// Percent of each collection's ε spent on the noisy report count.
    pub(crate) count_epsilon_percent: u8,
}

impl TaskSpec<'_> {
    /// The task, sealed to `collector`.
    pub(crate) fn build(self, collector: &HpkeKeypair) -> anyhow::Result<TaskConfig> {
        Ok(TaskConfig::new(TaskParams {
            task_id: TaskId::random(),
            tenant: "demo".into(),
            name: self.name.into(),
            kind: self.kind,
            bucket_bounds_us: if self.kind == MeasurementKind::Counter {
                vec![]
            } else {
                self.bounds_us
            },
            contribution_bound: self.bound,
            clip_contributions: true,
            time_precision_s: self.window_s,
            min_batch_size: self.min_batch_size,
            epsilon_per_collection: Epsilon::from_f64(self.epsilon)?,
            epsilon_budget: Epsilon::from_f64(self.budget)?,
            report_expiry_s: 3_600,
            packet_size: 4_096,
            collector_hpke_config: collector.config().clone(),
            alert_budget_percent: 70,
            retention_s: 86_400,
            count_epsilon_percent: self.count_epsilon_percent,
            max_collections_per_batch: 0,
        })?)
    }
}

/// Extra settings of an in-process cluster (the soak test shortens every period).
#[derive(Clone, Debug)]
pub(crate) struct Tuning {
    /// Top-level TOML lines added to both aggregators' configs.
    pub(crate) aggregator: String,
    /// Top-level TOML lines added to both shufflers' configs.
    pub(crate) shuffler: String,
    /// The key directory's epoch.
    pub(crate) key_epoch_s: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            aggregator: String::new(),
            shuffler: String::new(),
            key_epoch_s: 600,
        }
    }
}

/// The servers of an in-process cluster.
pub(crate) struct Cluster {
    pub(crate) leader: Aggregator,
    pub(crate) helper: Aggregator,
    pub(crate) shufflers: Vec<ShufflerNode>,
    pub(crate) results: ResultsService,
    /// The development CA every component's certificate chains to.
    pub(crate) ca_pem: Vec<u8>,
    /// How long after a window closes the results service collects it (derived from the
    /// cascade's timing).
    pub(crate) collect_delay_s: u64,
}

impl Cluster {
    /// What a service's client runtime is configured with: the first shuffler and the key
    /// directory (the results service), `https://`, verified against the cluster's CA. No
    /// aggregator address: clients never talk to one.
    pub(crate) fn endpoints(&self) -> Endpoints {
        let url = |a: std::net::SocketAddr| format!("https://{a}");
        Endpoints {
            shuffler_url: url(self.shufflers[0].local_addr()),
            keys: KeySource::Directory(url(self.results.grpc_addr())),
            tls_ca: Some(self.ca_pem.clone()),
        }
    }

    /// One connection to the first shuffler that many client runtimes can share.
    pub(crate) fn client_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let e = self.endpoints();
        let tls = hush_protocol::link::server_auth_client(&self.ca_pem);
        Ok(agg_client::channel(&e.shuffler_url, Some(&tls))?)
    }

    /// The key set of the current epoch, fetched from the key directory as a client does
    /// (once the directory has fetched the parties' keys).
    pub(crate) async fn key_set(&self) -> anyhow::Result<KeySet> {
        let results = &self.results;
        wait_until("the key directory", Duration::from_secs(60), || {
            results.key_set().is_some()
        })
        .await?;
        let KeySource::Directory(url) = self.endpoints().keys else {
            bail!("the demo's clients use the key directory");
        };
        Ok(fetch_key_set(&url, Some(&self.ca_pem), Duration::from_secs(10)).await?)
    }

    /// Connections (and requests) the leader and the helper saw without a client certificate:
    /// a service's client never connects to an aggregator, so both must be zero.
    pub(crate) fn anonymous_at_aggregators(&self) -> (u64, u64) {
        (
            self.leader.peers().anonymous().connections,
            self.helper.peers().anonymous().connections,
        )
    }

    /// Waits until `clients` uploaded every closed window, the shufflers forwarded everything
    /// and the aggregators verified and aggregated it.
    pub(crate) async fn upload_and_aggregate(
        &self,
        clients: impl IntoIterator<Item = HushClient>,
    ) -> anyhow::Result<()> {
        let flushes: Vec<_> = clients
            .into_iter()
            .map(|c| tokio::spawn(async move { c.flush(Duration::from_secs(120)).await }))
            .collect();
        for f in flushes {
            if !f.await? {
                bail!("a client could not upload its window within two minutes");
            }
        }
        self.drain().await
    }

    /// Waits until the shufflers forwarded every packet they hold and the aggregators verified
    /// and aggregated every report.
    pub(crate) async fn drain(&self) -> anyhow::Result<()> {
        let mixers: Vec<_> = self
            .shufflers
            .iter()
            .map(|s| s.shared().mixer.clone())
            .collect();
        wait_until("the shufflers to forward", Duration::from_secs(120), || {
            mixers.iter().all(|m| m.buffered() == 0)
        })
        .await?;
        let leader = self.leader.shared().store.clone();
        let start = Instant::now();
        while leader.pending_total().await? > 0 {
            if start.elapsed() > Duration::from_secs(300) {
                bail!("timed out waiting for the aggregators to finish");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Moves the clock past the collection delay and waits until the results service has
    /// released and tested (or skipped) `window` of every task in `ids`.
    pub(crate) async fn collect_window(
        &self,
        mock: &MockClock,
        window: Time,
        ids: &[TaskId],
    ) -> anyhow::Result<()> {
        mock.advance(self.collect_delay_s);
        let store = self.results.store().clone();
        wait_until(
            "the results service to collect",
            Duration::from_secs(120),
            || {
                ids.iter().all(|id| {
                    store.tested(id, window.as_secs()).unwrap_or(false)
                        || matches!(store.skipped(id, window), Ok(Some(_)))
                })
            },
        )
        .await
    }
}

/// Starts helper, leader, two shufflers and a results service (with `detection`, the TOML of
/// its `[detection]` section; the key directory of the cascade, whose collection delay follows
/// the clients' `runtime` timing) on 127.0.0.1 with sled under `dir`, and provisions `tasks`.
/// Every link is TLS with certificates from a development CA made in `dir/certs` (as `hush
/// certs` does): mutual between the components and for the operator's tools,
/// server-authenticated for clients.
pub(crate) async fn start_cluster(
    dir: &std::path::Path,
    clock: Arc<dyn Clock>,
    tasks: &[TaskConfig],
    collector: &HpkeKeypair,
    detection: &str,
    runtime: &RuntimeConfig,
    tuning: &Tuning,
) -> anyhow::Result<Cluster> {
    let any = "127.0.0.1:0";
    let (sections, ca_pem) = crate::certs::dev_tls_sections(&dir.join("certs"), "hush demo CA")?;
    let tls_of = |name: &str| -> anyhow::Result<&String> {
        sections
            .get(name)
            .context("a component without a certificate")
    };
    // The operator's tools present their own certificate: nothing connects to an aggregator
    // anonymously.
    let tools_tls = hush_server::tls::TlsMaterial::from_pem(
        std::fs::read(dir.join("certs/operator.pem"))?,
        std::fs::read(dir.join("certs/operator-key.pem"))?,
        ca_pem.clone(),
    )?
    .client();
    let secrets = Secrets {
        admin_token: ADMIN_TOKEN.into(),
        peer_token: PEER_TOKEN.into(),
    };
    let helper = Aggregator::start(
        Role::Helper,
        AggregatorConfig::from_toml(&format!(
            "listen = \"{any}\"\ndata_dir = \"{}\"\ncache_mb = 64\n{}\n\
             [peers]\nleader = [\"leader\"]\nkey_directories = [\"collector\"]\n{}",
            dir.join("helper").display(),
            tuning.aggregator,
            tls_of("helper")?
        ))?,
        secrets.clone(),
        clock.clone(),
    )
    .await?;
    let leader = Aggregator::start(
        Role::Leader,
        AggregatorConfig::from_toml(&format!(
            "listen = \"{any}\"\ndata_dir = \"{}\"\ncache_mb = 64\n{}\n\
             [peers]\nshufflers = [\"shuffler-b\"]\ncollectors = [\"collector\"]\nkey_directories = [\"collector\"]\n\
             [leader]\nhelper_url = \"https://{}\"\njob_size = 500\njob_poll_interval_ms = 50\n{}",
            dir.join("leader").display(),
            tuning.aggregator,
            helper.local_addr(),
            tls_of("leader")?
        ))?,
        secrets,
        clock.clone(),
    )
    .await?;
    let shuffler = |name: &str, ingest_from: &str, next: (&str, &str, String)| {
        anyhow::Ok(ShufflerConfig::from_toml(&format!(
            "name = \"{name}\"\nlisten = \"{any}\"\ndata_dir = \"{}\"\ncache_mb = 32\n{}\n\
             ingest_from = \"{ingest_from}\"\n\
             [peers]\nprevious = [\"shuffler-a\"]\nkey_directories = [\"collector\"]\n\
             [mix]\nbatch_size = 1000\nmin_batch_size = 1\nmax_wait_ms = {MAX_WAIT_MS}\n\
             [[next_hop]]\nname = \"{}\"\nkind = \"{}\"\nurl = \"{}\"\n{}",
            dir.join(name).display(),
            tuning.shuffler,
            next.0,
            next.1,
            next.2,
            tls_of(name)?
        ))?)
    };
    let b = ShufflerNode::start(
        shuffler(
            "shuffler-b",
            "shufflers",
            (
                "leader",
                "leader",
                format!("https://{}", leader.local_addr()),
            ),
        )?,
        ADMIN_TOKEN,
        clock.clone(),
    )
    .await?;
    let a = ShufflerNode::start(
        shuffler(
            "shuffler-a",
            "clients",
            (
                "shuffler-b",
                "shuffler",
                format!("https://{}", b.local_addr()),
            ),
        )?,
        ADMIN_TOKEN,
        clock.clone(),
    )
    .await?;

    // Provision: tasks on both aggregators (one fresh verification key each) and both shufflers.
    let leader_url = format!("https://{}", leader.local_addr());
    let helper_url = format!("https://{}", helper.local_addr());
    let shuffler_urls = [a.local_addr(), b.local_addr()].map(|s| format!("https://{s}"));
    let mut task_files = Vec::new();
    for t in tasks {
        provision(
            (&leader_url, &helper_url),
            &[&shuffler_urls[0], &shuffler_urls[1]],
            &tools_tls,
            ADMIN_TOKEN,
            t,
        )
        .await?;
        let f = dir.join(format!("task-{}.toml", t.id()));
        std::fs::write(&f, toml::to_string(&t.params())?)?;
        task_files.push(format!("\"{}\"", f.display()));
    }
    for url in [&leader_url, &helper_url] {
        agg_client::admin(url, ADMIN_TOKEN, Some(&tools_tls))?
            .set_tenant_token(pb::SetTenantTokenRequest {
                tenant: "demo".into(),
                token: TENANT_TOKEN.into(),
            })
            .await?;
    }
    let hop = |name: &str, url: &str| {
        format!("{{ name = \"{name}\", url = \"{url}\", max_wait_ms = {MAX_WAIT_MS} }}")
    };
    let results_config = ResultsConfig::from_toml(&format!(
        "tenant = \"demo\"\nlisten_grpc = \"{any}\"\nlisten_http = \"{any}\"\ndata_dir = \"{}\"\nleader_url = \"{leader_url}\"\n\
         task_files = [{}]\npoll_interval_ms = 50\n{}\n\
         [detection]\n{detection}\n\
         [cascade]\nleader_name = \"leader\"\nhelper_url = \"{helper_url}\"\nshufflers = [{}, {}]\n\
         client_max_jitter_ms = {}\nclient_tick_ms = {}\nkey_epoch_s = {}\n",
        dir.join("results").display(),
        task_files.join(", "),
        tls_of("collector")?,
        hop("shuffler-a", &shuffler_urls[0]),
        hop("shuffler-b", &shuffler_urls[1]),
        runtime.max_jitter.as_millis(),
        runtime.tick.as_millis(),
        tuning.key_epoch_s,
    ))?;
    let collect_delay_s = results_config.collect_delay_s();
    let results = ResultsService::start(
        results_config,
        ResultsSecrets {
            tenant_token: TENANT_TOKEN.into(),
            collector_key: collector.clone(),
            api_token: None,
            read_token: READ_TOKEN.into(),
        },
        clock,
    )
    .await?;
    Ok(Cluster {
        leader,
        helper,
        shufflers: vec![a, b],
        results,
        ca_pem,
        collect_delay_s,
    })
}

/// Provisions `task` on the leader and the helper (with one fresh verification key) and on the
/// shufflers, through their admin APIs over TLS.
pub(crate) async fn provision(
    (leader_url, helper_url): (&str, &str),
    shuffler_urls: &[&str],
    tls: &ClientTlsConfig,
    admin_token: &str,
    task: &TaskConfig,
) -> anyhow::Result<()> {
    let key = VerifyKey::random();
    for (url, role) in [(leader_url, "leader"), (helper_url, "helper")] {
        agg_client::admin(url, admin_token, Some(tls))?
            .create_task(pb::CreateTaskRequest {
                task: Some(task.into()),
                vdaf_verify_key: key.as_bytes().to_vec().into(),
                role: role.into(),
            })
            .await
            .with_context(|| format!("provisioning {} on the {role}", task.name()))?;
    }
    for url in shuffler_urls {
        agg_client::admin(url, admin_token, Some(tls))?
            .create_task(pb::CreateTaskRequest {
                task: Some(task.into()),
                vdaf_verify_key: Default::default(),
                role: "shuffler".into(),
            })
            .await
            .with_context(|| format!("provisioning {} on the shuffler at {url}", task.name()))?;
    }
    Ok(())
}

/// Stops every client at once (each reports its open window and uploads for up to `timeout`).
pub(crate) async fn shutdown_clients(
    clients: impl IntoIterator<Item = HushClient>,
    timeout: Duration,
) {
    let stops: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { c.shutdown(timeout).await }))
        .collect();
    for s in stops {
        let _ = s.await;
    }
}

pub(crate) async fn wait_until<F: Fn() -> bool>(
    what: &str,
    timeout: Duration,
    f: F,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `dir` (created), or a temporary directory removed when the guard drops.
pub(crate) fn data_dir(
    dir: Option<&std::path::Path>,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            // Absolute: configs written under it resolve their paths against their own folder.
            (std::path::absolute(d)?, None)
        }
        None => {
            let tmp = tempfile::tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    })
}
