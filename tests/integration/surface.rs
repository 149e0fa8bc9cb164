//! The network surface under attack: floods of concurrent requests and connections, and
//! oversize requests, against real servers on loopback. Each attack is refused early, the server
//! keeps serving, and every legitimate report still arrives exactly once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::{Aggregator, client};
use hush_client::ClientTask;
use hush_protocol::proto::v1::leader_ingest_client::LeaderIngestClient;
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::proto::v1::{self as pb};
use hush_protocol::{
    Clock, Codec, HpkeKeypair, Measurement, MeasurementKind, MockClock, ReportId, Role,
    SystemClock, TaskConfig, Time, VerifyKey,
};
use hush_shuffler::{ShufflerConfig, ShufflerNode};
use hush_tests::cluster::{
    ADMIN_TOKEN, aggregator_config_with, client_task, provision, secrets, stats, url, wait_drained,
};
use hush_tests::mixnet::{Mix, RecordingLeader, one_hop_packets, provision_shuffler};
use hush_tests::task_params;
use tonic::Code;

const TIGHT: &str =
    "[server]\nmax_concurrent_requests = 2\nmax_concurrent_streams = 4\nmax_connections = 64\n";

/// Sends `packets` in one request until the shuffler takes them, counting how often it shed
/// the request as overloaded.
async fn submit_until_taken(url: String, packets: Vec<pb::Packet>) -> (u64, u64) {
    let mut shed = 0;
    // One connection per sender, as a client or a shuffler keeps it.
    let mut c = ShufflerClient::new(client::channel(&url, None).unwrap());
    loop {
        match c
            .submit_packets(pb::SubmitPacketsRequest {
                packets: packets.clone(),
            })
            .await
        {
            Ok(r) => return (r.into_inner().accepted, shed),
            Err(s) if s.code() == Code::ResourceExhausted => {
                shed += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(s) => panic!("unexpected refusal: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_concurrent_requests_is_shed_and_every_packet_still_arrives_once() {
    let sink = RecordingLeader::start().await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 1,
        max_wait_ms: 50,
    };
    let text = hush_tests::mixnet::shuffler_config_text(
        "shuffler-a",
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        ("leader", "leader", &sink.url()),
        mix,
        "",
    )
    .replace("cache_mb = 16\n", &format!("cache_mb = 16\n{TIGHT}"));
    let node = ShufflerNode::start(
        ShufflerConfig::from_toml(&text).unwrap(),
        ADMIN_TOKEN,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let u = url(node.local_addr());
    provision_shuffler(&u, &task).await;
    let packets = one_hop_packets(
        &u,
        "shuffler-a",
        &task,
        (0..2_000u32).map(|i| i.to_be_bytes().to_vec()),
    )
    .await;
    // 40 senders at once, each on its own connection, against a limit of 2 requests in flight.
    let senders: Vec<_> = packets
        .chunks(50)
        .map(|c| tokio::spawn(submit_until_taken(u.clone(), c.to_vec())))
        .collect();
    let (mut accepted, mut shed) = (0, 0);
    for s in senders {
        let (a, sh) = s.await.unwrap();
        accepted += a;
        shed += sh;
    }
    assert_eq!(accepted, 2_000);
    assert!(shed > 0, "nothing was shed: the limit did not hold");
    let got = sink.wait_for(2_000, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2_000);
    assert_eq!(sink.duplicates(), 0);

    // Connections past the limit are closed as soon as they are accepted.
    let text = text.replace("max_connections = 64", "max_connections = 2");
    node.shutdown().await.unwrap();
    let node = ShufflerNode::start(
        ShufflerConfig::from_toml(&text).unwrap(),
        ADMIN_TOKEN,
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let addr = node.local_addr();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut third, &mut buf),
    )
    .await
    .expect("the refused connection is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Once the held connections go, the server takes new ones and serves.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = stats(&url(addr), Some(&task)).await;
    assert_eq!(s.reports_accepted, 2_000);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_sheds_a_flood_and_aggregates_every_report_once() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (hd, ld) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let helper = Aggregator::start(
        Role::Helper,
        aggregator_config_with(hd.path(), any, None, ""),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let leader = Aggregator::start(
        Role::Leader,
        aggregator_config_with(ld.path(), any, Some(url(helper.local_addr())), TIGHT),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let (lu, hu) = (url(leader.local_addr()), url(helper.local_addr()));
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    provision(&lu, &hu, &task, &VerifyKey::random()).await;
    let c: ClientTask = client_task(&lu, &hu, &task).await;
    let reports: Vec<Vec<u8>> = (0..2_000)
        .map(|i| {
            c.seal(
                c.shard(&Measurement::Bucket(i % 8), ReportId::random())
                    .unwrap(),
                clock.now(),
            )
            .unwrap()
            .to_bytes()
        })
        .collect();
    let senders: Vec<_> = reports
        .chunks(50)
        .map(|chunk| {
            let (lu, chunk) = (lu.clone(), chunk.to_vec());
            tokio::spawn(async move {
                let mut shed = 0u64;
                let mut c = LeaderIngestClient::new(client::channel(&lu, None).unwrap());
                loop {
                    match c
                        .submit_reports(pb::SubmitReportsRequest {
                            reports: chunk.iter().map(|r| r.clone().into()).collect(),
                        })
                        .await
                    {
                        Ok(r) => return (r.into_inner().accepted, shed),
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            shed += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(s) => panic!("unexpected refusal: {s:?}"),
                    }
                }
            })
        })
        .collect();
    let (mut accepted, mut shed) = (0, 0);
    for s in senders {
        let (a, sh) = s.await.unwrap();
        accepted += a;
        shed += sh;
    }
    assert_eq!(accepted, 2_000);
    assert!(shed > 0, "nothing was shed: the limit did not hold");
    let s = wait_drained(&lu, &task, Duration::from_secs(60)).await;
    assert_eq!(s.reports_aggregated, 2_000, "{s:?}");
    assert!(s.rejected.is_empty(), "none twice, none lost: {s:?}");
    leader.shutdown().await.unwrap();
    helper.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_requests_are_refused_before_they_are_buffered() {
    let clock: Arc<dyn Clock> = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (hd, ld) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let helper = Aggregator::start(
        Role::Helper,
        aggregator_config_with(hd.path(), any, None, ""),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let leader = Aggregator::start(
        Role::Leader,
        aggregator_config_with(
            ld.path(),
            any,
            Some(url(helper.local_addr())),
            "max_request_reports = 100\nmax_packet_size = 4096\n",
        ),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let lu = url(leader.local_addr());
    // 100 reports of 4 KiB fit (about 0.4 MB); one request of 2 MB is refused as too large
    // whatever it holds, before the leader decodes it.
    let limit = leader.shared().config.ingest_message_limit();
    assert!(limit < 1 << 20, "{limit}");
    let e = LeaderIngestClient::new(client::channel(&lu, None).unwrap())
        .max_encoding_message_size(64 << 20)
        .submit_reports(pb::SubmitReportsRequest {
            reports: vec![vec![0u8; 2 << 20].into()],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    // A task whose packets are larger than the limit is refused at provisioning.
    let mut p = task_params(MeasurementKind::EventHistogram, &HpkeKeypair::generate(1));
    p.packet_size = 16_384;
    let big = TaskConfig::new(p).unwrap();
    let e = client::admin(&lu, ADMIN_TOKEN, None)
        .unwrap()
        .create_task(pb::CreateTaskRequest {
            task: Some((&big).into()),
            vdaf_verify_key: VerifyKey::random().as_bytes().to_vec().into(),
            role: "leader".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_packet_size"), "{}", e.message());
    // The leader still serves.
    let s = stats(&lu, None).await;
    assert_eq!(s.reports_accepted, 0);
    leader.shutdown().await.unwrap();
    helper.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_collections_cannot_fill_the_audit_trail() {
    let clock: Arc<dyn Clock> = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let pair = hush_tests::cluster::InProcessPair::start(clock.clone()).await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
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
    let w = task.window(clock.now()).unwrap();
    let started = std::time::Instant::now();
    for _ in 0..500 {
        let e = hush_tests::cluster::collect(
            &pair.leader_url(),
            Some("not-anyones-token-0123456789"),
            &task,
            &w,
            None,
            pb::BudgetPurpose::Routine,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let refused = async |a: &Aggregator| {
        a.shared()
            .store
            .audit()
            .entries()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event.action == "collect")
            .collect::<Vec<_>>()
    };
    let n = refused(&pair.leader).await.len() as u64;
    assert!(
        n <= seconds * 10 + 10,
        "{n} audit entries for 500 refusals in {seconds} s"
    );
    // The next entry that is written says how many were left out.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let _ = hush_tests::cluster::collect(
        &pair.leader_url(),
        None,
        &task,
        &w,
        None,
        pb::BudgetPurpose::Routine,
    )
    .await;
    let last = refused(&pair.leader).await.pop().unwrap();
    assert!(
        last.event.detail.contains("earlier refusals not recorded"),
        "{last}"
    );
    pair.leader.shared().store.audit().verify().await.unwrap();
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_api_speaks_https_with_tls_and_refuses_plaintext_off_loopback() {
    use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
    use hush_server::tls::dev::{DevCa, loopback_hosts};
    use hush_tests::http::{request, request_tls};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = DevCa::new("results test CA").unwrap();
    let issued = ca.issue("collector", &loopback_hosts()).unwrap();
    std::fs::write(d.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(d.join("c.pem"), &issued.cert_pem).unwrap();
    std::fs::write(d.join("c-key.pem"), &issued.key_pem).unwrap();
    let task = TaskConfig::new(task_params(
        MeasurementKind::Counter,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    std::fs::write(d.join("task.toml"), toml::to_string(task.params()).unwrap()).unwrap();
    let config = |listen: &str, leader: &str, tls: bool| {
        let mut text = format!(
            "tenant = \"acme\"\nlisten_grpc = \"{listen}\"\nlisten_http = \"{listen}\"\n\
             data_dir = \"{}\"\nleader_url = \"{leader}\"\ntask_files = [\"{}\"]\n",
            d.join("data").display(),
            d.join("task.toml").display()
        );
        if tls {
            text.push_str(&format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
                d.join("c.pem").display(),
                d.join("c-key.pem").display(),
                d.join("ca.pem").display()
            ));
        }
        ResultsConfig::from_toml(&text).unwrap()
    };
    let secrets = || ResultsSecrets {
        tenant_token: "acme-token-0123456789".into(),
        collector_key: HpkeKeypair::generate(1),
        api_token: None,
        read_token: "read-token-0123456789".into(),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // Plaintext on an address other than loopback is refused without --insecure.
    let e = ResultsService::start(
        config("0.0.0.0:0", "http://127.0.0.1:1", false),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not a loopback address"), "{e}");
    let mut insecure = config("0.0.0.0:0", "http://127.0.0.1:1", false);
    insecure.insecure = true;
    ResultsService::start(insecure, secrets(), clock.clone())
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    // With [tls] the HTTP API is HTTPS: reads work with the CA and the read token, plaintext
    // gets no HTTP answer, and a read without the token is refused.
    let svc = ResultsService::start(
        config("127.0.0.1:0", "https://127.0.0.1:1", true),
        secrets(),
        clock,
    )
    .await
    .unwrap();
    let path = format!("/v1/tasks/{}/windows", task.id());
    let (code, body) = request_tls(
        svc.http_addr(),
        ca.cert_pem().as_bytes(),
        "GET",
        &path,
        Some("read-token-0123456789"),
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"windows":[],"next_page_token":null}"#)
    );
    let (code, _) = request_tls(
        svc.http_addr(),
        ca.cert_pem().as_bytes(),
        "GET",
        &path,
        None,
    )
    .await;
    assert_eq!(code, 401);
    let (addr, p2) = (svc.http_addr(), path.clone());
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::spawn(async move {
            request(addr, "GET", &p2, Some("read-token-0123456789"), None).await
        }),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok((200, _)))),
        "plaintext got an answer: {plain:?}"
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_key_rotation_keeps_only_the_live_epochs_replay_tags() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let sink = RecordingLeader::start().await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 1,
        max_wait_ms: 20,
    };
    let text = hush_tests::mixnet::shuffler_config_text(
        "shuffler-a",
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        ("leader", "leader", &sink.url()),
        mix,
        "",
    )
    .replace(
        "cache_mb = 16\n",
        "cache_mb = 16\nmaintenance_interval_s = 1\nkey_rotation_period_s = 60\nkey_grace_period_s = 60\n",
    );
    let node = ShufflerNode::start(
        ShufflerConfig::from_toml(&text).unwrap(),
        ADMIN_TOKEN,
        clock.clone(),
    )
    .await
    .unwrap();
    let u = url(node.local_addr());
    provision_shuffler(&u, &task).await;
    let mut ids = std::collections::BTreeSet::new();
    for round in 0..6u32 {
        // Senders seal to the key published now (a key directory would hand it out).
        let configs = client::hpke_configs(&u, None).await.unwrap();
        ids.insert(configs[0].id());
        let packets = one_hop_packets(
            &u,
            "shuffler-a",
            &task,
            (0..20u32).map(|i| (round * 100 + i).to_be_bytes().to_vec()),
        )
        .await;
        assert_eq!(
            hush_tests::mixnet::submit_packets(&u, &packets, 20)
                .await
                .accepted,
            20
        );
        sink.wait_for(20 * (round as usize + 1), Duration::from_secs(10))
            .await;
        // A key period passes: maintenance rotates, and the key retired a period ago goes with
        // its tags.
        mock.advance(60);
        let start = std::time::Instant::now();
        while client::hpke_configs(&u, None).await.unwrap()[0].id() == configs[0].id() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no scheduled rotation"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(ids.len() >= 5, "the key rotated on schedule: {ids:?}");
    assert_eq!(sink.received().len(), 120);
    let tags = node.shared().store.tag_count();
    assert!(
        tags <= 60,
        "{tags} replay tags after 120 packets: only the live epochs' should be kept"
    );
    // On disk too: one tag log per live key at most, none left of the retired ones.
    let live = client::hpke_configs(&u, None).await.unwrap().len();
    let logs = std::fs::read_dir(dir.path().join("data").join("tags"))
        .unwrap()
        .count();
    assert!(
        (1..=live).contains(&logs),
        "{logs} tag logs for {live} live keys"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_never_resends_a_job_older_than_the_helpers_job_retention() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    // A helper that is not there: every attempt at the job fails.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ld = tempfile::tempdir().unwrap();
    let leader = Aggregator::start(
        Role::Leader,
        aggregator_config_with(
            ld.path(),
            "127.0.0.1:0".parse().unwrap(),
            Some(url(gone)),
            "helper_job_retention_s = 1000\n",
        ),
        secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let lu = url(leader.local_addr());
    let mut p = task_params(MeasurementKind::EventHistogram, &HpkeKeypair::generate(1));
    p.report_expiry_s = 100_000;
    let task = TaskConfig::new(p).unwrap();
    client::admin(&lu, ADMIN_TOKEN, None)
        .unwrap()
        .create_task(pb::CreateTaskRequest {
            task: Some((&task).into()),
            vdaf_verify_key: VerifyKey::random().as_bytes().to_vec().into(),
            role: "leader".into(),
        })
        .await
        .unwrap();
    // The helper's keys are not reachable either: seal to a stand-in helper key (the helper
    // never sees this job anyway).
    let leader_key = client::hpke_configs(&lu, None).await.unwrap()[0].clone();
    let c = ClientTask::new(
        task.clone(),
        leader_key,
        HpkeKeypair::generate(9).config().clone(),
        hush_protocol::onion::Route::new(
            vec![hush_protocol::onion::Hop {
                name: "s".into(),
                config: HpkeKeypair::generate(1).config().clone(),
            }],
            "leader",
        )
        .unwrap(),
    )
    .unwrap();
    let reports: Vec<Vec<u8>> = (0..10)
        .map(|_| {
            c.seal(
                c.shard(&Measurement::Bucket(1), ReportId::random())
                    .unwrap(),
                clock.now(),
            )
            .unwrap()
            .to_bytes()
        })
        .collect();
    assert_eq!(
        hush_tests::cluster::submit(&lu, &reports, 10)
            .await
            .accepted,
        10
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats(&lu, Some(&task)).await.reports_pending, 10);
    // 90% of the helper's retention later, the job is given up, visibly.
    mock.advance(900);
    let start = std::time::Instant::now();
    let s = loop {
        let s = stats(&lu, Some(&task)).await;
        if s.reports_pending == 0 {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        hush_tests::cluster::rejections(&s)[&pb::RejectReason::TooOld],
        10
    );
    let trail = leader.shared().store.audit().entries().await.unwrap();
    assert!(
        trail.iter().any(
            |e| e.event.action == "aggregation.job" && e.event.outcome.starts_with("abandoned")
        ),
        "{trail:#?}"
    );
    leader.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_http_api_sheds_a_flood_and_keeps_serving() {
    use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let task = TaskConfig::new(task_params(
        MeasurementKind::Counter,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    std::fs::write(d.join("task.toml"), toml::to_string(task.params()).unwrap()).unwrap();
    let config = ResultsConfig::from_toml(&format!(
        "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
         data_dir = \"{}\"\nleader_url = \"http://127.0.0.1:1\"\ntask_files = [\"{}\"]\n\
         [server]\nmax_concurrent_requests = 1\n",
        d.join("data").display(),
        d.join("task.toml").display()
    ))
    .unwrap();
    let svc = ResultsService::start(
        config,
        ResultsSecrets {
            tenant_token: "acme-token-0123456789".into(),
            collector_key: HpkeKeypair::generate(1),
            api_token: None,
            read_token: "read-token-0123456789".into(),
        },
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let path = format!("/v1/tasks/{}/windows", task.id());
    // One request holds the only slot: its headers arrive, its body never does (the handler
    // waits for the body while counted in flight).
    let mut held = tokio::net::TcpStream::connect(svc.http_addr())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut held,
        format!(
            "POST /v1/tasks/{}/collect HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: 100\r\n\r\n{{",
            task.id()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A flood meanwhile is refused at once with 503, whatever it asks.
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (addr, path) = (svc.http_addr(), path.clone());
            tokio::spawn(async move {
                hush_tests::http::request(addr, "GET", &path, Some("read-token-0123456789"), None)
                    .await
                    .0
            })
        })
        .collect();
    let mut codes = std::collections::BTreeMap::new();
    for r in requests {
        *codes.entry(r.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(codes, std::collections::BTreeMap::from([(503, 50)]));
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // And it still serves.
    let (code, _) = hush_tests::http::request(
        svc.http_addr(),
        "GET",
        &path,
        Some("read-token-0123456789"),
        None,
    )
    .await;
    assert_eq!(code, 200);
    svc.shutdown().await.unwrap();
}
