//! The shuffler's TOML configuration. Secrets are never in the file; it names the environment
//! variables that hold them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hush_server::tls::{TlsFiles, TlsMaterial};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `hush shuffler --config FILE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShufflerConfig {
    /// This node's name: the hop name clients put in their routes.
    pub name: String,
    /// Address of the gRPC server.
    pub listen: SocketAddr,
    /// Directory of the sled database; created if missing.
    pub data_dir: PathBuf,
    /// Environment variable holding the admin bearer token.
    #[serde(default = "defaults::admin_token_env")]
    pub admin_token_env: String,
    /// How long a retired HPKE key still opens packets, in seconds.
    #[serde(default = "defaults::key_grace_period_s")]
    pub key_grace_period_s: u64,
    /// How often a fresh HPKE key is made current on schedule, in seconds (0: only on
    /// command). The retired key keeps opening for `key_grace_period_s`; with it go its replay
    /// tags (shufflers), so stored tags cover at most a period plus the grace period.
    #[serde(default = "defaults::key_rotation_period_s")]
    pub key_rotation_period_s: u64,
    /// sled page cache, in MiB.
    #[serde(default = "defaults::cache_mb")]
    pub cache_mb: u64,
    /// How often background maintenance (expiring keys and their replay tags, forgetting idle
    /// rate-limit buckets) runs, in seconds.
    #[serde(default = "defaults::maintenance_interval_s")]
    pub maintenance_interval_s: u64,
    /// When a batch leaves.
    #[serde(default)]
    pub mix: MixConfig,
    /// Overload protection.
    #[serde(default)]
    pub limits: LimitConfig,
    /// How batches are delivered.
    #[serde(default)]
    pub forward: ForwardConfig,
    /// The hops packets may name next: further shufflers or the leader.
    #[serde(default, rename = "next_hop")]
    pub next_hops: Vec<NextHopConfig>,
    /// Requests, streams and connections served at once.
    #[serde(default)]
    pub server: hush_server::serve::ServerLimits,
    /// The Prometheus endpoint (`[metrics] listen`); off by default.
    #[serde(default)]
    pub metrics: hush_server::metrics::MetricsConfig,
    /// Who may call which service, by certificate name (with TLS).
    #[serde(default)]
    pub peers: PeerConfig,
    /// Who submits packets to this node. With TLS, `"shufflers"` (the default) refuses
    /// connections without a client certificate from a trusted CA; the first shuffler of a
    /// cascade sets `"clients"`, whose services present none.
    #[serde(default)]
    pub ingest_from: IngestFrom,
    /// This node's certificate, key and trusted CAs. Without it the node speaks plaintext,
    /// which `hush shuffler` allows only with `--insecure`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

/// `[peers]`: the certificate names (common name, DNS or URI subject alternative name) allowed
/// on this node's services, with TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The previous shuffler(s), allowed on `Shuffler` when `ingest_from = "shufflers"`
    /// (required then): a valid certificate of another role is refused with PERMISSION_DENIED.
    #[serde(default)]
    pub previous: Vec<String>,
    /// Key directories allowed on `HpkeKeys`; empty: any certificate from a trusted CA.
    #[serde(default)]
    pub key_directories: Vec<String>,
}

/// Who submits packets to a shuffler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IngestFrom {
    /// The previous shuffler: mutual TLS.
    #[default]
    Shufflers,
    /// Services' client runtimes: server-authenticated TLS.
    Clients,
}

/// Batching, per next hop and task: a batch leaves when it holds `batch_size` packets of one
/// task, or when its oldest packet has waited `max_wait_ms` and it holds at least
/// `min_batch_size` packets of that task. A batch never mixes tasks and never leaves smaller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixConfig {
    /// k: packets of one task that make its batch leave at once.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u64,
    /// k_min: the fewest packets of one task a batch may leave with after the maximum wait:
    /// the anonymity set of every packet that leaves.
    #[serde(default = "defaults::min_batch_size")]
    pub min_batch_size: u64,
    /// The longest the oldest packet of a batch waits before the batch may leave with fewer
    /// than `batch_size` packets, in milliseconds.
    #[serde(default = "defaults::max_wait_ms")]
    pub max_wait_ms: u64,
}

impl Default for MixConfig {
    fn default() -> Self {
        Self {
            batch_size: defaults::batch_size(),
            min_batch_size: defaults::min_batch_size(),
            max_wait_ms: defaults::max_wait_ms(),
        }
    }
}

/// Limits that keep the node's memory and disk bounded under overload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Most packets in one request.
    #[serde(default = "defaults::max_request_packets")]
    pub max_request_packets: usize,
    /// The largest `packet_size` of a task this shuffler takes. Tasks with larger packets are
    /// refused; the request size limit is `max_request_packets` packets of this size, so an
    /// oversize request is refused before it is buffered.
    #[serde(default = "defaults::max_packet_size")]
    pub max_packet_size: usize,
    /// Most packets held (accepted, not yet acknowledged by the next hop). Past it, requests
    /// get RESOURCE_EXHAUSTED.
    #[serde(default = "defaults::max_buffered_packets")]
    pub max_buffered_packets: u64,
    /// Sustained packets per second one source address may submit.
    #[serde(default = "defaults::per_source_packets_per_s")]
    pub per_source_packets_per_s: u32,
    /// Packets a source may submit in a burst above the sustained rate; at least
    /// `max_request_packets`.
    #[serde(default = "defaults::per_source_burst")]
    pub per_source_burst: u32,
    /// Sustained packets per second of one tenant's tasks, from all sources together; past it
    /// that tenant's packets are refused (RESOURCE_EXHAUSTED for a request of only its packets,
    /// `OVER_QUOTA` per packet in a mixed one) and other tenants are unaffected.
    #[serde(default = "defaults::per_tenant_packets_per_s")]
    pub per_tenant_packets_per_s: u32,
    /// Burst above the tenant's sustained rate; at least `max_request_packets`.
    #[serde(default = "defaults::per_tenant_burst")]
    pub per_tenant_burst: u32,
    /// Most packets of one tenant's tasks held at once, so one tenant cannot fill
    /// `max_buffered_packets` for everyone; past it that tenant's packets are refused like over
    /// its rate. At least `max_request_packets`.
    #[serde(default = "defaults::per_tenant_max_buffered")]
    pub per_tenant_max_buffered: u64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            max_request_packets: defaults::max_request_packets(),
            max_packet_size: defaults::max_packet_size(),
            max_buffered_packets: defaults::max_buffered_packets(),
            per_source_packets_per_s: defaults::per_source_packets_per_s(),
            per_source_burst: defaults::per_source_burst(),
            per_tenant_packets_per_s: defaults::per_tenant_packets_per_s(),
            per_tenant_burst: defaults::per_tenant_burst(),
            per_tenant_max_buffered: defaults::per_tenant_max_buffered(),
        }
    }
}

/// Delivery of batches to the next hop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// Packets per request to the next hop. With the defaults a batch goes out in one request;
    /// a larger batch goes out in several, each a slice of the shuffled order.
    #[serde(default = "defaults::chunk_packets")]
    pub chunk_packets: usize,
    /// First retry delay after the next hop fails, in ms; doubles up to `retry_max_ms`.
    #[serde(default = "defaults::retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay, in ms.
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// Deadline of one request to the next hop, in ms.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            chunk_packets: defaults::chunk_packets(),
            retry_initial_ms: defaults::retry_initial_ms(),
            retry_max_ms: defaults::retry_max_ms(),
            timeout_ms: defaults::timeout_ms(),
        }
    }
}

/// What kind of server a next hop is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HopKind {
    /// Another shuffler: gets onion packets.
    Shuffler,
    /// The leader aggregator: gets reports.
    Leader,
}

/// A hop packets may be forwarded to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextHopConfig {
    /// The name onion layers use for it.
    pub name: String,
    /// Shuffler or leader.
    pub kind: HopKind,
    /// Its gRPC URL, e.g. `http://shuffler-b.example:7102`.
    pub url: String,
}

mod defaults {
    pub(super) fn admin_token_env() -> String {
        "HUSH_ADMIN_TOKEN".into()
    }
    pub(super) fn key_grace_period_s() -> u64 {
        86_400
    }
    pub(super) fn key_rotation_period_s() -> u64 {
        86_400
    }
    pub(super) fn cache_mb() -> u64 {
        128
    }
    pub(super) fn maintenance_interval_s() -> u64 {
        60
    }
    pub(super) fn batch_size() -> u64 {
        1_000
    }
    pub(super) fn min_batch_size() -> u64 {
        100
    }
    pub(super) fn max_wait_ms() -> u64 {
        30_000
    }
    pub(super) fn max_request_packets() -> usize {
        1_000
    }
    pub(super) fn max_packet_size() -> usize {
        8_192
    }
    pub(super) fn max_buffered_packets() -> u64 {
        100_000
    }
    pub(super) fn per_source_packets_per_s() -> u32 {
        20_000
    }
    pub(super) fn per_source_burst() -> u32 {
        40_000
    }
    pub(super) fn per_tenant_packets_per_s() -> u32 {
        50_000
    }
    pub(super) fn per_tenant_burst() -> u32 {
        100_000
    }
    pub(super) fn per_tenant_max_buffered() -> u64 {
        50_000
    }
    pub(super) fn chunk_packets() -> usize {
        1_000
    }
    pub(super) fn retry_initial_ms() -> u64 {
        100
    }
    pub(super) fn retry_max_ms() -> u64 {
        10_000
    }
    pub(super) fn timeout_ms() -> u64 {
        30_000
    }
}

impl ShufflerConfig {
    /// Reads and checks a config file; relative paths in it (`data_dir`, the `[tls]` files)
    /// are relative to its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("reading {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        hush_server::tls::resolve_server_paths(base, &mut c.data_dir, c.tls.as_mut())
            .map_err(Error::config)?;
        Ok(c)
    }

    /// Reads the `[tls]` files, if configured.
    pub fn tls_material(&self) -> Result<Option<TlsMaterial>> {
        self.tls
            .as_ref()
            .map(|f| f.read_with(|p| std::fs::read(p)))
            .transpose()
            .map_err(|e| Error::config(e.to_string()))
    }

    /// Parses and checks a config.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).map_err(|e| Error::config(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// Checks value ranges.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config(m));
        if self.name.is_empty() || self.name.len() > 255 {
            return bad("name must be 1 to 255 bytes".into());
        }
        let m = &self.mix;
        if m.batch_size == 0 || m.min_batch_size == 0 || m.min_batch_size > m.batch_size {
            return bad(format!(
                "mix.min_batch_size ({}) must be in 1..=mix.batch_size ({})",
                m.min_batch_size, m.batch_size
            ));
        }
        let l = &self.limits;
        if l.max_request_packets == 0 || l.per_source_packets_per_s == 0 {
            return bad(
                "limits.max_request_packets and per_source_packets_per_s must be positive".into(),
            );
        }
        if l.per_tenant_packets_per_s == 0 || (l.per_tenant_burst as usize) < l.max_request_packets
        {
            return Err(Error::config(format!(
                "limits.per_tenant_packets_per_s must be positive and limits.per_tenant_burst ({}) \
                 at least limits.max_request_packets ({})",
                l.per_tenant_burst, l.max_request_packets
            )));
        }
        if (l.per_source_burst as usize) < l.max_request_packets {
            return bad(format!(
                "limits.per_source_burst ({}) must be at least limits.max_request_packets ({}), \
                 or a full request could never pass",
                l.per_source_burst, l.max_request_packets
            ));
        }
        if l.per_tenant_max_buffered < l.max_request_packets as u64 {
            return bad(format!(
                "limits.per_tenant_max_buffered ({}) must be at least limits.max_request_packets ({})",
                l.per_tenant_max_buffered, l.max_request_packets
            ));
        }
        let sizes = hush_protocol::task::PACKET_SIZE_RANGE;
        if !sizes.contains(&u32::try_from(l.max_packet_size).unwrap_or(u32::MAX)) {
            return bad(format!(
                "limits.max_packet_size ({}) must be in {sizes:?}",
                l.max_packet_size
            ));
        }
        if let Err(e) = self.server.check() {
            return bad(e);
        }
        if l.max_buffered_packets < m.batch_size {
            return bad(format!(
                "limits.max_buffered_packets ({}) must be at least mix.batch_size ({})",
                l.max_buffered_packets, m.batch_size
            ));
        }
        // Batches are per task: a tenant that may hold fewer than k_min packets could never
        // complete one.
        if l.per_tenant_max_buffered < m.min_batch_size {
            return bad(format!(
                "limits.per_tenant_max_buffered ({}) must be at least mix.min_batch_size ({}): \
                 a task's batch leaves only with min_batch_size packets of that task",
                l.per_tenant_max_buffered, m.min_batch_size
            ));
        }
        let f = &self.forward;
        if f.chunk_packets == 0 || f.retry_initial_ms == 0 || f.retry_max_ms < f.retry_initial_ms {
            return bad("forward.chunk_packets and retry_initial_ms must be positive and retry_initial_ms at most retry_max_ms".into());
        }
        if self.next_hops.is_empty() {
            return bad(
                "at least one [[next_hop]] is needed: the next shuffler or the leader".into(),
            );
        }
        let mut names = BTreeSet::new();
        for h in &self.next_hops {
            if !names.insert(&h.name) {
                return bad(format!("next hop {:?} is listed twice", h.name));
            }
            if h.name.is_empty() || h.name.len() > 255 {
                return bad(format!("next hop name {:?} must be 1 to 255 bytes", h.name));
            }
            hush_protocol::link::check_scheme(
                &h.url,
                self.tls.is_some(),
                &format!("next hop {:?}: url", h.name),
            )
            .map_err(|e| Error::config(e.to_string()))?;
        }
        Ok(())
    }

    /// The largest request to this node: `max_request_packets` packets of at most
    /// `max_packet_size` bytes with their task ids.
    pub fn ingest_message_limit(&self) -> usize {
        hush_server::serve::message_limit(
            self.limits.max_request_packets,
            self.limits.max_packet_size + 32,
            1_024,
        )
    }

    /// The configured next hop called `name`, if any.
    pub fn next_hop(&self, name: &str) -> Option<&NextHopConfig> {
        self.next_hops.iter().find(|h| h.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "shuffler-a"
listen = "127.0.0.1:7101"
data_dir = "/tmp/a"
[[next_hop]]
name = "leader"
kind = "leader"
url = "http://127.0.0.1:7001"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = ShufflerConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.mix, MixConfig::default());
        assert_eq!(c.next_hop("leader").unwrap().kind, HopKind::Leader);
        assert!(c.next_hop("other").is_none());
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let e = ShufflerConfig::from_toml(&format!("{MINIMAL}typo = 1\n")).unwrap_err();
        assert!(e.to_string().contains("typo"), "{e}");
        let e = ShufflerConfig::from_toml(&format!(
            "{MINIMAL}[mix]\nbatch_size = 10\nmin_batch_size = 20\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("min_batch_size"), "{e}");
        let no_hops = MINIMAL.split("[[next_hop]]").next().unwrap();
        let e = ShufflerConfig::from_toml(no_hops).unwrap_err();
        assert!(e.to_string().contains("next_hop"), "{e}");
        let e = ShufflerConfig::from_toml(&format!("{MINIMAL}[limits]\nper_source_burst = 10\n"))
            .unwrap_err();
        assert!(e.to_string().contains("per_source_burst"), "{e}");
    }
}
