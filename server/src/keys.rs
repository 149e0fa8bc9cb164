//! A receiver's live HPKE keys over any [`KeyStore`]: loaded (or generated on first start),
//! published, rotated on command or on schedule, retired keys deleted after the grace period.
//! Shufflers and aggregators run the same manager; what a store does when a key goes (a
//! shuffler drops the key's replay tags) is its own [`KeyStore::retired`].

use std::sync::{Arc, Mutex, RwLock};

use hush_protocol::keys::KeySet;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::hpke_keys_server::HpkeKeys;
use hush_protocol::{Clock, Codec, HpkeConfig, Keyring};

use crate::error::ServerError;

/// Where a receiver keeps its [`KeySet`]. `save` must be durable when it returns: a key that was
/// published and then lost would leave reports sealed to it unopenable.
pub trait KeyStore: Send + Sync + 'static {
    /// The stored key set, if any.
    fn load_key_set(&self) -> Result<Option<KeySet>, ServerError>;
    /// Replaces the stored key set, durably (blocking; key changes are rare).
    fn save_key_set(&self, set: &KeySet) -> Result<(), ServerError>;
    /// Replaces the stored key set with `next` only if it is still `expected` (`None`: no set
    /// stored yet), durably; returns whether it did. Stores that several processes share
    /// (aggregator replicas on one database) must make this one atomic step; the default, for
    /// stores one process owns, reads and then writes.
    fn swap_key_set(&self, expected: Option<&KeySet>, next: &KeySet) -> Result<bool, ServerError> {
        let stored = self.load_key_set()?;
        if stored.as_ref().map(KeySet::to_bytes) != expected.map(KeySet::to_bytes) {
            return Ok(false);
        }
        self.save_key_set(next)?;
        Ok(true)
    }
    /// `config`'s key was deleted after its grace period: drop what belonged to it.
    fn retired(&self, config: &HpkeConfig) -> Result<(), ServerError> {
        let _ = config;
        Ok(())
    }
}

/// [`KeyStore::load_key_set`] for a store that keeps the set under `"keyset"` in `tree`.
pub fn load_from_tree(tree: &sled::Tree) -> Result<Option<KeySet>, ServerError> {
    tree.get(b"keyset")?
        .map(|v| KeySet::from_bytes(&v).map_err(|e| ServerError::corrupt("key set", e)))
        .transpose()
}

/// [`KeyStore::save_key_set`] for the same: written, then `db` flushed before it returns.
pub fn save_to_tree(tree: &sled::Tree, db: &sled::Db, set: &KeySet) -> Result<(), ServerError> {
    tree.insert(b"keyset", set.to_bytes())?;
    db.flush()?;
    Ok(())
}

/// The live key set and the keyring derived from it, shared by the services that open
/// ciphertexts. Cheap to clone.
#[derive(Debug)]
pub struct KeyManager<S> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    grace_s: u64,
    /// Serializes changes; readers use `ring`.
    set: Arc<Mutex<KeySet>>,
    ring: Arc<RwLock<Keyring>>,
}

impl<S> Clone for KeyManager<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            clock: self.clock.clone(),
            grace_s: self.grace_s,
            set: self.set.clone(),
            ring: self.ring.clone(),
        }
    }
}

impl<S: KeyStore> KeyManager<S> {
    /// Loads the stored keys, or generates and stores a first key. Retired keys are kept
    /// `grace_s` seconds after they stop being current.
    pub fn load(store: S, clock: Arc<dyn Clock>, grace_s: u64) -> Result<Self, ServerError> {
        let set = match store.load_key_set()? {
            Some(s) => s,
            None => {
                let s = KeySet::generate(clock.now());
                if store.swap_key_set(None, &s)? {
                    tracing::info!(
                        config_id = s.current().config().id(),
                        "generated the first HPKE key"
                    );
                    s
                } else {
                    // Another replica stored its first key in the meantime: use that one.
                    store.load_key_set()?.ok_or_else(|| {
                        ServerError::corrupt("key set", "vanished after another process stored it")
                    })?
                }
            }
        };
        Ok(Self {
            store: Arc::new(store),
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

    /// The same, as `HpkeKeys` and the admin API answer them.
    pub fn config_list(&self) -> pb::HpkeConfigList {
        pb::HpkeConfigList {
            configs: self.configs().iter().map(Into::into).collect(),
        }
    }

    /// [`rotate`](Self::rotate) on tokio's blocking pool (it flushes the store).
    pub async fn rotate_off_thread(&self) -> Result<Vec<HpkeConfig>, ServerError> {
        let keys = self.clone();
        tokio::task::spawn_blocking(move || keys.rotate()).await?
    }

    /// Applies `change` to a copy of the stored key set (which another process sharing the
    /// store may have changed), swaps it in, then makes it live; if the stored set changed
    /// meanwhile, applies `change` again to the new one.
    fn update<T>(
        &self,
        change: impl Fn(&mut KeySet) -> Result<T, ServerError>,
    ) -> Result<T, ServerError> {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let stored = self.store.load_key_set()?;
            let base = stored.clone().unwrap_or_else(|| set.clone());
            let mut next = base.clone();
            let out = change(&mut next)?;
            if next.to_bytes() == base.to_bytes() {
                self.adopt(&mut set, base);
                return Ok(out);
            }
            if self.store.swap_key_set(stored.as_ref(), &next)? {
                self.adopt(&mut set, next);
                return Ok(out);
            }
        }
    }

    /// Makes `next` the live set if it differs from `set`.
    fn adopt(&self, set: &mut KeySet, next: KeySet) {
        if next.to_bytes() != set.to_bytes() {
            *self.ring.write().unwrap_or_else(|p| p.into_inner()) = next.keyring();
            *set = next;
        }
    }

    /// Reloads the stored key set, so keys another process sharing the store made (a replica's
    /// rotation) open here too; returns whether it changed.
    pub fn refresh(&self) -> Result<bool, ServerError> {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stored) = self.store.load_key_set()? else {
            return Ok(false);
        };
        let changed = stored.to_bytes() != set.to_bytes();
        self.adopt(&mut set, stored);
        Ok(changed)
    }

    /// Makes a new key current; the old one keeps opening for the grace period. Returns the
    /// configs now published, current first.
    pub fn rotate(&self) -> Result<Vec<HpkeConfig>, ServerError> {
        let now = self.clock.now();
        let configs = self.update(|s| {
            s.rotate(now)?;
            Ok(s.configs())
        })?;
        tracing::info!(config_id = configs[0].id(), "rotated the HPKE key");
        Ok(configs)
    }

    /// Rotates if the current key is `period_s` old (0: never); returns whether it did.
    pub fn rotate_if_due(&self, period_s: u64) -> Result<bool, ServerError> {
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

    /// Deletes retired keys past their grace period (and, through the store, what belonged to
    /// them); returns their config ids.
    pub fn expire(&self) -> Result<Vec<u8>, ServerError> {
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
        for c in &removed {
            self.store.retired(c)?;
            tracing::info!(
                config_id = c.id(),
                "deleted an HPKE key past its grace period"
            );
        }
        Ok(removed.iter().map(HpkeConfig::id).collect())
    }
}

/// The `HpkeKeys` service: a receiver's public HPKE configs, current first.
#[derive(Debug)]
pub struct KeysService<S> {
    keys: KeyManager<S>,
}

impl<S> Clone for KeysService<S> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
        }
    }
}

impl<S> KeysService<S> {
    /// Publishes `keys`.
    pub fn new(keys: KeyManager<S>) -> Self {
        Self { keys }
    }
}

#[tonic::async_trait]
impl<S: KeyStore> HpkeKeys for KeysService<S> {
    async fn get_hpke_configs(
        &self,
        _request: tonic::Request<pb::GetHpkeConfigsRequest>,
    ) -> Result<tonic::Response<pb::HpkeConfigList>, tonic::Status> {
        Ok(tonic::Response::new(self.keys.config_list()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hush_protocol::{MockClock, Time};

    #[derive(Default)]
    struct Memory {
        set: Mutex<Option<Vec<u8>>>,
        retired: Mutex<Vec<u8>>,
    }

    impl KeyStore for Arc<Memory> {
        fn load_key_set(&self) -> Result<Option<KeySet>, ServerError> {
            let bytes = self.set.lock().unwrap().clone();
            bytes
                .map(|b| KeySet::from_bytes(&b).map_err(|e| ServerError::corrupt("key set", e)))
                .transpose()
        }
        fn save_key_set(&self, set: &KeySet) -> Result<(), ServerError> {
            *self.set.lock().unwrap() = Some(set.to_bytes());
            Ok(())
        }
        fn retired(&self, config: &HpkeConfig) -> Result<(), ServerError> {
            self.retired.lock().unwrap().push(config.id());
            Ok(())
        }
    }

    #[test]
    fn keys_rotate_survive_a_reload_and_retire_after_the_grace_period() {
        let clock = MockClock::new(Time::from_secs(1_000));
        let mem = Arc::new(Memory::default());
        let keys = KeyManager::load(mem.clone(), Arc::new(clock.clone()), 100).unwrap();
        let first = keys.configs()[0].id();
        assert!(!keys.rotate_if_due(3_600).unwrap());
        clock.advance(3_600);
        assert!(keys.rotate_if_due(3_600).unwrap());
        assert_eq!(keys.configs().len(), 2);
        assert_eq!(keys.configs()[1].id(), first);
        // A reload sees what was stored.
        let again = KeyManager::load(mem.clone(), Arc::new(clock.clone()), 100).unwrap();
        assert_eq!(again.configs(), keys.configs());
        assert!(keys.expire().unwrap().is_empty());
        clock.advance(101);
        assert_eq!(keys.expire().unwrap(), vec![first]);
        assert_eq!(*mem.retired.lock().unwrap(), vec![first]);
        assert_eq!(keys.configs().len(), 1);
        let rotated = keys.rotate().unwrap();
        assert_eq!(rotated.len(), 2);
        assert_eq!(keys.keyring().configs(), rotated);
    }
}
