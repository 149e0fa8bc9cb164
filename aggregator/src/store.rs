//! The aggregator's sled database.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `tasks` | task id | the task (protobuf `CreateTaskRequest`) |
//! | `keys` | `"keyset"` | the HPKE [`KeySet`] |
//! | `seen` | task ‖ time ‖ report id | — (anti-replay; expires with the task's report expiry) |
//! | `pending` | task ‖ seq | a leader's accepted, not yet aggregated report |
//! | `jobs` | job id | a leader's aggregation job in flight (task and report seqs) |
//! | `helper_jobs` | task ‖ job id | request hash and response of a helper's finished job |
//! | `batches` | task ‖ window start | aggregate share, report count and report-id checksum |
//! | `stats` | scope ‖ code | counters of accepted, aggregated and rejected reports |
//! | `tenants` | tenant name | SHA-256 of the tenant's collector bearer token |
//! | `ledger` | task ‖ purpose ‖ window start | ε spent on the window, in millionths |
//! | `collections` | task ‖ collection id | request hash and the stored answer of a collection |
//! | `collected` | task ‖ window start | — (the window is closed: the leader's ingest refuses its reports as late) |
//! | `released` | task ‖ window start | — (an aggregate share of the window left this aggregator: nothing more is accumulated into it) |
//! | `window_batches` | task ‖ window start | start ‖ duration of the batch (interval) the window was collected in |
//! | `batch_collections` | task ‖ batch start ‖ duration | routine u32 ‖ alert u32: collections of the batch |
//! | `late` | task ‖ window start | reports refused because the window was closed (leader) |
//! | `collection_ends` | task ‖ last window start ‖ collection id | — (finds answers to delete when their windows pass the task's retention) |
//!
//! Every change that must be atomic is one sled transaction over the trees involved: storing a
//! batch of ingested reports with their anti-replay entries (refusing reports of closed windows),
//! finishing an aggregation job (accumulating output shares into windows not yet released,
//! removing the reports, recording the outcome), and committing a collection (checking the batch
//! rules, checking and spending the budget of every window, recording the answer, closing and
//! releasing the windows). sled transactions are serializable, so a check inside one cannot race
//! a commit of another: no report enters a window after its share has left. A crash before a
//! transaction commits loses nothing that was acknowledged; after it, nothing is counted twice.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use hush_protocol::codec::{Codec, Reader, Writer};
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{
    AggregateShare, AggregationJobId, HpkeCiphertext, ReportId, ReportIdChecksum, TaskId, Time,
};
use hush_server::db::{abort, tx_result};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::{Transactional, Tree};

use crate::error::{Error, Result};

/// Counters are kept per task, or under this scope for reports whose task is unknown.
pub const GLOBAL_SCOPE: [u8; 32] = [0; 32];

/// What a stats counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stat {
    /// Reports accepted at ingest (leader) or in a job (helper).
    Accepted,
    /// Reports accumulated into an aggregate share.
    Aggregated,
    /// Reports refused, by reason.
    Rejected(RejectReason),
}

impl Stat {
    fn code(self) -> u8 {
        match self {
            Stat::Accepted => 200,
            Stat::Aggregated => 201,
            Stat::Rejected(r) => r as i32 as u8,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            200 => Some(Stat::Accepted),
            201 => Some(Stat::Aggregated),
            c => RejectReason::try_from(c as i32).ok().map(Stat::Rejected),
        }
    }
}

/// Counter increments to apply together.
#[derive(Clone, Debug, Default)]
pub struct StatDelta(HashMap<([u8; 32], Stat), u64>);

impl StatDelta {
    /// Adds `n` to `stat` of `scope` (a task id, or [`GLOBAL_SCOPE`]).
    pub fn add(&mut self, scope: [u8; 32], stat: Stat, n: u64) {
        if n > 0 {
            *self.0.entry((scope, stat)).or_default() += n;
        }
    }

    /// Adds one.
    pub fn incr(&mut self, scope: [u8; 32], stat: Stat) {
        self.add(scope, stat, 1);
    }

    /// Merges another delta.
    pub fn merge(&mut self, other: StatDelta) {
        for ((s, k), n) in other.0 {
            self.add(s, k, n);
        }
    }

    /// The counts of one scope, by stat.
    pub fn for_scope(&self, scope: &[u8; 32]) -> BTreeMap<Stat, u64> {
        self.0
            .iter()
            .filter(|((s, _), _)| s == scope)
            .map(|((_, k), n)| (*k, *n))
            .collect()
    }

    fn apply(
        &self,
        stats: &TransactionalTree,
    ) -> std::result::Result<(), ConflictableTransactionError<Error>> {
        for ((scope, stat), n) in &self.0 {
            let key = stat_key(scope, *stat);
            let cur = stats.get(key)?.map(|v| be_u64(&v)).unwrap_or(0);
            stats.insert(&key[..], &(cur + n).to_be_bytes()[..])?;
        }
        Ok(())
    }
}

fn stat_key(scope: &[u8; 32], stat: Stat) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[..32].copy_from_slice(scope);
    k[32] = stat.code();
    k
}

fn be_u64(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[8 - n..].copy_from_slice(&v[..n]);
    u64::from_be_bytes(b)
}

fn task_key(task: &TaskId, suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + suffix.len());
    k.extend_from_slice(task.as_bytes());
    k.extend_from_slice(suffix);
    k
}

/// The anti-replay key of a report: task ‖ time ‖ report id, so expiry is a range deletion.
pub fn seen_key(task: &TaskId, time: Time, id: &ReportId) -> Vec<u8> {
    let mut k = Vec::with_capacity(56);
    k.extend_from_slice(task.as_bytes());
    k.extend_from_slice(&time.as_secs().to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn pending_key(task: &TaskId, seq: u64) -> Vec<u8> {
    task_key(task, &seq.to_be_bytes())
}

fn batch_key(task: &TaskId, window: Time) -> Vec<u8> {
    task_key(task, &window.as_secs().to_be_bytes())
}

/// Scope, anti-replay key, pending key, window key and value of one report to store.
type EncodedPending = ([u8; 32], Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

/// What happened to one report offered to [`Store::store_pending`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Stored, waiting for aggregation.
    Stored,
    /// Its id was seen before.
    Replay,
    /// Its window is closed (collected): a late report.
    Late,
}

/// A leader's accepted report, waiting for aggregation. The leader's input share is stored
/// opened (it reveals nothing without the helper's share) so aggregation does not pay for a
/// second HPKE open; the helper's share stays sealed to the helper.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingReport {
    /// The report id.
    pub report_id: ReportId,
    /// The report's time.
    pub time: Time,
    /// Encoded Prio3 public share.
    pub public_share: Vec<u8>,
    /// The leader's opened input share.
    pub leader_share: Vec<u8>,
    /// The helper's sealed input share.
    pub helper_share: HpkeCiphertext,
}

impl std::fmt::Debug for PendingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingReport")
            .field("report_id", &self.report_id)
            .field("time", &self.time)
            .finish_non_exhaustive()
    }
}

impl Codec for PendingReport {
    const NAME: &'static str = "PendingReport";
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(1);
        self.report_id.encode(out);
        self.time.encode(out);
        out.put_opaque_u32(&self.public_share);
        out.put_opaque_u32(&self.leader_share);
        self.helper_share.encode(out);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, hush_protocol::DecodeError> {
        if r.u8("version")? != 1 {
            return Err(r.invalid("version", "unknown"));
        }
        Ok(Self {
            report_id: ReportId::decode(r)?,
            time: Time::decode(r)?,
            public_share: r.opaque_u32("public_share")?.to_vec(),
            leader_share: r.opaque_u32("leader_share")?.to_vec(),
            helper_share: HpkeCiphertext::decode(r)?,
        })
    }
}

/// A leader's aggregation job in flight: which pending reports it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderJob {
    /// The task.
    pub task_id: TaskId,
    /// Sequence numbers of the job's pending reports, ascending.
    pub seqs: Vec<u64>,
    /// When the job was first created (`None` for jobs recorded before this was stored).
    pub created: Option<Time>,
}

impl Codec for LeaderJob {
    const NAME: &'static str = "LeaderJob";
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(2);
        self.task_id.encode(out);
        out.put_u64(self.created.map_or(0, Time::as_secs));
        out.put_u32(self.seqs.len() as u32);
        for s in &self.seqs {
            out.put_u64(*s);
        }
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, hush_protocol::DecodeError> {
        let version = r.u8("version")?;
        if version != 1 && version != 2 {
            return Err(r.invalid("version", "unknown"));
        }
        let task_id = TaskId::decode(r)?;
        let created = if version == 2 {
            Some(r.u64("created")?)
                .filter(|t| *t != 0)
                .map(Time::from_secs)
        } else {
            None
        };
        let n = r.u32("seqs")? as usize;
        if n > r.remaining() / 8 {
            return Err(r.invalid("seqs", "count exceeds the record"));
        }
        let seqs = (0..n)
            .map(|_| r.u64("seq"))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            task_id,
            seqs,
            created,
        })
    }
}

/// The aggregate of one task's time bucket at one aggregator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchAggregation {
    /// Reports accumulated.
    pub report_count: u64,
    /// Checksum of their report ids.
    pub checksum: ReportIdChecksum,
    /// The aggregate share.
    pub share: AggregateShare,
}

impl BatchAggregation {
    /// An empty batch of `len` entries.
    pub fn empty(len: usize) -> Self {
        Self {
            report_count: 0,
            checksum: ReportIdChecksum::default(),
            share: AggregateShare::zero(len),
        }
    }

    /// Adds another batch of the same task.
    pub fn merge(&mut self, other: &BatchAggregation) -> Result<()> {
        self.share
            .merge(&other.share)
            .map_err(|e| Error::corrupt("batch aggregation", e))?;
        self.report_count += other.report_count;
        self.checksum.combine(&other.checksum);
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let share = self.share.to_bytes();
        let mut out = Vec::with_capacity(1 + 8 + 32 + 4 + share.len());
        out.put_u8(1);
        out.put_u64(self.report_count);
        out.extend_from_slice(self.checksum.as_bytes());
        out.put_u32(self.share.len() as u32);
        out.extend_from_slice(&share);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new("BatchAggregation", bytes);
        let parse = |r: &mut Reader<'_>| -> std::result::Result<Self, String> {
            if r.u8("version").map_err(|e| e.to_string())? != 1 {
                return Err("unknown version".into());
            }
            let report_count = r.u64("report_count").map_err(|e| e.to_string())?;
            let checksum =
                ReportIdChecksum::from(r.array::<32>("checksum").map_err(|e| e.to_string())?);
            let len = r.u32("len").map_err(|e| e.to_string())? as usize;
            let share = AggregateShare::from_bytes(r.rest(), len).map_err(|e| e.to_string())?;
            Ok(Self {
                report_count,
                checksum,
                share,
            })
        };
        parse(&mut r).map_err(|e| Error::corrupt("batch aggregation", e))
    }
}

/// A helper's record of a finished aggregation job, so a retry gets the same answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperJobRecord {
    /// When the job was committed.
    pub committed: Time,
    /// SHA-256 of the request.
    pub request_hash: [u8; 32],
    /// The encoded response.
    pub response: Vec<u8>,
}

impl HelperJobRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(41 + self.response.len());
        out.put_u8(1);
        out.put_u64(self.committed.as_secs());
        out.extend_from_slice(&self.request_hash);
        out.extend_from_slice(&self.response);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 41 || bytes[0] != 1 {
            return Err(Error::corrupt("helper job", "bad header"));
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(&bytes[9..41]);
        Ok(Self {
            committed: Time::from_secs(be_u64(&bytes[1..9])),
            request_hash: h,
            response: bytes[41..].to_vec(),
        })
    }
}

/// The outcome of committing a helper job.
#[derive(Debug)]
pub enum HelperCommit {
    /// This call committed the job; the value is the response.
    Committed(Vec<u8>),
    /// The job had already been committed with the same request: the stored response.
    Existing(Vec<u8>),
}

/// One report of a helper job, ready to commit.
#[derive(Debug)]
pub struct HelperReport {
    /// The report id.
    pub report_id: ReportId,
    /// The report's time.
    pub time: Time,
    /// The output share and the verifier message if the report verified, else the reason.
    pub outcome: std::result::Result<(AggregateShare, Vec<u8>), RejectReason>,
    /// Whether the report reaches the anti-replay table (false when its time is out of range).
    pub mark_seen: bool,
}

/// The aggregator's database.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    tasks: Tree,
    keys: Tree,
    seen: Tree,
    pending: Tree,
    jobs: Tree,
    helper_jobs: Tree,
    batches: Tree,
    stats: Tree,
    tenants: Tree,
    ledger: Tree,
    collections: Tree,
    collected: Tree,
    released: Tree,
    window_batches: Tree,
    batch_collections: Tree,
    late: Tree,
    collection_ends: Tree,
    audit: crate::audit::AuditLog,
}

/// Why a collection may not be committed (nothing is written then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectRefusal {
    /// The budget of a window does not cover the collection.
    OverBudget {
        /// The window.
        window: Time,
        /// ε left on it, in millionths.
        left_micros: u64,
    },
    /// The interval overlaps a batch collected before without being equal to it.
    Overlaps {
        /// The window in both.
        window: Time,
        /// The batch it was collected in: start and duration.
        batch: (Time, u64),
    },
    /// The batch was collected as often as the task allows for this purpose.
    Exhausted {
        /// Routine and alert collections of the batch so far.
        routine: u32,
        /// Alert collections so far.
        alert: u32,
    },
}

/// The collection rules of a batch: DAP's "equal or disjoint" rule and how often it may be
/// collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRule {
    /// The batch: start and duration.
    pub batch: (Time, u64),
    /// 0 routine, 1 alert.
    pub purpose: u8,
    /// The task's `max_collections_per_batch` (0: one routine plus what the alert budget allows).
    pub max_collections: u32,
}

impl BatchRule {
    fn counts_key(&self, task: &TaskId) -> Vec<u8> {
        let mut k = task_key(task, &self.batch.0.as_secs().to_be_bytes());
        k.extend_from_slice(&self.batch.1.to_be_bytes());
        k
    }

    fn batch_value(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.batch.0.as_secs().to_be_bytes());
        v[8..].copy_from_slice(&self.batch.1.to_be_bytes());
        v
    }

    /// Checks the rule given how each window was collected before and the batch's counts.
    fn check(
        &self,
        windows: &[(Time, Option<(Time, u64)>)],
        counts: (u32, u32),
    ) -> Option<CollectRefusal> {
        for (w, b) in windows {
            if let Some(b) = b
                && *b != self.batch
            {
                return Some(CollectRefusal::Overlaps {
                    window: *w,
                    batch: *b,
                });
            }
        }
        let (routine, alert) = counts;
        let exhausted = (self.purpose == 0 && routine >= 1)
            || (self.max_collections > 0 && routine + alert >= self.max_collections);
        exhausted.then_some(CollectRefusal::Exhausted { routine, alert })
    }
}

/// A batch: its start and duration in seconds.
pub type Batch = (Time, u64);

/// Each window with the batch it was collected in, if any.
type WindowBatches = Vec<(Time, Option<Batch>)>;

fn decode_batch(v: &[u8]) -> Option<(Time, u64)> {
    (v.len() == 16).then(|| (Time::from_secs(be_u64(&v[..8])), be_u64(&v[8..])))
}

fn decode_counts(v: Option<&[u8]>) -> (u32, u32) {
    match v {
        Some(v) if v.len() == 8 => (
            u32::from_be_bytes(v[..4].try_into().expect("4 bytes")),
            u32::from_be_bytes(v[4..].try_into().expect("4 bytes")),
        ),
        _ => (0, 0),
    }
}

/// A collection to commit: its spend, its stored answer, the windows it closes.
#[derive(Clone, Debug)]
pub struct CollectionCommit<'a> {
    /// The task.
    pub task: &'a TaskId,
    /// The collection id.
    pub collection_id: &'a [u8; 16],
    /// The batch rules this collection must pass (purpose included).
    pub rule: BatchRule,
    /// The report count and checksum the answer was computed from: the commit fails if the
    /// windows no longer hold exactly these reports.
    pub summed: (u64, ReportIdChecksum),
    /// The windows of the interval.
    pub windows: &'a [Time],
    /// ε spent on each window, in millionths.
    pub epsilon_micros: u64,
    /// The purpose's budget per window, in millionths.
    pub budget_micros: u64,
    /// Hash of the request, for retries.
    pub request_hash: [u8; 32],
    /// The encoded answer.
    pub answer: &'a [u8],
}

fn ledger_key(task: &TaskId, purpose: u8, window: Time) -> Vec<u8> {
    let mut k = task_key(task, &[purpose]);
    k.extend_from_slice(&window.as_secs().to_be_bytes());
    k
}

impl Store {
    /// The `keys` tree ([`crate::keys`]).
    pub(crate) fn keys_tree(&self) -> &Tree {
        &self.keys
    }

    /// The database.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = hush_server::db::open(dir, cache_mb)?;
        Ok(Self {
            tasks: db.open_tree("tasks")?,
            keys: db.open_tree("keys")?,
            seen: db.open_tree("seen")?,
            pending: db.open_tree("pending")?,
            jobs: db.open_tree("jobs")?,
            helper_jobs: db.open_tree("helper_jobs")?,
            batches: db.open_tree("batches")?,
            stats: db.open_tree("stats")?,
            tenants: db.open_tree("tenants")?,
            ledger: db.open_tree("ledger")?,
            collections: db.open_tree("collections")?,
            collected: db.open_tree("collected")?,
            released: db.open_tree("released")?,
            window_batches: db.open_tree("window_batches")?,
            batch_collections: db.open_tree("batch_collections")?,
            late: db.open_tree("late")?,
            collection_ends: db.open_tree("collection_ends")?,
            audit: crate::audit::AuditLog::open(&db)?,
            db,
        })
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        Ok(hush_server::db::flush(&self.db).await?)
    }

    /// The audit trail.
    pub fn audit(&self) -> &crate::audit::AuditLog {
        &self.audit
    }

    /// A fresh, increasing sequence number.
    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    // ---- tasks

    /// Stores a task unless one with the same id exists; returns the existing one if so.
    pub fn put_task(&self, id: &TaskId, encoded: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let prev =
            self.tasks
                .compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(encoded))?;
        Ok(prev.err().and_then(|e| e.current.map(|v| v.to_vec())))
    }

    /// All stored tasks, encoded.
    pub fn tasks(&self) -> Result<Vec<Vec<u8>>> {
        self.tasks
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    // ---- tenants

    /// Sets the hash of a tenant's collector token, durably.
    pub async fn set_tenant_token_hash(&self, tenant: &str, hash: [u8; 32]) -> Result<()> {
        self.tenants.insert(tenant.as_bytes(), &hash[..])?;
        self.flush().await
    }

    /// The hash of a tenant's collector token.
    pub fn tenant_token_hash(&self, tenant: &str) -> Result<Option<[u8; 32]>> {
        Ok(self
            .tenants
            .get(tenant.as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok()))
    }

    /// The tenant whose collector token hashes to `hash`, if any.
    pub fn tenant_of_token_hash(&self, hash: &[u8; 32]) -> Result<Option<String>> {
        for kv in self.tenants.iter() {
            let (k, v) = kv?;
            if v.as_ref() == hash {
                return Ok(Some(String::from_utf8_lossy(&k).into_owned()));
            }
        }
        Ok(None)
    }

    // ---- keys

    // ---- leader ingest

    /// Stores accepted reports (task, seq, report) with their anti-replay entries in one
    /// transaction. A report whose id was seen before (or twice in `reports`) is refused as a
    /// replay; one whose window is closed (collected) is marked seen and refused as late,
    /// counted per window. The closed
    /// check runs inside the transaction, so no report can enter a window once a collection
    /// closed it. The result says, in order, what happened to each report. `stats` is applied in
    /// the same transaction, plus one `Accepted`, `Rejected(Replay)` or
    /// `Rejected(BatchCollected)` per report. Report times are aligned to their task's window
    /// (the ingest checks that), so a report's time is its window.
    pub fn store_pending(
        &self,
        reports: &[(TaskId, u64, PendingReport)],
        stats: &StatDelta,
    ) -> Result<Vec<Ingested>> {
        let encoded: Vec<EncodedPending> = reports
            .iter()
            .map(|(task, seq, r)| {
                (
                    *task.as_bytes(),
                    seen_key(task, r.time, &r.report_id),
                    pending_key(task, *seq),
                    batch_key(task, r.time),
                    r.to_bytes(),
                )
            })
            .collect();
        let r = (
            &self.seen,
            &self.pending,
            &self.stats,
            &self.collected,
            &self.late,
        )
            .transaction(|(seen, pending, st, collected, late)| {
                let mut stored = Vec::with_capacity(encoded.len());
                let mut delta = stats.clone();
                let mut late_delta: BTreeMap<&[u8], u64> = BTreeMap::new();
                for (scope, sk, pk, wk, v) in &encoded {
                    if seen.get(sk)?.is_some() {
                        stored.push(Ingested::Replay);
                        delta.incr(*scope, Stat::Rejected(RejectReason::Replay));
                        continue;
                    }
                    // Seen either way: a late report counts once, however often it is resent.
                    seen.insert(&sk[..], &[][..])?;
                    if collected.get(wk)?.is_some() {
                        stored.push(Ingested::Late);
                        *late_delta.entry(wk).or_default() += 1;
                        delta.incr(*scope, Stat::Rejected(RejectReason::BatchCollected));
                        continue;
                    }
                    pending.insert(&pk[..], &v[..])?;
                    stored.push(Ingested::Stored);
                    delta.incr(*scope, Stat::Accepted);
                }
                for (k, n) in late_delta {
                    let cur = late.get(k)?.map(|v| be_u64(&v)).unwrap_or(0);
                    late.insert(k, &(cur + n).to_be_bytes()[..])?;
                }
                delta.apply(st)?;
                Ok(stored)
            });
        tx_result(r)
    }

    /// Late reports of `task` over `windows`.
    pub fn late_in(&self, task: &TaskId, windows: &[Time]) -> Result<u64> {
        let mut n = 0;
        for w in windows {
            n += self
                .late
                .get(batch_key(task, *w))?
                .map(|v| be_u64(&v))
                .unwrap_or(0);
        }
        Ok(n)
    }

    /// Applies counter increments on their own.
    pub fn add_stats(&self, stats: &StatDelta) -> Result<()> {
        tx_result(self.stats.transaction(|st| {
            stats.apply(st)?;
            Ok(())
        }))
    }

    /// Whether a report id is in the anti-replay table.
    pub fn is_seen(&self, task: &TaskId, time: Time, id: &ReportId) -> Result<bool> {
        Ok(self.seen.contains_key(seen_key(task, time, id))?)
    }

    // ---- leader jobs

    /// Up to `limit` pending reports of `task` in seq order, skipping seqs for which `skip`
    /// is true (reports already in a job).
    pub fn scan_pending(
        &self,
        task: &TaskId,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, PendingReport)>> {
        let mut out = Vec::new();
        for kv in self.pending.scan_prefix(task.as_bytes()) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let seq = be_u64(&k[32..]);
            if skip(seq) {
                continue;
            }
            out.push((
                seq,
                PendingReport::from_bytes(&v).map_err(|e| Error::corrupt("pending report", e))?,
            ));
        }
        Ok(out)
    }

    /// The pending report `seq` of `task`.
    pub fn pending_report(&self, task: &TaskId, seq: u64) -> Result<Option<PendingReport>> {
        match self.pending.get(pending_key(task, seq))? {
            Some(v) => Ok(Some(
                PendingReport::from_bytes(&v).map_err(|e| Error::corrupt("pending report", e))?,
            )),
            None => Ok(None),
        }
    }

    /// Number of pending reports of all tasks.
    pub fn pending_total(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Number of pending reports of `task`.
    pub fn pending_count(&self, task: &TaskId) -> Result<u64> {
        Ok(self.pending.scan_prefix(task.as_bytes()).keys().count() as u64)
    }

    /// Records a job before its reports are sent to the helper.
    pub fn put_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<()> {
        self.jobs.insert(id.as_bytes(), job.to_bytes())?;
        Ok(())
    }

    /// Jobs that were in flight, e.g. when the process stopped.
    pub fn jobs(&self) -> Result<Vec<(AggregationJobId, LeaderJob)>> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id =
                    AggregationJobId::try_from(&k[..]).map_err(|e| Error::corrupt("job id", e))?;
                Ok((
                    id,
                    LeaderJob::from_bytes(&v).map_err(|e| Error::corrupt("job", e))?,
                ))
            })
            .collect()
    }

    /// Finishes a leader job in one transaction: merges `batches` into the task's batch
    /// aggregations, removes the job's pending reports and the job, and applies `stats` plus one
    /// `Aggregated` per accumulated report. A batch whose window was released (its share left
    /// this aggregator) is not merged: its reports are counted `Rejected(BatchCollected)`
    /// instead, so nothing enters a window after its share has left. Returns how many reports
    /// were left out that way.
    pub fn commit_leader_job(
        &self,
        id: &AggregationJobId,
        job: &LeaderJob,
        batches: &BTreeMap<Time, BatchAggregation>,
        stats: &StatDelta,
    ) -> Result<u64> {
        let pkeys: Vec<Vec<u8>> = job
            .seqs
            .iter()
            .map(|s| pending_key(&job.task_id, *s))
            .collect();
        let bkeys: Vec<(Vec<u8>, &BatchAggregation)> = batches
            .iter()
            .map(|(w, b)| (batch_key(&job.task_id, *w), b))
            .collect();
        let scope = *job.task_id.as_bytes();
        let r = (
            &self.pending,
            &self.jobs,
            &self.batches,
            &self.stats,
            &self.released,
        )
            .transaction(|(pending, jobs, bt, st, released)| {
                if jobs.get(id.as_bytes())?.is_none() {
                    return Err(abort(Error::corrupt(
                        "job",
                        format!("job {id} vanished before it finished"),
                    )));
                }
                for k in &pkeys {
                    pending.remove(&k[..])?;
                }
                jobs.remove(&id.as_bytes()[..])?;
                let mut delta = stats.clone();
                let mut open = Vec::with_capacity(bkeys.len());
                let mut left_out = 0;
                for (k, b) in &bkeys {
                    if released.get(k)?.is_some() {
                        left_out += b.report_count;
                        delta.add(
                            scope,
                            Stat::Rejected(RejectReason::BatchCollected),
                            b.report_count,
                        );
                    } else {
                        delta.add(scope, Stat::Aggregated, b.report_count);
                        open.push((k.clone(), *b));
                    }
                }
                merge_batches(bt, &open)?;
                delta.apply(st)?;
                Ok(left_out)
            });
        tx_result(r)
    }

    /// Gives up a leader job the helper may no longer remember: removes its pending reports
    /// and the job, counting the reports as refused `TOO_OLD`, in one transaction. Returns how
    /// many reports went.
    pub fn abandon_leader_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<u64> {
        let pkeys: Vec<Vec<u8>> = job
            .seqs
            .iter()
            .map(|s| pending_key(&job.task_id, *s))
            .collect();
        let mut delta = StatDelta::default();
        delta.add(
            *job.task_id.as_bytes(),
            Stat::Rejected(RejectReason::TooOld),
            pkeys.len() as u64,
        );
        tx_result(
            (&self.pending, &self.jobs, &self.stats).transaction(|(pending, jobs, st)| {
                for k in &pkeys {
                    pending.remove(&k[..])?;
                }
                jobs.remove(&id.as_bytes()[..])?;
                delta.apply(st)?;
                Ok(())
            }),
        )?;
        Ok(pkeys.len() as u64)
    }

    // ---- helper jobs

    /// The stored outcome of a helper job, if it finished.
    pub fn helper_job(
        &self,
        task: &TaskId,
        job: &AggregationJobId,
    ) -> Result<Option<HelperJobRecord>> {
        match self.helper_jobs.get(task_key(task, job.as_bytes()))? {
            Some(v) => Ok(Some(HelperJobRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Commits a helper job in one transaction: refuses reports seen before, marks the others
    /// seen, accumulates the verified ones, stores the response built by `respond` from the
    /// final outcomes, and applies the counters. If the job was committed before with the same
    /// request hash, returns the stored response instead; with another hash, fails.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_helper_job(
        &self,
        task: &TaskId,
        job: &AggregationJobId,
        now: Time,
        request_hash: [u8; 32],
        output_len: usize,
        reports: &[HelperReport],
        respond: impl Fn(&[(ReportId, std::result::Result<&[u8], RejectReason>)]) -> Vec<u8>,
    ) -> Result<HelperCommit> {
        let jkey = task_key(task, job.as_bytes());
        let scope = *task.as_bytes();
        let r = (
            &self.seen,
            &self.batches,
            &self.helper_jobs,
            &self.stats,
            &self.released,
        )
            .transaction(|(seen, bt, hj, st, released)| {
                if let Some(v) = hj.get(&jkey)? {
                    let rec = HelperJobRecord::decode(&v).map_err(abort)?;
                    if rec.request_hash != request_hash {
                        return Err(abort(Error::JobConflict(job.to_string())));
                    }
                    return Ok(HelperCommit::Existing(rec.response));
                }
                let mut stats = StatDelta::default();
                let mut batches: BTreeMap<Time, BatchAggregation> = BTreeMap::new();
                let mut outcomes = Vec::with_capacity(reports.len());
                for r in reports {
                    let mut outcome = r
                        .outcome
                        .as_ref()
                        .map(|(_, msg)| msg.as_slice())
                        .map_err(|e| *e);
                    if r.mark_seen {
                        let sk = seen_key(task, r.time, &r.report_id);
                        if seen.insert(sk, &[][..])?.is_some() {
                            outcome = Err(RejectReason::Replay);
                        }
                    }
                    // Checked here, in the transaction that accumulates: however a leader
                    // interleaves jobs with collections, no report enters a window whose share
                    // has left.
                    if outcome.is_ok() && released.get(batch_key(task, r.time))?.is_some() {
                        outcome = Err(RejectReason::BatchCollected);
                    }
                    match (&outcome, &r.outcome) {
                        (Ok(_), Ok((share, _))) => {
                            let b = batches
                                .entry(r.time)
                                .or_insert_with(|| BatchAggregation::empty(output_len));
                            b.share
                                .merge(share)
                                .map_err(|e| abort(Error::corrupt("output share", e)))?;
                            b.report_count += 1;
                            b.checksum.update(&r.report_id);
                            stats.incr(scope, Stat::Accepted);
                            stats.incr(scope, Stat::Aggregated);
                        }
                        (Err(reason), _) => stats.incr(scope, Stat::Rejected(*reason)),
                        (Ok(_), Err(_)) => unreachable!("an outcome only turns from Ok to Err"),
                    }
                    outcomes.push((r.report_id, outcome));
                }
                let bkeys: Vec<(Vec<u8>, &BatchAggregation)> = batches
                    .iter()
                    .map(|(w, b)| (batch_key(task, *w), b))
                    .collect();
                merge_batches(bt, &bkeys)?;
                let response = respond(&outcomes);
                let rec = HelperJobRecord {
                    committed: now,
                    request_hash,
                    response: response.clone(),
                };
                hj.insert(&jkey[..], rec.encode())?;
                stats.apply(st)?;
                Ok(HelperCommit::Committed(response))
            });
        tx_result(r)
    }

    // ---- batches and stats

    /// The batch aggregation of `task` for the window starting at `window`.
    pub fn batch(&self, task: &TaskId, window: Time) -> Result<Option<BatchAggregation>> {
        match self.batches.get(batch_key(task, window))? {
            Some(v) => Ok(Some(BatchAggregation::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every batch aggregation of `task`, by window.
    pub fn batches(&self, task: &TaskId) -> Result<BTreeMap<Time, BatchAggregation>> {
        self.batches
            .scan_prefix(task.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    Time::from_secs(be_u64(&k[32..])),
                    BatchAggregation::decode(&v)?,
                ))
            })
            .collect()
    }

    /// The counters of a scope.
    pub fn stats(&self, scope: &[u8; 32]) -> Result<BTreeMap<Stat, u64>> {
        let mut out = BTreeMap::new();
        for kv in self.stats.scan_prefix(scope) {
            let (k, v) = kv?;
            if k.len() == 33
                && let Some(s) = Stat::from_code(k[32])
            {
                out.insert(s, be_u64(&v));
            }
        }
        Ok(out)
    }

    // ---- collection

    /// The sum of `task`'s batch aggregations over `windows`.
    pub fn sum_batches(
        &self,
        task: &TaskId,
        windows: &[Time],
        len: usize,
    ) -> Result<BatchAggregation> {
        let mut sum = BatchAggregation::empty(len);
        for w in windows {
            if let Some(b) = self.batch(task, *w)? {
                sum.merge(&b)?;
            }
        }
        Ok(sum)
    }

    /// Pending (accepted, not yet aggregated) reports of `task` in `windows`.
    pub fn pending_in(&self, task: &TaskId, windows: &[Time]) -> Result<u64> {
        let set: std::collections::HashSet<Time> = windows.iter().copied().collect();
        let mut n = 0;
        for v in self.pending.scan_prefix(task.as_bytes()).values() {
            let r =
                PendingReport::from_bytes(&v?).map_err(|e| Error::corrupt("pending report", e))?;
            if set.contains(&r.time) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// ε spent so far (millionths) per window, for one purpose.
    pub fn spent(&self, task: &TaskId, purpose: u8, windows: &[Time]) -> Result<Vec<u64>> {
        windows
            .iter()
            .map(|w| {
                Ok(self
                    .ledger
                    .get(ledger_key(task, purpose, *w))?
                    .map(|v| be_u64(&v))
                    .unwrap_or(0))
            })
            .collect()
    }

    /// The stored request hash and answer of a collection, if it ran.
    pub fn collection(&self, task: &TaskId, id: &[u8; 16]) -> Result<Option<([u8; 32], Vec<u8>)>> {
        Ok(self.collections.get(task_key(task, id))?.map(|v| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&v[..32]);
            (h, v[32..].to_vec())
        }))
    }

    /// Every collected (closed) window, per task.
    pub fn collected_windows(&self) -> Result<Vec<(TaskId, Time)>> {
        self.collected
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                let t =
                    TaskId::try_from(&k[..32]).map_err(|e| Error::corrupt("collected key", e))?;
                Ok((t, Time::from_secs(be_u64(&k[32..]))))
            })
            .collect()
    }

    /// How each of `windows` was collected before: the batch (start, duration) it was in.
    fn window_batches_of(&self, task: &TaskId, windows: &[Time]) -> Result<WindowBatches> {
        windows
            .iter()
            .map(|w| {
                Ok((
                    *w,
                    self.window_batches
                        .get(batch_key(task, *w))?
                        .and_then(|v| decode_batch(&v)),
                ))
            })
            .collect()
    }

    /// Routine and alert collections of a batch so far.
    pub fn batch_collections(&self, task: &TaskId, batch: (Time, u64)) -> Result<(u32, u32)> {
        let rule = BatchRule {
            batch,
            purpose: 0,
            max_collections: 0,
        };
        Ok(decode_counts(
            self.batch_collections
                .get(rule.counts_key(task))?
                .as_deref(),
        ))
    }

    /// Checks the batch rules without writing (the same checks run again inside
    /// [`Store::commit_collection`]'s transaction).
    pub fn check_batch(
        &self,
        task: &TaskId,
        windows: &[Time],
        rule: &BatchRule,
    ) -> Result<Option<CollectRefusal>> {
        let ws = self.window_batches_of(task, windows)?;
        Ok(rule.check(&ws, self.batch_collections(task, rule.batch)?))
    }

    /// Checks the batch rules and that every window's budget covers the spend and, if so,
    /// spends it, stores the answer, counts the batch's collection and marks the windows
    /// collected and released, in one transaction. Concurrent commits are serialized by sled, so
    /// two collections can never both spend the last of a budget, collect overlapping batches or
    /// exceed a batch's collections. Returns the smallest budget left over the windows, or why
    /// the collection is refused (nothing is written then).
    pub fn commit_collection(
        &self,
        c: &CollectionCommit<'_>,
    ) -> Result<std::result::Result<u64, CollectRefusal>> {
        let last = c
            .windows
            .iter()
            .max()
            .copied()
            .unwrap_or(Time::from_secs(0));
        let mut end_key = batch_key(c.task, last);
        end_key.extend_from_slice(c.collection_id);
        let counts_key = c.rule.counts_key(c.task);
        let batch_value = c.rule.batch_value();
        let purpose = c.rule.purpose;
        let r = (
            &self.ledger,
            &self.collections,
            &self.collected,
            &self.collection_ends,
            &self.released,
            &self.window_batches,
            &self.batch_collections,
            &self.batches,
        )
            .transaction(
                |(ledger, collections, collected, ends, released, wb, bc, bt)| {
                    // The answer must describe what the windows hold now: a job committed
                    // between the sum and this transaction would otherwise be in the batch
                    // without being in the released share, and show in a later collection.
                    let mut count = 0u64;
                    let mut checksum = ReportIdChecksum::default();
                    for w in c.windows {
                        if let Some(v) = bt.get(batch_key(c.task, *w))? {
                            let b = BatchAggregation::decode(&v).map_err(abort)?;
                            count += b.report_count;
                            checksum.combine(&b.checksum);
                        }
                    }
                    if (count, checksum) != c.summed {
                        // No counts in the message: it can reach the collector.
                        return Err(abort(Error::Mismatch(
                            "the interval's reports changed while it was being collected; retry"
                                .into(),
                        )));
                    }
                    let mut seen = Vec::with_capacity(c.windows.len());
                    for w in c.windows {
                        let b = wb
                            .get(batch_key(c.task, *w))?
                            .and_then(|v| decode_batch(&v));
                        seen.push((*w, b));
                    }
                    let counts = decode_counts(bc.get(&counts_key)?.as_deref());
                    if let Some(refusal) = c.rule.check(&seen, counts) {
                        return Ok(Err(refusal));
                    }
                    let mut left = u64::MAX;
                    for w in c.windows {
                        let k = ledger_key(c.task, purpose, *w);
                        let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                        let remaining = c.budget_micros.saturating_sub(spent);
                        if remaining < c.epsilon_micros {
                            return Ok(Err(CollectRefusal::OverBudget {
                                window: *w,
                                left_micros: remaining,
                            }));
                        }
                        left = left.min(remaining - c.epsilon_micros);
                    }
                    for w in c.windows {
                        let k = ledger_key(c.task, purpose, *w);
                        let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                        ledger.insert(k, &(spent + c.epsilon_micros).to_be_bytes()[..])?;
                        let wk = batch_key(c.task, *w);
                        collected.insert(wk.clone(), &[][..])?;
                        released.insert(wk.clone(), &[][..])?;
                        wb.insert(wk, &batch_value[..])?;
                    }
                    let (routine, alert) = counts;
                    let (routine, alert) = if purpose == 0 {
                        (routine + 1, alert)
                    } else {
                        (routine, alert + 1)
                    };
                    let mut cv = routine.to_be_bytes().to_vec();
                    cv.extend_from_slice(&alert.to_be_bytes());
                    bc.insert(&counts_key[..], cv)?;
                    let mut v = c.request_hash.to_vec();
                    v.extend_from_slice(c.answer);
                    collections.insert(task_key(c.task, c.collection_id), v)?;
                    ends.insert(&end_key[..], &[][..])?;
                    Ok(Ok(left))
                },
            );
        tx_result(r)
    }

    /// Spends `epsilon_micros` of the routine budget of every window and stores the answer of a
    /// late-count release under `key`, in one transaction; or says which window is over budget.
    pub fn commit_late_count(
        &self,
        task: &TaskId,
        key: &[u8; 16],
        windows: &[Time],
        epsilon_micros: u64,
        budget_micros: u64,
        answer: &[u8],
    ) -> Result<std::result::Result<u64, CollectRefusal>> {
        let r = (&self.ledger, &self.collections).transaction(|(ledger, collections)| {
            let ck = task_key(task, key);
            if collections.get(&ck)?.is_some() {
                return Err(abort(Error::CollectionConflict(hex::encode(key))));
            }
            let mut left = u64::MAX;
            for w in windows {
                let k = ledger_key(task, 0, *w);
                let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                let remaining = budget_micros.saturating_sub(spent);
                if remaining < epsilon_micros {
                    return Ok(Err(CollectRefusal::OverBudget {
                        window: *w,
                        left_micros: remaining,
                    }));
                }
                left = left.min(remaining - epsilon_micros);
            }
            for w in windows {
                let k = ledger_key(task, 0, *w);
                let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                ledger.insert(k, &(spent + epsilon_micros).to_be_bytes()[..])?;
            }
            let mut v = [0u8; 32].to_vec();
            v.extend_from_slice(answer);
            collections.insert(ck, v)?;
            Ok(Ok(left))
        });
        tx_result(r)
    }

    /// Marks windows collected or open again (the leader closes them before the final count,
    /// so no late report slips in, and reopens them if the collection fails before anything is
    /// released).
    pub fn mark_collected(&self, task: &TaskId, windows: &[Time], collected: bool) -> Result<()> {
        let mut b = sled::Batch::default();
        for w in windows {
            if collected {
                b.insert(batch_key(task, *w), &[][..]);
            } else {
                b.remove(batch_key(task, *w));
            }
        }
        self.collected.apply_batch(b)?;
        Ok(())
    }

    /// Whether `window` of `task` was released (a share of it left this aggregator).
    pub fn is_released(&self, task: &TaskId, window: Time) -> Result<bool> {
        Ok(self.released.contains_key(batch_key(task, window))?)
    }

    // ---- maintenance

    /// Deletes helper job records committed before `cutoff`; returns how many. A leader that
    /// retries such an old job no longer gets the recorded answer.
    pub fn expire_helper_jobs(&self, cutoff: Time) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.helper_jobs.iter() {
            let (k, v) = kv?;
            if HelperJobRecord::decode(&v)?.committed < cutoff {
                batch.remove(k);
                n += 1;
            }
        }
        self.helper_jobs.apply_batch(batch)?;
        Ok(n)
    }

    /// Deletes the pending reports of `task` whose time is before `cutoff` and that are in no
    /// job in flight (they could never be accepted again, and the helper would refuse them),
    /// counting each as refused `TOO_OLD`; returns how many.
    pub fn expire_pending(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let in_jobs: std::collections::HashSet<u64> = self
            .jobs()?
            .into_iter()
            .filter(|(_, j)| j.task_id == *task)
            .flat_map(|(_, j)| j.seqs)
            .collect();
        let mut expired = Vec::new();
        for kv in self.pending.scan_prefix(task.as_bytes()) {
            let (k, v) = kv?;
            let seq = be_u64(&k[32..]);
            let r =
                PendingReport::from_bytes(&v).map_err(|e| Error::corrupt("pending report", e))?;
            if r.time < cutoff && !in_jobs.contains(&seq) {
                expired.push(k);
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        let mut delta = StatDelta::default();
        delta.add(
            *task.as_bytes(),
            Stat::Rejected(RejectReason::TooOld),
            expired.len() as u64,
        );
        let n = expired.len() as u64;
        tx_result((&self.pending, &self.stats).transaction(|(pending, st)| {
            for k in &expired {
                pending.remove(k)?;
            }
            delta.apply(st)?;
            Ok(())
        }))?;
        Ok(n)
    }

    /// Deletes the aggregate shares of `task`'s windows that start before `cutoff`; returns how
    /// many. The budget ledger and the collected marks of those windows stay (a few bytes each),
    /// so a deleted window can never be collected again on a fresh budget.
    pub fn expire_aggregates(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let range = batch_key(task, Time::from_secs(0))..batch_key(task, cutoff);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.batches.range(range).keys() {
            batch.remove(k?);
            n += 1;
        }
        self.batches.apply_batch(batch)?;
        Ok(n)
    }

    /// Deletes what `task` keeps per window for windows that start before `cutoff` (past its
    /// retention): the ledger of both purposes, the closed, released and batch marks, the batch
    /// collection counts (of batches starting before it) and the late counts; returns how many
    /// records went. Collections of intervals that start before the cutoff are refused anyway
    /// and ingest refuses reports that old, so nothing needs these any more.
    pub fn expire_window_marks(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let mut n = 0;
        let range = batch_key(task, Time::from_secs(0))..batch_key(task, cutoff);
        for tree in [
            &self.collected,
            &self.released,
            &self.window_batches,
            &self.late,
            &self.batch_collections,
        ] {
            let mut b = sled::Batch::default();
            for k in tree.range(range.clone()).keys() {
                b.remove(k?);
                n += 1;
            }
            tree.apply_batch(b)?;
        }
        let mut b = sled::Batch::default();
        for purpose in [0u8, 1] {
            let r =
                ledger_key(task, purpose, Time::from_secs(0))..ledger_key(task, purpose, cutoff);
            for k in self.ledger.range(r).keys() {
                b.remove(k?);
                n += 1;
            }
        }
        self.ledger.apply_batch(b)?;
        Ok(n)
    }

    /// Every tree of the database with its number of entries.
    pub fn tree_sizes(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = [
            ("tasks", &self.tasks),
            ("keys", &self.keys),
            ("seen", &self.seen),
            ("pending", &self.pending),
            ("jobs", &self.jobs),
            ("helper_jobs", &self.helper_jobs),
            ("batches", &self.batches),
            ("stats", &self.stats),
            ("tenants", &self.tenants),
            ("ledger", &self.ledger),
            ("collections", &self.collections),
            ("collected", &self.collected),
            ("released", &self.released),
            ("window_batches", &self.window_batches),
            ("batch_collections", &self.batch_collections),
            ("late", &self.late),
            ("collection_ends", &self.collection_ends),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.len()))
        .collect();
        out.push(("audit".to_owned(), self.audit.len()));
        out
    }

    /// Deletes the stored answers of `task`'s collections whose last window starts before
    /// `cutoff`; returns how many.
    pub fn expire_collections(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let range = batch_key(task, Time::from_secs(0))..batch_key(task, cutoff);
        let keys: Vec<sled::IVec> = self
            .collection_ends
            .range(range)
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let n = keys.len() as u64;
        tx_result::<_, Error>((&self.collections, &self.collection_ends).transaction(
            |(collections, ends)| {
                for k in &keys {
                    collections.remove(task_key(task, &k[40..]))?;
                    ends.remove(k)?;
                }
                Ok(())
            },
        ))?;
        Ok(n)
    }

    /// Number of anti-replay entries of `task`.
    pub fn seen_count(&self, task: &TaskId) -> u64 {
        self.seen.scan_prefix(task.as_bytes()).keys().count() as u64
    }

    /// Deletes anti-replay entries of `task` with a time before `cutoff`; returns how many.
    pub fn expire_seen(&self, task: &TaskId, cutoff: Time) -> Result<usize> {
        let start = task_key(task, &0u64.to_be_bytes());
        let end = task_key(task, &cutoff.as_secs().to_be_bytes());
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.seen.range(start..end).keys() {
            batch.remove(k?);
            n += 1;
        }
        self.seen.apply_batch(batch)?;
        Ok(n)
    }
}

fn merge_batches(
    bt: &TransactionalTree,
    batches: &[(Vec<u8>, &BatchAggregation)],
) -> std::result::Result<(), ConflictableTransactionError<Error>> {
    for (k, add) in batches {
        let mut cur = match bt.get(k)? {
            Some(v) => BatchAggregation::decode(&v).map_err(abort)?,
            None => BatchAggregation::empty(add.share.len()),
        };
        cur.merge(add).map_err(abort)?;
        bt.insert(&k[..], cur.encode())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
                        purpose: 0,
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
        assert_eq!(s.spent(&task, 0, &windows).unwrap(), [1, 1, 1]);
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
        purpose: u8,
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
        commit(&s, &t, 1, (w0, 60), 0, 0).unwrap();
        // [w0, w1] overlaps [w0]: refused, whatever the purpose; nothing written.
        assert_eq!(
            commit(&s, &t, 2, (w0, 120), 1, 0),
            Err(CollectRefusal::Overlaps {
                window: w0,
                batch: (w0, 60)
            })
        );
        assert_eq!(s.spent(&t, 1, &[w0, w1]).unwrap(), [0, 0]);
        // A second routine collection of [w0] is refused; alert drill-downs of it are not.
        assert!(matches!(
            commit(&s, &t, 3, (w0, 60), 0, 0),
            Err(CollectRefusal::Exhausted {
                routine: 1,
                alert: 0
            })
        ));
        commit(&s, &t, 4, (w0, 60), 1, 0).unwrap();
        commit(&s, &t, 5, (w0, 60), 1, 0).unwrap();
        assert_eq!(s.batch_collections(&t, (w0, 60)).unwrap(), (1, 2));
        // A disjoint batch is fine; with max 1 it is collected once in all.
        commit(&s, &t, 6, (w1, 120), 1, 1).unwrap();
        assert!(matches!(
            commit(&s, &t, 7, (w1, 120), 1, 1),
            Err(CollectRefusal::Exhausted {
                routine: 0,
                alert: 1
            })
        ));
        // [w2] alone now overlaps [w1, w2].
        assert!(matches!(
            commit(&s, &t, 8, (w2, 60), 0, 0),
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
        commit(&s, &task, 1, (w, 60), 0, 0).unwrap();
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
                purpose: 0,
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
}
