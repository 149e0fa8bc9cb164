//! Leader and helper over real gRPC on loopback with sled in temporary directories.

use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::{Aggregator, client};
use hush_client::ClientTask;
use hush_protocol::proto::v1::helper_aggregation_client::HelperAggregationClient;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::{
    Clock, Codec, HpkeKeypair, Measurement, MeasurementKind, ReportId, Role, SystemClock,
    TaskConfig, Time, VerifyKey,
};
use hush_tests::cluster::{
    self, InProcessPair, PEER_TOKEN, Stored, aggregator_config, client_task, provision, rejections,
    stats, submit, wait_drained,
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

/// `n` valid reports with random buckets, and the exact histogram they make.
fn valid_reports(client: &ClientTask, n: usize, now: Time, seed: u64) -> (Vec<Vec<u8>>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut expect = vec![0i64; client.task().output_len()];
    let reports = (0..n)
        .map(|_| {
            let b = rng.random_range(0..client.task().output_len());
            expect[b] += 1;
            let p = client
                .shard(&Measurement::Bucket(b), ReportId::random())
                .unwrap();
            client.seal(p, now).unwrap().to_bytes()
        })
        .collect();
    (reports, expect)
}

/// A malicious client's report: it flips a bit of one input share before sealing.
fn corrupted_report(client: &ClientTask, now: Time, role: Role) -> Vec<u8> {
    let mut p = client
        .shard(&Measurement::Bucket(1), ReportId::random())
        .unwrap();
    match role {
        Role::Leader => p.sharded.leader_share[0] ^= 1,
        Role::Helper => p.sharded.helper_share[0] ^= 1,
    }
    client.seal(p, now).unwrap().to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_malicious_replayed_garbage_and_unknown_reports_are_each_counted() {
    let pair = InProcessPair::start(Arc::new(SystemClock)).await;
    let task = histogram_task();
    provision(
        &pair.leader_url(),
        &pair.helper_url(),
        &task,
        &VerifyKey::random(),
    )
    .await;
    let client = client_task(&pair.leader_url(), &pair.helper_url(), &task).await;
    let now = SystemClock.now();

    let (valid, expect) = valid_reports(&client, 2_000, now, 7);
    let malicious: Vec<Vec<u8>> = (0..50)
        .map(|i| {
            corrupted_report(
                &client,
                now,
                if i % 2 == 0 {
                    Role::Leader
                } else {
                    Role::Helper
                },
            )
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(8);
    let garbage: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            (0..rng.random_range(0..2_000 + i))
                .map(|_| rng.random())
                .collect()
        })
        .collect();
    // Reports of a task that was never provisioned, sealed to the right aggregators.
    let other = histogram_task();
    let other_client = client_task(&pair.leader_url(), &pair.helper_url(), &other).await;
    let (unknown, _) = valid_reports(&other_client, 10, now, 9);

    let mut first: Vec<Vec<u8>> = valid
        .iter()
        .chain(&malicious)
        .chain(&garbage)
        .chain(&unknown)
        .cloned()
        .collect();
    use rand::seq::SliceRandom;
    first.shuffle(&mut rng);
    let counts = submit(&pair.leader_url(), &first, 250).await;
    assert_eq!(counts.accepted, 2_050);
    assert_eq!(counts.rejected[&RejectReason::Malformed], 20);
    assert_eq!(counts.rejected[&RejectReason::UnknownTask], 10);
    // 50 replays of reports the leader already took.
    let replays = submit(&pair.leader_url(), &valid[100..150], 50).await;
    assert_eq!(replays.accepted, 0);
    assert_eq!(replays.rejected[&RejectReason::Replay], 50);

    let leader = wait_drained(&pair.leader_url(), &task, Duration::from_secs(60)).await;
    assert_eq!(leader.reports_accepted, 2_050);
    assert_eq!(leader.reports_aggregated, 2_000);
    let lr = rejections(&leader);
    assert_eq!(lr[&RejectReason::InvalidProof], 50);
    assert_eq!(lr[&RejectReason::Replay], 50);
    let global = rejections(&stats(&pair.leader_url(), None).await);
    assert_eq!(global[&RejectReason::Malformed], 20);
    assert_eq!(global[&RejectReason::UnknownTask], 10);
    let helper = stats(&pair.helper_url(), Some(&task)).await;
    assert_eq!(helper.reports_aggregated, 2_000);
    assert_eq!(rejections(&helper)[&RejectReason::InvalidProof], 50);

    let (ld, hd) = pair.shutdown().await;
    let (sum, count) = Stored::read(ld.path(), hd.path(), &task)
        .await
        .unshard(task.output_len());
    assert_eq!(count, 2_000);
    assert_eq!(sum, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_out_of_time_or_sealed_to_another_key_are_refused() {
    let pair = InProcessPair::start(Arc::new(SystemClock)).await;
    let task = histogram_task();
    provision(
        &pair.leader_url(),
        &pair.helper_url(),
        &task,
        &VerifyKey::random(),
    )
    .await;
    let client = client_task(&pair.leader_url(), &pair.helper_url(), &task).await;
    let now = SystemClock.now();
    let old = valid_reports(&client, 3, now.sub_secs(task.report_expiry_s() + 600), 1).0;
    let new = valid_reports(&client, 4, now.add_secs(3_600), 2).0;
    // A client holding a stale or forged leader config with the leader's config id.
    let forged = ClientTask::new(
        task.clone(),
        HpkeKeypair::generate(1).config().clone(),
        client::hpke_configs(&pair.helper_url(), None)
            .await
            .unwrap()[0]
            .clone(),
        client.route().clone(),
    )
    .unwrap();
    let undecryptable = valid_reports(&forged, 5, now, 3).0;
    let all: Vec<Vec<u8>> = old.into_iter().chain(new).chain(undecryptable).collect();
    let counts = submit(&pair.leader_url(), &all, 100).await;
    assert_eq!(counts.accepted, 0);
    assert_eq!(counts.rejected[&RejectReason::TooOld], 3);
    assert_eq!(counts.rejected[&RejectReason::TooNew], 4);
    assert_eq!(counts.rejected[&RejectReason::DecryptFailure], 5);
    let r = rejections(&stats(&pair.leader_url(), Some(&task)).await);
    assert_eq!(
        (
            r[&RejectReason::TooOld],
            r[&RejectReason::TooNew],
            r[&RejectReason::DecryptFailure]
        ),
        (3, 4, 5)
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_job_gets_the_same_answer_and_counts_once() {
    let pair = InProcessPair::start(Arc::new(SystemClock)).await;
    let task = histogram_task();
    let key = VerifyKey::random();
    provision(&pair.leader_url(), &pair.helper_url(), &task, &key).await;
    let client = client_task(&pair.leader_url(), &pair.helper_url(), &task).await;
    let now = task.window_of(SystemClock.now());

    // Play the leader by hand: its verifier shares for 20 reports.
    let leader_keys = pair.leader.shared().keys.keyring();
    let shares: Vec<pb::ReportShare> = (0..20)
        .map(|i| {
            let p = client
                .shard(&Measurement::Bucket(i % 4), ReportId::random())
                .unwrap();
            let r = client.seal(p, now).unwrap();
            let ls = r.open_share(Role::Leader, &leader_keys).unwrap();
            let (_, vs) = client
                .vdaf()
                .verify_init(&key, Role::Leader, r.report_id(), r.public_share(), &ls)
                .unwrap();
            pb::ReportShare {
                report_id: r.report_id().as_bytes().to_vec().into(),
                time: r.time().as_secs(),
                public_share: r.public_share().to_vec().into(),
                encrypted_input_share: Some(r.encrypted_share(Role::Helper).into()),
                leader_verifier_share: vs.into(),
            }
        })
        .collect();
    let job_id = hush_protocol::AggregationJobId::random();
    let request = pb::AggregationJobInitRequest {
        task_id: task.id().as_bytes().to_vec().into(),
        job_id: job_id.as_bytes().to_vec().into(),
        reports: shares.clone(),
    };
    let auth = hush_protocol::link::AddBearer::new(PEER_TOKEN).unwrap();
    let mut helper = HelperAggregationClient::with_interceptor(
        client::channel(&pair.helper_url(), None).unwrap(),
        auth,
    );
    let first = helper
        .init_aggregation_job(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = helper
        .init_aggregation_job(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again);
    assert_eq!(first.outcomes.len(), 20);
    assert!(first.outcomes.iter().all(|o| matches!(
        o.result,
        Some(pb::report_outcome::Result::VerifierMessage(_))
    )));
    assert_eq!(
        stats(&pair.helper_url(), Some(&task))
            .await
            .reports_aggregated,
        20
    );

    // The same job id with other contents is refused; the same reports in a new job are replays.
    let mut other = request.clone();
    other.reports.truncate(10);
    let e = helper.init_aggregation_job(other).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let mut replay = request.clone();
    replay.job_id = hush_protocol::AggregationJobId::random()
        .as_bytes()
        .to_vec()
        .into();
    let r = helper
        .init_aggregation_job(replay)
        .await
        .unwrap()
        .into_inner();
    assert!(r.outcomes.iter().all(|o| o.result
        == Some(pb::report_outcome::Result::Rejected(
            RejectReason::Replay as i32
        ))));
    assert_eq!(
        stats(&pair.helper_url(), Some(&task))
            .await
            .reports_aggregated,
        20
    );

    // Without the leader-helper token, nothing runs.
    let mut anon = HelperAggregationClient::new(client::channel(&pair.helper_url(), None).unwrap());
    let e = anon.init_aggregation_job(request).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_retries_while_the_helper_is_down_and_loses_nothing() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let pair = InProcessPair::start(clock.clone()).await;
    let task = histogram_task();
    provision(
        &pair.leader_url(),
        &pair.helper_url(),
        &task,
        &VerifyKey::random(),
    )
    .await;
    let client = client_task(&pair.leader_url(), &pair.helper_url(), &task).await;
    let helper_addr = pair.helper.local_addr();
    let InProcessPair {
        leader,
        helper,
        leader_dir,
        helper_dir,
    } = pair;
    helper.shutdown().await.unwrap();

    let leader_url = cluster::url(leader.local_addr());
    let (reports, expect) = valid_reports(&client, 600, clock.now(), 11);
    assert_eq!(submit(&leader_url, &reports, 200).await.accepted, 600);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let s = stats(&leader_url, Some(&task)).await;
    assert_eq!(
        (s.reports_aggregated, s.reports_pending),
        (0, 600),
        "nothing aggregates without the helper"
    );

    let helper = Aggregator::start(
        Role::Helper,
        aggregator_config(helper_dir.path(), helper_addr, None),
        cluster::secrets(),
        clock,
    )
    .await
    .unwrap();
    let s = wait_drained(&leader_url, &task, Duration::from_secs(30)).await;
    assert_eq!(s.reports_aggregated, 600);
    leader.shutdown().await.unwrap();
    helper.shutdown().await.unwrap();
    let (sum, count) = Stored::read(leader_dir.path(), helper_dir.path(), &task)
        .await
        .unshard(task.output_len());
    assert_eq!((sum, count), (expect, 600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_its_token_and_refuses_conflicting_tasks() {
    let pair = InProcessPair::start(Arc::new(SystemClock)).await;
    let task = histogram_task();
    let key = VerifyKey::random();
    provision(&pair.leader_url(), &pair.helper_url(), &task, &key).await;

    let mut wrong = client::admin(&pair.leader_url(), "not-the-token", None).unwrap();
    let e = wrong
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let mut admin = client::admin(&pair.leader_url(), cluster::ADMIN_TOKEN, None).unwrap();
    let req = |key: &VerifyKey, role: &str| pb::CreateTaskRequest {
        task: Some((&task).into()),
        vdaf_verify_key: key.as_bytes().to_vec().into(),
        role: role.into(),
    };
    // The same task again is a no-op; with another key it is a conflict; as the helper, wrong role.
    assert!(
        !admin
            .create_task(req(&key, "leader"))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    let e = admin
        .create_task(req(&VerifyKey::random(), "leader"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let e = admin.create_task(req(&key, "helper")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let listed = admin
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1);
    assert_eq!(TaskConfig::try_from(&listed.tasks[0]).unwrap(), task);

    // Rotation: the new key is current, the old one still listed for in-flight reports.
    let before = client::hpke_configs(&pair.leader_url(), None)
        .await
        .unwrap();
    let after = admin
        .rotate_hpke_key(pb::RotateHpkeKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let after = Vec::<hush_protocol::HpkeConfig>::try_from(&after).unwrap();
    assert_eq!(after.len(), 2);
    assert_eq!(after[1], before[0]);
    assert_eq!(
        client::hpke_configs(&pair.leader_url(), None)
            .await
            .unwrap(),
        after
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_report_quota_leaves_other_tenants_untouched() {
    let helper_dir = tempfile::tempdir().unwrap();
    let leader_dir = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let helper = Aggregator::start(
        Role::Helper,
        aggregator_config(helper_dir.path(), any, None),
        cluster::secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let mut config = aggregator_config(
        leader_dir.path(),
        any,
        Some(cluster::url(helper.local_addr())),
    );
    if let Some(l) = config.leader.as_mut() {
        // 1 report/s after a burst of 100 per tenant.
        l.tenant_reports_per_s = 1;
        l.tenant_burst = 100;
    }
    let leader = Aggregator::start(Role::Leader, config, cluster::secrets(), clock)
        .await
        .unwrap();
    let (lu, hu) = (
        cluster::url(leader.local_addr()),
        cluster::url(helper.local_addr()),
    );
    let acme = histogram_task();
    let other = hush_tests::for_tenant(&acme, "other");
    for t in [&acme, &other] {
        provision(&lu, &hu, t, &VerifyKey::random()).await;
    }
    let now = SystemClock.now();
    let (a, _) = valid_reports(&client_task(&lu, &hu, &acme).await, 150, now, 1);
    let (o, _) = valid_reports(&client_task(&lu, &hu, &other).await, 150, now, 2);
    let c = pb::leader_ingest_client::LeaderIngestClient::new(client::channel(&lu, None).unwrap());
    let send = |r: &[Vec<u8>]| {
        let req = pb::SubmitReportsRequest {
            reports: r.iter().map(|x| x.clone().into()).collect(),
        };
        let mut c = c.clone();
        async move { c.submit_reports(req).await }
    };
    assert_eq!(send(&a[..100]).await.unwrap().into_inner().accepted, 100);
    // acme alone over its quota: the whole request is pushed back, nothing stored.
    let e = send(&a[100..130]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("acme"), "{}", e.message());
    // other is not slowed.
    assert_eq!(send(&o[..50]).await.unwrap().into_inner().accepted, 50);
    // A mixed batch from a shuffler: only acme's reports are refused, as OVER_QUOTA.
    let mixed: Vec<Vec<u8>> = a[130..150].iter().chain(&o[50..70]).cloned().collect();
    let r = send(&mixed).await.unwrap().into_inner();
    assert_eq!(r.accepted, 20);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].reason, RejectReason::OverQuota as i32);
    assert_eq!(r.rejected[0].count, 20);
    let (sa, so) = (
        wait_drained(&lu, &acme, Duration::from_secs(60)).await,
        wait_drained(&lu, &other, Duration::from_secs(60)).await,
    );
    assert_eq!(sa.reports_aggregated, 100);
    // 30 refused with the whole request, 20 in the mixed one.
    assert_eq!(rejections(&sa)[&RejectReason::OverQuota], 30 + 20);
    assert_eq!(so.reports_aggregated, 70);
    assert!(rejections(&so).is_empty(), "{so:?}");
    leader.shutdown().await.unwrap();
    helper.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_pending_limit_is_pushed_back_and_others_are_not() {
    let helper_dir = tempfile::tempdir().unwrap();
    let leader_dir = tempfile::tempdir().unwrap();
    let helper_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let start_helper = |clock: Arc<dyn Clock>| {
        Aggregator::start(
            Role::Helper,
            aggregator_config(helper_dir.path(), helper_addr, None),
            cluster::secrets(),
            clock,
        )
    };
    let leader_config = || {
        let mut config = aggregator_config(
            leader_dir.path(),
            "127.0.0.1:0".parse().unwrap(),
            Some(cluster::url(helper_addr)),
        );
        if let Some(l) = config.leader.as_mut() {
            l.tenant_max_pending = 100;
        }
        config
    };
    let helper = start_helper(clock.clone()).await.unwrap();
    let mut leader = Aggregator::start(
        Role::Leader,
        leader_config(),
        cluster::secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let (lu, hu) = (cluster::url(leader.local_addr()), cluster::url(helper_addr));
    let acme = histogram_task();
    let other = hush_tests::for_tenant(&acme, "other");
    for t in [&acme, &other] {
        provision(&lu, &hu, t, &VerifyKey::random()).await;
    }
    let now = SystemClock.now();
    let (a, _) = valid_reports(&client_task(&lu, &hu, &acme).await, 200, now, 1);
    let (o, _) = valid_reports(&client_task(&lu, &hu, &other).await, 100, now, 2);
    // The helper goes away: nothing can be aggregated, so reports stay pending.
    helper.shutdown().await.unwrap();
    let send = |url: String, r: &[Vec<u8>]| {
        let req = pb::SubmitReportsRequest {
            reports: r.iter().map(|x| x.clone().into()).collect(),
        };
        async move {
            pb::leader_ingest_client::LeaderIngestClient::new(client::channel(&url, None).unwrap())
                .submit_reports(req)
                .await
        }
    };
    assert_eq!(
        send(lu.clone(), &a[..100])
            .await
            .unwrap()
            .into_inner()
            .accepted,
        100
    );
    // acme holds its limit: its request is pushed back whole, nothing stored.
    let e = send(lu.clone(), &a[100..130]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("acme") && e.message().contains("100"),
        "{}",
        e.message()
    );
    // other is not affected, alone or mixed with acme's reports.
    assert_eq!(
        send(lu.clone(), &o[..50])
            .await
            .unwrap()
            .into_inner()
            .accepted,
        50
    );
    let mixed: Vec<Vec<u8>> = a[130..150].iter().chain(&o[50..70]).cloned().collect();
    let r = send(lu.clone(), &mixed).await.unwrap().into_inner();
    assert_eq!(r.accepted, 20);
    assert_eq!(r.rejected[0].reason, RejectReason::OverQuota as i32);
    assert_eq!(r.rejected[0].count, 20);
    // The holdings are counted from the store again after a restart.
    leader.shutdown().await.unwrap();
    leader = Aggregator::start(
        Role::Leader,
        leader_config(),
        cluster::secrets(),
        clock.clone(),
    )
    .await
    .unwrap();
    let lu = cluster::url(leader.local_addr());
    let e = send(lu.clone(), &a[150..160]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // Once the helper is back and the reports are aggregated, acme is taken again.
    let helper = start_helper(clock).await.unwrap();
    let s = wait_drained(&lu, &acme, Duration::from_secs(60)).await;
    assert_eq!(s.reports_aggregated, 100);
    assert_eq!(rejections(&s)[&RejectReason::OverQuota], 20 + 30 + 10);
    assert_eq!(
        send(lu.clone(), &a[160..200])
            .await
            .unwrap()
            .into_inner()
            .accepted,
        40
    );
    let s = wait_drained(&lu, &acme, Duration::from_secs(60)).await;
    assert_eq!(s.reports_aggregated, 140);
    let so = wait_drained(&lu, &other, Duration::from_secs(60)).await;
    assert_eq!(so.reports_aggregated, 70);
    assert!(rejections(&so).is_empty(), "{so:?}");
    leader.shutdown().await.unwrap();
    helper.shutdown().await.unwrap();
}
