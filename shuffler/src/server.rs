//! Starting and stopping a shuffler: one tonic server, a forwarder per next hop and background
//! maintenance, over one sled database.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hush_protocol::proto::v1::admin_server::AdminServer;
use hush_protocol::proto::v1::hpke_keys_server::HpkeKeysServer;
use hush_protocol::proto::v1::shuffler_server::ShufflerServer;
use hush_protocol::{Clock, TaskConfig};
use hush_server::auth::BearerAuth;
use hush_server::quota::TenantHoldings;
use hush_server::tls::{PeerLog, RequirePeerCert};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tonic::service::interceptor::InterceptedService;

use crate::admin::AdminService;
use crate::config::{IngestFrom, ShufflerConfig};
use crate::error::{Error, Result};
use crate::ingest::IngestService;
use crate::keys::NodeKeys;
use crate::mix::{HopClient, Mixer, forwarder};
use crate::shared::{Shared, SourceLimiter, TenantLimiter};
use crate::store::{Store, key_epoch};
use crate::tasks::Tasks;
use hush_server::keys::KeysService;
use hush_server::probe::Probes;

/// A running shuffler.
#[derive(Debug)]
pub struct ShufflerNode {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Shared,
    peers: PeerLog,
    shutdown: watch::Sender<bool>,
    join: JoinHandle<Result<()>>,
}

impl ShufflerNode {
    /// Opens the database, binds `config.listen` and starts serving. `admin_token` guards the
    /// admin API.
    pub async fn start(
        config: ShufflerConfig,
        admin_token: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::config(format!("cannot listen on {}: {e}", config.listen)))?;
        Self::start_on(config, admin_token, clock, listener).await
    }

    /// Like [`ShufflerNode::start`] on an already bound listener.
    pub async fn start_on(
        config: ShufflerConfig,
        admin_token: &str,
        clock: Arc<dyn Clock>,
        listener: TcpListener,
    ) -> Result<Self> {
        config.check()?;
        let addr = listener.local_addr()?;
        let tls = config.tls_material()?;
        if tls.is_some()
            && config.ingest_from == IngestFrom::Shufflers
            && config.peers.previous.is_empty()
        {
            return Err(Error::config(
                "with TLS and ingest_from = \"shufflers\", [peers] previous must name the \
                 previous shuffler's certificate, e.g. previous = [\"shuffler-a\"]"
                    .into(),
            ));
        }
        let client_tls = tls.as_ref().map(|m| m.client());
        let hop_clients = config
            .next_hops
            .iter()
            .map(|h| {
                HopClient::new(
                    h,
                    Duration::from_millis(config.forward.timeout_ms),
                    client_tls.as_ref(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let store = Store::open(&config.data_dir, config.cache_mb)?;
        let tasks = Tasks::default();
        for b in store.tasks()? {
            let pb = hush_protocol::proto::v1::TaskConfig::decode(b.as_slice())
                .map_err(|e| Error::corrupt("task", e))?;
            tasks.insert(TaskConfig::try_from(&pb).map_err(|e| Error::corrupt("task", e))?);
        }
        let keys = NodeKeys::load(store.clone(), clock.clone(), config.key_grace_period_s)?;
        // Tag logs of keys that retired while their deletion failed or a crash cut it short.
        let live: HashSet<[u8; 8]> = keys
            .configs()
            .iter()
            .map(|c| key_epoch(c.public_key()))
            .collect();
        match store.retain_tag_epochs(&live) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                logs = n,
                "deleted the replay tag logs of keys this node no longer has"
            ),
            // Their tags are out of memory anyway; the next start tries again.
            Err(e) => {
                tracing::warn!(error = %e, "a replay tag log of a key this node no longer has could not be deleted")
            }
        }
        let mixer = Arc::new(Mixer::recover(
            config.mix.clone(),
            &config.next_hops,
            &store,
        )?);
        let buffered_by_tenant =
            Arc::new(TenantHoldings::new(config.limits.per_tenant_max_buffered));
        for (task, n) in store.buffered_per_task()? {
            // Packets of a task no longer provisioned count for no tenant.
            if let Some(t) = tasks.tenant(&task) {
                buffered_by_tenant.add(&t, n);
            }
        }
        let shared = Shared {
            buffered_by_tenant,
            limiter: Arc::new(SourceLimiter::new(&config.limits)),
            tenant_limiter: Arc::new(TenantLimiter::for_tenants(&config.limits)),
            config: Arc::new(config),
            store,
            keys,
            tasks,
            mixer,
            clock,
        };
        let (tx, rx) = watch::channel(false);

        let mut background = JoinSet::new();
        for (hop, client) in shared.config.next_hops.iter().zip(hop_clients) {
            background.spawn(forwarder(
                shared.store.clone(),
                shared.mixer.clone(),
                hop.clone(),
                client,
                (shared.tasks.clone(), shared.buffered_by_tenant.clone()),
                shared.config.forward.clone(),
                rx.clone(),
            ));
        }

        // With TLS, a later shuffler refuses connections without a certificate from a trusted
        // CA before any handler runs; the first one takes services' clients.
        let ingest = InterceptedService::new(
            ShufflerServer::new(IngestService::new(shared.clone()))
                .max_decoding_message_size(shared.config.ingest_message_limit()),
            RequirePeerCert::named(
                tls.is_some() && shared.config.ingest_from == IngestFrom::Shufflers,
                "the previous shuffler",
                &shared.config.peers.previous,
            ),
        );
        let admin = InterceptedService::new(
            AdminServer::new(AdminService::new(shared.clone())),
            BearerAuth::new(admin_token, "admin token"),
        );
        // HPKE configs go to key directories only (they present a certificate): a service's
        // client never fetches keys from the party they belong to.
        let keys_svc = InterceptedService::new(
            HpkeKeysServer::new(KeysService::new(shared.keys.clone())),
            RequirePeerCert::named(
                tls.is_some(),
                "key directories",
                &shared.config.peers.key_directories,
            ),
        );
        let names = [
            hush_protocol::proto::v1::shuffler_server::SERVICE_NAME,
            hush_protocol::proto::v1::admin_server::SERVICE_NAME,
            hush_protocol::proto::v1::hpke_keys_server::SERVICE_NAME,
        ];
        let (probes, probe_svcs) = Probes::new(&names, shared.config.server.reflection)
            .await
            .map_err(Error::from)?;
        background.spawn(maintenance(shared.clone(), probes.clone(), rx.clone()));
        let signal = probes.drain_signal(rx.clone(), shared.config.server.drain_grace_ms);
        let incoming = shared
            .config
            .server
            .incoming(listener, tls.as_ref())
            .map_err(|e| Error::config(e.to_string()))?;
        let peers = PeerLog::default();
        let metrics = {
            let gauges = hush_server::metrics::StoreGauges::new(shared.store.db().clone());
            let shared = shared.clone();
            hush_server::metrics::MetricsServer::start(
                &shared.config.metrics.clone(),
                "shuffler",
                Arc::new(move || {
                    gauges.record();
                    // The packets themselves are in files beside sled: the store's bytes on
                    // disk count both.
                    if let Ok(sled_bytes) = shared.store.db().size_on_disk() {
                        metrics::gauge!(hush_server::metrics::names::STORE_BYTES)
                            .set((sled_bytes + shared.store.file_bytes()) as f64);
                    }
                    metrics::gauge!(hush_server::metrics::names::PACKETS_BUFFERED)
                        .set(shared.mixer.buffered() as f64);
                }),
                rx.clone(),
            )
            .await
            .map_err(Error::from)?
        };
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr());
        let router = shared
            .config
            .server
            .apply(
                tonic::transport::Server::builder(),
                hush_server::trace::RequestSpans::new("shuffler", &names),
            )
            .layer(peers.layer())
            .add_service(probe_svcs.health)
            .add_optional_service(probe_svcs.reflection)
            .add_service(ingest)
            .add_service(admin)
            .add_service(keys_svc);
        let store = shared.store.clone();
        let join = tokio::spawn(async move {
            let served = hush_server::serve_incoming!(router, incoming, signal);
            while background.join_next().await.is_some() {}
            if let Some(m) = metrics {
                m.join().await;
            }
            store.flush().await?;
            served.map_err(|e| Error::from(std::io::Error::other(e)))
        });
        tracing::info!(%addr, name = %shared.config.name, tls = tls.is_some(), "shuffler listening");
        Ok(Self {
            addr,
            metrics_addr,
            shared,
            peers,
            shutdown: tx,
            join,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the Prometheus endpoint, if `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared state (for tests and tools in the same process).
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Who connected so far, per peer certificate name (or anonymous).
    pub fn peers(&self) -> &PeerLog {
        &self.peers
    }

    /// Stops accepting requests, lets requests in flight finish, stops forwarding (what is not
    /// acknowledged stays stored) and flushes the database.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        self.join.await?
    }
}

/// Deletes keys past their grace period (with their replay tags) and forgets idle rate-limit
/// buckets.
async fn maintenance(shared: Shared, probes: Probes, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(shared.config.maintenance_interval_s.max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        let now = shared.clock.now().as_secs();
        probes
            .store_written(
                hush_server::db::probe_write(shared.store.db(), now)
                    .await
                    .is_ok(),
            )
            .await;
        shared.limiter.forget_idle();
        shared.tenant_limiter.forget_idle();
        let n = shared.clone();
        match tokio::task::spawn_blocking(move || {
            n.mixer
                .expire_stale(&n.store, &n.tasks, &n.buffered_by_tenant)
        })
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(_)) => {
                if let Err(e) = shared.store.flush().await {
                    tracing::error!(error = %e, "flushing after dropping stale packets failed");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "dropping stale packets failed"),
            Err(e) => tracing::error!(error = %e, "dropping stale packets panicked"),
        }
        let keys = shared.keys.clone();
        let period = shared.config.key_rotation_period_s;
        match tokio::task::spawn_blocking(move || {
            keys.rotate_if_due(period)?;
            keys.expire().map(|_| ())
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "expiring HPKE keys failed"),
            Err(e) => tracing::error!(error = %e, "expiring HPKE keys panicked"),
        }
    }
}
