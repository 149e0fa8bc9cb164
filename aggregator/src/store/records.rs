//! The records the store keeps and their encodings: counters, keys of every tree, pending
//! reports, jobs, aggregates, and the batch rules of collection.

use std::collections::{BTreeMap, HashMap};

use super::backend::{T, TxResult, Txn};
use crate::error::{Error, Result};
use hush_protocol::BudgetPurpose;
use hush_protocol::codec::{Codec, Reader, Writer};
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{AggregateShare, HpkeCiphertext, ReportId, ReportIdChecksum, TaskId, Time};

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
    pub(super) fn code(self) -> u8 {
        match self {
            Stat::Accepted => 200,
            Stat::Aggregated => 201,
            Stat::Rejected(r) => r as i32 as u8,
        }
    }

    pub(super) fn from_code(c: u8) -> Option<Self> {
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

    /// Adds the increments to the stored counters, in transaction `tx`.
    pub(super) async fn apply<X: Txn>(&self, tx: &mut X) -> TxResult<()> {
        let entries: Vec<([u8; 33], u64)> = self
            .0
            .iter()
            .map(|((scope, stat), n)| (stat_key(scope, *stat), *n))
            .collect();
        let keys: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.to_vec()).collect();
        let current = tx.get_many(T::Stats, &keys).await?;
        for ((key, n), cur) in entries.iter().zip(current) {
            let cur = cur.map(|v| be_u64(&v)).unwrap_or(0);
            tx.insert(T::Stats, key, &(cur + n).to_be_bytes())?;
        }
        Ok(())
    }
}

pub(super) fn stat_key(scope: &[u8; 32], stat: Stat) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[..32].copy_from_slice(scope);
    k[32] = stat.code();
    k
}

pub(super) fn be_u64(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[8 - n..].copy_from_slice(&v[..n]);
    u64::from_be_bytes(b)
}

pub(super) fn task_key(task: &TaskId, suffix: &[u8]) -> Vec<u8> {
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

pub(super) fn pending_key(task: &TaskId, seq: u64) -> Vec<u8> {
    task_key(task, &seq.to_be_bytes())
}

pub(super) fn batch_key(task: &TaskId, window: Time) -> Vec<u8> {
    task_key(task, &window.as_secs().to_be_bytes())
}

/// Scope, anti-replay key and window key of one report to store.
pub(super) type EncodedPending = ([u8; 32], Vec<u8>, Vec<u8>);

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

/// The pending reports of one task from one ingest request, kept as one record: a report then
/// costs the store one anti-replay write, not a write, a read and a delete of its own. A record
/// holds at most the leader's job size, so a job takes whole records. A record written before
/// this format is a bare [`PendingReport`] (version 1) and reads as a record of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRecord(pub Vec<PendingReport>);

impl PendingRecord {
    /// How many reports an encoded record holds, read from its header alone (a record that is
    /// not version 2 holds one; decoding checks the rest).
    pub fn count_encoded(v: &[u8]) -> u64 {
        match v {
            [2 | FileRecord::VERSION, a, b, c, d, ..] => {
                u64::from(u32::from_be_bytes([*a, *b, *c, *d]))
            }
            _ => 1,
        }
    }

    /// The encoding of a record of `reports` (at least one), without copying them first.
    pub(super) fn encode_refs(reports: &[&PendingReport]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(reports, &mut out);
        out
    }

    /// Decodes a stored record, naming it in the error.
    pub(super) fn decode_stored(v: &[u8]) -> Result<Self> {
        Self::from_bytes(v).map_err(|e| Error::corrupt("pending record", e))
    }
}

impl Codec for PendingRecord {
    const NAME: &'static str = "PendingRecord";
    fn encode(&self, out: &mut Vec<u8>) {
        encode_record(&self.0.iter().collect::<Vec<_>>(), out);
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, hush_protocol::DecodeError> {
        match r.clone().u8("version")? {
            1 => Ok(Self(vec![PendingReport::decode(r)?])),
            2 => {
                r.u8("version")?;
                let n = r.u32("reports")? as usize;
                // A report takes well over 32 bytes: a count beyond that is corrupt, not a
                // reason to allocate.
                if n == 0 || n > r.remaining() / 32 {
                    return Err(r.invalid("reports", "count does not fit the record"));
                }
                (0..n)
                    .map(|_| PendingReport::decode(r))
                    .collect::<std::result::Result<_, _>>()
                    .map(Self)
            }
            _ => Err(r.invalid("version", "unknown")),
        }
    }
}

/// A pending record whose reports are in a pending file ([`super::files`]), as sled keeps it:
/// version 3 ‖ reports (u32) ‖ file (u64) ‖ base offset (u64) ‖ span (u32) ‖ per report, its
/// offset from the base (u32) and its length (u32). The reports are encoded [`PendingReport`]s
/// within `span` bytes from `base` (one ingest request's write). Only sled writes these, and
/// reading a record through the store turns it into the bytes of a version-2 record. Only a
/// transaction's reads, a scan's `pick` and [`super::backend::Backend::pending_records`]'s
/// stored values see this format: they may count it ([`PendingRecord::count_encoded`]) or
/// compare it, not decode it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct FileRecord {
    /// The file's number.
    pub(super) file: u64,
    /// Where the request's reports start in the file.
    pub(super) base: u64,
    /// How many bytes from `base` hold them.
    pub(super) span: u32,
    /// Each report's offset from `base` and length.
    pub(super) reports: Vec<(u32, u32)>,
}

impl FileRecord {
    /// The version byte of this format.
    pub(super) const VERSION: u8 = 3;

    /// Whether a stored pending value is in this format.
    pub(super) fn is(v: &[u8]) -> bool {
        v.first() == Some(&Self::VERSION)
    }

    /// The encoding of the record of the reports at `reports` (offset from `base`, length;
    /// at least one) of `file`.
    pub(super) fn encode(file: u64, base: u64, span: u32, reports: &[(u32, u32)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + 8 * reports.len());
        out.put_u8(Self::VERSION);
        out.put_u32(reports.len() as u32);
        out.put_u64(file);
        out.put_u64(base);
        out.put_u32(span);
        for (at, len) in reports {
            out.put_u32(*at);
            out.put_u32(*len);
        }
        out
    }

    /// The file a stored record points into, from its header alone.
    pub(super) fn file_of(v: &[u8]) -> Result<u64> {
        match v.get(5..13) {
            Some(f) if Self::is(v) => Ok(u64::from_be_bytes(f.try_into().expect("8 bytes"))),
            _ => Err(Error::corrupt(
                "pending record",
                "too short to name its pending file",
            )),
        }
    }

    /// Decodes a stored record, naming it in the error.
    pub(super) fn decode_stored(v: &[u8]) -> Result<Self> {
        let mut r = Reader::new("FileRecord", v);
        let parsed = (|| {
            if r.u8("version")? != Self::VERSION {
                return Err(r.invalid("version", "not a record in a pending file"));
            }
            let n = r.u32("reports")? as usize;
            let (file, base, span) = (r.u64("file")?, r.u64("base")?, r.u32("span")?);
            if n == 0 || r.remaining() != 8 * n {
                return Err(r.invalid("reports", "count does not fit the record"));
            }
            let mut reports = Vec::with_capacity(n);
            // In order and apart, so the record's bytes are at most its span.
            let mut end = 0u64;
            for _ in 0..n {
                let (at, len) = (r.u32("offset")?, r.u32("length")?);
                if u64::from(at) < end {
                    return Err(r.invalid("offset", "overlaps the report before it"));
                }
                end = u64::from(at) + u64::from(len);
                if end > u64::from(span) {
                    return Err(r.invalid("offset", "past the record's span"));
                }
                reports.push((at, len));
            }
            Ok(Self {
                file,
                base,
                span,
                reports,
            })
        })();
        parsed.map_err(|e| Error::corrupt("pending record", e))
    }

    /// The version-2 record of these reports, given the `span` bytes read from `base`.
    pub(super) fn to_record_bytes(&self, span: &[u8]) -> Vec<u8> {
        let body: usize = self.reports.iter().map(|(_, len)| *len as usize).sum();
        let mut out = Vec::with_capacity(5 + body);
        out.put_u8(2);
        out.put_u32(self.reports.len() as u32);
        for (at, len) in &self.reports {
            out.extend_from_slice(&span[*at as usize..(*at + *len) as usize]);
        }
        out
    }
}

fn encode_record(reports: &[&PendingReport], out: &mut Vec<u8>) {
    out.put_u8(2);
    out.put_u32(reports.len() as u32);
    for r in reports {
        r.encode(out);
    }
}

/// A leader's aggregation job in flight: which pending records it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderJob {
    /// The task.
    pub task_id: TaskId,
    /// Sequence numbers of the job's pending records, ascending.
    pub seqs: Vec<u64>,
    /// How many reports those records hold.
    pub reports: u64,
    /// When the job was first created (`None` for jobs recorded before this was stored).
    pub created: Option<Time>,
}

impl Codec for LeaderJob {
    const NAME: &'static str = "LeaderJob";
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(3);
        self.task_id.encode(out);
        out.put_u64(self.created.map_or(0, Time::as_secs));
        out.put_u64(self.reports);
        out.put_u32(self.seqs.len() as u32);
        for s in &self.seqs {
            out.put_u64(*s);
        }
    }
    fn decode(r: &mut Reader<'_>) -> std::result::Result<Self, hush_protocol::DecodeError> {
        let version = r.u8("version")?;
        if !(1..=3).contains(&version) {
            return Err(r.invalid("version", "unknown"));
        }
        let task_id = TaskId::decode(r)?;
        let created = if version >= 2 {
            Some(r.u64("created")?)
                .filter(|t| *t != 0)
                .map(Time::from_secs)
        } else {
            None
        };
        let reports = (version >= 3).then(|| r.u64("reports")).transpose()?;
        let n = r.u32("seqs")? as usize;
        if n > r.remaining() / 8 {
            return Err(r.invalid("seqs", "count exceeds the record"));
        }
        let seqs: Vec<u64> = (0..n)
            .map(|_| r.u64("seq"))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            task_id,
            // Jobs before version 3 held one report per seq.
            reports: reports.unwrap_or(seqs.len() as u64),
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

    pub(super) fn encode(&self) -> Vec<u8> {
        let share = self.share.to_bytes();
        let mut out = Vec::with_capacity(1 + 8 + 32 + 4 + share.len());
        out.put_u8(1);
        out.put_u64(self.report_count);
        out.extend_from_slice(self.checksum.as_bytes());
        out.put_u32(self.share.len() as u32);
        out.extend_from_slice(&share);
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
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
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(41 + self.response.len());
        out.put_u8(1);
        out.put_u64(self.committed.as_secs());
        out.extend_from_slice(&self.request_hash);
        out.extend_from_slice(&self.response);
        out
    }

    /// When the encoded record in `bytes` was committed, without copying its response.
    pub(super) fn committed_of(bytes: &[u8]) -> Result<Time> {
        if bytes.len() < 41 || bytes[0] != 1 {
            return Err(Error::corrupt("helper job", "bad header"));
        }
        Ok(Time::from_secs(be_u64(&bytes[1..9])))
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
        let committed = Self::committed_of(bytes)?;
        let mut h = [0u8; 32];
        h.copy_from_slice(&bytes[9..41]);
        Ok(Self {
            committed,
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
    /// This collection id was committed before with the same request (by this process or a
    /// replica that got the same request): its stored answer stands, nothing more is spent.
    Repeated,
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
    pub purpose: BudgetPurpose,
    /// The task's `max_collections_per_batch` (0: one routine plus what the alert budget allows).
    pub max_collections: u32,
}

impl BatchRule {
    pub(super) fn counts_key(&self, task: &TaskId) -> Vec<u8> {
        let mut k = task_key(task, &self.batch.0.as_secs().to_be_bytes());
        k.extend_from_slice(&self.batch.1.to_be_bytes());
        k
    }

    pub(super) fn batch_value(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.batch.0.as_secs().to_be_bytes());
        v[8..].copy_from_slice(&self.batch.1.to_be_bytes());
        v
    }

    /// Checks the rule given how each window was collected before and the batch's counts.
    pub(super) fn check(
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
        let exhausted = (self.purpose == BudgetPurpose::Routine && routine >= 1)
            || (self.max_collections > 0 && routine + alert >= self.max_collections);
        exhausted.then_some(CollectRefusal::Exhausted { routine, alert })
    }
}

/// A batch: its start and duration in seconds.
pub type Batch = (Time, u64);

/// Each window with the batch it was collected in, if any.
pub(super) type WindowBatches = Vec<(Time, Option<Batch>)>;

pub(super) fn decode_batch(v: &[u8]) -> Option<(Time, u64)> {
    (v.len() == 16).then(|| (Time::from_secs(be_u64(&v[..8])), be_u64(&v[8..])))
}

pub(super) fn decode_counts(v: Option<&[u8]>) -> (u32, u32) {
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

pub(super) fn ledger_key(task: &TaskId, purpose: BudgetPurpose, window: Time) -> Vec<u8> {
    let mut k = task_key(task, &[purpose.code()]);
    k.extend_from_slice(&window.as_secs().to_be_bytes());
    k
}

/// Adds `batches` to the stored batch aggregations, in transaction `tx`.
pub(super) async fn merge_batches<X: Txn>(
    tx: &mut X,
    batches: &[(Vec<u8>, &BatchAggregation)],
) -> TxResult<()> {
    let keys: Vec<Vec<u8>> = batches.iter().map(|(k, _)| k.clone()).collect();
    let current = tx.get_many(T::Batches, &keys).await?;
    for ((k, add), cur) in batches.iter().zip(current) {
        let mut cur = match cur {
            Some(v) => BatchAggregation::decode(&v)?,
            None => BatchAggregation::empty(add.share.len()),
        };
        cur.merge(add)?;
        tx.insert(T::Batches, k, &cur.encode())?;
    }
    Ok(())
}
