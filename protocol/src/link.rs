//! The client side of a link between hush parties: endpoints whose scheme matches whether TLS is
//! configured, server-authenticated TLS for service clients, and a bearer token on outgoing
//! requests. Building configurations only: this module opens no connection.

use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// A link setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A URL's scheme does not match whether TLS is configured.
    #[error("{what} {url:?}: {why}")]
    Scheme {
        /// Which setting holds the URL.
        what: String,
        /// The URL.
        url: String,
        /// What to change.
        why: &'static str,
    },
    /// The URL does not parse.
    #[error("{what} {url:?} is not a valid URL: {source}")]
    Url {
        /// Which setting holds the URL.
        what: String,
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The client TLS config was refused by the TLS library.
    #[error("client TLS config refused: {source}; check that the CA bundle is PEM")]
    Material {
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A client that verifies servers against `ca_pem` and presents no certificate (a service's
/// client runtime, operators' tools).
pub fn server_auth_client(ca_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))
}

/// Checks that `url` is `https://` when TLS is configured and `http://` when it is not, so a
/// TLS deployment never silently talks plaintext. `what` names the setting.
pub fn check_scheme(url: &str, tls: bool, what: &str) -> Result<(), LinkError> {
    let why = match (url.starts_with("https://"), url.starts_with("http://"), tls) {
        (true, _, true) | (_, true, false) => return Ok(()),
        (_, true, true) => {
            "TLS is configured, so the URL must be https:// (plaintext http:// is for servers started with --insecure and no [tls] section, and clients and tools given no CA)"
        }
        (true, _, false) => {
            "https:// needs the CA that signs the server's certificate: a server's [tls] section (see hush certs), a tool's --ca FILE or HUSH_CA, a service client's tls_ca"
        }
        _ => "use an http:// or https:// URL",
    };
    Err(LinkError::Scheme {
        what: what.to_owned(),
        url: url.to_owned(),
        why,
    })
}

/// An endpoint for `url`: `https://` with `tls`, `http://` without ([`check_scheme`]).
pub fn endpoint(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    what: &str,
) -> Result<Endpoint, LinkError> {
    check_scheme(url, tls.is_some(), what)?;
    let e = Endpoint::from_shared(url.to_owned()).map_err(|source| LinkError::Url {
        what: what.to_owned(),
        url: url.to_owned(),
        source,
    })?;
    match tls {
        Some(t) => e
            .tls_config(t.clone())
            .map_err(|source| LinkError::Material { source }),
        None => Ok(e),
    }
}

/// A channel to `url`, connected lazily (no I/O until the first call): `https://host:port` with
/// `tls`, `http://host:port` without. Connecting gives up after 5 s and a call after 60 s.
pub fn channel(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    what: &str,
) -> Result<tonic::transport::Channel, LinkError> {
    Ok(endpoint(url, tls, what)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Adds a bearer token to outgoing requests.
#[derive(Clone)]
pub struct AddBearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for AddBearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddBearer(<redacted>)")
    }
}

impl AddBearer {
    /// Sends `token`. Fails if the token is not valid header text.
    pub fn new(token: &str) -> Result<Self, Status> {
        let v = format!("Bearer {token}").parse().map_err(|_| {
            Status::invalid_argument("the token has characters not allowed in a header")
        })?;
        Ok(Self(v))
    }
}

impl Interceptor for AddBearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_match_whether_tls_is_configured() {
        let tls = ClientTlsConfig::new();
        assert!(endpoint("http://127.0.0.1:1", None, "x").is_ok());
        assert!(endpoint("https://127.0.0.1:1", Some(&tls), "x").is_ok());
        let e = endpoint("http://127.0.0.1:1", Some(&tls), "leader.helper_url").unwrap_err();
        assert!(e.to_string().contains("leader.helper_url"), "{e}");
        assert!(e.to_string().contains("must be https"), "{e}");
        assert!(check_scheme("https://h:1", true, "x").is_ok());
        assert!(check_scheme("http://h:1", false, "x").is_ok());
        let e = endpoint("https://127.0.0.1:1", None, "x").unwrap_err();
        assert!(e.to_string().contains("[tls]"), "{e}");
        assert!(endpoint("ftp://127.0.0.1:1", None, "x").is_err());
        assert!(endpoint("not a url", None, "x").is_err());
    }

    #[test]
    fn the_bearer_token_must_be_header_text() {
        assert!(AddBearer::new("abc").is_ok());
        assert!(AddBearer::new("a\nb").is_err());
    }
}
