//! `hush demo --serve`: after the simulated windows the cluster stays up on real time, so a
//! browser can watch the results dashboard and a real service (client/examples/axum-service)
//! can report into it with the client configuration the demo writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hush_client::{ClientConfig, CounterMetric, HushClient, LatencyMetric, TaskSource};
use hush_protocol::{Clock, MockClock, SystemClock, TaskConfig, Time};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{DemoArgs, Service, latency};
use crate::cluster::Cluster;

/// The read token of the demo's results service (the dashboard's link carries it).
pub(crate) const READ_TOKEN: &str = crate::cluster::READ_TOKEN;

/// A file name for a task: `task-checkout-latency.toml` for "checkout latency".
fn task_file_name(t: &TaskConfig) -> String {
    let slug: String = t
        .name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("task-{slug}.toml")
}

/// The route an outside service maps to each demo service's latency task.
fn route_of(service: &str) -> &'static str {
    match service {
        "checkout" => "POST /pay",
        "search" => "GET /search",
        _ => "GET /login",
    }
}

/// Writes what a service needs to report into the demo to `dir`: the CA (`ca.pem`), every task
/// file, and `client.toml` ([`ClientConfig`]: the first shuffler, the key directory, the CA and
/// one metric per task, paths relative to `dir`). Returns the config's path.
pub(crate) fn write_client_dir(
    dir: &Path,
    cluster: &Cluster,
    services: &[Service],
    errors: &TaskConfig,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca.pem"), &cluster.ca_pem)?;
    let write_task = |t: &TaskConfig| -> anyhow::Result<PathBuf> {
        let name = task_file_name(t);
        std::fs::write(dir.join(&name), toml::to_string(&t.params())?)?;
        Ok(PathBuf::from(name))
    };
    let endpoints = cluster.endpoints();
    let hush_client::KeySource::Directory(key_directory) = endpoints.keys else {
        anyhow::bail!("the demo's clients use the key directory");
    };
    let mut latency = Vec::new();
    for s in services {
        latency.push(LatencyMetric {
            service: s.name.to_owned(),
            operation: route_of(s.name).to_owned(),
            source: TaskSource {
                task: None,
                task_file: Some(write_task(&s.task)?),
            },
        });
    }
    let config = ClientConfig {
        shuffler_url: endpoints.shuffler_url,
        key_directory,
        tls_ca: Some("ca.pem".into()),
        latency,
        counter: vec![CounterMetric {
            name: "errors".into(),
            source: TaskSource {
                task: None,
                task_file: Some(write_task(errors)?),
            },
        }],
        runtime: Default::default(),
        base_dir: None,
    };
    let path = dir.join("client.toml");
    let text = format!(
        "# Written by `hush demo --serve`: a service reports into the demo with this file\n\
         # (hush_client::ClientConfig::from_file). The demo's tasks, CA and ports change with\n\
         # every run.\n{}",
        toml::to_string(&config)?
    );
    std::fs::write(&path, text)?;
    // What a service reads must parse back into what was written.
    ClientConfig::from_file(&path)?.check()?;
    Ok(path)
}

/// Keeps the cluster's clock on real time (it only moves forward) until dropped.
pub(crate) fn follow_real_time(mock: Arc<MockClock>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let now = SystemClock.now();
            if now > mock.now() {
                mock.set(now);
            }
        }
    })
}

/// The simulated instances keep serving on real time: every second each records its share of
/// `requests` per window (and errors at 1%), with the same regression as the simulated windows
/// (`start` is the first simulated window's start).
pub(crate) fn keep_serving(
    args: &DemoArgs,
    start: Time,
    clock: Arc<dyn Clock>,
    services: Arc<Vec<Service>>,
    agents: Vec<(usize, HushClient)>,
    errors_recorded: Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let (requests, window_s, regression, seed) = (
        args.requests,
        args.window_secs,
        args.regression_window,
        args.seed,
    );
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5e7e);
        // 70% of the per-window bound on average, so that an instance seldom reaches the bound
        // and has its last requests dropped.
        let per_second = 0.7 * requests as f64 / window_s as f64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // A late tick is not made up with a burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let w = clock.now().as_secs().saturating_sub(start.as_secs()) / window_s;
            for (si, c) in &agents {
                let s = &services[*si];
                let slow = if s.name == "search" && w >= regression {
                    1.6
                } else {
                    1.0
                };
                let n =
                    per_second.floor() as u64 + u64::from(rng.random::<f64>() < per_second.fract());
                let l = c.latency(s.name, "request");
                let mut errs = 0;
                for _ in 0..n {
                    l.record(latency(&mut rng, s.median_ms * slow));
                    if rng.random::<f64>() < 0.01 {
                        errs += 1;
                    }
                }
                if errs > 0 {
                    c.counter("errors").add(errs);
                    errors_recorded.fetch_add(errs, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    })
}
