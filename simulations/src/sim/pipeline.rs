//! The pipeline mode: the same scenario through the real system in this process — two shufflers,
//! leader, helper and results service as gRPC servers on loopback with sled in a temporary
//! directory, one client runtime per service instance, real Prio3, HPKE and DP noise — on a
//! simulated clock. It is slow (real crypto per report), so it suits small N; the windows it
//! releases feed the same detectors and scoring as the model mode.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hush_client::{HushClient, RuntimeConfig};
use hush_protocol::{Clock, HpkeKeypair, MeasurementKind, MockClock, SystemClock, TaskConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Binomial, Distribution};

use super::model::{Cell, Released};
use super::scenario::{AnomalyKind, Scenario};
use crate::cluster::{TaskSpec, start_cluster};

const WINDOW_S: u64 = 60;

fn task(
    s: &Scenario,
    name: &str,
    kind: MeasurementKind,
    eps: f64,
    collector: &HpkeKeypair,
) -> anyhow::Result<TaskConfig> {
    let runs = (s.windows * s.repetitions) as f64;
    TaskSpec {
        name,
        kind,
        bounds_us: s.bounds_us(),
        bound: s.events_per_client,
        window_s: WINDOW_S,
        min_batch_size: s.min_batch_size,
        epsilon: eps,
        // Enough routine budget for every window of the run (30% of the total is routine).
        budget: (eps * runs * 4.0).min(1e6),
        count_epsilon_percent: s.count_epsilon_percent,
    }
    .build(collector)
}

/// Runs `reps` repetitions of `cell` through the real system; each is `windows` consecutive
/// windows of one cluster.
pub(crate) async fn simulate(
    s: &Scenario,
    cell: &Cell,
    reps: usize,
    seed: u64,
) -> anyhow::Result<Vec<Vec<Released>>> {
    let a = &s.anomalies[cell.anomaly];
    let svc = s
        .service(&a.service)
        .ok_or_else(|| anyhow::anyhow!("no service {:?}", a.service))?
        .clone();
    let collector = HpkeKeypair::generate(1);
    let lat = task(
        s,
        "latency",
        MeasurementKind::WindowHistogram,
        cell.epsilon,
        &collector,
    )?;
    let err = task(
        s,
        "errors",
        MeasurementKind::Counter,
        cell.epsilon,
        &collector,
    )?;
    let dir = tempfile::tempdir()?;
    let start = SystemClock.now().round_down(WINDOW_S);
    let mock = Arc::new(MockClock::new(start));
    let clock: Arc<dyn Clock> = mock.clone();
    let config = RuntimeConfig {
        queue_capacity: 1_000,
        max_batch: 100,
        tick: Duration::from_secs(5),
        max_jitter: Duration::from_millis(50),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_secs(2),
        refresh_interval: Duration::from_secs(3_600),
        request_timeout: Duration::from_secs(30),
    };
    let cluster = start_cluster(
        dir.path(),
        clock.clone(),
        &[lat.clone(), err.clone()],
        &collector,
        "",
        &config,
        &crate::cluster::Tuning::default(),
    )
    .await
    .context("starting the in-process cluster")?;
    let endpoints = cluster.endpoints();
    let keys = cluster.key_set().await?;
    let channel = cluster.client_channel()?;
    let instances = cell.events / s.events_per_client;
    let mut clients = Vec::new();
    for _ in 0..instances {
        clients.push(
            HushClient::builder(endpoints.clone())
                .latency_task(&svc.name, "request", lat.clone())
                .counter_task("errors", err.clone())
                .config(config.clone())
                .clock(clock.clone())
                .keys(keys.clone())
                .channel(channel.clone())
                .start()
                .await?,
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let store = cluster.results.store().clone();
    let mut out = Vec::new();
    for _ in 0..reps {
        let mut run = Vec::new();
        for w in 0..s.windows {
            let window = mock.now().round_down(WINDOW_S);
            let on = w >= a.start_window;
            let (shift, rate) = match a.kind {
                AnomalyKind::LatencyShift if on => (cell.magnitude, svc.error_rate),
                AnomalyKind::ErrorSpike if on => (0.0, svc.error_rate + cell.magnitude),
                _ => (0.0, svc.error_rate),
            };
            for c in &clients {
                let l = c.latency(&svc.name, "request");
                for _ in 0..s.events_per_client {
                    let ms: f64 = svc.sample_ms(&mut rng) + shift;
                    l.record(Duration::from_secs_f64(ms / 1_000.0));
                }
                c.counter("errors")
                    .add(Binomial::new(s.events_per_client, rate)?.sample(&mut rng));
            }
            mock.advance(WINDOW_S);
            cluster
                .upload_and_aggregate(clients.iter().cloned())
                .await?;
            cluster
                .collect_window(&mock, window, &[lat.id(), err.id()])
                .await?;
            mock.set(window.add_secs(WINDOW_S));
            let h = store.window(&lat.id(), window)?.with_context(|| {
                format!(
                    "window {w} was not released: {}",
                    store
                        .skipped(&lat.id(), window)
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                )
            })?;
            let e = store
                .window(&err.id(), window)?
                .context("the error count was not released")?;
            let e_total: i64 = e.noisy_counts.iter().sum();
            run.push(Released {
                counts: h.noisy_counts.clone(),
                noise_sd: h.noise_stddev,
                errors: e_total as f64,
                errors_sd: e.noise_stddev,
            });
        }
        out.push(run);
    }
    crate::cluster::shutdown_clients(clients, Duration::from_secs(5)).await;
    cluster.results.shutdown().await?;
    for n in cluster.shufflers {
        n.shutdown().await?;
    }
    cluster.leader.shutdown().await?;
    cluster.helper.shutdown().await?;
    Ok(out)
}
