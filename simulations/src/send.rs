//! `hush send`: simulated service instances reporting into a cluster that is already running,
//! through the same client runtime a service embeds. It takes what a service would be given —
//! the first shuffler's URL, the tenant's key directory, the operators' CA and the task files —
//! or a client configuration holding them (`hush demo --serve` writes one), runs N instances
//! that record log-normal latencies for every latency task and errors for every counter, and at
//! the end uploads every open window and prints what was recorded, sent, accepted and refused.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hush_client::{
    ClientConfig, CounterMetric, HushClient, LatencyMetric, MeasurementKind, TaskParams, TaskSource,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cluster::shutdown_clients;
use crate::demo::latency;
use crate::load::parse_duration;

/// Simulated service instances reporting into a running cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// A client configuration (`hush_client::ClientConfig`: endpoints, CA, tasks), e.g. the
    /// one `hush demo --serve` writes. Instead of --shuffler, --key-directory and --task.
    #[arg(long, conflicts_with_all = ["shuffler", "key_directory", "tasks"])]
    pub config: Option<PathBuf>,
    /// The first shuffler's gRPC URL (`https://` with --ca).
    #[arg(long, required_unless_present = "config")]
    pub shuffler: Option<String>,
    /// The tenant's key directory: its results service's gRPC URL.
    #[arg(long, required_unless_present = "config")]
    pub key_directory: Option<String>,
    /// Task files (as `hush task create` provisioned them): histograms get latencies, counters
    /// get errors. Comma- or space-separated.
    #[arg(long = "task", value_delimiter = ',', num_args = 1.., required_unless_present = "config")]
    pub tasks: Vec<PathBuf>,
    /// Simulated instances, each with its own client runtime (and its own connection).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=2_000))]
    pub instances: u64,
    /// Requests each instance serves per window, spread over the window (keep it within the
    /// tasks' contribution bound, or the excess is dropped and counted).
    #[arg(long, default_value_t = 14)]
    pub requests: u64,
    /// Median latency, ms (log-normal, log standard deviation 0.45).
    #[arg(long, default_value_t = 50.0)]
    pub median_ms: f64,
    /// Share of requests that fail (counted into every counter task).
    #[arg(long, default_value_t = 0.01)]
    pub error_rate: f64,
    /// How long to send, e.g. `90s` or `3m`; then every open window is uploaded.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the simulated traffic.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The client configuration `a` describes, with `ca` (the CLI's `--ca`/`HUSH_CA`) when the
/// parts are given one by one.
fn client_config(a: &SendArgs, ca: Option<PathBuf>) -> anyhow::Result<ClientConfig> {
    if let Some(path) = &a.config {
        let c = ClientConfig::from_file(path)?;
        c.check()?;
        return Ok(c);
    }
    let mut latency = Vec::new();
    let mut counter = Vec::new();
    for f in &a.tasks {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading the task file {}", f.display()))?;
        let p: TaskParams =
            toml::from_str(&text).with_context(|| format!("the task file {}", f.display()))?;
        let source = TaskSource {
            task: None,
            task_file: Some(std::path::absolute(f)?),
        };
        match p.kind {
            MeasurementKind::Counter => counter.push(CounterMetric {
                name: p.name.clone(),
                source,
            }),
            _ => latency.push(LatencyMetric {
                service: p.name.clone(),
                operation: "request".into(),
                source,
            }),
        }
    }
    let c = ClientConfig {
        shuffler_url: a.shuffler.clone().context("--shuffler")?,
        key_directory: a.key_directory.clone().context("--key-directory")?,
        tls_ca: ca.map(std::path::absolute).transpose()?,
        latency,
        counter,
        runtime: Default::default(),
        base_dir: None,
    };
    c.check()?;
    Ok(c)
}

/// Runs `hush send`; fails if a report was refused or could not be uploaded.
pub async fn run(a: SendArgs, ca: Option<PathBuf>) -> anyhow::Result<()> {
    let config = client_config(&a, ca)?;
    if config.latency.is_empty() && config.counter.is_empty() {
        bail!("no task to report into: give --task files (or a --config with metrics)");
    }
    let window_s = config
        .tasks()?
        .iter()
        .map(|t| t.time_precision_s())
        .min()
        .unwrap_or(60)
        .max(1);
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..a.instances {
        clients.push(
            HushClient::from_config(&config)
                .await
                .context("starting a client runtime")?,
        );
    }
    println!(
        "hush send: {} instances to {} ({} latency and {} counter tasks, {}-second windows), {} requests per instance and window for {:.0} s",
        a.instances,
        config.shuffler_url,
        config.latency.len(),
        config.counter.len(),
        window_s,
        a.requests,
        a.duration.as_secs_f64()
    );
    let mut rng = StdRng::seed_from_u64(a.seed);
    let per_second = a.requests as f64 / window_s as f64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut requests = 0u64;
    let mut errors = 0u64;
    let stop = tokio::time::sleep(a.duration);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        for c in &clients {
            let n = per_second.floor() as u64 + u64::from(rng.random::<f64>() < per_second.fract());
            for m in &config.latency {
                let l = c.latency(&m.service, &m.operation);
                for _ in 0..n {
                    l.record(latency(&mut rng, a.median_ms));
                }
            }
            requests += n;
            let failed = (0..n)
                .filter(|_| rng.random::<f64>() < a.error_rate)
                .count() as u64;
            errors += failed;
            for m in &config.counter {
                c.counter(&m.name).add(failed);
            }
        }
    }
    println!("uploading every open window…");
    let stats: Vec<_> = clients.iter().map(HushClient::clone).collect();
    shutdown_clients(clients, Duration::from_secs(60)).await;
    let (mut recorded, mut over, mut full, mut sent, mut accepted) = (0, 0, 0, 0, 0);
    let mut refused = std::collections::BTreeMap::new();
    for c in &stats {
        let s = c.stats();
        recorded += s.recorded;
        over += s.dropped_over_bound;
        full += s.dropped_queue_full;
        sent += s.reports_sent;
        accepted += s.accepted;
        for (r, n) in s.rejected {
            *refused.entry(format!("{r:?}")).or_insert(0u64) += n;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("summary after {secs:.1} s:");
    println!(
        "  instances: {requests} requests ({errors} failed) served; {recorded} events recorded, {over} dropped over the per-window bound, {full} dropped by full queues"
    );
    println!(
        "  reports: {sent} sent, {accepted} accepted by the first shuffler, {} refused{}; {:.1} reports/s",
        refused.values().sum::<u64>(),
        if refused.is_empty() {
            String::new()
        } else {
            format!(" ({refused:?})")
        },
        accepted as f64 / secs
    );
    if !refused.is_empty() || accepted != sent {
        bail!(
            "{} of {sent} reports were not accepted",
            sent - accepted.min(sent)
        );
    }
    Ok(())
}
