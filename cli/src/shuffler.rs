//! `hush shuffler --config FILE`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hush_protocol::SystemClock;
use hush_shuffler::{ShufflerConfig, ShufflerNode};

/// Run one shuffler.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The TOML config file. The admin token comes from the environment variable it names
    /// (by default HUSH_ADMIN_TOKEN).
    #[arg(long, value_parser = super::existing_file)]
    config: PathBuf,
    /// Serve and connect plaintext (no [tls] section). For tests and loopback experiments
    /// only: peers are then neither authenticated nor encrypted.
    #[arg(long)]
    insecure: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let config = ShufflerConfig::from_file(&args.config)?;
    super::certs::require_tls_or_insecure(config.tls.is_some(), args.insecure)?;
    // With the default variable, HUSH_SHUFFLER_ADMIN_TOKEN comes first (one shell, a whole
    // cluster).
    let token = hush_server::auth::admin_token_from_env(
        "HUSH_SHUFFLER_ADMIN_TOKEN",
        &config.admin_token_env,
    )
    .map_err(anyhow::Error::msg)?;
    let node = ShufflerNode::start(config, &token, Arc::new(SystemClock))
        .await
        .context("starting the shuffler")?;
    // Tools and tests that start the process read these lines to learn the bound addresses.
    if let Some(m) = node.metrics_addr() {
        println!("metrics on {m}");
    }
    println!("listening on {}", node.local_addr());
    hush_server::serve::shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await?;
    Ok(())
}
