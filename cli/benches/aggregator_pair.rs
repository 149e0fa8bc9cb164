//! Throughput of the leader–helper pair over real gRPC on loopback, beside the raw crypto bound
//! measured in the same run.
//!
//! `cargo bench -p hush-cli --bench aggregator_pair [-- N1 N2 ...]`
//!
//! * Raw bound: one thread does, per report, what the pair must do at minimum: both HPKE opens,
//!   both `verify_init`s, the combination of verifier shares and both `verify_next`s. Its rate
//!   is the single-threaded bound.
//! * Pair: a helper and a leader run as real `hush aggregator` processes with sled in a temp dir.
//!   Pre-built Histogram(32) reports go to the leader's ingest from two concurrent submitters in
//!   batches of 250 (`HUSH_BENCH_BATCH`); the clock runs from the first submission until no report is pending.
//!   Peak resident memory (VmHWM) of each process is read from /proc.
//!
//! The goal is pair / bound ≥ 0.8 with peak memory that does not grow with N.
//!
//! `cargo test` runs this file too (`test = true` in cli/Cargo.toml): without the `--bench` flag
//! that `cargo bench` passes, it runs the same measurement path once on a tiny N and checks that
//! every report arrived, so the bench cannot rot.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hush_protocol::hpke::HpkeKeypair;
use hush_protocol::{
    Clock, Codec, Keyring, Measurement, MeasurementKind, Report, ReportId, Role, SystemClock,
    TaskConfig, Vdaf, VerifyKey,
};
use hush_tests::cluster::{client_task, provision, submit, wait_drained};
use hush_tests::process::HushProcess;
use hush_tests::task_params;
use rayon::prelude::*;

fn raw_bound(task: &TaskConfig, reports: usize) -> f64 {
    let vdaf = Vdaf::new(task).unwrap();
    let key = VerifyKey::random();
    let leader = Keyring::new(vec![HpkeKeypair::generate(1)]);
    let helper = Keyring::new(vec![HpkeKeypair::generate(1)]);
    let now = SystemClock.now();
    let rs: Vec<Report> = (0..reports)
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
    let start = Instant::now();
    for r in &rs {
        let ls = r.open_share(Role::Leader, &leader).unwrap();
        let hs = r.open_share(Role::Helper, &helper).unwrap();
        let (lst, lv) = vdaf
            .verify_init(&key, Role::Leader, r.report_id(), r.public_share(), &ls)
            .unwrap();
        let (hst, hv) = vdaf
            .verify_init(&key, Role::Helper, r.report_id(), r.public_share(), &hs)
            .unwrap();
        let msg = vdaf.verifier_message(&hst, &lv, &hv).unwrap();
        std::hint::black_box(vdaf.verify_finish(lst, &msg).unwrap());
        std::hint::black_box(vdaf.verify_finish(hst, &msg).unwrap());
    }
    reports as f64 / start.elapsed().as_secs_f64()
}

fn config(dir: &Path, listen: SocketAddr, helper: Option<&str>) -> String {
    let mut t = format!(
        "listen = \"{listen}\"\ndata_dir = \"{}\"\ncache_mb = 8\n",
        dir.join("data").display()
    );
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
}

async fn run_pair(task: &TaskConfig, n: usize) -> PairRun {
    let bin = Path::new(env!("CARGO_BIN_EXE_hush"));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let hd = tempfile::tempdir().unwrap();
    let ld = tempfile::tempdir().unwrap();
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
    let mut helper = HushProcess::spawn(
        bin,
        &args("helper", config(hd.path(), any, None)),
        &hd.path().join("log"),
    );
    let mut leader = HushProcess::spawn(
        bin,
        &args("leader", config(ld.path(), any, Some(&helper.url()))),
        &ld.path().join("log"),
    );
    provision(&leader.url(), &helper.url(), task, &VerifyKey::random()).await;
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

    let start = Instant::now();
    let half = n / 2;
    let batch: usize = std::env::var("HUSH_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let (a, b) = (reports[..half].to_vec(), reports[half..].to_vec());
    let (lu1, lu2) = (leader.url(), leader.url());
    let s1 = tokio::spawn(async move { submit(&lu1, &a, batch).await });
    let s2 = tokio::spawn(async move { submit(&lu2, &b, batch).await });
    let accepted = s1.await.unwrap().accepted + s2.await.unwrap().accepted;
    assert_eq!(accepted as usize, n);
    let stats = wait_drained(&leader.url(), task, Duration::from_secs(3_600)).await;
    let elapsed = start.elapsed();
    assert_eq!(stats.reports_aggregated as usize, n);
    let run = PairRun {
        rate: n as f64 / elapsed.as_secs_f64(),
        leader_mib: leader.peak_rss_mib(),
        helper_mib: helper.peak_rss_mib(),
    };
    leader.terminate();
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

    let bound = raw_bound(&task, raw_n);
    println!(
        "raw single-threaded bound (2 opens + 2 verify_init + combine + 2 verify_next): {bound:.0} reports/s"
    );
    println!(
        "{:>8} {:>12} {:>10} {:>14} {:>14}",
        "reports", "pair rep/s", "vs bound", "leader peak", "helper peak"
    );
    for n in sizes {
        let r = rt.block_on(run_pair(&task, n));
        println!(
            "{n:>8} {:>12.0} {:>9.2}x {:>11.1} MiB {:>11.1} MiB",
            r.rate,
            r.rate / bound,
            r.leader_mib,
            r.helper_mib
        );
    }
    // The bound again, to show the machine's speed did not drift during the run.
    println!(
        "raw bound after the runs: {:.0} reports/s",
        raw_bound(&task, raw_n)
    );
}
