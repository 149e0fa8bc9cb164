//! Batching and forwarding.
//!
//! Packets collect per *lane*: one next hop and one task. A lane's *open batch* closes when it
//! holds `batch_size` packets, or when its oldest packet has waited `max_wait_ms` and it holds at
//! least `min_batch_size`; a batch below `min_batch_size` never leaves by timeout. So every batch
//! that leaves a shuffler holds packets of one task only, at least `min_batch_size` of them: the
//! anonymity set of a packet is `min_batch_size` packets *of its own task*, never one packet of a
//! rare task hidden among many of a busy one (which the next hop, seeing task ids, could pick
//! out). A rare task's packets wait until enough of them arrived; a busy task's lane is not
//! slowed by it. A closed batch is shuffled with ChaCha20 seeded from the OS and sent to the next
//! hop in slices of the shuffled order; each slice is deleted only after the next hop
//! acknowledges it. Batches are numbered per lane; the number of a lane's newest closed batch is
//! stored, so a restart forwards batches that had closed and keeps collecting the open ones.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hush_protocol::TaskId;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::leader_ingest_client::LeaderIngestClient;
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::retry::{Failure, RetryPolicy, what_to_fix};
use hush_server::quota::TenantHoldings;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::config::{ForwardConfig, HopKind, MixConfig, NextHopConfig};
use crate::error::{Error, Result};
use crate::store::{Incoming, StatDelta, Store, StoredPacket};
use crate::tasks::Tasks;

/// Largest gRPC message a shuffler sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A peeled packet waiting for its buffer key.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// The next hop's name.
    pub hop: String,
    /// Key epoch ‖ replay tag.
    pub tag_key: [u8; 40],
    /// Its task.
    pub task: TaskId,
    /// What goes to the next hop.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct LaneState {
    /// Batches `open_lo..=open_hi` form the open batch; new packets get `open_hi`.
    open_lo: u64,
    open_hi: u64,
    open_count: u64,
    oldest: Option<Instant>,
    /// Closed batches waiting to be forwarded, oldest first.
    closed: VecDeque<(u64, u64)>,
    /// Packets of admissions under way, per batch they are being written to. A closed batch
    /// with any is not forwarded until they are stored: its read would miss them, and its
    /// delete would lose them. (Expiry waits for admissions to finish instead.)
    writing: HashMap<u64, u64>,
}

impl LaneState {
    fn empty() -> Self {
        Self {
            open_lo: 0,
            open_hi: 0,
            open_count: 0,
            oldest: None,
            closed: VecDeque::new(),
            writing: HashMap::new(),
        }
    }

    /// Whether an admission is writing to one of batches `lo..=hi`.
    fn writing_to(&self, lo: u64, hi: u64) -> bool {
        self.writing.keys().any(|b| (lo..=hi).contains(b))
    }
}

#[derive(Debug)]
struct HopState {
    lanes: HashMap<TaskId, LaneState>,
    wake: Arc<Notify>,
}

/// Ends an admission's writes, none stored, if the admission unwinds.
struct EndOnUnwind<'a>(&'a Mixer, &'a [Incoming]);

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        self.0.end(self.1, None);
    }
}

/// A batch ready to forward: its task and its batch numbers `lo..=hi`.
type Ready = (TaskId, u64, u64);

/// The batch state of every next hop and task.
///
/// Two locks: `admitting` serializes admissions (the store's replay check relies on it) and is
/// held while packets are written and synced, and while an expired batch is deleted (so
/// admissions wait for that); `hops` guards the batch state and is only held for bookkeeping
/// (in-memory sled inserts at most), never across a file write or sync, because the forwarders
/// take it on the async runtime.
#[derive(Debug)]
pub struct Mixer {
    mix: MixConfig,
    admitting: Mutex<()>,
    hops: Mutex<HashMap<String, HopState>>,
    buffered: AtomicU64,
}

fn closed_key(hop: &str, task: &TaskId) -> Vec<u8> {
    [b"closed:".as_slice(), task.as_bytes(), hop.as_bytes()].concat()
}

impl Mixer {
    /// Rebuilds the batch state from what the store holds.
    pub fn recover(mix: MixConfig, hops: &[NextHopConfig], store: &Store) -> Result<Self> {
        let orphans = store.remove_orphan_files()?;
        if orphans > 0 {
            tracing::info!(
                files = orphans,
                "deleted packet files of requests a crash cut short (never acknowledged) or of forwarded batches"
            );
        }
        let migrated = store.migrate_buffer_keys()?;
        if migrated > 0 {
            tracing::info!(
                packets = migrated,
                "moved buffered packets into per-task lanes"
            );
        }
        let migrated = store.migrate_buffer_to_files()?;
        if migrated > 0 {
            tracing::info!(
                packets = migrated,
                "moved buffered packets from sled into packet files"
            );
        }
        let buffered = store.buffered()?;
        let mut state: HashMap<String, HopState> = hops
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    HopState {
                        lanes: HashMap::new(),
                        wake: Arc::new(Notify::new()),
                    },
                )
            })
            .collect();
        let mut total = 0;
        for ((hop, task), b) in &buffered {
            total += b.count;
            let Some(h) = state.get_mut(hop) else {
                tracing::warn!(%hop, packets = b.count, "packets buffered for a hop that is no longer configured; add it back to forward them");
                continue;
            };
            let closed_through = store.meta_u64(&closed_key(hop, task))?;
            let mut s = LaneState::empty();
            if let Some((lo, hi)) = b.batches {
                match closed_through {
                    Some(c) if c >= hi => {
                        s.closed.push_back((lo, hi));
                        s.open_lo = hi + 1;
                        s.open_hi = hi + 1;
                    }
                    Some(c) if c >= lo => {
                        s.closed.push_back((lo, c));
                        s.open_lo = c + 1;
                        s.open_hi = hi;
                        s.open_count = store.unsent(hop, task, c + 1, hi)?;
                    }
                    _ => {
                        s.open_lo = lo;
                        s.open_hi = hi;
                        s.open_count = b.count;
                    }
                }
                if s.open_count > 0 {
                    s.oldest = Some(Instant::now());
                }
            }
            tracing::info!(%hop, %task, packets = b.count, closed = s.closed.len(), "recovered buffered packets");
            h.lanes.insert(*task, s);
        }
        // Lanes with nothing buffered restart after their newest closed batch.
        for (hop, h) in state.iter_mut() {
            for (task, c) in store.closed_marks(hop)? {
                h.lanes.entry(task).or_insert_with(|| {
                    let mut s = LaneState::empty();
                    s.open_lo = c + 1;
                    s.open_hi = c + 1;
                    s
                });
            }
        }
        Ok(Self {
            mix,
            admitting: Mutex::new(()),
            hops: Mutex::new(state),
            buffered: AtomicU64::new(total),
        })
    }

    /// Packets held and not yet acknowledged by a next hop.
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }

    /// Packets held in open batches (not yet released) per task, for every hop together.
    pub fn open_per_task(&self) -> HashMap<TaskId, u64> {
        let hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: HashMap<TaskId, u64> = HashMap::new();
        for h in hops.values() {
            for (t, l) in &h.lanes {
                *out.entry(*t).or_default() += l.open_count;
            }
        }
        out
    }

    /// Stores admitted packets in their lanes' open batches, one admission at a time. Returns,
    /// in order, whether each was stored (false: replay).
    ///
    /// The batch state is not locked while the packets are written and synced: each packet is
    /// counted as being written to its batch, and a batch that closes meanwhile is forwarded
    /// only once they are stored (see [`LaneState::writing`]).
    pub fn admit(
        &self,
        store: &Store,
        items: Vec<Admitted>,
        stats: &StatDelta,
    ) -> Result<Vec<bool>> {
        let _one_at_a_time = self.admitting.lock().unwrap_or_else(|p| p.into_inner());
        let incoming = self.begin(items)?;
        // If the store panics, the writes still end: a batch counted as written to forever
        // would never leave, and its lane with it.
        let unwinding = EndOnUnwind(self, &incoming);
        let stored = store.accept(&incoming, stats);
        std::mem::forget(unwinding);
        self.end(&incoming, stored.as_deref().ok());
        stored
    }

    /// Gives each packet its lane's open batch and counts it as being written there.
    fn begin(&self, items: Vec<Admitted>) -> Result<Vec<Incoming>> {
        let mut hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = items.iter().find(|a| !hops.contains_key(&a.hop)) {
            return Err(Error::InvalidRequest(format!(
                "next hop {:?} is not configured",
                a.hop
            )));
        }
        let mut incoming = Vec::with_capacity(items.len());
        for a in items {
            let lane = hops
                .get_mut(&a.hop)
                .expect("checked above")
                .lanes
                .entry(a.task)
                .or_insert_with(LaneState::empty);
            let batch = lane.open_hi;
            *lane.writing.entry(batch).or_default() += 1;
            incoming.push(Incoming {
                tag_key: a.tag_key,
                hop: a.hop,
                task: a.task,
                batch,
                payload: a.payload,
            });
        }
        Ok(incoming)
    }

    /// Ends the writes [`Mixer::begin`] counted: `stored` says which packets were stored
    /// (`None`: the admission failed, none counts). A stored packet whose batch is still open
    /// counts toward it; one whose batch closed meanwhile leaves with that batch. Wakes the
    /// forwarders of the hops written to.
    fn end(&self, incoming: &[Incoming], stored: Option<&[bool]>) {
        let mut hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut n = 0;
        for (k, i) in incoming.iter().enumerate() {
            let lane = hops
                .get_mut(&i.hop)
                .and_then(|h| h.lanes.get_mut(&i.task))
                .expect("lane made by begin");
            if let Some(w) = lane.writing.get_mut(&i.batch) {
                *w -= 1;
                if *w == 0 {
                    lane.writing.remove(&i.batch);
                }
            }
            if stored.is_some_and(|s| s[k]) {
                if i.batch == lane.open_hi {
                    lane.open_count += 1;
                    lane.oldest.get_or_insert(now);
                }
                n += 1;
            }
        }
        self.buffered.fetch_add(n, Ordering::Relaxed);
        for i in incoming {
            hops[&i.hop].wake.notify_one();
        }
    }

    fn wake(&self, hop: &str) -> Arc<Notify> {
        self.hops.lock().unwrap_or_else(|p| p.into_inner())[hop]
            .wake
            .clone()
    }

    /// The next batch of `hop` to forward (of any task), closing a lane's open batch if it is
    /// ready; or when to look again.
    fn ready(
        &self,
        store: &Store,
        hop: &str,
    ) -> Result<std::result::Result<Ready, Option<Instant>>> {
        let mut hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
        let h = hops.get_mut(hop).expect("hop is configured");
        for (task, s) in &h.lanes {
            // A batch still being written to waits: the admission wakes us when it is done.
            if let Some(&(lo, hi)) = s.closed.front()
                && !s.writing_to(lo, hi)
            {
                return Ok(Ok((*task, lo, hi)));
            }
        }
        let max_wait = Duration::from_millis(self.mix.max_wait_ms);
        let mut next: Option<Instant> = None;
        for (task, s) in h.lanes.iter_mut() {
            let full = s.open_count >= self.mix.batch_size;
            let waited = s.oldest.is_some_and(|t| t.elapsed() >= max_wait);
            if full || (waited && s.open_count >= self.mix.min_batch_size) {
                let b = (s.open_lo, s.open_hi);
                store.set_meta_u64(&closed_key(hop, task), s.open_hi)?;
                s.closed.push_back(b);
                s.open_lo = s.open_hi + 1;
                s.open_hi += 1;
                s.open_count = 0;
                s.oldest = None;
                // Batches leave in order (`finished` takes the front), and not while written to.
                if s.closed.len() == 1 && !s.writing_to(b.0, b.1) {
                    return Ok(Ok((*task, b.0, b.1)));
                }
                continue;
            }
            // Not ready: look again at its deadline if it has enough packets; otherwise only
            // more packets of its task can make it ready (a new packet wakes us).
            if let Some(t) = s.oldest
                && s.open_count >= self.mix.min_batch_size
            {
                let d = t + max_wait;
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        Ok(Err(next))
    }

    /// Deletes the open batch of every lane that stayed below `min_batch_size` for longer than
    /// its task's report expiry (the leader would refuse its reports as too old anyway), counts
    /// its packets as refused `TOO_OLD` and gives their tenant's holdings back. Such a batch is
    /// never released: it would leave with fewer than `min_batch_size` packets of its task.
    /// Returns how many packets went.
    ///
    /// Admissions wait meanwhile (the admission lock), so no packet joins a batch while it
    /// goes, and a batch under `min_batch_size` cannot close; the batch state is locked only to
    /// pick the batches and to move their lanes on, not while their files are deleted.
    pub fn expire_stale(
        &self,
        store: &Store,
        tasks: &Tasks,
        holdings: &TenantHoldings,
    ) -> Result<u64> {
        let _no_admissions = self.admitting.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<(String, TaskId, u64, u64)> = {
            let hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
            let mut stale = Vec::new();
            for (hop, h) in hops.iter() {
                for (task, l) in &h.lanes {
                    let Some(oldest) = l.oldest else { continue };
                    let expiry = Duration::from_secs(
                        tasks
                            .get(task)
                            .map_or(hush_protocol::task::defaults::report_expiry_s(), |t| {
                                t.report_expiry_s()
                            }),
                    );
                    if l.open_count > 0
                        && l.open_count < self.mix.min_batch_size
                        && oldest.elapsed() >= expiry
                    {
                        stale.push((hop.clone(), *task, l.open_lo, l.open_hi));
                    }
                }
            }
            stale
        };
        let mut total = 0;
        for (hop, task, lo, hi) in stale {
            let n = store.remove_batches(&hop, &task, lo, hi)?;
            {
                let mut hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
                let l = hops
                    .get_mut(&hop)
                    .and_then(|h| h.lanes.get_mut(&task))
                    .expect("lanes are never removed");
                // Unchanged since it was picked: no admission ran, and a batch under
                // `min_batch_size` (itself at most `batch_size`) does not close.
                debug_assert_eq!((l.open_lo, l.open_hi), (lo, hi));
                l.open_lo = hi + 1;
                l.open_hi = hi + 1;
                l.open_count = 0;
                l.oldest = None;
            }
            self.forwarded(n);
            if let Some(t) = tasks.tenant(&task) {
                holdings.release(&t, n);
            }
            tracing::warn!(%hop, %task, packets = n, "dropped a batch that stayed under min_batch_size past the task's report expiry");
            total += n;
        }
        Ok(total)
    }

    fn finished(&self, hop: &str, task: &TaskId) {
        let mut hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = hops.get_mut(hop).and_then(|h| h.lanes.get_mut(task)) {
            l.closed.pop_front();
        }
    }

    /// Counts `n` packets as gone (forwarded or dropped). Saturating: packets an admission
    /// stored before it failed (its counters could not be written) are not counted in, and must
    /// not wrap the count when they leave.
    fn forwarded(&self, n: u64) {
        let _ = self
            .buffered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }
}

/// A gRPC client of one next hop.
#[derive(Clone, Debug)]
pub enum HopClient {
    /// The next shuffler: gets onion packets.
    Shuffler(ShufflerClient<Channel>),
    /// The leader: gets reports.
    Leader(LeaderIngestClient<Channel>),
}

impl HopClient {
    /// A lazily connected client of `h`, presenting this node's certificate when `tls` is set.
    pub fn new(
        h: &NextHopConfig,
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self> {
        let channel = hush_protocol::link::endpoint(&h.url, tls, &format!("next hop {:?}", h.name))
            .map_err(|e| Error::config(e.to_string()))?
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(match h.kind {
            HopKind::Shuffler => HopClient::Shuffler(
                ShufflerClient::new(channel)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            ),
            HopKind::Leader => HopClient::Leader(
                LeaderIngestClient::new(channel)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            ),
        })
    }

    /// Sends one slice; returns (accepted, refused) as the next hop counted them.
    async fn send(
        &mut self,
        task: &TaskId,
        packets: &[StoredPacket],
    ) -> std::result::Result<(u64, u64), tonic::Status> {
        let (accepted, rejected) = match self {
            HopClient::Shuffler(c) => {
                let req = pb::SubmitPacketsRequest {
                    packets: packets
                        .iter()
                        .map(|p| pb::Packet {
                            task_id: task.as_bytes().to_vec().into(),
                            data: p.payload.clone(),
                        })
                        .collect(),
                };
                let r = c.submit_packets(req).await?.into_inner();
                (r.accepted, r.rejected)
            }
            HopClient::Leader(c) => {
                let req = pb::SubmitReportsRequest {
                    reports: packets.iter().map(|p| p.payload.clone()).collect(),
                };
                let r = c.submit_reports(req).await?.into_inner();
                (r.accepted, r.rejected)
            }
        };
        Ok((accepted, rejected.iter().map(|r| r.count).sum()))
    }
}

/// Forwards the batches of one next hop until shutdown.
pub async fn forwarder(
    store: Store,
    mixer: Arc<Mixer>,
    hop: NextHopConfig,
    mut client: HopClient,
    holdings: (Tasks, Arc<TenantHoldings>),
    fwd: ForwardConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake = mixer.wake(&hop.name);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let ready = match mixer.ready(&store, &hop.name) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(hop = %hop.name, error = %e, "batch bookkeeping failed");
                Err(Some(Instant::now() + Duration::from_secs(1)))
            }
        };
        match ready {
            Ok((task, lo, hi)) => {
                match forward_batch(
                    &store,
                    &mixer,
                    &hop,
                    &fwd,
                    &mut client,
                    &holdings,
                    (task, lo, hi),
                    &mut shutdown,
                )
                .await
                {
                    Ok(true) => {
                        metrics::counter!(hush_server::metrics::names::BATCHES).increment(1);
                        mixer.finished(&hop.name, &task)
                    }
                    Ok(false) => return,
                    Err(e) => {
                        tracing::error!(hop = %hop.name, error = %e, "forwarding a batch failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(fwd.retry_max_ms)) => {}
                            _ = shutdown.wait_for(|v| *v) => return,
                        }
                    }
                }
            }
            Err(deadline) => {
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = sleep => {}
                    _ = shutdown.wait_for(|v| *v) => return,
                }
            }
        }
    }
}

/// Shuffles batch `lo..=hi` of `task`'s lane to `hop` and sends it in slices, each deleted after
/// the next hop acknowledges it. Returns false if shutdown interrupted it (the rest stays
/// stored).
#[allow(clippy::too_many_arguments)]
async fn forward_batch(
    store: &Store,
    mixer: &Mixer,
    hop: &NextHopConfig,
    fwd: &ForwardConfig,
    client: &mut HopClient,
    (tasks, holdings): &(Tasks, Arc<TenantHoldings>),
    (task, lo, hi): Ready,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool> {
    let s = store.clone();
    let name = hop.name.clone();
    // The whole batch is read into memory so it can be shuffled packet by packet: usually
    // `batch_size` packets, but an open batch keeps growing while its hop's forwarder is busy
    // or retrying, up to `max_buffered_packets` (docs/operators.md, "Running a shuffler").
    let mut packets =
        tokio::task::spawn_blocking(move || s.batch_packets(&name, &task, lo, hi)).await??;
    let mut rng = ChaCha20Rng::try_from_os_rng()
        .map_err(|e| Error::config(format!("the OS random number generator failed: {e}")))?;
    packets.shuffle(&mut rng);
    tracing::debug!(hop = %hop.name, packets = packets.len(), "forwarding a batch");
    let tenant = tasks.tenant(&task);
    for slice in packets.chunks(fwd.chunk_packets) {
        let mut backoff = RetryPolicy::new(
            Duration::from_millis(fwd.retry_initial_ms),
            Duration::from_millis(fwd.retry_max_ms),
        )
        .backoff();
        loop {
            match client.send(&task, slice).await {
                Ok((accepted, refused)) => {
                    metrics::counter!(hush_server::metrics::names::PACKETS_FORWARDED)
                        .increment(accepted);
                    if refused > 0 {
                        tracing::warn!(hop = %hop.name, accepted, refused, "the next hop refused some packets");
                    }
                    break;
                }
                Err(status) => {
                    metrics::counter!(hush_server::metrics::names::FORWARD_RETRIES).increment(1);
                    let (delay, failure) = backoff.after(status.code());
                    if failure == Failure::Permanent {
                        tracing::warn!(
                            hop = %hop.name,
                            code = ?status.code(),
                            message = status.message(),
                            fix = what_to_fix(status.code()),
                            retry_in_ms = delay.as_millis() as u64,
                            "the next hop refuses a batch slice; holding it"
                        );
                    } else {
                        tracing::warn!(
                            hop = %hop.name,
                            code = ?status.code(),
                            message = status.message(),
                            retry_in_ms = delay.as_millis() as u64,
                            "the next hop did not take a batch slice; retrying"
                        );
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait_for(|v| *v) => return Ok(false),
                    }
                }
            }
        }
        let n = slice.len() as u64;
        let s = store.clone();
        let name = hop.name.clone();
        let done: Vec<(u64, u64)> = slice.iter().map(StoredPacket::at).collect();
        tokio::task::spawn_blocking(move || s.mark_forwarded(&name, &task, &done)).await??;
        // Counted as gone once marked: a batch retried after a failed flush reads only its
        // unmarked packets, so counting after the flush would never count these.
        mixer.forwarded(n);
        if let Some(t) = &tenant {
            holdings.release(t, n);
        }
        store.flush().await?;
    }
    // Every packet was acknowledged: the batch's extents, marks and files go. A crash before
    // this finishes leaves a batch whose packets are all marked sent; it is forwarded as empty
    // and deleted after the restart.
    let s = store.clone();
    let name = hop.name.clone();
    tokio::task::spawn_blocking(move || s.remove_batches(&name, &task, lo, hi)).await??;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HopKind;

    const TASK: [u8; 32] = [7u8; 32];

    fn packet(hop: &str, tag: u8) -> Admitted {
        let mut tag_key = [0u8; 40];
        tag_key[8] = tag;
        Admitted {
            hop: hop.to_owned(),
            tag_key,
            task: TaskId::from(TASK),
            payload: vec![tag; 10],
        }
    }

    /// A mixer of one next hop, "b", whose batches close at two packets (one after a minute).
    fn mixer(store: &Store) -> Mixer {
        mixer_of(store, 2, 1)
    }

    /// A mixer of one next hop, "b": batches of `k` packets, `k_min` after a minute.
    fn mixer_of(store: &Store, k: u64, k_min: u64) -> Mixer {
        let hop = NextHopConfig {
            name: "b".into(),
            kind: HopKind::Shuffler,
            url: "http://127.0.0.1:1".into(),
        };
        let mix = MixConfig {
            batch_size: k,
            min_batch_size: k_min,
            max_wait_ms: 60_000,
        };
        Mixer::recover(mix, &[hop], store).unwrap()
    }

    fn payloads(store: &Store, lo: u64, hi: u64) -> Vec<u8> {
        let mut got: Vec<u8> = store
            .batch_packets("b", &TaskId::from(TASK), lo, hi)
            .unwrap()
            .iter()
            .map(|p| p.payload[0])
            .collect();
        got.sort();
        got
    }

    #[test]
    fn a_batch_that_closes_while_packets_are_written_to_it_leaves_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let m = mixer(&store);
        let none = StatDelta::default();
        assert_eq!(
            m.admit(&store, vec![packet("b", 1), packet("b", 2)], &none)
                .unwrap(),
            vec![true, true]
        );
        // A third packet is being written to the open batch when the forwarder looks: the
        // full batch closes, but does not leave without it.
        let writing = m.begin(vec![packet("b", 3)]).unwrap();
        assert_eq!(writing[0].batch, 0);
        let r = m.ready(&store, "b").unwrap();
        assert!(matches!(r, Err(None)), "{r:?}");
        // Packets admitted meanwhile go to the next batch (not full, so not ready).
        assert_eq!(
            m.admit(&store, vec![packet("b", 4)], &none).unwrap(),
            vec![true]
        );
        assert!(m.ready(&store, "b").unwrap().is_err());
        let stored = store.accept(&writing, &none).unwrap();
        m.end(&writing, Some(&stored));
        assert_eq!(
            m.ready(&store, "b").unwrap().unwrap(),
            (TaskId::from(TASK), 0, 0)
        );
        assert_eq!(payloads(&store, 0, 0), vec![1, 2, 3]);
        assert_eq!(payloads(&store, 1, 1), vec![4]);
        assert_eq!(m.open_per_task()[&TaskId::from(TASK)], 1);
        assert_eq!(m.buffered(), 4);
    }

    #[test]
    fn a_failed_admission_holds_no_batch_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let m = mixer(&store);
        let none = StatDelta::default();
        m.admit(&store, vec![packet("b", 1), packet("b", 2)], &none)
            .unwrap();
        let err = m
            .admit(&store, vec![packet("b", 3), packet("x", 4)], &none)
            .unwrap_err();
        assert!(err.to_string().contains("\"x\" is not configured"), "{err}");
        let writing = m.begin(vec![packet("b", 5)]).unwrap();
        m.end(&writing, None);
        assert_eq!(
            m.ready(&store, "b").unwrap().unwrap(),
            (TaskId::from(TASK), 0, 0)
        );
        assert_eq!(payloads(&store, 0, 0), vec![1, 2]);
        assert_eq!(m.buffered(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_under_k_min_past_the_report_expiry_goes_and_its_lane_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 8).unwrap();
        let m = mixer_of(&store, 10, 3);
        let none = StatDelta::default();
        let (tasks, holdings) = (Tasks::default(), TenantHoldings::new(100));
        m.admit(&store, vec![packet("b", 1), packet("b", 2)], &none)
            .unwrap();
        assert_eq!(m.expire_stale(&store, &tasks, &holdings).unwrap(), 0);
        let expiry = hush_protocol::task::defaults::report_expiry_s();
        tokio::time::advance(Duration::from_secs(expiry + 1)).await;
        assert_eq!(m.expire_stale(&store, &tasks, &holdings).unwrap(), 2);
        assert!(payloads(&store, 0, 0).is_empty());
        assert_eq!(m.buffered(), 0);
        assert_eq!(m.expire_stale(&store, &tasks, &holdings).unwrap(), 0);
        // The next packets open the next batch, and wait for their own k_min.
        m.admit(&store, vec![packet("b", 3)], &none).unwrap();
        assert_eq!(payloads(&store, 1, 1), vec![3]);
        assert_eq!(m.open_per_task()[&TaskId::from(TASK)], 1);
        assert!(m.ready(&store, "b").unwrap().is_err());
    }
}
