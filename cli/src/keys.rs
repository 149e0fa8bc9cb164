//! `hush keygen`, `hush keys rotate`, `hush tenant set-token`.

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hush_aggregator::client;
use hush_protocol::proto::v1 as pb;
use hush_protocol::{Codec, HpkeConfig, HpkeKeypair};
use tonic::transport::ClientTlsConfig;

use super::env_secret;

/// Generate an HPKE key pair.
#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// The config id of the key (1-255).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    id: u8,
}

/// Prints a fresh key pair: the public config for task files and the secret key pair for the
/// environment of whoever opens (e.g. HUSH_COLLECTOR_KEY of the results service).
pub(crate) fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    let kp = HpkeKeypair::generate(a.id);
    println!(
        "# HPKE key pair: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM; config id {}",
        a.id
    );
    println!("# Public: put this in task files as collector_hpke_config.");
    println!(
        "hpke_config = \"{}\"",
        URL_SAFE_NO_PAD.encode(kp.config().to_bytes())
    );
    println!(
        "# Secret: keep it out of files; give it to the collector's environment (HUSH_COLLECTOR_KEY)."
    );
    println!("keypair = \"{}\"", URL_SAFE_NO_PAD.encode(kp.to_bytes()));
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum KeysCommand {
    /// Show an aggregator's or shuffler's HPKE configs (admin token from HUSH_ADMIN_TOKEN; the
    /// public HpkeKeys service answers key directories only).
    Show {
        /// The gRPC URL.
        #[arg(long)]
        url: String,
    },
    /// Make a fresh HPKE key current on an aggregator (admin token from HUSH_ADMIN_TOKEN). The
    /// previous key keeps opening reports for the configured grace period.
    Rotate {
        /// The aggregator's gRPC URL.
        #[arg(long)]
        aggregator: String,
    },
}

fn print_configs(configs: &[HpkeConfig]) {
    for (i, c) in configs.iter().enumerate() {
        println!(
            "id={} {} {}",
            c.id(),
            if i == 0 { "current" } else { "retired" },
            URL_SAFE_NO_PAD.encode(c.to_bytes())
        );
    }
}

pub(crate) async fn run(cmd: KeysCommand, tls: Option<&ClientTlsConfig>) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Show { url } => {
            let token = env_secret("HUSH_ADMIN_TOKEN", "admin token")?;
            let list = client::admin(&url, &token, tls)?
                .list_hpke_keys(pb::ListHpkeKeysRequest {})
                .await?
                .into_inner();
            print_configs(&Vec::<HpkeConfig>::try_from(&list)?);
        }
        KeysCommand::Rotate { aggregator } => {
            let token = env_secret("HUSH_ADMIN_TOKEN", "admin token")?;
            let list = client::admin(&aggregator, &token, tls)?
                .rotate_hpke_key(pb::RotateHpkeKeyRequest {})
                .await?
                .into_inner();
            print_configs(&Vec::<HpkeConfig>::try_from(&list)?);
        }
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TenantCommand {
    /// Set a tenant's collector bearer token (the token from HUSH_TENANT_TOKEN) at the leader,
    /// the aggregator that serves collections: --leader takes the admin token from
    /// HUSH_LEADER_ADMIN_TOKEN, else HUSH_ADMIN_TOKEN; --aggregator from HUSH_ADMIN_TOKEN. Only
    /// its SHA-256 hash is stored.
    SetToken {
        /// An aggregator's gRPC URL.
        #[arg(long, required_unless_present = "leader", conflicts_with = "leader")]
        aggregator: Option<String>,
        /// The leader's gRPC URL.
        #[arg(long)]
        leader: Option<String>,
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
}

pub(crate) async fn run_tenant(
    cmd: TenantCommand,
    tls: Option<&ClientTlsConfig>,
) -> anyhow::Result<()> {
    match cmd {
        TenantCommand::SetToken {
            aggregator,
            leader,
            tenant,
        } => {
            let token = env_secret("HUSH_TENANT_TOKEN", "tenant's collector token")?;
            let targets = [
                (aggregator, "the aggregator", None),
                (leader, "the leader", Some("HUSH_LEADER_ADMIN_TOKEN")),
            ];
            for (url, what, role_var) in targets {
                let Some(url) = url else { continue };
                let admin_token = match role_var {
                    Some(var) => super::task::role_token(var)?,
                    None => env_secret("HUSH_ADMIN_TOKEN", "admin token")?,
                };
                client::admin(&url, &admin_token, tls)?
                    .set_tenant_token(pb::SetTenantTokenRequest {
                        tenant: tenant.clone(),
                        token: token.clone(),
                    })
                    .await
                    .with_context(|| format!("setting the token at {what} ({url})"))?;
                println!("set the collector token of tenant {tenant} at {what}");
            }
        }
    }
    Ok(())
}
