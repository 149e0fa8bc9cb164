//! An axum service that adopts hush without changing its instrumentation.
//!
//! It already has what most services have: tower-http's `TraceLayer` opening a "request" span
//! per request with the matched route in `http.route`, a latency histogram and an error counter
//! recorded with the `metrics` facade, and its own Prometheus page at `/metrics`. Adopting hush
//! adds the lines marked `hush:` — the client from its configuration file, a tracing layer that
//! records each route's span durations into its latency task, and a recorder that routes the
//! error counter into the errors task while every metric still reaches the local Prometheus.
//!
//! Against the demo cluster:
//!
//! ```text
//! cargo run --release --bin hush -- demo --serve        # prints the client config's path
//! cargo run -p hush-example-axum -- --config /tmp/.../client/client.toml --requests 40
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use axum::extract::MatchedPath;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use clap::Parser;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::prelude::*;

/// An example service reporting to hush.
#[derive(Debug, Parser)]
struct Args {
    /// The hush client configuration (`hush demo --serve` writes one).
    #[arg(long)]
    config: PathBuf,
    /// Where the service listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Requests to send to itself once up, alternating between its routes (its traffic).
    #[arg(long, default_value_t = 40)]
    requests: u64,
    /// Exit after those requests (uploading the open window) instead of serving until Ctrl-C.
    #[arg(long)]
    exit: bool,
}

/// `POST /pay`: 20–80 ms of work; one in ten fails.
async fn pay() -> StatusCode {
    let (ms, fail) = {
        let mut rng = rand::rng();
        (rng.random_range(20..80), rng.random_ratio(1, 10))
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    if fail {
        metrics::counter!("http_errors_total", "route" => "/pay").increment(1);
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

/// `GET /search`: 40–160 ms of work.
async fn search() -> &'static str {
    let ms = rand::rng().random_range(40..160);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "[]"
}

/// Sends one request to the service and returns its status code.
async fn call(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();

    // hush: the client, from its own configuration file (endpoints, CA, tasks).
    let config = hush_client::ClientConfig::from_file(&args.config)?;
    let hush = hush_client::HushClient::from_config(&config).await?;
    // hush: each route's "request" spans are recorded into that route's latency task.
    let layer = hush_client::HushLayer::new(hush.clone())
        .span_with_field("request", "http.route", "/pay", "checkout", "POST /pay")
        .span_with_field("request", "http.route", "/search", "search", "GET /search");
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer().with_filter(tracing_subscriber::EnvFilter::new(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )),
        )
        .init();
    // hush: the service's own Prometheus recorder, wrapped; its error counter also counts
    // into the errors task.
    let local = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = local.handle();
    let recorder = hush_client::HushRecorder::new(&hush, local).counter(
        "http_errors_total",
        &[("route", "/pay")],
        "errors",
    );
    metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("{e}"))?;

    // The service as it was: routes, a span per request with its route, its own metrics page.
    let app = axum::Router::new()
        .route("/pay", post(pay))
        .route("/search", get(search))
        .route("/metrics", get(move || async move { prometheus.render() }))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("unmatched", MatchedPath::as_str);
                tracing::info_span!("request", method = %req.method(), "http.route" = route)
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("example service on http://{addr} (its own metrics at /metrics)");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // Its traffic.
    let mut failed = 0;
    for i in 0..args.requests {
        let (method, path) = if i % 2 == 0 {
            ("POST", "/pay")
        } else {
            ("GET", "/search")
        };
        if call(addr, method, path).await? != 200 {
            failed += 1;
        }
    }
    println!("served {} requests ({failed} failed)", args.requests);
    if !args.exit {
        println!("serving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    // Report the open window and upload before exiting.
    let uploaded = hush.shutdown(Duration::from_secs(30)).await;
    let s = hush.stats();
    println!(
        "hush client: {} events recorded, {} dropped over the per-window bound; {} reports sent, {} accepted, {} refused; uploaded everything: {uploaded}",
        s.recorded,
        s.dropped_over_bound,
        s.reports_sent,
        s.accepted,
        s.rejected.iter().map(|(_, n)| n).sum::<u64>()
    );
    server.abort();
    anyhow::ensure!(
        uploaded,
        "the client could not upload everything within 30 s"
    );
    Ok(())
}
