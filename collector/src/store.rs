//! Released results in sled.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `windows` | task ‖ window start | the window's `WindowResult` (protobuf) |
//! | `ad_hoc` | task ‖ start ‖ duration ‖ sequence | an ad-hoc collection's `WindowResult` |
//! | `cursors` | task | start of the next window to collect |
//! | `skipped` | task ‖ window start | why a window has no result (text) |
//! | `tested` | task ‖ window start | the window went through anomaly detection (empty) |
//! | `alerts` | task ‖ window start ‖ detector | an `Alert` (protobuf) |
//! | `late_cursors` | task | start of the next window whose late-report count is due |
//! | `meta` | `"keyset"` | the key directory's current `KeySet` (protobuf) |
//!
//! Only released, noisy aggregates are stored. [`ResultsStore::expire`] deletes everything of a
//! task's windows older than its retention (the cursor stays).

use std::path::Path;

use hush_protocol::proto::v1 as pb;
use hush_protocol::{TaskId, Time};
use prost::Message;
use sled::Tree;

use crate::error::{Error, Result};

/// The results database.
#[derive(Clone, Debug)]
pub struct ResultsStore {
    db: sled::Db,
    windows: Tree,
    ad_hoc: Tree,
    cursors: Tree,
    skipped: Tree,
    tested: Tree,
    alerts: Tree,
    late_cursors: Tree,
    meta: Tree,
}

/// A time range and a page of a list: items whose window starts in `[from, to)`, at most
/// `limit`, continuing after a page token (the key the previous page stopped before).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Window starts from (seconds, inclusive).
    pub from: u64,
    /// Window starts before (seconds, exclusive).
    pub to: u64,
    /// At most this many items.
    pub limit: usize,
    /// Where the previous page stopped: the key of its next item.
    pub after: Option<Vec<u8>>,
}

/// One page of a list.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    /// The items, oldest window first.
    pub items: Vec<T>,
    /// Where the next page starts, if there is one.
    pub next: Option<Vec<u8>>,
}

/// Up to `req.limit` entries of `tree` within `[lo, hi)` (keys), from `req.after` on, and the key
/// of the entry after them. `keep` filters entries (by key) without counting the ones it drops.
fn page(
    tree: &Tree,
    lo: Vec<u8>,
    hi: Vec<u8>,
    req: &PageRequest,
    keep: impl Fn(&[u8]) -> bool,
) -> Result<Page<sled::IVec>> {
    let lo = match &req.after {
        Some(a) if *a > lo => a.clone(),
        _ => lo,
    };
    let mut items = Vec::new();
    if lo >= hi {
        return Ok(Page { items, next: None });
    }
    for kv in tree.range(lo..hi) {
        let (k, v) = kv?;
        if !keep(&k) {
            continue;
        }
        if items.len() == req.limit {
            return Ok(Page {
                items,
                next: Some(k.to_vec()),
            });
        }
        items.push(v);
    }
    Ok(Page { items, next: None })
}

fn key(task: &TaskId, parts: &[u64]) -> Vec<u8> {
    let mut k = task.as_bytes().to_vec();
    for p in parts {
        k.extend_from_slice(&p.to_be_bytes());
    }
    k
}

fn decode(v: &[u8]) -> Result<pb::WindowResult> {
    pb::WindowResult::decode(v).map_err(|e| Error::corrupt("window result", e))
}

impl ResultsStore {
    /// Writes and flushes a probe record: whether the store takes writes now (health).
    pub async fn probe_write(&self, now_s: u64) -> Result<()> {
        Ok(hush_server::db::probe_write(&self.db, now_s).await?)
    }

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = hush_server::db::open_at(dir, "results", cache_mb)?;
        Ok(Self {
            windows: db.open_tree("windows")?,
            ad_hoc: db.open_tree("ad_hoc")?,
            cursors: db.open_tree("cursors")?,
            skipped: db.open_tree("skipped")?,
            tested: db.open_tree("tested")?,
            alerts: db.open_tree("alerts")?,
            late_cursors: db.open_tree("late_cursors")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Stores a window's result and moves the task's cursor past it, atomically enough: the
    /// result is written first, so a crash at worst collects the window again (the leader
    /// answers a repeated collection id with the same result).
    pub async fn put_window(
        &self,
        task: &TaskId,
        start: Time,
        next: Time,
        r: &pb::WindowResult,
    ) -> Result<()> {
        self.windows
            .insert(key(task, &[start.as_secs()]), r.encode_to_vec())?;
        self.cursors
            .insert(task.as_bytes(), &next.as_secs().to_be_bytes()[..])?;
        hush_server::db::flush(&self.db).await?;
        Ok(())
    }

    /// Records why a window has no result and moves the cursor past it.
    pub async fn skip_window(
        &self,
        task: &TaskId,
        start: Time,
        next: Time,
        why: &str,
    ) -> Result<()> {
        self.skipped
            .insert(key(task, &[start.as_secs()]), why.as_bytes())?;
        self.cursors
            .insert(task.as_bytes(), &next.as_secs().to_be_bytes()[..])?;
        hush_server::db::flush(&self.db).await?;
        Ok(())
    }

    /// Stores an ad-hoc result.
    pub async fn put_ad_hoc(&self, task: &TaskId, r: &pb::WindowResult) -> Result<()> {
        let i = r.interval.unwrap_or_default();
        let seq = self.db.generate_id()?;
        self.ad_hoc
            .insert(key(task, &[i.start, i.duration, seq]), r.encode_to_vec())?;
        hush_server::db::flush(&self.db).await?;
        Ok(())
    }

    /// The next window to collect; `first` (stored) if the task has no cursor yet.
    pub fn cursor_or_init(&self, task: &TaskId, first: Time) -> Result<Time> {
        cursor_or_init(&self.cursors, task, first)
    }

    /// The next window whose late count is due; `first` (stored) if the task has none yet.
    pub fn late_cursor_or_init(&self, task: &TaskId, first: Time) -> Result<Time> {
        cursor_or_init(&self.late_cursors, task, first)
    }

    /// Moves the late-count cursor past a window, storing its noisy late count (if any) in
    /// the window's result.
    pub async fn put_late(
        &self,
        task: &TaskId,
        start: Time,
        next: Time,
        late: Option<pb::Estimate>,
    ) -> Result<()> {
        if let Some(e) = late
            && let Some(mut w) = self.window(task, start)?
        {
            w.late_reports = Some(e);
            self.windows
                .insert(key(task, &[start.as_secs()]), w.encode_to_vec())?;
        }
        self.late_cursors
            .insert(task.as_bytes(), &next.as_secs().to_be_bytes()[..])?;
        Ok(hush_server::db::flush(&self.db).await?)
    }

    /// Every tree of the database with its number of entries.
    pub fn tree_sizes(&self) -> Vec<(String, usize)> {
        [
            ("windows", &self.windows),
            ("ad_hoc", &self.ad_hoc),
            ("cursors", &self.cursors),
            ("skipped", &self.skipped),
            ("tested", &self.tested),
            ("alerts", &self.alerts),
            ("late_cursors", &self.late_cursors),
            ("meta", &self.meta),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.len()))
        .collect()
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The key directory's stored key set.
    pub fn key_set(&self) -> Result<Option<hush_protocol::directory::KeySet>> {
        match self.meta.get(b"keyset")? {
            None => Ok(None),
            Some(v) => {
                let p = pb::KeySet::decode(&*v).map_err(|e| Error::corrupt("key set", e))?;
                Ok(Some(
                    hush_protocol::directory::KeySet::try_from(&p)
                        .map_err(|e| Error::corrupt("key set", e))?,
                ))
            }
        }
    }

    /// Stores the key directory's key set, durably.
    pub async fn put_key_set(&self, set: &hush_protocol::directory::KeySet) -> Result<()> {
        self.meta
            .insert(b"keyset", pb::KeySet::from(set).encode_to_vec())?;
        Ok(hush_server::db::flush(&self.db).await?)
    }
}

fn cursor_or_init(tree: &Tree, task: &TaskId, first: Time) -> Result<Time> {
    let v = match tree.compare_and_swap(
        task.as_bytes(),
        None as Option<&[u8]>,
        Some(&first.as_secs().to_be_bytes()[..]),
    )? {
        Ok(()) => return Ok(first),
        Err(cas) => cas
            .current
            .ok_or_else(|| Error::corrupt("cursor", "vanished"))?,
    };
    let b: [u8; 8] = v
        .as_ref()
        .try_into()
        .map_err(|_| Error::corrupt("cursor", "not 8 bytes"))?;
    Ok(Time::from_secs(u64::from_be_bytes(b)))
}

impl ResultsStore {
    /// Every released window of a task, oldest first.
    pub fn windows(&self, task: &TaskId) -> Result<Vec<pb::WindowResult>> {
        self.windows
            .scan_prefix(task.as_bytes())
            .values()
            .map(|v| decode(&v?))
            .collect()
    }

    /// A page of a task's released windows starting in `[req.from, req.to)`, oldest first.
    pub fn windows_page(&self, task: &TaskId, req: &PageRequest) -> Result<Page<pb::WindowResult>> {
        let p = page(
            &self.windows,
            key(task, &[req.from]),
            key(task, &[req.to]),
            req,
            |_| true,
        )?;
        Ok(Page {
            items: p.items.iter().map(|v| decode(v)).collect::<Result<_>>()?,
            next: p.next,
        })
    }

    /// The start of a task's newest released window, if any.
    pub fn newest_window_start(&self, task: &TaskId) -> Result<Option<u64>> {
        Ok(self
            .windows
            .scan_prefix(task.as_bytes())
            .keys()
            .next_back()
            .transpose()?
            .and_then(|k| {
                k.get(32..40)
                    .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            }))
    }

    /// One released window.
    pub fn window(&self, task: &TaskId, start: Time) -> Result<Option<pb::WindowResult>> {
        self.windows
            .get(key(task, &[start.as_secs()]))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Ad-hoc results of a task.
    pub fn ad_hoc(&self, task: &TaskId) -> Result<Vec<pb::WindowResult>> {
        self.ad_hoc
            .scan_prefix(task.as_bytes())
            .values()
            .map(|v| decode(&v?))
            .collect()
    }

    /// Why a window was skipped, if it was.
    pub fn skipped(&self, task: &TaskId, start: Time) -> Result<Option<String>> {
        Ok(self
            .skipped
            .get(key(task, &[start.as_secs()]))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Whether a window went through detection.
    pub fn tested(&self, task: &TaskId, start: u64) -> Result<bool> {
        Ok(self.tested.contains_key(key(task, &[start]))?)
    }

    /// Records that a window went through detection, with the alerts it raised, and flushes.
    pub async fn put_tested(&self, task: &TaskId, start: u64, alerts: &[pb::Alert]) -> Result<()> {
        for a in alerts {
            let mut k = key(task, &[start]);
            k.extend_from_slice(a.detector.as_bytes());
            self.alerts.insert(k, a.encode_to_vec())?;
        }
        self.tested.insert(key(task, &[start]), &[][..])?;
        hush_server::db::flush(&self.db).await?;
        if !alerts.is_empty() {
            metrics::counter!(hush_server::metrics::names::ALERTS).increment(alerts.len() as u64);
        }
        Ok(())
    }

    /// Deletes the results, ad-hoc results, skip notes, detection marks and alerts of `task`'s
    /// windows that start before `cutoff`; returns how many released results (window and
    /// ad-hoc) went.
    pub async fn expire(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let range = key(task, &[0])..key(task, &[cutoff.as_secs()]);
        let mut released = 0;
        for (tree, counts) in [
            (&self.windows, true),
            (&self.ad_hoc, true),
            (&self.skipped, false),
            (&self.tested, false),
            (&self.alerts, false),
        ] {
            let mut batch = sled::Batch::default();
            for k in tree.range(range.clone()).keys() {
                batch.remove(k?);
                released += u64::from(counts);
            }
            tree.apply_batch(batch)?;
        }
        if released > 0 {
            hush_server::db::flush(&self.db).await?;
        }
        Ok(released)
    }

    /// A page of the alerts of `tasks` whose window starts in `[req.from, req.to)`: each task's
    /// alerts oldest window first, tasks in id order. Only each task's time range is read, so a
    /// narrow range costs what it returns, whatever else the tree holds.
    pub fn alerts_page(&self, tasks: &[TaskId], req: &PageRequest) -> Result<Page<pb::Alert>> {
        let mut tasks = tasks.to_vec();
        tasks.sort();
        let mut items = Vec::new();
        for t in &tasks {
            let sub = PageRequest {
                limit: req.limit - items.len(),
                ..req.clone()
            };
            let p = page(
                &self.alerts,
                key(t, &[req.from]),
                key(t, &[req.to]),
                &sub,
                |_| true,
            )?;
            for v in p.items {
                items.push(pb::Alert::decode(&*v).map_err(|e| Error::corrupt("alert", e))?);
            }
            if p.next.is_some() {
                return Ok(Page {
                    items,
                    next: p.next,
                });
            }
        }
        Ok(Page { items, next: None })
    }

    /// The alerts of a task (`None`: of every task), oldest window first.
    pub fn alerts(&self, task: Option<&TaskId>) -> Result<Vec<pb::Alert>> {
        let prefix = task.map(|t| t.as_bytes().to_vec()).unwrap_or_default();
        self.alerts
            .scan_prefix(prefix)
            .values()
            .map(|v| pb::Alert::decode(&*v?).map_err(|e| Error::corrupt("alert", e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expire_deletes_old_results_of_one_task_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = ResultsStore::open(dir.path(), 8).unwrap();
        let (task, other) = (TaskId::random(), TaskId::random());
        for t in [task, other] {
            for w in [0u64, 60, 120] {
                let r = pb::WindowResult {
                    interval: Some(pb::Interval {
                        start: w,
                        duration: 60,
                    }),
                    ..Default::default()
                };
                s.put_window(&t, Time::from_secs(w), Time::from_secs(w + 60), &r)
                    .await
                    .unwrap();
                s.put_ad_hoc(&t, &r).await.unwrap();
                let alert = pb::Alert {
                    detector: "latency_regression".into(),
                    ..Default::default()
                };
                s.put_tested(&t, w, &[alert]).await.unwrap();
            }
        }
        assert_eq!(s.expire(&task, Time::from_secs(120)).await.unwrap(), 4);
        assert_eq!(s.windows(&task).unwrap().len(), 1);
        assert_eq!(s.ad_hoc(&task).unwrap().len(), 1);
        assert!(!s.tested(&task, 60).unwrap() && s.tested(&task, 120).unwrap());
        assert_eq!(s.alerts(Some(&task)).unwrap().len(), 1);
        assert_eq!(s.windows(&other).unwrap().len(), 3);
        assert_eq!(s.alerts(Some(&other)).unwrap().len(), 3);
        assert_eq!(s.expire(&task, Time::from_secs(120)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn pages_cover_a_range_once_in_order_and_never_leave_their_task() {
        let dir = tempfile::tempdir().unwrap();
        let s = ResultsStore::open(dir.path(), 8).unwrap();
        let (task, other) = (TaskId::random(), TaskId::random());
        for t in [task, other] {
            for i in 0..25u64 {
                let w = i * 60;
                let r = pb::WindowResult {
                    task_id: t.as_bytes().to_vec().into(),
                    interval: Some(pb::Interval {
                        start: w,
                        duration: 60,
                    }),
                    ..Default::default()
                };
                s.put_window(&t, Time::from_secs(w), Time::from_secs(w + 60), &r)
                    .await
                    .unwrap();
                let alerts: Vec<pb::Alert> = ["a", "b"]
                    .iter()
                    .map(|d| pb::Alert {
                        task_id: t.as_bytes().to_vec().into(),
                        window_start: w,
                        detector: (*d).into(),
                        ..Default::default()
                    })
                    .collect();
                s.put_tested(&t, w, &alerts).await.unwrap();
            }
        }
        // Windows starting in [300, 1200), 4 at a time: 15 windows in 4 pages.
        let mut req = PageRequest {
            from: 300,
            to: 1_200,
            limit: 4,
            after: None,
        };
        let mut starts = Vec::new();
        let mut pages = 0;
        loop {
            let p = s.windows_page(&task, &req).unwrap();
            pages += 1;
            starts.extend(p.items.iter().map(|w| w.interval.unwrap().start));
            match p.next {
                Some(n) => req.after = Some(n),
                None => break,
            }
        }
        assert_eq!(starts, (5..20).map(|i| i * 60).collect::<Vec<_>>());
        assert_eq!(pages, 4);
        // A token from the other task's list cannot move this task's list out of its task.
        let foreign = s
            .windows_page(
                &other,
                &PageRequest {
                    from: 0,
                    to: u64::MAX,
                    limit: 1,
                    after: None,
                },
            )
            .unwrap()
            .next;
        let p = s
            .windows_page(
                &task,
                &PageRequest {
                    from: 0,
                    to: u64::MAX,
                    limit: 100,
                    after: foreign,
                },
            )
            .unwrap();
        assert!(
            p.items
                .iter()
                .all(|w| w.task_id.as_ref() == task.as_bytes())
        );
        // Alerts: two per window; of every task, filtered by time, paged across tasks.
        let mut req = PageRequest {
            from: 600,
            to: 720,
            limit: 3,
            after: None,
        };
        let mut got = Vec::new();
        loop {
            let p = s.alerts_page(&[task, other], &req).unwrap();
            got.extend(p.items);
            match p.next {
                Some(n) => req.after = Some(n),
                None => break,
            }
        }
        assert_eq!(got.len(), 8, "2 windows × 2 detectors × 2 tasks");
        assert!(got.iter().all(|a| (600..720).contains(&a.window_start)));
        let one = s
            .alerts_page(
                &[task],
                &PageRequest {
                    from: 0,
                    to: 120,
                    limit: 10,
                    after: None,
                },
            )
            .unwrap();
        assert_eq!(one.items.len(), 4);
        assert_eq!(one.next, None);
    }
}
