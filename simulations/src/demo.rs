//! `hush demo`: the whole cluster on loopback, driven by simulated service instances.
//!
//! Two shufflers, the leader, the helper and a results service run as real gRPC servers on
//! 127.0.0.1 with sled in a temporary directory (or `--data-dir`). A tenant and four tasks are
//! provisioned: window latency histograms of three services and an error counter. Thousands of
//! simulated service instances, each with its own [`HushClient`], record request latencies
//! (log-normal) and errors for several windows; one service gets a latency regression and the
//! error rate spikes in one window. Time is simulated: every component follows one shared clock
//! that the demo advances window by window, so a run takes seconds, not hours. Each window is
//! uploaded through the cascade, aggregated, collected by the results service with DP noise from
//! both aggregators, and printed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hush_aggregator::{Aggregator, AggregatorConfig, Secrets, client as agg_client};
use hush_client::{Endpoints, HushClient, KeySet, KeySource, RuntimeConfig, fetch_key_set};
use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
use hush_protocol::proto::v1 as pb;
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{
    Clock, Epsilon, HpkeKeypair, MeasurementKind, MockClock, Role, SystemClock, TaskConfig, TaskId,
    TaskParams, Time, VerifyKey,
};
use hush_shuffler::{ShufflerConfig, ShufflerNode};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use tonic::transport::ClientTlsConfig;

const ADMIN_TOKEN: &str = "demo-admin-token-not-secret";
const PEER_TOKEN: &str = "demo-peer-token-not-secret";
const TENANT_TOKEN: &str = "demo-tenant-token-not-secret";
/// The shufflers' `max_wait_ms` in the in-process cluster.
const MAX_WAIT_MS: u64 = 200;

/// Run the whole cluster on loopback with simulated services and print what the collector sees.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DemoArgs {
    /// Windows to simulate.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub(crate) windows: u64,
    /// Simulated service instances, each with its own client; spread over the three services
    /// (at least 150: a window is released only with 50 reports or more).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(150..=20_000))]
    pub(crate) agents: u64,
    /// Requests each instance serves per window (also the per-window contribution bound).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub(crate) requests: u64,
    /// Window length in simulated seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub(crate) window_secs: u64,
    /// ε each aggregator spends per collection.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) epsilon: f64,
    /// Window in which the "search" service's latency regresses by 60% (0-based; past the last
    /// window: none).
    #[arg(long, default_value_t = 3)]
    pub(crate) regression_window: u64,
    /// Window in which the error rate jumps from 1% to 8% (0-based; past the last: none).
    #[arg(long, default_value_t = 4)]
    pub(crate) spike_window: u64,
    /// Keep the servers' databases here instead of a temporary directory.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Seed of the simulated traffic.
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
}

struct Service {
    name: &'static str,
    median_ms: f64,
    task: TaskConfig,
}

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

fn task(
    name: &str,
    kind: MeasurementKind,
    args: &DemoArgs,
    collector: &HpkeKeypair,
) -> anyhow::Result<TaskConfig> {
    TaskSpec {
        name,
        kind,
        // 20 buckets from 2 ms to 4 s: each bucket's count carries its own noise, so fewer,
        // wider buckets give tighter quantile intervals at this scale.
        bounds_us: log_spaced_bounds(2_000, 4_000_000, 20),
        bound: args.requests,
        window_s: args.window_secs,
        min_batch_size: 50,
        epsilon: args.epsilon,
        budget: args.epsilon * 10.0,
        count_epsilon_percent: hush_protocol::task::defaults::count_epsilon_percent(),
    }
    .build(collector)
}

/// A log-normal latency around `median_ms` (log standard deviation 0.45).
fn latency(rng: &mut StdRng, median_ms: f64) -> Duration {
    let ms = LogNormal::new(median_ms.ln(), 0.45).map_or(median_ms, |d| d.sample(rng));
    Duration::from_secs_f64(ms / 1_000.0)
}

fn fmt_est(e: &Option<pb::Estimate>) -> String {
    match e {
        Some(e) if e.ci_high.is_finite() => {
            format!("{:7.1} [{:6.1}, {:6.1}]", e.value, e.ci_low, e.ci_high)
        }
        Some(e) => format!("{:7.1} [{:6.1},    ∞  ]", e.value, e.ci_low),
        None => format!("{:>24}", "—"),
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

/// A noisy count, right-aligned in 8 columns ("—" when the task releases none).
fn fmt_count(e: &Option<pb::Estimate>) -> String {
    match e {
        Some(e) => format!("{:>8.0}", e.value),
        None => format!("{:>8}", "—"),
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
        let mixers: Vec<_> = self
            .shufflers
            .iter()
            .map(|s| s.node().mixer.clone())
            .collect();
        wait_until("the shufflers to forward", Duration::from_secs(120), || {
            mixers.iter().all(|m| m.buffered() == 0)
        })
        .await?;
        let leader = self.leader.shared().store.clone();
        wait_until(
            "the aggregators to finish",
            Duration::from_secs(300),
            || leader.pending_total() == 0,
        )
        .await
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
    let (sections, ca_pem) =
        crate::cli::certs::dev_tls_sections(&dir.join("certs"), "hush demo CA")?;
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
            read_token: "demo-read-token-not-secret".into(),
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
            (d.to_owned(), None)
        }
        None => {
            let tmp = tempfile::tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    })
}

/// Runs the demo and prints per window and service what the collector sees.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (dir, _tmp) = data_dir(args.data_dir.as_deref())?;
    let start_time = SystemClock.now().round_down(args.window_secs);
    let mock = Arc::new(MockClock::new(start_time));
    let clock: Arc<dyn Clock> = mock.clone();
    let collector = HpkeKeypair::generate(1);
    let services = vec![
        Service {
            name: "checkout",
            median_ms: 45.0,
            task: task(
                "checkout latency",
                MeasurementKind::WindowHistogram,
                &args,
                &collector,
            )?,
        },
        Service {
            name: "search",
            median_ms: 80.0,
            task: task(
                "search latency",
                MeasurementKind::WindowHistogram,
                &args,
                &collector,
            )?,
        },
        Service {
            name: "auth",
            median_ms: 12.0,
            task: task(
                "auth latency",
                MeasurementKind::WindowHistogram,
                &args,
                &collector,
            )?,
        },
    ];
    let errors = task("errors", MeasurementKind::Counter, &args, &collector)?;
    let all_tasks: Vec<TaskConfig> = services
        .iter()
        .map(|s| s.task.clone())
        .chain([errors.clone()])
        .collect();

    println!(
        "hush demo: 2 shufflers, leader, helper and a results service on 127.0.0.1; data in {}",
        dir.display()
    );
    println!(
        "  every link is TLS with certificates from a development CA in {} (mutual between \
         components, server-authenticated for the services' clients)",
        dir.join("certs").display()
    );
    let detection = "false_alarm_rate = 0.01\nerror_rates = [{ errors = \"errors\", requests = \
                     [\"checkout latency\", \"search latency\", \"auth latency\"] }]";
    let runtime = RuntimeConfig {
        queue_capacity: 1_000,
        max_batch: 100,
        tick: Duration::from_secs(5),
        max_jitter: Duration::from_millis(300),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_secs(2),
        refresh_interval: Duration::from_secs(3_600),
        request_timeout: Duration::from_secs(30),
    };
    let cluster = start_cluster(
        &dir,
        clock.clone(),
        &all_tasks,
        &collector,
        detection,
        &runtime,
        &Tuning::default(),
    )
    .await?;
    let endpoints = cluster.endpoints();
    let keys = cluster.key_set().await?;
    let channel = cluster.client_channel()?;
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let s = &services[(i % 3) as usize];
        let c = HushClient::builder(endpoints.clone())
            .latency_task(s.name, "request", s.task.clone())
            .counter_task("errors", errors.clone())
            .config(runtime.clone())
            .clock(clock.clone())
            .keys(keys.clone())
            .channel(channel.clone())
            .start()
            .await?;
        agents.push(((i % 3) as usize, c));
    }
    println!(
        "{} service instances ({} requests each per {}-second window), ε = {} per collection; simulated time starts at {}",
        args.agents,
        args.requests,
        args.window_secs,
        args.epsilon,
        start_time.as_secs()
    );
    println!(
        "injected: search latency +60% from window {}, error rate 1% → 8% in window {}\n",
        args.regression_window, args.spike_window
    );

    let bar = ProgressBar::new(args.windows * 4);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut lines: Vec<String> = Vec::new();
    let mut recorded_errors = 0u64;
    for w in 0..args.windows {
        let window = mock.now().round_down(args.window_secs);
        bar.set_message(format!("window {w}: services serve requests"));
        let error_rate = if w == args.spike_window { 0.08 } else { 0.01 };
        for (si, c) in &agents {
            let s = &services[*si];
            let slow = if s.name == "search" && w >= args.regression_window {
                1.6
            } else {
                1.0
            };
            let l = c.latency(s.name, "request");
            let mut errs = 0;
            for _ in 0..args.requests {
                l.record(latency(&mut rng, s.median_ms * slow));
                if rng.random::<f64>() < error_rate {
                    errs += 1;
                }
            }
            c.counter("errors").add(errs);
            recorded_errors += errs;
        }
        bar.inc(1);
        // The window ends: every client uploads it through the cascade.
        mock.advance(args.window_secs);
        bar.set_message(format!("window {w}: clients upload through the shufflers"));
        cluster
            .upload_and_aggregate(agents.iter().map(|(_, c)| c.clone()))
            .await?;
        bar.inc(2);
        bar.set_message(format!("window {w}: the results service collects"));
        let ids: Vec<TaskId> = all_tasks.iter().map(|t| t.id()).collect();
        cluster.collect_window(&mock, window, &ids).await?;
        let store = cluster.results.store().clone();
        bar.inc(1);
        // Back to the start of the next window.
        mock.set(window.add_secs(args.window_secs));

        lines.push(format!(
            "window {w}  [{} .. {})",
            window.as_secs(),
            window.as_secs() + args.window_secs
        ));
        lines.push(format!(
            "  {:<9} {:>8} {:>8}   {:>24} {:>24} {:>24}",
            "service",
            "reports",
            "requests",
            "p50 ms [95% CI]",
            "p95 ms [95% CI]",
            "p99 ms [95% CI]"
        ));
        let mut total_requests = 0.0;
        for s in &services {
            match store.window(&s.task.id(), window)? {
                Some(r) => {
                    let t = r.total.as_ref().map(|t| t.value).unwrap_or(0.0);
                    total_requests += t;
                    lines.push(format!(
                        "  {:<9} {:>8} {:>8.0}   {} {} {}",
                        s.name,
                        fmt_count(&r.reports),
                        t,
                        fmt_est(&r.p50_ms),
                        fmt_est(&r.p95_ms),
                        fmt_est(&r.p99_ms)
                    ));
                }
                None => lines.push(format!(
                    "  {:<9} no result: {}",
                    s.name,
                    store.skipped(&s.task.id(), window)?.unwrap_or_default()
                )),
            }
        }
        match store.window(&errors.id(), window)? {
            Some(r) if total_requests > 0.0 => {
                let e = r.total.unwrap_or_default();
                lines.push(format!(
                    "  errors    {:.2}% [{:.2}%, {:.2}%] of requests (≈{} reports)",
                    100.0 * e.value / total_requests,
                    100.0 * e.ci_low / total_requests,
                    100.0 * e.ci_high / total_requests,
                    fmt_count(&r.reports).trim()
                ));
            }
            Some(r) => {
                let e = r.total.unwrap_or_default();
                lines.push(format!(
                    "  errors    {:.0} [{:.0}, {:.0}] (≈{} reports; no request count to divide by)",
                    e.value,
                    e.ci_low,
                    e.ci_high,
                    fmt_count(&r.reports).trim()
                ));
            }
            None => lines.push(format!(
                "  errors    no result: {}",
                store.skipped(&errors.id(), window)?.unwrap_or_default()
            )),
        }
        let names: BTreeMap<TaskId, &str> = services
            .iter()
            .map(|s| (s.task.id(), s.name))
            .chain([(errors.id(), "errors")])
            .collect();
        let mut flagged = Vec::new();
        for a in store.alerts(None)? {
            if a.window_start != window.as_secs() {
                continue;
            }
            let name = TaskId::try_from(a.task_id.as_ref())
                .ok()
                .and_then(|id| names.get(&id).copied())
                .unwrap_or("?");
            flagged.push(format!("    {name}: {} — {}", a.detector, a.explanation));
        }
        if flagged.is_empty() {
            lines.push("  anomalies: none flagged".into());
        } else {
            lines.push("  anomalies:".into());
            lines.extend(flagged);
        }
        lines.push(String::new());
    }
    bar.finish_and_clear();
    for l in &lines {
        println!("{l}");
    }

    // Summary: every recorded event is accounted for.
    let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, c) in &agents {
        let s = c.stats();
        *sum.entry("recorded").or_default() += s.recorded;
        *sum.entry("dropped_over_bound").or_default() += s.dropped_over_bound;
        *sum.entry("dropped_queue_full").or_default() += s.dropped_queue_full;
        *sum.entry("reports").or_default() += s.reports_sent;
        *sum.entry("accepted").or_default() += s.accepted;
        *sum.entry("rejected").or_default() += s.rejected.iter().map(|(_, n)| n).sum::<u64>();
    }
    let mut aggregated = 0;
    for t in &all_tasks {
        aggregated += cluster
            .leader
            .shared()
            .store
            .stats(t.id().as_bytes())?
            .get(&hush_aggregator::store::Stat::Aggregated)
            .copied()
            .unwrap_or(0);
    }
    println!("summary after {:.1} s:", started.elapsed().as_secs_f64());
    println!(
        "  clients: {} request latencies and {} errors recorded, {} dropped over the per-window bound, {} dropped by full queues",
        sum["recorded"] - recorded_errors,
        recorded_errors,
        sum["dropped_over_bound"],
        sum["dropped_queue_full"]
    );
    println!(
        "  reports: {} sent, {} accepted by the first shuffler, {} refused; {} aggregated by the leader and helper",
        sum["reports"], sum["accepted"], sum["rejected"], aggregated
    );
    println!(
        "  privacy: every collection spent ε {} at each aggregator; each window's routine budget is ε {:.1}",
        args.epsilon,
        all_tasks[0].budget_for(false).as_f64()
    );
    let peers = |p: &hush_server::tls::PeerLog| {
        p.snapshot()
            .iter()
            .map(|(name, c)| format!("{name} {}", c.connections))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (anon_leader, anon_helper) = cluster.anonymous_at_aggregators();
    println!(
        "  keys: every client sealed to key set {} (epoch {}) from the key directory; connections by peer: leader [{}], helper [{}]; from clients: {}",
        keys.short_digest(),
        keys.epoch,
        peers(cluster.leader.peers()),
        peers(cluster.helper.peers()),
        anon_leader + anon_helper
    );
    let ok = sum["accepted"] == sum["reports"] && aggregated == sum["accepted"];
    if anon_leader + anon_helper > 0 {
        bail!(
            "{anon_leader} anonymous connections reached the leader and {anon_helper} the helper: \
             clients must never connect to an aggregator"
        );
    }
    shutdown_clients(agents.into_iter().map(|(_, c)| c), Duration::from_secs(5)).await;
    cluster.results.shutdown().await?;
    for s in cluster.shufflers {
        s.shutdown().await?;
    }
    cluster.leader.shutdown().await?;
    cluster.helper.shutdown().await?;
    if !ok {
        bail!("some reports were lost: {sum:?}, {aggregated} aggregated");
    }
    Ok(())
}
