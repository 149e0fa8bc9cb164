//! `hush audit verify|show --data-dir DIR`: check and read an aggregator's audit trail.

use std::path::PathBuf;

use anyhow::Context;
use hush_aggregator::store::Store;

/// Check or read an aggregator's audit trail. On sled the aggregator must be stopped (sled allows
/// one process per database), or point `--data-dir` at a copy of its data directory; on
/// PostgreSQL (`--config` with `[store] kind = "postgres"`) it runs beside the service.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuditCommand {
    /// Walk the hash chain: exits non-zero naming the first changed, removed or reordered entry.
    Verify {
        #[command(flatten)]
        at: Where,
    },
    /// Print entries, oldest first, optionally only one tenant's or a time range's.
    Show {
        #[command(flatten)]
        at: Where,
        /// Only entries about this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only entries at or after this time (seconds since the epoch).
        #[arg(long)]
        since: Option<u64>,
        /// Only entries before this time (seconds since the epoch).
        #[arg(long)]
        until: Option<u64>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Which aggregator's store: a sled data directory, or the aggregator's configuration file.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Where {
    /// The aggregator's `data_dir` (sled).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The aggregator's configuration: its `[store]` says where the trail is (for PostgreSQL
    /// the URL is read from the variable `[store] url_env` names).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Where {
    fn describe(&self) -> String {
        match (&self.data_dir, &self.config) {
            (Some(d), _) => d.display().to_string(),
            (_, Some(c)) => format!("the store of {}", c.display()),
            _ => "nowhere".into(),
        }
    }

    async fn open(&self) -> anyhow::Result<Store> {
        if let Some(dir) = &self.data_dir {
            anyhow::ensure!(
                dir.join("db").exists(),
                "{} holds no aggregator database (expected {}/db)",
                dir.display(),
                dir.display()
            );
            return Store::open(dir, 16).with_context(|| format!("opening {}", dir.display()));
        }
        let path = self.config.as_ref().context("--data-dir or --config")?;
        let config = hush_aggregator::config::AggregatorConfig::from_file(path)
            .with_context(|| format!("reading {}", path.display()))?;
        Store::from_config_existing(&config)
            .await
            .with_context(|| format!("opening the store of {}", path.display()))
    }
}

pub(crate) async fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify { at } => {
            let store = at.open().await?;
            let n = store
                .audit()
                .verify()
                .await
                .with_context(|| format!("the audit trail in {} is broken", at.describe()))?;
            println!("audit trail intact: {n} entries");
            Ok(())
        }
        AuditCommand::Show {
            at,
            tenant,
            since,
            until,
            json,
        } => {
            let store = at.open().await?;
            for e in store.audit().entries().await? {
                if tenant.as_ref().is_some_and(|t| &e.event.tenant != t)
                    || since.is_some_and(|s| e.time < s)
                    || until.is_some_and(|u| e.time >= u)
                {
                    continue;
                }
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!("{e}");
                }
            }
            Ok(())
        }
    }
}
