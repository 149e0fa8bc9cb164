//! The key directory (`hush.v1.KeyDirectory`): one identical key set per epoch for every client
//! of the tenant.
//!
//! At the start of each epoch (`[cascade] key_epoch_s`) the service fetches the current HPKE
//! config of every shuffler on the route, the leader and the helper from their `HpkeKeys`
//! services, over mutual TLS with the collector's certificate (the parties serve keys to
//! certificate holders only). It freezes them into a [`KeySet`], stores it in its database (so a
//! restart in the middle of an epoch serves the same set) and answers every client with it until
//! the next epoch. A party can therefore not give one client a key of its own: it never sees a
//! client's request, and the one answer it gives per epoch goes to every client alike. If a
//! fetch fails, the previous set stays in service (the parties keep retired keys for their
//! grace period) and the fetch is retried.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use hush_protocol::directory::KeySet;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::hpke_keys_client::HpkeKeysClient;
use hush_protocol::proto::v1::key_directory_server::KeyDirectory;
use hush_protocol::{HpkeConfig, Time};
use tonic::transport::ClientTlsConfig;
use tonic::{Request, Response, Status};

use crate::config::CascadeConfig;
use crate::error::{Error, Result};
use crate::store::ResultsStore;

/// How long after a failed fetch the directory tries again.
const RETRY: Duration = Duration::from_secs(5);

/// The client side of the link to each party: the `[tls]` identity, trusting the party's
/// pinned CA if the config names one, else the whole `[tls] ca` bundle; `None` without TLS.
#[derive(Clone, Debug, Default)]
pub(crate) struct PartyTls {
    pub(crate) leader: Option<ClientTlsConfig>,
    pub(crate) helper: Option<ClientTlsConfig>,
    /// In route order.
    pub(crate) shufflers: Vec<Option<ClientTlsConfig>>,
}

/// The directory's state.
#[derive(Debug)]
pub(crate) struct Directory {
    cascade: CascadeConfig,
    leader_url: String,
    tls: PartyTls,
    store: ResultsStore,
    current: RwLock<Option<KeySet>>,
    last_failure: RwLock<Option<Instant>>,
}

impl Directory {
    /// A directory over `cascade`, serving the set stored in `store` if there is one.
    pub(crate) fn new(
        cascade: CascadeConfig,
        leader_url: String,
        tls: PartyTls,
        store: ResultsStore,
    ) -> Result<Self> {
        let current = store.key_set()?;
        Ok(Self {
            cascade,
            leader_url,
            tls,
            store,
            current: RwLock::new(current),
            last_failure: RwLock::new(None),
        })
    }

    /// The key set in service.
    pub(crate) fn current(&self) -> Option<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts a new epoch's key set if the epoch changed (or none is in service).
    pub(crate) async fn refresh(&self, now: Time) {
        let epoch_s = self.cascade.key_epoch_s;
        let epoch = now.as_secs() / epoch_s;
        // The set in service is this epoch's (under this epoch length): nothing to do. Any
        // other (an older epoch, another `key_epoch_s`, a clock that went back) is replaced.
        if self
            .current()
            .is_some_and(|k| k.epoch == epoch && k.epoch_s == epoch_s)
        {
            return;
        }
        if self
            .last_failure
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RETRY)
        {
            return;
        }
        match self.fetch(epoch, Time::from_secs(epoch * epoch_s)).await {
            Ok(set) => {
                if let Err(e) = self.store.put_key_set(&set).await {
                    tracing::error!(error = %e, "storing the key set failed; not serving it");
                    return;
                }
                tracing::info!(epoch, digest = %set.short_digest(), "key directory: new epoch's key set");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(set);
                *self.last_failure.write().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, epoch, "key directory: fetching the parties' keys failed; the previous set stays in service");
                *self.last_failure.write().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now());
            }
        }
    }

    async fn config_of(
        &self,
        url: &str,
        who: &str,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<HpkeConfig> {
        let channel = hush_protocol::link::channel(url, tls, "URL")
            .map_err(|e| Error::config(e.to_string()))?;
        let list = HpkeKeysClient::new(channel)
            .get_hpke_configs(pb::GetHpkeConfigsRequest {})
            .await
            .map_err(|s| Error::NotReady(format!("{who} at {url}: {}", s.message())))?
            .into_inner();
        let configs = Vec::<HpkeConfig>::try_from(&list)
            .map_err(|e| Error::InvalidRequest(format!("{who} at {url}: {e}")))?;
        configs
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotReady(format!("{who} at {url} publishes no HPKE config")))
    }

    async fn fetch(&self, epoch: u64, epoch_start: Time) -> Result<KeySet> {
        let mut shufflers = Vec::with_capacity(self.cascade.shufflers.len());
        for (i, h) in self.cascade.shufflers.iter().enumerate() {
            let tls = self.tls.shufflers.get(i).and_then(Option::as_ref);
            shufflers.push((
                h.name.clone(),
                self.config_of(&h.url, &format!("shuffler {:?}", h.name), tls)
                    .await?,
            ));
        }
        let set = KeySet {
            epoch,
            epoch_start,
            epoch_s: self.cascade.key_epoch_s,
            shufflers,
            leader: (
                self.cascade.leader_name.clone(),
                self.config_of(&self.leader_url, "the leader", self.tls.leader.as_ref())
                    .await?,
            ),
            helper: self
                .config_of(
                    &self.cascade.helper_url,
                    "the helper",
                    self.tls.helper.as_ref(),
                )
                .await?,
        };
        set.route()
            .map_err(|e| Error::config(format!("the cascade is not a valid route: {e}")))?;
        Ok(set)
    }
}

/// The gRPC face of the directory.
#[derive(Clone, Debug)]
pub(crate) struct DirectoryGrpc(pub(crate) std::sync::Arc<crate::Shared>);

#[tonic::async_trait]
impl KeyDirectory for DirectoryGrpc {
    async fn get_key_set(
        &self,
        _request: Request<pb::GetKeySetRequest>,
    ) -> std::result::Result<Response<pb::KeySet>, Status> {
        let Some(dir) = &self.0.directory else {
            return Err(Status::failed_precondition(
                "this results service is not a key directory: configure its [cascade] section",
            ));
        };
        match dir.current() {
            Some(set) => Ok(Response::new((&set).into())),
            None => Err(Status::unavailable(
                "the key directory has no key set yet (the parties did not answer); retry",
            )),
        }
    }
}
