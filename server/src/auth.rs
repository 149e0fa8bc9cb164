//! Bearer-token authentication for gRPC services (server-side interceptors). Only a SHA-256 hash
//! of the expected token is kept, and comparison is constant-time.

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// The token in an `authorization: Bearer ...` header, if any.
pub fn bearer_token<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether `token` hashes to `expected`, in constant time.
pub fn token_matches(token: &str, expected: &[u8; 32]) -> bool {
    token_hash(token).ct_eq(expected).into()
}

/// Refuses requests without the expected bearer token before any handler runs.
#[derive(Clone)]
pub struct BearerAuth {
    expected: [u8; 32],
    what: &'static str,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl BearerAuth {
    /// Accepts `token`; `what` names it in errors ("admin token").
    pub fn new(token: &str, what: &'static str) -> Self {
        Self {
            expected: token_hash(token),
            what,
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match bearer_token(&req) {
            Some(t) if token_matches(t, &self.expected) => Ok(req),
            Some(_) => {
                tracing::warn!(
                    what = self.what,
                    "refused a request with a wrong bearer token"
                );
                Err(Status::unauthenticated(format!("wrong {}", self.what)))
            }
            None => Err(Status::unauthenticated(format!(
                "missing {}: send \"authorization: Bearer <token>\"",
                self.what
            ))),
        }
    }
}

/// The admin token's variable unless a config names another.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "HUSH_ADMIN_TOKEN";

/// A server's admin token from the environment: from `role_var` (`HUSH_LEADER_ADMIN_TOKEN`,
/// `HUSH_HELPER_ADMIN_TOKEN`, `HUSH_SHUFFLER_ADMIN_TOKEN`) when the config keeps the default
/// variable and `role_var` is set, so one shell can run a whole cluster with a token per role;
/// else from `configured`. The error says which variables to set.
pub fn admin_token_from_env(role_var: &str, configured: &str) -> Result<String, String> {
    let get = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if configured == DEFAULT_ADMIN_TOKEN_ENV {
        if let (Some(a), Some(b)) = (get(role_var), get(configured))
            && a != b
        {
            return Err(format!(
                "both {role_var} and {configured} are set, to different tokens: unset the one \
                 this server should not use"
            ));
        }
        get(role_var).or_else(|| get(configured)).ok_or_else(|| {
            format!(
                "the admin token is read from the environment variable {role_var} or \
                 {configured}; set one of them"
            )
        })
    } else {
        get(configured).ok_or_else(|| {
            format!("the admin token is read from the environment variable {configured}, which is not set")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hush_protocol::link::AddBearer;

    #[test]
    fn bearer_auth_accepts_only_the_token() {
        let mut auth = BearerAuth::new("s3cret", "admin token");
        let mut add = AddBearer::new("s3cret").unwrap();
        assert!(auth.call(add.call(Request::new(())).unwrap()).is_ok());
        let mut wrong = AddBearer::new("guess").unwrap();
        let e = auth
            .call(wrong.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth.call(Request::new(())).unwrap_err();
        assert!(e.message().contains("missing admin token"));
    }
}
