//! The aggregator's HPKE keys: [`hush_server::keys::KeyManager`] over the `keys` table of its
//! store. Retired keys leave nothing behind at an aggregator (replay protection is by report id,
//! not by key).

use hush_protocol::Codec;
use hush_protocol::keys::KeySet;
use hush_server::ServerError;
use hush_server::keys::KeyStore;

use crate::error::Error;
use crate::store::Store;
use crate::store::backend::{Backend, T};

/// The live keys, shared by the services that open ciphertexts.
pub type KeyManager = hush_server::keys::KeyManager<Store>;

const KEY_SET: &[u8] = b"keyset";

fn server_error(e: Error) -> ServerError {
    match e {
        Error::Server(s) => s,
        e => ServerError::Database(e.to_string()),
    }
}

impl KeyStore for Store {
    fn load_key_set(&self) -> Result<Option<KeySet>, ServerError> {
        match &self.backend {
            Backend::Sled(s) => hush_server::keys::load_from_tree(s.tree(T::Keys)),
            Backend::Pg(p) => p
                .blocking(|c| {
                    Box::pin(async move {
                        Ok(
                            c.query_opt(r#"SELECT value FROM "keys" WHERE key = $1"#, &[&KEY_SET])
                                .await?
                                .map(|r| r.get::<_, Vec<u8>>(0)),
                        )
                    })
                })
                .map_err(server_error)?
                .map(|v| KeySet::from_bytes(&v).map_err(|e| ServerError::corrupt("key set", e)))
                .transpose(),
        }
    }

    fn swap_key_set(&self, expected: Option<&KeySet>, next: &KeySet) -> Result<bool, ServerError> {
        let (old, new) = (expected.map(KeySet::to_bytes), next.to_bytes());
        match &self.backend {
            Backend::Sled(s) => {
                let swapped = s
                    .tree(T::Keys)
                    .compare_and_swap(KEY_SET, old, Some(new))?
                    .is_ok();
                if swapped {
                    s.db().flush()?;
                }
                Ok(swapped)
            }
            // One statement, so two replicas rotating at once cannot both win.
            Backend::Pg(p) => p
                .blocking(|c| {
                    Box::pin(async move {
                        let n = match old {
                            Some(old) => {
                                c.execute(
                                    r#"UPDATE "keys" SET value = $3 WHERE key = $1 AND value = $2"#,
                                    &[&KEY_SET, &old, &new],
                                )
                                .await?
                            }
                            None => {
                                c.execute(
                                    r#"INSERT INTO "keys" (key, value) VALUES ($1, $2)
                                       ON CONFLICT (key) DO NOTHING"#,
                                    &[&KEY_SET, &new],
                                )
                                .await?
                            }
                        };
                        Ok(n == 1)
                    })
                })
                .map_err(server_error),
        }
    }

    fn save_key_set(&self, set: &KeySet) -> Result<(), ServerError> {
        match &self.backend {
            Backend::Sled(s) => hush_server::keys::save_to_tree(s.tree(T::Keys), s.db(), set),
            Backend::Pg(p) => {
                let bytes = set.to_bytes();
                p.blocking(|c| {
                    Box::pin(async move {
                        c.execute(
                            r#"INSERT INTO "keys" (key, value) VALUES ($1, $2)
                               ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"#,
                            &[&KEY_SET, &bytes],
                        )
                        .await?;
                        Ok(())
                    })
                })
                .map_err(server_error)
            }
        }
    }
}
