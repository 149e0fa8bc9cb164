//! Key consistency: no party can hand one client a key of its own.
//!
//! Clients take their keys from their tenant's key directory (the results service), which
//! fetches every party's key once per epoch and serves that one set to every client. The
//! attacker here is a leader (and helper) that answers every key request with a fresh key and
//! then tries to recognize reports by the key they were sealed to; the tests show that every
//! report of an epoch is sealed to one key, that clients never asked the attacker for keys, and
//! that rotating every party's key during traffic loses nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hush_client::{Endpoints, HushClient, KeySource, RuntimeConfig, fetch_key_set};
use hush_protocol::proto::v1::hpke_keys_server::{HpkeKeys, HpkeKeysServer};
use hush_protocol::proto::v1::leader_ingest_server::{LeaderIngest, LeaderIngestServer};
use hush_protocol::proto::v1::{self as pb};
use hush_protocol::{
    Clock, Codec, HpkeKeypair, Keyring, MeasurementKind, MockClock, Report, Role, TaskConfig, Time,
    VerifyKey,
};
use hush_tests::cluster::{
    ADMIN_TOKEN, Directory, InProcessPair, provision, stats, url, wait_drained,
};
use hush_tests::mixnet::{Mix, provision_shuffler, start_shuffler};
use hush_tests::task_params;
use tonic::{Request, Response, Status};

/// A malicious leader: every key request gets a fresh key pair (kept, so it can later try every
/// one on the reports it receives), and its ingest records the reports.
#[derive(Clone, Default)]
struct TaggingLeader {
    handed_out: Arc<Mutex<Vec<HpkeKeypair>>>,
    reports: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[tonic::async_trait]
impl HpkeKeys for TaggingLeader {
    async fn get_hpke_configs(
        &self,
        _request: Request<pb::GetHpkeConfigsRequest>,
    ) -> Result<Response<pb::HpkeConfigList>, Status> {
        let mut h = self.handed_out.lock().unwrap();
        // A different key and config id for every caller.
        let kp = HpkeKeypair::generate((h.len() % 250 + 1) as u8);
        let config = (kp.config()).into();
        h.push(kp);
        Ok(Response::new(pb::HpkeConfigList {
            configs: vec![config],
        }))
    }
}

#[tonic::async_trait]
impl LeaderIngest for TaggingLeader {
    async fn submit_reports(
        &self,
        request: Request<pb::SubmitReportsRequest>,
    ) -> Result<Response<pb::SubmitReportsResponse>, Status> {
        let reports = request.into_inner().reports;
        let n = reports.len() as u64;
        self.reports
            .lock()
            .unwrap()
            .extend(reports.into_iter().map(|r| r.to_vec()));
        Ok(Response::new(pb::SubmitReportsResponse {
            accepted: n,
            rejected: vec![],
        }))
    }
}

impl TaggingLeader {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(HpkeKeysServer::new(self.clone()))
            .add_service(LeaderIngestServer::new(self.clone()));
        tokio::spawn(async move {
            router
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        url(addr)
    }

    /// For each key pair handed out: how many recorded reports' leader shares it opens.
    fn reports_per_key(&self) -> Vec<usize> {
        let keys = self.handed_out.lock().unwrap().clone();
        let reports = self.reports.lock().unwrap().clone();
        let mut per_key = vec![0; keys.len()];
        for bytes in &reports {
            let r = Report::from_bytes(bytes).expect("a report");
            let opened: Vec<usize> = keys
                .iter()
                .enumerate()
                .filter(|(_, kp)| {
                    r.open_share(Role::Leader, &Keyring::new(vec![(*kp).clone()]))
                        .is_ok()
                })
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                opened.len(),
                1,
                "a report opens with exactly one handed-out key"
            );
            per_key[opened[0]] += 1;
        }
        per_key
    }
}

fn fast_client() -> RuntimeConfig {
    RuntimeConfig {
        tick: Duration::from_millis(20),
        max_jitter: Duration::from_millis(5),
        retry_initial: Duration::from_millis(20),
        refresh_interval: Duration::from_millis(100),
        ..RuntimeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_answers_each_caller_with_its_own_key_cannot_tag_a_client() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let attacker = TaggingLeader::default();
    let attacker_url = attacker.start().await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::Counter,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let shuffler_dir = tempfile::tempdir().unwrap();
    let shuffler = start_shuffler(
        "shuffler-a",
        shuffler_dir.path(),
        ("leader", "leader", &attacker_url),
        Mix {
            batch_size: 1_000,
            min_batch_size: 1,
            max_wait_ms: 50,
        },
        "",
        clock.clone(),
    )
    .await;
    let shuffler_url = url(shuffler.local_addr());
    provision_shuffler(&shuffler_url, &task).await;
    // The attacker is the leader and the helper of the route.
    let directory = Directory::start(
        "127.0.0.1:0".parse().unwrap(),
        &attacker_url,
        &attacker_url,
        &[("shuffler-a", shuffler_url.clone())],
        &task,
        3_600,
        clock.clone(),
    )
    .await;
    let endpoints = Endpoints {
        shuffler_url,
        keys: KeySource::Directory(directory.url()),
        tls_ca: None,
    };
    let mut clients = Vec::new();
    for _ in 0..30 {
        let c = HushClient::builder(endpoints.clone())
            .counter_task("errors", task.clone())
            .config(fast_client())
            .clock(clock.clone())
            .start()
            .await
            .unwrap();
        clients.push(c);
    }
    // Every client asks the directory, many times; the attacker is asked once per epoch.
    directory.wait_ready().await;
    let mut digests = std::collections::BTreeSet::new();
    for _ in 0..30 {
        digests.insert(
            fetch_key_set(&directory.url(), None, Duration::from_secs(5))
                .await
                .unwrap()
                .digest(),
        );
    }
    for c in &clients {
        let start = std::time::Instant::now();
        while c.key_set().is_none() {
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        digests.insert(c.key_set().unwrap().digest());
    }
    assert_eq!(
        digests.len(),
        1,
        "every caller and every client got the same key set"
    );
    for epoch in 0..2 {
        for (i, c) in clients.iter().enumerate() {
            c.counter("errors").add(i as u64 % 3);
        }
        mock.advance(60);
        for c in &clients {
            assert!(c.flush(Duration::from_secs(30)).await, "{:?}", c.stats());
        }
        let start = std::time::Instant::now();
        while attacker.reports.lock().unwrap().len() < 30 * (epoch + 1) {
            assert!(start.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next epoch: the directory asks again, once, and every client moves together.
        mock.advance(3_600);
        let start = std::time::Instant::now();
        while directory.service.key_set().map(|k| k.epoch) == Some(500_000 + epoch as u64) {
            assert!(start.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The attacker was asked for keys exactly twice per epoch (the directory's leader and
    // helper requests; three epochs): no client ever asked it. Every report is sealed to one of
    // the epochs' leader keys, so the attacker learns nothing from the key a report carries
    // beyond its epoch, which every client of the tenant shares.
    let per_key = attacker.reports_per_key();
    assert_eq!(
        per_key.len(),
        6,
        "two requests (leader, helper) per epoch: {per_key:?}"
    );
    for helper_position in [1, 3, 5] {
        assert_eq!(per_key[helper_position], 0, "{per_key:?}");
    }
    assert!(per_key.iter().sum::<usize>() >= 60, "{per_key:?}");
    for c in clients {
        assert!(c.shutdown(Duration::from_secs(5)).await);
    }
    directory.shutdown().await;
    shuffler.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_partys_key_during_traffic_loses_nothing() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let pair = InProcessPair::start(clock.clone()).await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::Counter,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    provision(
        &pair.leader_url(),
        &pair.helper_url(),
        &task,
        &VerifyKey::random(),
    )
    .await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 1,
        max_wait_ms: 50,
    };
    let b = start_shuffler(
        "shuffler-b",
        dirs[1].path(),
        ("leader", "leader", &pair.leader_url()),
        mix,
        "",
        clock.clone(),
    )
    .await;
    let a = start_shuffler(
        "shuffler-a",
        dirs[0].path(),
        ("shuffler-b", "shuffler", &url(b.local_addr())),
        mix,
        "",
        clock.clone(),
    )
    .await;
    let (a_url, b_url) = (url(a.local_addr()), url(b.local_addr()));
    for u in [&a_url, &b_url] {
        provision_shuffler(u, &task).await;
    }
    let directory = Directory::start(
        "127.0.0.1:0".parse().unwrap(),
        &pair.leader_url(),
        &pair.helper_url(),
        &[("shuffler-a", a_url.clone()), ("shuffler-b", b_url.clone())],
        &task,
        120,
        clock.clone(),
    )
    .await;
    let endpoints = Endpoints {
        shuffler_url: a_url.clone(),
        keys: KeySource::Directory(directory.url()),
        tls_ca: None,
    };
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(
            HushClient::builder(endpoints.clone())
                .counter_task("errors", task.clone())
                .config(fast_client())
                .clock(clock.clone())
                .start()
                .await
                .unwrap(),
        );
    }
    let mut digests = BTreeMap::new();
    for window in 0..4u64 {
        for c in &clients {
            c.counter("errors").add(1);
        }
        // Mid-run, every party rotates: the new key is current (and accepted) at once, the old
        // one keeps opening for the grace period; clients move at the next epoch.
        if window == 1 {
            for u in [&pair.leader_url(), &pair.helper_url(), &a_url, &b_url] {
                hush_aggregator::client::admin(u, ADMIN_TOKEN, None)
                    .unwrap()
                    .rotate_hpke_key(pb::RotateHpkeKeyRequest {})
                    .await
                    .unwrap();
            }
        }
        mock.advance(60);
        for c in &clients {
            assert!(c.flush(Duration::from_secs(30)).await, "{:?}", c.stats());
        }
        if let Some(k) = directory.service.key_set() {
            digests.insert(k.epoch, k.digest());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every report sent was aggregated; none failed to open.
    let sent: u64 = clients.iter().map(|c| c.stats().accepted).sum();
    assert_eq!(sent, 80);
    let start = std::time::Instant::now();
    while stats(&pair.leader_url(), Some(&task))
        .await
        .reports_accepted
        < sent
    {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = wait_drained(&pair.leader_url(), &task, Duration::from_secs(60)).await;
    assert_eq!(s.reports_aggregated, 80, "{s:?}");
    assert!(s.rejected.is_empty(), "{s:?}");
    // The clients used more than one key set over the run: the rotation reached them.
    let distinct: std::collections::BTreeSet<_> = digests.values().collect();
    assert!(distinct.len() >= 2, "{digests:?}");
    for c in clients {
        assert!(c.shutdown(Duration::from_secs(5)).await);
    }
    directory.shutdown().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_window_histograms_report_every_window_even_when_nothing_happened() {
    // A report's presence must not tell the shufflers or the leader that the service had, say,
    // an error: a registered counter (and window histogram) reports every window, zero if
    // nothing was recorded, without the service calling `add(0)`.
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let pair = InProcessPair::start(clock.clone()).await;
    let collector = HpkeKeypair::generate(1);
    let errors = TaskConfig::new(task_params(MeasurementKind::Counter, &collector)).unwrap();
    let latency =
        TaskConfig::new(task_params(MeasurementKind::WindowHistogram, &collector)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shuffler = start_shuffler(
        "shuffler-a",
        dir.path(),
        ("leader", "leader", &pair.leader_url()),
        Mix {
            batch_size: 1_000,
            min_batch_size: 1,
            max_wait_ms: 50,
        },
        "",
        clock.clone(),
    )
    .await;
    let shuffler_url = url(shuffler.local_addr());
    for t in [&errors, &latency] {
        provision(
            &pair.leader_url(),
            &pair.helper_url(),
            t,
            &VerifyKey::random(),
        )
        .await;
        provision_shuffler(&shuffler_url, t).await;
    }
    let directory = Directory::start(
        "127.0.0.1:0".parse().unwrap(),
        &pair.leader_url(),
        &pair.helper_url(),
        &[("shuffler-a", shuffler_url.clone())],
        &errors,
        3_600,
        clock.clone(),
    )
    .await;
    let client = HushClient::builder(Endpoints {
        shuffler_url,
        keys: KeySource::Directory(directory.url()),
        tls_ca: None,
    })
    .counter_task("errors", errors.clone())
    .latency_task("checkout", "GET /", latency.clone())
    .config(fast_client())
    .clock(clock.clone())
    .start()
    .await
    .unwrap();
    // Three windows in which the service records nothing at all.
    for _ in 0..3 {
        mock.advance(60);
        assert!(
            client.flush(Duration::from_secs(30)).await,
            "{:?}",
            client.stats()
        );
    }
    assert_eq!(client.stats().accepted, 6, "{:?}", client.stats());
    for t in [&errors, &latency] {
        let start = std::time::Instant::now();
        while stats(&pair.leader_url(), Some(t)).await.reports_accepted < 3 {
            assert!(start.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = wait_drained(&pair.leader_url(), t, Duration::from_secs(30)).await;
        assert_eq!(s.reports_aggregated, 3, "{}: {s:?}", t.name());
    }
    assert!(client.shutdown(Duration::from_secs(5)).await);
    directory.shutdown().await;
    shuffler.shutdown().await.unwrap();
    pair.shutdown().await;
}
