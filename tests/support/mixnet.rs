//! Shufflers for tests: configs, in-process nodes, a recording stand-in for the leader's ingest,
//! provisioning, routes built from the nodes' published keys, and packet submission.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hush_aggregator::client;
use hush_protocol::onion::{self, Hop, Route};
use hush_protocol::proto::v1::leader_ingest_server::{LeaderIngest, LeaderIngestServer};
use hush_protocol::proto::v1::shuffler_client::ShufflerClient;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::{Clock, TaskConfig};
use hush_shuffler::{ShufflerConfig, ShufflerNode};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::cluster::{ADMIN_TOKEN, IngestCounts, url};

/// The batching of a test shuffler.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    /// k.
    pub batch_size: u64,
    /// k_min.
    pub min_batch_size: u64,
    /// Maximum wait, ms.
    pub max_wait_ms: u64,
}

/// A shuffler config text for tests: `next` is (name, kind, url).
pub fn shuffler_config_text(
    name: &str,
    dir: &Path,
    listen: SocketAddr,
    next: (&str, &str, &str),
    mix: Mix,
    extra: &str,
) -> String {
    format!(
        "name = \"{name}\"\nlisten = \"{listen}\"\ndata_dir = \"{}\"\ncache_mb = 16\n\
         [mix]\nbatch_size = {}\nmin_batch_size = {}\nmax_wait_ms = {}\n\
         [forward]\nretry_initial_ms = 20\nretry_max_ms = 500\n{extra}\n\
         [[next_hop]]\nname = \"{}\"\nkind = \"{}\"\nurl = \"{}\"\n",
        dir.join("data").display(),
        mix.batch_size,
        mix.min_batch_size,
        mix.max_wait_ms,
        next.0,
        next.1,
        next.2
    )
}

/// Starts an in-process shuffler on 127.0.0.1:0.
pub async fn start_shuffler(
    name: &str,
    dir: &Path,
    next: (&str, &str, &str),
    mix: Mix,
    extra: &str,
    clock: Arc<dyn Clock>,
) -> ShufflerNode {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = ShufflerConfig::from_toml(&shuffler_config_text(name, dir, any, next, mix, extra))
        .expect("valid shuffler config");
    ShufflerNode::start(config, ADMIN_TOKEN, clock)
        .await
        .expect("shuffler starts")
}

/// Provisions `task` on the shuffler at `url`.
pub async fn provision_shuffler(shuffler_url: &str, task: &TaskConfig) {
    client::admin(shuffler_url, ADMIN_TOKEN, None)
        .unwrap()
        .create_task(pb::CreateTaskRequest {
            task: Some(task.into()),
            vdaf_verify_key: Default::default(),
            role: "shuffler".into(),
        })
        .await
        .expect("provisioning the shuffler");
}

/// A route through the shufflers `(name, url)` in order, with their current published keys.
pub async fn route(shufflers: &[(&str, String)], leader: &str) -> Route {
    let mut hops = Vec::new();
    for (name, u) in shufflers {
        let config = client::hpke_configs(u, None)
            .await
            .expect("shuffler configs")[0]
            .clone();
        hops.push(Hop {
            name: (*name).into(),
            config,
        });
    }
    Route::new(hops, leader).unwrap()
}

/// Packets for `task` through the single shuffler `name` at `shuffler_url` (its current key) to
/// the leader, one per body. Bodies stand in for reports: a shuffler never looks inside.
pub async fn one_hop_packets(
    shuffler_url: &str,
    name: &str,
    task: &TaskConfig,
    bodies: impl IntoIterator<Item = Vec<u8>>,
) -> Vec<pb::Packet> {
    let config = client::hpke_configs(shuffler_url, None)
        .await
        .expect("shuffler configs")[0]
        .clone();
    let route = Route::new(
        vec![Hop {
            name: name.into(),
            config,
        }],
        "leader",
    )
    .unwrap();
    bodies
        .into_iter()
        .map(|b| pb::Packet {
            task_id: task.id().as_bytes().to_vec().into(),
            data: onion::wrap(&task.id(), task.packet_size(), &route, &b)
                .unwrap()
                .into(),
        })
        .collect()
}

/// Submits packets to a shuffler in batches of `batch`, retrying batches refused for overload.
pub async fn submit_packets(
    shuffler_url: &str,
    packets: &[pb::Packet],
    batch: usize,
) -> IngestCounts {
    let mut c = ShufflerClient::new(client::channel(shuffler_url, None).unwrap());
    let mut counts = IngestCounts::default();
    for chunk in packets.chunks(batch) {
        let r = loop {
            match c
                .submit_packets(pb::SubmitPacketsRequest {
                    packets: chunk.to_vec(),
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("shuffler refused a batch: {s}"),
            }
        };
        counts.accepted += r.accepted;
        for rc in r.rejected {
            *counts
                .rejected
                .entry(RejectReason::try_from(rc.reason).unwrap())
                .or_default() += rc.count;
        }
    }
    counts
}

/// Rejections in a stats answer, by reason.
pub fn reasons(stats: &pb::TaskStats) -> BTreeMap<RejectReason, u64> {
    crate::cluster::rejections(stats)
}

#[derive(Debug, Default)]
struct Recorded {
    reports: Vec<Vec<u8>>,
    seen: std::collections::HashSet<Vec<u8>>,
    duplicates: usize,
    requests: usize,
}

#[derive(Clone, Debug, Default)]
struct Recorder(Arc<Mutex<Recorded>>, Duration);

#[tonic::async_trait]
impl LeaderIngest for Recorder {
    async fn submit_reports(
        &self,
        request: Request<pb::SubmitReportsRequest>,
    ) -> Result<Response<pb::SubmitReportsResponse>, Status> {
        let reports = request.into_inner().reports;
        tokio::time::sleep(self.1).await;
        let mut r = self.0.lock().unwrap();
        r.requests += 1;
        let (mut accepted, mut replays) = (0, 0);
        for b in reports {
            if r.seen.insert(b.to_vec()) {
                r.reports.push(b.to_vec());
                accepted += 1;
            } else {
                r.duplicates += 1;
                replays += 1;
            }
        }
        let rejected = if replays > 0 {
            vec![pb::ReasonCount {
                reason: RejectReason::Replay as i32,
                count: replays,
            }]
        } else {
            vec![]
        };
        Ok(Response::new(pb::SubmitReportsResponse {
            accepted,
            rejected,
        }))
    }
}

/// A stand-in for the leader's ingest that records every report it gets, in order. Like the
/// real leader it refuses a report it already has as a replay (and counts it).
#[derive(Debug)]
pub struct RecordingLeader {
    addr: SocketAddr,
    state: Recorder,
    stop: Option<oneshot::Sender<()>>,
}

impl RecordingLeader {
    /// Serves on 127.0.0.1:0.
    pub async fn start() -> Self {
        Self::start_with_delay(Duration::ZERO).await
    }

    /// Serves on 127.0.0.1:0 and takes `delay` to answer each request, like a busy leader.
    pub async fn start_with_delay(delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Recorder(Arc::default(), delay);
        let (tx, rx) = oneshot::channel();
        let svc = LeaderIngestServer::new(state.clone()).max_decoding_message_size(64 << 20);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await
                .unwrap();
        });
        Self {
            addr,
            state,
            stop: Some(tx),
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        url(self.addr)
    }

    /// Every report received so far, in arrival order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.state.0.lock().unwrap().reports.clone()
    }

    /// Reports received again after they were first accepted (refused as replays).
    pub fn duplicates(&self) -> usize {
        self.state.0.lock().unwrap().duplicates
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.0.lock().unwrap().requests
    }

    /// Waits until at least `n` reports arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "only {} of {n} reports arrived in {timeout:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RecordingLeader {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
