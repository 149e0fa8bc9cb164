//! The audit trail: an append-only, hash-chained log in the store of every collection and budget
//! spend, task, key and token change, refused collection request and unauthenticated request
//! (no client certificate, wrong token) — who, what, when and the outcome, never a share or a
//! measurement.
//!
//! Entry `n` is stored under its sequence number and carries the SHA-256 of entry `n − 1`
//! (`prev`) and its own (`hash`, over a domain string, `prev` and its fields). A head record
//! (sequence number and hash of the newest entry) is written in the same transaction. [`verify`]
//! walks the log: a changed entry breaks its own hash, a removed or reordered one breaks the
//! sequence or the chain, and a removed newest entry no longer matches the head. Someone who can
//! rewrite the whole database can rewrite the whole chain too; copy the head elsewhere (e.g.
//! `hush audit show` output) to anchor it.

use std::fmt;

use crate::error::{Error, Result};
use crate::store::backend::{Backend, Keys, SledTx, T, TxResult, Txn, run_now, to_sled};
use crate::store::pg::{Finish, PgTx, finish, pause};
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

const DOMAIN: &[u8] = b"hush audit v1";
const HEAD: &[u8] = b"head";

/// What happened, as the caller records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Who: `admin`, `collector:<tenant>`, `leader`, `unknown`.
    pub actor: String,
    /// What: `task.create`, `key.rotate`, `tenant.token`, `collect`, `aggregate_share`.
    pub action: String,
    /// The tenant concerned, if any.
    pub tenant: String,
    /// The task concerned (base64url id), if any.
    pub task: String,
    /// `ok`, `unchanged`, or `refused: <why>`.
    pub outcome: String,
    /// Details: interval, report count, ε spent, budget left, key ids. Never a share.
    pub detail: String,
}

/// One stored entry: an event with its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// When, seconds since the epoch (the aggregator's clock).
    pub time: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous entry (hex; zeros for the first).
    pub prev: String,
    /// Hash of this entry (hex).
    pub hash: String,
}

impl AuditEntry {
    fn digest(&self) -> String {
        let mut c = Context::new(&SHA256);
        c.update(DOMAIN);
        for field in [
            self.seq.to_string().as_str(),
            &self.time.to_string(),
            &self.event.actor,
            &self.event.action,
            &self.event.tenant,
            &self.event.task,
            &self.event.outcome,
            &self.event.detail,
            &self.prev,
        ] {
            // Length-prefixed, so fields cannot run into each other.
            c.update(&(field.len() as u64).to_be_bytes());
            c.update(field.as_bytes());
        }
        hex::encode(c.finish().as_ref())
    }
}

impl fmt::Display for AuditEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.event;
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        write!(
            f,
            "#{} t={} {} {} tenant={} task={} → {}",
            self.seq,
            self.time,
            e.actor,
            e.action,
            or_dash(&e.tenant),
            or_dash(&e.task),
            e.outcome
        )?;
        if !e.detail.is_empty() {
            write!(f, "; {}", e.detail)?;
        }
        Ok(())
    }
}

/// Records refusals in the audit trail at a bounded rate: at most [`RefusalAudit::PER_SECOND`]
/// entries a second; a flood is summarised by the count of refusals left out (in the next entry
/// that is written), so refused requests cannot fill the disk.
#[derive(Clone)]
pub struct RefusalAudit {
    limiter: std::sync::Arc<governor::DefaultDirectRateLimiter>,
    left_out: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for RefusalAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefusalAudit").finish_non_exhaustive()
    }
}

impl Default for RefusalAudit {
    fn default() -> Self {
        let quota = governor::Quota::per_second(
            std::num::NonZeroU32::new(Self::PER_SECOND).unwrap_or(std::num::NonZeroU32::MIN),
        );
        Self {
            limiter: std::sync::Arc::new(governor::RateLimiter::direct(quota)),
            left_out: Default::default(),
        }
    }
}

impl RefusalAudit {
    /// Most audit entries of refusals per second.
    pub const PER_SECOND: u32 = 10;

    /// Appends `e` to `trail` unless the rate is exceeded (then only counts it).
    pub fn record(&self, trail: &AuditTrail, mut e: AuditEvent) {
        use std::sync::atomic::Ordering;
        if self.limiter.check().is_err() {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(hush_server::metrics::names::AUDIT_NOT_RECORDED).increment(1);
            return;
        }
        let left_out = self.left_out.swap(0, Ordering::Relaxed);
        if left_out > 0 {
            if !e.detail.is_empty() {
                e.detail.push_str("; ");
            }
            e.detail.push_str(&format!(
                "{left_out} earlier refusals not recorded (rate limit)"
            ));
        }
        trail.record(e);
    }
}

/// Where a service appends: the audit log and the clock that stamps entries.
#[derive(Clone, Debug)]
pub struct AuditTrail {
    /// The log.
    pub log: AuditLog,
    /// The time source.
    pub clock: std::sync::Arc<dyn hush_protocol::Clock>,
}

impl AuditTrail {
    /// Appends `e` at the current time (logged, never fails the caller).
    pub fn record(&self, e: AuditEvent) {
        self.log.record(self.clock.now().as_secs(), e);
    }
}

/// Records the requests an interceptor refuses as unauthenticated (no client certificate, a
/// wrong or missing token) in the audit trail, then passes the refusal on, at a bounded rate
/// per service ([`RefusalAudit`]).
#[derive(Clone)]
pub struct AuditRefusals<I> {
    inner: I,
    trail: AuditTrail,
    service: &'static str,
    audit: RefusalAudit,
}

impl<I> fmt::Debug for AuditRefusals<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditRefusals")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl<I> AuditRefusals<I> {
    /// Most audit entries of refused requests per second and service.
    pub const PER_SECOND: u32 = RefusalAudit::PER_SECOND;

    /// Wraps `inner`, the authentication of `service` (e.g. "admin").
    pub fn new(inner: I, trail: AuditTrail, service: &'static str) -> Self {
        Self {
            inner,
            trail,
            service,
            audit: RefusalAudit::default(),
        }
    }
}

impl<I: tonic::service::Interceptor> tonic::service::Interceptor for AuditRefusals<I> {
    fn call(
        &mut self,
        req: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let remote = req.remote_addr();
        let refused = match self.inner.call(req) {
            Ok(r) => return Ok(r),
            Err(s) => s,
        };
        let detail = format!(
            "from {}",
            remote.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string())
        );
        self.audit.record(
            &self.trail,
            AuditEvent {
                actor: "unauthenticated".into(),
                action: format!("{}.call", self.service),
                tenant: String::new(),
                task: String::new(),
                outcome: format!("refused: {}", refused.message()),
                detail,
            },
        );
        Err(refused)
    }
}

/// Why the log does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq}: {what}")]
pub struct AuditBroken {
    /// The entry where the chain breaks.
    pub seq: u64,
    /// What is wrong there.
    pub what: String,
}

/// The log's tables in the store (`audit` and `audit_head`). Appends are serialized: one at a
/// time in a process, and by the database across replicas of one PostgreSQL database (each
/// append reads and rewrites the head in a serializable transaction, so two appends cannot both
/// take the same sequence number).
#[derive(Clone, Debug)]
pub struct AuditLog {
    backend: Backend,
    lock: std::sync::Arc<std::sync::Mutex<()>>,
}

fn head_value(seq: u64, hash: &str) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(hash.as_bytes());
    v
}

/// Appends `e` at `time` after the head, in transaction `tx`.
async fn append_tx<X: Txn>(tx: &mut X, time: u64, e: &AuditEvent) -> TxResult<AuditEntry> {
    let (seq, prev) = match tx.get(T::AuditHead, HEAD).await? {
        Some(v) if v.len() > 8 => (
            u64::from_be_bytes(v[..8].try_into().expect("8 bytes")) + 1,
            String::from_utf8_lossy(&v[8..]).into_owned(),
        ),
        Some(_) => return Err(Error::corrupt("audit head", "too short").into()),
        None => (0, "0".repeat(64)),
    };
    let mut entry = AuditEntry {
        seq,
        time,
        event: e.clone(),
        prev,
        hash: String::new(),
    };
    entry.hash = entry.digest();
    let bytes = serde_json::to_vec(&entry).map_err(|e| Error::corrupt("audit entry", e))?;
    tx.insert(T::Audit, &seq.to_be_bytes(), &bytes)?;
    tx.insert(T::AuditHead, HEAD, &head_value(seq, &entry.hash))?;
    Ok(entry)
}

impl AuditLog {
    /// The log in the store's database.
    pub(crate) fn new(backend: Backend) -> Self {
        Self {
            backend,
            lock: Default::default(),
        }
    }

    /// Entries in the log.
    pub async fn len(&self) -> Result<u64> {
        self.backend.count(T::Audit, Keys::All).await
    }

    /// Appends an entry at `time` (atomically with the head). On sled it is not flushed: the
    /// caller's next flush makes it durable with the change it records. On PostgreSQL it is
    /// committed when this returns. Blocks (a PostgreSQL append runs on a connection and thread
    /// of its own).
    pub fn append(&self, time: u64, e: AuditEvent) -> Result<AuditEntry> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match &self.backend {
            Backend::Sled(s) => {
                let tables = [T::Audit, T::AuditHead];
                let trees = [s.tree(T::Audit), s.tree(T::AuditHead)];
                let r = sled::Transactional::transaction(&trees[..], |views| {
                    let mut tx = SledTx::new(&tables, views, s, None);
                    run_now(append_tx(&mut tx, time, &e)).map_err(to_sled)
                });
                hush_server::db::tx_result(r)
            }
            Backend::Pg(p) => p.blocking(move |client| {
                Box::pin(async move {
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        let mut tx = PgTx::begin(client).await?;
                        let r = append_tx(&mut tx, time, &e).await;
                        match finish(tx, r, attempt).await {
                            Finish::Done(r) => break r,
                            Finish::Again => pause(attempt).await,
                        }
                    }
                })
            }),
        }
    }

    /// Appends, logging instead of failing: an audit write must not undo the change it records.
    pub fn record(&self, time: u64, e: AuditEvent) {
        use hush_server::metrics::names;
        match self.append(time, e) {
            Ok(_) => metrics::counter!(names::AUDIT_ENTRIES).increment(1),
            Err(err) => {
                metrics::counter!(names::AUDIT_FAILURES).increment(1);
                tracing::error!(error = %err, "writing the audit trail failed");
            }
        }
    }

    /// Every entry in stored order; an entry that does not parse is an error naming it.
    pub async fn entries(&self) -> Result<Vec<AuditEntry>> {
        self.backend
            .entries(T::Audit, Keys::All)
            .await?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v).map_err(|e| {
                    let seq = k
                        .as_slice()
                        .try_into()
                        .map(u64::from_be_bytes)
                        .unwrap_or(u64::MAX);
                    Error::corrupt("audit entry", format!("entry {seq} does not parse: {e}"))
                })
            })
            .collect()
    }

    /// Checks the whole chain while the service may go on appending: the head is read before
    /// and after the log, every stored entry must chain to the one before it, and the head
    /// must name the newest entry read (or one appended since); returns the number of entries
    /// checked.
    pub async fn verify(&self) -> std::result::Result<u64, AuditBroken> {
        let cannot = |what: &str, e: Error| AuditBroken {
            seq: 0,
            what: format!("{what} cannot be read: {e}"),
        };
        let head_before = self
            .backend
            .get(T::AuditHead, HEAD)
            .await
            .map_err(|e| cannot("the head", e))?;
        let log = self
            .backend
            .entries(T::Audit, Keys::All)
            .await
            .map_err(|e| cannot("the log", e))?;
        let head_after = self
            .backend
            .get(T::AuditHead, HEAD)
            .await
            .map_err(|e| cannot("the head", e))?;
        let mut prev = "0".repeat(64);
        let mut hashes = Vec::with_capacity(log.len());
        for (k, v) in log {
            let expected = hashes.len() as u64;
            let key_seq = k
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| AuditBroken {
                    seq: expected,
                    what: "its key is not a sequence number".into(),
                })?;
            let e: AuditEntry = serde_json::from_slice(&v).map_err(|err| AuditBroken {
                seq: key_seq,
                what: format!("does not parse: {err}"),
            })?;
            if key_seq != expected || e.seq != key_seq {
                return Err(AuditBroken {
                    seq: expected,
                    what: format!(
                        "missing or out of order: found entry {} (stored under {key_seq}) where \
                         {expected} belongs",
                        e.seq
                    ),
                });
            }
            if e.prev != prev {
                return Err(AuditBroken {
                    seq: e.seq,
                    what: "does not chain to the entry before it (removed or reordered)".into(),
                });
            }
            if e.digest() != e.hash {
                return Err(AuditBroken {
                    seq: e.seq,
                    what: "was changed after it was written (its hash does not match)".into(),
                });
            }
            prev = e.hash.clone();
            hashes.push(e.hash);
        }
        let n = hashes.len() as u64;
        let parse = |h: &[u8]| -> (u64, String) {
            let seq = h
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            (
                seq,
                String::from_utf8_lossy(h.get(8..).unwrap_or(&[])).into_owned(),
            )
        };
        // The head read before the log must name an entry the log holds, with its hash: a
        // removed newest entry, or a head rolled back, shows here.
        match &head_before {
            None if n == 0 => {}
            None => {
                // Entries but no head: unless the first entries were appended while the log was
                // read, the head was removed.
                if head_after.is_none() {
                    return Err(AuditBroken {
                        seq: n - 1,
                        what: "the head record is missing".into(),
                    });
                }
            }
            Some(h) => {
                let (seq, hash) = parse(h);
                if seq >= n {
                    return Err(AuditBroken {
                        seq,
                        what: format!(
                            "the head names entry {seq} but the log ends at entry {} (newest \
                             entries removed)",
                            n as i64 - 1
                        ),
                    });
                }
                if hashes[seq as usize] != hash {
                    return Err(AuditBroken {
                        seq,
                        what: "the head does not match the entry it names".into(),
                    });
                }
            }
        }
        // Entries past the head read after the log were not written by an append (an append
        // moves the head in the same transaction): the head was rolled back, and the next
        // append would overwrite them.
        if n > 0 {
            let after = head_after.as_deref().map(parse).map(|(s, _)| s);
            if after.is_none_or(|s| s < n - 1) {
                return Err(AuditBroken {
                    seq: after.map_or(0, |s| s + 1),
                    what: format!(
                        "the log holds entries up to {} past its head (the head was rolled back \
                         or removed)",
                        n - 1
                    ),
                });
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 4).unwrap();
        let a = store.audit().clone();
        for i in 0..5 {
            a.append(
                1_000 + i,
                AuditEvent {
                    actor: "admin".into(),
                    action: "task.create".into(),
                    tenant: "acme".into(),
                    task: format!("task-{i}"),
                    outcome: "ok".into(),
                    detail: String::new(),
                },
            )
            .unwrap();
        }
        (dir, a)
    }

    fn tree(a: &AuditLog) -> &sled::Tree {
        match &a.backend {
            Backend::Sled(s) => s.tree(T::Audit),
            Backend::Pg(_) => unreachable!("a sled log"),
        }
    }

    #[tokio::test]
    async fn an_untouched_log_verifies() {
        let (_d, a) = log();
        assert_eq!(a.verify().await, Ok(5));
        assert_eq!(a.entries().await.unwrap()[3].event.task, "task-3");
    }

    #[tokio::test]
    async fn a_changed_entry_is_named() {
        let (_d, a) = log();
        let k = 2u64.to_be_bytes();
        let v = tree(&a).get(k).unwrap().unwrap();
        let text = String::from_utf8(v.to_vec())
            .unwrap()
            .replace("task-2", "task-9");
        tree(&a).insert(k, text.as_bytes()).unwrap();
        let e = a.verify().await.unwrap_err();
        assert_eq!(e.seq, 2, "{e}");
        assert!(e.to_string().contains("changed"), "{e}");
    }

    #[tokio::test]
    async fn removed_and_reordered_entries_are_named() {
        let (_d, a) = log();
        tree(&a).remove(1u64.to_be_bytes()).unwrap();
        assert_eq!(a.verify().await.unwrap_err().seq, 1);

        let (_d, a) = log();
        let (x, y) = (
            tree(&a).get(1u64.to_be_bytes()).unwrap().unwrap(),
            tree(&a).get(3u64.to_be_bytes()).unwrap().unwrap(),
        );
        tree(&a).insert(1u64.to_be_bytes(), y).unwrap();
        tree(&a).insert(3u64.to_be_bytes(), x).unwrap();
        assert_eq!(a.verify().await.unwrap_err().seq, 1);

        let (_d, a) = log();
        tree(&a).remove(4u64.to_be_bytes()).unwrap();
        let e = a.verify().await.unwrap_err();
        assert_eq!(e.seq, 4, "{e}");
        assert!(e.to_string().contains("newest entries removed"), "{e}");
    }

    #[tokio::test]
    async fn a_removed_or_rolled_back_head_is_named() {
        let head_tree = |a: &AuditLog| match &a.backend {
            Backend::Sled(s) => s.tree(T::AuditHead).clone(),
            Backend::Pg(_) => unreachable!("a sled log"),
        };
        let (_d, a) = log();
        head_tree(&a).remove(HEAD).unwrap();
        let e = a.verify().await.unwrap_err();
        assert!(e.to_string().contains("head"), "{e}");

        // The head put back two entries: the entries after it would be overwritten.
        let (_d, a) = log();
        let third = a.entries().await.unwrap()[2].clone();
        head_tree(&a)
            .insert(HEAD, head_value(2, &third.hash))
            .unwrap();
        let e = a.verify().await.unwrap_err();
        assert!(e.to_string().contains("past its head"), "{e}");

        // A head naming the right entry with another hash.
        let (_d, a) = log();
        head_tree(&a)
            .insert(HEAD, head_value(4, &"0".repeat(64)))
            .unwrap();
        let e = a.verify().await.unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
