//! Tests of the store: atomic commits, the batch rules, nothing entering a closed window,
//! retention and record encodings.

use std::collections::BTreeMap;

use hush_protocol::BudgetPurpose;
use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{
    AggregateShare, AggregationJobId, HpkeCiphertext, ReportId, ReportIdChecksum, TaskId, Time,
};
use hush_server::db::tx_result;

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

#[test]
fn retention_deletes_old_pending_reports_but_not_those_in_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    let task = TaskId::random();
    let batch: Vec<_> = [60, 60, 600]
        .iter()
        .map(|t| (task, s.next_seq().unwrap(), report(*t)))
        .collect();
    s.store_pending(&batch, &StatDelta::default()).unwrap();
    s.put_job(
        &AggregationJobId::random(),
        &LeaderJob {
            task_id: task,
            seqs: vec![batch[0].1],
            created: None,
        },
    )
    .unwrap();
    assert_eq!(s.expire_pending(&task, Time::from_secs(120)).unwrap(), 1);
    assert!(s.pending_report(&task, batch[0].1).unwrap().is_some());
    assert!(s.pending_report(&task, batch[1].1).unwrap().is_none());
    assert!(s.pending_report(&task, batch[2].1).unwrap().is_some());
    assert_eq!(
        s.stats(task.as_bytes()).unwrap()[&Stat::Rejected(RejectReason::TooOld)],
        1
    );
    assert_eq!(s.expire_pending(&task, Time::from_secs(120)).unwrap(), 0);
}

#[test]
fn retention_deletes_old_aggregates_and_answers_and_keeps_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
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
        tx_result(s.batches.transaction(|bt| merge_batches(bt, &batches))).unwrap();
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
            s.commit_collection(&commit).unwrap().unwrap();
        }
    }
    let cutoff = Time::from_secs(120);
    assert_eq!(s.expire_aggregates(&task, cutoff).unwrap(), 2);
    assert_eq!(s.expire_collections(&task, cutoff).unwrap(), 2);
    assert_eq!(
        s.batches(&task)
            .unwrap()
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [Time::from_secs(120)]
    );
    assert!(s.collection(&task, &[0; 16]).unwrap().is_none());
    assert!(s.collection(&task, &[1; 16]).unwrap().is_none());
    assert!(s.collection(&task, &[2; 16]).unwrap().is_some());
    // The ledger and the collected marks stay; the other task is untouched.
    assert_eq!(
        s.spent(&task, BudgetPurpose::Routine, &windows).unwrap(),
        [1, 1, 1]
    );
    assert_eq!(s.collected_windows().unwrap().len(), 6);
    assert_eq!(s.batches(&other).unwrap().len(), 3);
    assert!(s.collection(&other, &[0; 16]).unwrap().is_some());
    assert_eq!(s.expire_collections(&task, cutoff).unwrap(), 0);
}

#[test]
fn pending_reports_are_stored_once_and_scanned_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    let task = TaskId::random();
    let a = report(60);
    let b = report(60);
    let batch = vec![
        (task, s.next_seq().unwrap(), a.clone()),
        (task, s.next_seq().unwrap(), b.clone()),
    ];
    assert_eq!(
        s.store_pending(&batch, &StatDelta::default()).unwrap(),
        vec![Ingested::Stored, Ingested::Stored]
    );
    // A replay of `a`, and a report twice in the same batch.
    let c = report(120);
    let again = vec![
        (task, s.next_seq().unwrap(), a.clone()),
        (task, s.next_seq().unwrap(), c.clone()),
        (task, s.next_seq().unwrap(), c.clone()),
    ];
    assert_eq!(
        s.store_pending(&again, &StatDelta::default()).unwrap(),
        vec![Ingested::Replay, Ingested::Stored, Ingested::Replay]
    );
    let scanned = s.scan_pending(&task, 10, |_| false).unwrap();
    assert_eq!(
        scanned.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        vec![a, b, c.clone()]
    );
    let first = scanned[0].0;
    let after_first = s.scan_pending(&task, 1, |seq| seq == first).unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].0, scanned[1].0);
    let st = s.stats(task.as_bytes()).unwrap();
    assert_eq!(st[&Stat::Accepted], 3);
    assert_eq!(st[&Stat::Rejected(RejectReason::Replay)], 2);
    assert_eq!(s.expire_seen(&task, Time::from_secs(61)).unwrap(), 2);
    assert!(
        !s.is_seen(&task, Time::from_secs(60), &batch[0].2.report_id)
            .unwrap()
    );
    assert!(
        s.is_seen(&task, Time::from_secs(120), &c.report_id)
            .unwrap()
    );
}

#[test]
fn committing_a_leader_job_is_atomic_and_refuses_a_vanished_job() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    let task = TaskId::random();
    let r = report(60);
    let seq = s.next_seq().unwrap();
    s.store_pending(&[(task, seq, r.clone())], &StatDelta::default())
        .unwrap();
    let job = LeaderJob {
        task_id: task,
        seqs: vec![seq],
        created: Some(Time::from_secs(60)),
    };
    let id = AggregationJobId::random();
    s.put_job(&id, &job).unwrap();
    let mut b = BatchAggregation::empty(2);
    b.report_count = 1;
    b.checksum.update(&r.report_id);
    let batches = BTreeMap::from([(Time::from_secs(60), b.clone())]);
    s.commit_leader_job(&id, &job, &batches, &StatDelta::default())
        .unwrap();
    assert_eq!(s.pending_count(&task).unwrap(), 0);
    assert_eq!(s.batch(&task, Time::from_secs(60)).unwrap(), Some(b));
    // A second commit of the same job must not count twice.
    assert!(
        s.commit_leader_job(&id, &job, &batches, &StatDelta::default())
            .is_err()
    );
    assert_eq!(
        s.batch(&task, Time::from_secs(60))
            .unwrap()
            .unwrap()
            .report_count,
        1
    );
}

fn commit(
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
    let sum = s.sum_batches(task, &windows, 2).unwrap();
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
    .unwrap()
}

#[test]
fn batches_are_collected_equal_or_disjoint_and_as_often_as_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    let t = TaskId::random();
    let (w0, w1, w2) = (
        Time::from_secs(0),
        Time::from_secs(60),
        Time::from_secs(120),
    );
    commit(&s, &t, 1, (w0, 60), BudgetPurpose::Routine, 0).unwrap();
    // [w0, w1] overlaps [w0]: refused, whatever the purpose; nothing written.
    assert_eq!(
        commit(&s, &t, 2, (w0, 120), BudgetPurpose::Alert, 0),
        Err(CollectRefusal::Overlaps {
            window: w0,
            batch: (w0, 60)
        })
    );
    assert_eq!(
        s.spent(&t, BudgetPurpose::Alert, &[w0, w1]).unwrap(),
        [0, 0]
    );
    // A second routine collection of [w0] is refused; alert drill-downs of it are not.
    assert!(matches!(
        commit(&s, &t, 3, (w0, 60), BudgetPurpose::Routine, 0),
        Err(CollectRefusal::Exhausted {
            routine: 1,
            alert: 0
        })
    ));
    commit(&s, &t, 4, (w0, 60), BudgetPurpose::Alert, 0).unwrap();
    commit(&s, &t, 5, (w0, 60), BudgetPurpose::Alert, 0).unwrap();
    assert_eq!(s.batch_collections(&t, (w0, 60)).unwrap(), (1, 2));
    // A disjoint batch is fine; with max 1 it is collected once in all.
    commit(&s, &t, 6, (w1, 120), BudgetPurpose::Alert, 1).unwrap();
    assert!(matches!(
        commit(&s, &t, 7, (w1, 120), BudgetPurpose::Alert, 1),
        Err(CollectRefusal::Exhausted {
            routine: 0,
            alert: 1
        })
    ));
    // [w2] alone now overlaps [w1, w2].
    assert!(matches!(
        commit(&s, &t, 8, (w2, 60), BudgetPurpose::Routine, 0),
        Err(CollectRefusal::Overlaps { .. })
    ));
    assert!(s.is_released(&t, w2).unwrap());
}

#[test]
fn nothing_enters_a_released_or_closed_window() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 16).unwrap();
    let task = TaskId::random();
    let w = Time::from_secs(60);
    // A job holding a report of `w` is in flight when `w` is released.
    let r = report(60);
    let seq = s.next_seq().unwrap();
    s.store_pending(&[(task, seq, r.clone())], &StatDelta::default())
        .unwrap();
    let job = LeaderJob {
        task_id: task,
        seqs: vec![seq],
        created: Some(Time::from_secs(60)),
    };
    let id = AggregationJobId::random();
    s.put_job(&id, &job).unwrap();
    commit(&s, &task, 1, (w, 60), BudgetPurpose::Routine, 0).unwrap();
    let mut b = BatchAggregation::empty(2);
    b.report_count = 1;
    b.checksum.update(&r.report_id);
    let left_out = s
        .commit_leader_job(&id, &job, &BTreeMap::from([(w, b)]), &StatDelta::default())
        .unwrap();
    assert_eq!(left_out, 1);
    assert!(s.batch(&task, w).unwrap().is_none());
    assert_eq!(
        s.stats(task.as_bytes()).unwrap()[&Stat::Rejected(RejectReason::BatchCollected)],
        1
    );
    // A report of the closed window is refused at ingest and counted late.
    let late = (task, s.next_seq().unwrap(), report(60));
    assert_eq!(
        s.store_pending(std::slice::from_ref(&late), &StatDelta::default())
            .unwrap(),
        [Ingested::Late]
    );
    // Resent, it is a replay: the late count counts each report once.
    assert_eq!(
        s.store_pending(&[late], &StatDelta::default()).unwrap(),
        [Ingested::Replay]
    );
    assert_eq!(s.late_in(&task, &[w]).unwrap(), 1);
    // The helper's job commit refuses a verified report of a released window, even when
    // the quick check before verification passed (the race the transaction closes).
    let hr = HelperReport {
        report_id: ReportId::random(),
        time: w,
        outcome: Ok((AggregateShare::zero(2), vec![1, 2, 3])),
        mark_seen: true,
    };
    let before = s.batch(&task, w).unwrap();
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
        .unwrap();
    let HelperCommit::Committed(resp) = out else {
        panic!("a new job")
    };
    assert_eq!(String::from_utf8(resp).unwrap(), "Err(BatchCollected)");
    assert_eq!(s.batch(&task, w).unwrap(), before);
    // A commit whose sum is stale (a job landed after it) is refused.
    let t2 = TaskId::random();
    let stale = s.commit_collection(&CollectionCommit {
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
    });
    assert!(matches!(stale, Err(Error::Mismatch(_))), "{stale:?}");
}

#[test]
fn records_round_trip() {
    let r = report(5);
    assert_eq!(PendingReport::from_bytes(&r.to_bytes()).unwrap(), r);
    let j = LeaderJob {
        task_id: TaskId::random(),
        seqs: vec![1, 5, 9],
        created: Some(Time::from_secs(1_800)),
    };
    assert_eq!(LeaderJob::from_bytes(&j.to_bytes()).unwrap(), j);
    let mut b = BatchAggregation::empty(3);
    b.report_count = 7;
    assert_eq!(BatchAggregation::decode(&b.encode()).unwrap(), b);
}
