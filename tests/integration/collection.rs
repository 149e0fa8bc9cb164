//! Collection with DP noise from both aggregators, the budget ledger, tenants, and the checks
//! that both aggregators aggregated the same reports. Real servers on loopback, sled in temp dirs.

use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::client;
use hush_client::ClientTask;
use hush_collector::estimate;
use hush_protocol::collect::{Collected, open_collection};
use hush_protocol::dp::aggregate_noise_stddev;
use hush_protocol::proto::v1::helper_aggregation_client::HelperAggregationClient;
use hush_protocol::proto::v1::{self as pb, BudgetPurpose};
use hush_protocol::{
    Clock, Codec, Epsilon, HpkeKeypair, Interval, Keyring, Measurement, MeasurementKind, MockClock,
    ReportId, Role, TaskConfig, TaskParams, Time, VerifyKey,
};
use hush_tests::cluster::{
    InProcessPair, PEER_TOKEN, client_task, collect, provision, set_tenant_token, submit,
    wait_drained,
};
use hush_tests::task_params;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;

const ACME: &str = "acme-collector-token-0123456789";
const OTHER: &str = "other-collector-token-0123456789";

/// A clock at a window start, so the window closes 60 s later.
fn clock() -> (Arc<MockClock>, Arc<dyn Clock>) {
    let c = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    (c.clone(), c)
}

/// ε so large that the tests read exact values: 10,000 per collection (the count's 10% is
/// 1,000 at sensitivity 20, so each aggregator's count noise is nonzero with probability
/// about 2e^-50; at 1,000 per collection it was e^-5 per draw and the tests flaked).
fn noiseless(p: &mut TaskParams) {
    p.epsilon_per_collection = Epsilon::from_micros(10_000_000_000);
    p.epsilon_budget = Epsilon::from_micros(100_000_000_000);
}

fn task(collector: &HpkeKeypair, f: impl FnOnce(&mut TaskParams)) -> TaskConfig {
    let mut p = task_params(MeasurementKind::EventHistogram, collector);
    f(&mut p);
    TaskConfig::new(p).unwrap()
}

struct Setup {
    pair: InProcessPair,
    mock: Arc<MockClock>,
    clock: Arc<dyn Clock>,
    collector: HpkeKeypair,
}

async fn setup() -> Setup {
    let (mock, clock) = clock();
    let pair = InProcessPair::start(clock.clone()).await;
    set_tenant_token(&pair.leader_url(), &pair.helper_url(), "acme", ACME).await;
    set_tenant_token(&pair.leader_url(), &pair.helper_url(), "other", OTHER).await;
    Setup {
        pair,
        mock,
        clock,
        collector: HpkeKeypair::generate(1),
    }
}

impl Setup {
    async fn provision(&self, t: &TaskConfig) -> ClientTask {
        provision(
            &self.pair.leader_url(),
            &self.pair.helper_url(),
            t,
            &VerifyKey::random(),
        )
        .await;
        client_task(&self.pair.leader_url(), &self.pair.helper_url(), t).await
    }

    /// Submits `n` random-bucket reports in the current window; returns the exact histogram.
    async fn submit(&self, client: &ClientTask, n: usize, seed: u64) -> Vec<i64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut expect = vec![0i64; client.task().output_len()];
        let now = self.clock.now();
        let reports: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let b = rng.random_range(0..client.task().output_len());
                expect[b] += 1;
                let p = client
                    .shard(&Measurement::Bucket(b), ReportId::random())
                    .unwrap();
                client.seal(p, now).unwrap().to_bytes()
            })
            .collect();
        assert_eq!(
            submit(&self.pair.leader_url(), &reports, 500)
                .await
                .accepted,
            n as u64
        );
        wait_drained(
            &self.pair.leader_url(),
            client.task(),
            Duration::from_secs(60),
        )
        .await;
        expect
    }

    fn window(&self, t: &TaskConfig) -> Interval {
        t.window(self.clock.now()).unwrap()
    }

    async fn collect(
        &self,
        t: &TaskConfig,
        w: &Interval,
        token: &str,
        purpose: BudgetPurpose,
    ) -> Result<Collected, tonic::Status> {
        let r = collect(&self.pair.leader_url(), Some(token), t, w, None, purpose).await?;
        Ok(open_collection(t, &Keyring::new(vec![self.collector.clone()]), &r).unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_large_epsilon_the_result_is_the_exact_histogram_within_its_interval() {
    let s = setup().await;
    let t = task(&s.collector, |p| {
        noiseless(p);
    });
    let client = s.provision(&t).await;
    let expect = s.submit(&client, 300, 1).await;
    let w = s.window(&t);
    // The window is still open.
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    s.mock.advance(60);
    let c = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    // The count is released noisy (its ε here is huge, so the noise rounds to nothing).
    assert_eq!(c.report_count, Some(300));
    assert_eq!(c.epsilon, t.aggregate_epsilon());
    assert!(c.noise_stddev < 0.01, "{}", c.noise_stddev);
    for (i, (v, e)) in c.values.iter().zip(&expect).enumerate() {
        assert!(
            estimate::count(*v, c.noise_stddev).covers(*e as f64),
            "bucket {i}: {v} vs {e}"
        );
    }
    assert_eq!(c.values, expect);
    // Late reports for the collected window are refused.
    let late = client
        .seal(
            client
                .shard(&Measurement::Bucket(0), ReportId::random())
                .unwrap(),
            w.start(),
        )
        .unwrap();
    let r = submit(&s.pair.leader_url(), &[late.to_bytes()], 1).await;
    assert_eq!(r.rejected[&pb::RejectReason::BatchCollected], 1);
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_matches_the_discrete_laplace_of_both_aggregators_and_decodes_negative() {
    // 8 tasks × 5 collections of the same window (one routine, four alert drill-downs) × 33
    // buckets = 1,320 noise samples. The relative standard error of their standard deviation is
    // about 1/sqrt(2·1320) ≈ 2%, so the 10% tolerance is five standard errors. The noise is that
    // of one instance's 20 events per window (sensitivity 40), not of one event.
    let s = setup().await;
    let eps = Epsilon::from_micros(1_000_000);
    let mut errors = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let t = task(&s.collector, |p| {
            p.epsilon_per_collection = eps;
            p.epsilon_budget = Epsilon::from_micros(20_000_000);
        });
        let client = s.provision(&t).await;
        let expect = s.submit(&client, 12, i).await;
        tasks.push((t, expect));
    }
    s.mock.advance(60);
    for (t, expect) in &tasks {
        let w = s.window(t);
        let w = Interval::new(w.start().sub_secs(60), 60).unwrap();
        for i in 0..5 {
            let purpose = if i == 0 {
                BudgetPurpose::Routine
            } else {
                BudgetPurpose::Alert
            };
            let c = s.collect(t, &w, ACME, purpose).await.unwrap();
            assert!(c.report_count.is_some());
            errors.extend(c.values.iter().zip(expect).map(|(v, e)| (v - e) as f64));
        }
    }
    let n = errors.len() as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let sd = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let t0 = &tasks[0].0;
    assert_eq!(t0.sensitivity(), 2 * t0.contribution_bound());
    let theory = aggregate_noise_stddev(t0.sensitivity(), t0.aggregate_epsilon());
    assert!(
        // 1,280 values: 15% fails by chance about 3 times in 10^8 and still catches a
        // mis-scaled noise (10% failed about once in 7,000 runs).
        (sd / theory - 1.0).abs() < 0.15,
        "empirical sd {sd:.3} vs theoretical {theory:.3}"
    );
    // Most buckets hold 0 or 1 report: noise drives many of them below zero, and they decode as
    // small negative numbers, never as huge field elements.
    let values: Vec<f64> = errors.clone();
    assert!(values.iter().any(|e| *e < -3.0));
    assert!(values.iter().all(|e| e.abs() < 20.0 * theory));
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_reports_are_refused_and_nothing_is_spent() {
    let s = setup().await;
    let t = task(&s.collector, |p| {
        p.min_batch_size = 100;
        noiseless(p);
    });
    let client = s.provision(&t).await;
    s.submit(&client, 60, 1).await;
    let w = s.window(&t);
    s.mock.advance(60);
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("min_batch_size of 100"),
        "{}",
        e.message()
    );
    // The refusal does not tell the collector the exact count.
    assert!(!e.message().contains("60"), "{}", e.message());
    // Nothing was closed or spent: late reports still count, and the full routine budget is left.
    s.mock.set(w.start());
    s.submit(&client, 50, 2).await;
    s.mock.set(w.end());
    let c = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    assert_eq!(c.report_count, Some(110));
    let routine = t.budget_for(hush_protocol::BudgetPurpose::Routine);
    assert_eq!(
        c.budget_left.micros(),
        routine.micros() - t.epsilon_per_collection().micros()
    );
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_enforced_atomically_and_survives_restarts() {
    let s = setup().await;
    // ε 1 per collection, total 10: routine 3, alert 7.
    let t = task(&s.collector, |p| p.min_batch_size = 10);
    let client = s.provision(&t).await;
    s.submit(&client, 20, 1).await;
    let w = s.window(&t);
    s.mock.advance(60);
    let first = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    assert_eq!(first.budget_left.micros(), 2_000_000);
    // One routine collection per batch, whatever budget is left.
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("one routine collection per batch"),
        "{}",
        e.message()
    );
    // A retry of a finished collection gets the same answer and spends nothing.
    let cid = [7u8; 16];
    let leader = s.pair.leader_url();
    let once = collect(&leader, Some(ACME), &t, &w, Some(cid), BudgetPurpose::Alert)
        .await
        .unwrap();
    let again = collect(&leader, Some(ACME), &t, &w, Some(cid), BudgetPurpose::Alert)
        .await
        .unwrap();
    assert_eq!(once, again);
    assert_eq!(once.budget_left_micro, 6_000_000);
    for _ in 0..5 {
        s.collect(&t, &w, ACME, BudgetPurpose::Alert).await.unwrap();
    }
    // Two at once with budget for one: exactly one passes.
    let (a, b) = tokio::join!(
        collect(&leader, Some(ACME), &t, &w, None, BudgetPurpose::Alert),
        collect(&leader, Some(ACME), &t, &w, None, BudgetPurpose::Alert),
    );
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1);
    let refused = a.err().or(b.err()).unwrap();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Alert)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("ε 0 left of its alert budget"),
        "{}",
        e.message()
    );

    let s = Setup {
        pair: s.pair.restart(s.clock.clone()).await,
        ..s
    };
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Alert)
        .await
        .unwrap_err();
    assert!(
        e.message().contains("ε 0 left"),
        "the ledger survives a restart: {}",
        e.message()
    );
    let after = collect(
        &s.pair.leader_url(),
        Some(ACME),
        &t,
        &w,
        Some(cid),
        BudgetPurpose::Alert,
    )
    .await
    .unwrap();
    assert_eq!(after, once, "the stored answer survives a restart");
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_of_other_tenants_and_wrong_tokens_are_refused() {
    let s = setup().await;
    let t = task(&s.collector, |p| p.min_batch_size = 10);
    let client = s.provision(&t).await;
    s.submit(&client, 20, 1).await;
    let w = s.window(&t);
    s.mock.advance(60);
    let leader = s.pair.leader_url();
    let cross = collect(&leader, Some(OTHER), &t, &w, None, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    let wrong = collect(
        &leader,
        Some("not-a-token-of-anyone-at-all"),
        &t,
        &w,
        None,
        BudgetPurpose::Routine,
    )
    .await
    .unwrap_err();
    // Another tenant's valid token on a real task gets exactly the answer of a wrong token, and
    // of a task that does not exist: nothing tells a probing tenant which task ids are real.
    let unknown_task = task(&s.collector, |p| {
        p.task_id = hush_protocol::TaskId::from([0xab; 32])
    });
    let missing = collect(
        &leader,
        Some(OTHER),
        &unknown_task,
        &w,
        None,
        BudgetPurpose::Routine,
    )
    .await
    .unwrap_err();
    for e in [&cross, &wrong, &missing] {
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    assert_eq!(
        cross.message().replace(&t.id().to_string(), "<task>"),
        missing
            .message()
            .replace(&unknown_task.id().to_string(), "<task>")
    );
    assert_eq!(cross.message(), wrong.message());
    let e = collect(&leader, None, &t, &w, None, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Refusals spent nothing.
    let c = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    assert_eq!(c.budget_left.micros(), 2_000_000);
    // The leader's audit trail holds every refusal, who asked, and the spend; the helper's the
    // share it released. Both chains verify.
    let trail: Vec<String> = s
        .pair
        .leader
        .shared()
        .store
        .audit()
        .entries()
        .await
        .unwrap()
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.action == "collect")
        .map(|e| format!("{} {}: {}", e.actor, e.outcome, e.detail))
        .collect();
    assert_eq!(trail.len(), 5, "{trail:#?}");
    assert!(
        trail[0].starts_with("collector:other refused: cross-tenant"),
        "{trail:#?}"
    );
    assert!(
        trail[1].starts_with("unknown refused: wrong collector token"),
        "{trail:#?}"
    );
    assert!(
        trail[2].starts_with("unknown refused: unknown task"),
        "{trail:#?}"
    );
    assert!(
        trail[3].starts_with("unknown refused: no collector token"),
        "{trail:#?}"
    );
    assert!(
        trail[4].starts_with("collector:acme ok: interval"),
        "{trail:#?}"
    );
    assert!(trail[4].contains("20 reports, spent ε 1"), "{trail:#?}");
    let helper = s
        .pair
        .helper
        .shared()
        .store
        .audit()
        .entries()
        .await
        .unwrap();
    assert!(
        helper
            .iter()
            .map(|e| &e.event)
            .any(|e| e.action == "aggregate_share" && e.outcome == "ok" && e.actor == "leader"),
        "{helper:#?}"
    );
    s.pair.leader.shared().store.audit().verify().await.unwrap();
    s.pair.helper.shared().store.audit().verify().await.unwrap();
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_with_other_reports_makes_the_collection_fail_loudly() {
    let s = setup().await;
    let t = task(&s.collector, |p| p.min_batch_size = 10);
    let key = VerifyKey::random();
    provision(&s.pair.leader_url(), &s.pair.helper_url(), &t, &key).await;
    let client = client_task(&s.pair.leader_url(), &s.pair.helper_url(), &t).await;
    s.submit(&client, 20, 1).await;
    // Someone holding the peer token sends the helper one job the leader never ran.
    let r = client
        .seal(
            client
                .shard(&Measurement::Bucket(3), ReportId::random())
                .unwrap(),
            s.clock.now(),
        )
        .unwrap();
    let ls = r
        .open_share(Role::Leader, &s.pair.leader.shared().keys.keyring())
        .unwrap();
    let (_, vs) = client
        .vdaf()
        .verify_init(&key, Role::Leader, r.report_id(), r.public_share(), &ls)
        .unwrap();
    let mut helper = HelperAggregationClient::with_interceptor(
        client::channel(&s.pair.helper_url(), None).unwrap(),
        hush_protocol::link::AddBearer::new(PEER_TOKEN).unwrap(),
    );
    helper
        .init_aggregation_job(pb::AggregationJobInitRequest {
            task_id: t.id().as_bytes().to_vec().into(),
            job_id: hush_protocol::AggregationJobId::random()
                .as_bytes()
                .to_vec()
                .into(),
            reports: vec![pb::ReportShare {
                report_id: r.report_id().as_bytes().to_vec().into(),
                time: r.time().as_secs(),
                public_share: r.public_share().to_vec().into(),
                encrypted_input_share: Some(r.encrypted_share(Role::Helper).into()),
                leader_verifier_share: vs.into(),
            }],
        })
        .await
        .unwrap();
    let w = s.window(&t);
    s.mock.advance(60);
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("disagree"), "{}", e.message());
    // The collector learns that they disagree, not the counts; the helper's audit trail has
    // them for the operators.
    assert!(
        !e.message().contains("21") && !e.message().contains("20"),
        "{}",
        e.message()
    );
    let helper_trail = s
        .pair
        .helper
        .shared()
        .store
        .audit()
        .entries()
        .await
        .unwrap();
    assert!(
        helper_trail
            .iter()
            .any(|e| e.event.detail.contains("helper 21 reports, leader 20")),
        "{helper_trail:#?}"
    );
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_ids_aggregates_and_answers_and_audits_it() {
    let s = setup().await;
    let t = task(&s.collector, |p| {
        p.retention_s = 7_200;
        noiseless(p);
    });
    let client = s.provision(&t).await;
    s.submit(&client, 100, 7).await;
    let w = s.window(&t);
    s.mock.advance(60);
    let cid = [9u8; 16];
    let r = collect(
        &s.pair.leader_url(),
        Some(ACME),
        &t,
        &w,
        Some(cid),
        BudgetPurpose::Routine,
    )
    .await
    .unwrap();
    let opened = open_collection(&t, &Keyring::new(vec![s.collector.clone()]), &r).unwrap();
    assert_eq!(opened.report_count, Some(100));
    let (leader, helper) = (s.pair.leader.shared(), s.pair.helper.shared());
    for a in [leader, helper] {
        assert_eq!(a.store.seen_count(&t.id()).await.unwrap(), 100);
        assert_eq!(a.store.batches(&t.id()).await.unwrap().len(), 1);
        assert!(a.store.collection(&t.id(), &cid).await.unwrap().is_some());
    }
    // Within retention nothing goes (the ids are still within the report expiry).
    for a in [leader, helper] {
        assert!(
            hush_aggregator::retention::run_once(a)
                .await
                .unwrap()
                .is_empty()
        );
    }
    // Past the report expiry (1 h) the anti-replay ids go; past the retention (2 h) the
    // aggregates and the stored answers too.
    s.mock.advance(7_200 + 60);
    for a in [leader, helper] {
        let deleted = hush_aggregator::retention::run_once(a).await.unwrap();
        assert_eq!(deleted.len(), 1);
        let d = deleted[0].1;
        assert_eq!((d.seen_ids, d.aggregates, d.collections), (100, 1, 1));
        // The ledger, the closed, released and batch marks and the batch's collection count.
        assert!(d.window_marks >= 5, "{d:?}");
        // Gone from sled.
        assert_eq!(a.store.seen_count(&t.id()).await.unwrap(), 0);
        assert!(a.store.batches(&t.id()).await.unwrap().is_empty());
        assert!(a.store.collection(&t.id(), &cid).await.unwrap().is_none());
        // Reported in the audit trail (counts only), which still verifies.
        let log = a.store.audit();
        log.verify().await.unwrap();
        let e = log.entries().await.unwrap().pop().unwrap();
        assert_eq!(
            (e.event.actor.as_str(), e.event.action.as_str()),
            ("retention", "retention.delete")
        );
        assert_eq!(e.event.task, t.id().to_string());
        assert!(
            e.event.detail.starts_with("100 report ids"),
            "{}",
            e.event.detail
        );
        // A second run finds nothing more.
        assert!(
            hush_aggregator::retention::run_once(a)
                .await
                .unwrap()
                .is_empty()
        );
    }
    // The deleted window cannot be collected again: intervals past the retention are refused
    // before any budget is looked at, so its per-window records could go too.
    let e = collect(
        &s.pair.leader_url(),
        Some(ACME),
        &t,
        &w,
        None,
        BudgetPurpose::Routine,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("retention"), "{}", e.message());
    assert_eq!(
        leader
            .store
            .spent(&t.id(), hush_protocol::BudgetPurpose::Routine, &[w.start()])
            .await
            .unwrap(),
        [0]
    );
    // And a report of that window is refused as too old, not aggregated into it again.
    let late = client
        .seal(
            client
                .shard(&Measurement::Bucket(0), ReportId::random())
                .unwrap(),
            w.start(),
        )
        .unwrap();
    let r = submit(&s.pair.leader_url(), &[late.to_bytes()], 1).await;
    assert_eq!(r.rejected[&pb::RejectReason::TooOld], 1);
    s.pair.shutdown().await;
}

/// One report of `client`'s task for the window at `time`, ready to send to the helper as a
/// malicious leader would: the report share with the leader's verifier share.
fn fake_job_share(s: &Setup, client: &ClientTask, key: &VerifyKey, time: Time) -> pb::ReportShare {
    let r = client
        .seal(
            client
                .shard(&Measurement::Bucket(3), ReportId::random())
                .unwrap(),
            time,
        )
        .unwrap();
    let ls = r
        .open_share(Role::Leader, &s.pair.leader.shared().keys.keyring())
        .unwrap();
    let (_, vs) = client
        .vdaf()
        .verify_init(key, Role::Leader, r.report_id(), r.public_share(), &ls)
        .unwrap();
    pb::ReportShare {
        report_id: r.report_id().as_bytes().to_vec().into(),
        time: r.time().as_secs(),
        public_share: r.public_share().to_vec().into(),
        encrypted_input_share: Some(r.encrypted_share(Role::Helper).into()),
        leader_verifier_share: vs.into(),
    }
}

type PeerClient = HelperAggregationClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        hush_protocol::link::AddBearer,
    >,
>;

fn helper_as_peer(s: &Setup) -> PeerClient {
    HelperAggregationClient::with_interceptor(
        client::channel(&s.pair.helper_url(), None).unwrap(),
        hush_protocol::link::AddBearer::new(PEER_TOKEN).unwrap(),
    )
}

fn share_request(
    t: &TaskConfig,
    w: &Interval,
    cid: u8,
    count: u64,
    checksum: hush_protocol::ReportIdChecksum,
) -> pb::AggregateShareRequest {
    pb::AggregateShareRequest {
        task_id: t.id().as_bytes().to_vec().into(),
        collection_id: vec![cid; 16].into(),
        interval: Some(w.into()),
        report_count: count,
        checksum: checksum.as_bytes().to_vec().into(),
        purpose: BudgetPurpose::Routine as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_intervals_cannot_be_differenced_at_either_aggregator() {
    // The attack: w1 holds 20 reports, w2 only 5 (under min_batch_size 10). Collecting [w1] and
    // then [w1, w2] would give w2's histogram by subtraction. Both aggregators refuse the second.
    let s = setup().await;
    let t = task(&s.collector, |p| p.min_batch_size = 10);
    let client = s.provision(&t).await;
    let w1 = s.window(&t);
    s.submit(&client, 20, 1).await;
    s.mock.advance(60);
    s.submit(&client, 5, 2).await;
    s.mock.advance(60);
    s.collect(&t, &w1, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    let both = Interval::new(w1.start(), 120).unwrap();
    for purpose in [BudgetPurpose::Routine, BudgetPurpose::Alert] {
        let e = s.collect(&t, &both, ACME, purpose).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("overlaps the batch"),
            "{}",
            e.message()
        );
    }
    // A leader that skips its own check and asks the helper directly is refused there too.
    let helper = s.pair.helper.shared();
    let sum = helper
        .store
        .sum_batches(&t.id(), &[w1.start(), w1.end()], t.output_len())
        .await
        .unwrap();
    assert_eq!(sum.report_count, 25);
    let e = helper_as_peer(&s)
        .get_aggregate_share(share_request(&t, &both, 1, 25, sum.checksum))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("overlaps the batch"),
        "{}",
        e.message()
    );
    // Nothing was spent on w2, and both refusals are audited.
    let w2 = w1.end();
    for a in [s.pair.leader.shared(), helper] {
        assert_eq!(
            a.store
                .spent(&t.id(), hush_protocol::BudgetPurpose::Routine, &[w2])
                .await
                .unwrap(),
            [0]
        );
        assert_eq!(
            a.store
                .spent(&t.id(), hush_protocol::BudgetPurpose::Alert, &[w2])
                .await
                .unwrap(),
            [0]
        );
        let refused = a
            .store
            .audit()
            .entries()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event.outcome == "refused: batch rules")
            .count();
        assert!(refused >= 1, "no audited refusal at the {}", a.role);
    }
    // The same batch again is fine (alert budget, fresh noise).
    s.collect(&t, &w1, ACME, BudgetPurpose::Alert)
        .await
        .unwrap();
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collect_once_task_refuses_every_second_collection() {
    let s = setup().await;
    let t = task(&s.collector, |p| {
        p.min_batch_size = 10;
        p.max_collections_per_batch = 1;
    });
    let client = s.provision(&t).await;
    s.submit(&client, 20, 1).await;
    let w = s.window(&t);
    s.mock.advance(60);
    s.collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Alert)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("1 in all"), "{}", e.message());
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_racing_leader_cannot_slip_a_report_into_a_released_window() {
    let s = setup().await;
    let key_of = |_: usize| VerifyKey::random();
    let mut cases = Vec::new();
    // Eight tasks, each with 20 honest reports in the current window.
    for i in 0..8 {
        let t = task(&s.collector, |p| p.min_batch_size = 10);
        let key = key_of(i);
        provision(&s.pair.leader_url(), &s.pair.helper_url(), &t, &key).await;
        let client = client_task(&s.pair.leader_url(), &s.pair.helper_url(), &t).await;
        s.submit(&client, 20, i as u64).await;
        cases.push((t, key, client));
    }
    let start = s.clock.now();
    s.mock.advance(60);
    let helper = s.pair.helper.shared().clone();
    for (i, (t, key, client)) in cases.iter().enumerate() {
        let w = t.window(start).unwrap();
        let before = helper
            .store
            .sum_batches(&t.id(), &[w.start()], t.output_len())
            .await
            .unwrap();
        assert_eq!(before.report_count, 20);
        let job = pb::AggregationJobInitRequest {
            task_id: t.id().as_bytes().to_vec().into(),
            job_id: hush_protocol::AggregationJobId::random()
                .as_bytes()
                .to_vec()
                .into(),
            reports: vec![fake_job_share(&s, client, key, w.start())],
        };
        let req = share_request(t, &w, i as u8, 20, before.checksum);
        let (mut a, mut b) = (helper_as_peer(&s), helper_as_peer(&s));
        // Even cases race the two calls; odd ones release first, then send the job.
        let (share, outcome) = if i % 2 == 0 {
            let (share, job) =
                tokio::join!(a.get_aggregate_share(req), b.init_aggregation_job(job));
            (share, job.unwrap().into_inner())
        } else {
            let share = a.get_aggregate_share(req).await;
            assert!(share.is_ok(), "{share:?}");
            (
                share,
                b.init_aggregation_job(job).await.unwrap().into_inner(),
            )
        };
        let accepted = matches!(
            outcome.outcomes[0].result,
            Some(pb::report_outcome::Result::VerifierMessage(_))
        );
        let after = helper
            .store
            .sum_batches(&t.id(), &[w.start()], t.output_len())
            .await
            .unwrap()
            .report_count;
        if share.is_ok() {
            // Released with 20: the 21st report never entered the window.
            assert!(!accepted, "case {i}: a report entered a released window");
            assert_eq!(after, 20, "case {i}");
            assert_eq!(
                outcome.outcomes[0].result,
                Some(pb::report_outcome::Result::Rejected(
                    pb::RejectReason::BatchCollected as i32
                )),
                "case {i}"
            );
        } else {
            // The job won: the share was refused, nothing released.
            assert!(accepted, "case {i}");
            assert_eq!(after, 21, "case {i}");
            assert_eq!(
                helper
                    .store
                    .spent(&t.id(), hush_protocol::BudgetPurpose::Routine, &[w.start()])
                    .await
                    .unwrap(),
                [0]
            );
        }
    }
    s.pair.shutdown().await;
}

async fn late_count(
    leader_url: &str,
    token: &str,
    t: &TaskConfig,
    w: &Interval,
) -> Result<pb::LateCountResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::LateCountRequest {
        task_id: t.id().as_bytes().to_vec().into(),
        interval: Some(w.into()),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    pb::collection_client::CollectionClient::new(client::channel(leader_url, None).unwrap())
        .collect_late_count(req)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reports_are_counted_and_released_once_with_noise_when_no_more_can_arrive() {
    let s = setup().await;
    let t = task(&s.collector, |p| {
        p.min_batch_size = 10;
        p.report_expiry_s = 600;
        noiseless(p);
    });
    let client = s.provision(&t).await;
    s.submit(&client, 20, 1).await;
    let w = s.window(&t);
    s.mock.advance(60);
    let leader = s.pair.leader_url();
    // Not collected yet: there is no batch to count late reports for.
    let e = late_count(&leader, ACME, &t, &w).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    s.collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    // Three reports of the window arrive after its collection: refused, counted per task.
    let late: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            client
                .seal(
                    client
                        .shard(&Measurement::Bucket(1), ReportId::random())
                        .unwrap(),
                    w.start(),
                )
                .unwrap()
                .to_bytes()
        })
        .collect();
    let r = submit(&leader, &late, 10).await;
    assert_eq!(r.rejected[&pb::RejectReason::BatchCollected], 3);
    let st = hush_tests::cluster::stats(&leader, Some(&t)).await;
    assert_eq!(st.reports_late, 3, "{st:?}");
    // Until the report expiry and the clock skew have passed, more could come: not yet.
    let e = late_count(&leader, ACME, &t, &w).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("can arrive until"), "{}", e.message());
    // Another tenant gets the same answer as for an unknown task.
    let e = late_count(&leader, OTHER, &t, &w).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    s.mock.advance(600 + 300);
    let spent_before = s
        .pair
        .leader
        .shared()
        .store
        .spent(&t.id(), hush_protocol::BudgetPurpose::Routine, &[w.start()])
        .await
        .unwrap()[0];
    let first = late_count(&leader, ACME, &t, &w).await.unwrap();
    assert_eq!(first.noisy_late_reports, 3);
    assert_eq!(first.epsilon_micro, t.count_epsilon().unwrap().micros());
    // Asked again: the same answer, nothing more spent.
    let again = late_count(&leader, ACME, &t, &w).await.unwrap();
    assert_eq!(first, again);
    let spent_after = s
        .pair
        .leader
        .shared()
        .store
        .spent(&t.id(), hush_protocol::BudgetPurpose::Routine, &[w.start()])
        .await
        .unwrap()[0];
    assert_eq!(
        spent_after - spent_before,
        t.count_epsilon().unwrap().micros()
    );
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_intervals_an_attacker_can_send_are_refused_at_once_and_serving_goes_on() {
    let s = setup().await;
    let t = task(&s.collector, |p| p.min_batch_size = 10);
    let client = s.provision(&t).await;
    s.submit(&client, 20, 1).await;
    let w = s.window(&t);
    s.mock.advance(60);
    let leader = s.pair.leader_url();
    let top = u64::MAX - u64::MAX % 60;
    let started = std::time::Instant::now();
    let w0 = w.start().as_secs();
    let room = u64::MAX - w0;
    for (start, duration) in [(w0, room - room % 60), (w0, 60 * 10_001)] {
        let i = Interval::new(Time::from_secs(start), duration).unwrap();
        let e = collect(&leader, Some(ACME), &t, &i, None, BudgetPurpose::Routine)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("collect at most 10000"),
            "{}",
            e.message()
        );
        // A leader sending it straight to the helper gets the same.
        let e = helper_as_peer(&s)
            .get_aggregate_share(share_request(
                &t,
                &i,
                1,
                0,
                hush_protocol::ReportIdChecksum::default(),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // The last window representable: aligned, and in the future, refused without overflow.
    let last = Interval::new(Time::from_secs(top - 60), 60).unwrap();
    let e = collect(&leader, Some(ACME), &t, &last, None, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusals must not build the windows: {:?}",
        started.elapsed()
    );
    // The leader and the helper still serve: a real collection goes through.
    let c = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    assert!(c.report_count.is_some());
    s.pair.shutdown().await;
}
