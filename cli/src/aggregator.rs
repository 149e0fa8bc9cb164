//! `hush aggregator --role leader|helper --config FILE`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use hush_aggregator::{Aggregator, AggregatorConfig, Secrets};
use hush_protocol::{Role, SystemClock};

/// Run one aggregator.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The role of this aggregator.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// The TOML config file. Secrets come from the environment variables it names
    /// (by default HUSH_ADMIN_TOKEN and HUSH_PEER_TOKEN).
    #[arg(long, value_parser = super::existing_file)]
    config: PathBuf,
    /// Serve and connect plaintext (no [tls] section). For tests and loopback experiments
    /// only: peers are then neither authenticated nor encrypted.
    #[arg(long)]
    insecure: bool,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let config = AggregatorConfig::from_file(&args.config)?;
    super::certs::require_tls_or_insecure(config.tls.is_some(), args.insecure)?;
    let secrets = Secrets::from_env(args.role, &config)?;
    let agg = Aggregator::start(args.role, config, secrets, Arc::new(SystemClock))
        .await
        .context("starting the aggregator")?;
    // Tools and tests that start the process read these lines to learn the bound addresses.
    if let Some(m) = agg.metrics_addr() {
        println!("metrics on {m}");
    }
    println!("listening on {}", agg.local_addr());
    agg.run_until_signal().await?;
    Ok(())
}
