//! The shuffler's HPKE keys. Each key is an epoch for anti-replay: replay tags are stored under
//! the key that opened the packet and deleted when the key is deleted after its grace period.

use std::sync::{Arc, Mutex, RwLock};

use hush_protocol::keys::KeySet;
use hush_protocol::{Clock, Codec, HpkeConfig, Keyring};

use crate::error::Result;
use crate::store::{Store, key_epoch};

/// The live key set and the keyring derived from it.
#[derive(Clone, Debug)]
pub struct NodeKeys {
    store: Store,
    clock: Arc<dyn Clock>,
    grace_s: u64,
    set: Arc<Mutex<KeySet>>,
    ring: Arc<RwLock<Keyring>>,
}

impl NodeKeys {
    /// Loads the stored keys, or generates and stores a first key.
    pub fn load(store: Store, clock: Arc<dyn Clock>, grace_s: u64) -> Result<Self> {
        let set = match store.key_set()? {
            Some(s) => s,
            None => {
                let s = KeySet::generate(clock.now());
                store.save_key_set_blocking(&s)?;
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

    /// The keys that open packets now.
    pub fn keyring(&self) -> Keyring {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies `change` to a copy of the key set, stores it, then makes it live.
    fn update<T>(&self, change: impl FnOnce(&mut KeySet) -> Result<T>) -> Result<T> {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = set.clone();
        let out = change(&mut next)?;
        if next.to_bytes() == set.to_bytes() {
            return Ok(out);
        }
        self.store.save_key_set_blocking(&next)?;
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = next.keyring();
        *set = next;
        Ok(out)
    }

    /// Makes a new key current; the old one keeps opening packets for the grace period.
    pub fn rotate(&self) -> Result<Vec<HpkeConfig>> {
        let now = self.clock.now();
        let configs = self.update(|s| {
            s.rotate(now)?;
            Ok(s.configs())
        })?;
        tracing::info!(config_id = configs[0].id(), "rotated the HPKE key");
        Ok(configs)
    }

    /// Rotates if the current key is `period_s` old (0: never); returns whether it did.
    pub fn rotate_if_due(&self, period_s: u64) -> Result<bool> {
        let now = self.clock.now();
        let rotated = self.update(|s| {
            if s.rotation_due(now, period_s) {
                s.rotate(now)?;
                Ok(true)
            } else {
                Ok(false)
            }
        })?;
        if rotated {
            tracing::info!("rotated the HPKE key on schedule");
        }
        Ok(rotated)
    }

    /// Deletes retired keys past their grace period and the replay tags of their epochs.
    pub fn expire(&self) -> Result<()> {
        let now = self.clock.now();
        let grace = self.grace_s;
        let removed: Vec<HpkeConfig> = self.update(|s| {
            let before = s.configs();
            let gone = s.expire(now, grace);
            Ok(before
                .into_iter()
                .filter(|c| gone.contains(&c.id()))
                .collect())
        })?;
        for c in removed {
            let tags = self.store.delete_tags(key_epoch(c.public_key()))?;
            tracing::info!(
                config_id = c.id(),
                tags,
                "deleted an HPKE key past its grace period and its replay tags"
            );
        }
        Ok(())
    }
}
