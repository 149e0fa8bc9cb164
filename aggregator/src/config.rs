//! The aggregator's configuration file (TOML). Unknown fields are errors; secrets never appear in
//! the file, only the names of the environment variables that hold them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hush_server::tls::{TlsFiles, TlsMaterial};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `hush aggregator --config FILE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Address of the gRPC server (all services of the role).
    pub listen: SocketAddr,
    /// Directory of the sled database; created if missing (unused with `[store] kind =
    /// "postgres"`).
    pub data_dir: PathBuf,
    /// Where the state lives: sled in `data_dir` (default) or PostgreSQL.
    #[serde(default)]
    pub store: StoreConfig,
    /// Environment variable holding the admin bearer token.
    #[serde(default = "defaults::admin_token_env")]
    pub admin_token_env: String,
    /// Environment variable holding the bearer token the leader presents to the helper.
    #[serde(default = "defaults::peer_token_env")]
    pub peer_token_env: String,
    /// Reports up to this many seconds in the future are accepted.
    #[serde(default = "defaults::clock_skew_s")]
    pub clock_skew_s: u64,
    /// How long a retired HPKE key still opens reports, in seconds.
    #[serde(default = "defaults::key_grace_period_s")]
    pub key_grace_period_s: u64,
    /// How often a fresh HPKE key is made current on schedule, in seconds (0: only on
    /// command). The retired key keeps opening for `key_grace_period_s`; with it go its replay
    /// tags (shufflers), so stored tags cover at most a period plus the grace period.
    #[serde(default = "defaults::key_rotation_period_s")]
    pub key_rotation_period_s: u64,
    /// Most reports in one ingest request or aggregation job request.
    #[serde(default = "defaults::max_request_reports")]
    pub max_request_reports: usize,
    /// The largest `packet_size` of a task this aggregator takes (a report is never larger than
    /// its packet). Tasks with larger packets are refused; request size limits follow from it
    /// and `max_request_reports`, so an oversize request is refused before it is buffered.
    #[serde(default = "defaults::max_packet_size")]
    pub max_packet_size: usize,
    /// Requests, streams and connections served at once.
    #[serde(default)]
    pub server: hush_server::serve::ServerLimits,
    /// The Prometheus endpoint (`[metrics] listen`); off by default.
    #[serde(default)]
    pub metrics: hush_server::metrics::MetricsConfig,
    /// sled page cache, in MiB.
    #[serde(default = "defaults::cache_mb")]
    pub cache_mb: u64,
    /// How often background maintenance (expiring report ids and keys) runs, in seconds.
    #[serde(default = "defaults::maintenance_interval_s")]
    pub maintenance_interval_s: u64,
    /// How long the helper keeps the answer of a finished aggregation job for retries, in
    /// seconds. The leader's config holds the helper's value: it never resends a job older than
    /// 90% of it (the helper may have forgotten it) and gives the job up visibly instead, so
    /// both operators must set the same value.
    #[serde(default = "defaults::helper_job_retention_s")]
    pub helper_job_retention_s: u64,
    /// Settings only the leader uses.
    #[serde(default)]
    pub leader: Option<LeaderConfig>,
    /// Who may call which service, by certificate name (with TLS).
    #[serde(default)]
    pub peers: PeerConfig,
    /// This aggregator's certificate, key and trusted CAs. Without it the aggregator speaks
    /// plaintext, which `hush leader|helper` allow only with `--insecure`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
}

/// `[store]`: the database. sled (the default) is embedded and allows one process per
/// `data_dir`; PostgreSQL lets several replicas of one role share a database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sled` or `postgres`.
    #[serde(default)]
    pub kind: StoreKind,
    /// Environment variable holding the PostgreSQL URL,
    /// `postgres://user:password@host:port/database` (it may hold a password, so it is never in
    /// the file).
    #[serde(default = "defaults::database_url_env")]
    pub url_env: String,
    /// The schema of the tables, created if missing: give a leader and a helper that share a
    /// server (tests, a trial) different schemas.
    #[serde(default = "defaults::schema")]
    pub schema: String,
    /// Connections to keep open.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            url_env: defaults::database_url_env(),
            schema: defaults::schema(),
            pool_size: defaults::pool_size(),
        }
    }
}

/// The database kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded, in `data_dir`.
    #[default]
    Sled,
    /// A PostgreSQL server.
    Postgres,
}

/// `[peers]`: the certificate names (common name, DNS or URI subject alternative name) allowed
/// on each operator service. With TLS the lists of the services a role serves are required: a
/// valid certificate of the wrong role is refused with PERMISSION_DENIED and audited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Leader: the last shuffler(s) of the cascade, allowed on `LeaderIngest`.
    #[serde(default)]
    pub shufflers: Vec<String>,
    /// Leader: the tenants' collectors (results services), allowed on `Collection`.
    #[serde(default)]
    pub collectors: Vec<String>,
    /// Helper: the leader, allowed on `HelperAggregation`.
    #[serde(default)]
    pub leader: Vec<String>,
    /// Key directories allowed on `HpkeKeys`; empty: any certificate from a trusted CA
    /// (services' clients hold none).
    #[serde(default)]
    pub key_directories: Vec<String>,
}

impl PeerConfig {
    /// Checks that the lists `role` needs with TLS are there.
    pub fn check_for(&self, role: hush_protocol::Role) -> Result<()> {
        let missing = match role {
            hush_protocol::Role::Leader if self.shufflers.is_empty() => {
                Some(("shufflers", "the last shuffler, e.g. [\"shuffler-b\"]"))
            }
            hush_protocol::Role::Leader if self.collectors.is_empty() => Some((
                "collectors",
                "the tenants' results services, e.g. [\"collector\"]",
            )),
            hush_protocol::Role::Helper if self.leader.is_empty() => {
                Some(("leader", "the leader, e.g. [\"leader\"]"))
            }
            _ => None,
        };
        match missing {
            Some((field, who)) => Err(Error::config(format!(
                "with TLS, [peers] {field} must name the certificates allowed to call the {role}: {who}"
            ))),
            None => Ok(()),
        }
    }
}

/// The leader's aggregation job settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderConfig {
    /// gRPC endpoint of the helper, e.g. `http://helper.example:7002`.
    pub helper_url: String,
    /// Most reports in one aggregation job; unset, the default of
    /// [`AggregatorConfig::job_size`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_size: Option<usize>,
    /// Aggregation jobs in flight at once.
    #[serde(default = "defaults::max_concurrent_jobs")]
    pub max_concurrent_jobs: usize,
    /// How often the job driver looks for pending reports when nothing wakes it, in ms.
    #[serde(default = "defaults::job_poll_interval_ms")]
    pub job_poll_interval_ms: u64,
    /// With `[store] kind = "postgres"`: how long a replica holds an aggregation job without
    /// renewing its lease (it renews every third of it while it works), in ms. When a replica
    /// dies, another takes its jobs over this long after its last renewal.
    #[serde(default = "defaults::job_lease_ms")]
    pub job_lease_ms: u64,
    /// First retry delay after the helper fails, in ms; doubles up to `retry_max_ms`.
    #[serde(default = "defaults::retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay, in ms.
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// Deadline of one request to the helper, in ms.
    #[serde(default = "defaults::helper_timeout_ms")]
    pub helper_timeout_ms: u64,
    /// Most reports stored and waiting for aggregation. Past it, ingest answers
    /// RESOURCE_EXHAUSTED and the last shuffler retries later, which keeps the leader's memory
    /// and disk bounded when reports arrive faster than they are aggregated.
    #[serde(default = "defaults::max_pending_reports")]
    pub max_pending_reports: u64,
    /// Sustained reports per second one tenant's tasks may bring in. Past it the tenant's
    /// reports are refused: a request holding only such reports gets RESOURCE_EXHAUSTED (the
    /// shuffler retries later), a mixed one gets them back as `OVER_QUOTA`; other tenants'
    /// reports are unaffected.
    #[serde(default = "defaults::tenant_reports_per_s")]
    pub tenant_reports_per_s: u32,
    /// Burst above a tenant's sustained rate.
    #[serde(default = "defaults::tenant_burst")]
    pub tenant_burst: u32,
    /// Most reports one tenant's tasks may have stored and waiting for aggregation, so one
    /// tenant cannot fill `max_pending_reports` for everyone. Past it the tenant's reports are
    /// refused like over its rate (RESOURCE_EXHAUSTED or `OVER_QUOTA`).
    #[serde(default = "defaults::tenant_max_pending")]
    pub tenant_max_pending: u64,
}

mod defaults {
    pub(super) fn database_url_env() -> String {
        "HUSH_DATABASE_URL".into()
    }
    pub(super) fn schema() -> String {
        "hush".into()
    }
    pub(super) fn pool_size() -> usize {
        16
    }
    pub(super) fn admin_token_env() -> String {
        hush_server::auth::DEFAULT_ADMIN_TOKEN_ENV.into()
    }
    pub(super) fn peer_token_env() -> String {
        "HUSH_PEER_TOKEN".into()
    }
    pub(super) fn clock_skew_s() -> u64 {
        300
    }
    pub(super) fn key_grace_period_s() -> u64 {
        86_400
    }
    pub(super) fn key_rotation_period_s() -> u64 {
        86_400
    }
    pub(super) fn max_request_reports() -> usize {
        1_000
    }
    pub(super) fn cache_mb() -> u64 {
        256
    }
    pub(super) fn max_packet_size() -> usize {
        8_192
    }
    pub(super) fn maintenance_interval_s() -> u64 {
        60
    }
    pub(super) fn helper_job_retention_s() -> u64 {
        7 * 86_400
    }
    /// Per-job costs (the flush, the round trip to the helper, the commit) spread over as many
    /// reports as a default request may carry.
    pub(super) fn job_size() -> usize {
        1_000
    }
    pub(super) fn max_concurrent_jobs() -> usize {
        4
    }
    pub(super) fn job_lease_ms() -> u64 {
        30_000
    }
    pub(super) fn job_poll_interval_ms() -> u64 {
        200
    }
    pub(super) fn retry_initial_ms() -> u64 {
        100
    }
    pub(super) fn retry_max_ms() -> u64 {
        10_000
    }
    pub(super) fn max_pending_reports() -> u64 {
        100_000
    }
    pub(super) fn tenant_reports_per_s() -> u32 {
        50_000
    }
    pub(super) fn tenant_burst() -> u32 {
        100_000
    }
    pub(super) fn tenant_max_pending() -> u64 {
        50_000
    }
    pub(super) fn helper_timeout_ms() -> u64 {
        30_000
    }
}

impl AggregatorConfig {
    /// Reads and checks a config file; relative paths in it (`data_dir`, the `[tls]` files)
    /// are relative to its folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        hush_server::tls::resolve_server_paths(base, &mut c.data_dir, c.tls.as_mut())
            .map_err(Error::config)?;
        Ok(c)
    }

    /// Parses and checks a config.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).map_err(|e| Error::config(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// Checks value ranges.
    pub fn check(&self) -> Result<()> {
        if self.store.pool_size == 0 {
            return Err(Error::config("[store] pool_size must be at least 1".into()));
        }
        if self.max_request_reports == 0 {
            return Err(Error::config(
                "max_request_reports must be at least 1".into(),
            ));
        }
        let sizes = hush_protocol::task::PACKET_SIZE_RANGE;
        if !sizes.contains(&u32::try_from(self.max_packet_size).unwrap_or(u32::MAX)) {
            return Err(Error::config(format!(
                "max_packet_size ({}) must be in {sizes:?}",
                self.max_packet_size
            )));
        }
        self.server.check().map_err(Error::config)?;
        if self.helper_job_retention_s < 60 {
            return Err(Error::config(
                "helper_job_retention_s must be at least 60 seconds".into(),
            ));
        }
        if let Some(l) = &self.leader {
            let job_size = self.job_size();
            if job_size == 0 || job_size > self.max_request_reports {
                return Err(Error::config(format!(
                    "leader.job_size must be in 1..={} (max_request_reports)",
                    self.max_request_reports
                )));
            }
            if l.tenant_max_pending < job_size as u64 {
                return Err(Error::config(format!(
                    "leader.tenant_max_pending ({}) must be at least leader.job_size ({job_size})",
                    l.tenant_max_pending
                )));
            }
            if l.job_lease_ms < 300 {
                return Err(Error::config(
                    "leader.job_lease_ms must be at least 300 (a replica renews every third of it)"
                        .into(),
                ));
            }
            if l.max_concurrent_jobs == 0 {
                return Err(Error::config(
                    "leader.max_concurrent_jobs must be at least 1".into(),
                ));
            }
            if l.retry_initial_ms == 0 || l.retry_max_ms < l.retry_initial_ms {
                return Err(Error::config(
                    "leader.retry_initial_ms must be positive and at most retry_max_ms".into(),
                ));
            }
            check_url_scheme(&l.helper_url, self.tls.is_some(), "leader.helper_url")?;
        }
        Ok(())
    }

    /// The largest leader ingest request: `max_request_reports` reports of at most
    /// `max_packet_size` bytes.
    pub fn ingest_message_limit(&self) -> usize {
        hush_server::serve::message_limit(self.max_request_reports, self.max_packet_size, 1_024)
    }

    /// Most reports in one of the leader's aggregation jobs: `[leader] job_size`, or by default
    /// 1,000, `max_request_reports` or `tenant_max_pending`, whichever is lowest. (The helper
    /// refuses a job larger than its own `max_request_reports`.)
    pub fn job_size(&self) -> usize {
        match &self.leader {
            Some(l) => l.job_size.unwrap_or_else(|| {
                defaults::job_size()
                    .min(self.max_request_reports)
                    .min(usize::try_from(l.tenant_max_pending).unwrap_or(usize::MAX))
            }),
            None => defaults::job_size().min(self.max_request_reports),
        }
    }

    /// The largest aggregation job request: per report its shares, public share and the
    /// leader's verifier share, at most twice a packet.
    pub fn job_message_limit(&self) -> usize {
        hush_server::serve::message_limit(self.max_request_reports, 2 * self.max_packet_size, 1_024)
    }

    /// Reads the `[tls]` files, if configured.
    pub fn tls_material(&self) -> Result<Option<TlsMaterial>> {
        read_tls(self.tls.as_ref())
    }
}

/// Reads the files of a `[tls]` section, if there is one.
pub fn read_tls(files: Option<&TlsFiles>) -> Result<Option<TlsMaterial>> {
    hush_server::tls::read_tls(files).map_err(|e| Error::config(e.to_string()))
}

/// Checks that `url` is `https://` when TLS is configured and `http://` when it is not.
pub fn check_url_scheme(url: &str, tls: bool, what: &str) -> Result<()> {
    hush_protocol::link::check_scheme(url, tls, what).map_err(|e| Error::config(e.to_string()))
}

/// Reads a secret from the environment variable `name`.
/// Reads a secret from the environment variable `name`.
pub fn secret_from_env(name: &str, what: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => Err(Error::config(format!(
            "the {what} is read from the environment variable {name}, which is not set"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AggregatorConfig::from_toml("listen = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\n")
            .unwrap();
        assert_eq!(c.admin_token_env, "HUSH_ADMIN_TOKEN");
        assert_eq!(c.clock_skew_s, 300);
        assert!(c.leader.is_none());
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let e = AggregatorConfig::from_toml(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"x\"\nadmin_token = \"s3cret\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("admin_token"), "{e}");
        let e = AggregatorConfig::from_toml(
            "listen = \"127.0.0.1:1\"\ndata_dir = \"x\"\n[leader]\nhelper_url = \"helper:1\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
    }

    #[test]
    fn job_size_defaults_to_what_requests_and_tenants_allow() {
        let base = "listen = \"127.0.0.1:1\"\ndata_dir = \"x\"\n";
        let leader = "[leader]\nhelper_url = \"http://helper:1\"\n";
        let job_size = |text: String| AggregatorConfig::from_toml(&text).unwrap().job_size();
        assert_eq!(job_size(format!("{base}{leader}")), 1_000);
        assert_eq!(
            job_size(format!("{base}max_request_reports = 300\n{leader}")),
            300
        );
        assert_eq!(
            job_size(format!("{base}{leader}tenant_max_pending = 200\n")),
            200
        );
        assert_eq!(job_size(format!("{base}{leader}job_size = 50\n")), 50);
        // Set above what a request may carry, it is refused with the limit named.
        let e = AggregatorConfig::from_toml(&format!(
            "{base}max_request_reports = 300\n{leader}job_size = 500\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("1..=300"), "{e}");
    }
}
