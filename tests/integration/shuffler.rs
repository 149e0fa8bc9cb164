//! Shufflers over real gRPC on loopback with sled in temporary directories: a cascade of two in
//! front of the leader (or a recording stand-in for its ingest), refusals, overload, and output
//! order.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::client;
use hush_client::ClientTask;
use hush_protocol::onion::{self, Hop, Route};
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::{
    Clock, Codec, HpkeKeypair, Measurement, MeasurementKind, ReportId, SystemClock, TaskConfig,
    Time, VerifyKey,
};
use hush_shuffler::ShufflerNode;
use hush_tests::cluster::{InProcessPair, Stored, provision, stats, url, wait_drained};
use hush_tests::mixnet::{
    Mix, RecordingLeader, one_hop_packets, provision_shuffler, reasons, route, start_shuffler,
    submit_packets,
};
use hush_tests::task_params;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn histogram_task() -> TaskConfig {
    TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap()
}

const QUICK: Mix = Mix {
    batch_size: 1_000,
    min_batch_size: 50,
    max_wait_ms: 300,
};

/// `n` reports with random buckets: their encodings, their packets, and the exact histogram.
fn reports(
    client: &ClientTask,
    n: usize,
    now: Time,
    seed: u64,
) -> (Vec<Vec<u8>>, Vec<pb::Packet>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut expect = vec![0i64; client.task().output_len()];
    let mut encoded = Vec::with_capacity(n);
    let mut packets = Vec::with_capacity(n);
    for _ in 0..n {
        let b = rng.random_range(0..client.task().output_len());
        expect[b] += 1;
        let report = client
            .seal(
                client
                    .shard(&Measurement::Bucket(b), ReportId::random())
                    .unwrap(),
                now,
            )
            .unwrap();
        encoded.push(report.to_bytes());
        packets.push(client.wrap(&report).unwrap());
    }
    (encoded, packets, expect)
}

/// Two shufflers, a → b → `leader_url`, with `task` provisioned on both.
async fn cascade(
    leader_url: &str,
    task: &TaskConfig,
    dirs: &[tempfile::TempDir; 2],
) -> (ShufflerNode, ShufflerNode) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let b = start_shuffler(
        "shuffler-b",
        dirs[1].path(),
        ("leader", "leader", leader_url),
        QUICK,
        "",
        clock.clone(),
    )
    .await;
    let b_url = url(b.local_addr());
    let a = start_shuffler(
        "shuffler-a",
        dirs[0].path(),
        ("shuffler-b", "shuffler", &b_url),
        QUICK,
        "",
        clock,
    )
    .await;
    provision_shuffler(&url(a.local_addr()), task).await;
    provision_shuffler(&b_url, task).await;
    (a, b)
}

async fn wait_forwarded(shuffler_url: &str, task: &TaskConfig, n: u64) -> pb::TaskStats {
    let start = std::time::Instant::now();
    loop {
        let s = stats(shuffler_url, Some(task)).await;
        if s.reports_aggregated >= n {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "shuffler forwarded {} of {n}",
            s.reports_aggregated
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_of_two_delivers_every_report_once_and_byte_identical() {
    let sink = RecordingLeader::start().await;
    let task = histogram_task();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = cascade(&sink.url(), &task, &dirs).await;
    let (a_url, b_url) = (url(a.local_addr()), url(b.local_addr()));
    let r = route(
        &[("shuffler-a", a_url.clone()), ("shuffler-b", b_url.clone())],
        "leader",
    )
    .await;
    let client = ClientTask::new(
        task.clone(),
        HpkeKeypair::generate(1).config().clone(),
        HpkeKeypair::generate(2).config().clone(),
        r,
    )
    .unwrap();
    let (encoded, packets, _) = reports(&client, 5_000, SystemClock.now(), 1);

    let counts = submit_packets(&a_url, &packets, 250).await;
    assert_eq!(counts.accepted, 5_000);
    assert!(counts.rejected.is_empty(), "{:?}", counts.rejected);
    sink.wait_for(5_000, Duration::from_secs(60)).await;
    wait_forwarded(&b_url, &task, 5_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let got = sink.received();
    assert_eq!(got.len(), 5_000, "nothing more than what was sent arrives");
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        5_000,
        "no report arrives twice"
    );
    let mut sent = encoded.clone();
    sent.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert!(
        sent == got_sorted,
        "the leader gets exactly the reports the clients wrapped, byte for byte"
    );
    assert_ne!(got, encoded, "the cascade changed the order");

    for u in [&a_url, &b_url] {
        let s = stats(u, Some(&task)).await;
        assert_eq!(
            (s.reports_accepted, s.reports_aggregated, s.reports_pending),
            (5_000, 5_000, 0),
            "{u}"
        );
        assert!(s.rejected.is_empty());
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_in_front_of_the_real_leader_aggregates_exactly() {
    let pair = InProcessPair::start(Arc::new(SystemClock)).await;
    let task = histogram_task();
    provision(
        &pair.leader_url(),
        &pair.helper_url(),
        &task,
        &VerifyKey::random(),
    )
    .await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (a, b) = cascade(&pair.leader_url(), &task, &dirs).await;
    let r = route(
        &[
            ("shuffler-a", url(a.local_addr())),
            ("shuffler-b", url(b.local_addr())),
        ],
        "leader",
    )
    .await;
    let leader_key = client::hpke_configs(&pair.leader_url(), None)
        .await
        .unwrap()[0]
        .clone();
    let helper_key = client::hpke_configs(&pair.helper_url(), None)
        .await
        .unwrap()[0]
        .clone();
    let client = ClientTask::new(task.clone(), leader_key, helper_key, r).unwrap();
    let (_, packets, expect) = reports(&client, 5_000, SystemClock.now(), 2);

    assert_eq!(
        submit_packets(&url(a.local_addr()), &packets, 500)
            .await
            .accepted,
        5_000
    );
    // Every packet once more: the first shuffler refuses them all as replays.
    let again = submit_packets(&url(a.local_addr()), &packets[..300], 300).await;
    assert_eq!(
        (again.accepted, again.rejected[&RejectReason::Replay]),
        (0, 300)
    );

    let leader = wait_drained(&pair.leader_url(), &task, Duration::from_secs(120)).await;
    assert_eq!(leader.reports_accepted, 5_000);
    assert_eq!(leader.reports_aggregated, 5_000);
    assert!(
        leader.rejected.is_empty(),
        "the leader refused {:?}",
        leader.rejected
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let (ld, hd) = pair.shutdown().await;
    let (sum, count) = Stored::read(ld.path(), hd.path(), &task)
        .await
        .unshard(task.output_len());
    assert_eq!(count, 5_000);
    assert_eq!(sum, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_packets_are_refused_counted_and_never_forwarded() {
    let sink = RecordingLeader::start().await;
    let task = histogram_task();
    let other_task = histogram_task();
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 1,
        max_wait_ms: 200,
    };
    let sink_url = sink.url();
    // Started twice on the same data directory: here, and again below.
    let start = || {
        start_shuffler(
            "shuffler-a",
            dir.path(),
            ("leader", "leader", &sink_url),
            mix,
            "",
            Arc::new(SystemClock),
        )
    };
    let node = start().await;
    let u = url(node.local_addr());
    provision_shuffler(&u, &task).await;
    let mine = client::hpke_configs(&u, None).await.unwrap()[0].clone();
    let wrap =
        |config: &hush_protocol::HpkeConfig, next: &str, t: &TaskConfig, body: &[u8]| pb::Packet {
            task_id: t.id().as_bytes().to_vec().into(),
            data: onion::wrap(
                &t.id(),
                t.packet_size(),
                &Route::new(
                    vec![Hop {
                        name: "shuffler-a".into(),
                        config: config.clone(),
                    }],
                    next,
                )
                .unwrap(),
                body,
            )
            .unwrap()
            .into(),
        };
    let valid: Vec<pb::Packet> = (0..100u32)
        .map(|i| wrap(&mine, "leader", &task, &i.to_be_bytes()))
        .collect();
    let mut rng = StdRng::seed_from_u64(3);
    let mut bad = Vec::new();
    // Wrong sizes: truncated and extended.
    for p in &valid[..10] {
        bad.push(pb::Packet {
            task_id: p.task_id.clone(),
            data: p.data[..p.data.len() - 1].to_vec().into(),
        });
        let mut long = p.data.to_vec();
        long.push(0);
        bad.push(pb::Packet {
            task_id: p.task_id.clone(),
            data: long.into(),
        });
    }
    // Garbage of the right size.
    for _ in 0..20 {
        let mut g = vec![0u8; task.packet_size()];
        rng.fill(&mut g[..]);
        bad.push(pb::Packet {
            task_id: task.id().as_bytes().to_vec().into(),
            data: g.into(),
        });
    }
    // Sealed to another node's key with the same config id, and to an id this node lacks.
    let stranger = HpkeKeypair::generate(mine.id());
    let unknown_id = HpkeKeypair::generate(mine.id().wrapping_add(7).max(1));
    for i in 0..10u32 {
        bad.push(wrap(stranger.config(), "leader", &task, &i.to_be_bytes()));
        bad.push(wrap(unknown_id.config(), "leader", &task, &i.to_be_bytes()));
    }
    // A task this node does not know, and a next hop it does not know.
    for i in 0..5u32 {
        bad.push(wrap(&mine, "leader", &other_task, &i.to_be_bytes()));
        bad.push(wrap(&mine, "somewhere-else", &task, &i.to_be_bytes()));
    }

    let first = submit_packets(&u, &valid, 100).await;
    assert_eq!(first.accepted, 100);
    let refused = submit_packets(&u, &bad, 200).await;
    let replays = submit_packets(&u, &valid[..30], 30).await;
    assert_eq!(refused.accepted, 0);
    assert_eq!(refused.rejected[&RejectReason::WrongSize], 20);
    assert_eq!(refused.rejected[&RejectReason::DecryptFailure], 10);
    assert_eq!(refused.rejected[&RejectReason::UnknownTask], 5);
    assert_eq!(refused.rejected[&RejectReason::UnknownHop], 5);
    let garbage = refused
        .rejected
        .get(&RejectReason::Malformed)
        .copied()
        .unwrap_or(0);
    let unknown_key = refused.rejected[&RejectReason::UnknownKey];
    assert_eq!(
        garbage + unknown_key,
        30,
        "20 garbage strings and 10 packets for an unknown key id"
    );
    assert!(unknown_key >= 10);
    assert_eq!(
        (replays.accepted, replays.rejected[&RejectReason::Replay]),
        (0, 30)
    );

    let got = sink.wait_for(100, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.received().len(),
        100,
        "nothing is forwarded for refused packets"
    );
    let mut got: Vec<u32> = got
        .iter()
        .map(|b| u32::from_be_bytes(b[..4].try_into().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());

    let s = stats(&u, Some(&task)).await;
    assert_eq!(s.reports_accepted, 100);
    let r = reasons(&s);
    assert_eq!(r[&RejectReason::Replay], 30);
    assert_eq!(r[&RejectReason::WrongSize], 20);
    assert_eq!(r[&RejectReason::UnknownHop], 5);
    assert_eq!(
        reasons(&stats(&u, None).await)[&RejectReason::UnknownTask],
        5
    );
    node.shutdown().await.unwrap();
    let held = std::fs::read_dir(dir.path().join("data").join("packets"))
        .unwrap()
        .count();
    assert_eq!(
        held, 0,
        "every packet file went: the tags are only in the log"
    );
    // The log of a key this node does not have (a deletion a crash cut short) goes at start.
    let stray = dir
        .path()
        .join("data")
        .join("tags")
        .join("00000000000000ff.tags");
    std::fs::write(&stray, [7u8; 32]).unwrap();

    // Restarted on the same data directory, it still knows the tags of the packets it forwarded
    // (from its tag log), and takes none of them again.
    let node = start().await;
    let u = url(node.local_addr());
    let again = submit_packets(&u, &valid, 100).await;
    assert_eq!(
        (again.accepted, again.rejected[&RejectReason::Replay]),
        (0, 100)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.received().len(), 100, "no replay was forwarded");
    assert!(!stray.exists(), "the stray log went at start");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_resource_exhausted_and_stores_nothing() {
    let sink = RecordingLeader::start().await;
    let task = histogram_task();
    let dir = tempfile::tempdir().unwrap();
    // Nothing leaves (k = 150 is never reached and k_min = k), so the buffer fills.
    let mix = Mix {
        batch_size: 150,
        min_batch_size: 150,
        max_wait_ms: 60_000,
    };
    let limits = "[limits]\nmax_request_packets = 100\nmax_buffered_packets = 150\nper_source_packets_per_s = 1\nper_source_burst = 250\n";
    let node = start_shuffler(
        "shuffler-a",
        dir.path(),
        ("leader", "leader", &sink.url()),
        mix,
        limits,
        Arc::new(SystemClock),
    )
    .await;
    let u = url(node.local_addr());
    provision_shuffler(&u, &task).await;
    let packets = one_hop_packets(
        &u,
        "shuffler-a",
        &task,
        (0..300u32).map(|i| i.to_be_bytes().to_vec()),
    )
    .await;
    let mut c = ShufflerClient::new(client::channel(&u, None).unwrap());
    let send = |c: &mut ShufflerClient<_>, p: &[pb::Packet]| {
        let req = pb::SubmitPacketsRequest {
            packets: p.to_vec(),
        };
        let mut c = c.clone();
        async move { c.submit_packets(req).await }
    };
    assert_eq!(
        send(&mut c, &packets[..100])
            .await
            .unwrap()
            .into_inner()
            .accepted,
        100
    );
    // Over the buffer bound: 100 held + 100 > 150.
    let e = send(&mut c, &packets[100..200]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("holds 100 packets"), "{}", e.message());
    // Too many in one request.
    let e = send(&mut c, &packets[..101]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // The rate limit: the burst of 250 is spent by the 200 above plus 100 more; 1 packet/s refills.
    let e = send(&mut c, &packets[200..300]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("rate limit"), "{}", e.message());

    let s = stats(&u, Some(&task)).await;
    assert_eq!((s.reports_accepted, s.reports_pending), (100, 100));
    assert_eq!(reasons(&s)[&RejectReason::OverQuota], 200);
    assert_eq!(
        node.shared().store.buffered_total().unwrap(),
        100,
        "refused packets are not stored"
    );
    assert!(sink.received().is_empty());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_does_not_slow_or_reject_another_tenants_packets() {
    let sink = RecordingLeader::start().await;
    let acme = histogram_task();
    let other = hush_tests::for_tenant(&acme, "other");
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: 10_000,
        min_batch_size: 10_000,
        max_wait_ms: 60_000,
    };
    // A tenant may send 1 packet/s after a burst of 200; sources are not limited here.
    let limits = "[limits]\nmax_request_packets = 100\nper_tenant_packets_per_s = 1\nper_tenant_burst = 200\n";
    let node = start_shuffler(
        "shuffler-a",
        dir.path(),
        ("leader", "leader", &sink.url()),
        mix,
        limits,
        Arc::new(SystemClock),
    )
    .await;
    let u = url(node.local_addr());
    provision_shuffler(&u, &acme).await;
    provision_shuffler(&u, &other).await;
    let bodies = |from: u32| (from..from + 300).map(|i| i.to_be_bytes().to_vec());
    let a = one_hop_packets(&u, "shuffler-a", &acme, bodies(0)).await;
    let o = one_hop_packets(&u, "shuffler-a", &other, bodies(1_000)).await;
    let c = ShufflerClient::new(client::channel(&u, None).unwrap());
    let send = |p: Vec<pb::Packet>| {
        let mut c = c.clone();
        async move {
            c.submit_packets(pb::SubmitPacketsRequest { packets: p })
                .await
        }
    };
    // acme spends its burst, then is refused as a whole request.
    for i in 0..2 {
        let r = send(a[i * 100..(i + 1) * 100].to_vec()).await.unwrap();
        assert_eq!(r.into_inner().accepted, 100);
    }
    let e = send(a[200..300].to_vec()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("acme"), "{}", e.message());
    // other, right after: every packet accepted at once.
    let start = std::time::Instant::now();
    let r = send(o[..100].to_vec()).await.unwrap();
    assert_eq!(r.into_inner().accepted, 100);
    assert!(start.elapsed() < Duration::from_secs(5));
    // A mixed request (as from an upstream shuffler): only acme's packets are refused.
    let mixed: Vec<pb::Packet> = a[250..300].iter().chain(&o[100..150]).cloned().collect();
    let r = send(mixed).await.unwrap().into_inner();
    assert_eq!(r.accepted, 50);
    assert_eq!(
        r.rejected
            .iter()
            .map(|rc| (RejectReason::try_from(rc.reason).unwrap(), rc.count))
            .collect::<Vec<_>>(),
        vec![(RejectReason::OverQuota, 50)]
    );
    let (sa, so) = (stats(&u, Some(&acme)).await, stats(&u, Some(&other)).await);
    assert_eq!(sa.reports_accepted, 200);
    assert_eq!(reasons(&sa)[&RejectReason::OverQuota], 150);
    assert_eq!(so.reports_accepted, 150);
    assert!(reasons(&so).is_empty(), "{so:?}");
    node.shutdown().await.unwrap();
}

/// Spearman's rank correlation of a permutation with the identity.
fn rank_correlation(output_to_input: &[usize]) -> f64 {
    let n = output_to_input.len() as f64;
    let d2: f64 = output_to_input
        .iter()
        .enumerate()
        .map(|(out, &inp)| (out as f64 - inp as f64).powi(2))
        .sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_order_is_uncorrelated_with_input_order() {
    // 30 batches of 200: per batch, Spearman's rho between input and output position. Under
    // independence each rho has mean 0 and variance 1/(n-1), so z = Σrho·sqrt(n-1)/sqrt(B) is
    // close to standard normal. We require |z| < 5.3 and no single batch with |rho| ≥ 0.45
    // (6.3 sd): together a false failure about once in 10^7 runs (at 4.5 and 0.35, the 30
    // per-batch checks made it about once in 50,000). An order-preserving node gives z ≈ 77,
    // and even a weak partial mix (rho = 0.1 per batch) gives z ≈ 7.7.
    const N: usize = 200;
    const BATCHES: usize = 30;
    let sink = RecordingLeader::start().await;
    let task = histogram_task();
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: N as u64,
        min_batch_size: N as u64,
        max_wait_ms: 60_000,
    };
    let node = start_shuffler(
        "shuffler-a",
        dir.path(),
        ("leader", "leader", &sink.url()),
        mix,
        "",
        Arc::new(SystemClock),
    )
    .await;
    let u = url(node.local_addr());
    provision_shuffler(&u, &task).await;

    let mut sum_rho = 0.0;
    for b in 0..BATCHES {
        let bodies = (0..N as u32).map(|i| [(b as u32).to_be_bytes(), i.to_be_bytes()].concat());
        let packets = one_hop_packets(&u, "shuffler-a", &task, bodies).await;
        assert_eq!(submit_packets(&u, &packets, N).await.accepted, N as u64);
        let got = sink.wait_for((b + 1) * N, Duration::from_secs(30)).await;
        let batch: Vec<usize> = got[b * N..(b + 1) * N]
            .iter()
            .map(|r| {
                assert_eq!(
                    u32::from_be_bytes(r[..4].try_into().unwrap()),
                    b as u32,
                    "batches do not mix"
                );
                u32::from_be_bytes(r[4..8].try_into().unwrap()) as usize
            })
            .collect();
        let rho = rank_correlation(&batch);
        assert!(rho.abs() < 0.45, "batch {b}: rank correlation {rho}");
        sum_rho += rho;
    }
    let z = sum_rho * ((N - 1) as f64).sqrt() / (BATCHES as f64).sqrt();
    assert!(
        z.abs() < 5.3,
        "input and output order are correlated: z = {z}"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_holding_its_limit_of_packets_is_pushed_back_and_others_are_not() {
    let sink = RecordingLeader::start().await;
    let acme = histogram_task();
    let acme_b = hush_tests::for_tenant(&acme, "acme");
    let other = hush_tests::for_tenant(&acme, "other");
    let dir = tempfile::tempdir().unwrap();
    // A task's batch leaves only once it holds 100 packets: until then everything stays
    // buffered. acme may hold 130 packets over its tasks.
    let mix = Mix {
        batch_size: 100,
        min_batch_size: 100,
        max_wait_ms: 600_000,
    };
    let limits = "[limits]\nmax_request_packets = 100\nper_tenant_max_buffered = 130\n";
    let sink_url = sink.url();
    let start = || {
        start_shuffler(
            "shuffler-a",
            dir.path(),
            ("leader", "leader", &sink_url),
            mix,
            limits,
            Arc::new(SystemClock),
        )
    };
    let mut node = start().await;
    let u = url(node.local_addr());
    for t in [&acme, &acme_b, &other] {
        provision_shuffler(&u, t).await;
    }
    let bodies = |from: u32| (from..from + 200).map(|i| i.to_be_bytes().to_vec());
    let a = one_hop_packets(&u, "shuffler-a", &acme, bodies(0)).await;
    let b = one_hop_packets(&u, "shuffler-a", &acme_b, bodies(500)).await;
    let o = one_hop_packets(&u, "shuffler-a", &other, bodies(1_000)).await;
    let send = |u: String, p: Vec<pb::Packet>| async move {
        ShufflerClient::new(client::channel(&u, None).unwrap())
            .submit_packets(pb::SubmitPacketsRequest { packets: p })
            .await
    };
    let accepted = |r: Result<tonic::Response<pb::SubmitPacketsResponse>, tonic::Status>| {
        r.unwrap().into_inner().accepted
    };
    assert_eq!(accepted(send(u.clone(), a[..90].to_vec()).await), 90);
    assert_eq!(accepted(send(u.clone(), b[..30].to_vec()).await), 30);
    // acme holds 120 of its 130: 20 more are pushed back whole, counted, nothing stored.
    let e = send(u.clone(), b[30..50].to_vec()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("acme"), "{}", e.message());
    // other is not affected, alone or mixed with acme's packets.
    assert_eq!(accepted(send(u.clone(), o[..50].to_vec()).await), 50);
    let mixed: Vec<pb::Packet> = b[50..70].iter().chain(&o[50..60]).cloned().collect();
    let r = send(u.clone(), mixed).await.unwrap().into_inner();
    assert_eq!(r.accepted, 10);
    assert_eq!(r.rejected[0].reason, RejectReason::OverQuota as i32);
    assert_eq!(r.rejected[0].count, 20);
    // The holdings are counted from the store again after a restart.
    node.shutdown().await.unwrap();
    node = start().await;
    let u = url(node.local_addr());
    let e = send(u.clone(), b[70..90].to_vec()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // Ten more of acme's first task fit its limit and fill that task's batch; once it is
    // forwarded, acme is taken again.
    assert_eq!(accepted(send(u.clone(), a[90..100].to_vec()).await), 10);
    assert_eq!(sink.wait_for(100, Duration::from_secs(30)).await.len(), 100);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let taken = loop {
        match send(u.clone(), b[90..110].to_vec()).await {
            Ok(r) => break r.into_inner().accepted,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "acme never taken again"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(taken, 20);
    let sa = stats(&u, Some(&acme)).await;
    assert_eq!(sa.reports_accepted, 100);
    let sb = stats(&u, Some(&acme_b)).await;
    assert_eq!(sb.reports_accepted, 50);
    assert!(reasons(&sb)[&RejectReason::OverQuota] >= 60);
    let so = stats(&u, Some(&other)).await;
    assert_eq!(so.reports_accepted, 60);
    assert!(reasons(&so).is_empty(), "{so:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rare_tasks_packets_wait_for_their_own_anonymity_set_and_a_busy_task_is_not_slowed() {
    // The attack: one packet of a rare task leaving in a batch of 100 of a busy task is picked
    // out by its task id at the next hop, and linked to its sender by the first shuffler. Every
    // batch must hold at least k_min packets of each task it carries.
    const K_MIN: usize = 20;
    let sink = RecordingLeader::start().await;
    let busy = histogram_task();
    let rare = histogram_task();
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: K_MIN as u64,
        max_wait_ms: 100,
    };
    let node = start_shuffler(
        "shuffler-a",
        dir.path(),
        ("leader", "leader", &sink.url()),
        mix,
        "",
        Arc::new(SystemClock),
    )
    .await;
    let u = url(node.local_addr());
    provision_shuffler(&u, &busy).await;
    provision_shuffler(&u, &rare).await;
    let body = |tag: u8, i: u32| [vec![tag], i.to_be_bytes().to_vec()].concat();
    let rare_packets = one_hop_packets(
        &u,
        "shuffler-a",
        &rare,
        (0..K_MIN as u32).map(|i| body(b'R', i)),
    )
    .await;
    let busy_packets =
        one_hop_packets(&u, "shuffler-a", &busy, (0..100).map(|i| body(b'B', i))).await;
    let rare_seen = |got: &[Vec<u8>]| got.iter().filter(|r| r[0] == b'R').count();

    // One rare packet and 100 busy ones arrive together: the busy batch leaves after max_wait,
    // the rare packet stays.
    let mut first = vec![rare_packets[0].clone()];
    first.extend(busy_packets.iter().cloned());
    assert_eq!(submit_packets(&u, &first, 200).await.accepted, 101);
    let got = sink.wait_for(100, Duration::from_secs(10)).await;
    assert_eq!(
        rare_seen(&got),
        0,
        "the rare packet left with the busy task's batch"
    );
    // More rare packets, still one short of k_min: however long they wait, none leaves.
    assert_eq!(
        submit_packets(&u, &rare_packets[1..K_MIN - 1], 100)
            .await
            .accepted,
        (K_MIN - 2) as u64
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rare_seen(&sink.received()), 0);
    assert_eq!(
        node.shared().mixer.open_per_task()[&rare.id()],
        (K_MIN - 1) as u64
    );
    // Meanwhile another busy batch flows through unhindered.
    let more_busy =
        one_hop_packets(&u, "shuffler-a", &busy, (100..150).map(|i| body(b'B', i))).await;
    assert_eq!(submit_packets(&u, &more_busy, 100).await.accepted, 50);
    let got = sink.wait_for(150, Duration::from_secs(10)).await;
    assert_eq!(rare_seen(&got), 0);
    // The k_min-th rare packet releases all of them, together.
    assert_eq!(
        submit_packets(&u, &rare_packets[K_MIN - 1..], 10)
            .await
            .accepted,
        1
    );
    let got = sink.wait_for(150 + K_MIN, Duration::from_secs(10)).await;
    assert_eq!(rare_seen(&got), K_MIN);
    assert!(
        got[150..].iter().all(|r| r[0] == b'R'),
        "the rare task's batch holds only its own packets"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stuck_under_k_min_past_the_report_expiry_is_dropped_and_its_quota_freed() {
    // A rare task's lane below k_min is never released; without an end its packets would hold
    // the tenant's (and the node's) buffer forever. Past the task's report expiry the leader
    // would refuse them anyway: the shuffler drops them, counts them TOO_OLD, frees the quota.
    let sink = RecordingLeader::start().await;
    let mut p = task_params(MeasurementKind::EventHistogram, &HpkeKeypair::generate(1));
    p.report_expiry_s = 1;
    let task = TaskConfig::new(p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 20,
        max_wait_ms: 50,
    };
    let text = hush_tests::mixnet::shuffler_config_text(
        "shuffler-a",
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        ("leader", "leader", &sink.url()),
        mix,
        "[limits]\nmax_request_packets = 20\nper_tenant_max_buffered = 20\n",
    )
    .replace(
        "cache_mb = 16\n",
        "cache_mb = 16\nmaintenance_interval_s = 1\n",
    );
    let node = ShufflerNode::start(
        hush_shuffler::ShufflerConfig::from_toml(&text).unwrap(),
        hush_tests::cluster::ADMIN_TOKEN,
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
        (0..21u32).map(|i| i.to_be_bytes().to_vec()),
    )
    .await;
    assert_eq!(submit_packets(&u, &packets[..16], 20).await.accepted, 16);
    // The tenant holds 16 of its 20: five more do not fit.
    let e = ShufflerClient::new(client::channel(&u, None).unwrap())
        .submit_packets(pb::SubmitPacketsRequest {
            packets: packets[16..].to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let start = std::time::Instant::now();
    loop {
        let s = stats(&u, Some(&task)).await;
        if reasons(&s).get(&RejectReason::TooOld) == Some(&16) {
            assert_eq!(s.reports_pending, 0, "accepted 16, dropped 16: {s:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(node.shared().mixer.buffered(), 0);
    assert!(
        sink.received().is_empty(),
        "a stuck batch is dropped, never released"
    );
    // The quota is free again.
    assert_eq!(submit_packets(&u, &packets[16..], 20).await.accepted, 5);
    node.shutdown().await.unwrap();
}
