//! The aggregator's HPKE keys: loaded from sled (or generated on first start), published through
//! `HpkeKeys`, rotated on command, retired keys deleted after the grace period.

use std::sync::{Arc, RwLock};

use hush_protocol::keys::KeySet;
use hush_protocol::{Clock, HpkeConfig, Keyring};
use tokio::sync::Mutex;

use crate::error::Result;
use crate::store::Store;

/// The live keys, shared by the services that open ciphertexts.
#[derive(Clone, Debug)]
pub struct KeyManager {
    store: Store,
    clock: Arc<dyn Clock>,
    grace_s: u64,
    /// Serializes changes; readers use `ring`.
    set: Arc<Mutex<KeySet>>,
    ring: Arc<RwLock<Keyring>>,
}

impl KeyManager {
    /// Loads the stored keys, or generates and stores a first key.
    pub async fn load(store: Store, clock: Arc<dyn Clock>, grace_s: u64) -> Result<Self> {
        let set = match store.key_set()? {
            Some(s) => s,
            None => {
                let s = KeySet::generate(clock.now());
                store.save_key_set(&s).await?;
                tracing::info!(
                    config_id = s.current().config().id(),
                    "generated the first HPKE key"
                );
                s
            }
        };
        Ok(Self {
            store,
            clock,
            grace_s,
            ring: Arc::new(RwLock::new(set.keyring())),
            set: Arc::new(Mutex::new(set)),
        })
    }

    /// The keys that open ciphertexts now.
    pub fn keyring(&self) -> Keyring {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The published configs, current first.
    pub fn configs(&self) -> Vec<HpkeConfig> {
        self.keyring().configs()
    }

    /// Makes a new key current; the old one keeps opening for the grace period.
    pub async fn rotate(&self) -> Result<Vec<HpkeConfig>> {
        let mut set = self.set.lock().await;
        let mut next = set.clone();
        let id = next.rotate(self.clock.now())?.id();
        self.store.save_key_set(&next).await?;
        *set = next;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = set.keyring();
        tracing::info!(config_id = id, "rotated the HPKE key");
        Ok(set.configs())
    }

    /// Rotates if the current key is `period_s` old (0: never); returns whether it did.
    pub async fn rotate_if_due(&self, period_s: u64) -> Result<bool> {
        let mut set = self.set.lock().await;
        if !set.rotation_due(self.clock.now(), period_s) {
            return Ok(false);
        }
        let mut next = set.clone();
        let id = next.rotate(self.clock.now())?.id();
        self.store.save_key_set(&next).await?;
        *set = next;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = set.keyring();
        tracing::info!(config_id = id, "rotated the HPKE key on schedule");
        Ok(true)
    }

    /// Deletes retired keys past their grace period.
    pub async fn expire(&self) -> Result<Vec<u8>> {
        let mut set = self.set.lock().await;
        let mut next = set.clone();
        let removed = next.expire(self.clock.now(), self.grace_s);
        if !removed.is_empty() {
            self.store.save_key_set(&next).await?;
            *set = next;
            *self.ring.write().unwrap_or_else(|p| p.into_inner()) = set.keyring();
            tracing::info!(?removed, "deleted HPKE keys past their grace period");
        }
        Ok(removed)
    }
}
