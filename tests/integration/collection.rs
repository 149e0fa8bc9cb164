//! Collection with DP noise from both aggregators, the budget ledger, tenants, and the checks
//! that both aggregators aggregated the same reports. Real servers on loopback, sled in temp dirs.

use std::sync::Arc;
use std::time::Duration;

use hush_aggregator::client;
use hush_client::ClientTask;
use hush_protocol::collect::{Collected, open_collection};
use hush_protocol::dp::aggregate_noise_stddev;
use hush_protocol::estimate;
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
        p.epsilon_per_collection = Epsilon::from_micros(1_000_000_000);
        p.epsilon_budget = Epsilon::from_micros(10_000_000_000);
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
    assert_eq!(c.report_count, 300);
    assert_eq!(c.epsilon, t.epsilon_per_collection());
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
    // 8 tasks × 5 collections of the same window × 33 buckets = 1,320 noise samples. The
    // relative standard error of their standard deviation is about 1/sqrt(2·1320) ≈ 2%, so the
    // 10% tolerance is five standard errors.
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
        for _ in 0..5 {
            let c = s
                .collect(t, &w, ACME, BudgetPurpose::Routine)
                .await
                .unwrap();
            assert_eq!(c.report_count, 12);
            errors.extend(c.values.iter().zip(expect).map(|(v, e)| (v - e) as f64));
        }
    }
    let n = errors.len() as f64;
    let mean = errors.iter().sum::<f64>() / n;
    let sd = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let theory = aggregate_noise_stddev(tasks[0].0.sensitivity(), eps);
    assert!(
        (sd / theory - 1.0).abs() < 0.10,
        "empirical sd {sd:.3} vs theoretical {theory:.3}"
    );
    // Most buckets hold 0 or 1 report: noise drives many of them below zero, and they decode as
    // small negative numbers, never as huge field elements.
    let values: Vec<f64> = errors.clone();
    assert!(values.iter().any(|e| *e < -3.0));
    assert!(values.iter().all(|e| e.abs() < 200.0));
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_reports_are_refused_and_nothing_is_spent() {
    let s = setup().await;
    let t = task(&s.collector, |p| p.min_batch_size = 100);
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
        e.message().contains("60 reports") && e.message().contains("min_batch_size of 100"),
        "{}",
        e.message()
    );
    // Nothing was closed or spent: late reports still count, and the full routine budget is left.
    s.mock.set(w.start());
    s.submit(&client, 50, 2).await;
    s.mock.set(w.end());
    let c = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    assert_eq!(c.report_count, 110);
    let routine = t.budget_for(false);
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
    s.collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap();
    // Two at once with budget for one: exactly one passes.
    let leader = s.pair.leader_url();
    let (a, b) = tokio::join!(
        collect(&leader, Some(ACME), &t, &w, None, BudgetPurpose::Routine),
        collect(&leader, Some(ACME), &t, &w, None, BudgetPurpose::Routine),
    );
    assert_eq!([a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(), 1);
    let refused = a.err().or(b.err()).unwrap();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("ε 0 left of its routine budget"),
        "{}",
        e.message()
    );

    // A retry of a finished collection gets the same answer and spends nothing.
    let cid = [7u8; 16];
    let s = Setup {
        pair: s.pair.restart(s.clock.clone()).await,
        ..s
    };
    let e = s
        .collect(&t, &w, ACME, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert!(
        e.message().contains("ε 0 left"),
        "the ledger survives a restart: {}",
        e.message()
    );
    let first = collect(
        &s.pair.leader_url(),
        Some(ACME),
        &t,
        &w,
        Some(cid),
        BudgetPurpose::Alert,
    )
    .await
    .unwrap();
    let again = collect(
        &s.pair.leader_url(),
        Some(ACME),
        &t,
        &w,
        Some(cid),
        BudgetPurpose::Alert,
    )
    .await
    .unwrap();
    assert_eq!(first, again);
    assert_eq!(first.budget_left_micro, 6_000_000);
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
    let e = collect(&leader, Some(OTHER), &t, &w, None, BudgetPurpose::Routine)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = collect(
        &leader,
        Some("not-a-token-of-anyone-at-all"),
        &t,
        &w,
        None,
        BudgetPurpose::Routine,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
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
        .unwrap()
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.action == "collect")
        .map(|e| format!("{} {}: {}", e.actor, e.outcome, e.detail))
        .collect();
    assert_eq!(trail.len(), 4, "{trail:#?}");
    assert!(
        trail[0].starts_with("collector:other refused: cross-tenant"),
        "{trail:#?}"
    );
    assert!(
        trail[1].starts_with("unknown refused: wrong collector token"),
        "{trail:#?}"
    );
    assert!(
        trail[2].starts_with("unknown refused: no collector token"),
        "{trail:#?}"
    );
    assert!(
        trail[3].starts_with("collector:acme ok: interval"),
        "{trail:#?}"
    );
    assert!(trail[3].contains("20 reports, spent ε 1"), "{trail:#?}");
    let helper = s.pair.helper.shared().store.audit().entries().unwrap();
    assert!(
        helper
            .iter()
            .map(|e| &e.event)
            .any(|e| e.action == "aggregate_share" && e.outcome == "ok" && e.actor == "leader"),
        "{helper:#?}"
    );
    s.pair.leader.shared().store.audit().verify().unwrap();
    s.pair.helper.shared().store.audit().verify().unwrap();
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
        hush_protocol::auth::AddBearer::new(PEER_TOKEN).unwrap(),
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
    assert!(
        e.message().contains("disagree") && e.message().contains("21 reports"),
        "{}",
        e.message()
    );
    s.pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_ids_aggregates_and_answers_and_audits_it() {
    let s = setup().await;
    let t = task(&s.collector, |p| {
        p.retention_s = 7_200;
        p.epsilon_per_collection = Epsilon::from_micros(1_000_000_000);
        p.epsilon_budget = Epsilon::from_micros(10_000_000_000);
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
    assert_eq!(r.report_count, 100);
    let (leader, helper) = (s.pair.leader.shared(), s.pair.helper.shared());
    for a in [leader, helper] {
        assert_eq!(a.store.seen_count(&t.id()), 100);
        assert_eq!(a.store.batches(&t.id()).unwrap().len(), 1);
        assert!(a.store.collection(&t.id(), &cid).unwrap().is_some());
    }
    // Within retention nothing goes (the ids are still within the report expiry).
    for a in [leader, helper] {
        assert!(hush_aggregator::retention::run_once(a).unwrap().is_empty());
    }
    // Past the report expiry (1 h) the anti-replay ids go; past the retention (2 h) the
    // aggregates and the stored answers too.
    s.mock.advance(7_200 + 60);
    for a in [leader, helper] {
        let deleted = hush_aggregator::retention::run_once(a).unwrap();
        assert_eq!(deleted.len(), 1);
        let d = deleted[0].1;
        assert_eq!((d.seen_ids, d.aggregates, d.collections), (100, 1, 1));
        // Gone from sled.
        assert_eq!(a.store.seen_count(&t.id()), 0);
        assert!(a.store.batches(&t.id()).unwrap().is_empty());
        assert!(a.store.collection(&t.id(), &cid).unwrap().is_none());
        // Reported in the audit trail (counts only), which still verifies.
        let log = a.store.audit();
        log.verify().unwrap();
        let e = log.entries().unwrap().pop().unwrap();
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
        assert!(hush_aggregator::retention::run_once(a).unwrap().is_empty());
    }
    // The deleted window cannot be collected again, and its spent budget is not reset.
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
        leader.store.spent(&t.id(), 0, &[w.start()]).unwrap(),
        [t.epsilon_per_collection().micros()]
    );
    s.pair.shutdown().await;
}
