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
//!
//! With `--serve` the simulated windows end at the present and the cluster then stays up on
//! real time ([`serve`]): the instances keep serving, the results service releases each window
//! as it closes, its dashboard shows them, and the demo writes a client configuration that a
//! real service (client/examples/axum-service) reports into the demo with.

mod serve;

use crate::cluster::{TaskSpec, Tuning, data_dir, shutdown_clients, start_cluster};

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hush_client::{HushClient, RuntimeConfig};
use hush_protocol::proto::v1 as pb;
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{
    Clock, HpkeKeypair, MeasurementKind, MockClock, SystemClock, TaskConfig, TaskId, Time,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

/// Run the whole cluster on loopback with simulated services and print what the collector sees.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
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
    /// After the simulated windows (which then end at the present), keep the cluster up on real
    /// time until Ctrl-C: the results dashboard shows each window as it is released, and a
    /// service can report into the demo with the client configuration written to
    /// --client-dir.
    #[arg(long)]
    pub serve: bool,
    /// With --serve: where to write client.toml, the CA and the task files a service needs
    /// (default: DATA_DIR/client).
    #[arg(long, requires = "serve")]
    pub client_dir: Option<PathBuf>,
    /// With --serve: the simulated instances stop after the simulated windows (they report
    /// nothing more), so only outside services send reports and nothing more is released
    /// unless they send enough.
    #[arg(long, requires = "serve")]
    pub idle: bool,
}

impl DemoArgs {
    /// The demo's defaults, as `hush demo` with no flags.
    pub fn new() -> Self {
        <Self as clap::FromArgMatches>::from_arg_matches(
            &<Self as clap::Args>::augment_args(clap::Command::new("demo"))
                .get_matches_from(["demo"]),
        )
        .expect("the defaults parse")
    }

    /// Sets the windows, instances and data directory (what a test changes).
    pub fn sized(mut self, windows: u64, agents: u64, data_dir: Option<PathBuf>) -> Self {
        self.windows = windows;
        self.agents = agents;
        self.data_dir = data_dir;
        self
    }

    /// `--serve` with `--idle` as given, writing the client configuration to `client_dir`.
    pub fn serving(mut self, client_dir: Option<PathBuf>, idle: bool) -> Self {
        self.serve = true;
        self.client_dir = client_dir;
        self.idle = idle;
        self
    }
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self::new()
    }
}

/// What a demo run ends with (printed as its summary).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DemoSummary {
    /// Reports the demo's own simulated instances had accepted by the first shuffler.
    pub accepted: u64,
    /// Reports the first shuffler accepted from every client (the demo's and outside ones).
    pub entered: u64,
    /// Reports the leader and the helper aggregated, from every client.
    pub aggregated: u64,
    /// Served reports the leader refused because their window was already collected (counted
    /// as late; 0 without --serve).
    pub late: u64,
}

struct Service {
    name: &'static str,
    median_ms: f64,
    task: TaskConfig,
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
pub(crate) fn latency(rng: &mut StdRng, median_ms: f64) -> Duration {
    let ms = LogNormal::new(median_ms.ln(), 0.45).map_or(median_ms, |d| d.sample(rng));
    Duration::from_secs_f64(ms / 1_000.0)
}

fn fmt_est(e: &Option<pb::Estimate>) -> String {
    match e {
        Some(e) if e.ci_high.is_finite() => {
            format!("{:7.1} [{:6.1}, {:6.1}]", e.value, e.ci_low, e.ci_high)
        }
        Some(e) => format!("{:7.1} [{:6.1},    ∞  ]", e.value, e.ci_low),
        None => format!("{:>24}", "too few reports"),
    }
}

/// A noisy count, right-aligned in 8 columns ("—" when the task releases none).
fn fmt_count(e: &Option<pb::Estimate>) -> String {
    match e {
        Some(e) => format!("{:>8.0}", e.value),
        None => format!("{:>8}", "—"),
    }
}

/// Runs the demo and prints per window and service what the collector sees; with `--serve`,
/// serves until Ctrl-C or SIGTERM. Without it, Ctrl-C or SIGTERM stops the demo where it is
/// and removes its temporary data directory (one given with `--data-dir` stays).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.serve {
        return run_until(args, hush_server::serve::shutdown_signal())
            .await
            .map(|_| ());
    }
    // Registered before the run starts, so no signal finds the default action (which would end
    // the process without removing anything).
    #[cfg(unix)]
    let interrupted = {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term) = (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        );
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    };
    #[cfg(not(unix))]
    let interrupted = hush_server::serve::shutdown_signal();
    // The temporary directory is made here, not in the run, so that it outlives the run: the
    // run's servers and clients are tasks that go on writing (sled's flushes, the shufflers'
    // packet files) until the runtime stops, and a directory removed under them can be left
    // half-removed.
    let mut args = args;
    let tmp = match args.data_dir {
        Some(_) => None,
        None => {
            let tmp = tempfile::tempdir()?;
            args.data_dir = Some(tmp.path().to_owned());
            Some(tmp)
        }
    };
    let finished = {
        let run = run_until(args, std::future::pending());
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => Some(r.map(|_| ())),
            _ = interrupted => None,
        }
    };
    match (finished, tmp) {
        (Some(r), _) => r,
        (None, None) => anyhow::bail!("interrupted; the data directory stays"),
        (None, Some(tmp)) => {
            let dir = tmp.keep();
            remove_while_writers_stop(&dir).await?;
            anyhow::bail!("interrupted; the demo's temporary data is removed")
        }
    }
}

/// Removes `dir`, trying again for up to 10 seconds while the tasks of a dropped run still
/// create files in it (a removal that races a new file fails with "directory not empty";
/// once the directory is gone, nothing recreates it).
async fn remove_while_writers_stop(dir: &std::path::Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow::Error::new(e).context(format!(
                    "interrupted, and the demo's temporary data in {} could not be removed; \
                     remove it by hand",
                    dir.display()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// [`run`], serving (with `--serve`) until `stop` resolves.
pub async fn run_until(
    args: DemoArgs,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<DemoSummary> {
    let started = Instant::now();
    let (dir, _tmp) = data_dir(args.data_dir.as_deref())?;
    // Served, the simulated windows end at the present, so that real time carries on from them.
    let start_time = if args.serve {
        Time::from_secs(
            SystemClock
                .now()
                .round_down(args.window_secs)
                .as_secs()
                .saturating_sub(args.windows * args.window_secs),
        )
    } else {
        SystemClock.now().round_down(args.window_secs)
    };
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
    let served_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if args.serve {
        let client_dir = args
            .client_dir
            .clone()
            .unwrap_or_else(|| dir.join("client"));
        let config = serve::write_client_dir(&client_dir, &cluster, &services, &errors)?;
        if args.idle {
            // The instances stop: every report from now on is an outside service's.
            shutdown_clients(
                agents.iter().map(|(_, c)| c.clone()),
                Duration::from_secs(10),
            )
            .await;
        }
        let follow = serve::follow_real_time(mock.clone());
        let traffic = (!args.idle).then(|| {
            serve::keep_serving(
                &args,
                start_time,
                clock.clone(),
                Arc::new(services),
                agents.clone(),
                served_errors.clone(),
            )
        });
        println!("serving on real time until Ctrl-C:");
        println!(
            "  dashboard      https://{}/dashboard#token={} (the certificate is from a CA the demo made for this run: let the browser proceed; do not trust that CA)",
            cluster.results.http_addr(),
            serve::READ_TOKEN,
        );
        println!(
            "  results API    https://{} (read token {})",
            cluster.results.http_addr(),
            serve::READ_TOKEN
        );
        println!("  client config  {}", config.display());
        println!(
            "  a service      cargo run -p hush-example-axum -- --config {}",
            config.display()
        );
        stop.await;
        if let Some(t) = traffic {
            t.abort();
        }
        // Time stops here: the open window cannot close and be collected while its reports
        // are still on their way.
        follow.abort();
        println!("stopping: every instance reports its open window (Ctrl-C again: stop at once)");
        let wind_down = async {
            shutdown_clients(
                agents.iter().map(|(_, c)| c.clone()),
                Duration::from_secs(10),
            )
            .await;
            cluster.drain().await
        };
        tokio::select! {
            r = wind_down => r?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted before the cluster drained"),
        }
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
    // Every client's packets the first shuffler accepted, the demo's and outside services'.
    let mut entered = 0;
    // What the leader refused, by reason: says why, if reports went missing.
    let mut refused: BTreeMap<&'static str, u64> = BTreeMap::new();
    for t in &all_tasks {
        for (stat, n) in cluster
            .leader
            .shared()
            .store
            .stats(t.id().as_bytes())
            .await?
        {
            if let hush_aggregator::store::Stat::Rejected(r) = stat {
                *refused.entry(r.as_str_name()).or_default() += n;
            }
        }
        entered += cluster.shufflers[0]
            .shared()
            .store
            .stats(t.id().as_bytes())?
            .get(&hush_shuffler::store::Stat::Accepted)
            .copied()
            .unwrap_or(0);
        aggregated += cluster
            .leader
            .shared()
            .store
            .stats(t.id().as_bytes())
            .await?
            .get(&hush_aggregator::store::Stat::Aggregated)
            .copied()
            .unwrap_or(0);
    }
    recorded_errors += served_errors.load(std::sync::atomic::Ordering::Relaxed);
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
    // Served on real time, a window can close and be collected while some of its reports are
    // still on their way (a loaded machine, a client's jitter): the leader refuses them as
    // late and counts them, as it would in production. They are accounted for, not lost.
    let late = refused
        .get(pb::RejectReason::BatchCollected.as_str_name())
        .copied()
        .unwrap_or(0);
    if args.serve {
        println!(
            "  from other services: {} reports accepted by the first shuffler",
            entered.saturating_sub(sum["accepted"])
        );
        if late > 0 {
            println!(
                "  late: {late} reports arrived after their window was collected; the leader \
                 counted them and the results show them as late_reports"
            );
        }
    }
    println!(
        "  privacy: every collection spent ε {} at each aggregator; each window's routine budget is ε {:.1}",
        args.epsilon,
        all_tasks[0]
            .budget_for(hush_protocol::BudgetPurpose::Routine)
            .as_f64()
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
    // Everything the first shuffler took in, from every client, was aggregated.
    // Only served windows can be late: the simulated ones are collected after every upload.
    let late = if args.serve { late } else { 0 };
    let ok = sum["accepted"] == sum["reports"]
        && entered >= sum["accepted"]
        && aggregated + late == entered;
    let summary = DemoSummary {
        accepted: sum["accepted"],
        entered,
        aggregated,
        late,
    };
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
        bail!(
            "some reports were lost: {sum:?}; the first shuffler accepted {entered}, the \
             aggregators aggregated {aggregated}; the leader refused {refused:?}"
        );
    }
    Ok(summary)
}
