//! `hush load` and `hush chaos`: the cluster as real processes (two shufflers, leader, helper,
//! every link mutual TLS) driven at a fixed report rate; chaos also SIGKILLs random components
//! and restarts them. Both end with an exactly-once check: every report the first shuffler
//! acknowledged is aggregated by the leader and the helper exactly once.
//!
//! Not part of CI: long runs are manual commands; a short run of each is a process test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hush_aggregator::client as agg_client;
use hush_client::{ClientTask, KeySet};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{Clock, HpkeKeypair, MeasurementKind, SystemClock, TaskConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::cluster::TaskSpec;

const ADMIN_TOKEN: &str = "load-admin-token-0123456789";
const PEER_TOKEN: &str = "load-peer-token-0123456789";
const COMPONENTS: [&str; 4] = ["helper", "leader", "shuffler-b", "shuffler-a"];

/// Drive the cluster at a fixed rate.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Reports per second sent to the first shuffler.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// How long to send, e.g. `120s` or `3m`.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent senders (each a service instance with its own connection and requests).
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Where the processes keep their sled databases, certificates and logs (default: a
    /// temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the measurements (and of the chaos schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The aggregators' store: sled (in the data directory), or PostgreSQL (a private server
    /// started for the run in the data directory, fsync on, on this machine).
    #[arg(long, value_enum, default_value_t = LoadStore::Sled)]
    store: LoadStore,
    /// Leader processes on the one PostgreSQL database (`--store postgres`). shuffler-b
    /// forwards to the first; all of them take aggregation jobs.
    #[arg(long, default_value_t = 1)]
    leader_replicas: usize,
}

/// The aggregators' store in a load run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadStore {
    /// Embedded sled.
    Sled,
    /// A PostgreSQL server shared by the replicas.
    Postgres,
}

/// The same load, with components SIGKILLed and restarted while it runs.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Mean time between kills (each ±50% at random).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    kill_every: Duration,
    /// How long a killed component stays down before it restarts on its port and data.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    down: Duration,
    /// Components that may be killed (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = COMPONENTS.map(String::from))]
    targets: Vec<String>,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 90s, 2m, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1_000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// One `hush` server process, restartable on the same config.
struct Proc {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
    peak_rss_kb: u64,
    kills: u32,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .env("HUSH_ADMIN_TOKEN", ADMIN_TOKEN)
            // An inherited role variable would take the admin token's place.
            .env_remove("HUSH_LEADER_ADMIN_TOKEN")
            .env_remove("HUSH_HELPER_ADMIN_TOKEN")
            .env_remove("HUSH_SHUFFLER_ADMIN_TOKEN")
            .env("HUSH_PEER_TOKEN", PEER_TOKEN)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening on ") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60)).with_context(|| {
            format!(
                "{} did not start listening; see {}",
                self.name,
                self.log.display()
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
            self.kills += 1;
        }
    }

    fn sample_memory(&mut self) {
        let Some(c) = &self.child else { return };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", c.id())) else {
            return;
        };
        for key in ["VmHWM:", "VmRSS:"] {
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                self.peak_rss_kb = self.peak_rss_kb.max(kb);
            }
        }
    }

    fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let mut c = c;
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The cluster: configs with fixed ports (so a restarted process is found where it was).
struct Cluster {
    procs: Vec<Proc>,
    urls: BTreeMap<&'static str, String>,
    tools: ClientTlsConfig,
    /// The PostgreSQL server of a `--store postgres` run, stopped when the run ends.
    _postgres: Option<hush_aggregator::store::throwaway::ThrowawayPostgres>,
}

/// Names of the extra leader replicas.
const REPLICAS: [&str; 3] = ["leader-2", "leader-3", "leader-4"];

/// Writes certificates and configs under `dir` and starts the servers.
fn start_cluster(dir: &Path, store: LoadStore, leader_replicas: usize) -> anyhow::Result<Cluster> {
    use hush_aggregator::store::throwaway::{ThrowawayPostgres, fresh_schema};
    let postgres = match store {
        LoadStore::Sled => None,
        LoadStore::Postgres => Some(
            ThrowawayPostgres::start(true)
                .map_err(|e| anyhow::anyhow!("starting PostgreSQL for --store postgres: {e}"))?,
        ),
    };
    let env: Vec<(&'static str, String)> = postgres
        .iter()
        .map(|p| ("HUSH_DATABASE_URL", p.url().to_owned()))
        .collect();
    let store_section = |schema: String| match store {
        LoadStore::Sled => String::new(),
        LoadStore::Postgres => {
            format!("[store]\nkind = \"postgres\"\nschema = \"{schema}\"\npool_size = 16\n")
        }
    };
    let (leader_store, helper_store) =
        (store_section(fresh_schema()), store_section(fresh_schema()));
    let (sections, ca_pem) = crate::certs::dev_tls_sections(&dir.join("certs"), "hush load CA")?;
    let tls = |name: &str| -> anyhow::Result<&String> {
        sections
            .get(name)
            .context("a component without a certificate")
    };
    let mut ports = BTreeMap::new();
    for c in COMPONENTS {
        ports.insert(c, free_port()?);
    }
    let replicas = &REPLICAS[..leader_replicas.saturating_sub(1)];
    for r in replicas {
        ports.insert(*r, free_port()?);
    }
    let url = |c: &str| format!("https://127.0.0.1:{}", ports[c]);
    let data = |c: &str| dir.join(c).display().to_string();
    let mut configs: BTreeMap<&'static str, String> = BTreeMap::new();
    configs.insert(
        "helper",
        format!(
            "listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\ncache_mb = 64\n{helper_store}\
             [peers]\nleader = [\"leader\"]\nkey_directories = [\"operator\"]\n{}",
            ports["helper"],
            data("helper"),
            tls("helper")?
        ),
    );
    for name in std::iter::once("leader").chain(replicas.iter().copied()) {
        configs.insert(
            name,
            format!(
                "listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\ncache_mb = 64\n{leader_store}\
                 [peers]\nshufflers = [\"shuffler-b\"]\ncollectors = [\"collector\"]\nkey_directories = [\"operator\"]\n\
                 [leader]\nhelper_url = \"{}\"\njob_poll_interval_ms = 50\n\
                 retry_initial_ms = 100\nretry_max_ms = 2000\nmax_pending_reports = 200000\n\
                 tenant_max_pending = 200000\n{}",
                ports[name],
                data(name),
                url("helper"),
                // Every replica presents the leader's certificate.
                tls("leader")?
            ),
        );
    }
    for (name, from, next, kind) in [
        ("shuffler-b", "shufflers", "leader", "leader"),
        ("shuffler-a", "clients", "shuffler-b", "shuffler"),
    ] {
        configs.insert(
            name,
            format!(
                "name = \"{name}\"\nlisten = \"127.0.0.1:{}\"\ndata_dir = {:?}\ncache_mb = 64\n\
                 ingest_from = \"{from}\"\n\
                 [peers]\nprevious = [\"shuffler-a\"]\nkey_directories = [\"operator\"]\n\
                 [mix]\nbatch_size = 1000\nmin_batch_size = 1\n\
                 max_wait_ms = 200\n[forward]\nretry_initial_ms = 100\nretry_max_ms = 2000\n\
                 [limits]\nmax_buffered_packets = 200000\nper_tenant_max_buffered = 200000\n\
                 [[next_hop]]\nname = \"{next}\"\nkind = \"{kind}\"\nurl = \"{}\"\n{}",
                ports[name],
                data(name),
                url(next),
                tls(name)?
            ),
        );
    }
    let mut procs = Vec::new();
    for c in COMPONENTS.iter().chain(replicas).copied() {
        let path = dir.join(format!("{c}.toml"));
        std::fs::write(&path, &configs[c])?;
        let path = path.display().to_string();
        let role = if c.starts_with("leader") { "leader" } else { c };
        let args: Vec<String> = match role {
            "helper" | "leader" => ["aggregator", "--role", role, "--config", &path]
                .map(String::from)
                .to_vec(),
            _ => ["shuffler", "--config", &path].map(String::from).to_vec(),
        };
        let mut p = Proc {
            name: c,
            args,
            env: env.clone(),
            log: dir.join(format!("{c}.log")),
            child: None,
            peak_rss_kb: 0,
            kills: 0,
        };
        p.start()?;
        procs.push(p);
    }
    Ok(Cluster {
        procs,
        urls: COMPONENTS.iter().map(|c| (*c, url(c))).collect(),
        // The operator's tools present the operator certificate (the parties serve HPKE
        // configs to certificate holders only).
        tools: hush_server::tls::TlsMaterial::from_pem(
            std::fs::read(dir.join("certs/operator.pem"))?,
            std::fs::read(dir.join("certs/operator-key.pem"))?,
            ca_pem.clone(),
        )?
        .client(),
        _postgres: postgres,
    })
}

impl Cluster {
    /// The parties' current HPKE configs as one key set, fetched with the operator's
    /// certificate the way a key directory fetches them.
    async fn key_set(&self) -> anyhow::Result<KeySet> {
        let first = |c: &'static str| {
            let url = self.urls[c].clone();
            let tls = self.tools.clone();
            async move {
                agg_client::hpke_configs(&url, Some(&tls))
                    .await?
                    .into_iter()
                    .next()
                    .with_context(|| format!("{c} publishes no HPKE config"))
            }
        };
        Ok(KeySet {
            epoch: 0,
            epoch_start: hush_protocol::Time::from_secs(0),
            epoch_s: 86_400,
            shufflers: vec![
                ("shuffler-a".into(), first("shuffler-a").await?),
                ("shuffler-b".into(), first("shuffler-b").await?),
            ],
            leader: ("leader".into(), first("leader").await?),
            helper: first("helper").await?,
        })
    }

    async fn provision(&self, task: &TaskConfig) -> anyhow::Result<()> {
        crate::cluster::provision(
            (&self.urls["leader"], &self.urls["helper"]),
            &[&self.urls["shuffler-a"], &self.urls["shuffler-b"]],
            &self.tools,
            ADMIN_TOKEN,
            task,
        )
        .await
    }

    /// The task's counters at `component`; `None` while it is down.
    async fn stats(&self, component: &str, task: &TaskConfig) -> Option<pb::TaskStats> {
        let mut admin =
            agg_client::admin(&self.urls[component], ADMIN_TOKEN, Some(&self.tools)).ok()?;
        admin
            .get_task_stats(pb::GetTaskStatsRequest {
                task_id: task.id().as_bytes().to_vec().into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }
}

/// What the senders saw.
#[derive(Default)]
struct Sent {
    /// Reports the first shuffler acknowledged (accepted, or refused as a replay of a request
    /// retried after its answer was lost).
    acknowledged: AtomicU64,
    /// Reports refused for another reason (none expected).
    refused: AtomicU64,
    /// Requests that failed and were retried.
    retries: AtomicU64,
    /// Time from a request's first attempt to its acknowledgement (retries included), in
    /// microseconds.
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

/// One sender: every tick it seals its share of the rate and submits it until acknowledged.
#[allow(clippy::too_many_arguments)]
async fn sender(
    client: Arc<ClientTask>,
    channel: Channel,
    per_tick: u64,
    tick: Duration,
    until: Instant,
    seed: u64,
    sent: Arc<Sent>,
    stop: Arc<AtomicBool>,
) {
    let mut shuffler = ShufflerClient::new(channel);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next = tokio::time::Instant::now();
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        next += tick;
        let latencies: Vec<u64> = (0..per_tick)
            .map(|_| (rng.random::<f64>() * 300.0) as u64 + 1)
            .collect();
        let c = client.clone();
        let Ok(packets) = tokio::task::spawn_blocking(move || {
            let now = SystemClock.now();
            latencies
                .iter()
                .filter_map(|ms| {
                    let m = c.latency_event(Duration::from_millis(*ms)).ok()?;
                    c.packet(&m, now).ok()
                })
                .collect::<Vec<pb::Packet>>()
        })
        .await
        else {
            continue;
        };
        let n = packets.len() as u64;
        let req = pb::SubmitPacketsRequest { packets };
        let mut first = true;
        // From the first attempt to the acknowledgement, retries included.
        let started = Instant::now();
        loop {
            match shuffler.submit_packets(req.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let replays: u64 = r
                        .rejected
                        .iter()
                        .filter(|rc| rc.reason == pb::RejectReason::Replay as i32)
                        .map(|rc| rc.count)
                        .sum();
                    let other: u64 = r.rejected.iter().map(|rc| rc.count).sum::<u64>() - replays;
                    // A replay on a retry means the first attempt was stored.
                    let acked = r.accepted + if first { 0 } else { replays };
                    sent.acknowledged.fetch_add(acked, Ordering::Relaxed);
                    sent.refused
                        .fetch_add(other + if first { replays } else { 0 }, Ordering::Relaxed);
                    sent.latencies_us
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(started.elapsed().as_micros() as u64);
                    debug_assert_eq!(acked + other + if first { replays } else { 0 }, n);
                    break;
                }
                Err(_) => {
                    first = false;
                    sent.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tokio::time::sleep_until(next).await;
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1_000.0
}

/// `hush load`: steady traffic through the in-process cluster at a target rate.
pub async fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    run(args, None).await
}

/// `hush chaos`: the load run while components are killed and restarted.
pub async fn run_chaos(args: ChaosArgs) -> anyhow::Result<()> {
    for t in &args.targets {
        if !COMPONENTS.contains(&t.as_str()) {
            bail!("--targets: {t:?} is not one of {COMPONENTS:?}");
        }
    }
    run(args.load.clone(), Some(args)).await
}

async fn run(args: LoadArgs, chaos: Option<ChaosArgs>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate > 0 && args.agents > 0,
        "--rate and --agents must be positive"
    );
    anyhow::ensure!(
        (1..=REPLICAS.len() + 1).contains(&args.leader_replicas)
            && (args.leader_replicas == 1 || args.store == LoadStore::Postgres),
        "--leader-replicas must be 1 to {}, and above 1 only with --store postgres (sled allows one process per database)",
        REPLICAS.len() + 1
    );
    let (dir, _tmp) = crate::cluster::data_dir(args.data_dir.as_deref())?;
    let mode = if chaos.is_some() { "chaos" } else { "load" };
    println!(
        "hush {mode}: shuffler-a, shuffler-b, leader, helper as processes on 127.0.0.1 (mutual TLS); data in {}",
        dir.display()
    );
    let mut cluster = start_cluster(&dir, args.store, args.leader_replicas)?;
    if args.store == LoadStore::Postgres {
        println!(
            "  aggregators on PostgreSQL (a private server started for the run, fsync on), {} leader process(es); shuffler-b forwards to the first",
            args.leader_replicas
        );
    }
    let collector = HpkeKeypair::generate(1);
    let task = TaskSpec {
        name: "load latency",
        kind: MeasurementKind::EventHistogram,
        bounds_us: log_spaced_bounds(2_000, 4_000_000, 20),
        bound: 1_000_000,
        window_s: 60,
        min_batch_size: 10,
        epsilon: 1.0,
        budget: 1_000.0,
        count_epsilon_percent: 10,
    }
    .build(&collector)?;
    cluster.provision(&task).await?;
    // The harness plays the tenant's key directory: one key set for every sender.
    let keys = cluster.key_set().await?;
    let client = Arc::new(ClientTask::new(
        task.clone(),
        keys.leader.1.clone(),
        keys.helper.clone(),
        keys.route()?,
    )?);

    // Senders: `agents` connections, each with its share of the rate, 10 requests a second.
    let tick = Duration::from_millis(100);
    let per_tick_total = (args.rate as f64 * tick.as_secs_f64()).round().max(1.0) as u64;
    let sent = Arc::new(Sent::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let until = started + args.duration;
    let mut senders = Vec::new();
    for i in 0..args.agents {
        let share = per_tick_total / args.agents as u64
            + u64::from((i as u64) < per_tick_total % args.agents as u64);
        if share == 0 {
            continue;
        }
        let channel = agg_client::channel(&cluster.urls["shuffler-a"], Some(&cluster.tools))?;
        senders.push(tokio::spawn(sender(
            client.clone(),
            channel,
            share,
            tick,
            until,
            args.seed.wrapping_add(i as u64),
            sent.clone(),
            stop.clone(),
        )));
    }

    // The chaos schedule, the progress bar and memory sampling run here.
    let bar = ProgressBar::new(args.duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0xc4a05);
    let next_kill = |rng: &mut StdRng, every: Duration| {
        Instant::now() + every.mul_f64(0.5 + rng.random::<f64>())
    };
    let mut kill_at = chaos.as_ref().map(|c| next_kill(&mut rng, c.kill_every));
    let mut down: Option<(usize, Instant)> = None;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for p in &mut cluster.procs {
            p.sample_memory();
        }
        if let Some(c) = &chaos {
            if let Some((i, back_at)) = down
                && Instant::now() >= back_at
            {
                cluster.procs[i].start()?;
                down = None;
                kill_at = Some(next_kill(&mut rng, c.kill_every));
            }
            if down.is_none()
                && kill_at.is_some_and(|t| Instant::now() >= t)
                && Instant::now() + c.down < until
            {
                let target = &c.targets[rng.random_range(0..c.targets.len())];
                let i = cluster
                    .procs
                    .iter()
                    .position(|p| p.name == target.as_str())
                    .context("target")?;
                cluster.procs[i].kill();
                bar.suspend(|| {
                    println!(
                        "  {:>5.1} s: SIGKILL {target}, back in {:?}",
                        started.elapsed().as_secs_f64(),
                        c.down
                    )
                });
                down = Some((i, Instant::now() + c.down));
            }
        }
        bar.set_position(started.elapsed().as_secs().min(args.duration.as_secs()));
        bar.set_message(format!(
            "{} acknowledged, {} retries",
            sent.acknowledged.load(Ordering::Relaxed),
            sent.retries.load(Ordering::Relaxed)
        ));
    }
    if let Some((i, _)) = down.take() {
        cluster.procs[i].start()?;
    }
    for s in senders {
        // Senders finish the request in flight, retrying until it is acknowledged.
        let _ = s.await;
    }
    stop.store(true, Ordering::Relaxed);
    let send_time = started.elapsed();
    bar.finish_and_clear();

    // Drain: everything acknowledged must reach the leader and be aggregated.
    let acknowledged = sent.acknowledged.load(Ordering::Relaxed);
    let drain_started = Instant::now();
    let mut last = None;
    let leader = loop {
        for p in &mut cluster.procs {
            p.sample_memory();
        }
        let l = cluster.stats("leader", &task).await;
        let a = cluster.stats("shuffler-a", &task).await;
        let b = cluster.stats("shuffler-b", &task).await;
        if let (Some(l), Some(a), Some(b)) = (&l, &a, &b)
            && a.reports_pending == 0
            && b.reports_pending == 0
            && l.reports_pending == 0
            && l.reports_aggregated >= acknowledged
        {
            break l.clone();
        }
        if drain_started.elapsed() > Duration::from_secs(300) {
            let l = l.or(last).unwrap_or_default();
            break l;
        }
        last = l;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let helper = cluster.stats("helper", &task).await.unwrap_or_default();
    let drained_in = drain_started.elapsed();
    let aggregated = leader.reports_aggregated;
    for p in &mut cluster.procs {
        p.sample_memory();
        p.stop();
    }

    let mut lat = sent
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    lat.sort_unstable();
    let refused = sent.refused.load(Ordering::Relaxed);
    println!();
    println!(
        "summary ({mode}, {} s of sending at {} reports/s target, {} agents):",
        send_time.as_secs(),
        args.rate,
        args.agents
    );
    println!(
        "  throughput: {:.0} reports/s acknowledged by the first shuffler; {:.0} reports/s aggregated end to end (including {:.1} s to drain)",
        acknowledged as f64 / send_time.as_secs_f64(),
        aggregated as f64 / (send_time + drained_in).as_secs_f64(),
        drained_in.as_secs_f64()
    );
    println!(
        "  upload latency (a request of ~{} reports to shuffler-a, first attempt to acknowledgement): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} requests; {} attempts retried",
        (per_tick_total / args.agents as u64).max(1),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        lat.len(),
        sent.retries.load(Ordering::Relaxed)
    );
    println!("  peak memory (RSS high-water mark of any incarnation):");
    for p in &cluster.procs {
        println!(
            "    {:<11} {:>7.1} MiB{}",
            p.name,
            p.peak_rss_kb as f64 / 1024.0,
            if p.kills > 0 {
                format!("  ({} SIGKILLs)", p.kills)
            } else {
                String::new()
            }
        );
    }
    let lost = acknowledged.saturating_sub(aggregated);
    let extra = aggregated.saturating_sub(acknowledged);
    println!(
        "  reports: {acknowledged} acknowledged, {refused} refused, {aggregated} aggregated by the leader, {} by the helper; lost {lost}, counted twice {extra}",
        helper.reports_aggregated
    );
    if lost > 0 || extra > 0 || helper.reports_aggregated != aggregated || refused > 0 {
        bail!(
            "exactly-once violated: {lost} lost, {extra} extra, helper {} vs leader {aggregated}, {refused} refused (logs in {})",
            helper.reports_aggregated,
            dir.display()
        );
    }
    println!("  every acknowledged report was aggregated exactly once");
    Ok(())
}
