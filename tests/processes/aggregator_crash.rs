//! SIGKILL the leader or the helper while aggregation jobs run, restart it on the same data
//! directory: every accepted report is aggregated exactly once.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hush_aggregator::AggregatorConfig;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{
    Clock, Codec, HpkeKeypair, Measurement, MeasurementKind, ReportId, SystemClock, TaskConfig,
    VerifyKey,
};
use hush_tests::cluster::{Stored, client_task, provision, stats, submit, wait_drained};
use hush_tests::process::HushProcess;
use hush_tests::task_params;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::hush_bin;

/// Writes a config with slow, small jobs so a kill lands while jobs are in flight.
fn write_config(dir: &Path, listen: SocketAddr, helper_url: Option<&str>) -> String {
    let mut text = format!(
        "listen = \"{listen}\"\ndata_dir = \"{}\"\ncache_mb = 32\n",
        dir.join("data").display()
    );
    if let Some(u) = helper_url {
        text.push_str(&format!(
            "[leader]\nhelper_url = \"{u}\"\njob_size = 25\nmax_concurrent_jobs = 1\njob_poll_interval_ms = 20\n\
             retry_initial_ms = 50\nretry_max_ms = 500\nhelper_timeout_ms = 5000\n"
        ));
    }
    AggregatorConfig::from_toml(&text).expect("valid config");
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

use hush_tests::process::aggregator_args as args;

struct Cluster {
    leader: HushProcess,
    helper: HushProcess,
    leader_dir: tempfile::TempDir,
    helper_dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let helper_dir = tempfile::tempdir().unwrap();
        let leader_dir = tempfile::tempdir().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let hc = write_config(helper_dir.path(), any, None);
        let mut helper = HushProcess::spawn(
            hush_bin(),
            &args("helper", &hc),
            &helper_dir.path().join("log"),
        );
        // Pin the port it got, so a restart comes back where the leader expects it.
        let hc = write_config(helper_dir.path(), helper.addr(), None);
        helper.kill();
        helper.restart_with(Some(args("helper", &hc)));
        let lc = write_config(leader_dir.path(), any, Some(&helper.url()));
        let mut leader = HushProcess::spawn(
            hush_bin(),
            &args("leader", &lc),
            &leader_dir.path().join("log"),
        );
        let lc = write_config(leader_dir.path(), leader.addr(), Some(&helper.url()));
        leader.kill();
        leader.restart_with(Some(args("leader", &lc)));
        Self {
            leader,
            helper,
            leader_dir,
            helper_dir,
        }
    }
}

async fn crash_during_jobs(kill_leader: bool) {
    let mut c = Cluster::start();
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    provision(
        &c.leader.url(),
        &c.helper.url(),
        &task,
        &VerifyKey::random(),
    )
    .await;
    let client = client_task(&c.leader.url(), &c.helper.url(), &task).await;
    let now = SystemClock.now();
    let mut rng = StdRng::seed_from_u64(kill_leader as u64);
    let mut expect = vec![0i64; task.output_len()];
    let reports: Vec<Vec<u8>> = (0..2_000)
        .map(|_| {
            let b = rng.random_range(0..task.output_len());
            expect[b] += 1;
            client
                .seal(
                    client
                        .shard(&Measurement::Bucket(b), ReportId::random())
                        .unwrap(),
                    now,
                )
                .unwrap()
                .to_bytes()
        })
        .collect();
    assert_eq!(submit(&c.leader.url(), &reports, 500).await.accepted, 2_000);

    // Wait until jobs are running, then kill.
    let start = Instant::now();
    loop {
        let s = stats(&c.leader.url(), Some(&task)).await;
        if s.reports_aggregated >= 200 {
            assert!(
                s.reports_pending > 0,
                "all jobs finished before the kill; slow them down"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "jobs never started: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if kill_leader {
        c.leader.kill();
        c.leader.restart_with(None);
    } else {
        c.helper.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.helper.restart_with(None);
    }
    let s = wait_drained(&c.leader.url(), &task, Duration::from_secs(120)).await;
    assert_eq!(
        s.reports_aggregated,
        2_000,
        "{s:?}\nleader log:\n{}",
        c.leader.log()
    );
    assert!(s.rejected.is_empty(), "{s:?}");
    // The leader's anti-replay set outlived the kill (on sled it is in memory, loaded from the
    // store at the restart): every report sent again is a replay.
    let again = submit(&c.leader.url(), &reports, 500).await;
    assert_eq!(again.accepted, 0, "{:?}", again.rejected);
    assert_eq!(again.rejected.get(&RejectReason::Replay), Some(&2_000));
    c.leader.terminate();
    c.helper.terminate();
    let (sum, count) = Stored::read(c.leader_dir.path(), c.helper_dir.path(), &task)
        .await
        .unshard(task.output_len());
    assert_eq!(count, 2_000);
    assert_eq!(sum, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_during_jobs_loses_and_doubles_nothing() {
    crash_during_jobs(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_helper_during_jobs_loses_and_doubles_nothing() {
    crash_during_jobs(false).await;
}
