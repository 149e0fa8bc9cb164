//! Starting and stopping an aggregator: one tonic server with the role's services, the job
//! driver (leader), and background maintenance, over one sled database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hush_protocol::proto::v1::admin_server::AdminServer;
use hush_protocol::proto::v1::collection_server::CollectionServer;
use hush_protocol::proto::v1::helper_aggregation_server::HelperAggregationServer;
use hush_protocol::proto::v1::hpke_keys_server::HpkeKeysServer;
use hush_protocol::proto::v1::leader_ingest_server::LeaderIngestServer;
use hush_protocol::{Clock, Role};
use hush_server::quota::TenantHoldings;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::admin::AdminService;
use crate::audit::AuditRefusals;
use crate::config::{AggregatorConfig, secret_from_env};
use crate::error::{Error, Result};
use crate::helper::HelperService;
use crate::keys::KeyManager;
use crate::leader::{
    CollectionService, IngestService, JobDriver, MAX_COLLECTION_BYTES, helper_client,
};
use crate::shared::{LeaderState, Shared};
use crate::store::Store;
use crate::tasks::{TaskCache, TaskEntry};
use hush_server::auth::BearerAuth;
use hush_server::keys::KeysService;
use hush_server::probe::Probes;
use hush_server::tls::{Both, PeerLog, RequirePeerCert};

/// The secrets an aggregator needs, which never come from its config file.
#[derive(Clone)]
pub struct Secrets {
    /// Bearer token of the `Admin` service.
    pub admin_token: String,
    /// Bearer token the leader presents to the helper.
    pub peer_token: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

impl Secrets {
    /// Reads the secrets from the environment variables the config names. With the default
    /// `admin_token_env`, the role's own variable (`HUSH_LEADER_ADMIN_TOKEN`,
    /// `HUSH_HELPER_ADMIN_TOKEN`: what `hush task create` reads) comes first, so one shell can
    /// run both aggregators with their own tokens.
    pub fn from_env(role: Role, config: &AggregatorConfig) -> Result<Self> {
        Ok(Self {
            admin_token: hush_server::auth::admin_token_from_env(
                &format!("HUSH_{}_ADMIN_TOKEN", role.to_string().to_ascii_uppercase()),
                &config.admin_token_env,
            )
            .map_err(Error::config)?,
            peer_token: secret_from_env(&config.peer_token_env, "leader-helper token")?,
        })
    }
}

/// A running aggregator.
#[derive(Debug)]
pub struct Aggregator {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Shared,
    peers: PeerLog,
    shutdown: watch::Sender<bool>,
    join: JoinHandle<Result<()>>,
}

impl Aggregator {
    /// Opens the database, binds `config.listen` and starts serving as `role`.
    pub async fn start(
        role: Role,
        config: AggregatorConfig,
        secrets: Secrets,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::config(format!("cannot listen on {}: {e}", config.listen)))?;
        Self::start_on(role, config, secrets, clock, listener).await
    }

    /// Like [`Aggregator::start`] on an already bound listener.
    pub async fn start_on(
        role: Role,
        config: AggregatorConfig,
        secrets: Secrets,
        clock: Arc<dyn Clock>,
        listener: TcpListener,
    ) -> Result<Self> {
        config.check()?;
        if role == Role::Leader && config.leader.is_none() {
            return Err(Error::config(
                "the leader needs a [leader] section with helper_url".into(),
            ));
        }
        let addr = listener.local_addr()?;
        let tls = config.tls_material()?;
        if tls.is_some() {
            config.peers.check_for(role)?;
        }
        let client_tls = tls.as_ref().map(|m| m.client());
        let store = Store::from_config(&config).await?;
        store.claim_role(role).await?;
        tracing::info!(store = store.kind(), "opened the store");
        if role == Role::Leader {
            // Records written under a larger job size would make jobs the helper may refuse.
            // Failing that is no reason not to start: those jobs are only larger.
            match store.split_pending_records(config.job_size()).await {
                Ok(0) => {}
                Ok(split) => tracing::info!(
                    records = split,
                    job_size = config.job_size(),
                    "split pending records written under a larger job size"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    job_size = config.job_size(),
                    "cannot split pending records written under a larger job size; jobs of them may be larger than job_size"
                ),
            }
        }
        let tasks = store
            .tasks()
            .await?
            .iter()
            .map(|b| TaskEntry::decode(b))
            .collect::<Result<Vec<_>>>()?;
        let keys = KeyManager::load(store.clone(), clock.clone(), config.key_grace_period_s)?;
        let pending_now = store.pending_total().await?;
        let config_leader_max_pending = config
            .leader
            .as_ref()
            .map_or(u64::MAX, |l| l.tenant_max_pending);
        let shared = Shared {
            role,
            config: Arc::new(config),
            store,
            tasks: TaskCache::new(tasks),
            keys,
            clock,
            leader: LeaderState {
                new_reports: Arc::new(Notify::new()),
                pending: Arc::new(AtomicU64::new(pending_now)),
                pending_by_tenant: Arc::new(TenantHoldings::new(config_leader_max_pending)),
            },
            collected: Default::default(),
            collect_lock: Default::default(),
            collect_refusals: Default::default(),
            synced: Default::default(),
        };
        for t in shared.tasks.all() {
            let n = shared.store.pending_count(&t.config.id()).await?;
            shared.leader.pending_by_tenant.add(t.config.tenant(), n);
        }
        for (task, window) in shared.store.collected_windows().await? {
            shared.set_collected(&task, &[window], true);
        }
        let (tx, rx) = watch::channel(false);

        // With TLS, operator links refuse connections without a client certificate before any
        // handler runs. HPKE configs go to key directories only (they present a certificate),
        // so a service's client can never fetch keys from an aggregator; the token-guarded admin
        // API stays open to any operator tool that trusts this server.
        // Every refusal lands in the audit trail.
        let peers_cfg = shared.config.peers.clone();
        let peer_cert =
            |what, allowed: &[String]| RequirePeerCert::named(tls.is_some(), what, allowed);
        let admin = InterceptedService::new(
            AdminServer::new(AdminService::new(shared.clone())),
            AuditRefusals::new(
                BearerAuth::new(&secrets.admin_token, "admin token"),
                shared.trail(),
                "admin",
            ),
        );
        let keys_svc = InterceptedService::new(
            HpkeKeysServer::new(KeysService::new(shared.keys.clone())),
            AuditRefusals::new(
                peer_cert("key directories", &peers_cfg.key_directories),
                shared.trail(),
                "keys",
            ),
        );
        let (ingest, collection, helper) = match (role, &shared.config.leader) {
            (Role::Leader, Some(lc)) => (
                Some(InterceptedService::new(
                    LeaderIngestServer::new(IngestService::new(shared.clone()))
                        .max_decoding_message_size(shared.config.ingest_message_limit()),
                    AuditRefusals::new(
                        peer_cert("the last shuffler", &peers_cfg.shufflers),
                        shared.trail(),
                        "ingest",
                    ),
                )),
                Some(InterceptedService::new(
                    CollectionServer::new(CollectionService::new(
                        shared.clone(),
                        helper_client(
                            lc,
                            shared.config.job_message_limit(),
                            &secrets.peer_token,
                            client_tls.as_ref(),
                        )?,
                    ))
                    .max_encoding_message_size(MAX_COLLECTION_BYTES),
                    AuditRefusals::new(
                        peer_cert("collectors", &peers_cfg.collectors),
                        shared.trail(),
                        "collection",
                    ),
                )),
                None,
            ),
            _ => (
                None,
                None,
                Some(InterceptedService::new(
                    HelperAggregationServer::new(HelperService::new(shared.clone()))
                        .max_decoding_message_size(shared.config.job_message_limit())
                        .max_encoding_message_size(shared.config.job_message_limit()),
                    AuditRefusals::new(
                        Both(
                            peer_cert("the leader", &peers_cfg.leader),
                            BearerAuth::new(&secrets.peer_token, "leader-helper token"),
                        ),
                        shared.trail(),
                        "aggregation",
                    ),
                )),
            ),
        };

        let driver = match (&shared.config.leader, role) {
            (Some(lc), Role::Leader) => {
                let d = Arc::new(JobDriver::new(
                    shared.clone(),
                    lc.clone(),
                    &secrets.peer_token,
                    client_tls.as_ref(),
                )?);
                Some(tokio::spawn(d.run(rx.clone())))
            }
            _ => None,
        };
        let mut names = vec![
            hush_protocol::proto::v1::admin_server::SERVICE_NAME,
            hush_protocol::proto::v1::hpke_keys_server::SERVICE_NAME,
        ];
        if role == Role::Leader {
            names.push(hush_protocol::proto::v1::leader_ingest_server::SERVICE_NAME);
            names.push(hush_protocol::proto::v1::collection_server::SERVICE_NAME);
        } else {
            names.push(hush_protocol::proto::v1::helper_aggregation_server::SERVICE_NAME);
        }
        let (probes, probe_svcs) = Probes::new(&names, shared.config.server.reflection).await?;
        let maintenance = tokio::spawn(maintenance(shared.clone(), probes.clone(), rx.clone()));
        if shared.store.is_shared() {
            tokio::spawn(replica_sync(shared.clone(), rx.clone()));
        }

        let signal = probes.drain_signal(rx.clone(), shared.config.server.drain_grace_ms);
        let incoming = shared
            .config
            .server
            .incoming(listener, tls.as_ref())
            .map_err(|e| Error::config(e.to_string()))?;
        let peers = PeerLog::default();
        let metrics = {
            let gauges = shared
                .store
                .sled_db()
                .map(|db| hush_server::metrics::StoreGauges::new(db.clone()));
            if gauges.is_none() && shared.config.metrics.listen.is_some() {
                tokio::spawn(crate::store::pg::record_gauges(
                    shared.store.clone(),
                    rx.clone(),
                ));
            }
            let shared = shared.clone();
            hush_server::metrics::MetricsServer::start(
                &shared.config.metrics.clone(),
                if role == Role::Leader {
                    "leader"
                } else {
                    "helper"
                },
                Arc::new(move || {
                    if let Some(g) = &gauges {
                        g.record();
                        // The leader's pending reports are in files beside sled: the store's
                        // bytes on disk count both.
                        if let Some(Ok(sled_bytes)) =
                            shared.store.sled_db().map(|db| db.size_on_disk())
                        {
                            metrics::gauge!(hush_server::metrics::names::STORE_BYTES)
                                .set((sled_bytes + shared.store.pending_file_bytes()) as f64);
                        }
                        if let Some(n) = shared.store.anti_replay_ids_in_memory() {
                            metrics::gauge!(hush_server::metrics::names::ANTI_REPLAY_IDS)
                                .set(n as f64);
                        }
                    }
                    if shared.role == Role::Leader {
                        metrics::gauge!(hush_server::metrics::names::REPORTS_PENDING)
                            .set(shared.leader.pending.load(Ordering::Relaxed) as f64);
                    }
                }),
                rx.clone(),
            )
            .await?
        };
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr());
        let router = shared
            .config
            .server
            .apply(
                tonic::transport::Server::builder(),
                hush_server::trace::RequestSpans::new(
                    if role == Role::Leader {
                        "leader"
                    } else {
                        "helper"
                    },
                    &names,
                ),
            )
            .layer(peers.layer())
            .add_service(probe_svcs.health)
            .add_optional_service(probe_svcs.reflection)
            .add_service(admin)
            .add_service(keys_svc)
            .add_optional_service(ingest)
            .add_optional_service(collection)
            .add_optional_service(helper);
        let store = shared.store.clone();
        let join = tokio::spawn(async move {
            let served = hush_server::serve_incoming!(router, incoming, signal);
            if let Some(d) = driver {
                let _ = d.await;
            }
            if let Some(m) = metrics {
                m.join().await;
            }
            let _ = maintenance.await;
            store.flush().await?;
            served.map_err(|e| Error::from(std::io::Error::other(e)))
        });
        tracing::info!(%addr, %role, tls = tls.is_some(), "aggregator listening");
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

    /// Who connected so far: connections and requests per peer certificate name (or
    /// anonymous).
    pub fn peers(&self) -> &PeerLog {
        &self.peers
    }

    /// Stops accepting requests, lets requests in flight finish, stops background work and
    /// flushes the database.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        self.join.await?
    }

    /// Serves until the process receives SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run_until_signal(self) -> Result<()> {
        hush_server::serve::shutdown_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await
    }
}

/// How often a replica on a shared database reads what the others changed (tasks, keys,
/// collected windows), besides reading at once when a request names something it does not know.
const REPLICA_SYNC: Duration = Duration::from_secs(5);

/// Reads the other replicas' changes every [`REPLICA_SYNC`] until `shutdown`, so the keys this
/// replica publishes follow a rotation another one made within seconds.
async fn replica_sync(shared: Shared, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPLICA_SYNC) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        if let Err(e) = shared.sync_from_store(Duration::ZERO).await {
            tracing::warn!(error = %e, "reading the other replicas' changes failed; retrying");
        }
    }
}

/// Applies retention ([`crate::retention`]), expires finished helper jobs and HPKE keys past
/// their grace period.
async fn maintenance(shared: Shared, probes: Probes, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(shared.config.maintenance_interval_s.max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        let now = shared.clock.now();
        probes
            .store_written(shared.store.probe_write(now.as_secs()).await.is_ok())
            .await;
        if let Err(e) = shared.sync_from_store(Duration::ZERO).await {
            tracing::error!(error = %e, "reading the other replicas' changes failed");
        }
        let s = shared.clone();
        if let Err(e) = s
            .store
            .clone()
            .run(move |_| async move { crate::retention::run_once(&s).await })
            .await
        {
            tracing::error!(error = %e, "retention failed; retrying next run");
        }
        if shared.role == Role::Leader {
            match shared
                .store
                .run(|s| async move { s.remove_unused_pending_files(true).await })
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(files = n, "deleted unused pending files"),
                Err(e) => tracing::error!(error = %e, "deleting unused pending files failed"),
            }
        }
        if shared.role == Role::Helper {
            match shared
                .store
                .expire_helper_jobs(now.sub_secs(shared.config.helper_job_retention_s))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(expired = n, "expired finished aggregation job records"),
                Err(e) => tracing::error!(error = %e, "expiring aggregation job records failed"),
            }
        }
        // Key changes flush the database: off the async workers.
        let (keys, period) = (shared.keys.clone(), shared.config.key_rotation_period_s);
        match tokio::task::spawn_blocking(move || {
            keys.rotate_if_due(period)?;
            keys.expire()
        })
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "rotating or expiring HPKE keys failed"),
            Err(e) => tracing::error!(error = %e, "the key maintenance thread failed"),
        }
    }
}
