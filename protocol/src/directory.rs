//! The key set a client seals to, as a tenant's key directory serves it.
//!
//! A client must never learn a party's HPKE key from that party: a leader that answered each
//! client with a key (or config id) of its own could recognize every report that leaves the
//! mixnet as that client's. Instead, the tenant's results service acts as the key directory: at
//! the start of each epoch it fetches every party's current config over mutual TLS, freezes them
//! into one [`KeySet`], and serves that same set to every client of the tenant for the whole
//! epoch. A client may also be deployed with a key set pinned in its configuration.
//!
//! The set's [`KeySet::digest`] names it: two clients (or an auditor) comparing digests of the
//! same epoch see at once whether they were served the same keys.

use serde::{Deserialize, Serialize};

use crate::convert::ProtoError;
use crate::hpke::HpkeConfig;
use crate::ids::Time;
use crate::onion::{Hop, OnionError, Route};
use crate::proto::v1 as pb;

/// One epoch's keys of every party on a tenant's route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySet {
    /// The version: `epoch_start / epoch_s`.
    pub epoch: u64,
    /// When the epoch began.
    pub epoch_start: Time,
    /// The epoch's length in seconds.
    pub epoch_s: u64,
    /// Each shuffler's name and current config, in route order (packets go to the first).
    pub shufflers: Vec<(String, HpkeConfig)>,
    /// The leader's route name and current config.
    pub leader: (String, HpkeConfig),
    /// The helper's current config.
    pub helper: HpkeConfig,
}

impl KeySet {
    /// The onion route through the shufflers to the leader, sealed to these keys.
    pub fn route(&self) -> Result<Route, OnionError> {
        Route::new(
            self.shufflers
                .iter()
                .map(|(name, config)| Hop {
                    name: name.clone(),
                    config: config.clone(),
                })
                .collect(),
            self.leader.0.clone(),
        )
    }

    /// SHA-256 over the set's protobuf encoding: equal digests, equal keys.
    pub fn digest(&self) -> [u8; 32] {
        use prost::Message;
        let bytes = pb::KeySet::from(self).encode_to_vec();
        let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// The first 8 bytes of the digest in hex, for logs.
    pub fn short_digest(&self) -> String {
        hex::encode(&self.digest()[..8])
    }
}

impl From<&KeySet> for pb::KeySet {
    fn from(k: &KeySet) -> Self {
        let named = |(name, config): &(String, HpkeConfig)| pb::NamedHpkeConfig {
            name: name.clone(),
            config: Some(config.into()),
        };
        pb::KeySet {
            epoch: k.epoch,
            epoch_start: k.epoch_start.as_secs(),
            epoch_s: k.epoch_s,
            shufflers: k.shufflers.iter().map(named).collect(),
            leader: Some(named(&k.leader)),
            helper: Some((&k.helper).into()),
        }
    }
}

impl TryFrom<&pb::KeySet> for KeySet {
    type Error = ProtoError;
    fn try_from(p: &pb::KeySet) -> Result<Self, ProtoError> {
        const M: &str = "KeySet";
        let named = |n: &pb::NamedHpkeConfig, field| -> Result<(String, HpkeConfig), ProtoError> {
            let config = n
                .config
                .as_ref()
                .ok_or_else(|| ProtoError::new(M, field, "a config is missing"))?;
            Ok((n.name.clone(), HpkeConfig::try_from(config)?))
        };
        if p.epoch_s == 0 {
            return Err(ProtoError::new(M, "epoch_s", "must be positive"));
        }
        if p.shufflers.is_empty() {
            return Err(ProtoError::new(M, "shufflers", "a route needs a shuffler"));
        }
        let k = KeySet {
            epoch: p.epoch,
            epoch_start: Time::from_secs(p.epoch_start),
            epoch_s: p.epoch_s,
            shufflers: p
                .shufflers
                .iter()
                .map(|n| named(n, "shufflers"))
                .collect::<Result<_, _>>()?,
            leader: named(
                p.leader
                    .as_ref()
                    .ok_or_else(|| ProtoError::new(M, "leader", "missing"))?,
                "leader",
            )?,
            helper: HpkeConfig::try_from(
                p.helper
                    .as_ref()
                    .ok_or_else(|| ProtoError::new(M, "helper", "missing"))?,
            )?,
        };
        k.route()
            .map_err(|e| ProtoError::new(M, "shufflers", e.to_string()))?;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpke::HpkeKeypair;

    fn set() -> KeySet {
        KeySet {
            epoch: 3,
            epoch_start: Time::from_secs(1_800),
            epoch_s: 600,
            shufflers: vec![
                (
                    "shuffler-a".into(),
                    HpkeKeypair::generate(1).config().clone(),
                ),
                (
                    "shuffler-b".into(),
                    HpkeKeypair::generate(2).config().clone(),
                ),
            ],
            leader: ("leader".into(), HpkeKeypair::generate(3).config().clone()),
            helper: HpkeKeypair::generate(4).config().clone(),
        }
    }

    #[test]
    fn round_trips_and_names_itself_by_digest() {
        let k = set();
        let back = KeySet::try_from(&pb::KeySet::from(&k)).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.digest(), k.digest());
        let mut other = k.clone();
        other.leader.1 = HpkeKeypair::generate(3).config().clone();
        assert_ne!(
            other.digest(),
            k.digest(),
            "one different key, another digest"
        );
        assert_eq!(k.route().unwrap().hops().len(), 2);
        let text = toml::to_string(&k).unwrap();
        assert_eq!(toml::from_str::<KeySet>(&text).unwrap(), k);
    }

    #[test]
    fn incomplete_sets_are_refused() {
        let mut p = pb::KeySet::from(&set());
        p.shufflers.clear();
        assert!(KeySet::try_from(&p).is_err());
        let mut p = pb::KeySet::from(&set());
        p.helper = None;
        assert!(KeySet::try_from(&p).is_err());
        let mut p = pb::KeySet::from(&set());
        p.epoch_s = 0;
        assert!(KeySet::try_from(&p).is_err());
    }
}
