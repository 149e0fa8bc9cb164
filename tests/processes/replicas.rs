//! Two leader replicas and a helper on one PostgreSQL server, under load, one replica SIGKILLed
//! again and again: every report is aggregated exactly once, jobs of the dead replica are taken
//! over, and racing collections at both replicas never spend more than the budget.

use std::path::Path;
use std::time::{Duration, Instant};

use hush_aggregator::AggregatorConfig;
use hush_aggregator::store::throwaway::{ThrowawayPostgres, fresh_schema};
use hush_aggregator::store::{PgSettings, Store};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::leader_ingest_client::LeaderIngestClient;
use hush_protocol::{
    BudgetPurpose, Clock, Codec, HpkeKeypair, Interval, Measurement, MeasurementKind, ReportId,
    SystemClock, TaskConfig, Time, VerifyKey,
};
use hush_tests::cluster::{
    Stored, client_task, collect, provision, set_tenant_token, stats, wait_drained,
};
use hush_tests::process::{HushProcess, aggregator_args};
use hush_tests::{free_addr, task_params};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::hush_bin;

const URL_ENV: &str = "HUSH_DATABASE_URL";

fn write_config(dir: &Path, name: &str, schema: &str, helper_url: Option<&str>) -> String {
    let mut text = format!(
        "listen = \"{}\"\ndata_dir = \"{}\"\n[store]\nkind = \"postgres\"\nschema = \"{schema}\"\npool_size = 6\n",
        free_addr(),
        dir.join(format!("{name}-unused")).display()
    );
    if let Some(u) = helper_url {
        text.push_str(&format!(
            "[leader]\nhelper_url = \"{u}\"\njob_size = 25\nmax_concurrent_jobs = 2\n\
             job_poll_interval_ms = 20\njob_lease_ms = 1500\nretry_initial_ms = 50\n\
             retry_max_ms = 300\nhelper_timeout_ms = 5000\n"
        ));
    }
    AggregatorConfig::from_toml(&text).expect("valid config");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The jobs a leader's log shows created or taken over and not yet finished, leaving out
/// `gone` (those of incarnations killed before).
fn jobs_in_flight(
    log: &str,
    gone: &std::collections::HashSet<String>,
) -> std::collections::HashSet<String> {
    let mut open = std::collections::HashSet::new();
    for line in log.lines() {
        let Some(id) = line.split_whitespace().find_map(|w| w.strip_prefix("job=")) else {
            continue;
        };
        if line.contains("created an aggregation job")
            || line.contains("took over an aggregation job")
        {
            open.insert(id.to_owned());
        } else if line.contains("aggregation job committed")
            || line.contains("another replica finished this aggregation job")
        {
            open.remove(id);
        }
    }
    open.retain(|id| !gone.contains(id));
    open
}

/// Submits `reports` in chunks, each to one of `urls` in turn, one chunk every `pace` at most; a
/// chunk whose replica does not answer goes to the next one (a replica that stored it before
/// dying makes the resent copies replays, never a second count).
async fn submit_anywhere(urls: &[String], reports: &[Vec<u8>], chunk: usize, pace: Duration) {
    let mut turn = 0usize;
    for c in reports.chunks(chunk) {
        let req = pb::SubmitReportsRequest {
            reports: c.iter().map(|r| r.clone().into()).collect(),
        };
        let started = Instant::now();
        let next = tokio::time::Instant::now() + pace;
        loop {
            let url = &urls[turn % urls.len()];
            turn += 1;
            let sent = async {
                let channel = hush_protocol::link::endpoint(url, None, "leader")
                    .ok()?
                    .connect_timeout(Duration::from_millis(500))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await
                    .ok()?;
                LeaderIngestClient::new(channel)
                    .max_encoding_message_size(usize::MAX)
                    .submit_reports(req.clone())
                    .await
                    .ok()
            }
            .await;
            if sent.is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no replica took a chunk for 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep_until(next).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_leader_replicas_on_postgres_count_every_report_once_while_one_is_killed() {
    let pg = ThrowawayPostgres::shared();
    let env = [(URL_ENV, pg.url())];
    let dir = tempfile::tempdir().unwrap();
    let (leader_schema, helper_schema) = (fresh_schema(), fresh_schema());

    let hc = write_config(dir.path(), "helper", &helper_schema, None);
    let helper = HushProcess::spawn_with_env(
        hush_bin(),
        &aggregator_args("helper", &hc),
        &env,
        &dir.path().join("helper.log"),
    );
    let start_leader = |name: &str| {
        let c = write_config(dir.path(), name, &leader_schema, Some(&helper.url()));
        HushProcess::spawn_with_env(
            hush_bin(),
            &aggregator_args("leader", &c),
            &env,
            &dir.path().join(format!("{name}.log")),
        )
    };
    let mut a = start_leader("leader-a");
    let b = start_leader("leader-b");

    let collector = HpkeKeypair::generate(1);
    let task = TaskConfig::new(task_params(MeasurementKind::EventHistogram, &collector)).unwrap();
    // Provisioned through replica A only: B learns the task from the database.
    provision(&a.url(), &helper.url(), &task, &VerifyKey::random()).await;
    set_tenant_token(&a.url(), &helper.url(), "acme", "acme-collector-token-0123").await;

    let client = client_task(&b.url(), &helper.url(), &task).await;
    let window = Time::from_secs(SystemClock.now().as_secs() / 60 * 60 - 60);
    let mut rng = StdRng::seed_from_u64(19);
    let mut expect = vec![0i64; task.output_len()];
    let reports: Vec<Vec<u8>> = (0..3_000)
        .map(|_| {
            let bucket = rng.random_range(0..task.output_len());
            expect[bucket] += 1;
            client
                .seal(
                    client
                        .shard(&Measurement::Bucket(bucket), ReportId::random())
                        .unwrap(),
                    window,
                )
                .unwrap()
                .to_bytes()
        })
        .collect();

    let urls = vec![a.url(), b.url()];
    // 60 chunks over about 7 s, so the load outlasts the four kills below however fast the
    // machine aggregates.
    let load = tokio::spawn(async move {
        submit_anywhere(&urls, &reports, 50, Duration::from_millis(120)).await
    });
    // Kill replica A four times while reports arrive, each time while it runs a job (jobs
    // take tens of milliseconds: a kill at a random moment can miss them all).
    let mut killed_with = std::collections::HashSet::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let open = jobs_in_flight(&a.log(), &killed_with);
            if !open.is_empty() || Instant::now() > deadline {
                killed_with.extend(open);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a.kill();
        tokio::time::sleep(Duration::from_millis(600)).await;
        a.restart_with(None);
    }
    load.await.unwrap();
    let s = wait_drained(&b.url(), &task, Duration::from_secs(120)).await;
    assert_eq!(
        s.reports_aggregated,
        3_000,
        "{s:?}\nleader A:\n{}\nleader B:\n{}",
        a.log(),
        b.log()
    );
    let taken_over = a.log().matches("took over an aggregation job").count()
        + b.log().matches("took over an aggregation job").count();
    eprintln!(
        "replicas: {} aggregated, {taken_over} jobs taken over, refused {:?}",
        s.reports_aggregated,
        hush_tests::cluster::rejections(&s)
    );
    assert!(
        taken_over > 0,
        "no job was taken over; the kills missed every job\nA:\n{}",
        a.log()
    );

    // Both aggregators hold exactly the reports, once each.
    let read = async |schema: &str| {
        Store::connect(&PgSettings {
            url: pg.url().to_owned(),
            schema: schema.to_owned(),
            pool_size: 1,
        })
        .await
        .unwrap()
    };
    let (leader_store, helper_store) = (read(&leader_schema).await, read(&helper_schema).await);
    let stored = Stored {
        leader: leader_store.batches(&task.id()).await.unwrap(),
        helper: helper_store.batches(&task.id()).await.unwrap(),
    };
    let (sum, count) = stored.unshard(task.output_len());
    assert_eq!(count, 3_000);
    assert_eq!(sum, expect);

    // Collections raced at both replicas: one routine collection of the batch, and as many
    // alert collections as the alert budget holds (7 of 10 ε at 1 ε each), never more.
    let interval = Interval::new(window, 60).unwrap();
    let race = |purpose: pb::BudgetPurpose, n: u8| {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let url = if i % 2 == 0 { a.url() } else { b.url() };
            let task = task.clone();
            set.spawn(async move {
                collect(
                    &url,
                    Some("acme-collector-token-0123"),
                    &task,
                    &interval,
                    Some([i + (purpose as u8) * 50; 16]),
                    purpose,
                )
                .await
            });
        }
        set
    };
    let count_ok = async |mut set: tokio::task::JoinSet<_>| {
        let mut ok = 0;
        while let Some(r) = set.join_next().await {
            let r: Result<pb::CollectResponse, tonic::Status> = r.unwrap();
            match r {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}"),
            }
        }
        ok
    };
    assert_eq!(count_ok(race(pb::BudgetPurpose::Routine, 6)).await, 1);
    assert_eq!(count_ok(race(pb::BudgetPurpose::Alert, 10)).await, 7);
    for (store, name) in [(&leader_store, "leader"), (&helper_store, "helper")] {
        for purpose in BudgetPurpose::ALL {
            let spent = store.spent(&task.id(), purpose, &[window]).await.unwrap()[0];
            let budget = task.budget_for(purpose).micros();
            assert!(
                spent <= budget,
                "{name} spent {spent} of {budget} ({purpose:?})"
            );
        }
    }
    assert_eq!(stats(&a.url(), Some(&task)).await.reports_aggregated, 3_000);
    // The audit trail verifies online, beside the running replicas, through the config.
    let out = std::process::Command::new(hush_bin())
        .args(["audit", "verify", "--config"])
        .arg(dir.path().join("leader-b.toml"))
        .env(URL_ENV, pg.url())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("audit trail intact"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut b, mut helper) = (b, helper);
    for p in [&mut a, &mut b, &mut helper] {
        p.terminate();
    }
}
