//! The lifecycle of a receiver's HPKE keys: one current key, retired keys kept for a grace
//! period so reports sealed to them while in flight still open, then deleted.
//!
//! Shufflers and aggregators persist a [`KeySet`] in their own storage; this module only holds the
//! rules, so both behave the same.

use crate::codec::{Codec, DecodeError, Reader, Writer};
use crate::hpke::{HpkeConfig, HpkeKeypair, Keyring};
use crate::ids::Time;

/// One key with its history.
#[derive(Clone, Debug)]
pub struct KeyEntry {
    /// The key pair.
    pub keypair: HpkeKeypair,
    /// When it was generated.
    pub created: Time,
    /// When it stopped being current; `None` for the current key.
    pub retired: Option<Time>,
}

/// A receiver's keys: exactly one current key, then retired keys, newest first.
#[derive(Clone, Debug)]
pub struct KeySet {
    entries: Vec<KeyEntry>,
}

impl KeySet {
    /// A set holding one fresh key with config id 1.
    pub fn generate(now: Time) -> Self {
        Self {
            entries: vec![KeyEntry {
                keypair: HpkeKeypair::generate(1),
                created: now,
                retired: None,
            }],
        }
    }

    /// The current key.
    pub fn current(&self) -> &HpkeKeypair {
        &self.entries[0].keypair
    }

    /// All entries, current first.
    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// The keys that still open ciphertexts, current first.
    pub fn keyring(&self) -> Keyring {
        Keyring::new(self.entries.iter().map(|e| e.keypair.clone()).collect())
    }

    /// The public configs to publish, current first.
    pub fn configs(&self) -> Vec<HpkeConfig> {
        self.entries
            .iter()
            .map(|e| e.keypair.config().clone())
            .collect()
    }

    /// Makes a fresh key current and retires the previous one at `now`. The new config id is the
    /// next one after the current id (wrapping, skipping 0) not held by a retired key.
    pub fn rotate(&mut self, now: Time) -> Result<&HpkeConfig, KeySetError> {
        let in_use: Vec<u8> = self
            .entries
            .iter()
            .map(|e| e.keypair.config().id())
            .collect();
        let cur = self.current().config().id();
        let id = (1..=255u16)
            .map(|i| ((cur as u16 + i - 1) % 255 + 1) as u8)
            .find(|id| !in_use.contains(id))
            .ok_or(KeySetError::NoFreeId)?;
        self.entries[0].retired = Some(now);
        self.entries.insert(
            0,
            KeyEntry {
                keypair: HpkeKeypair::generate(id),
                created: now,
                retired: None,
            },
        );
        Ok(self.entries[0].keypair.config())
    }

    /// Whether the current key is at least `period_s` old (0: never), so a scheduled rotation
    /// is due.
    pub fn rotation_due(&self, now: Time, period_s: u64) -> bool {
        period_s > 0 && self.entries[0].created.add_secs(period_s) <= now
    }

    /// Deletes retired keys whose grace period has ended; returns their config ids.
    pub fn expire(&mut self, now: Time, grace_s: u64) -> Vec<u8> {
        let mut removed = Vec::new();
        self.entries.retain(|e| match e.retired {
            Some(r) if r.add_secs(grace_s) <= now => {
                removed.push(e.keypair.config().id());
                false
            }
            _ => true,
        });
        removed
    }
}

/// Errors changing a key set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeySetError {
    /// All 255 config ids are held by keys in their grace period.
    #[error(
        "all 255 HPKE config ids are in use by retired keys; wait for their grace period to end"
    )]
    NoFreeId,
}

impl Codec for KeySet {
    const NAME: &'static str = "KeySet";
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(1); // format version
        out.put_u16(self.entries.len() as u16);
        for e in &self.entries {
            e.keypair.encode(out);
            e.created.encode(out);
            e.retired.unwrap_or_default().encode(out);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        if r.u8("version")? != 1 {
            return Err(r.invalid("version", "unknown key set format"));
        }
        let n = r.u16("entries")?;
        let mut entries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let keypair = HpkeKeypair::decode(r)?;
            let created = Time::decode(r)?;
            let retired = Time::decode(r)?;
            entries.push(KeyEntry {
                keypair,
                created,
                retired: (retired.as_secs() != 0).then_some(retired),
            });
        }
        if entries.is_empty()
            || entries[0].retired.is_some()
            || entries[1..].iter().any(|e| e.retired.is_none())
        {
            return Err(r.invalid(
                "entries",
                "must hold one current key first, then retired keys",
            ));
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpke::{Label, seal};

    #[test]
    fn rotation_keeps_old_keys_for_the_grace_period() {
        let mut ks = KeySet::generate(Time::from_secs(100));
        let old = ks.current().config().clone();
        let ct = seal(&old, &Label::OnionLayer, b"in flight", b"").unwrap();
        let new = ks.rotate(Time::from_secs(200)).unwrap().clone();
        assert_eq!(new.id(), 2);
        assert_eq!(ks.configs(), vec![new.clone(), old.clone()]);
        assert_eq!(
            ks.keyring().open(&Label::OnionLayer, &ct, b"").unwrap(),
            b"in flight"
        );
        assert!(ks.expire(Time::from_secs(299), 100).is_empty());
        assert_eq!(ks.expire(Time::from_secs(300), 100), vec![1]);
        assert!(ks.keyring().open(&Label::OnionLayer, &ct, b"").is_err());
        let back = KeySet::from_bytes(&ks.to_bytes()).unwrap();
        assert_eq!(back.configs(), vec![new]);
    }

    #[test]
    fn a_rotation_is_due_once_the_current_key_is_a_period_old() {
        let mut ks = KeySet::generate(Time::from_secs(100));
        assert!(!ks.rotation_due(Time::from_secs(150), 100));
        assert!(ks.rotation_due(Time::from_secs(200), 100));
        assert!(
            !ks.rotation_due(Time::from_secs(10_000), 0),
            "0 never rotates"
        );
        ks.rotate(Time::from_secs(200)).unwrap();
        assert!(!ks.rotation_due(Time::from_secs(250), 100));
    }

    #[test]
    fn ids_wrap_and_skip_those_in_use() {
        let mut ks = KeySet::generate(Time::from_secs(1));
        for i in 0..254 {
            ks.rotate(Time::from_secs(2 + i)).unwrap();
        }
        assert_eq!(ks.entries().len(), 255);
        assert_eq!(
            ks.rotate(Time::from_secs(999)).unwrap_err(),
            KeySetError::NoFreeId
        );
        ks.expire(Time::from_secs(1_000_000), 10);
        assert_eq!(ks.entries().len(), 1);
        assert_eq!(ks.current().config().id(), 255);
        assert_eq!(ks.rotate(Time::from_secs(1_000_001)).unwrap().id(), 1);
    }
}
