//! The aggregator's HPKE keys: [`hush_server::keys::KeyManager`] over the `keys` tree of its
//! store. Retired keys leave nothing behind at an aggregator (replay protection is by report id,
//! not by key).

use hush_protocol::keys::KeySet;
use hush_server::ServerError;
use hush_server::keys::KeyStore;

use crate::store::Store;

/// The live keys, shared by the services that open ciphertexts.
pub type KeyManager = hush_server::keys::KeyManager<Store>;

impl KeyStore for Store {
    fn load_key_set(&self) -> Result<Option<KeySet>, ServerError> {
        hush_server::keys::load_from_tree(self.keys_tree())
    }

    fn save_key_set(&self, set: &KeySet) -> Result<(), ServerError> {
        hush_server::keys::save_to_tree(self.keys_tree(), self.db(), set)
    }
}
