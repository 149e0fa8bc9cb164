//! `hush soak`: the in-process cluster at a steady report rate for many windows, with every
//! period shortened (report expiry 2 windows, retention and helper job retention 5 windows, key
//! rotation and grace 3 windows, key epochs of one window), measuring the entries of every sled
//! tree of every component after each window. Once retention has caught up (window 8), the mean
//! of every tree over the second half of the run must stay within 25% of its mean over the first
//! half (each half whole key cycles, so the sawtooth of replay tags averages out); the audit
//! trails are append-only by design and reported with their growth per window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hush_client::{HushClient, RuntimeConfig};
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{
    Clock, HpkeKeypair, MeasurementKind, MockClock, SystemClock, TaskConfig, TaskId,
};

use crate::cluster::{TaskSpec, Tuning, data_dir, shutdown_clients, start_cluster};

/// Run the cluster at a steady rate and check that its storage stays flat.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Windows to run (one simulated minute each); at least 26.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(26..=10_000))]
    pub(crate) windows: u64,
    /// Simulated service instances (each sends one latency and one counter report a window).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(20..=20_000))]
    pub(crate) agents: u64,
    /// Keep the databases here instead of a temporary directory.
    #[arg(long)]
    pub(crate) data_dir: Option<std::path::PathBuf>,
}

const WINDOW_S: u64 = 60;
/// Retention and helper job retention, in windows.
const RETENTION_WINDOWS: u64 = 5;
/// Key rotation period and grace, in windows.
const KEY_WINDOWS: u64 = 3;
/// From this window on retention has caught up: report ids live the report expiry (2) plus the
/// leader's clock skew (5 windows of 60 s).
const WARM: usize = 8;

fn task(name: &str, kind: MeasurementKind, collector: &HpkeKeypair) -> anyhow::Result<TaskConfig> {
    let t = TaskSpec {
        name,
        kind,
        bounds_us: log_spaced_bounds(2_000, 4_000_000, 20),
        bound: 10,
        window_s: WINDOW_S,
        min_batch_size: 10,
        epsilon: 1.0,
        budget: 10.0,
        count_epsilon_percent: 10,
    }
    .build(collector)?;
    let mut p = t.params().clone();
    p.report_expiry_s = 2 * WINDOW_S;
    p.retention_s = RETENTION_WINDOWS * WINDOW_S;
    Ok(TaskConfig::new(p)?)
}

/// One snapshot: entries per (component, tree).
type Sizes = BTreeMap<(String, String), usize>;

/// Runs the soak and fails if any tree keeps growing.
pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (dir, _tmp) = data_dir(args.data_dir.as_deref())?;
    let start = SystemClock.now().round_down(WINDOW_S);
    let mock = Arc::new(MockClock::new(start));
    let clock: Arc<dyn Clock> = mock.clone();
    let collector = HpkeKeypair::generate(1);
    let lat = task("soak latency", MeasurementKind::WindowHistogram, &collector)?;
    let err = task("soak errors", MeasurementKind::Counter, &collector)?;
    let retention = RETENTION_WINDOWS * WINDOW_S;
    let keys = KEY_WINDOWS * WINDOW_S;
    let tuning = Tuning {
        aggregator: format!(
            "maintenance_interval_s = 1\nkey_rotation_period_s = {keys}\nkey_grace_period_s = {keys}\nhelper_job_retention_s = {retention}\n"
        ),
        shuffler: format!(
            "maintenance_interval_s = 1\nkey_rotation_period_s = {keys}\nkey_grace_period_s = {keys}\n"
        ),
        key_epoch_s: WINDOW_S,
    };
    let runtime = RuntimeConfig {
        queue_capacity: 1_000,
        max_batch: 100,
        tick: Duration::from_secs(5),
        max_jitter: Duration::from_millis(100),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_secs(2),
        refresh_interval: Duration::from_millis(500),
        request_timeout: Duration::from_secs(30),
    };
    let cluster = start_cluster(
        &dir,
        clock.clone(),
        &[lat.clone(), err.clone()],
        &collector,
        "",
        &runtime,
        &tuning,
    )
    .await?;
    let key_set = cluster.key_set().await?;
    let channel = cluster.client_channel()?;
    let mut clients = Vec::new();
    for _ in 0..args.agents {
        clients.push(
            HushClient::builder(cluster.endpoints())
                .latency_task("soak", "request", lat.clone())
                .counter_task("errors", err.clone())
                .config(runtime.clone())
                .clock(clock.clone())
                .keys(key_set.clone())
                .channel(channel.clone())
                .start()
                .await?,
        );
    }
    println!(
        "hush soak: {} instances, {} windows of {WINDOW_S} simulated seconds; report expiry 2 windows, retention and job retention {RETENTION_WINDOWS}, key rotation and grace {KEY_WINDOWS}, key epochs 1",
        args.agents, args.windows
    );
    let ids: Vec<TaskId> = vec![lat.id(), err.id()];
    let mut history: Vec<Sizes> = Vec::new();
    for w in 0..args.windows {
        let window = mock.now().round_down(WINDOW_S);
        for (i, c) in clients.iter().enumerate() {
            c.latency("soak", "request")
                .record(Duration::from_millis(10 + (i as u64 + w) % 90));
            c.counter("errors").add((i as u64 + w) % 2);
        }
        mock.advance(WINDOW_S);
        cluster
            .upload_and_aggregate(clients.iter().cloned())
            .await?;
        cluster.collect_window(&mock, window, &ids).await?;
        mock.set(window.add_secs(WINDOW_S));
        // Maintenance runs every second: retention, key rotation and expiry, stuck lanes.
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let mut sizes = Sizes::new();
        let mut put = |component: &str, trees: Vec<(String, usize)>| {
            for (t, n) in trees {
                sizes.insert((component.to_owned(), t), n);
            }
        };
        put(
            "leader",
            as_usize(cluster.leader.shared().store.tree_sizes().await?),
        );
        put(
            "helper",
            as_usize(cluster.helper.shared().store.tree_sizes().await?),
        );
        put(
            "shuffler-a",
            cluster.shufflers[0].shared().store.tree_sizes(),
        );
        put(
            "shuffler-b",
            cluster.shufflers[1].shared().store.tree_sizes(),
        );
        put("results", cluster.results.store().tree_sizes());
        history.push(sizes);
    }
    shutdown_clients(clients, Duration::from_secs(5)).await;
    cluster.results.shutdown().await?;
    for s in cluster.shufflers {
        s.shutdown().await?;
    }
    cluster.leader.shutdown().await?;
    cluster.helper.shutdown().await?;

    // Retention has caught up by WARM; from there the run splits into two halves of whole key
    // cycles, and the second half's mean of each tree must stay near the first half's.
    let warm = WARM;
    let last = history.len() - 1;
    // Each half spans whole key cycles (rotation period), so their means compare.
    let cycle = KEY_WINDOWS as usize;
    let half = ((last + 1 - warm) / 2) / cycle * cycle;
    let mid = warm + half.max(cycle);
    println!(
        "\nentries per tree after windows {warm}, {mid}, {last} (growth from {mid} to {last})"
    );
    let mut grew = Vec::new();
    for key in history[last].keys() {
        let at = |i: usize| history[i].get(key).copied().unwrap_or(0);
        let (a, b, c) = (at(warm), at(mid), at(last));
        // Means over whole key cycles: a sawtooth of replay tags averages out, a leak does not.
        let mean = |r: std::ops::Range<usize>| {
            let n = r.len().max(1) as f64;
            r.map(at).sum::<usize>() as f64 / n
        };
        let (early, late) = (mean(warm..mid), mean(mid..last + 1));
        let is_audit = key.1 == "audit";
        let growing = late > early * 1.25 + 10.0;
        let note = if is_audit {
            format!(
                "append-only by design: {:.1} entries per window",
                (c - b) as f64 / (last - mid).max(1) as f64
            )
        } else if growing {
            grew.push(format!("{}/{}", key.0, key.1));
            "GROWS".into()
        } else {
            "flat".into()
        };
        println!(
            "  {:<11} {:<18} {:>8} {:>8} {:>8}  {note}",
            key.0, key.1, a, b, c
        );
    }
    println!("soak took {:.1} s", started.elapsed().as_secs_f64());
    if !grew.is_empty() {
        bail!("storage kept growing at a steady rate: {}", grew.join(", "));
    }
    Ok(())
}

fn as_usize(sizes: Vec<(String, u64)>) -> Vec<(String, usize)> {
    sizes.into_iter().map(|(t, n)| (t, n as usize)).collect()
}
