//! The client runtime a service embeds: it keeps recording when every server is down, bounds its
//! queue, and delivers once the servers come back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::{Aggregator, AggregatorConfig};
use hush_client::{Endpoints, HushClient, KeySource, RuntimeConfig};
use hush_protocol::{
    Clock, HpkeKeypair, MeasurementKind, MockClock, Role, TaskConfig, Time, VerifyKey,
};
use hush_tests::cluster::{
    Directory, aggregator_config, provision, secrets, stats, url, wait_drained,
};
use hush_tests::mixnet::{Mix, provision_shuffler, shuffler_config_text};
use hush_tests::task_params;

/// A port that was free a moment ago.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_keeps_recording_with_servers_down_and_delivers_when_they_return() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let (leader_addr, helper_addr, shuffler_addr) = (free_addr(), free_addr(), free_addr());
    let directory_addr = free_addr();
    let mut p = task_params(MeasurementKind::EventHistogram, &HpkeKeypair::generate(1));
    p.contribution_bound = 100;
    let task = TaskConfig::new(p).unwrap();
    let endpoints = Endpoints {
        shuffler_url: url(shuffler_addr),
        keys: KeySource::Directory(url(directory_addr)),
        tls_ca: None,
    };
    let config = RuntimeConfig {
        queue_capacity: 150,
        max_batch: 50,
        tick: Duration::from_millis(20),
        max_jitter: Duration::from_millis(10),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        refresh_interval: Duration::from_secs(600),
        request_timeout: Duration::from_secs(2),
    };
    // Every server is down: the client still starts, and recording never fails.
    let client = HushClient::builder(endpoints)
        .latency_task("checkout", "POST /pay", task.clone())
        .config(config)
        .clock(clock.clone())
        .start()
        .await
        .unwrap();
    let pay = client.latency("checkout", "POST /pay");
    for w in 0..3 {
        for i in 0..120u64 {
            pay.record(Duration::from_millis(5 + i % 50));
        }
        mock.advance(60);
        let _ = w;
    }
    client
        .latency("unknown", "op")
        .record(Duration::from_millis(1));
    assert!(
        !client.flush(Duration::from_millis(500)).await,
        "nothing can go out yet"
    );
    let s = client.stats();
    assert_eq!(s.recorded, 360);
    assert_eq!(
        s.dropped_over_bound, 60,
        "120 events in a window with a bound of 100"
    );
    assert!(s.queued <= 150, "the queue is bounded: {s:?}");
    assert_eq!(s.dropped_queue_full, 300 - s.queued);
    assert_eq!(s.unknown_metric, 1);
    assert_eq!(s.accepted, 0);

    // The servers come back on their addresses.
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let helper = Aggregator::start(
        Role::Helper,
        aggregator_config(dirs[1].path(), helper_addr, None),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let leader_config: AggregatorConfig =
        aggregator_config(dirs[0].path(), leader_addr, Some(url(helper_addr)));
    let leader = Aggregator::start(Role::Leader, leader_config, secrets(), clock.clone())
        .await
        .unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 1,
        max_wait_ms: 100,
    };
    let sconfig = hush_shuffler::ShufflerConfig::from_toml(&shuffler_config_text(
        "shuffler-a",
        dirs[2].path(),
        shuffler_addr,
        ("leader", "leader", &url(leader_addr)),
        mix,
        "",
    ))
    .unwrap();
    let shuffler = hush_shuffler::ShufflerNode::start(
        sconfig,
        hush_tests::cluster::ADMIN_TOKEN,
        clock.clone(),
    )
    .await
    .unwrap();
    provision(
        &url(leader_addr),
        &url(helper_addr),
        &task,
        &VerifyKey::random(),
    )
    .await;
    provision_shuffler(&url(shuffler_addr), &task).await;
    // The key directory comes back on its address too.
    let directory = Directory::start(
        directory_addr,
        &url(leader_addr),
        &url(helper_addr),
        &[("shuffler-a", url(shuffler_addr))],
        &task,
        600,
        clock.clone(),
    )
    .await;

    assert!(
        client.flush(Duration::from_secs(60)).await,
        "{:?}",
        client.stats()
    );
    let s = client.stats();
    assert_eq!(s.queued, 0);
    assert_eq!(s.accepted, s.reports_sent);
    assert_eq!(
        s.recorded,
        s.accepted + s.dropped_over_bound + s.dropped_queue_full
    );
    // Everything the shuffler took reaches the leader and is aggregated.
    let start = std::time::Instant::now();
    while stats(&url(leader_addr), Some(&task)).await.reports_accepted < s.accepted {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l = wait_drained(&url(leader_addr), &task, Duration::from_secs(60)).await;
    assert_eq!(l.reports_aggregated, s.accepted);
    assert!(client.shutdown(Duration::from_secs(5)).await);
    directory.shutdown().await;
    shuffler.shutdown().await.unwrap();
    leader.shutdown().await.unwrap();
    helper.shutdown().await.unwrap();
}

/// `flush` may only say "done" when nothing is left: with every server down it must say "not
/// done" however its checks interleave with the background task closing windows and queueing
/// their reports (a past race made it report done while a window's reports were being queued).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_never_reports_done_while_reports_wait() {
    const ROUNDS: u64 = 100;
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let down = url(free_addr());
    let mut p = task_params(MeasurementKind::EventHistogram, &HpkeKeypair::generate(1));
    // Large windows widen the moment their reports are being queued.
    p.contribution_bound = 20_000;
    let task = TaskConfig::new(p).unwrap();
    let endpoints = Endpoints {
        shuffler_url: down.clone(),
        keys: KeySource::Directory(down),
        tls_ca: None,
    };
    let config = RuntimeConfig {
        queue_capacity: 10_000_000,
        tick: Duration::from_millis(1),
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(2),
        request_timeout: Duration::from_millis(50),
        ..RuntimeConfig::default()
    };
    let client = HushClient::builder(endpoints)
        .latency_task("checkout", "POST /pay", task)
        .config(config)
        .clock(clock)
        .start()
        .await
        .unwrap();
    let pay = client.latency("checkout", "POST /pay");
    for round in 0..ROUNDS {
        for i in 0..20_000u64 {
            pay.record(Duration::from_millis(5 + i % 50));
        }
        mock.advance(60);
        // Let the background task race `flush` for the window just closed.
        tokio::time::sleep(Duration::from_micros(round % 11 * 150)).await;
        assert!(
            !client.flush(Duration::from_millis(1)).await,
            "round {round}: flush said done with reports waiting: {:?}",
            client.stats()
        );
    }
    let s = client.stats();
    assert_eq!(s.recorded, ROUNDS * 20_000);
    assert_eq!(s.queued, s.recorded, "{s:?}");
}
