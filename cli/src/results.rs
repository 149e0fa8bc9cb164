//! `hush results --config FILE` runs the service; `hush results windows|alerts|budget|collect`
//! asks a running one ([`crate::analyst`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
use hush_protocol::{Codec, HpkeKeypair, SystemClock};

/// Run a tenant's results service, or ask a running one.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct Args {
    #[command(subcommand)]
    query: Option<super::analyst::Query>,
    /// The TOML config file. Secrets come from the environment variables it names: the
    /// tenant's collector token (HUSH_TENANT_TOKEN), the collector key pair from `hush keygen`
    /// (HUSH_COLLECTOR_KEY), the token every read of the results APIs must present
    /// (HUSH_RESULTS_READ_TOKEN), and optionally the API token that allows ad-hoc collections
    /// (HUSH_RESULTS_TOKEN).
    #[arg(long, required = true, value_parser = super::existing_file)]
    config: Option<PathBuf>,
    /// Serve and connect plaintext (no [tls] section). For tests and loopback experiments
    /// only: peers are then neither authenticated nor encrypted.
    #[arg(long)]
    insecure: bool,
}

pub(crate) async fn run(
    args: Args,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<()> {
    if let Some(q) = args.query {
        return super::analyst::run(q, tls)
            .await
            .map_err(|e| super::tool_hint(e, tls.is_some()));
    }
    let Some(path) = args.config else {
        anyhow::bail!("give --config FILE to run the service, or a query (hush results --help)");
    };
    let mut config = ResultsConfig::from_file(&path)?;
    super::certs::require_tls_or_insecure(config.tls.is_some(), args.insecure)?;
    config.insecure = args.insecure;
    let key = super::env_secret(&config.collector_key_env, "collector key pair")?;
    let key = URL_SAFE_NO_PAD
        .decode(key)
        .with_context(|| format!("{} is not unpadded base64url", config.collector_key_env))?;
    let secrets = ResultsSecrets {
        tenant_token: super::env_secret(&config.tenant_token_env, "tenant collector token")?,
        collector_key: HpkeKeypair::from_bytes(&key).with_context(|| {
            format!(
                "{} is not a key pair from `hush keygen`",
                config.collector_key_env
            )
        })?,
        api_token: std::env::var(&config.api_token_env)
            .ok()
            .filter(|t| !t.trim().is_empty()),
        read_token: super::env_secret(&config.read_token_env, "results read token")?,
    };
    let svc = ResultsService::start(config, secrets, Arc::new(SystemClock))
        .await
        .context("starting the results service")?;
    // Tools and tests that start the process read these lines to learn the bound addresses.
    if let Some(m) = svc.metrics_addr() {
        println!("metrics on {m}");
    }
    println!("http on {}", svc.http_addr());
    println!("listening on {}", svc.grpc_addr());
    hush_server::serve::shutdown_signal().await;
    tracing::info!("shutting down");
    svc.shutdown().await?;
    Ok(())
}
