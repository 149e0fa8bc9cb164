//! The `Shuffler` service: accepts batches of onion packets, peels one layer each and stores the
//! result in the next hop's open batch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use hush_protocol::onion::{self, NextHop, OnionError};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::proto::v1::shuffler_server::Shuffler;
use hush_protocol::{Keyring, Outcomes, TaskConfig, TaskId};
use rayon::prelude::*;
use tonic::{Request, Response, Status};

use crate::config::{HopKind, ShufflerConfig};
use crate::error::{Error, Result};
use crate::mix::Admitted;
use crate::shared::Shared;
use crate::store::{NO_TASK, Stat, StatDelta, key_epoch};

/// The gRPC ingest service.
#[derive(Clone, Debug)]
pub struct IngestService {
    shared: Shared,
}

impl IngestService {
    /// A service over `node`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

enum Checked {
    Admitted(Admitted),
    Rejected([u8; 32], RejectReason),
}

fn scope_of(p: &pb::Packet, tasks: &HashMap<TaskId, TaskConfig>) -> [u8; 32] {
    match TaskId::try_from(p.task_id.as_ref()) {
        Ok(id) if tasks.contains_key(&id) => *id.as_bytes(),
        _ => NO_TASK,
    }
}

/// Peels one packet. Pure CPU; runs on the rayon pool.
fn check(
    config: &ShufflerConfig,
    tasks: &HashMap<TaskId, TaskConfig>,
    keyring: &Keyring,
    p: &pb::Packet,
) -> Checked {
    let Ok(task_id) = TaskId::try_from(p.task_id.as_ref()) else {
        return Checked::Rejected(NO_TASK, RejectReason::Malformed);
    };
    let Some(task) = tasks.get(&task_id) else {
        return Checked::Rejected(NO_TASK, RejectReason::UnknownTask);
    };
    let scope = *task_id.as_bytes();
    let peeled = match onion::peel(&task_id, task.packet_size(), keyring, &p.data) {
        Ok(p) => p,
        Err(e) => {
            let reason = match e {
                OnionError::WrongSize { .. } => RejectReason::WrongSize,
                OnionError::UnknownKey(_) => RejectReason::UnknownKey,
                OnionError::DecryptFailed => RejectReason::DecryptFailure,
                _ => RejectReason::Malformed,
            };
            return Checked::Rejected(scope, reason);
        }
    };
    let (kind, name) = match &peeled.next_hop {
        NextHop::Shuffler(n) => (HopKind::Shuffler, n),
        NextHop::Leader(n) => (HopKind::Leader, n),
    };
    if !config.next_hop(name).is_some_and(|h| h.kind == kind) {
        return Checked::Rejected(scope, RejectReason::UnknownHop);
    }
    let Some(key) = keyring.get(peeled.config_id) else {
        // The key opened the layer a moment ago, so it is in this keyring.
        return Checked::Rejected(scope, RejectReason::UnknownKey);
    };
    let mut tag_key = [0u8; 40];
    tag_key[..8].copy_from_slice(&key_epoch(key.config().public_key()));
    tag_key[8..].copy_from_slice(&peeled.replay_tag);
    Checked::Admitted(Admitted {
        hop: name.clone(),
        tag_key,
        task: task_id,
        payload: peeled.payload,
    })
}

impl IngestService {
    /// Counts `packets` as refused under `OverQuota`, and per tenant over `limit` in the
    /// metrics.
    fn count_over_quota(
        &self,
        packets: &[pb::Packet],
        tasks: &HashMap<TaskId, TaskConfig>,
        limit: &'static str,
    ) -> Result<()> {
        let mut delta = StatDelta::default();
        let mut per_tenant: BTreeMap<&str, u64> = BTreeMap::new();
        for p in packets {
            delta.add(
                scope_of(p, tasks),
                Stat::Rejected(RejectReason::OverQuota),
                1,
            );
            let tenant = TaskId::try_from(p.task_id.as_ref())
                .ok()
                .and_then(|id| tasks.get(&id))
                .map_or("", |t| t.tenant());
            *per_tenant.entry(tenant).or_default() += 1;
        }
        for (tenant, n) in per_tenant {
            hush_server::metrics::record_quota_refusals(tenant, limit, n);
        }
        let mut refused = Outcomes::default();
        for _ in packets {
            refused.reject(RejectReason::OverQuota);
        }
        hush_server::metrics::record_rejections(
            hush_server::metrics::names::PACKETS_REJECTED,
            &refused,
        );
        self.shared.store.add_stats(&delta)
    }

    /// Refuses a whole request for overload (over `limit`), counting every packet under
    /// `OverQuota`.
    fn refuse(
        &self,
        packets: &[pb::Packet],
        tasks: &HashMap<TaskId, TaskConfig>,
        limit: &'static str,
        message: String,
    ) -> Result<Status> {
        self.count_over_quota(packets, tasks, limit)?;
        Ok(Error::Overloaded(message).into())
    }

    async fn submit(
        &self,
        source: IpAddr,
        packets: Vec<pb::Packet>,
    ) -> Result<pb::SubmitPacketsResponse, Status> {
        let limits = &self.shared.config.limits;
        if packets.len() > limits.max_request_packets {
            return Err(Status::invalid_argument(format!(
                "{} packets in one request; the limit is {}",
                packets.len(),
                limits.max_request_packets
            )));
        }
        if packets.is_empty() {
            return Ok(pb::SubmitPacketsResponse::default());
        }
        let n = packets.len() as u32;
        let tasks = self.shared.tasks.snapshot();
        if !self.shared.limiter.take(source, n) {
            return Err(self.refuse(
                &packets,
                &tasks,
                "source_rate",
                format!(
                    "this source is over its rate limit of {} packets/s; retry later",
                    limits.per_source_packets_per_s
                ),
            )?);
        }
        // Per-tenant quotas: a tenant over its rate loses its packets, no one else's.
        let mut packets = packets;
        let mut over_quota = 0u64;
        let tenant_of = |p: &pb::Packet| {
            TaskId::try_from(p.task_id.as_ref())
                .ok()
                .and_then(|id| tasks.get(&id))
                .map(|t| t.tenant().to_owned())
        };
        {
            let mut per_tenant: HashMap<String, u32> = HashMap::new();
            for p in &packets {
                if let Some(t) = tenant_of(p) {
                    *per_tenant.entry(t).or_default() += 1;
                }
            }
            let over: HashSet<String> = per_tenant
                .into_iter()
                .filter(|(t, k)| !self.shared.tenant_limiter.take(t.clone(), *k))
                .map(|(t, _)| t)
                .collect();
            if !over.is_empty() {
                let (theirs, rest): (Vec<pb::Packet>, Vec<pb::Packet>) = packets
                    .into_iter()
                    .partition(|p| tenant_of(p).is_some_and(|t| over.contains(&t)));
                let mut names: Vec<&String> = over.iter().collect();
                names.sort();
                let message = format!(
                    "tenant {names:?} is over its quota of {} packets/s; retry later",
                    limits.per_tenant_packets_per_s
                );
                if rest.is_empty() {
                    return Err(self.refuse(&theirs, &tasks, "rate", message)?);
                }
                // A mixed request: only the over-quota tenants' packets are refused.
                self.count_over_quota(&theirs, &tasks, "rate")?;
                tracing::debug!(%message, refused = theirs.len(), "refused packets over a tenant quota");
                over_quota = theirs.len() as u64;
                packets = rest;
            }
        }
        // What each tenant may hold: reserved now, the unused part given back below.
        let mut wanted: BTreeMap<String, u64> = BTreeMap::new();
        for p in &packets {
            if let Some(t) = tenant_of(p) {
                *wanted.entry(t).or_default() += 1;
            }
        }
        let holdings = self.shared.buffered_by_tenant.clone();
        let full = holdings.reserve(&wanted);
        if !full.is_empty() {
            let (theirs, rest): (Vec<pb::Packet>, Vec<pb::Packet>) = packets
                .into_iter()
                .partition(|p| tenant_of(p).is_some_and(|t| full.contains(&t)));
            let message = format!(
                "tenant {full:?} holds its limit of {} packets here; retry later",
                limits.per_tenant_max_buffered
            );
            if rest.is_empty() {
                return Err(self.refuse(&theirs, &tasks, "pending", message)?);
            }
            self.count_over_quota(&theirs, &tasks, "pending")?;
            tracing::debug!(%message, refused = theirs.len(), "refused packets over a tenant quota");
            over_quota += theirs.len() as u64;
            packets = rest;
        }
        let reserved: BTreeMap<String, u64> = wanted
            .into_iter()
            .filter(|(t, _)| !full.contains(t))
            .collect();
        let give_back = |stored: &BTreeMap<String, u64>| {
            for (t, n) in &reserved {
                holdings.release(t, n - stored.get(t).copied().unwrap_or(0).min(*n));
            }
        };
        let n = packets.len() as u32;
        let held = self.shared.mixer.buffered();
        if held + u64::from(n) > limits.max_buffered_packets {
            give_back(&BTreeMap::new());
            return Err(self.refuse(
                &packets,
                &tasks,
                "capacity",
                format!(
                    "this shuffler holds {held} packets (limit {}); retry later",
                    limits.max_buffered_packets
                ),
            )?);
        }

        let node = self.shared.clone();
        let result =
            tokio::task::spawn_blocking(move || -> Result<(Outcomes, BTreeMap<String, u64>)> {
                let keyring = node.keys.keyring();
                // Opening layers is the expensive part: spread it over all cores.
                let checked: Vec<Checked> = packets
                    .par_iter()
                    .map(|p| check(&node.config, &tasks, &keyring, p))
                    .collect();
                let mut outcomes = Outcomes::default();
                let mut delta = StatDelta::default();
                let mut admitted = Vec::with_capacity(checked.len());
                for c in checked {
                    match c {
                        Checked::Admitted(a) => admitted.push(a),
                        Checked::Rejected(scope, reason) => {
                            outcomes.reject(reason);
                            delta.add(scope, Stat::Rejected(reason), 1);
                        }
                    }
                }
                let tenants: Vec<Option<String>> = admitted
                    .iter()
                    .map(|a| node.tasks.tenant(&a.task))
                    .collect();
                let stored = node.mixer.admit(&node.store, admitted, &delta)?;
                let mut per_tenant: BTreeMap<String, u64> = BTreeMap::new();
                for (ok, tenant) in stored.into_iter().zip(tenants) {
                    if ok {
                        outcomes.accept();
                        if let Some(t) = tenant {
                            *per_tenant.entry(t).or_default() += 1;
                        }
                    } else {
                        outcomes.reject(RejectReason::Replay);
                    }
                }
                Ok((outcomes, per_tenant))
            })
            .await
            .map_err(Error::from)
            .and_then(|r| r);
        let (mut outcomes, stored) = match result {
            Ok(r) => r,
            Err(e) => {
                // What was stored before a failure stays counted until it is forwarded.
                give_back(&BTreeMap::new());
                return Err(e.into());
            }
        };
        give_back(&stored);
        // The over-quota packets were counted when they were refused.
        hush_server::metrics::record_outcomes(
            hush_server::metrics::names::PACKETS_ACCEPTED,
            hush_server::metrics::names::PACKETS_REJECTED,
            &outcomes,
        );
        for _ in 0..over_quota {
            outcomes.reject(RejectReason::OverQuota);
        }
        // Durable before acknowledged.
        self.shared.store.flush().await?;
        tracing::debug!(accepted = outcomes.accepted(), "took a batch of packets");
        Ok(pb::SubmitPacketsResponse {
            accepted: outcomes.accepted(),
            rejected: outcomes.reason_counts(),
        })
    }
}

#[tonic::async_trait]
impl Shuffler for IngestService {
    async fn submit_packets(
        &self,
        request: Request<pb::SubmitPacketsRequest>,
    ) -> std::result::Result<Response<pb::SubmitPacketsResponse>, Status> {
        // The address only feeds the rate limiter; it is never stored or logged.
        let source = request
            .remote_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let packets = request.into_inner().packets;
        Ok(Response::new(self.submit(source, packets).await?))
    }
}
