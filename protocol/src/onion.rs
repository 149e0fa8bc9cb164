//! Onion packets: one HPKE layer per shuffler hop around a report, every packet the same size.
//!
//! ```text
//! Packet (exactly `packet_size` bytes at every hop):
//!     u8     config_id            // the hop's HPKE config
//!     opaque enc[32]              // X25519 encapsulated key
//!     u32    ct_len
//!     opaque ct[ct_len]           // HPKE(LayerPlaintext), info = "hush/1 onion layer", AAD = task_id
//!     opaque fill[..]             // zeros up to packet_size
//!
//! LayerPlaintext:
//!     u8     next_hop_kind        // 1 = shuffler, 2 = leader
//!     opaque next_hop_name<1..255>
//!     opaque payload<0..2^32-1>   // the next hop's packet without its fill, or the report
//!     opaque padding[..]          // zeros; only the innermost layer has any
//! ```
//!
//! The client pads the innermost layer so the outermost packet is exactly `packet_size`. A hop
//! opens its layer, learns only the next hop's name, and fills the inner packet back up to
//! `packet_size` with zeros. Every packet at a given hop has the same layout, so neither sizes nor
//! fill reveal anything but the hop's position, which the hop knows anyway. Decoding is strict:
//! fill and padding must be zero and lengths must match exactly.
//!
//! The replay tag of a packet is SHA-256 over the version, the config id and the encapsulated key:
//! a fresh encapsulation per packet makes it unique, and a hop refuses a tag it has seen under the
//! same key.

use std::fmt;

use crate::VERSION;
use crate::codec::{DecodeError, Reader, Writer};
use crate::hpke::{
    self, AEAD_TAG_LEN, HpkeCiphertext, HpkeConfig, HpkeError, Keyring, Label, X25519_KEY_LEN,
};
use crate::ids::TaskId;

/// Bytes of a packet before its ciphertext: config id, encapsulated key, ciphertext length.
pub const PACKET_HEADER_LEN: usize = 1 + X25519_KEY_LEN + 4;

const KIND_SHUFFLER: u8 = 1;
const KIND_LEADER: u8 = 2;

/// Why a packet could not be made or peeled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OnionError {
    /// The packet is not the task's packet size.
    #[error("packet is {got} bytes; this task's packets are exactly {want} bytes")]
    WrongSize {
        /// Size received.
        got: usize,
        /// The task's packet size.
        want: usize,
    },
    /// The packet or its plaintext does not decode.
    #[error("malformed onion packet: {0}")]
    Malformed(#[from] DecodeError),
    /// The packet names an HPKE config id this hop does not hold.
    #[error(
        "packet is sealed to HPKE config {0}, which this hop does not hold (unknown or expired key)"
    )]
    UnknownKey(u8),
    /// The layer did not open: wrong key, wrong task, or tampering.
    #[error("onion layer did not open: wrong key, wrong task, or a tampered packet")]
    DecryptFailed,
    /// The report and the route's layers do not fit in the packet size.
    #[error(
        "report needs {need} bytes with {hops} onion layers, but the task's packet size is {packet_size}: \
         raise packet_size or use fewer buckets"
    )]
    TooLarge {
        /// Bytes needed.
        need: usize,
        /// Hops in the route.
        hops: usize,
        /// The task's packet size.
        packet_size: usize,
    },
    /// The route has no shuffler.
    #[error("a route needs at least one shuffler hop")]
    EmptyRoute,
    /// A hop name is empty or longer than 255 bytes.
    #[error("hop name {0:?} must be 1 to 255 bytes")]
    BadHopName(String),
    /// Sealing failed.
    #[error("sealing an onion layer failed: {0}")]
    Seal(HpkeError),
}

/// Where a peeled packet goes next.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// Another shuffler, by name.
    Shuffler(String),
    /// The leader aggregator, by name: the payload is a report.
    Leader(String),
}

impl NextHop {
    /// The hop's name.
    pub fn name(&self) -> &str {
        match self {
            NextHop::Shuffler(n) | NextHop::Leader(n) => n,
        }
    }

    fn encoded_len(&self) -> usize {
        2 + self.name().len()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            NextHop::Shuffler(_) => KIND_SHUFFLER,
            NextHop::Leader(_) => KIND_LEADER,
        };
        out.put_u8(kind);
        out.put_opaque_u8(self.name().as_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kind = r.u8("next_hop_kind")?;
        let name = r.opaque_u8("next_hop_name")?;
        if name.is_empty() {
            return Err(r.invalid("next_hop_name", "empty"));
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| r.invalid("next_hop_name", "not UTF-8"))?
            .to_owned();
        match kind {
            KIND_SHUFFLER => Ok(NextHop::Shuffler(name)),
            KIND_LEADER => Ok(NextHop::Leader(name)),
            k => Err(r.invalid("next_hop_kind", format!("unknown kind {k}"))),
        }
    }
}

impl fmt::Debug for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::Shuffler(n) => write!(f, "Shuffler({n})"),
            NextHop::Leader(n) => write!(f, "Leader({n})"),
        }
    }
}

/// One shuffler of a route: its name and HPKE config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The name other hops use for it.
    pub name: String,
    /// Its current HPKE config.
    pub config: HpkeConfig,
}

/// The path of a packet: shufflers in order, then the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    hops: Vec<Hop>,
    leader: String,
}

impl Route {
    /// A route through `hops` (first hop first) to the leader called `leader`.
    pub fn new(hops: Vec<Hop>, leader: impl Into<String>) -> Result<Self, OnionError> {
        let leader = leader.into();
        if hops.is_empty() {
            return Err(OnionError::EmptyRoute);
        }
        for name in hops.iter().map(|h| &h.name).chain(std::iter::once(&leader)) {
            if name.is_empty() || name.len() > 255 {
                return Err(OnionError::BadHopName(name.clone()));
            }
        }
        for h in &hops {
            h.config.validate().map_err(OnionError::Seal)?;
        }
        Ok(Self { hops, leader })
    }

    /// The shuffler hops, first first.
    pub fn hops(&self) -> &[Hop] {
        &self.hops
    }

    /// The leader's name.
    pub fn leader(&self) -> &str {
        &self.leader
    }

    /// The next hop named inside layer `i`.
    fn next_hop(&self, i: usize) -> NextHop {
        match self.hops.get(i + 1) {
            Some(h) => NextHop::Shuffler(h.name.clone()),
            None => NextHop::Leader(self.leader.clone()),
        }
    }

    /// Bytes the layers add around a report.
    pub fn overhead(&self) -> usize {
        (0..self.hops.len())
            .map(|i| PACKET_HEADER_LEN + AEAD_TAG_LEN + self.next_hop(i).encoded_len() + 4)
            .sum()
    }
}

/// Wraps `report` in one layer per hop of `route` and pads the result to exactly `packet_size`.
pub fn wrap(
    task_id: &TaskId,
    packet_size: usize,
    route: &Route,
    report: &[u8],
) -> Result<Vec<u8>, OnionError> {
    let need = route.overhead() + report.len();
    if need > packet_size {
        return Err(OnionError::TooLarge {
            need,
            hops: route.hops.len(),
            packet_size,
        });
    }
    let mut padding = packet_size - need;
    let mut payload = report.to_vec();
    for i in (0..route.hops.len()).rev() {
        let next = route.next_hop(i);
        let mut pt = Vec::with_capacity(next.encoded_len() + 4 + payload.len() + padding);
        next.encode(&mut pt);
        pt.put_opaque_u32(&payload);
        pt.resize(pt.len() + padding, 0);
        padding = 0;
        let ct = hpke::seal(
            &route.hops[i].config,
            &Label::OnionLayer,
            &pt,
            task_id.as_bytes(),
        )
        .map_err(OnionError::Seal)?;
        payload = encode_packet(&ct);
    }
    debug_assert_eq!(payload.len(), packet_size);
    Ok(payload)
}

fn encode_packet(ct: &HpkeCiphertext) -> Vec<u8> {
    let mut out = Vec::with_capacity(PACKET_HEADER_LEN + ct.payload().len());
    out.put_u8(ct.config_id());
    out.extend_from_slice(ct.encapsulated_key());
    out.put_opaque_u32(ct.payload());
    out
}

/// The header of a packet, readable without any key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// The HPKE config id the layer is sealed to.
    pub config_id: u8,
    /// SHA-256 over the version, the config id and the encapsulated key.
    pub replay_tag: [u8; 32],
}

fn parse_packet(
    packet: &[u8],
    packet_size: usize,
) -> Result<(HpkeCiphertext, [u8; 32]), OnionError> {
    if packet.len() != packet_size {
        return Err(OnionError::WrongSize {
            got: packet.len(),
            want: packet_size,
        });
    }
    let mut r = Reader::new("onion packet", packet);
    let config_id = r.u8("config_id")?;
    let enc = r.bytes("encapsulated_key", X25519_KEY_LEN)?;
    let ct = r.opaque_u32("ciphertext")?;
    if !all_zero(r.rest()) {
        return Err(DecodeError::InvalidValue {
            what: "onion packet",
            field: "fill",
            reason: "must be zero".into(),
        }
        .into());
    }
    let tag = replay_tag(config_id, enc);
    // Unwrap safety: lengths come from the packet, which fits in u32 by the size check upstream
    // (packet sizes are at most 1 MiB).
    let ct =
        HpkeCiphertext::new(config_id, enc.to_vec(), ct.to_vec()).map_err(OnionError::Malformed)?;
    Ok((ct, tag))
}

/// Whether every byte of `b` is zero. One OR over the whole slice, which the compiler turns into
/// vector instructions; a byte-wise `any` over a packet's kilobytes of fill costs a microsecond.
fn all_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, x| acc | x) == 0
}

fn replay_tag(config_id: u8, enc: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(VERSION.as_bytes());
    ctx.update(b" replay tag");
    ctx.update(&[config_id]);
    ctx.update(enc);
    let d = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Reads a packet's header (config id and replay tag) without opening it. Checks size and fill.
pub fn packet_header(packet: &[u8], packet_size: usize) -> Result<PacketHeader, OnionError> {
    let (ct, replay_tag) = parse_packet(packet, packet_size)?;
    Ok(PacketHeader {
        config_id: ct.config_id(),
        replay_tag,
    })
}

/// What a hop learns by peeling its layer.
#[derive(Clone, PartialEq, Eq)]
pub struct Peeled {
    /// Where the payload goes.
    pub next_hop: NextHop,
    /// For a shuffler: the next packet, filled to the packet size. For the leader: the report.
    pub payload: Vec<u8>,
    /// The packet's replay tag.
    pub replay_tag: [u8; 32],
    /// The config id the layer was sealed to.
    pub config_id: u8,
}

impl fmt::Debug for Peeled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peeled")
            .field("next_hop", &self.next_hop)
            .field("payload_len", &self.payload.len())
            .field("config_id", &self.config_id)
            .finish()
    }
}

/// Opens one layer of `packet` with the hop's keys.
pub fn peel(
    task_id: &TaskId,
    packet_size: usize,
    keys: &Keyring,
    packet: &[u8],
) -> Result<Peeled, OnionError> {
    let (ct, replay_tag) = parse_packet(packet, packet_size)?;
    let config_id = ct.config_id();
    let pt = keys
        .open(&Label::OnionLayer, &ct, task_id.as_bytes())
        .map_err(|e| match e {
            HpkeError::UnknownConfigId(id) => OnionError::UnknownKey(id),
            _ => OnionError::DecryptFailed,
        })?;
    let mut r = Reader::new("onion layer", &pt);
    let next_hop = NextHop::decode(&mut r)?;
    let payload = r.opaque_u32("payload")?;
    if !all_zero(r.rest()) {
        return Err(DecodeError::InvalidValue {
            what: "onion layer",
            field: "padding",
            reason: "must be zero".into(),
        }
        .into());
    }
    let payload = match next_hop {
        NextHop::Shuffler(_) => {
            if payload.len() < PACKET_HEADER_LEN || payload.len() > packet_size {
                return Err(DecodeError::InvalidValue {
                    what: "onion layer",
                    field: "payload",
                    reason: format!(
                        "inner packet of {} bytes does not fit {packet_size}",
                        payload.len()
                    ),
                }
                .into());
            }
            let mut p = Vec::with_capacity(packet_size);
            p.extend_from_slice(payload);
            p.resize(packet_size, 0);
            p
        }
        NextHop::Leader(_) => payload.to_vec(),
    };
    Ok(Peeled {
        next_hop,
        payload,
        replay_tag,
        config_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpke::HpkeKeypair;

    fn route(keys: &[HpkeKeypair]) -> Route {
        let hops = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Hop {
                name: format!("shuffler-{i}"),
                config: k.config().clone(),
            })
            .collect();
        Route::new(hops, "leader").unwrap()
    }

    #[test]
    fn wrap_then_peel_each_hop() {
        let keys: Vec<_> = (0..3).map(|i| HpkeKeypair::generate(i as u8 + 1)).collect();
        let r = route(&keys);
        let task = TaskId::random();
        let report = b"the report".to_vec();
        let mut packet = wrap(&task, 1024, &r, &report).unwrap();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(packet.len(), 1024, "hop {i}");
            let ring = Keyring::new(vec![k.clone()]);
            let p = peel(&task, 1024, &ring, &packet).unwrap();
            if i + 1 < keys.len() {
                assert_eq!(p.next_hop, NextHop::Shuffler(format!("shuffler-{}", i + 1)));
            } else {
                assert_eq!(p.next_hop, NextHop::Leader("leader".into()));
                assert_eq!(p.payload, report);
            }
            packet = p.payload;
        }
    }

    #[test]
    fn exact_fit_and_too_large() {
        let keys = [HpkeKeypair::generate(1)];
        let r = route(&keys);
        let task = TaskId::random();
        let fits = vec![7u8; 512 - r.overhead()];
        assert_eq!(wrap(&task, 512, &r, &fits).unwrap().len(), 512);
        let big = vec![7u8; 513 - r.overhead()];
        assert!(matches!(
            wrap(&task, 512, &r, &big),
            Err(OnionError::TooLarge { need: 513, .. })
        ));
    }

    #[test]
    fn wrong_task_wrong_key_wrong_size_fail() {
        let keys = [HpkeKeypair::generate(1), HpkeKeypair::generate(2)];
        let r = route(&keys);
        let task = TaskId::random();
        let packet = wrap(&task, 600, &r, b"x").unwrap();
        let ring0 = Keyring::new(vec![keys[0].clone()]);
        assert_eq!(
            peel(&TaskId::random(), 600, &ring0, &packet),
            Err(OnionError::DecryptFailed)
        );
        let ring1 = Keyring::new(vec![keys[1].clone()]);
        assert_eq!(
            peel(&task, 600, &ring1, &packet),
            Err(OnionError::UnknownKey(1))
        );
        let impostor = Keyring::new(vec![HpkeKeypair::generate(1)]);
        assert_eq!(
            peel(&task, 600, &impostor, &packet),
            Err(OnionError::DecryptFailed)
        );
        assert!(matches!(
            peel(&task, 601, &ring0, &packet),
            Err(OnionError::WrongSize { .. })
        ));
    }

    #[test]
    fn replay_tag_is_stable_and_unique() {
        let keys = [HpkeKeypair::generate(1)];
        let r = route(&keys);
        let task = TaskId::random();
        let a = wrap(&task, 600, &r, b"x").unwrap();
        let b = wrap(&task, 600, &r, b"x").unwrap();
        let ring = Keyring::new(vec![keys[0].clone()]);
        let pa = peel(&task, 600, &ring, &a).unwrap();
        assert_eq!(packet_header(&a, 600).unwrap().replay_tag, pa.replay_tag);
        assert_ne!(packet_header(&b, 600).unwrap().replay_tag, pa.replay_tag);
    }

    #[test]
    fn all_zero_sees_any_set_bit_anywhere() {
        assert!(all_zero(&[]));
        assert!(all_zero(&[0; 4000]));
        for at in [0, 1, 31, 32, 63, 64, 2047, 3999] {
            for bit in 0..8 {
                let mut b = vec![0u8; 4000];
                b[at] = 1 << bit;
                assert!(!all_zero(&b), "byte {at} bit {bit}");
            }
        }
    }

    #[test]
    fn nonzero_padding_inside_a_layer_is_refused() {
        let key = HpkeKeypair::generate(1);
        let task = TaskId::random();
        let ring = Keyring::new(vec![key.clone()]);
        let layer = |last: u8| {
            let mut pt = Vec::new();
            NextHop::Leader("leader".into()).encode(&mut pt);
            pt.put_opaque_u32(b"report");
            pt.resize(pt.len() + 300, 0);
            *pt.last_mut().unwrap() = last;
            let ct = hpke::seal(key.config(), &Label::OnionLayer, &pt, task.as_bytes()).unwrap();
            encode_packet(&ct)
        };
        let good = layer(0);
        assert_eq!(
            peel(&task, good.len(), &ring, &good).unwrap().payload,
            b"report"
        );
        let bad = layer(0x80);
        assert!(matches!(
            peel(&task, bad.len(), &ring, &bad),
            Err(OnionError::Malformed(_))
        ));
    }

    #[test]
    fn nonzero_fill_is_refused() {
        let keys = [HpkeKeypair::generate(1), HpkeKeypair::generate(2)];
        let r = route(&keys);
        let task = TaskId::random();
        let packet = wrap(&task, 600, &r, b"x").unwrap();
        let ring0 = Keyring::new(vec![keys[0].clone()]);
        let mut inner = peel(&task, 600, &ring0, &packet).unwrap().payload;
        *inner.last_mut().unwrap() = 1;
        let ring1 = Keyring::new(vec![keys[1].clone()]);
        assert!(matches!(
            peel(&task, 600, &ring1, &inner),
            Err(OnionError::Malformed(_))
        ));
    }
}
