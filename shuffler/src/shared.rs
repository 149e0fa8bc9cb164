//! State shared by the services and background tasks of one shuffler ([`Shared`], like the
//! aggregator's), and its rate limiters.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hush_protocol::Clock;
use hush_server::quota::TenantHoldings;

use crate::config::{LimitConfig, ShufflerConfig};
use crate::keys::NodeKeys;
use crate::mix::Mixer;
use crate::store::Store;
use crate::tasks::Tasks;

/// Token buckets per key: per source address, or per tenant.
pub struct KeyedLimiter<K: std::hash::Hash + Eq + Clone>(DefaultKeyedRateLimiter<K>);

/// Token buckets per source address.
pub type SourceLimiter = KeyedLimiter<IpAddr>;

/// Token buckets per tenant.
pub type TenantLimiter = KeyedLimiter<String>;

impl<K: std::hash::Hash + Eq + Clone> std::fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimiter")
            .field("keys", &self.0.len())
            .finish()
    }
}

impl<K: std::hash::Hash + Eq + Clone> KeyedLimiter<K> {
    /// Buckets of `per_s` tokens refilled per second, `burst` deep.
    pub fn with_rate(per_s: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self(RateLimiter::keyed(
            Quota::per_second(rate).allow_burst(burst),
        ))
    }

    /// Takes `n` tokens from `key`'s bucket; false if it has too few.
    pub fn take(&self, key: K, n: u32) -> bool {
        match NonZeroU32::new(n) {
            None => true,
            Some(n) => matches!(self.0.check_key_n(&key, n), Ok(Ok(_))),
        }
    }

    /// Forgets keys whose buckets are full again, so memory follows active keys only.
    pub fn forget_idle(&self) {
        self.0.retain_recent();
        self.0.shrink_to_fit();
    }
}

impl SourceLimiter {
    /// The per-source buckets of `l`.
    pub fn new(l: &LimitConfig) -> Self {
        Self::with_rate(l.per_source_packets_per_s, l.per_source_burst)
    }
}

impl TenantLimiter {
    /// The per-tenant buckets of `l`.
    pub fn for_tenants(l: &LimitConfig) -> Self {
        Self::with_rate(l.per_tenant_packets_per_s, l.per_tenant_burst)
    }
}

/// What every part of a shuffler shares.
#[derive(Clone, Debug)]
pub struct Shared {
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
    /// Rate quotas per tenant.
    pub tenant_limiter: Arc<TenantLimiter>,
    /// Packets held per tenant, against `limits.per_tenant_max_buffered`.
    pub buffered_by_tenant: Arc<TenantHoldings>,
    /// The time source.
    pub clock: Arc<dyn Clock>,
}
