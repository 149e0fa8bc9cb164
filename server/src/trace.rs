//! One tracing span per request on every gRPC server: the server's party, the gRPC method, the
//! caller's role (the name its client certificate gives, or `anonymous`; never an address), and
//! on completion the gRPC status and latency. Every log line written while a request runs
//! carries the span's fields, and `--log-format json` writes them as JSON.
//!
//! The completion event is at debug level (`RUST_LOG=hush_server::trace=debug` logs every
//! request). The status comes from the response headers, where tonic puts every refusal and
//! handler error (a trailers-only response); a response whose status only arrives in trailers
//! is logged as `0` (OK).
//!
//! Each completed request also counts in `hush_requests_total{method, grpc_status}` and
//! `hush_request_duration_seconds{method}` ([`crate::metrics`]).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tracing::Instrument;

use crate::metrics::names::{REQUEST_SECONDS, REQUESTS};
use crate::tls::{ANONYMOUS, peer_name};

/// The layer, which [`crate::serve::ServerLimits::apply`] puts outermost on every server.
#[derive(Clone, Debug)]
pub struct RequestSpans {
    party: &'static str,
    methods: Arc<HashSet<String>>,
}

impl RequestSpans {
    /// Spans for the server of `party` ("leader", "helper", "shuffler", "results") serving
    /// `services` (full gRPC names) besides health and reflection. A request for any other path
    /// is `method = "unknown"` in its span and its metrics: the path a caller sends never
    /// becomes a label or a log field.
    pub fn new(party: &'static str, services: &[&str]) -> Self {
        let mut methods = HashSet::new();
        for set in [
            hush_protocol::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(set) else {
                continue;
            };
            for file in &set.file {
                for svc in &file.service {
                    let full = format!("{}.{}", file.package(), svc.name());
                    if services.contains(&full.as_str()) || full == "grpc.health.v1.Health" {
                        for m in &svc.method {
                            methods.insert(format!("/{full}/{}", m.name()));
                        }
                    }
                }
            }
        }
        methods.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        Self {
            party,
            methods: Arc::new(methods),
        }
    }
}

impl<S> tower::Layer<S> for RequestSpans {
    type Service = Spanned<S>;

    fn layer(&self, inner: S) -> Spanned<S> {
        Spanned {
            inner,
            party: self.party,
            methods: self.methods.clone(),
        }
    }
}

/// A service whose requests each run in their own span.
#[derive(Clone, Debug)]
pub struct Spanned<S> {
    inner: S,
    party: &'static str,
    methods: Arc<HashSet<String>>,
}

/// The caller's role: its certificate's name, or [`ANONYMOUS`].
fn caller<B>(req: &http::Request<B>) -> String {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .and_then(|c| c.first().map(|c| peer_name(c.as_ref())))
        .unwrap_or_else(|| ANONYMOUS.to_owned())
}

impl<S, B, R> tower::Service<http::Request<B>> for Spanned<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = if self.methods.contains(req.uri().path()) {
            req.uri().path().to_owned()
        } else {
            "unknown".to_owned()
        };
        let span = tracing::info_span!(
            "request",
            party = self.party,
            method = %method,
            peer = %caller(&req),
        );
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(
            async move {
                let out = fut.await;
                let latency_ms = start.elapsed().as_secs_f64() * 1e3;
                match &out {
                    Ok(resp) => {
                        let status = resp
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("0")
                            .to_owned();
                        tracing::debug!(grpc_status = %status, latency_ms, "request served");
                        metrics::histogram!(REQUEST_SECONDS, "method" => method.clone())
                            .record(latency_ms / 1e3);
                        metrics::counter!(REQUESTS, "method" => method, "grpc_status" => status)
                            .increment(1);
                    }
                    Err(_) => tracing::debug!(latency_ms, "request failed in transport"),
                }
                out
            }
            .instrument(span),
        )
    }
}
