//! The shuffler's HPKE keys: [`hush_server::keys::KeyManager`] over the `keys` tree of its store.
//! Each key is an epoch for anti-replay: replay tags are stored under the key that opened the
//! packet and deleted with the key after its grace period.

use hush_protocol::HpkeConfig;
use hush_protocol::keys::KeySet;
use hush_server::ServerError;
use hush_server::keys::KeyStore;

use crate::store::{Store, key_epoch};

/// The live key set and the keyring derived from it.
pub type NodeKeys = hush_server::keys::KeyManager<Store>;

impl KeyStore for Store {
    fn load_key_set(&self) -> Result<Option<KeySet>, ServerError> {
        hush_server::keys::load_from_tree(self.keys_tree())
    }

    fn save_key_set(&self, set: &KeySet) -> Result<(), ServerError> {
        hush_server::keys::save_to_tree(self.keys_tree(), self.db(), set)
    }

    fn retired(&self, config: &HpkeConfig) -> Result<(), ServerError> {
        // Never an error: the key set no longer has the key, so nothing would retry, and an
        // error would skip the other retired keys. The tags are out of memory either way; a
        // log left on disk goes at the next start (`Store::retain_tag_epochs`).
        match self.delete_tags(key_epoch(config.public_key())) {
            Ok(tags) => tracing::info!(
                config_id = config.id(),
                tags,
                "deleted the replay tags of a retired HPKE key"
            ),
            Err(e) => tracing::warn!(
                config_id = config.id(),
                error = %e,
                "the replay tag log of a retired HPKE key could not be deleted; the next start deletes it"
            ),
        }
        Ok(())
    }
}
