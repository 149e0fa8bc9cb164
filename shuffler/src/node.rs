//! State shared by the services and background tasks of one shuffler.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hush_protocol::{Clock, TaskConfig, TaskId};

use crate::config::{LimitConfig, ShufflerConfig};
use crate::keys::NodeKeys;
use crate::mix::Mixer;
use crate::store::Store;

/// Token buckets per source address.
pub struct SourceLimiter(DefaultKeyedRateLimiter<IpAddr>);

impl std::fmt::Debug for SourceLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceLimiter")
            .field("sources", &self.0.len())
            .finish()
    }
}

impl SourceLimiter {
    /// Buckets of `per_source_packets_per_s` refilled per second, `per_source_burst` deep.
    pub fn new(l: &LimitConfig) -> Self {
        let rate = NonZeroU32::new(l.per_source_packets_per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(l.per_source_burst).unwrap_or(NonZeroU32::MIN);
        Self(RateLimiter::keyed(
            Quota::per_second(rate).allow_burst(burst),
        ))
    }

    /// Takes `n` tokens from `source`'s bucket; false if it has too few.
    pub fn take(&self, source: IpAddr, n: u32) -> bool {
        match NonZeroU32::new(n) {
            None => true,
            Some(n) => matches!(self.0.check_key_n(&source, n), Ok(Ok(_))),
        }
    }

    /// Forgets sources whose buckets are full again, so memory follows active sources only.
    pub fn forget_idle(&self) {
        self.0.retain_recent();
        self.0.shrink_to_fit();
    }
}

/// Provisioned tasks: what a shuffler needs of them (packet size, tenant).
#[derive(Clone, Debug, Default)]
pub struct Tasks(Arc<RwLock<HashMap<TaskId, TaskConfig>>>);

impl Tasks {
    /// The task, if provisioned.
    pub fn get(&self, id: &TaskId) -> Option<TaskConfig> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A copy of every task.
    pub fn snapshot(&self) -> HashMap<TaskId, TaskConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds or replaces a task.
    pub fn insert(&self, t: TaskConfig) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.id(), t);
    }
}

/// What every part of a shuffler shares.
#[derive(Clone, Debug)]
pub struct Node {
    /// The configuration.
    pub config: Arc<ShufflerConfig>,
    /// The database.
    pub store: Store,
    /// HPKE keys.
    pub keys: NodeKeys,
    /// Provisioned tasks.
    pub tasks: Tasks,
    /// Batches per next hop.
    pub mixer: Arc<Mixer>,
    /// Rate limits per source.
    pub limiter: Arc<SourceLimiter>,
    /// The time source.
    pub clock: Arc<dyn Clock>,
}
