//! `hush task create|list|stats`.

use std::path::PathBuf;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hush_aggregator::client;
use hush_protocol::proto::v1 as pb;
use hush_protocol::{Role, TaskConfig, TaskId, TaskParams, VerifyKey};
use tonic::transport::ClientTlsConfig;

use super::env_secret;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TaskCommand {
    /// Provision tasks from TOML files.
    ///
    /// With --leader and --helper, provisions both aggregators with a fresh shared verification
    /// key per task, or the one in HUSH_VDAF_VERIFY_KEY (admin tokens from
    /// HUSH_LEADER_ADMIN_TOKEN and HUSH_HELPER_ADMIN_TOKEN). With --route, also every shuffler
    /// of the task's route, after both aggregators and from the last shuffler back, so no hop
    /// accepts packets its next hop would refuse (admin token from HUSH_SHUFFLER_ADMIN_TOKEN,
    /// else HUSH_ADMIN_TOKEN). With --aggregator and --role, provisions one side only, as each
    /// of two operators does: the task file must then fix task_id, and both operators set the
    /// same verification key in HUSH_VDAF_VERIFY_KEY (base64url, 32 bytes; admin token from
    /// HUSH_LEADER_ADMIN_TOKEN or HUSH_HELPER_ADMIN_TOKEN by --role, else HUSH_ADMIN_TOKEN).
    /// With --shuffler, provisions a shuffler, which learns only the public config (admin token
    /// from HUSH_SHUFFLER_ADMIN_TOKEN, else HUSH_ADMIN_TOKEN).
    Create(CreateArgs),
    /// List an aggregator's tasks (admin token from HUSH_ADMIN_TOKEN).
    List {
        /// The aggregator's gRPC URL.
        #[arg(long)]
        aggregator: String,
        /// Only this tenant's tasks.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show a task's report counters at one aggregator (admin token from HUSH_ADMIN_TOKEN).
    Stats {
        /// The aggregator's gRPC URL.
        #[arg(long)]
        aggregator: String,
        /// The task id; omit for reports whose task was unknown or undecodable.
        #[arg(long, allow_hyphen_values = true)]
        task: Option<TaskId>,
    },
    /// Print a fresh random verification key for two operators to share.
    NewVerifyKey,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The task files (TOML; see docs/operators.md), comma- or space-separated.
    #[arg(long, required = true, value_delimiter = ',', num_args = 1.., value_parser = super::existing_file)]
    config: Vec<PathBuf>,
    /// The leader's gRPC URL.
    #[arg(long, requires = "helper", conflicts_with = "aggregator")]
    leader: Option<String>,
    /// The helper's gRPC URL.
    #[arg(long, requires = "leader")]
    helper: Option<String>,
    /// One aggregator's gRPC URL (with --role).
    #[arg(long, requires = "role")]
    aggregator: Option<String>,
    /// That aggregator's role in the task.
    #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
    role: Option<Role>,
    /// A shuffler's gRPC URL: provisions the task's public config there (no verification key).
    #[arg(long, conflicts_with_all = ["leader", "helper", "aggregator", "role"])]
    shuffler: Option<String>,
    /// With --leader and --helper: the route's shufflers, first to last (comma- or
    /// space-separated gRPC URLs); each gets the task's public config.
    #[arg(long, value_delimiter = ',', num_args = 1.., requires = "leader")]
    route: Vec<String>,
}

/// Provisions `task`'s public config on the shuffler at `url`; whether it was new there.
async fn create_on_shuffler(
    tls: Option<&ClientTlsConfig>,
    url: &str,
    token: &str,
    task: &TaskConfig,
) -> anyhow::Result<bool> {
    Ok(client::admin(url, token, tls)?
        .create_task(pb::CreateTaskRequest {
            task: Some(task.into()),
            vdaf_verify_key: Default::default(),
            role: "shuffler".into(),
        })
        .await
        .with_context(|| format!("provisioning the task on the shuffler at {url}"))?
        .into_inner()
        .created)
}

fn created(c: bool) -> &'static str {
    if c { "created" } else { "already present" }
}

fn read_task(path: &PathBuf) -> anyhow::Result<TaskConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let params: TaskParams =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(TaskConfig::new(params)?)
}

fn verify_key_from_env() -> anyhow::Result<VerifyKey> {
    let s = env_secret("HUSH_VDAF_VERIFY_KEY", "shared verification key")?;
    let b = URL_SAFE_NO_PAD
        .decode(s)
        .context("HUSH_VDAF_VERIFY_KEY is not unpadded base64url")?;
    Ok(VerifyKey::try_from(b.as_slice())?)
}

async fn create_on(
    tls: Option<&ClientTlsConfig>,
    url: &str,
    token: &str,
    task: &TaskConfig,
    role: Role,
    key: &VerifyKey,
) -> anyhow::Result<bool> {
    let mut admin = client::admin(url, token, tls)?;
    let resp = admin
        .create_task(pb::CreateTaskRequest {
            task: Some(task.into()),
            vdaf_verify_key: key.as_bytes().to_vec().into(),
            role: role.as_str().into(),
        })
        .await
        .with_context(|| format!("provisioning the task on the {role} at {url}"))?;
    Ok(resp.into_inner().created)
}

/// Provisions one task as `a` says.
async fn create(
    a: &CreateArgs,
    task: &TaskConfig,
    tls: Option<&ClientTlsConfig>,
) -> anyhow::Result<()> {
    if let Some(url) = &a.shuffler {
        let token = role_token("HUSH_SHUFFLER_ADMIN_TOKEN")?;
        let c = create_on_shuffler(tls, url, &token, task).await?;
        println!(
            "task {} ({}) {} on the shuffler",
            task.id(),
            task.tenant(),
            created(c)
        );
        return Ok(());
    }
    match (&a.leader, &a.helper, &a.aggregator, a.role) {
        (Some(l), Some(h), None, _) => {
            let key = match std::env::var("HUSH_VDAF_VERIFY_KEY") {
                Ok(_) => verify_key_from_env()?,
                Err(_) => VerifyKey::random(),
            };
            let lt = env_secret("HUSH_LEADER_ADMIN_TOKEN", "leader's admin token")?;
            let ht = env_secret("HUSH_HELPER_ADMIN_TOKEN", "helper's admin token")?;
            let cl = create_on(tls, l, &lt, task, Role::Leader, &key).await?;
            let ch = create_on(tls, h, &ht, task, Role::Helper, &key).await?;
            println!(
                "task {} ({}) {} on the leader, {} on the helper",
                task.id(),
                task.tenant(),
                created(cl),
                created(ch)
            );
            if !a.route.is_empty() {
                let token = role_token("HUSH_SHUFFLER_ADMIN_TOKEN")?;
                // From the last hop back: a shuffler forwards only to a hop that has
                // the task already.
                for url in a.route.iter().rev() {
                    let c = create_on_shuffler(tls, url, &token, task).await?;
                    println!("  {} on the shuffler at {url}", created(c));
                }
            }
        }
        (None, None, Some(url), Some(role)) => {
            let key = verify_key_from_env()?;
            let token = role_token(match role {
                Role::Leader => "HUSH_LEADER_ADMIN_TOKEN",
                _ => "HUSH_HELPER_ADMIN_TOKEN",
            })?;
            let c = create_on(tls, url, &token, task, role, &key).await?;
            println!(
                "task {} ({}) {} on the {role}",
                task.id(),
                task.tenant(),
                if c { "created" } else { "already present" }
            );
        }
        _ => anyhow::bail!("give --leader and --helper, or --aggregator and --role, or --shuffler"),
    }
    Ok(())
}

/// An admin token from `role_var`, else HUSH_ADMIN_TOKEN (as the servers read theirs).
pub(crate) fn role_token(role_var: &str) -> anyhow::Result<String> {
    hush_server::auth::admin_token_from_env(role_var, hush_server::auth::DEFAULT_ADMIN_TOKEN_ENV)
        .map_err(anyhow::Error::msg)
}

pub(crate) async fn run(cmd: TaskCommand, tls: Option<&ClientTlsConfig>) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Create(a) => {
            // Every file is read and checked before anything is provisioned.
            let tasks = a
                .config
                .iter()
                .map(read_task)
                .collect::<anyhow::Result<Vec<_>>>()?;
            for task in &tasks {
                create(&a, task, tls).await?;
            }
        }
        TaskCommand::List { aggregator, tenant } => {
            let token = env_secret("HUSH_ADMIN_TOKEN", "admin token")?;
            let list = client::admin(&aggregator, &token, tls)?
                .list_tasks(pb::ListTasksRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            for t in &list.tasks {
                let t = TaskConfig::try_from(t)?;
                println!(
                    "{}  tenant={}  kind={:?}  buckets={}  window={}s  ε/collection={}  name={:?}",
                    t.id(),
                    t.tenant(),
                    t.kind(),
                    t.output_len(),
                    t.time_precision_s(),
                    t.epsilon_per_collection(),
                    t.name()
                );
            }
            if list.tasks.is_empty() {
                println!("no tasks");
            }
        }
        TaskCommand::Stats { aggregator, task } => {
            let token = env_secret("HUSH_ADMIN_TOKEN", "admin token")?;
            let s = client::admin(&aggregator, &token, tls)?
                .get_task_stats(pb::GetTaskStatsRequest {
                    task_id: task
                        .map(|t| t.as_bytes().to_vec())
                        .unwrap_or_default()
                        .into(),
                })
                .await?
                .into_inner();
            println!("accepted:   {}", s.reports_accepted);
            println!("aggregated: {}", s.reports_aggregated);
            println!("pending:    {}", s.reports_pending);
            println!(
                "late:       {} (arrived after their window was collected: a shuffler held them, or the results service's collect_delay_s is too short for the cascade)",
                s.reports_late
            );
            for r in &s.rejected {
                let name = pb::RejectReason::try_from(r.reason)
                    .map(|r| {
                        r.as_str_name()
                            .trim_start_matches("REJECT_REASON_")
                            .to_lowercase()
                    })
                    .unwrap_or_else(|_| format!("reason {}", r.reason));
                println!("rejected {name}: {}", r.count);
            }
        }
        TaskCommand::NewVerifyKey => {
            println!("{}", URL_SAFE_NO_PAD.encode(VerifyKey::random().as_bytes()));
        }
    }
    Ok(())
}
