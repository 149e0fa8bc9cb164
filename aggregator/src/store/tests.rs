//! Tests of the store: atomic commits, the batch rules, nothing entering a closed window,
//! retention and record encodings.

use std::collections::BTreeMap;

use hush_protocol::BudgetPurpose;
use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{
    AggregateShare, AggregationJobId, HpkeCiphertext, ReportId, ReportIdChecksum, TaskId, Time,
};

use super::*;
use crate::error::Error;

fn report(t: u64) -> PendingReport {
    PendingReport {
        report_id: ReportId::random(),
        time: Time::from_secs(t),
        public_share: vec![1; 8],
        leader_share: vec![2; 8],
        helper_share: HpkeCiphertext::new(1, vec![3; 32], vec![4; 20]).unwrap(),
    }
}

/// Stores `reports` of `task` as one ingest request; returns the seq of the record holding the
/// first of them.
async fn store_request(s: &Store, task: TaskId, reports: &[PendingReport]) -> u64 {
    let batch: Vec<_> = reports.iter().map(|r| (task, r.clone())).collect();
    s.store_pending(&batch, 1_000, &StatDelta::default())
        .await
        .unwrap();
    record_of(s, task, &reports[0].report_id).await
}

/// The seq of the pending record of `task` holding report `id`.
async fn record_of(s: &Store, task: TaskId, id: &ReportId) -> u64 {
    s.scan_pending(&task, usize::MAX, |_| false)
        .await
        .unwrap()
        .into_iter()
        .find(|(_, rs)| rs.iter().any(|r| r.report_id == *id))
        .expect("the report is pending")
        .0
}

fn ids(reports: &[PendingReport]) -> Vec<ReportId> {
    reports.iter().map(|r| r.report_id).collect()
}

async fn retention_deletes_old_pending_reports_but_not_those_in_a_job(s: Store) {
    let task = TaskId::random();
    // A record in a job, one with old and fresh reports, one with only old ones.
    let in_job = [report(60)];
    let mixed = [report(60), report(600), report(60)];
    let old = [report(60), report(60)];
    let job_seq = store_request(&s, task, &in_job).await;
    let mixed_seq = store_request(&s, task, &mixed).await;
    let old_seq = store_request(&s, task, &old).await;
    s.put_job(
        &AggregationJobId::random(),
        &LeaderJob {
            task_id: task,
            seqs: vec![job_seq],
            reports: 1,
            created: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(s.pending_count(&task).await.unwrap(), 6);
    assert_eq!(
        s.expire_pending(&task, Time::from_secs(120)).await.unwrap(),
        4
    );
    // Read together, in the order asked, with a gap where one is gone; the mixed record keeps
    // its fresh report only.
    let read: Vec<Option<Vec<ReportId>>> = s
        .pending_reports(&task, &[mixed_seq, old_seq, job_seq])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.map(|r| ids(&r)))
        .collect();
    assert_eq!(
        read,
        vec![Some(ids(&mixed[1..2])), None, Some(ids(&in_job))]
    );
    assert_eq!(s.pending_count(&task).await.unwrap(), 2);
    assert_eq!(s.pending_total().await.unwrap(), 2);
    assert_eq!(
        s.stats(task.as_bytes()).await.unwrap()[&Stat::Rejected(RejectReason::TooOld)],
        4
    );
    assert_eq!(
        s.expire_pending(&task, Time::from_secs(120)).await.unwrap(),
        0
    );
}

async fn pending_reports_of_the_earlier_format_are_records_of_one(s: Store) {
    // Before records, every report was its own entry: a store upgraded with some pending
    // reports and a job in flight reads them as records of one report.
    let task = TaskId::random();
    let (a, b, c) = (report(60), report(60), report(600));
    let seqs = s.next_seqs(3).await.unwrap();
    let writes = [&a, &b, &c]
        .iter()
        .zip(&seqs)
        .map(|(r, q)| (pending_key(&task, *q), Some(r.to_bytes())))
        .collect();
    s.backend.apply(backend::T::Pending, writes).await.unwrap();
    let mut old_job = vec![2];
    task.encode(&mut old_job);
    old_job.extend_from_slice(&60u64.to_be_bytes());
    old_job.extend_from_slice(&1u32.to_be_bytes());
    old_job.extend_from_slice(&seqs[0].to_be_bytes());
    let id = AggregationJobId::random();
    s.backend
        .apply(
            backend::T::Jobs,
            vec![(id.as_bytes().to_vec(), Some(old_job))],
        )
        .await
        .unwrap();
    assert_eq!(s.pending_count(&task).await.unwrap(), 3);
    let (_, job) = s
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .find(|(j, _)| *j == id)
        .unwrap();
    assert_eq!(job.reports, 1);
    assert_eq!(
        s.pending_reports(&task, &job.seqs).await.unwrap(),
        vec![Some(vec![a.clone()])]
    );
    // Retention takes the old one outside the job; the job commits its own.
    assert_eq!(
        s.expire_pending(&task, Time::from_secs(120)).await.unwrap(),
        1
    );
    let mut sum = BatchAggregation::empty(2);
    sum.report_count = 1;
    sum.checksum.update(&a.report_id);
    s.commit_leader_job(
        &id,
        &job,
        &BTreeMap::from([(Time::from_secs(60), sum)]),
        &StatDelta::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        s.scan_pending(&task, 10, |_| false).await.unwrap(),
        vec![(seqs[2], vec![c])]
    );
    assert_eq!(s.pending_count(&task).await.unwrap(), 1);
}

async fn retention_deletes_old_aggregates_and_answers_and_keeps_the_ledger(s: Store) {
    let task = TaskId::random();
    let other = TaskId::random();
    let windows = [
        Time::from_secs(0),
        Time::from_secs(60),
        Time::from_secs(120),
    ];
    for t in [task, other] {
        let mut b = BatchAggregation::empty(4);
        b.report_count = 1;
        let batches: Vec<(Vec<u8>, &BatchAggregation)> =
            windows.iter().map(|w| (batch_key(&t, *w), &b)).collect();
        transact!(s, [Batches], |tx| merge_batches(tx, &batches)).unwrap();
        for (i, w) in windows.iter().enumerate() {
            let commit = CollectionCommit {
                task: &t,
                collection_id: &[i as u8; 16],
                rule: BatchRule {
                    batch: (*w, 60),
                    purpose: BudgetPurpose::Routine,
                    max_collections: 0,
                },
                summed: (1, ReportIdChecksum::default()),
                windows: &[*w],
                epsilon_micros: 1,
                budget_micros: 10,
                request_hash: [0; 32],
                answer: b"answer",
            };
            s.commit_collection(&commit).await.unwrap().unwrap();
        }
    }
    let cutoff = Time::from_secs(120);
    assert_eq!(s.expire_aggregates(&task, cutoff).await.unwrap(), 2);
    assert_eq!(s.expire_collections(&task, cutoff).await.unwrap(), 2);
    assert_eq!(
        s.batches(&task)
            .await
            .unwrap()
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [Time::from_secs(120)]
    );
    assert!(s.collection(&task, &[0; 16]).await.unwrap().is_none());
    assert!(s.collection(&task, &[1; 16]).await.unwrap().is_none());
    assert!(s.collection(&task, &[2; 16]).await.unwrap().is_some());
    // The ledger and the collected marks stay; the other task is untouched.
    assert_eq!(
        s.spent(&task, BudgetPurpose::Routine, &windows)
            .await
            .unwrap(),
        [1, 1, 1]
    );
    assert_eq!(s.collected_windows().await.unwrap().len(), 6);
    assert_eq!(s.batches(&other).await.unwrap().len(), 3);
    assert!(s.collection(&other, &[0; 16]).await.unwrap().is_some());
    assert_eq!(s.expire_collections(&task, cutoff).await.unwrap(), 0);
}

async fn pending_reports_are_stored_once_and_scanned_in_order(s: Store) {
    let task = TaskId::random();
    let other = TaskId::random();
    let a = report(60);
    let b = report(60);
    let x = report(60);
    // Two tasks in one request: a record per task.
    let batch = vec![(task, a.clone()), (other, x.clone()), (task, b.clone())];
    assert_eq!(
        s.store_pending(&batch, 1_000, &StatDelta::default())
            .await
            .unwrap(),
        vec![Ingested::Stored; 3]
    );
    // A replay of `a`, a report twice in the same request, and records of at most two.
    let (c, d, e) = (report(120), report(120), report(120));
    let again: Vec<_> = [&a, &c, &c, &d, &e]
        .into_iter()
        .map(|r| (task, r.clone()))
        .collect();
    assert_eq!(
        s.store_pending(&again, 2, &StatDelta::default())
            .await
            .unwrap(),
        vec![
            Ingested::Replay,
            Ingested::Stored,
            Ingested::Replay,
            Ingested::Stored,
            Ingested::Stored
        ]
    );
    let scanned = s.scan_pending(&task, 10, |_| false).await.unwrap();
    assert_eq!(
        scanned.iter().map(|(_, r)| ids(r)).collect::<Vec<_>>(),
        vec![ids(&[a, b.clone()]), ids(&[c.clone(), d]), ids(&[e])]
    );
    assert_eq!(
        s.scan_pending(&other, 10, |_| false).await.unwrap()[0].1,
        vec![x]
    );
    assert_eq!(s.pending_count(&task).await.unwrap(), 5);
    assert_eq!(s.pending_total().await.unwrap(), 6);
    // A job of at most three reports takes whole records that fit (the first one always),
    // skipping those other jobs hold.
    let seqs: Vec<u64> = scanned.iter().map(|(q, _)| *q).collect();
    let fit = |limit, held: Vec<u64>| {
        let s = s.clone();
        async move {
            s.scan_pending(&task, limit, |q| held.contains(&q))
                .await
                .unwrap()
                .into_iter()
                .map(|(q, _)| q)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(fit(3, vec![]).await, vec![seqs[0]]);
    assert_eq!(fit(4, vec![]).await, vec![seqs[0], seqs[1]]);
    assert_eq!(fit(1, vec![]).await, vec![seqs[0]]);
    assert_eq!(fit(3, vec![seqs[0]]).await, vec![seqs[1], seqs[2]]);
    assert_eq!(fit(1, vec![seqs[0]]).await, vec![seqs[1]]);
    // Records written under a larger job size are split to the size the leader runs with now,
    // except one a job holds.
    s.put_job(
        &AggregationJobId::random(),
        &LeaderJob {
            task_id: task,
            seqs: vec![seqs[0]],
            reports: 2,
            created: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(s.split_pending_records(1).await.unwrap(), 1);
    let after = s.scan_pending(&task, 10, |_| false).await.unwrap();
    assert_eq!(
        after.iter().map(|(_, r)| ids(r)).collect::<Vec<_>>(),
        vec![
            ids(&scanned[0].1),
            ids(&scanned[1].1[..1]),
            ids(&scanned[2].1),
            ids(&scanned[1].1[1..])
        ]
    );
    // The second part comes last, under a new seq.
    assert_eq!(after[2].0, seqs[2]);
    assert_eq!(s.pending_count(&task).await.unwrap(), 5);
    assert_eq!(s.split_pending_records(1).await.unwrap(), 0);
    // More records than one transaction splits: all of them, a few at a time.
    let many = TaskId::random();
    for _ in 0..20 {
        let batch: Vec<_> = (0..3).map(|_| (many, report(60))).collect();
        s.store_pending(&batch, 3, &StatDelta::default())
            .await
            .unwrap();
    }
    assert_eq!(s.split_pending_records(2).await.unwrap(), 20);
    let parts = s.scan_pending(&many, usize::MAX, |_| false).await.unwrap();
    assert_eq!(parts.len(), 40);
    assert!(parts.iter().all(|(_, r)| r.len() <= 2));
    assert_eq!(s.pending_count(&many).await.unwrap(), 60);
    let st = s.stats(task.as_bytes()).await.unwrap();
    assert_eq!(st[&Stat::Accepted], 5);
    assert_eq!(st[&Stat::Rejected(RejectReason::Replay)], 2);
    assert_eq!(s.expire_seen(&task, Time::from_secs(61)).await.unwrap(), 2);
    assert!(
        !s.is_seen(&task, Time::from_secs(60), &b.report_id)
            .await
            .unwrap()
    );
    assert!(
        s.is_seen(&task, Time::from_secs(120), &c.report_id)
            .await
            .unwrap()
    );
}

async fn committing_a_leader_job_is_atomic_and_refuses_a_vanished_job(s: Store) {
    let task = TaskId::random();
    let r = report(60);
    let seq = store_request(&s, task, std::slice::from_ref(&r)).await;
    let job = LeaderJob {
        task_id: task,
        seqs: vec![seq],
        reports: 1,
        created: Some(Time::from_secs(60)),
    };
    let id = AggregationJobId::random();
    s.put_job(&id, &job).await.unwrap();
    let mut b = BatchAggregation::empty(2);
    b.report_count = 1;
    b.checksum.update(&r.report_id);
    let batches = BTreeMap::from([(Time::from_secs(60), b.clone())]);
    s.commit_leader_job(&id, &job, &batches, &StatDelta::default())
        .await
        .unwrap();
    assert_eq!(s.pending_count(&task).await.unwrap(), 0);
    assert_eq!(s.batch(&task, Time::from_secs(60)).await.unwrap(), Some(b));
    // A second commit of the same job must not count twice.
    assert!(
        s.commit_leader_job(&id, &job, &batches, &StatDelta::default())
            .await
            .is_err()
    );
    assert_eq!(
        s.batch(&task, Time::from_secs(60))
            .await
            .unwrap()
            .unwrap()
            .report_count,
        1
    );
}

async fn commit(
    s: &Store,
    task: &TaskId,
    cid: u8,
    batch: (Time, u64),
    purpose: BudgetPurpose,
    max: u32,
) -> std::result::Result<u64, CollectRefusal> {
    let windows: Vec<Time> = (0..batch.1 / 60)
        .map(|i| batch.0.add_secs(60 * i))
        .collect();
    let sum = s.sum_batches(task, &windows, 2).await.unwrap();
    s.commit_collection(&CollectionCommit {
        task,
        collection_id: &[cid; 16],
        rule: BatchRule {
            batch,
            purpose,
            max_collections: max,
        },
        summed: (sum.report_count, sum.checksum),
        windows: &windows,
        epsilon_micros: 1,
        budget_micros: 100,
        request_hash: [0; 32],
        answer: b"a",
    })
    .await
    .unwrap()
}

async fn batches_are_collected_equal_or_disjoint_and_as_often_as_allowed(s: Store) {
    let t = TaskId::random();
    let (w0, w1, w2) = (
        Time::from_secs(0),
        Time::from_secs(60),
        Time::from_secs(120),
    );
    commit(&s, &t, 1, (w0, 60), BudgetPurpose::Routine, 0)
        .await
        .unwrap();
    // [w0, w1] overlaps [w0]: refused, whatever the purpose; nothing written.
    assert_eq!(
        commit(&s, &t, 2, (w0, 120), BudgetPurpose::Alert, 0).await,
        Err(CollectRefusal::Overlaps {
            window: w0,
            batch: (w0, 60)
        })
    );
    assert_eq!(
        s.spent(&t, BudgetPurpose::Alert, &[w0, w1]).await.unwrap(),
        [0, 0]
    );
    // A second routine collection of [w0] is refused; alert drill-downs of it are not.
    assert!(matches!(
        commit(&s, &t, 3, (w0, 60), BudgetPurpose::Routine, 0).await,
        Err(CollectRefusal::Exhausted {
            routine: 1,
            alert: 0
        })
    ));
    commit(&s, &t, 4, (w0, 60), BudgetPurpose::Alert, 0)
        .await
        .unwrap();
    commit(&s, &t, 5, (w0, 60), BudgetPurpose::Alert, 0)
        .await
        .unwrap();
    assert_eq!(s.batch_collections(&t, (w0, 60)).await.unwrap(), (1, 2));
    // A disjoint batch is fine; with max 1 it is collected once in all.
    commit(&s, &t, 6, (w1, 120), BudgetPurpose::Alert, 1)
        .await
        .unwrap();
    assert!(matches!(
        commit(&s, &t, 7, (w1, 120), BudgetPurpose::Alert, 1).await,
        Err(CollectRefusal::Exhausted {
            routine: 0,
            alert: 1
        })
    ));
    // [w2] alone now overlaps [w1, w2].
    assert!(matches!(
        commit(&s, &t, 8, (w2, 60), BudgetPurpose::Routine, 0).await,
        Err(CollectRefusal::Overlaps { .. })
    ));
    assert!(s.is_released(&t, w2).await.unwrap());
}

async fn nothing_enters_a_released_or_closed_window(s: Store) {
    let task = TaskId::random();
    let w = Time::from_secs(60);
    // A job holding a report of `w` is in flight when `w` is released.
    let r = report(60);
    let seq = store_request(&s, task, std::slice::from_ref(&r)).await;
    let job = LeaderJob {
        task_id: task,
        seqs: vec![seq],
        reports: 1,
        created: Some(Time::from_secs(60)),
    };
    let id = AggregationJobId::random();
    s.put_job(&id, &job).await.unwrap();
    commit(&s, &task, 1, (w, 60), BudgetPurpose::Routine, 0)
        .await
        .unwrap();
    let mut b = BatchAggregation::empty(2);
    b.report_count = 1;
    b.checksum.update(&r.report_id);
    let left_out = s
        .commit_leader_job(&id, &job, &BTreeMap::from([(w, b)]), &StatDelta::default())
        .await
        .unwrap();
    assert_eq!(left_out, 1);
    assert!(s.batch(&task, w).await.unwrap().is_none());
    assert_eq!(
        s.stats(task.as_bytes()).await.unwrap()[&Stat::Rejected(RejectReason::BatchCollected)],
        1
    );
    // A report of the closed window is refused at ingest and counted late.
    let late = (task, report(60));
    assert_eq!(
        s.store_pending(std::slice::from_ref(&late), 1_000, &StatDelta::default())
            .await
            .unwrap(),
        [Ingested::Late]
    );
    // Resent, it is a replay: the late count counts each report once.
    assert_eq!(
        s.store_pending(&[late], 1_000, &StatDelta::default())
            .await
            .unwrap(),
        [Ingested::Replay]
    );
    assert_eq!(s.late_in(&task, &[w]).await.unwrap(), 1);
    // One request across a closed and an open window, interleaved: each report is judged by
    // its own window.
    let mixed: Vec<_> = [60, 120, 60, 120]
        .iter()
        .map(|t| (task, report(*t)))
        .collect();
    assert_eq!(
        s.store_pending(&mixed, 1_000, &StatDelta::default())
            .await
            .unwrap(),
        [
            Ingested::Late,
            Ingested::Stored,
            Ingested::Late,
            Ingested::Stored
        ]
    );
    assert_eq!(s.late_in(&task, &[w]).await.unwrap(), 3);
    // The helper's job commit refuses a verified report of a released window, even when
    // the quick check before verification passed (the race the transaction closes).
    let hr = HelperReport {
        report_id: ReportId::random(),
        time: w,
        outcome: Ok((AggregateShare::zero(2), vec![1, 2, 3])),
        mark_seen: true,
    };
    let before = s.batch(&task, w).await.unwrap();
    let out = s
        .commit_helper_job(
            &task,
            &AggregationJobId::random(),
            w,
            [0; 32],
            2,
            &[hr],
            |o| format!("{:?}", o[0].1).into_bytes(),
        )
        .await
        .unwrap();
    let HelperCommit::Committed(resp) = out else {
        panic!("a new job")
    };
    assert_eq!(String::from_utf8(resp).unwrap(), "Err(BatchCollected)");
    assert_eq!(s.batch(&task, w).await.unwrap(), before);
    // A job across a released and an open window, interleaved: each report is judged by its
    // own window.
    let later = Time::from_secs(600);
    let hrs: Vec<HelperReport> = [w, later, w, later]
        .iter()
        .map(|t| HelperReport {
            report_id: ReportId::random(),
            time: *t,
            outcome: Ok((AggregateShare::zero(2), vec![1])),
            mark_seen: true,
        })
        .collect();
    let out = s
        .commit_helper_job(
            &task,
            &AggregationJobId::random(),
            w,
            [0; 32],
            2,
            &hrs,
            |o| format!("{:?}", o.iter().map(|(_, r)| r.is_ok()).collect::<Vec<_>>()).into_bytes(),
        )
        .await
        .unwrap();
    let HelperCommit::Committed(resp) = out else {
        panic!("a new job")
    };
    assert_eq!(
        String::from_utf8(resp).unwrap(),
        "[false, true, false, true]"
    );
    assert_eq!(s.batch(&task, w).await.unwrap(), before);
    assert_eq!(
        s.batch(&task, later).await.unwrap().unwrap().report_count,
        2
    );
    // A commit whose sum is stale (a job landed after it) is refused.
    let t2 = TaskId::random();
    let stale = s
        .commit_collection(&CollectionCommit {
            task: &t2,
            collection_id: &[1; 16],
            rule: BatchRule {
                batch: (w, 60),
                purpose: BudgetPurpose::Routine,
                max_collections: 0,
            },
            summed: (5, ReportIdChecksum::default()),
            windows: &[w],
            epsilon_micros: 1,
            budget_micros: 100,
            request_hash: [0; 32],
            answer: b"a",
        })
        .await;
    assert!(matches!(stale, Err(Error::Mismatch(_))), "{stale:?}");
}

#[test]
fn records_round_trip() {
    let r = report(5);
    assert_eq!(PendingReport::from_bytes(&r.to_bytes()).unwrap(), r);
    let rec = PendingRecord(vec![report(5), report(65)]);
    let bytes = rec.to_bytes();
    assert_eq!(PendingRecord::from_bytes(&bytes).unwrap(), rec);
    assert_eq!(PendingRecord::count_encoded(&bytes), 2);
    // A record of the earlier format is one bare report.
    assert_eq!(
        PendingRecord::from_bytes(&r.to_bytes()).unwrap(),
        PendingRecord(vec![r.clone()])
    );
    assert_eq!(PendingRecord::count_encoded(&r.to_bytes()), 1);
    // A count the record cannot hold is refused, not allocated.
    let mut huge = bytes.clone();
    huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(PendingRecord::from_bytes(&huge).is_err());
    assert!(PendingRecord::from_bytes(&[2, 0, 0, 0, 0]).is_err());
    let j = LeaderJob {
        task_id: TaskId::random(),
        seqs: vec![1, 5, 9],
        reports: 12,
        created: Some(Time::from_secs(1_800)),
    };
    assert_eq!(LeaderJob::from_bytes(&j.to_bytes()).unwrap(), j);
    // A job of the earlier format held one report per seq.
    let mut v2 = vec![2];
    j.task_id.encode(&mut v2);
    v2.extend_from_slice(&1_800u64.to_be_bytes());
    v2.extend_from_slice(&3u32.to_be_bytes());
    for q in [1u64, 5, 9] {
        v2.extend_from_slice(&q.to_be_bytes());
    }
    assert_eq!(
        LeaderJob::from_bytes(&v2).unwrap(),
        LeaderJob { reports: 3, ..j }
    );
    let mut b = BatchAggregation::empty(3);
    b.report_count = 7;
    assert_eq!(BatchAggregation::decode(&b.encode()).unwrap(), b);
}

#[test]
fn file_records_round_trip_and_refuse_what_does_not_fit() {
    use records::FileRecord;
    let (a, b) = (report(5), report(65));
    let (ea, eb) = (a.to_bytes(), b.to_bytes());
    // Two reports of a request's write, with 3 bytes of another report between them.
    let mut span = ea.clone();
    span.extend_from_slice(&[9, 9, 9]);
    span.extend_from_slice(&eb);
    let at = [(0, ea.len() as u32), (ea.len() as u32 + 3, eb.len() as u32)];
    let v = FileRecord::encode(4, 1_000, span.len() as u32, &at);
    assert!(FileRecord::is(&v));
    assert_eq!(PendingRecord::count_encoded(&v), 2);
    let r = FileRecord::decode_stored(&v).unwrap();
    assert_eq!((r.file, r.base, r.span), (4, 1_000, span.len() as u32));
    assert_eq!(
        PendingRecord::decode_stored(&r.to_record_bytes(&span)).unwrap(),
        PendingRecord(vec![a, b])
    );
    // Not a record of reports itself, and a report past the span or a count that does not
    // match is refused.
    assert!(PendingRecord::decode_stored(&v).is_err());
    let past = FileRecord::encode(4, 1_000, 10, &at);
    assert!(FileRecord::decode_stored(&past).is_err());
    let mut short = v.clone();
    short.pop();
    assert!(FileRecord::decode_stored(&short).is_err());
    assert!(FileRecord::decode_stored(&FileRecord::encode(4, 0, 0, &[])).is_err());
    // Reports that overlap (or repeat) are refused: a record's bytes are at most its span.
    let overlap = FileRecord::encode(4, 0, 20, &[(0, 10), (5, 10)]);
    assert!(FileRecord::decode_stored(&overlap).is_err());
}

/// A second process's view of the same database: another connection pool on PostgreSQL (a
/// replica), the same handle on sled (which allows one process per database).
async fn replica(s: &Store) -> Store {
    match &s.backend {
        backend::Backend::Sled(_) => s.clone(),
        backend::Backend::Pg(p) => Store::connect(p.settings()).await.unwrap(),
    }
}

async fn one_report_offered_by_two_replicas_at_once_is_stored_once(s: Store) {
    let other = replica(&s).await;
    let task = TaskId::random();
    for round in 0..20 {
        let r = report(60 * (round + 1));
        let one = [(task, r.clone())];
        let none = StatDelta::default();
        let (a, b) = tokio::join!(
            s.store_pending(&one, 1_000, &none),
            other.store_pending(&one, 1_000, &none),
        );
        let mut got = [a.unwrap()[0], b.unwrap()[0]];
        got.sort_by_key(|i| *i != Ingested::Stored);
        assert_eq!(got, [Ingested::Stored, Ingested::Replay], "round {round}");
    }
    assert_eq!(s.pending_count(&task).await.unwrap(), 20);
    let st = other.stats(task.as_bytes()).await.unwrap();
    assert_eq!(st[&Stat::Accepted], 20);
    assert_eq!(st[&Stat::Rejected(RejectReason::Replay)], 20);
}

async fn the_last_of_a_budget_is_spent_once_by_two_replicas_at_once(s: Store) {
    let other = replica(&s).await;
    let task = TaskId::random();
    let w = Time::from_secs(600);
    let collect = |store: Store, cid: u8| async move {
        store
            .commit_collection(&CollectionCommit {
                task: &task,
                collection_id: &[cid; 16],
                rule: BatchRule {
                    batch: (w, 60),
                    purpose: BudgetPurpose::Alert,
                    max_collections: 0,
                },
                summed: (0, ReportIdChecksum::default()),
                windows: &[w],
                epsilon_micros: 30,
                budget_micros: 100,
                request_hash: [cid; 32],
                answer: b"a",
            })
            .await
            .unwrap()
    };
    // 100 µε of budget, 30 per collection: 3 of 8 racing collections may spend, never 4.
    let mut racing = tokio::task::JoinSet::new();
    for cid in 0..8u8 {
        let store = if cid % 2 == 0 {
            s.clone()
        } else {
            other.clone()
        };
        racing.spawn(collect(store, cid));
    }
    let mut spent = 0;
    while let Some(r) = racing.join_next().await {
        match r.unwrap() {
            Ok(_) => spent += 1,
            Err(CollectRefusal::OverBudget { .. }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(spent, 3);
    assert_eq!(
        s.spent(&task, BudgetPurpose::Alert, &[w]).await.unwrap(),
        [90]
    );
}

async fn the_audit_chain_stays_one_chain_under_appends_from_two_replicas(s: Store) {
    let other = replica(&s).await;
    let event = |i: usize| crate::audit::AuditEvent {
        actor: "admin".into(),
        action: "task.create".into(),
        task: format!("task-{i}"),
        outcome: "ok".into(),
        ..Default::default()
    };
    let (a, b) = (s.audit().clone(), other.audit().clone());
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let log = if w % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                for i in 0..10 {
                    log.append(1_000, event(w * 10 + i)).unwrap();
                }
            })
        })
        .collect();
    // A check while the appends go on verifies what it read.
    s.audit()
        .verify()
        .await
        .expect("the chain verifies while it grows");
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(other.audit().verify().await, Ok(40));
    let entries = s.audit().entries().await.unwrap();
    let mut tasks: Vec<String> = entries.iter().map(|e| e.event.task.clone()).collect();
    tasks.sort();
    tasks.dedup();
    assert_eq!(tasks.len(), 40, "every append is in the chain once");
}

async fn jobs_hold_each_report_once_and_outlive_a_dead_replica(s: Store) {
    let other = replica(&s).await;
    let task = TaskId::random();
    // Requests of different sizes: records of at most 7 (the 9 becomes 7 and 2).
    for n in [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 6] {
        let batch: Vec<_> = (0..n).map(|_| (task, report(60))).collect();
        s.store_pending(&batch, 7, &StatDelta::default())
            .await
            .unwrap();
    }
    let (a, b) = (
        Lease {
            owner: "a".into(),
            ms: 60_000,
        },
        Lease {
            owner: "b".into(),
            ms: 60_000,
        },
    );
    // Two replicas create jobs at once, over and over: no record is in two jobs, and no job
    // holds more than 7 reports. (On sled the one process's driver knows its jobs' records and
    // creates jobs one at a time.)
    let mut held = std::collections::BTreeSet::new();
    let mut reports = 0;
    let mut jobs = Vec::new();
    loop {
        let taken = held.clone();
        let skip = |q: u64| taken.contains(&q);
        let (x, y) = if s.is_shared() {
            tokio::join!(
                s.create_job(&task, 7, skip, Time::from_secs(60), &a),
                other.create_job(&task, 7, skip, Time::from_secs(60), &b),
            )
        } else {
            (
                s.create_job(&task, 7, skip, Time::from_secs(60), &a).await,
                Ok(None),
            )
        };
        let (x, y) = (x.unwrap(), y.unwrap());
        if x.is_none() && y.is_none() {
            break;
        }
        for (id, job, read) in x.into_iter().chain(y) {
            for q in &job.seqs {
                assert!(held.insert(*q), "record {q} is in two jobs");
            }
            assert!((1..=7).contains(&job.reports), "{job:?}");
            if let Some(read) = read {
                assert_eq!(read.len() as u64, job.reports);
            }
            reports += job.reports;
            jobs.push((id, job));
        }
    }
    assert_eq!(held.len(), 13);
    assert_eq!(reports, 50);
    if !s.is_shared() {
        return;
    }
    // Replica "a" dies: once its leases run out, "b" takes its jobs over, and only those.
    let a_jobs = s
        .renew_leases(&a, &jobs.iter().map(|j| j.0).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        a_jobs > 0 && a_jobs < jobs.len() as u64,
        "{a_jobs} of {}",
        jobs.len()
    );
    assert!(other.take_expired_jobs(&b, 100).await.unwrap().is_empty());
    let short = Lease {
        owner: "a".into(),
        ms: 1,
    };
    s.renew_leases(&short, &jobs.iter().map(|j| j.0).collect::<Vec<_>>())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let taken = other.take_expired_jobs(&b, 100).await.unwrap();
    assert_eq!(taken.len() as u64, a_jobs);
    for (id, job) in &taken {
        assert!(jobs.contains(&(*id, job.clone())));
    }
    // Held by "b" now: "a" cannot renew them, and nobody else can take them.
    assert_eq!(
        s.renew_leases(&a, &taken.iter().map(|j| j.0).collect::<Vec<_>>())
            .await
            .unwrap(),
        0
    );
    assert!(s.take_expired_jobs(&a, 100).await.unwrap().is_empty());
    // The first commit counts a job; the replica that commits it second finds it gone.
    let (id, job) = &taken[0];
    let mut sum = BatchAggregation::empty(2);
    sum.report_count = job.reports;
    let batches = BTreeMap::from([(Time::from_secs(60), sum)]);
    other
        .commit_leader_job(id, job, &batches, &StatDelta::default())
        .await
        .unwrap();
    assert!(
        s.commit_leader_job(id, job, &batches, &StatDelta::default())
            .await
            .is_err()
    );
    assert!(!s.has_job(id).await.unwrap());
    assert_eq!(s.abandon_leader_job(id, job).await.unwrap(), 0);
    assert_eq!(
        s.batch(&task, Time::from_secs(60))
            .await
            .unwrap()
            .unwrap()
            .report_count,
        job.reports
    );
}

async fn a_helper_job_sent_to_two_replicas_at_once_is_accumulated_once(s: Store) {
    let other = replica(&s).await;
    let task = TaskId::random();
    let w = Time::from_secs(60);
    for round in 0..10 {
        let job = AggregationJobId::random();
        let reports = verified(5, w);
        let respond = |o: &[(ReportId, std::result::Result<&[u8], RejectReason>)]| {
            format!("{}", o.iter().filter(|(_, r)| r.is_ok()).count()).into_bytes()
        };
        let (x, y) = tokio::join!(
            s.commit_helper_job(&task, &job, w, [round; 32], 2, &reports, respond),
            other.commit_helper_job(&task, &job, w, [round; 32], 2, &reports, respond),
        );
        let answers: Vec<(bool, Vec<u8>)> = [x.unwrap(), y.unwrap()]
            .into_iter()
            .map(|c| match c {
                HelperCommit::Committed(r) => (true, r),
                HelperCommit::Existing(r) => (false, r),
            })
            .collect();
        assert_eq!(
            answers.iter().filter(|(fresh, _)| *fresh).count(),
            1,
            "round {round}: {answers:?}"
        );
        assert_eq!(answers[0].1, b"5", "both get the one answer");
        assert_eq!(answers[1].1, b"5");
    }
    assert_eq!(s.batch(&task, w).await.unwrap().unwrap().report_count, 50);
}

/// `n` helper reports of window `w`, fresh ids, each verified (an empty share).
fn verified(n: usize, w: Time) -> Vec<HelperReport> {
    (0..n)
        .map(|_| HelperReport {
            report_id: ReportId::random(),
            time: w,
            outcome: Ok((AggregateShare::zero(2), vec![1])),
            mark_seen: true,
        })
        .collect()
}

/// Commits a helper job of one verified report of `task` at `now`.
async fn commit_one_helper_job(s: &Store, task: &TaskId, now: u64) -> AggregationJobId {
    let job = AggregationJobId::random();
    let r = verified(1, Time::from_secs(60));
    let out = s
        .commit_helper_job(task, &job, Time::from_secs(now), [7; 32], 2, &r, |_| {
            b"answer".to_vec()
        })
        .await
        .unwrap();
    assert!(matches!(out, HelperCommit::Committed(_)));
    job
}

async fn helper_jobs_expire_by_commit_time_and_only_those(s: Store) {
    let task = TaskId::random();
    let mut jobs = Vec::new();
    for now in [300, 100, 200] {
        jobs.push(commit_one_helper_job(&s, &task, now).await);
    }
    let times = || {
        s.backend
            .count(backend::T::HelperJobTimes, backend::Keys::All)
    };
    assert_eq!(times().await.unwrap(), 3);
    assert_eq!(s.expire_helper_jobs(Time::from_secs(100)).await.unwrap(), 0);
    assert_eq!(s.expire_helper_jobs(Time::from_secs(250)).await.unwrap(), 2);
    assert!(s.helper_job(&task, &jobs[0]).await.unwrap().is_some());
    assert!(s.helper_job(&task, &jobs[1]).await.unwrap().is_none());
    assert!(s.helper_job(&task, &jobs[2]).await.unwrap().is_none());
    assert_eq!(times().await.unwrap(), 1);
    assert_eq!(s.expire_helper_jobs(Time::from_secs(250)).await.unwrap(), 0);
    assert_eq!(s.expire_helper_jobs(Time::from_secs(301)).await.unwrap(), 1);
    assert_eq!(times().await.unwrap(), 0);
    assert_eq!(
        s.backend
            .count(backend::T::HelperJobs, backend::Keys::All)
            .await
            .unwrap(),
        0
    );
}

async fn committed_helper_jobs_are_forgotten_and_sent_again_are_replays(s: Store) {
    let task = TaskId::random();
    let w = Time::from_secs(60);
    let job = AggregationJobId::random();
    let reports = verified(2, w);
    let respond = |o: &[(ReportId, std::result::Result<&[u8], RejectReason>)]| {
        format!(
            "{:?}",
            o.iter().map(|(_, r)| r.map(|_| ())).collect::<Vec<_>>()
        )
        .into_bytes()
    };
    let first = s
        .commit_helper_job(&task, &job, w, [1; 32], 2, &reports, respond)
        .await
        .unwrap();
    assert!(matches!(first, HelperCommit::Committed(_)));
    let other = commit_one_helper_job(&s, &task, 100).await;
    // An id without an answer is skipped.
    let forgotten = s
        .forget_helper_jobs(&task, &[job, AggregationJobId::random()])
        .await
        .unwrap();
    assert_eq!(forgotten, 1);
    assert!(s.helper_job(&task, &job).await.unwrap().is_none());
    assert!(s.helper_job(&task, &other).await.unwrap().is_some());
    let times = s
        .backend
        .count(backend::T::HelperJobTimes, backend::Keys::All)
        .await
        .unwrap();
    assert_eq!(times, 1, "the forgotten job's index entry went with it");
    // Sent again, even with other contents, the job is processed again: every report is a
    // replay, and the aggregate does not move.
    let again = s
        .commit_helper_job(&task, &job, w, [2; 32], 2, &reports, respond)
        .await
        .unwrap();
    let HelperCommit::Committed(answer) = again else {
        panic!("a forgotten job is committed afresh")
    };
    assert_eq!(
        String::from_utf8(answer).unwrap(),
        "[Err(Replay), Err(Replay)]"
    );
    assert_eq!(s.batch(&task, w).await.unwrap().unwrap().report_count, 3);
}

async fn one_collection_sent_to_two_replicas_at_once_spends_once(s: Store) {
    let other = replica(&s).await;
    let task = TaskId::random();
    let w = Time::from_secs(600);
    let commit = |hash: u8| CollectionCommit {
        task: &task,
        collection_id: &[7; 16],
        rule: BatchRule {
            batch: (w, 60),
            purpose: BudgetPurpose::Alert,
            max_collections: 0,
        },
        summed: (0, ReportIdChecksum::default()),
        windows: std::slice::from_ref(&w),
        epsilon_micros: 10,
        budget_micros: 100,
        request_hash: [hash; 32],
        answer: b"first",
    };
    let (c1, c2) = (commit(1), commit(1));
    let (x, y) = tokio::join!(s.commit_collection(&c1), other.commit_collection(&c2));
    let mut got = [x.unwrap(), y.unwrap()];
    got.sort_by_key(|r| r.is_err());
    assert_eq!(got, [Ok(90), Err(CollectRefusal::Repeated)]);
    assert_eq!(
        s.spent(&task, BudgetPurpose::Alert, &[w]).await.unwrap(),
        [10],
        "spent once"
    );
    // The same id with another request is a conflict, and spends nothing.
    assert!(matches!(
        other.commit_collection(&commit(2)).await,
        Err(Error::CollectionConflict(_))
    ));
    assert_eq!(
        s.spent(&task, BudgetPurpose::Alert, &[w]).await.unwrap(),
        [10]
    );
}

async fn a_store_belongs_to_the_role_that_opened_it_first(s: Store) {
    use hush_protocol::Role;
    s.claim_role(Role::Helper).await.unwrap();
    s.claim_role(Role::Helper).await.unwrap();
    let e = replica(&s)
        .await
        .claim_role(Role::Leader)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to the helper"), "{e}");
}

/// Runs each test of the suite on sled and on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod on_sled {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$name(Store::open(dir.path(), 16).unwrap()).await;
                }
            )+
            use super::Store;
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::store::throwaway::fresh_store().await).await;
                }
            )+
        }
    };
}

on_both_backends!(
    one_collection_sent_to_two_replicas_at_once_spends_once,
    a_store_belongs_to_the_role_that_opened_it_first,
    a_helper_job_sent_to_two_replicas_at_once_is_accumulated_once,
    jobs_hold_each_report_once_and_outlive_a_dead_replica,
    one_report_offered_by_two_replicas_at_once_is_stored_once,
    the_last_of_a_budget_is_spent_once_by_two_replicas_at_once,
    the_audit_chain_stays_one_chain_under_appends_from_two_replicas,
    retention_deletes_old_pending_reports_but_not_those_in_a_job,
    pending_reports_of_the_earlier_format_are_records_of_one,
    retention_deletes_old_aggregates_and_answers_and_keeps_the_ledger,
    pending_reports_are_stored_once_and_scanned_in_order,
    committing_a_leader_job_is_atomic_and_refuses_a_vanished_job,
    batches_are_collected_equal_or_disjoint_and_as_often_as_allowed,
    nothing_enters_a_released_or_closed_window,
    helper_jobs_expire_by_commit_time_and_only_those,
    committed_helper_jobs_are_forgotten_and_sent_again_are_replays,
);

/// A sled store whose helper job records predate the `helper_job_times` index gets it when it
/// opens, and its old records then expire.
#[tokio::test]
async fn a_sled_store_of_helper_jobs_without_their_index_expires_them_after_opening() {
    let dir = tempfile::tempdir().unwrap();
    let task = TaskId::random();
    let (old, new) = {
        let s = Store::open(dir.path(), 16).unwrap();
        let jobs = (
            commit_one_helper_job(&s, &task, 100).await,
            commit_one_helper_job(&s, &task, 300).await,
        );
        let backend::Backend::Sled(sb) = &s.backend else {
            unreachable!()
        };
        sb.tree(backend::T::HelperJobTimes).clear().unwrap();
        sb.tree(backend::T::Meta)
            .remove(b"helper_job_times")
            .unwrap();
        // A record that cannot be read does not keep the store from opening; it expires.
        sb.tree(backend::T::HelperJobs)
            .insert(task_key(&task, &[9; 16]), &b"damaged"[..])
            .unwrap();
        s.flush().await.unwrap();
        jobs
    };
    let s = Store::open(dir.path(), 16).unwrap();
    assert_eq!(s.expire_helper_jobs(Time::from_secs(200)).await.unwrap(), 2);
    assert!(s.helper_job(&task, &old).await.unwrap().is_none());
    assert!(s.helper_job(&task, &new).await.unwrap().is_some());
}

/// sled logs anti-replay ids per transaction; a store of the earlier layout (one entry per id)
/// is moved into the log when it opens, and its ids still refuse replays.
#[tokio::test]
async fn a_sled_store_of_the_earlier_anti_replay_layout_still_refuses_replays() {
    let dir = tempfile::tempdir().unwrap();
    let task = TaskId::random();
    let (a, b) = (report(60), report(60));
    {
        let s = Store::open(dir.path(), 16).unwrap();
        let backend::Backend::Sled(sb) = &s.backend else {
            unreachable!()
        };
        for r in [&a, &b] {
            sb.tree(backend::T::Seen)
                .insert(seen_key(&task, r.time, &r.report_id), &[])
                .unwrap();
        }
        // Written after the store opened: still the earlier layout on disk.
        sb.tree(backend::T::Meta).remove(b"seen_layout").unwrap();
        s.flush().await.unwrap();
    }
    let s = Store::open(dir.path(), 16).unwrap();
    assert_eq!(s.seen_count(&task).await.unwrap(), 2);
    assert!(s.is_seen(&task, a.time, &a.report_id).await.unwrap());
    let c = report(60);
    let got = s
        .store_pending(
            &[(task, a.clone()), (task, c.clone()), (task, b.clone())],
            1_000,
            &StatDelta::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Ingested::Replay, Ingested::Stored, Ingested::Replay]
    );
    assert_eq!(s.seen_count(&task).await.unwrap(), 3);
    assert_eq!(s.expire_seen(&task, Time::from_secs(61)).await.unwrap(), 3);
    assert_eq!(s.seen_count(&task).await.unwrap(), 0);
    assert!(!s.is_seen(&task, c.time, &c.report_id).await.unwrap());
}

/// On sled the anti-replay ids live in memory and in a log written by the transaction that adds
/// them: ids offered by many ingests at once on many threads are each stored once, a
/// transaction that fails adds none, and a reopened store refuses them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_anti_replay_ids_are_added_once_only_by_committed_transactions_and_reloaded() {
    use backend::{T as Tb, Txn, transact};
    let dir = tempfile::tempdir().unwrap();
    let task = TaskId::random();
    let reports: Vec<PendingReport> = (0..300).map(|i| report(60 * (1 + i % 3))).collect();
    {
        let s = Store::open(dir.path(), 16).unwrap();
        let mut ingests = tokio::task::JoinSet::new();
        for k in 0..8 {
            let (s, mut mine) = (s.clone(), reports.clone());
            // Each ingest offers every report, in its own order and request sizes.
            mine.rotate_left(k * 37);
            ingests.spawn(async move {
                let mut stored = 0;
                for chunk in mine.chunks(25 + k * 10) {
                    let batch: Vec<_> = chunk.iter().map(|r| (task, r.clone())).collect();
                    let got = s
                        .store_pending(&batch, 1_000, &StatDelta::default())
                        .await
                        .unwrap();
                    stored += got.iter().filter(|g| **g == Ingested::Stored).count();
                }
                stored
            });
        }
        let stored: usize = ingests.join_all().await.into_iter().sum();
        assert_eq!(stored, reports.len());
        assert_eq!(s.pending_count(&task).await.unwrap(), 300);
        assert_eq!(s.seen_count(&task).await.unwrap(), 300);

        // A transaction that adds an id and then fails leaves it out, in memory and on disk;
        // it reads its own addition meanwhile.
        let fresh = report(60);
        let key = seen_key(&task, fresh.time, &fresh.report_id);
        let r: Result<()> = transact!(s, [Seen], |tx| async {
            tx.insert(Tb::Seen, &key, &[])?;
            assert!(tx.get(Tb::Seen, &key).await?.is_some());
            Err(Error::InvalidRequest("refused on purpose".into()).into())
        });
        assert!(r.unwrap_err().to_string().contains("on purpose"));
        assert!(
            !s.is_seen(&task, fresh.time, &fresh.report_id)
                .await
                .unwrap()
        );
        assert_eq!(s.seen_count(&task).await.unwrap(), 300);
        // Ids go one window at a time, never one by one.
        let r: Result<()> = transact!(s, [Seen], |tx| async {
            tx.remove(Tb::Seen, &key)?;
            Ok(())
        });
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("not removed one by one")
        );

        // A transaction run again after a conflict logs and adds only its last run's ids, and
        // holds the index's lock while its body runs, not only while it adds them.
        let tries = std::sync::atomic::AtomicU32::new(0);
        let later: Vec<PendingReport> = (0..5).map(|_| report(240)).collect();
        let r: Result<()> = transact!(s, [Seen], |tx| async {
            assert!(sled_of(&s).seen_is_locked());
            let first = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            // The first run adds a sixth id, which must not survive it.
            let extra = first.then(|| report(240));
            for r in later.iter().chain(&extra) {
                tx.insert(Tb::Seen, &seen_key(&task, r.time, &r.report_id), &[])?;
            }
            if first {
                return Err(backend::TxError::Sled(
                    sled::transaction::UnabortableTransactionError::Conflict,
                ));
            }
            Ok(())
        });
        r.unwrap();
        assert!(!sled_of(&s).seen_is_locked());
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 2);
        let window = batch_key(&task, Time::from_secs(240));
        assert_eq!(
            sled_of(&s).tree(Tb::Seen).scan_prefix(&window).count(),
            1,
            "one log entry"
        );
        assert_eq!(s.seen_count(&task).await.unwrap(), 305);
        for r in &later {
            assert!(s.is_seen(&task, r.time, &r.report_id).await.unwrap());
        }
        s.flush().await.unwrap();
    }
    let s = Store::open(dir.path(), 16).unwrap();
    let again: Vec<_> = reports.iter().map(|r| (task, r.clone())).collect();
    let got = s
        .store_pending(&again, 1_000, &StatDelta::default())
        .await
        .unwrap();
    assert!(got.iter().all(|g| *g == Ingested::Replay));
    // The first window's ids expire with it, from memory and from the log.
    assert_eq!(
        s.expire_seen(&task, Time::from_secs(61)).await.unwrap(),
        100
    );
    assert_eq!(s.seen_count(&task).await.unwrap(), 205);
    let first = reports
        .iter()
        .find(|r| r.time == Time::from_secs(60))
        .unwrap();
    assert!(
        !s.is_seen(&task, first.time, &first.report_id)
            .await
            .unwrap()
    );
    drop(s);
    let s = Store::open(dir.path(), 16).unwrap();
    assert_eq!(s.seen_count(&task).await.unwrap(), 205);
    assert!(
        !s.is_seen(&task, first.time, &first.report_id)
            .await
            .unwrap()
    );
}

/// The sled backend and the pending files of a sled store.
fn sled_of(s: &Store) -> &backend::SledBackend {
    let backend::Backend::Sled(sb) = &s.backend else {
        unreachable!("a sled store")
    };
    sb
}

/// The names of the files in a sled store's folder of pending files.
fn pending_files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("pending"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// On sled a pending record holds where its reports are in a pending file, not the reports;
/// they read back whole, each task's own in order, past replays and other tasks' reports in
/// the same request; a file goes once the jobs that held its reports are committed.
#[tokio::test]
async fn a_sled_store_keeps_pending_reports_in_files_and_deletes_each_once_unused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    let (a, b) = (TaskId::random(), TaskId::random());
    let mut fat = report(60);
    fat.leader_share = vec![7; 4_000];
    let (a1, b1, a2, b2, a3) = (report(60), report(120), fat, report(60), report(180));
    let request = [
        (a, a1.clone()),
        (b, b1.clone()),
        (a, a1.clone()), // a replay within the request
        (a, a2.clone()),
        (b, b2.clone()),
        (a, a3.clone()),
    ];
    let got = s
        .store_pending(&request, 2, &StatDelta::default())
        .await
        .unwrap();
    assert_eq!(got[2], Ingested::Replay);
    // Task a's three reports fill two records of at most 2; b's two fill one.
    let tree = sled_of(&s).tree(backend::T::Pending);
    assert_eq!(tree.len(), 3);
    for v in tree.iter().values() {
        let v = v.unwrap();
        assert!(records::FileRecord::is(&v));
        assert!(v.len() <= 25 + 2 * 8, "a record of {} bytes", v.len());
    }
    assert_eq!(pending_files_in(dir.path()), ["0000000000000000.pending"]);
    // A replay of a stored report costs the file nothing; a new report its bytes.
    let file0 = dir.path().join("pending/0000000000000000.pending");
    let size = std::fs::metadata(&file0).unwrap().len();
    let b3 = report(60);
    let got = s
        .store_pending(
            &[(b, b1.clone()), (b, b3.clone())],
            2,
            &StatDelta::default(),
        )
        .await
        .unwrap();
    assert_eq!(got, [Ingested::Replay, Ingested::Stored]);
    assert_eq!(
        std::fs::metadata(&file0).unwrap().len(),
        size + b3.to_bytes().len() as u64
    );
    let read = |t| {
        let s = s.clone();
        async move {
            s.scan_pending(&t, usize::MAX, |_| false)
                .await
                .unwrap()
                .into_iter()
                .flat_map(|(_, r)| r)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read(a).await, vec![a1.clone(), a2, a3]);
    assert_eq!(read(b).await, vec![b1, b2, b3]);
    assert_eq!(s.pending_count(&a).await.unwrap(), 3);
    assert_eq!(s.pending_in(&a, &[Time::from_secs(60)]).await.unwrap(), 2);

    // While a record points into the file, it stays, even when the file is retired.
    let lease = Lease {
        owner: "test".into(),
        ms: 1_000,
    };
    let (id, job, reports) = s
        .create_job(&b, 10, |_| false, Time::from_secs(200), &lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reports.unwrap().len(), 3);
    s.commit_leader_job(&id, &job, &BTreeMap::new(), &StatDelta::default())
        .await
        .unwrap();
    assert_eq!(s.remove_unused_pending_files(true).await.unwrap(), 0);
    assert_eq!(pending_files_in(dir.path()).len(), 1);
    // The next ingest starts a new file.
    let a4 = report(60);
    s.store_pending(&[(a, a4.clone())], 2, &StatDelta::default())
        .await
        .unwrap();
    assert_eq!(
        pending_files_in(dir.path()),
        ["0000000000000000.pending", "0000000000000001.pending"]
    );
    // Once task a's jobs are committed, nothing points into the first file: it goes, and the
    // second (active, its record pending) stays.
    let keep = record_of(&s, a, &a4.report_id).await;
    while let Some((id, job, _)) = s
        .create_job(&a, 2, |q| q == keep, Time::from_secs(200), &lease)
        .await
        .unwrap()
    {
        s.commit_leader_job(&id, &job, &BTreeMap::new(), &StatDelta::default())
            .await
            .unwrap();
    }
    assert_eq!(s.remove_unused_pending_files(false).await.unwrap(), 1);
    assert_eq!(pending_files_in(dir.path()), ["0000000000000001.pending"]);
    assert_eq!(read(a).await, vec![a4]);
}

/// A sled store's pending reports outlive a restart; a pending file no record points into
/// (bytes written before a crash, never acknowledged) goes when the store opens; a record whose
/// file is gone is an error that names the file, and no new file takes its number.
#[tokio::test]
async fn pending_files_outlive_a_restart_and_unused_ones_go_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let task = TaskId::random();
    let r = report(60);
    {
        let s = Store::open(dir.path(), 16).unwrap();
        store_request(&s, task, std::slice::from_ref(&r)).await;
        s.flush().await.unwrap();
    }
    std::fs::write(dir.path().join("pending/00000000000000a0.pending"), b"torn").unwrap();
    std::fs::write(dir.path().join("pending/README"), b"not ours").unwrap();
    {
        let s = Store::open(dir.path(), 16).unwrap();
        assert_eq!(
            pending_files_in(dir.path()),
            ["0000000000000000.pending", "README"]
        );
        let read = s.scan_pending(&task, usize::MAX, |_| false).await.unwrap();
        assert_eq!(read[0].1, vec![r.clone()]);
        // Numbered past every file it found, the torn one included.
        s.store_pending(&[(task, report(60))], 10, &StatDelta::default())
            .await
            .unwrap();
        assert!(dir.path().join("pending/00000000000000a1.pending").exists());
    }
    // Restored without its folder: new files are numbered past every file a record names, so
    // no record reads another's bytes, and the records whose file is gone say so.
    std::fs::remove_dir_all(dir.path().join("pending")).unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    s.store_pending(&[(TaskId::random(), report(60))], 10, &StatDelta::default())
        .await
        .unwrap();
    assert_eq!(pending_files_in(dir.path()), ["00000000000000a2.pending"]);
    let e = s
        .scan_pending(&task, usize::MAX, |_| false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pending file") && e.contains("0000000000000000.pending"),
        "{e}"
    );
}

/// On PostgreSQL, migration 5 indexes the helper job records already stored, and its old
/// records then expire.
#[tokio::test]
async fn a_postgres_store_of_helper_jobs_without_their_index_expires_them_after_migrating() {
    let settings = pg::PgSettings {
        url: throwaway::ThrowawayPostgres::shared().url().to_owned(),
        schema: throwaway::fresh_schema(),
        pool_size: 2,
    };
    let task = TaskId::random();
    let (old, new) = {
        let s = Store::connect(&settings).await.unwrap();
        let jobs = (
            commit_one_helper_job(&s, &task, 100).await,
            commit_one_helper_job(&s, &task, 300).await,
        );
        let backend::Backend::Pg(p) = &s.backend else {
            unreachable!()
        };
        p.client()
            .await
            .unwrap()
            .batch_execute(
                r#"DROP TABLE "helper_job_times"; DELETE FROM hush_migrations WHERE version = 5"#,
            )
            .await
            .unwrap();
        jobs
    };
    let s = Store::connect(&settings).await.unwrap();
    // A helper replica still on the binary before the index writes a record without its entry:
    // the trigger writes it.
    let older = AggregationJobId::random();
    let backend::Backend::Pg(p) = &s.backend else {
        unreachable!()
    };
    let record = HelperJobRecord {
        committed: Time::from_secs(150),
        request_hash: [1; 32],
        response: b"answer".to_vec(),
    };
    p.client()
        .await
        .unwrap()
        .execute(
            r#"INSERT INTO "helper_jobs" (key, value) VALUES ($1, $2)"#,
            &[&task_key(&task, older.as_bytes()), &record.encode()],
        )
        .await
        .unwrap();
    assert!(s.helper_job(&task, &older).await.unwrap().is_some());
    assert_eq!(s.expire_helper_jobs(Time::from_secs(200)).await.unwrap(), 2);
    assert!(s.helper_job(&task, &old).await.unwrap().is_none());
    assert!(s.helper_job(&task, &older).await.unwrap().is_none());
    assert!(s.helper_job(&task, &new).await.unwrap().is_some());
}
