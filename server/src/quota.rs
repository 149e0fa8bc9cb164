//! Per-tenant bounds on stored, not yet processed items (a leader's pending reports, a
//! shuffler's buffered packets), so one tenant cannot fill a node that others share.
//!
//! Callers reserve what a request would add before storing it, give back what was not stored,
//! and release items as they leave (aggregated, forwarded, expired). Counts start from what the
//! store holds, so they are exact across restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

/// Stored items per tenant against a limit each.
#[derive(Debug)]
pub struct TenantHoldings {
    limit: u64,
    held: Mutex<HashMap<String, u64>>,
}

impl TenantHoldings {
    /// Each tenant may hold up to `limit` items.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The limit per tenant.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `n` items of `tenant` already stored (at start).
    pub fn add(&self, tenant: &str, n: u64) {
        if n > 0 {
            *self.lock().entry(tenant.to_owned()).or_default() += n;
        }
    }

    /// Replaces every count with `held` (read from a store other processes share).
    pub fn set_all(&self, held: HashMap<String, u64>) {
        let mut h = self.lock();
        *h = held;
        h.retain(|_, n| *n > 0);
    }

    /// What `tenant` holds.
    pub fn held(&self, tenant: &str) -> u64 {
        self.lock().get(tenant).copied().unwrap_or(0)
    }

    /// Reserves each tenant's `wanted` items if they fit under its limit, all at once. Returns
    /// the tenants that did not fit (nothing is reserved for them).
    pub fn reserve(&self, wanted: &BTreeMap<String, u64>) -> BTreeSet<String> {
        let mut held = self.lock();
        let mut over = BTreeSet::new();
        for (tenant, n) in wanted {
            let h = held.entry(tenant.clone()).or_default();
            if h.saturating_add(*n) > self.limit {
                over.insert(tenant.clone());
            } else {
                *h += n;
            }
        }
        held.retain(|_, h| *h > 0);
        over
    }

    /// Gives back `n` items of `tenant`: reserved but not stored, or gone from the store.
    pub fn release(&self, tenant: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut held = self.lock();
        if let Some(h) = held.get_mut(tenant) {
            *h = h.saturating_sub(n);
            if *h == 0 {
                held.remove(tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(items: &[(&str, u64)]) -> BTreeMap<String, u64> {
        items.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()
    }

    #[test]
    fn a_tenant_over_its_limit_does_not_take_from_another() {
        let q = TenantHoldings::new(10);
        q.add("a", 8);
        let over = q.reserve(&want(&[("a", 3), ("b", 10)]));
        assert_eq!(over, BTreeSet::from(["a".to_owned()]));
        assert_eq!((q.held("a"), q.held("b")), (8, 10));
        q.release("a", 5);
        assert!(q.reserve(&want(&[("a", 3)])).is_empty());
        assert_eq!(q.held("a"), 6);
        q.release("b", 99);
        assert_eq!(q.held("b"), 0);
        q.release("nobody", 1);
    }
}
