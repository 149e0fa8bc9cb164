//! Limits every hush server applies to what one peer can make it do: requests served at once
//! (the excess refused at once with RESOURCE_EXHAUSTED, which clients and shufflers treat as
//! "retry later"), HTTP/2 streams per connection, and open connections (the excess closed at
//! accept); and the one signal every server process stops on ([`shutdown_signal`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tonic::codegen::http;
use tower::layer::util::{Identity, Stack};

use crate::trace::RequestSpans;
use tonic::codegen::tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// `[server]`: how much one server takes on at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerLimits {
    /// Requests served at once over all connections; more are refused at once with
    /// RESOURCE_EXHAUSTED.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams (requests in flight) one connection may open.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Open connections; a connection past it is closed as soon as it is accepted.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Serve gRPC reflection (`grpcurl list`); turn off to publish only the health service.
    #[serde(default = "defaults::reflection")]
    pub reflection: bool,
    /// On shutdown (SIGTERM), how long every service reports NOT_SERVING over the health
    /// protocol before the listener stops, so a load balancer can move traffic away.
    #[serde(default)]
    pub drain_grace_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: defaults::max_concurrent_requests(),
            max_concurrent_streams: defaults::max_concurrent_streams(),
            max_connections: defaults::max_connections(),
            reflection: defaults::reflection(),
            drain_grace_ms: 0,
        }
    }
}

mod defaults {
    pub(super) fn max_concurrent_requests() -> usize {
        64
    }
    pub(super) fn max_concurrent_streams() -> u32 {
        32
    }
    pub(super) fn max_connections() -> usize {
        1_024
    }
    pub(super) fn reflection() -> bool {
        true
    }
}

impl ServerLimits {
    /// Checks that every limit is positive.
    pub fn check(&self) -> Result<(), String> {
        if self.max_concurrent_requests == 0
            || self.max_concurrent_streams == 0
            || self.max_connections == 0
        {
            return Err(
                "server.max_concurrent_requests, max_concurrent_streams and max_connections must be positive"
                    .into(),
            );
        }
        Ok(())
    }

    /// `server` with these limits and a span per request: outermost [`RequestSpans`] (so every
    /// request, a shed one too, is logged and counted), then load shedding ([`ShedLayer`]) over
    /// a global limit of requests in flight; HTTP/2 streams per connection. Connections are
    /// limited by [`LimitedIncoming`].
    pub fn apply(
        &self,
        server: tonic::transport::Server,
        spans: RequestSpans,
    ) -> tonic::transport::Server<ServerLayers> {
        server
            .max_concurrent_streams(self.max_concurrent_streams)
            .layer(spans)
            .layer(ShedLayer)
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                self.max_concurrent_requests,
            ))
    }

    /// The accepted connections of `listener`, at most `max_connections` open at once, with
    /// the TLS handshake done when `tls` is given (see [`Incoming`]).
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<&crate::tls::TlsMaterial>,
    ) -> Result<Incoming, crate::tls::TlsError> {
        let plain = LimitedIncoming {
            inner: TcpIncoming::from(listener).with_nodelay(Some(true)),
            permits: Arc::new(Semaphore::new(self.max_connections)),
        };
        Ok(match tls {
            None => Incoming::Plain(plain),
            Some(m) => Incoming::Tls(TlsIncoming {
                inner: plain,
                acceptor: tokio_rustls::TlsAcceptor::from(m.grpc_server()?),
                handshakes: JoinSet::new(),
                done: false,
            }),
        })
    }
}

/// The layers [`ServerLimits::apply`] puts on a server, outermost last.
pub type ServerLayers = Stack<
    tower::limit::GlobalConcurrencyLimitLayer,
    Stack<ShedLayer, Stack<RequestSpans, Identity>>,
>;

/// Load shedding that answers in gRPC: a request that arrives while the inner service (the
/// concurrency limit) is not ready is refused at once with RESOURCE_EXHAUSTED, which clients and
/// shufflers treat as "retry later". Unlike tonic's own load shedding, the refusal is a response
/// the layers outside see (and count), not a transport error.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShedLayer;

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            ready: false,
        }
    }
}

/// See [`ShedLayer`].
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    ready: bool,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Shed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                self.ready = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.ready = false;
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if std::mem::take(&mut self.ready) {
            Box::pin(self.inner.call(req))
        } else {
            let refused = tonic::Status::resource_exhausted(
                "the server holds its limit of requests in flight; retry later",
            )
            .into_http();
            Box::pin(std::future::ready(Ok(refused)))
        }
    }
}

/// How long a peer may take to finish the TLS handshake before its connection is closed.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The connections a gRPC server serves: plaintext (tests, `--insecure`) or after a TLS
/// handshake. Serve each with [`serve_incoming!`](crate::serve_incoming).
#[derive(Debug)]
pub enum Incoming {
    /// Plaintext connections.
    Plain(LimitedIncoming),
    /// TLS connections.
    Tls(TlsIncoming),
}

/// Serves a tonic router over an [`Incoming`] until `signal` resolves: one call for both kinds
/// of connection (`serve_incoming!(router, incoming, signal)`).
#[macro_export]
macro_rules! serve_incoming {
    ($router:expr, $incoming:expr, $signal:expr) => {
        match $incoming {
            $crate::serve::Incoming::Plain(i) => {
                $router.serve_with_incoming_shutdown(i, $signal).await
            }
            $crate::serve::Incoming::Tls(i) => {
                $router.serve_with_incoming_shutdown(i, $signal).await
            }
        }
    };
}

/// Accepted connections after their TLS handshake. Handshakes run concurrently, each bounded by
/// a timeout, so one stalled peer holds up nobody else; a failed one closes its connection and
/// counts in `hush_tls_handshake_failures_total`.
pub struct TlsIncoming {
    inner: LimitedIncoming,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: JoinSet<std::io::Result<tokio_rustls::server::TlsStream<LimitedStream>>>,
    done: bool,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIncoming")
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl Stream for TlsIncoming {
    type Item = std::io::Result<tokio_rustls::server::TlsStream<LimitedStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while !this.done {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    let acceptor = this.acceptor.clone();
                    this.handshakes.spawn(async move {
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                            .map_err(|_| {
                                std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "the TLS handshake timed out",
                                )
                            })?
                    });
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.done = true,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(Ok(Err(e)))) => {
                    metrics::counter!(crate::metrics::names::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::debug!(error = %e, "a TLS handshake failed");
                }
                Poll::Ready(Some(Err(e))) => {
                    metrics::counter!(crate::metrics::names::TLS_HANDSHAKE_FAILURES).increment(1);
                    tracing::warn!(error = %e, "a TLS handshake task failed");
                }
                Poll::Ready(None) if this.done => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A stream of accepted connections that closes those past the limit at once.
#[derive(Debug)]
pub struct LimitedIncoming {
    inner: TcpIncoming,
    permits: Arc<Semaphore>,
}

impl Stream for LimitedIncoming {
    type Item = Result<LimitedStream, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(stream))) => match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        return Poll::Ready(Some(Ok(LimitedStream {
                            stream,
                            _permit: permit,
                        })));
                    }
                    Err(_) => {
                        // Dropping the stream closes it.
                        metrics::counter!(crate::metrics::names::CONNECTIONS_REFUSED).increment(1);
                        tracing::warn!(
                            "refused a connection: the server holds its limit of open connections"
                        );
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An accepted connection holding one of the server's connection permits.
#[derive(Debug)]
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The largest gRPC message a server decodes for `items` items of at most `item_bytes` each,
/// with `overhead` bytes for framing and the other fields.
pub fn message_limit(items: usize, item_bytes: usize, overhead: usize) -> usize {
    items
        .saturating_mul(item_bytes.saturating_add(16))
        .saturating_add(overhead)
}

/// Resolves on Ctrl-C or SIGTERM: every hush server process drains and stops on it.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
