//! The aggregator's HPKE keys: [`hush_server::keys::KeyManager`] over the `keys` tree of its
//! store. Retired keys leave nothing behind at an aggregator (replay protection is by report id,
//! not by key).

use hush_protocol::Codec;
use hush_protocol::keys::KeySet;
use hush_server::ServerError;
use hush_server::keys::KeyStore;

use crate::store::Store;

/// The live keys, shared by the services that open ciphertexts.
pub type KeyManager = hush_server::keys::KeyManager<Store>;

impl KeyStore for Store {
    fn load_key_set(&self) -> Result<Option<KeySet>, ServerError> {
        match self.keys_tree().get(b"keyset")? {
            Some(v) => Ok(Some(
                KeySet::from_bytes(&v).map_err(|e| ServerError::corrupt("key set", e))?,
            )),
            None => Ok(None),
        }
    }

    fn save_key_set(&self, set: &KeySet) -> Result<(), ServerError> {
        self.keys_tree().insert(b"keyset", set.to_bytes())?;
        self.db().flush()?;
        Ok(())
    }
}
