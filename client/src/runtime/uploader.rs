//! The uploader: batches from the queue turned into onion packets with the current key set,
//! sent to the first shuffler after a random jitter and retried (one policy,
//! [`hush_protocol::retry`]) until acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hush_protocol::directory::KeySet;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::retry::{Failure, RetryPolicy, what_to_fix};
use hush_protocol::{ReportId, TaskId};
use rand::Rng;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::KeySource;
use super::discovery::{adopt, channel, fetch_key_set};
use super::{Inner, Queued, lock, lock_read};
use crate::report::ClientTask;

impl Inner {
    pub(super) fn build_packets(&self, keys: &KeySet, items: &[Queued]) -> Vec<pb::Packet> {
        let Ok(route) = keys.route() else {
            return vec![];
        };
        let mut clients: HashMap<TaskId, Option<ClientTask>> = HashMap::new();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let client = clients.entry(item.task).or_insert_with(|| {
                let task = self.tasks.get(&item.task)?.clone();
                match ClientTask::new(task, keys.leader.1.clone(), keys.helper.clone(), route.clone()) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::error!(task = %item.task, error = %e, "cannot build reports for this task");
                        None
                    }
                }
            });
            let Some(client) = client else { continue };
            let packet = client
                .shard(&item.measurement, ReportId::random())
                .and_then(|p| client.seal(p, item.time))
                .and_then(|r| client.wrap(&r));
            match packet {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::error!(task = %item.task, error = %e, "a measurement did not fit its task")
                }
            }
        }
        out
    }
}

pub(super) async fn background(
    inner: Arc<Inner>,
    mut shutdown: watch::Receiver<bool>,
    chan: Option<Channel>,
) {
    let mut backoff =
        RetryPolicy::new(inner.config.retry_initial, inner.config.retry_max).backoff();
    let mut refreshed = tokio::time::Instant::now();
    // The batch being uploaded: the same bytes are retried until acknowledged.
    let mut batch: Vec<pb::Packet> = Vec::new();
    let chan = match chan {
        Some(c) => c,
        None => match channel(
            &inner.endpoints.shuffler_url,
            inner.endpoints.tls_ca.as_deref(),
            inner.config.request_timeout,
        ) {
            Ok(c) => c,
            Err(_) => return,
        },
    };
    let mut shuffler = ShufflerClient::new(chan).max_encoding_message_size(64 << 20);
    loop {
        if *shutdown.borrow() {
            return;
        }
        inner.close_windows(false);
        inner.queue_closed();
        super::export::export(&inner);
        if let KeySource::Directory(url) = &inner.endpoints.keys {
            let needs_keys = lock_read(&inner.keys).is_none()
                || refreshed.elapsed() >= inner.config.refresh_interval;
            if needs_keys {
                match fetch_key_set(
                    url,
                    inner.endpoints.tls_ca.as_deref(),
                    inner.config.request_timeout,
                )
                .await
                {
                    Ok(k) => {
                        super::export::key_refresh(true);
                        adopt(&inner, k);
                        refreshed = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        super::export::key_refresh(false);
                        tracing::debug!(error = %e, "key set unavailable; will retry");
                    }
                }
            }
        }
        if batch.is_empty() {
            let keys = lock_read(&inner.keys).clone();
            if let Some(keys) = keys {
                let items: Vec<Queued> = {
                    let mut q = lock(&inner.queue);
                    let n = q.len().min(inner.config.max_batch);
                    // Counted in flight before the queue is unlocked (see `flush`).
                    inner.in_flight.store(n as u64, Ordering::Relaxed);
                    q.drain(..n).collect()
                };
                if !items.is_empty() {
                    let i2 = inner.clone();
                    batch = tokio::task::spawn_blocking(move || i2.build_packets(&keys, &items))
                        .await
                        .unwrap_or_default();
                    inner.in_flight.store(batch.len() as u64, Ordering::Relaxed);
                    inner
                        .counters
                        .reports_sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    // Spread a fleet's uploads.
                    let jitter = inner.config.max_jitter.mul_f64(rand::rng().random::<f64>());
                    tokio::select! {
                        _ = tokio::time::sleep(jitter) => {}
                        _ = shutdown.wait_for(|v| *v) => return,
                    }
                }
            }
        }
        if !batch.is_empty() {
            let req = pb::SubmitPacketsRequest {
                packets: batch.clone(),
            };
            match shuffler.submit_packets(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    inner
                        .counters
                        .accepted
                        .fetch_add(r.accepted, Ordering::Relaxed);
                    let mut rej = lock(&inner.counters.rejected);
                    for rc in r.rejected {
                        *rej.entry(rc.reason).or_default() += rc.count;
                    }
                    drop(rej);
                    batch.clear();
                    inner.in_flight.store(0, Ordering::Relaxed);
                    backoff.reset();
                    continue;
                }
                Err(s) => {
                    inner
                        .counters
                        .upload_retries
                        .fetch_add(1, Ordering::Relaxed);
                    super::export::upload_error(s.code());
                    let (delay, failure) = backoff.after(s.code());
                    if failure == Failure::Permanent {
                        tracing::warn!(
                            code = ?s.code(),
                            message = s.message(),
                            fix = what_to_fix(s.code()),
                            retry_in_ms = delay.as_millis() as u64,
                            "the first shuffler refuses uploads; holding them"
                        );
                    } else {
                        tracing::debug!(code = ?s.code(), "upload failed; retrying with backoff");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait_for(|v| *v) => return,
                    }
                    continue;
                }
            }
        }
        if lock(&inner.queue).is_empty() {
            inner.idle.notify_waiters();
        }
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(inner.config.tick) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
    }
}
