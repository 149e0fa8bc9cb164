//! TLS on every link between hush components (tonic over rustls), without I/O: callers read the
//! PEM files a `[tls]` section names and hand the bytes here.
//!
//! - Servers present their certificate and verify any client certificate against the
//!   operator's trusted CAs. A client certificate from another CA fails the handshake.
//! - Services that only operators' components may call (leader ingest from a shuffler, the
//!   helper's aggregation API, collection, a later shuffler's ingest) are wrapped in
//!   [`RequirePeerCert`], which refuses a connection that presented no certificate before any
//!   handler runs. Public services (HPKE configs, the first shuffler's ingest) accept clients
//!   without a certificate over server-authenticated TLS.
//! - Clients of operator links present their own certificate ([`TlsMaterial::client`]); service
//!   clients only verify the server ([`server_auth_client`]).
//!
//! Plaintext is for tests and for processes started with an explicit `--insecure`: a `[tls]`
//! section then is absent and every URL is `http://`.

use std::path::PathBuf;

pub use hush_protocol::link::server_auth_client;
use serde::{Deserialize, Serialize};
use tonic::service::Interceptor;
use tonic::transport::{ClientTlsConfig, Identity};
use tonic::{Request, Status};
use zeroize::Zeroizing;

/// A TLS setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A link setting (URL scheme, client TLS config) is unusable.
    #[error(transparent)]
    Link(#[from] hush_protocol::link::LinkError),
    /// The PEM material was refused by the TLS library.
    #[error(
        "TLS material refused ({what}): {source}; check that cert, key and ca are PEM files and the key belongs to the certificate"
    )]
    Material {
        /// What was being built.
        what: &'static str,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A PEM input is empty or not PEM.
    #[error("{what} is not PEM (expected \"-----BEGIN {label}\")")]
    NotPem {
        /// Which input.
        what: &'static str,
        /// The PEM label expected.
        label: &'static str,
    },
    /// A file a `[tls]` setting names cannot be read.
    #[error("cannot read tls.{what} {path:?}: {source}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS listener's config could not be built.
    #[error(
        "HTTPS server config ({what}): {reason}; check that cert and key are PEM and belong together"
    )]
    Https {
        /// Which part.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Generating development certificates failed.
    #[cfg(feature = "dev-ca")]
    #[error("generating a development certificate for {name:?}: {source}")]
    DevCa {
        /// The certificate's name.
        name: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
}

/// Where a component's TLS files are: the `[tls]` section of its config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This component's certificate chain (PEM), presented as server and as client.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8). Keep it readable by this process only.
    pub key: PathBuf,
    /// The CA certificates (PEM bundle) this component trusts for its peers: both operators'
    /// CAs where links cross operators.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Makes relative paths relative to `base` (the config file's folder).
    pub fn resolve_against(&mut self, base: &std::path::Path) {
        for p in [&mut self.cert, &mut self.key, &mut self.ca] {
            *p = resolve_path(base, p);
        }
    }

    /// Reads the three files with `read` (`std::fs::read`; this crate does no I/O itself).
    pub fn read_with(
        &self,
        read: impl Fn(&std::path::Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<TlsMaterial, TlsError> {
        let get = |what, path: &PathBuf| {
            read(path).map_err(|source| TlsError::Read {
                what,
                path: path.clone(),
                source,
            })
        };
        TlsMaterial::from_pem(
            get("cert", &self.cert)?,
            get("key", &self.key)?,
            get("ca", &self.ca)?,
        )
    }
}

/// `p` if it is absolute, else `p` under `base`: how every config reads its paths (relative
/// to the config file's folder, not to the directory the process starts in).
pub fn resolve_path(base: &std::path::Path, p: &std::path::Path) -> PathBuf {
    if p.is_relative() {
        base.join(p)
    } else {
        p.to_owned()
    }
}

/// A config's relative `data_dir` under `base` (the config file's folder). Before paths were
/// resolved this way a relative `data_dir` meant the directory the process started in; so that
/// an upgrade never opens a fresh, empty store beside the old one, it refuses when only that
/// old location exists.
pub fn resolve_data_dir(base: &std::path::Path, p: &std::path::Path) -> Result<PathBuf, String> {
    let resolved = resolve_path(base, p);
    if p.is_relative() && !resolved.exists() && p.exists() {
        let old = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        if old != resolved {
            return Err(format!(
                "data_dir {:?} is relative to the config file's folder ({}), where nothing exists \
                 yet, but {} does (where it pointed when paths were relative to the working \
                 directory): move it there, or set data_dir to {:?}",
                p,
                resolved.display(),
                old.display(),
                old
            ));
        }
    }
    Ok(resolved)
}

/// Resolves a server config's paths against `base`, its file's folder: `data_dir`
/// ([`resolve_data_dir`]) and the `[tls]` files.
pub fn resolve_server_paths(
    base: &std::path::Path,
    data_dir: &mut PathBuf,
    tls: Option<&mut TlsFiles>,
) -> Result<(), String> {
    *data_dir = resolve_data_dir(base, data_dir)?;
    if let Some(t) = tls {
        t.resolve_against(base);
    }
    Ok(())
}

/// Reads the files of a `[tls]` section, if there is one.
pub fn read_tls(files: Option<&TlsFiles>) -> Result<Option<TlsMaterial>, TlsError> {
    files.map(|f| f.read_with(|p| std::fs::read(p))).transpose()
}

/// A component's certificate, key and trusted CAs, as PEM bytes.
#[derive(Clone)]
pub struct TlsMaterial {
    cert: Vec<u8>,
    key: Zeroizing<Vec<u8>>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial(<cert, key redacted, ca>)")
    }
}

fn check_pem(bytes: &[u8], what: &'static str, label: &'static str) -> Result<(), TlsError> {
    let text = String::from_utf8_lossy(bytes);
    if text.contains(&format!("-----BEGIN {label}")) {
        Ok(())
    } else {
        Err(TlsError::NotPem { what, label })
    }
}

impl TlsMaterial {
    /// Checks the three inputs look like PEM (the TLS library checks the rest when a server or
    /// channel is built).
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Result<Self, TlsError> {
        let key = Zeroizing::new(key);
        check_pem(&cert, "cert", "CERTIFICATE")?;
        if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
            return Err(TlsError::NotPem {
                what: "key",
                label: "PRIVATE KEY",
            });
        }
        check_pem(&ca, "ca", "CERTIFICATE")?;
        Ok(Self { cert, key, ca })
    }

    /// The trusted CA bundle.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca
    }

    /// The same certificate and key, trusting only the CA certificates in `ca` (PEM): for a
    /// link to a party whose certificate only its own operator's CA may sign.
    pub fn with_ca(&self, ca: Vec<u8>) -> Result<Self, TlsError> {
        check_pem(&ca, "ca", "CERTIFICATE")?;
        Ok(Self {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca,
        })
    }

    /// The server side of every gRPC listener: present the certificate; verify a client
    /// certificate against the CAs when one is presented (whether a service needs one is
    /// [`RequirePeerCert`]'s decision); HTTP/2 by ALPN. Handshakes run in
    /// [`crate::serve::TlsIncoming`], which counts the ones that fail.
    pub fn grpc_server(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let bad = |what: &'static str, e: String| TlsError::Https { what, reason: e };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca) {
            roots
                .add(c.map_err(|e| bad("ca", e.to_string()))?)
                .map_err(|e| bad("ca", e.to_string()))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad("client certificate verifier", e.to_string()))?;
        let (certs, key) = self.cert_and_key()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| bad("cert and key", e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    }

    #[allow(clippy::type_complexity)]
    fn cert_and_key(
        &self,
    ) -> Result<
        (
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &'static str, e: String| TlsError::Https { what, reason: e };
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("cert", e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad("key", e.to_string()))?;
        Ok((certs, key))
    }

    /// A rustls server config with this certificate, for HTTPS listeners (the results API):
    /// server-authenticated, no client certificate asked for (dashboards present none).
    pub fn https_server(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        let bad = |what: &'static str, e: String| TlsError::Https { what, reason: e };
        let (certs, key) = self.cert_and_key()?;
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("cert and key", e.to_string()))?;
        Ok(std::sync::Arc::new(config))
    }

    /// The client side of an operator link: verify the server against the CAs and present this
    /// component's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        server_auth_client(&self.ca).identity(Identity::from_pem(&self.cert, self.key.as_slice()))
    }
}

/// Refuses requests on connections that presented no client certificate, and (when names are
/// configured) requests whose certificate names none of the allowed peers, before any handler
/// runs. (A certificate from an untrusted CA never gets this far: the handshake fails.) When the
/// server runs without TLS (`--insecure`, tests) it lets everything through.
#[derive(Clone, Debug)]
pub struct RequirePeerCert {
    enabled: bool,
    what: &'static str,
    allowed: std::sync::Arc<[String]>,
}

impl RequirePeerCert {
    /// Any certificate from a trusted CA; `what` names the callers expected ("the leader").
    pub fn new(enabled: bool, what: &'static str) -> Self {
        Self::named(enabled, what, &[])
    }

    /// A certificate that names one of `allowed` (its common name, a DNS or a URI subject
    /// alternative name, e.g. `shuffler-b` or `spiffe://hush/shuffler-b`); an empty list takes
    /// any certificate from a trusted CA.
    pub fn named(enabled: bool, what: &'static str, allowed: &[String]) -> Self {
        Self {
            enabled,
            what,
            allowed: allowed.into(),
        }
    }
}

impl Interceptor for RequirePeerCert {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if !self.enabled {
            return Ok(req);
        }
        let Some(cert) = req.peer_certs().and_then(|c| c.first().cloned()) else {
            metrics::counter!(crate::metrics::names::PEER_REFUSALS, "expected" => self.what, "reason" => "no_certificate").increment(1);
            tracing::warn!(
                expected = self.what,
                remote = ?req.remote_addr(),
                "refused a request without a client certificate"
            );
            return Err(Status::unauthenticated(format!(
                "this service is only for {}: connect with a client certificate from a trusted CA",
                self.what
            )));
        };
        if self.allowed.is_empty() {
            return Ok(req);
        }
        let names = peer_names(cert.as_ref());
        if names.iter().any(|n| self.allowed.contains(n)) {
            return Ok(req);
        }
        metrics::counter!(crate::metrics::names::PEER_REFUSALS, "expected" => self.what, "reason" => "wrong_role").increment(1);
        tracing::warn!(
            expected = self.what,
            ?names,
            remote = ?req.remote_addr(),
            "refused a certificate of another role"
        );
        Err(Status::permission_denied(format!(
            "this service is only for {} ({}); the certificate names {}",
            self.what,
            self.allowed.join(", "),
            names.join(", ")
        )))
    }
}

/// Every name a certificate gives its holder: the subject's common names, then the DNS names
/// and URIs among its subject alternative names.
pub fn peer_names(cert_der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d)
                | x509_parser::extensions::GeneralName::URI(d) => out.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    out.dedup();
    out
}

/// Two interceptors, `A` first.
#[derive(Clone, Debug)]
pub struct Both<A, B>(pub A, pub B);

impl<A: Interceptor, B: Interceptor> Interceptor for Both<A, B> {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let req = self.0.call(req)?;
        self.1.call(req)
    }
}

/// The name a client certificate gives its holder: the subject's common name, else its first
/// DNS name, else `"certificate"`.
pub fn peer_name(cert_der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return "unparsable certificate".into();
    };
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return cn.to_owned();
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                return (*d).to_owned();
            }
        }
    }
    "certificate".into()
}

/// Connections and requests a server saw from one kind of peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCount {
    /// Connections (distinct remote ends) that made at least one request.
    pub connections: u64,
    /// Requests.
    pub requests: u64,
}

/// The name under which [`PeerLog`] counts peers without a client certificate.
pub const ANONYMOUS: &str = "anonymous";

#[derive(Debug, Default)]
struct PeerLogInner {
    /// The peer name of each connection seen (bounded: cleared when it grows past
    /// [`PeerLog::MAX_TRACKED`], after which a live connection may count twice).
    conns: std::collections::HashMap<std::net::SocketAddr, String>,
    by_peer: std::collections::BTreeMap<String, PeerCount>,
}

/// Who talks to a server: connections and requests per peer, named by the client certificate
/// ([`peer_name`]) or [`ANONYMOUS`]. Addresses are only used to tell connections apart and are
/// never reported. Add [`PeerLog::layer`] to a server and read [`PeerLog::snapshot`].
#[derive(Clone, Debug, Default)]
pub struct PeerLog(std::sync::Arc<std::sync::Mutex<PeerLogInner>>);

impl PeerLog {
    /// Most connections remembered at once.
    pub const MAX_TRACKED: usize = 65_536;

    /// Counts one request.
    fn record<B>(&self, req: &tonic::codegen::http::Request<B>) {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let (addr, name) =
            if let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
                let name = info
                    .peer_certs()
                    .and_then(|c| c.first().map(|c| peer_name(c.as_ref())))
                    .unwrap_or_else(|| ANONYMOUS.to_owned());
                (info.get_ref().remote_addr(), name)
            } else if let Some(info) = req.extensions().get::<TcpConnectInfo>() {
                (info.remote_addr(), ANONYMOUS.to_owned())
            } else {
                (None, ANONYMOUS.to_owned())
            };
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let new_conn = match addr {
            Some(a) => {
                if g.conns.len() >= Self::MAX_TRACKED {
                    g.conns.clear();
                }
                g.conns.insert(a, name.clone()).is_none()
            }
            None => false,
        };
        let c = g.by_peer.entry(name).or_default();
        c.requests += 1;
        c.connections += u64::from(new_conn);
    }

    /// A tower layer that counts every request before any service sees it.
    pub fn layer<B>(
        &self,
    ) -> tower::util::MapRequestLayer<
        impl Fn(tonic::codegen::http::Request<B>) -> tonic::codegen::http::Request<B> + Clone + use<B>,
    > {
        let me = self.clone();
        tower::util::MapRequestLayer::new(move |req: tonic::codegen::http::Request<B>| {
            me.record(&req);
            req
        })
    }

    /// What was seen so far, by peer name.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, PeerCount> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_peer
            .clone()
    }

    /// Connections and requests without a client certificate.
    pub fn anonymous(&self) -> PeerCount {
        self.snapshot().get(ANONYMOUS).copied().unwrap_or_default()
    }
}

/// A development CA and certificates for every component (rcgen). Not for production: real
/// deployments use each operator's own PKI.
#[cfg(feature = "dev-ca")]
pub mod dev {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    use super::TlsError;

    /// A certificate and its key, PEM.
    #[derive(Clone)]
    pub struct Issued {
        /// The certificate.
        pub cert_pem: String,
        /// Its private key (PKCS#8).
        pub key_pem: String,
    }

    impl std::fmt::Debug for Issued {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Issued(<cert, key redacted>)")
        }
    }

    /// A CA that lives in memory (and in the files `hush certs` writes).
    pub struct DevCa {
        issuer: Issuer<'static, KeyPair>,
        cert: Issued,
        years: (i32, i32),
    }

    impl std::fmt::Debug for DevCa {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("DevCa(<redacted>)")
        }
    }

    fn err(name: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
        move |source| TlsError::DevCa {
            name: name.to_owned(),
            source,
        }
    }

    /// Validity from January 1st of this year to January 1st two years on.
    fn validity(p: &mut CertificateParams, years: (i32, i32)) {
        p.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        p.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    }

    impl DevCa {
        /// A new CA named `name` (e.g. "operator-a dev CA").
        pub fn new(name: &str) -> Result<Self, TlsError> {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let year = 1970 + (now / 31_556_952) as i32;
            let years = (year, year + 2);
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err(name))?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut p, years);
            let key = KeyPair::generate().map_err(err(name))?;
            let cert = p.self_signed(&key).map_err(err(name))?;
            let cert = Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            };
            Ok(Self {
                issuer: Issuer::new(p, key),
                cert,
                years,
            })
        }

        /// The CA certificate, PEM (what peers put in their `ca` bundle).
        pub fn cert_pem(&self) -> &str {
            &self.cert.cert_pem
        }

        /// The CA's private key, PEM.
        pub fn key_pem(&self) -> &str {
            &self.cert.key_pem
        }

        /// A certificate for component `name`, valid as server and as client, for the host
        /// names and IP addresses in `hosts` (plus `name` itself).
        pub fn issue(&self, name: &str, hosts: &[String]) -> Result<Issued, TlsError> {
            let mut sans: Vec<String> = vec![name.to_owned()];
            sans.extend(hosts.iter().filter(|h| *h != name).cloned());
            let mut p = CertificateParams::new(sans).map_err(err(name))?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            validity(&mut p, self.years);
            let key = KeyPair::generate().map_err(err(name))?;
            let cert = p.signed_by(&key, &self.issuer).map_err(err(name))?;
            Ok(Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        }

        /// The material a component holding `issued` uses when it trusts this CA only.
        pub fn material(&self, issued: &Issued) -> Result<super::TlsMaterial, TlsError> {
            super::TlsMaterial::from_pem(
                issued.cert_pem.clone().into_bytes(),
                issued.key_pem.clone().into_bytes(),
                self.cert.cert_pem.clone().into_bytes(),
            )
        }
    }

    /// The hosts a loopback deployment's certificates name.
    pub fn loopback_hosts() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn material_must_be_pem() {
        let e =
            TlsMaterial::from_pem(b"cert".to_vec(), b"key".to_vec(), b"ca".to_vec()).unwrap_err();
        assert!(e.to_string().contains("cert is not PEM"), "{e}");
        let cert = b"-----BEGIN CERTIFICATE-----\n".to_vec();
        let e = TlsMaterial::from_pem(cert.clone(), cert.clone(), cert).unwrap_err();
        assert!(e.to_string().contains("key is not PEM"), "{e}");
    }

    #[test]
    fn the_peer_cert_check_refuses_requests_without_a_certificate() {
        let mut on = RequirePeerCert::new(true, "a shuffler");
        let e = on.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("a shuffler"));
        assert!(
            RequirePeerCert::new(false, "a shuffler")
                .call(Request::new(()))
                .is_ok()
        );
    }

    #[cfg(feature = "dev-ca")]
    #[test]
    fn the_dev_ca_issues_pem_material() {
        let ca = dev::DevCa::new("test CA").unwrap();
        let leader = ca.issue("leader", &dev::loopback_hosts()).unwrap();
        let m = ca.material(&leader).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.ca_pem().starts_with(b"-----BEGIN CERTIFICATE-----"));
        m.grpc_server().unwrap();
        let _ = m.client();
    }
}
