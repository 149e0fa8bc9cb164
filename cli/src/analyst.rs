//! `hush results windows|alerts|budget|collect`: what an analyst asks the results service, over
//! its gRPC API, printed as a table, JSON (`--json`) or CSV (`--csv`). JSON and CSV are the
//! HTTP API's own shapes and writers, so a script can switch between them.

use anyhow::Context;
use hush_collector::http::{AlertJson, BudgetJson, WindowJson, alerts_csv, windows_csv};
use hush_protocol::TaskId;
use hush_protocol::link::AddBearer;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::results_client::ResultsClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

/// Ask the results service.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Query {
    /// Released windows of a task, oldest first.
    Windows(WindowsArgs),
    /// Alerts of a task, or of every task.
    Alerts(AlertsArgs),
    /// What is left of a task's privacy budget, spending nothing.
    Budget(BudgetArgs),
    /// Collect an interval now (a drill-down): spends budget; needs the API token
    /// (HUSH_RESULTS_TOKEN).
    Collect(CollectArgs),
}

/// Where the results service is and how to print.
#[derive(Debug, clap::Args)]
pub(crate) struct Conn {
    /// The results service's gRPC URL (`listen_grpc`); https:// with the CA of `--ca`.
    #[arg(
        long,
        env = "HUSH_RESULTS_URL",
        default_value = "http://127.0.0.1:7201"
    )]
    url: String,
    /// Print JSON (the HTTP API's shapes).
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV (the HTTP API's columns).
    #[arg(long)]
    csv: bool,
}

/// A time range: window starts in [from, to).
#[derive(Debug, clap::Args)]
pub(crate) struct Range {
    /// From (seconds since the epoch, `now`, or relative: `-30m`, `-6h`, `-7d`).
    #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
    from: Option<u64>,
    /// To, exclusive (same forms).
    #[arg(long, value_parser = parse_time, allow_hyphen_values = true)]
    to: Option<u64>,
}

/// `hush results windows`.
#[derive(Debug, clap::Args)]
pub(crate) struct WindowsArgs {
    /// The task id (base64url, as `hush task create` printed it).
    #[arg(long, allow_hyphen_values = true)]
    task: TaskId,
    #[command(flatten)]
    range: Range,
    #[command(flatten)]
    conn: Conn,
}

/// `hush results alerts`.
#[derive(Debug, clap::Args)]
pub(crate) struct AlertsArgs {
    /// The task id; every task's alerts without it.
    #[arg(long, allow_hyphen_values = true)]
    task: Option<TaskId>,
    #[command(flatten)]
    range: Range,
    #[command(flatten)]
    conn: Conn,
}

/// `hush results budget`.
#[derive(Debug, clap::Args)]
pub(crate) struct BudgetArgs {
    /// The task id.
    #[arg(long, allow_hyphen_values = true)]
    task: TaskId,
    /// An aligned interval; without it, the newest released window.
    #[command(flatten)]
    range: Range,
    #[command(flatten)]
    conn: Conn,
}

/// `hush results collect`.
#[derive(Debug, clap::Args)]
pub(crate) struct CollectArgs {
    /// The task id.
    #[arg(long, allow_hyphen_values = true)]
    task: TaskId,
    #[command(flatten)]
    range: Range,
    /// Which share of the budget pays.
    #[arg(long, value_enum, default_value_t = Purpose::Alert)]
    purpose: Purpose,
    #[command(flatten)]
    conn: Conn,
}

/// The purposes, spelled as in TOML and JSON.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Purpose {
    /// The alert share: drill-downs.
    Alert,
    /// The routine share.
    Routine,
}

/// Seconds since the epoch from `s`: a number, `now`, or `-<n><s|m|h|d>` before now.
fn parse_time(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    if s == "now" {
        return Ok(now);
    }
    if let Some(rel) = s.strip_prefix('-') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{s:?}: expected e.g. -30m, -6h or -7d"))?;
        let unit = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
        };
        return Ok(now.saturating_sub(n.saturating_mul(unit)));
    }
    s.parse()
        .map_err(|_| format!("{s:?}: give seconds since the epoch, now, or e.g. -6h"))
}

type Client = ResultsClient<InterceptedService<Channel, AddBearer>>;

fn client(
    conn: &Conn,
    tls: Option<&ClientTlsConfig>,
    token_env: &str,
    what: &str,
) -> anyhow::Result<Client> {
    let token = super::env_secret(token_env, what)?;
    let channel = hush_protocol::link::channel(&conn.url, tls, "--url")?;
    Ok(
        ResultsClient::with_interceptor(channel, AddBearer::new(&token)?)
            .max_decoding_message_size(64 << 20),
    )
}

fn est(e: &Option<hush_collector::estimate::Estimate>) -> String {
    match e {
        None => "-".into(),
        Some(e) if e.ci_high.is_finite() => {
            format!("{:.1} [{:.1}, {:.1}]", e.value, e.ci_low, e.ci_high)
        }
        Some(e) => format!("{:.1} [{:.1}, ∞)", e.value, e.ci_low),
    }
}

fn print_windows(conn: &Conn, ws: &[WindowJson]) -> anyhow::Result<()> {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(ws)?);
    } else if conn.csv {
        print!("{}", windows_csv(ws)?);
    } else {
        println!(
            "{:>12} {:>24} {:>24} {:>24} {:>24} {:>24}",
            "start", "reports", "total", "p50 ms", "p95 ms", "p99 ms"
        );
        for w in ws {
            // A withheld quantile says so instead of "-".
            let q = |e: &Option<hush_collector::estimate::Estimate>, name: &str| {
                if e.is_none() && w.withheld.iter().any(|r| r.starts_with(name)) {
                    "too few reports".to_owned()
                } else {
                    est(e)
                }
            };
            println!(
                "{:>12} {:>24} {:>24} {:>24} {:>24} {:>24}",
                w.start,
                est(&w.reports),
                est(&w.total),
                q(&w.p50_ms, "p50:"),
                q(&w.p95_ms, "p95:"),
                q(&w.p99_ms, "p99:")
            );
        }
        if ws.iter().any(|w| !w.withheld.is_empty()) {
            println!(
                "too few reports: the noise at this volume and ε cannot bound that quantile \
                 (--json shows each window's reason)"
            );
        }
    }
    Ok(())
}

/// Every page of a list: `page(token)` answers one page's items and the next token (empty on
/// the last page).
async fn every_page<T, F, Fut>(mut page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Runs one query.
pub(crate) async fn run(q: Query, tls: Option<&ClientTlsConfig>) -> anyhow::Result<()> {
    const READ: &str = "HUSH_RESULTS_READ_TOKEN";
    match q {
        Query::Windows(a) => {
            let c = client(&a.conn, tls, READ, "results read token")?;
            let all = every_page(|page_token| {
                let mut c = c.clone();
                let req = pb::ListWindowsRequest {
                    task_id: a.task.as_bytes().to_vec().into(),
                    from: a.range.from.unwrap_or(0),
                    to: a.range.to.unwrap_or(0),
                    page_size: 0,
                    page_token,
                };
                async move {
                    let p = c
                        .list_windows(req)
                        .await
                        .context("listing windows")?
                        .into_inner();
                    Ok((
                        p.windows.iter().map(WindowJson::from).collect(),
                        p.next_page_token,
                    ))
                }
            })
            .await?;
            print_windows(&a.conn, &all)
        }
        Query::Alerts(a) => {
            let c = client(&a.conn, tls, READ, "results read token")?;
            let all = every_page(|page_token| {
                let mut c = c.clone();
                let req = pb::ListAlertsRequest {
                    task_id: a
                        .task
                        .map(|t| t.as_bytes().to_vec())
                        .unwrap_or_default()
                        .into(),
                    from: a.range.from.unwrap_or(0),
                    to: a.range.to.unwrap_or(0),
                    page_size: 0,
                    page_token,
                };
                async move {
                    let p = c
                        .list_alerts(req)
                        .await
                        .context("listing alerts")?
                        .into_inner();
                    Ok((
                        p.alerts.iter().map(AlertJson::from).collect(),
                        p.next_page_token,
                    ))
                }
            })
            .await?;
            if a.conn.json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if a.conn.csv {
                print!("{}", alerts_csv(&all)?);
            } else {
                for x in &all {
                    println!(
                        "{} {} {}: {}",
                        x.window_start, x.task_id, x.detector, x.explanation
                    );
                }
            }
            Ok(())
        }
        Query::Budget(a) => {
            let mut c = client(&a.conn, tls, READ, "results read token")?;
            let b = c
                .get_budget(pb::GetBudgetRequest {
                    task_id: a.task.as_bytes().to_vec().into(),
                    interval: interval(&a.range)?,
                })
                .await
                .context("reading the budget")?
                .into_inner();
            let b = BudgetJson::new(&a.task, &b);
            if a.conn.csv {
                let mut w = csv::Writer::from_writer(Vec::new());
                for p in &b.purposes {
                    w.serialize(p)?;
                }
                print!("{}", String::from_utf8(w.into_inner()?)?);
            } else if a.conn.json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!(
                    "task {}, window(s) [{}, {})",
                    b.task_id,
                    b.start,
                    b.start + b.duration
                );
                for p in &b.purposes {
                    println!(
                        "{:>8}: ε {} of {} left, {} collections of ε {}",
                        p.purpose, p.left, p.budget, p.collections_left, p.epsilon_per_collection
                    );
                }
            }
            Ok(())
        }
        Query::Collect(a) => {
            let mut c = client(
                &a.conn,
                tls,
                "HUSH_RESULTS_TOKEN",
                "results API token (it spends budget)",
            )?;
            let interval =
                interval(&a.range)?.context("give --from and --to: the interval to collect")?;
            let resp = c
                .collect_ad_hoc(pb::CollectAdHocRequest {
                    task_id: a.task.as_bytes().to_vec().into(),
                    interval: Some(interval),
                    purpose: match a.purpose {
                        Purpose::Alert => pb::BudgetPurpose::Alert,
                        Purpose::Routine => pb::BudgetPurpose::Routine,
                    } as i32,
                })
                .await
                .context("collecting")?;
            let left = resp
                .metadata()
                .get("hush-budget-left-micro")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let w = WindowJson::from(resp.get_ref());
            print_windows(&a.conn, std::slice::from_ref(&w))?;
            if let Some(l) = left
                && !a.conn.json
                && !a.conn.csv
            {
                eprintln!("spent ε {}; ε {} left", w.epsilon, l as f64 / 1e6);
            }
            Ok(())
        }
    }
}

/// The interval of a range: both ends or neither.
fn interval(r: &Range) -> anyhow::Result<Option<pb::Interval>> {
    match (r.from, r.to) {
        (None, None) => Ok(None),
        (Some(f), Some(t)) if t > f => Ok(Some(pb::Interval {
            start: f,
            duration: t - f,
        })),
        _ => anyhow::bail!("give both --from and --to (from before to), or neither"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_seconds_now_or_relative() {
        assert_eq!(parse_time("120").unwrap(), 120);
        let now = parse_time("now").unwrap();
        let h = parse_time("-6h").unwrap();
        assert!((now - h).abs_diff(6 * 3_600) <= 1);
        assert!(parse_time("-6w").unwrap_err().contains("unit"));
        assert!(parse_time("yesterday").unwrap_err().contains("seconds"));
    }
}
