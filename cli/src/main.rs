//! `hush`: the front door to every hush role and tool. One file per command, each thin over
//! the libraries: `aggregator` (hush-aggregator), `shuffler` (hush-shuffler), `results`
//! (hush-collector), `task`, `keys`, `tenant`, `keygen`, `certs`, `init`, `audit`; the demo, load,
//! chaos, soak and simulation commands run hush-sim's in-process cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod aggregator;
mod analyst;
mod audit;
mod certs;
mod init;
mod keys;
mod results;
mod shuffler;
mod task;

/// hush: secure multi-party aggregation of service telemetry.
#[derive(Debug, Parser)]
#[command(name = "hush", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// More log output (debug level); RUST_LOG overrides.
    #[arg(short, long, global = true)]
    pub(crate) verbose: bool,
    /// CA certificates (PEM) that operators' tools (`task`, `keys`, `tenant`) trust for
    /// `https://` URLs.
    #[arg(long, global = true, env = "HUSH_CA", value_parser = existing_file)]
    pub(crate) ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one aggregator (leader or helper) until SIGINT or SIGTERM.
    Aggregator(aggregator::Args),
    /// Run the whole cluster on loopback with simulated services and print per window what the
    /// collector sees: report counts, latency quantiles with 95% confidence intervals, error
    /// rates.
    Demo(hush_sim::demo::DemoArgs),
    /// Run the cluster as processes (mutual TLS) at a fixed report rate; print throughput, p99
    /// upload latency, peak memory per process, and check every acknowledged report is
    /// aggregated exactly once (exit 1 otherwise).
    Load(hush_sim::load::LoadArgs),
    /// Simulated service instances reporting into a running cluster (its first shuffler, key
    /// directory, CA and task files, or a client config); prints what was recorded, sent,
    /// accepted and refused.
    Send(hush_sim::send::SendArgs),
    /// `load` while components are SIGKILLed and restarted at random; the same exactly-once
    /// check at the end.
    Chaos(hush_sim::load::ChaosArgs),
    /// Run the in-process cluster at a steady rate for many windows with every retention
    /// period shortened, and check that every sled tree stays flat (exit 1 otherwise).
    Soak(hush_sim::soak::SoakArgs),
    /// Sweep privacy (ε) and traffic against detection power, false alarms, time to detect and
    /// quantile error with the real noise mechanism and detectors; writes CSV, PNG plots and a
    /// markdown summary.
    Sim(hush_sim::sim::SimArgs),
    /// Run a tenant's results service until SIGINT or SIGTERM (`--config`): collects every
    /// closed window and serves the noisy statistics over gRPC and HTTP/JSON. With a subcommand,
    /// ask a running one (windows, alerts, budget, collect).
    Results(results::Args),
    /// Run one shuffler (mix node) until SIGINT or SIGTERM.
    Shuffler(shuffler::Args),
    /// Provision and inspect tasks on aggregators and shufflers.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Generate an HPKE key pair, e.g. for a task's collector.
    Keygen(keys::KeygenArgs),
    /// Manage an aggregator's HPKE keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Manage tenants' collector tokens on an aggregator.
    #[command(subcommand)]
    Tenant(keys::TenantCommand),
    /// Make a development CA and a certificate per component for mutual TLS.
    Certs(certs::CertsArgs),
    /// Write a whole cluster's configs, certificates, tokens, task files and keys for one
    /// operator (a trial) or two operators with their own CAs and a tenant.
    Init(init::InitArgs),
    /// Verify or show an aggregator's hash-chained audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

pub(crate) fn init_logging(format: LogFormat, verbose: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if verbose {
            "info,hush=debug,hush_aggregator=debug,hush_shuffler=debug"
        } else {
            "info"
        })
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = match &cli.ca {
        Some(p) => {
            let pem = std::fs::read(p).with_context(|| format!("reading --ca {}", p.display()))?;
            Some(hush_protocol::link::server_auth_client(&pem))
        }
        None => None,
    };
    let tls = tls.as_ref();
    let has_ca = tls.is_some();
    match cli.command {
        Command::Aggregator(a) => aggregator::run(a).await,
        Command::Shuffler(a) => shuffler::run(a).await,
        Command::Results(a) => results::run(a, tls).await,
        Command::Demo(a) => hush_sim::demo::run(a).await,
        Command::Load(a) => hush_sim::load::run_load(a).await,
        Command::Send(a) => hush_sim::send::run(a, cli.ca.clone())
            .await
            .map_err(|e| tool_hint(e, has_ca)),
        Command::Chaos(a) => hush_sim::load::run_chaos(a).await,
        Command::Soak(a) => hush_sim::soak::run(a).await,
        Command::Sim(a) => hush_sim::sim::run(a).await,
        Command::Task(t) => task::run(t, tls).await.map_err(|e| tool_hint(e, has_ca)),
        Command::Keygen(k) => keys::keygen(k),
        Command::Keys(k) => keys::run(k, tls).await.map_err(|e| tool_hint(e, has_ca)),
        Command::Tenant(t) => keys::run_tenant(t, tls)
            .await
            .map_err(|e| tool_hint(e, has_ca)),
        Command::Certs(c) => certs::run(c),
        Command::Init(i) => init::run(i),
        Command::Audit(a) => audit::run(a).await,
    }
}

/// An operator's tool talks TLS through `--ca`/`HUSH_CA`, not a `[tls]` section and
/// `--insecure` as a server does: a URL whose scheme does not match gets the tool's fix.
pub(crate) fn tool_hint(e: anyhow::Error, has_ca: bool) -> anyhow::Error {
    let url = e.chain().find_map(|c| match c.downcast_ref() {
        Some(hush_protocol::link::LinkError::Scheme { url, .. }) => Some(url.clone()),
        _ => None,
    });
    match url {
        Some(url) if url.starts_with("https://") && !has_ca => anyhow::anyhow!(
            "{url} is https://, so the tool verifies the server's certificate: pass the CA that \
             signs the operators' certificates with --ca FILE or HUSH_CA=FILE"
        ),
        Some(url) if url.starts_with("http://") && has_ca => anyhow::anyhow!(
            "{url} is plaintext http:// but --ca (or HUSH_CA) is set: use the server's https:// \
             URL, or drop --ca for a server started with --insecure"
        ),
        _ => e,
    }
}

/// Reads a secret from the environment.
pub(crate) fn env_secret(name: &str, what: &str) -> anyhow::Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => anyhow::bail!("set the {what} in the environment variable {name}"),
    }
}

/// A path argument that must name an existing file.
pub(crate) fn existing_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{s} is not a file"))
    }
}

/// The allocator: jemalloc. A request of a thousand 4 KB packets or reports is a buffer of
/// megabytes (decoding, encoding, a batch read back). glibc, with its mmap threshold fixed, maps
/// each such buffer afresh and unmaps it when freed, so every request paid its page faults again:
/// 6% of a shuffler's CPU. Left to raise that threshold itself, glibc kept the freed buffers in
/// per-thread heaps that grew with the length of a run instead. jemalloc reuses freed extents
/// (docs/architecture.md, *The shuffler at 0.8 of its bound*).
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts. One arena (jemalloc's default is four per core, with
/// threads spread over them; allocations of 8 MiB and more go to an arena of their own either
/// way): in the shuffler bench the default peaked a third higher, and grew with the run where one
/// arena stayed flat. Freed pages go back to the system after about a second, from a background
/// thread rather than from the thread that freed them. `_RJEM_MALLOC_CONF` in the environment
/// overrides any of them (for example `narenas:4` on a host with many cores, where one arena
/// could be contended).
///
/// Linux with glibc only: jemalloc's background threads do not run on macOS (it refuses to start
/// with them) nor on musl; elsewhere jemalloc keeps its defaults.
///
/// The workspace's one `unsafe`, which `.ci/run` checks stays the only one: the attribute
/// exports the symbol jemalloc reads (a weak default in jemalloc, so this definition wins). It
/// is a pointer to a NUL-terminated string that lives as long as the program.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 70] =
    b"narenas:1,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    init_logging(args.log_format, args.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hush: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hush: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// A base64url task id may begin with '-': it is still the value of --task.
    #[test]
    fn a_task_id_that_begins_with_a_hyphen_is_a_value() {
        let id = "-qBHlIcOTYpjNUL3hsBmX6dTqF1LVJvMJ0t8mvDCxJQ";
        for args in [
            &["hush", "results", "windows", "--task", id][..],
            &["hush", "results", "alerts", "--task", id],
            &[
                "hush",
                "task",
                "stats",
                "--aggregator",
                "https://x:1",
                "--task",
                id,
            ],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }
}
