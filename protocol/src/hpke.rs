//! HPKE (RFC 9180) envelopes: configs with ids, key pairs, seal and open.
//!
//! hush uses one suite, DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + AES-128-GCM, through the
//! `hpke` crate; configs carry the code points so a receiver can refuse what it does not support
//! (the code points stay open: an unknown value decodes and is reported, as in RFC 9180's
//! registries). Each config has a one-byte id so receivers can rotate keys while reports sealed to
//! a retired key are still in flight.
//!
//! Every use of HPKE in hush has its own `info` string ([`Label`]) that names the protocol version
//! and the sender and receiver roles, so a ciphertext made for one purpose never opens as another.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hpke::aead::AesGcm128;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::VERSION;
use crate::codec::{Codec, DecodeError, Reader, Writer};

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = AesGcm128;

/// Errors sealing or opening an HPKE envelope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HpkeError {
    /// The config names algorithms hush does not implement.
    #[error(
        "unsupported HPKE suite kem={kem:#06x} kdf={kdf:#06x} aead={aead:#06x}: hush supports only \
         DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM"
    )]
    UnsupportedSuite {
        /// KEM code point.
        kem: u16,
        /// KDF code point.
        kdf: u16,
        /// AEAD code point.
        aead: u16,
    },
    /// A public or private key has the wrong length or form.
    #[error("invalid HPKE {which} key: {reason}")]
    InvalidKey {
        /// "public" or "private".
        which: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The ciphertext names a config id the receiver does not hold.
    #[error("no HPKE key with config id {0}: the sender used an unknown or expired key")]
    UnknownConfigId(u8),
    /// Authentication failed: wrong key, wrong info/AAD, or tampered ciphertext.
    #[error("HPKE open failed: wrong key, wrong context, or a tampered ciphertext")]
    OpenFailed,
    /// Sealing failed inside the HPKE library.
    #[error("HPKE seal failed: {0}")]
    SealFailed(String),
}

/// An HPKE KEM code point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KemId {
    /// DHKEM(X25519, HKDF-SHA256), 0x0020.
    X25519HkdfSha256,
    /// A code point hush does not know.
    Unknown(u16),
}

/// An HPKE KDF code point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KdfId {
    /// HKDF-SHA256, 0x0001.
    HkdfSha256,
    /// A code point hush does not know.
    Unknown(u16),
}

/// An HPKE AEAD code point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AeadId {
    /// AES-128-GCM, 0x0001.
    Aes128Gcm,
    /// A code point hush does not know.
    Unknown(u16),
}

macro_rules! code_point {
    ($t:ident, $known:ident, $v:expr) => {
        impl From<u16> for $t {
            fn from(v: u16) -> Self {
                if v == $v {
                    Self::$known
                } else {
                    Self::Unknown(v)
                }
            }
        }
        impl From<$t> for u16 {
            fn from(v: $t) -> u16 {
                match v {
                    $t::$known => $v,
                    $t::Unknown(x) => x,
                }
            }
        }
    };
}
code_point!(KemId, X25519HkdfSha256, 0x0020);
code_point!(KdfId, HkdfSha256, 0x0001);
code_point!(AeadId, Aes128Gcm, 0x0001);

/// Length of an X25519 public key and encapsulated key.
pub const X25519_KEY_LEN: usize = 32;
/// Length of the AES-128-GCM tag added by sealing.
pub const AEAD_TAG_LEN: usize = 16;

/// A receiver's public HPKE configuration.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HpkeConfig {
    id: u8,
    kem: KemId,
    kdf: KdfId,
    aead: AeadId,
    public_key: Vec<u8>,
}

impl HpkeConfig {
    /// A config; checks only that the public key fits the encoding.
    pub fn new(
        id: u8,
        kem: KemId,
        kdf: KdfId,
        aead: AeadId,
        public_key: Vec<u8>,
    ) -> Result<Self, HpkeError> {
        if public_key.is_empty() || public_key.len() > u16::MAX as usize {
            return Err(HpkeError::InvalidKey {
                which: "public",
                reason: format!("length {} is not in 1..=65535", public_key.len()),
            });
        }
        Ok(Self {
            id,
            kem,
            kdf,
            aead,
            public_key,
        })
    }

    /// The config id.
    pub fn id(&self) -> u8 {
        self.id
    }
    /// The KEM.
    pub fn kem(&self) -> KemId {
        self.kem
    }
    /// The KDF.
    pub fn kdf(&self) -> KdfId {
        self.kdf
    }
    /// The AEAD.
    pub fn aead(&self) -> AeadId {
        self.aead
    }
    /// The encoded public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    fn check_suite(&self) -> Result<(), HpkeError> {
        if self.kem == KemId::X25519HkdfSha256
            && self.kdf == KdfId::HkdfSha256
            && self.aead == AeadId::Aes128Gcm
        {
            Ok(())
        } else {
            Err(HpkeError::UnsupportedSuite {
                kem: self.kem.into(),
                kdf: self.kdf.into(),
                aead: self.aead.into(),
            })
        }
    }

    fn kem_public_key(&self) -> Result<<Kem as hpke::Kem>::PublicKey, HpkeError> {
        self.check_suite()?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&self.public_key).map_err(|e| {
            HpkeError::InvalidKey {
                which: "public",
                reason: e.to_string(),
            }
        })
    }

    /// Checks that hush can seal to this config.
    pub fn validate(&self) -> Result<(), HpkeError> {
        self.kem_public_key().map(|_| ())
    }
}

impl fmt::Debug for HpkeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HpkeConfig")
            .field("id", &self.id)
            .field("kem", &self.kem)
            .field("kdf", &self.kdf)
            .field("aead", &self.aead)
            .field("public_key", &URL_SAFE_NO_PAD.encode(&self.public_key))
            .finish()
    }
}

impl Codec for HpkeConfig {
    const NAME: &'static str = "HpkeConfig";
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.id);
        out.put_u16(self.kem.into());
        out.put_u16(self.kdf.into());
        out.put_u16(self.aead.into());
        out.put_opaque_u16(&self.public_key);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = r.u8("id")?;
        let kem = r.u16("kem_id")?.into();
        let kdf = r.u16("kdf_id")?.into();
        let aead = r.u16("aead_id")?.into();
        let public_key = r.opaque_u16("public_key")?;
        if public_key.is_empty() {
            return Err(r.invalid("public_key", "empty"));
        }
        Ok(Self {
            id,
            kem,
            kdf,
            aead,
            public_key: public_key.to_vec(),
        })
    }
}

/// Configs appear in TOML files as the base64url of their binary encoding.
impl Serialize for HpkeConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl<'de> Deserialize<'de> for HpkeConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let b = URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|e| serde::de::Error::custom(format!("HPKE config is not base64url: {e}")))?;
        HpkeConfig::from_bytes(&b).map_err(serde::de::Error::custom)
    }
}

/// An HPKE config with its private key. `Debug` never shows the private key, and the key bytes
/// are wiped on drop.
#[derive(Clone)]
pub struct HpkeKeypair {
    config: HpkeConfig,
    private_key: Zeroizing<Vec<u8>>,
}

impl HpkeKeypair {
    /// Generates a fresh X25519 key pair with the given config id, from the OS CSPRNG.
    pub fn generate(id: u8) -> Self {
        let (sk, pk) = Kem::gen_keypair(&mut rand::rng());
        Self {
            config: HpkeConfig {
                id,
                kem: KemId::X25519HkdfSha256,
                kdf: KdfId::HkdfSha256,
                aead: AeadId::Aes128Gcm,
                public_key: pk.to_bytes().to_vec(),
            },
            private_key: Zeroizing::new(sk.to_bytes().to_vec()),
        }
    }

    /// A key pair from its parts; checks the private key matches the config's suite.
    pub fn new(config: HpkeConfig, private_key: Vec<u8>) -> Result<Self, HpkeError> {
        let private_key = Zeroizing::new(private_key);
        config.kem_public_key()?;
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&private_key).map_err(|e| {
            HpkeError::InvalidKey {
                which: "private",
                reason: e.to_string(),
            }
        })?;
        let derived = Kem::sk_to_pk(&sk);
        if derived.to_bytes().as_slice() != config.public_key.as_slice() {
            return Err(HpkeError::InvalidKey {
                which: "private",
                reason: "does not match the config's public key".into(),
            });
        }
        Ok(Self {
            config,
            private_key,
        })
    }

    /// The public config.
    pub fn config(&self) -> &HpkeConfig {
        &self.config
    }

    /// The private key bytes, for storage.
    pub fn private_key(&self) -> &[u8] {
        &self.private_key
    }

    /// Opens `ct`, which must name this key's config id.
    pub fn open(
        &self,
        label: &Label,
        ct: &HpkeCiphertext,
        aad: &[u8],
    ) -> Result<Vec<u8>, HpkeError> {
        if ct.config_id != self.config.id {
            return Err(HpkeError::UnknownConfigId(ct.config_id));
        }
        self.config.check_suite()?;
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&self.private_key).map_err(|e| {
            HpkeError::InvalidKey {
                which: "private",
                reason: e.to_string(),
            }
        })?;
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&ct.encapsulated_key)
            .map_err(|_| HpkeError::OpenFailed)?;
        hpke::single_shot_open::<Aead, Kdf, Kem>(
            &OpModeR::Base,
            &sk,
            &enc,
            &label.info(),
            &ct.payload,
            aad,
        )
        .map_err(|_| HpkeError::OpenFailed)
    }
}

impl fmt::Debug for HpkeKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HpkeKeypair")
            .field("config", &self.config)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl Codec for HpkeKeypair {
    const NAME: &'static str = "HpkeKeypair";
    fn encode(&self, out: &mut Vec<u8>) {
        self.config.encode(out);
        out.put_opaque_u16(&self.private_key);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let config = HpkeConfig::decode(r)?;
        let sk = r.opaque_u16("private_key")?.to_vec();
        HpkeKeypair::new(config, sk).map_err(|e| r.invalid("private_key", e.to_string()))
    }
}

/// The current key and the retired keys still inside their grace period. Opening picks the key by
/// the ciphertext's config id.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    keys: Vec<HpkeKeypair>,
}

impl Keyring {
    /// A keyring; the first key is the current one.
    pub fn new(keys: Vec<HpkeKeypair>) -> Self {
        Self { keys }
    }

    /// The key pairs, current first.
    pub fn keys(&self) -> &[HpkeKeypair] {
        &self.keys
    }

    /// The public configs, current first.
    pub fn configs(&self) -> Vec<HpkeConfig> {
        self.keys.iter().map(|k| k.config.clone()).collect()
    }

    /// The key with this config id.
    pub fn get(&self, id: u8) -> Option<&HpkeKeypair> {
        self.keys.iter().find(|k| k.config.id == id)
    }

    /// Opens with the key the ciphertext names.
    pub fn open(
        &self,
        label: &Label,
        ct: &HpkeCiphertext,
        aad: &[u8],
    ) -> Result<Vec<u8>, HpkeError> {
        self.get(ct.config_id)
            .ok_or(HpkeError::UnknownConfigId(ct.config_id))?
            .open(label, ct, aad)
    }
}

/// An HPKE ciphertext: the config id it was sealed to, the encapsulated key and the payload.
#[derive(Clone, PartialEq, Eq)]
pub struct HpkeCiphertext {
    config_id: u8,
    encapsulated_key: Vec<u8>,
    payload: Vec<u8>,
}

impl HpkeCiphertext {
    /// A ciphertext from its parts.
    pub fn new(
        config_id: u8,
        encapsulated_key: Vec<u8>,
        payload: Vec<u8>,
    ) -> Result<Self, DecodeError> {
        if encapsulated_key.len() > u16::MAX as usize {
            return Err(DecodeError::InvalidValue {
                what: "HpkeCiphertext",
                field: "encapsulated_key",
                reason: "longer than 65535 bytes".into(),
            });
        }
        if payload.len() > u32::MAX as usize {
            return Err(DecodeError::InvalidValue {
                what: "HpkeCiphertext",
                field: "payload",
                reason: "longer than 2^32-1 bytes".into(),
            });
        }
        Ok(Self {
            config_id,
            encapsulated_key,
            payload,
        })
    }
    /// The receiver's config id.
    pub fn config_id(&self) -> u8 {
        self.config_id
    }
    /// The encapsulated key.
    pub fn encapsulated_key(&self) -> &[u8] {
        &self.encapsulated_key
    }
    /// The AEAD ciphertext.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl fmt::Debug for HpkeCiphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HpkeCiphertext")
            .field("config_id", &self.config_id)
            .field("encapsulated_key_len", &self.encapsulated_key.len())
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Codec for HpkeCiphertext {
    const NAME: &'static str = "HpkeCiphertext";
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.config_id);
        out.put_opaque_u16(&self.encapsulated_key);
        out.put_opaque_u32(&self.payload);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            config_id: r.u8("config_id")?,
            encapsulated_key: r.opaque_u16("encapsulated_key")?.to_vec(),
            payload: r.opaque_u32("payload")?.to_vec(),
        })
    }
}

/// One of the two aggregators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The leader: receives reports, drives aggregation and collection.
    Leader,
    /// The helper: verifies with the leader, never talks to clients.
    Helper,
}

impl Role {
    /// The Prio3 aggregator id: 0 for the leader, 1 for the helper.
    pub fn agg_id(self) -> usize {
        match self {
            Role::Leader => 0,
            Role::Helper => 1,
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Leader => 2,
            Role::Helper => 3,
        }
    }

    /// "leader" or "helper".
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Helper => "helper",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "leader" => Ok(Role::Leader),
            "helper" => Ok(Role::Helper),
            other => Err(format!(
                "unknown role {other:?}: expected \"leader\" or \"helper\""
            )),
        }
    }
}

const CLIENT_CODE: u8 = 1;
const COLLECTOR_CODE: u8 = 4;

/// The purpose of an HPKE envelope; becomes its `info` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// A client's input share for an aggregator.
    InputShare(Role),
    /// One onion layer for a shuffler.
    OnionLayer,
    /// An aggregator's noisy aggregate share for the collector.
    AggregateShare(Role),
}

impl Label {
    /// The HPKE info string: version, purpose, sender and receiver.
    pub fn info(&self) -> Vec<u8> {
        let (purpose, from, to): (&[u8], u8, u8) = match self {
            Label::InputShare(r) => (b"input share", CLIENT_CODE, r.code()),
            Label::OnionLayer => (b"onion layer", CLIENT_CODE, 0),
            Label::AggregateShare(r) => (b"aggregate share", r.code(), COLLECTOR_CODE),
        };
        let mut info = Vec::with_capacity(VERSION.len() + purpose.len() + 4);
        info.extend_from_slice(VERSION.as_bytes());
        info.push(b' ');
        info.extend_from_slice(purpose);
        info.push(from);
        info.push(to);
        info
    }
}

/// Seals `plaintext` to `config` for `label`, binding `aad`.
pub fn seal(
    config: &HpkeConfig,
    label: &Label,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<HpkeCiphertext, HpkeError> {
    let pk = config.kem_public_key()?;
    let (enc, payload) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
        &OpModeS::Base,
        &pk,
        &label.info(),
        plaintext,
        aad,
        &mut rand::rng(),
    )
    .map_err(|e| HpkeError::SealFailed(e.to_string()))?;
    Ok(HpkeCiphertext {
        config_id: config.id,
        encapsulated_key: enc.to_bytes().to_vec(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open() {
        let kp = HpkeKeypair::generate(7);
        let ct = seal(kp.config(), &Label::OnionLayer, b"hello", b"aad").unwrap();
        assert_eq!(ct.config_id(), 7);
        assert_eq!(ct.encapsulated_key().len(), X25519_KEY_LEN);
        assert_eq!(ct.payload().len(), 5 + AEAD_TAG_LEN);
        assert_eq!(kp.open(&Label::OnionLayer, &ct, b"aad").unwrap(), b"hello");
    }

    #[test]
    fn wrong_label_aad_or_key_fails() {
        let kp = HpkeKeypair::generate(1);
        let other = HpkeKeypair::generate(1);
        let ct = seal(kp.config(), &Label::InputShare(Role::Leader), b"x", b"aad").unwrap();
        assert_eq!(
            kp.open(&Label::InputShare(Role::Helper), &ct, b"aad"),
            Err(HpkeError::OpenFailed)
        );
        assert_eq!(
            kp.open(&Label::InputShare(Role::Leader), &ct, b"aad2"),
            Err(HpkeError::OpenFailed)
        );
        assert_eq!(
            other.open(&Label::InputShare(Role::Leader), &ct, b"aad"),
            Err(HpkeError::OpenFailed)
        );
    }

    #[test]
    fn keyring_picks_key_by_id() {
        let old = HpkeKeypair::generate(1);
        let new = HpkeKeypair::generate(2);
        let ring = Keyring::new(vec![new.clone(), old.clone()]);
        let ct = seal(old.config(), &Label::OnionLayer, b"in flight", b"").unwrap();
        assert_eq!(
            ring.open(&Label::OnionLayer, &ct, b"").unwrap(),
            b"in flight"
        );
        let ring = Keyring::new(vec![new]);
        assert_eq!(
            ring.open(&Label::OnionLayer, &ct, b""),
            Err(HpkeError::UnknownConfigId(1))
        );
    }

    #[test]
    fn unknown_suite_is_refused_with_its_code_points() {
        let cfg = HpkeConfig::new(
            1,
            KemId::Unknown(0x10),
            KdfId::HkdfSha256,
            AeadId::Aes128Gcm,
            vec![1; 65],
        )
        .unwrap();
        let err = seal(&cfg, &Label::OnionLayer, b"", b"").unwrap_err();
        assert!(
            matches!(err, HpkeError::UnsupportedSuite { kem: 0x10, .. }),
            "{err}"
        );
        // Unknown code points survive a round trip.
        assert_eq!(HpkeConfig::from_bytes(&cfg.to_bytes()).unwrap(), cfg);
    }

    #[test]
    fn keypair_round_trips_and_debug_hides_the_secret() {
        let kp = HpkeKeypair::generate(3);
        let back = HpkeKeypair::from_bytes(&kp.to_bytes()).unwrap();
        assert_eq!(back.config(), kp.config());
        let dbg = format!("{kp:?}");
        assert!(dbg.contains("redacted"));
        assert!(!dbg.contains(&hex::encode(kp.private_key())));
        // A private key that does not match the public key is refused.
        let other = HpkeKeypair::generate(3);
        assert!(HpkeKeypair::new(kp.config().clone(), other.private_key().to_vec()).is_err());
    }

    #[test]
    fn config_serde_is_base64url_of_the_encoding() {
        let kp = HpkeKeypair::generate(9);
        #[derive(Serialize, Deserialize)]
        struct W {
            c: HpkeConfig,
        }
        let s = toml::to_string(&W {
            c: kp.config().clone(),
        })
        .unwrap();
        let back: W = toml::from_str(&s).unwrap();
        assert_eq!(&back.c, kp.config());
    }
}
