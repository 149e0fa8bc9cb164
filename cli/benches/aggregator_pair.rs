//! Throughput of the leader–helper pair over real gRPC on loopback, beside the raw crypto bound
//! measured in the same run.
//!
//! `cargo bench -p hush-cli --bench aggregator_pair [-- N1 N2 ...]`
//!
//! * Raw bound: one thread does, per report, what the pair must do at minimum: both HPKE opens,
//!   both `verify_init`s, the combination of verifier shares and both `verify_next`s. Its rate
//!   is the single-threaded bound. It is measured before the first row and after each row, and
//!   a row is compared with the mean of the measurements just before and just after it, so a
//!   host whose speed drifts during the run (this one does, by tens of per cent) moves both
//!   sides of the ratio; the drift column says how far apart the two were.
//! * Pair: a helper and a leader run as real `hush aggregator` processes, on each store in turn:
//!   sled in a temp dir; PostgreSQL with one leader; PostgreSQL with two leader replicas (one
//!   submitter each). PostgreSQL is a private server started for the run (fsync on) on this
//!   machine, so it shares the two cores. Pre-built Histogram(32) reports go to the leader's
//!   ingest from two concurrent submitters in requests of 1,000 (`HUSH_BENCH_BATCH`: a shuffler
//!   forwards a batch to the leader in requests of `[forward] chunk_packets`, 1,000 unless set,
//!   and the leader takes up to `max_request_reports`, also 1,000); the clock runs
//!   from the first submission until no report is pending. Peak resident memory (VmHWM) of each
//!   process is read from /proc. `HUSH_BENCH_STORES=sled,pg,pg2` picks the stores;
//!   `HUSH_BENCH_CACHE_MB` sets both processes' sled page cache (`cache_mb`, 64 by default).
//!
//! The goal is pair ≥ 0.8 × the two-core bound (twice the single-threaded one) with peak memory
//! that does not grow with N. The CPU time each process used while the clock ran is printed per
//! report beside the raw crypto's (PostgreSQL's own server is not in it), and their quotient
//! (CPU): the share of the pair's CPU that is the crypto it cannot avoid (overstated for the
//! PostgreSQL rows, whose database server's CPU is not counted).
//!
//! `cargo test` runs this file too (`test = true` in cli/Cargo.toml): without the `--bench` flag
//! that `cargo bench` passes, it runs the same measurement path once on a tiny N and checks that
//! every report arrived, so the bench cannot rot.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hush_aggregator::store::throwaway::{ThrowawayPostgres, fresh_schema};
use hush_protocol::hpke::HpkeKeypair;
use hush_protocol::{
    Clock, Codec, Keyring, Measurement, MeasurementKind, Report, ReportId, Role, SystemClock,
    TaskConfig, Vdaf, VerifyKey,
};
use hush_tests::cluster::{client_task, provision, submit, wait_drained};
use hush_tests::process::{HushProcess, cpu_seconds_of, thread_cpu_seconds};
use hush_tests::task_params;
use rayon::prelude::*;

/// Sealed reports and the keys to open them, made once; [`Raw::rates`] times the work alone.
struct Raw {
    vdaf: Vdaf,
    key: VerifyKey,
    leader: Keyring,
    helper: Keyring,
    reports: Vec<Report>,
}

impl Raw {
    fn new(task: &TaskConfig, reports: usize) -> Self {
        let vdaf = Vdaf::new(task).unwrap();
        let leader = Keyring::new(vec![HpkeKeypair::generate(1)]);
        let helper = Keyring::new(vec![HpkeKeypair::generate(1)]);
        let now = SystemClock.now();
        let reports = (0..reports)
            .into_par_iter()
            .map(|i| {
                let id = ReportId::random();
                let s = vdaf.shard(&Measurement::Bucket(i % 32), &id).unwrap();
                Report::seal(
                    task.id(),
                    id,
                    now,
                    s,
                    leader.keys()[0].config(),
                    helper.keys()[0].config(),
                )
                .unwrap()
            })
            .collect();
        Self {
            vdaf,
            key: VerifyKey::random(),
            leader,
            helper,
            reports,
        }
    }

    /// Reports per second on one thread (the single-threaded bound) and on every core, and the
    /// CPU µs per report of the one thread (its CPU time, which a host taking the core away does
    /// not inflate).
    fn rates(&self) -> (f64, f64, f64) {
        let one = |r: &Report| {
            let ls = r.open_share(Role::Leader, &self.leader).unwrap();
            let hs = r.open_share(Role::Helper, &self.helper).unwrap();
            let (lst, lv) = self
                .vdaf
                .verify_init(
                    &self.key,
                    Role::Leader,
                    r.report_id(),
                    r.public_share(),
                    &ls,
                )
                .unwrap();
            let (hst, hv) = self
                .vdaf
                .verify_init(
                    &self.key,
                    Role::Helper,
                    r.report_id(),
                    r.public_share(),
                    &hs,
                )
                .unwrap();
            let msg = self.vdaf.verifier_message(&hst, &lv, &hv).unwrap();
            std::hint::black_box(self.vdaf.verify_finish(lst, &msg).unwrap());
            std::hint::black_box(self.vdaf.verify_finish(hst, &msg).unwrap());
        };
        let n = self.reports.len() as f64;
        let (start, cpu) = (Instant::now(), thread_cpu_seconds());
        self.reports.iter().for_each(one);
        let single = n / start.elapsed().as_secs_f64();
        let cpu_us = (thread_cpu_seconds() - cpu) * 1e6 / n;
        // The same on every core: what the machine gives at this moment (a busy host shows here).
        let start = Instant::now();
        self.reports.par_iter().for_each(one);
        let all = n / start.elapsed().as_secs_f64();
        (single, all, cpu_us)
    }
}

/// Where the aggregators keep their state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    Sled,
    /// PostgreSQL with this many leader replicas.
    Postgres(usize),
}

impl Store {
    fn name(self) -> String {
        match self {
            Store::Sled => "sled".into(),
            Store::Postgres(1) => "postgres".into(),
            Store::Postgres(n) => format!("postgres x{n}"),
        }
    }
}

fn config(dir: &Path, listen: SocketAddr, helper: Option<&str>, schema: Option<&str>) -> String {
    let cache_mb: u64 = std::env::var("HUSH_BENCH_CACHE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut t = format!(
        "listen = \"{listen}\"\ndata_dir = \"{}\"\ncache_mb = {cache_mb}\n",
        dir.join("data").display()
    );
    if let Some(s) = schema {
        t.push_str(&format!(
            "[store]\nkind = \"postgres\"\nschema = \"{s}\"\npool_size = 16\n"
        ));
    }
    if let Some(h) = helper {
        t.push_str(&format!(
            "[leader]\nhelper_url = \"{h}\"\nmax_pending_reports = 10000\n"
        ));
    }
    let p = dir.join("config.toml");
    std::fs::write(&p, t).unwrap();
    p.display().to_string()
}

struct PairRun {
    rate: f64,
    leader_mib: f64,
    helper_mib: f64,
    /// CPU time per report while the clock ran, in µs: the leaders, the helper, and this
    /// process's submitters.
    leader_us: f64,
    helper_us: f64,
    submit_us: f64,
}

async fn run_pair(task: &TaskConfig, n: usize, store: Store, pg_url: Option<&str>) -> PairRun {
    let bin = Path::new(env!("CARGO_BIN_EXE_hush"));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let hd = tempfile::tempdir().unwrap();
    let ld = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = pg_url
        .map(|u| ("HUSH_DATABASE_URL", u))
        .into_iter()
        .collect();
    let (leader_schema, helper_schema) = match store {
        Store::Sled => (None, None),
        Store::Postgres(_) => (Some(fresh_schema()), Some(fresh_schema())),
    };
    let args = |role: &str, c: String| {
        vec![
            "aggregator".into(),
            "--role".into(),
            role.into(),
            "--config".into(),
            c,
            // Loopback only: the bench measures aggregation, not TLS.
            "--insecure".into(),
        ]
    };
    let mut helper = HushProcess::spawn_with_env(
        bin,
        &args(
            "helper",
            config(hd.path(), any, None, helper_schema.as_deref()),
        ),
        &env,
        &hd.path().join("log"),
    );
    let replicas = match store {
        Store::Sled => 1,
        Store::Postgres(n) => n,
    };
    let mut leaders: Vec<HushProcess> = (0..replicas)
        .map(|i| {
            let dir = ld.path().join(format!("leader-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            HushProcess::spawn_with_env(
                bin,
                &args(
                    "leader",
                    config(&dir, any, Some(&helper.url()), leader_schema.as_deref()),
                ),
                &env,
                &dir.join("log"),
            )
        })
        .collect();
    let leader_urls: Vec<String> = leaders.iter().map(HushProcess::url).collect();
    // Provisioned at one replica: the others read it from the database.
    provision(&leader_urls[0], &helper.url(), task, &VerifyKey::random()).await;
    let leader = &leaders[0];
    let client = client_task(&leader.url(), &helper.url(), task).await;
    let now = SystemClock.now();
    let reports: Vec<Vec<u8>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let p = client
                .shard(&Measurement::Bucket(i % 32), ReportId::random())
                .unwrap();
            client.seal(p, now).unwrap().to_bytes()
        })
        .collect();

    let cpu = |leaders: &[HushProcess], helper: &HushProcess| {
        (
            leaders.iter().map(HushProcess::cpu_seconds).sum::<f64>(),
            helper.cpu_seconds(),
            cpu_seconds_of(std::process::id()),
        )
    };
    let cpu_before = cpu(&leaders, &helper);
    let start = Instant::now();
    let half = n / 2;
    let batch: usize = std::env::var("HUSH_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let (a, b) = (reports[..half].to_vec(), reports[half..].to_vec());
    // One submitter per replica when there are two.
    let (lu1, lu2) = (
        leader_urls[0].clone(),
        leader_urls[1 % leader_urls.len()].clone(),
    );
    let s1 = tokio::spawn(async move { submit(&lu1, &a, batch).await });
    let s2 = tokio::spawn(async move { submit(&lu2, &b, batch).await });
    let accepted = s1.await.unwrap().accepted + s2.await.unwrap().accepted;
    assert_eq!(accepted as usize, n);
    let stats = wait_drained(&leader.url(), task, Duration::from_secs(3_600)).await;
    let elapsed = start.elapsed();
    let cpu_after = cpu(&leaders, &helper);
    assert_eq!(stats.reports_aggregated as usize, n);
    let per_report = |a: f64, b: f64| (a - b) * 1e6 / n as f64;
    let run = PairRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        leader_us: per_report(cpu_after.0, cpu_before.0),
        helper_us: per_report(cpu_after.1, cpu_before.1),
        submit_us: per_report(cpu_after.2, cpu_before.2),
        leader_mib: leaders
            .iter()
            .map(HushProcess::peak_rss_mib)
            .fold(0.0, f64::max),
        helper_mib: helper.peak_rss_mib(),
    };
    for l in &mut leaders {
        l.terminate();
    }
    helper.terminate();
    run
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect::<Vec<_>>();
    let sizes = match (bench, sizes.is_empty()) {
        (true, true) => vec![10_000, 40_000],
        (true, false) => sizes,
        // Under `cargo test`: the measurement path on a tiny N.
        (false, _) => vec![200],
    };
    let raw_n = if bench { 2_000 } else { 50 };
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stores: Vec<Store> = std::env::var("HUSH_BENCH_STORES")
        .unwrap_or_else(|_| "sled,pg,pg2".into())
        .split(',')
        .map(|s| match s.trim() {
            "sled" => Store::Sled,
            "pg" => Store::Postgres(1),
            "pg2" => Store::Postgres(2),
            other => panic!("HUSH_BENCH_STORES: {other:?} is not sled, pg or pg2"),
        })
        .collect();
    // Measurements on a durable server of their own; `cargo test` uses the tests' shared one.
    let own_pg = (bench && stores.iter().any(|s| *s != Store::Sled))
        .then(|| ThrowawayPostgres::start(true).expect("a PostgreSQL server for the bench"));
    let pg_url: Option<String> = stores.iter().any(|s| *s != Store::Sled).then(|| {
        own_pg
            .as_ref()
            .map_or_else(|| ThrowawayPostgres::shared().url(), |p| p.url())
            .to_owned()
    });

    let raw = Raw::new(&task, raw_n);
    let mut before = raw.rates();
    let (bound, all, cpu_us) = before;
    println!(
        "raw single-threaded bound (2 opens + 2 verify_init + combine + 2 verify_next): {bound:.0} reports/s"
    );
    println!(
        "the same on all cores: {all:.0} reports/s ({:.2}x one)",
        all / bound
    );
    println!("raw crypto {cpu_us:.1} µs of CPU per report");
    println!(
        "each row against the single-threaded bound measured just before and just after it (their mean; \
         drift = how far apart they were); CPU = raw CPU µs per report / the CPU µs per report of leader, helper and submitters"
    );
    println!(
        "{:<12} {:>8} {:>11} {:>9} {:>7} {:>9} {:>9} {:>5} {:>12} {:>12} {:>28}",
        "store",
        "reports",
        "pair rep/s",
        "bound/s",
        "drift",
        "vs bound",
        "vs 2-core",
        "CPU",
        "leader peak",
        "helper peak",
        "CPU µs/report: lead+help+sub"
    );
    for n in sizes {
        for store in &stores {
            let r = rt.block_on(run_pair(&task, n, *store, pg_url.as_deref()));
            let after = raw.rates();
            let bound = (before.0 + after.0) / 2.0;
            let cpu = r.leader_us + r.helper_us + r.submit_us;
            println!(
                "{:<12} {n:>8} {:>11.0} {:>9.0} {:>6.0}% {:>8.2}x {:>9.2} {:>5.2} {:>8.1} MiB {:>8.1} MiB {:>10.0} = {:.0}+{:.0}+{:.0}",
                store.name(),
                r.rate,
                bound,
                (before.0 - after.0).abs() / bound * 100.0,
                r.rate / bound,
                r.rate / (2.0 * bound),
                (before.2 + after.2) / 2.0 / cpu,
                r.leader_mib,
                r.helper_mib,
                cpu,
                r.leader_us,
                r.helper_us,
                r.submit_us
            );
            before = after;
        }
    }
    // The machine at the end, on every core too, to show whether it gave two cores throughout.
    println!(
        "raw bound after the runs: {:.0} reports/s, {:.0} on all cores",
        before.0, before.1
    );
}
