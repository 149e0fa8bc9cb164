//! `hush audit verify|show --data-dir DIR`: check and read an aggregator's audit trail.

use std::path::PathBuf;

use anyhow::Context;
use hush_aggregator::store::Store;

/// Check or read an aggregator's audit trail. The aggregator must be stopped (sled allows one
/// process per database), or point `--data-dir` at a copy of its data directory.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuditCommand {
    /// Walk the hash chain: exits non-zero naming the first changed, removed or reordered entry.
    Verify {
        /// The aggregator's `data_dir`.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print entries, oldest first, optionally only one tenant's or a time range's.
    Show {
        /// The aggregator's `data_dir`.
        #[arg(long)]
        data_dir: PathBuf,
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

fn open(dir: &std::path::Path) -> anyhow::Result<Store> {
    anyhow::ensure!(
        dir.join("db").exists(),
        "{} holds no aggregator database (expected {}/db)",
        dir.display(),
        dir.display()
    );
    Store::open(dir, 16).with_context(|| format!("opening {}", dir.display()))
}

pub(crate) fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify { data_dir } => {
            let store = open(&data_dir)?;
            let n = store
                .audit()
                .verify()
                .with_context(|| format!("the audit trail in {} is broken", data_dir.display()))?;
            println!("audit trail intact: {n} entries");
            Ok(())
        }
        AuditCommand::Show {
            data_dir,
            tenant,
            since,
            until,
            json,
        } => {
            let store = open(&data_dir)?;
            for e in store.audit().entries()? {
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
