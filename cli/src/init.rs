//! `hush init`: a matching set of configs, certificates, tokens, task ids, a verification key
//! and a collector key pair for a whole cluster, so a first cluster comes up in a few commands
//! (docs/operators.md, "Your first hour").
//!
//! Two layouts. `trial`: one folder, one CA and one shell hold everything, for one person
//! trying hush. `two-operators`: a folder per party — operator A (leader, first shuffler) and
//! operator B (helper, last shuffler), each with its own CA whose key never leaves its folder,
//! and the tenant (results service, client config) — holding only what that party must hold.
//! Every config uses paths relative to its own folder, so a folder can be copied to the
//! machine that runs it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{Codec, Epsilon, HpkeKeypair, MeasurementKind, TaskId, TaskParams, VerifyKey};
use hush_server::tls::dev::{DevCa, loopback_hosts};

/// Who runs what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Layout {
    /// One operator runs every component from one folder and one shell.
    Trial,
    /// Operator A (leader, first shuffler) and operator B (helper, last shuffler), each with
    /// its own CA, and the tenant (results service, client config): a folder each.
    TwoOperators,
}

/// Write a cluster's configs, certificates and secrets.
#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    /// The folder to write into (created if missing; existing files are not overwritten
    /// without --force).
    #[arg(long)]
    out: PathBuf,
    /// trial: one folder for one operator; two-operators: operator-a/, operator-b/ and
    /// tenant-TENANT/, each with only its own secrets.
    #[arg(long, value_enum, default_value_t = Layout::Trial)]
    layout: Layout,
    /// The host name or IP address every component is reached at (URLs and certificates);
    /// one host for every party (edit the URLs in the configs to spread them). An IP address
    /// is also what the servers listen on; for a name they listen on 0.0.0.0.
    #[arg(long, default_value = "127.0.0.1", value_parser = host_name)]
    host: String,
    /// Ports are counted from this one: leader +1, helper +2, shuffler-a +101, shuffler-b
    /// +102, results +201 (gRPC) and +280 (HTTP); metrics (on 127.0.0.1) +2461 to +2465.
    #[arg(long, default_value_t = 7000, value_parser = clap::value_parser!(u16).range(1..=63_000))]
    base_port: u16,
    /// The tenant the results service, client and tasks belong to.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// The tasks' window (time_precision_s), seconds. A short one (10) shows results within
    /// a minute; shuffler waits and client jitter shrink with it.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86_400))]
    window_s: u64,
    /// ε per collection of a task's window; each window's budget is ten times that (the routine
    /// collection and alert drill-downs share it).
    #[arg(long, default_value_t = 1.0)]
    epsilon: f64,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

fn host_name(s: &str) -> Result<String, String> {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.parse::<IpAddr>().is_ok() || (s.len() <= 253 && s.split('.').all(label)) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: give an IP address or a DNS host name"))
    }
}

/// gRPC port offsets from `--base-port`, and the metrics listeners'.
const PORTS: [(&str, u16, u16); 5] = [
    ("leader", 1, 2461),
    ("helper", 2, 2462),
    ("shuffler-a", 101, 2463),
    ("shuffler-b", 102, 2465),
    ("results", 201, 2464),
];
const RESULTS_HTTP: u16 = 280;

/// Everything the files are made from.
struct Plan {
    host: String,
    listen_ip: String,
    base: u16,
    tenant: String,
    window_s: u64,
    epsilon: f64,
    /// The shufflers' `max_wait_ms` and the clients' `max_jitter_ms`.
    max_wait_ms: u64,
    max_jitter_ms: u64,
}

impl Plan {
    fn new(a: &InitArgs) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !a.tenant.is_empty()
                && a.tenant
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'),
            "--tenant {:?}: use lowercase letters, digits, '-' and '_'",
            a.tenant
        );
        Epsilon::from_f64(a.epsilon).context("--epsilon")?;
        let listen_ip = match a.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
            Ok(ip) => ip.to_string(),
            Err(_) if a.host == "localhost" => "127.0.0.1".into(),
            Err(_) => "0.0.0.0".into(),
        };
        let window_ms = a.window_s * 1_000;
        Ok(Self {
            host: if a.host.contains(':') {
                format!("[{}]", a.host)
            } else {
                a.host.clone()
            },
            listen_ip,
            base: a.base_port,
            tenant: a.tenant.clone(),
            window_s: a.window_s,
            epsilon: a.epsilon,
            max_wait_ms: (window_ms / 5).clamp(1_000, 30_000),
            max_jitter_ms: (window_ms / 5).min(2_000),
        })
    }

    fn port(&self, component: &str) -> u16 {
        let (_, grpc, _) = PORTS
            .iter()
            .find(|(c, ..)| *c == component)
            .expect("a component");
        self.base + grpc
    }

    fn metrics(&self, component: &str) -> String {
        let (.., m) = PORTS
            .iter()
            .find(|(c, ..)| *c == component)
            .expect("a component");
        format!("127.0.0.1:{}", self.base + m)
    }

    fn url(&self, component: &str) -> String {
        format!("https://{}:{}", self.host, self.port(component))
    }

    fn listen(&self, component: &str) -> String {
        format!("{}:{}", self.listen_ip, self.port(component))
    }

    fn collector_name(&self) -> String {
        format!("collector-{}", self.tenant)
    }

    fn http_url(&self) -> String {
        format!("https://{}:{}", self.host, self.base + RESULTS_HTTP)
    }

    fn tls(name: &str) -> String {
        format!(
            "[tls]\ncert = \"certs/{name}.pem\"\nkey = \"certs/{name}-key.pem\"\nca = \"certs/operators-ca.pem\"\n"
        )
    }

    fn leader(&self) -> String {
        let c = self.collector_name();
        format!(
            "# The leader aggregator. Run from this folder: hush aggregator --role leader --config leader.toml\n\
             # Secrets from the environment (hush.env): HUSH_LEADER_ADMIN_TOKEN, HUSH_PEER_TOKEN.\n\
             listen = \"{}\"\ndata_dir = \"data/leader\"\n\n\
             # Who may call which service, by certificate name.\n\
             [peers]\nshufflers = [\"shuffler-b\"]\ncollectors = [\"{c}\"]\nkey_directories = [\"{c}\"]\n\n\
             [leader]\nhelper_url = \"{}\"\n\n\
             # Prometheus scrapes GET /metrics here (plaintext, no token).\n\
             [metrics]\nlisten = \"{}\"\n\n{}",
            self.listen("leader"),
            self.url("helper"),
            self.metrics("leader"),
            Self::tls("leader")
        )
    }

    fn helper(&self) -> String {
        format!(
            "# The helper aggregator. Run from this folder: hush aggregator --role helper --config helper.toml\n\
             # Secrets from the environment (hush.env): HUSH_HELPER_ADMIN_TOKEN, HUSH_PEER_TOKEN.\n\
             listen = \"{}\"\ndata_dir = \"data/helper\"\n\n\
             [peers]\nleader = [\"leader\"]\nkey_directories = [\"{}\"]\n\n\
             [metrics]\nlisten = \"{}\"\n\n{}",
            self.listen("helper"),
            self.collector_name(),
            self.metrics("helper"),
            Self::tls("helper")
        )
    }

    fn shuffler(&self, name: &str) -> String {
        let first = name == "shuffler-a";
        let (ingest, previous, next, kind) = if first {
            ("clients", "", "shuffler-b", "shuffler")
        } else {
            (
                "shufflers",
                "previous = [\"shuffler-a\"]\n",
                "leader",
                "leader",
            )
        };
        format!(
            "# The {}. Run from this folder: hush shuffler --config {name}.toml\n\
             # Secret from the environment (hush.env): HUSH_SHUFFLER_ADMIN_TOKEN.\n\
             name = \"{name}\"\nlisten = \"{}\"\ndata_dir = \"data/{name}\"\ningest_from = \"{ingest}\"\n\n\
             [peers]\n{previous}key_directories = [\"{}\"]\n\n\
             # A task's batch leaves with batch_size packets, or after max_wait_ms with at least\n\
             # min_batch_size of them.\n\
             [mix]\nbatch_size = 1000\nmin_batch_size = 100\nmax_wait_ms = {}\n\n\
             [metrics]\nlisten = \"{}\"\n\n\
             [[next_hop]]\nname = \"{next}\"\nkind = \"{kind}\"\nurl = \"{}\"\n\n{}",
            if first {
                "first shuffler (services connect here)"
            } else {
                "last shuffler (its next hop is the leader)"
            },
            self.listen(name),
            self.collector_name(),
            self.max_wait_ms,
            self.metrics(name),
            self.url(next),
            Self::tls(name)
        )
    }

    /// The results service; with `pins`, each party's certificate must come from its own
    /// operator's CA (A: leader, shuffler-a; B: helper, shuffler-b).
    fn results(&self, tasks: &[TaskParams], pins: bool) -> String {
        let files: Vec<String> = tasks
            .iter()
            .map(|t| format!("{:?}", task_file(t)))
            .collect();
        let pin = |key: &str, operator: &str| {
            if pins {
                format!("{key} = \"certs/operator-{operator}-ca.pem\"\n")
            } else {
                String::new()
            }
        };
        let hop = |name: &str, operator: &str| {
            let ca = if pins {
                format!(", ca = \"certs/operator-{operator}-ca.pem\"")
            } else {
                String::new()
            };
            format!(
                "  {{ name = \"{name}\", url = \"{}\", max_wait_ms = {}{ca} }},\n",
                self.url(name),
                self.max_wait_ms
            )
        };
        let pin_note = if pins {
            "# Each party's certificate must come from its own operator's CA, so neither operator\n\
             # can answer for the other's servers and hand clients a key of its own.\n"
        } else {
            ""
        };
        format!(
            "# Tenant {}'s results service. Run from this folder: hush results --config results.toml\n\
             # Secrets from the environment (hush.env): HUSH_TENANT_TOKEN, HUSH_COLLECTOR_KEY,\n\
             # HUSH_RESULTS_READ_TOKEN. Dashboard: {}/dashboard\n\
             tenant = \"{}\"\nlisten_grpc = \"{}\"\nlisten_http = \"{}:{}\"\n\
             data_dir = \"data/results-{}\"\nleader_url = \"{}\"\n{pin_note}{}task_files = [{}]\n\n\
             [metrics]\nlisten = \"{}\"\n\n\
             # Error counts are tested as a rate over the requests the latency task counted.\n\
             [detection]\nerror_rates = [{{ errors = \"{}\", requests = [\"{}\"] }}]\n\n\
             # The route, for the key directory and the collection delay.\n\
             [cascade]\nshufflers = [\n{}{}]\nleader_name = \"leader\"\nhelper_url = \"{}\"\n{}\
             client_max_jitter_ms = {}\n\n{}",
            self.tenant,
            self.http_url(),
            self.tenant,
            self.listen("results"),
            self.listen_ip,
            self.base + RESULTS_HTTP,
            self.tenant,
            self.url("leader"),
            pin("leader_ca", "a"),
            files.join(", "),
            self.metrics("results"),
            tasks[1].name,
            tasks[0].name,
            hop("shuffler-a", "a"),
            hop("shuffler-b", "b"),
            self.url("helper"),
            pin("helper_ca", "b"),
            self.max_jitter_ms,
            Self::tls(&self.collector_name())
        )
    }

    /// A service's client config, trusting `ca` (the first shuffler's and the key directory's
    /// CA).
    fn client(&self, tasks: &[TaskParams], ca: &str) -> String {
        format!(
            "# A service's hush client (hush_client::ClientConfig::from_file), and what\n\
             # `hush send --config client.toml` drives. Paths are relative to this folder.\n\
             shuffler_url = \"{}\"\nkey_directory = \"{}\"\ntls_ca = \"{ca}\"\n\n\
             [[latency]]\nservice = \"checkout\"\noperation = \"POST /pay\"\ntask_file = {:?}\n\n\
             [[counter]]\nname = \"errors\"\ntask_file = {:?}\n\n\
             [runtime]\nmax_jitter_ms = {}\n",
            self.url("shuffler-a"),
            self.url("results"),
            task_file(&tasks[0]),
            task_file(&tasks[1]),
            self.max_jitter_ms
        )
    }

    /// A latency histogram and an error counter, sealed to `collector`.
    fn tasks(&self, collector: &HpkeKeypair) -> anyhow::Result<Vec<TaskParams>> {
        let task = |name: &str, kind, bounds, bound| -> anyhow::Result<TaskParams> {
            let p = TaskParams {
                task_id: TaskId::random(),
                tenant: self.tenant.clone(),
                name: name.into(),
                kind,
                bucket_bounds_us: bounds,
                contribution_bound: bound,
                clip_contributions: true,
                time_precision_s: self.window_s,
                min_batch_size: hush_protocol::task::defaults::min_batch_size(),
                epsilon_per_collection: Epsilon::from_f64(self.epsilon)?,
                epsilon_budget: Epsilon::from_f64(self.epsilon * 10.0)?,
                report_expiry_s: hush_protocol::task::defaults::report_expiry_s(),
                packet_size: hush_protocol::task::defaults::packet_size(),
                collector_hpke_config: collector.config().clone(),
                alert_budget_percent: hush_protocol::task::defaults::alert_budget_percent(),
                retention_s: hush_protocol::task::defaults::retention_s(),
                count_epsilon_percent: hush_protocol::task::defaults::count_epsilon_percent(),
                max_collections_per_batch: 0,
            };
            hush_protocol::TaskConfig::new(p.clone())?;
            Ok(p)
        };
        Ok(vec![
            // 20 buckets from 2 ms to 1 s, up to 20 requests per instance and window: what
            // `hush sim --mode tune` picks for a service whose p99 is well under a second
            // (docs/detection.md); slower requests share the open last bucket.
            task(
                "checkout POST /pay latency",
                MeasurementKind::EventHistogram,
                log_spaced_bounds(2_000, 1_000_000, 20),
                20,
            )?,
            // Up to 5 errors per instance and window; more are clipped.
            task("checkout errors", MeasurementKind::Counter, vec![], 5)?,
        ])
    }
}

fn task_file(t: &TaskParams) -> String {
    if t.kind == MeasurementKind::Counter {
        "task-errors.toml".into()
    } else {
        "task-latency.toml".into()
    }
}

fn task_toml(t: &TaskParams) -> anyhow::Result<String> {
    Ok(format!(
        "# Provisioned on both aggregators and every shuffler of the route with the same task_id\n\
         # (hush task create); the results service and the clients read it too.\n{}",
        toml::to_string(t)?
    ))
}

/// 32 random bytes, base64url: a bearer token.
fn token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// Files to write: (path, contents, secret).
type Pending = std::rc::Rc<std::cell::RefCell<Vec<(PathBuf, String, bool)>>>;

/// One party's folder. Nothing is written until [`commit`], which first checks every path.
struct Folder {
    dir: PathBuf,
    pending: Pending,
}

impl Folder {
    fn new(dir: PathBuf, pending: &Pending) -> Self {
        Self {
            dir,
            pending: pending.clone(),
        }
    }

    fn write(&self, rel: &str, text: &str, secret: bool) -> anyhow::Result<()> {
        self.pending
            .borrow_mut()
            .push((self.dir.join(rel), text.to_owned(), secret));
        Ok(())
    }

    /// `name`'s certificate and key from `ca`.
    fn cert(&self, ca: &DevCa, name: &str, hosts: &[String]) -> anyhow::Result<()> {
        let issued = ca.issue(name, hosts)?;
        self.write(&format!("certs/{name}.pem"), &issued.cert_pem, false)?;
        self.write(&format!("certs/{name}-key.pem"), &issued.key_pem, true)
    }

    /// This party's own CA (certificate and key) and the bundle of every operator CA.
    fn cas(&self, own: Option<&DevCa>, all: &[&DevCa]) -> anyhow::Result<()> {
        if let Some(ca) = own {
            self.write("certs/ca.pem", ca.cert_pem(), false)?;
            self.write("certs/ca-key.pem", ca.key_pem(), true)?;
        }
        let bundle: String = all.iter().map(|c| c.cert_pem()).collect();
        self.write("certs/operators-ca.pem", &bundle, false)
    }

    fn tasks(&self, tasks: &[TaskParams]) -> anyhow::Result<()> {
        for t in tasks {
            self.write(&task_file(t), &task_toml(t)?, false)?;
        }
        Ok(())
    }

    /// `hush.env`: `export NAME=value` lines, readable by the owner only.
    fn env(&self, who: &str, vars: &[(&str, String)]) -> anyhow::Result<()> {
        let mut text = format!(
            "# {who}: secrets and addresses for the hush commands. Load it from this folder\n\
             # (`. ./hush.env`); paths in it are relative to the folder. Keep it private.\n"
        );
        for (k, v) in vars {
            debug_assert!(!v.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)));
            writeln!(text, "export {k}={v}")?;
        }
        self.write("hush.env", &text, true)
    }
}

/// Writes every pending file, after checking that none exists (unless `force`): a run that
/// fails leaves no mix of two clusters' files. New folders are the owner's only.
fn commit(pending: &Pending, force: bool) -> anyhow::Result<()> {
    let files = pending.borrow();
    if !force && let Some((p, ..)) = files.iter().find(|(p, ..)| p.symlink_metadata().is_ok()) {
        anyhow::bail!(
            "{} exists: init writes nothing over an earlier cluster's files; pass --force to \
             replace them, or choose another --out",
            p.display()
        );
    }
    for (path, text, secret) in files.iter() {
        if let Some(dir) = path.parent() {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                b.mode(0o700);
            }
            b.create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        hush_sim::certs::write(path, text, *secret, force)?;
    }
    Ok(())
}

pub(crate) fn run(a: InitArgs) -> anyhow::Result<()> {
    let out = std::path::absolute(&a.out)?;
    let plan = Plan::new(&a)?;
    let mut hosts = loopback_hosts();
    let bare_host = a.host.clone();
    if !hosts.contains(&bare_host) {
        hosts.push(bare_host);
    }
    let collector = HpkeKeypair::generate(1);
    let tasks = plan.tasks(&collector)?;
    let ids: Vec<String> = tasks.iter().map(|t| t.task_id.to_string()).collect();
    let collector_name = plan.collector_name();
    let peer_token = token();
    let tenant_token = token();
    let ca_env = ("HUSH_CA", "certs/operators-ca.pem".to_owned());
    let tenant_env = [
        ("HUSH_TENANT_TOKEN", tenant_token.clone()),
        (
            "HUSH_COLLECTOR_KEY",
            URL_SAFE_NO_PAD.encode(collector.to_bytes()),
        ),
        ("HUSH_RESULTS_READ_TOKEN", token()),
        ("HUSH_RESULTS_URL", plan.url("results")),
        ("HUSH_LATENCY_TASK", ids[0].clone()),
        ("HUSH_ERRORS_TASK", ids[1].clone()),
    ];
    let pending = Pending::default();
    let dirs: Vec<PathBuf> = match a.layout {
        Layout::Trial => {
            let ca = DevCa::new("hush trial CA")?;
            let f = Folder::new(out.clone(), &pending);
            f.cas(Some(&ca), &[&ca])?;
            for name in [
                "leader",
                "helper",
                "shuffler-a",
                "shuffler-b",
                &collector_name,
            ] {
                f.cert(&ca, name, &hosts)?;
            }
            f.write("leader.toml", &plan.leader(), false)?;
            f.write("helper.toml", &plan.helper(), false)?;
            f.write("shuffler-a.toml", &plan.shuffler("shuffler-a"), false)?;
            f.write("shuffler-b.toml", &plan.shuffler("shuffler-b"), false)?;
            f.write("results.toml", &plan.results(&tasks, false), false)?;
            f.write(
                "client.toml",
                &plan.client(&tasks, "certs/operators-ca.pem"),
                false,
            )?;
            f.tasks(&tasks)?;
            let mut vars = vec![
                ca_env,
                ("HUSH_LEADER_ADMIN_TOKEN", token()),
                ("HUSH_HELPER_ADMIN_TOKEN", token()),
                ("HUSH_SHUFFLER_ADMIN_TOKEN", token()),
                ("HUSH_PEER_TOKEN", peer_token),
                ("HUSH_LEADER_URL", plan.url("leader")),
                ("HUSH_HELPER_URL", plan.url("helper")),
                (
                    "HUSH_ROUTE",
                    format!("{},{}", plan.url("shuffler-a"), plan.url("shuffler-b")),
                ),
            ];
            vars.extend(tenant_env);
            f.env("hush trial (every role)", &vars)?;
            vec![out.clone()]
        }
        Layout::TwoOperators => {
            let ca_a = DevCa::new("operator-a dev CA")?;
            let ca_b = DevCa::new("operator-b dev CA")?;
            let both = [&ca_a, &ca_b];
            let verify_key = URL_SAFE_NO_PAD.encode(VerifyKey::random().as_bytes());
            // An operator's folder: its CA, its two components' certificates and configs, the
            // tasks and its secrets.
            let operator = |dir: &str,
                            ca: &DevCa,
                            parts: [(&str, String); 2],
                            who: &str,
                            vars: &[(&str, String)]|
             -> anyhow::Result<PathBuf> {
                let f = Folder::new(out.join(dir), &pending);
                f.cas(Some(ca), &both)?;
                for (name, config) in &parts {
                    f.cert(ca, name, &hosts)?;
                    f.write(&format!("{name}.toml"), config, false)?;
                }
                f.tasks(&tasks)?;
                f.env(who, vars)?;
                Ok(f.dir)
            };
            let a_dir = operator(
                "operator-a",
                &ca_a,
                [
                    ("leader", plan.leader()),
                    ("shuffler-a", plan.shuffler("shuffler-a")),
                ],
                "operator A (leader, shuffler-a)",
                &[
                    ca_env.clone(),
                    ("HUSH_LEADER_ADMIN_TOKEN", token()),
                    ("HUSH_SHUFFLER_ADMIN_TOKEN", token()),
                    ("HUSH_PEER_TOKEN", peer_token.clone()),
                    ("HUSH_VDAF_VERIFY_KEY", verify_key.clone()),
                    ("HUSH_TENANT_TOKEN", tenant_token.clone()),
                    ("HUSH_LEADER_URL", plan.url("leader")),
                    ("HUSH_SHUFFLER_URL", plan.url("shuffler-a")),
                ],
            )?;
            let b_dir = operator(
                "operator-b",
                &ca_b,
                [
                    ("helper", plan.helper()),
                    ("shuffler-b", plan.shuffler("shuffler-b")),
                ],
                "operator B (helper, shuffler-b)",
                &[
                    ca_env.clone(),
                    ("HUSH_HELPER_ADMIN_TOKEN", token()),
                    ("HUSH_SHUFFLER_ADMIN_TOKEN", token()),
                    ("HUSH_PEER_TOKEN", peer_token),
                    ("HUSH_VDAF_VERIFY_KEY", verify_key),
                    ("HUSH_HELPER_URL", plan.url("helper")),
                    ("HUSH_SHUFFLER_URL", plan.url("shuffler-b")),
                ],
            )?;
            // The tenant's certificate comes from operator A, which runs the leader the
            // tenant collects from; the tenant keeps no CA key.
            let t_dir = Folder::new(out.join(format!("tenant-{}", plan.tenant)), &pending);
            t_dir.cas(None, &both)?;
            t_dir.write("certs/operator-a-ca.pem", ca_a.cert_pem(), false)?;
            t_dir.write("certs/operator-b-ca.pem", ca_b.cert_pem(), false)?;
            t_dir.cert(&ca_a, &collector_name, &hosts)?;
            t_dir.write("results.toml", &plan.results(&tasks, true), false)?;
            // Services reach only operator A's servers (the first shuffler; the key directory
            // holds a certificate from A's CA): they trust only that CA.
            t_dir.write(
                "client.toml",
                &plan.client(&tasks, "certs/operator-a-ca.pem"),
                false,
            )?;
            t_dir.tasks(&tasks)?;
            let mut vars = vec![ca_env];
            vars.extend(tenant_env);
            t_dir.env(&format!("tenant {}", plan.tenant), &vars)?;
            vec![a_dir, b_dir, t_dir.dir]
        }
    };
    commit(&pending, a.force)?;
    for d in &dirs {
        println!("wrote {}", d.display());
    }
    println!(
        "tasks: {} (latency), {} (errors); windows of {} s, ε {} per window",
        ids[0], ids[1], plan.window_s, plan.epsilon
    );
    println!(
        "leader {}, helper {}, route {} -> {}, results {} (dashboard {}/dashboard)",
        plan.url("leader"),
        plan.url("helper"),
        plan.url("shuffler-a"),
        plan.url("shuffler-b"),
        plan.url("results"),
        plan.http_url()
    );
    println!("next: docs/operators.md, \"Your first hour\"");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn args(out: &Path, layout: Layout) -> InitArgs {
        InitArgs {
            out: out.to_owned(),
            layout,
            host: "127.0.0.1".into(),
            base_port: 7000,
            tenant: "acme".into(),
            window_s: 10,
            epsilon: 1.0,
            force: false,
        }
    }

    fn env_of(dir: &Path) -> std::collections::BTreeMap<String, String> {
        std::fs::read_to_string(dir.join("hush.env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// Every config parses with the parser its server uses, and its relative paths resolve to
    /// files init wrote.
    fn check_configs(dir: &Path, names: &[&str]) {
        for name in names {
            let path = dir.join(format!("{name}.toml"));
            let tls = match *name {
                "leader" | "helper" => hush_aggregator::AggregatorConfig::from_file(&path)
                    .unwrap()
                    .tls
                    .unwrap(),
                "results" => hush_collector::ResultsConfig::from_file(&path)
                    .unwrap()
                    .tls
                    .unwrap(),
                _ => hush_shuffler::ShufflerConfig::from_file(&path)
                    .unwrap()
                    .tls
                    .unwrap(),
            };
            for f in [&tls.cert, &tls.key, &tls.ca] {
                assert!(f.is_absolute() && f.is_file(), "{name}: {}", f.display());
            }
        }
    }

    #[test]
    fn a_trial_is_one_folder_whose_configs_agree() {
        let tmp = tempfile::tempdir().unwrap();
        run(args(tmp.path(), Layout::Trial)).unwrap();
        let d = tmp.path();
        check_configs(
            d,
            &["leader", "helper", "shuffler-a", "shuffler-b", "results"],
        );
        let env = env_of(d);
        for k in [
            "HUSH_LEADER_ADMIN_TOKEN",
            "HUSH_HELPER_ADMIN_TOKEN",
            "HUSH_SHUFFLER_ADMIN_TOKEN",
            "HUSH_PEER_TOKEN",
            "HUSH_TENANT_TOKEN",
            "HUSH_RESULTS_READ_TOKEN",
        ] {
            assert_eq!(URL_SAFE_NO_PAD.decode(&env[k]).unwrap().len(), 32, "{k}");
        }
        let key = URL_SAFE_NO_PAD.decode(&env["HUSH_COLLECTOR_KEY"]).unwrap();
        let collector = HpkeKeypair::from_bytes(&key).unwrap();
        // The tasks are sealed to that key, with the ids the env names.
        for (file, var) in [
            ("task-latency.toml", "HUSH_LATENCY_TASK"),
            ("task-errors.toml", "HUSH_ERRORS_TASK"),
        ] {
            let t: TaskParams =
                toml::from_str(&std::fs::read_to_string(d.join(file)).unwrap()).unwrap();
            assert_eq!(t.task_id.to_string(), env[var]);
            assert_eq!(&t.collector_hpke_config, collector.config());
            assert_eq!(t.time_precision_s, 10);
            hush_protocol::TaskConfig::new(t).unwrap();
        }
        let results = hush_collector::ResultsConfig::from_file(&d.join("results.toml")).unwrap();
        assert_eq!(results.leader_url, env["HUSH_LEADER_URL"]);
        // Short windows: the collection delay stays well under a window and a half.
        assert!(
            results.collect_delay_s() <= 15,
            "{}",
            results.collect_delay_s()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in ["hush.env", "certs/ca-key.pem", "certs/leader-key.pem"] {
                let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{f} is readable by others");
            }
        }
        // A second run refuses to overwrite, and writes nothing: not even the files that are
        // missing.
        std::fs::remove_file(d.join("client.toml")).unwrap();
        let before = std::fs::read(d.join("hush.env")).unwrap();
        let e = run(args(d, Layout::Trial)).unwrap_err();
        assert!(format!("{e:#}").contains("--force"), "{e:#}");
        assert!(!d.join("client.toml").exists());
        assert_eq!(std::fs::read(d.join("hush.env")).unwrap(), before);
        // --force replaces every file; a secret keeps mode 0600 even over a readable file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.join("hush.env"), std::fs::Permissions::from_mode(0o644))
                .unwrap();
            let mut again = args(d, Layout::Trial);
            again.force = true;
            run(again).unwrap();
            let mode = std::fs::metadata(d.join("hush.env"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
            assert_ne!(std::fs::read(d.join("hush.env")).unwrap(), before);
        }
    }

    #[test]
    fn two_operators_hold_their_own_ca_key_and_secrets() {
        let tmp = tempfile::tempdir().unwrap();
        run(args(tmp.path(), Layout::TwoOperators)).unwrap();
        let (a, b, t) = (
            tmp.path().join("operator-a"),
            tmp.path().join("operator-b"),
            tmp.path().join("tenant-acme"),
        );
        check_configs(&a, &["leader", "shuffler-a"]);
        check_configs(&b, &["helper", "shuffler-b"]);
        check_configs(&t, &["results"]);
        let results = hush_collector::ResultsConfig::from_file(&t.join("results.toml")).unwrap();
        assert!(results.every_party_pinned());
        let cascade = results.cascade.as_ref().unwrap();
        let pinned = |p: &Option<PathBuf>| std::fs::read_to_string(p.as_ref().unwrap()).unwrap();
        let own_ca = |d: &Path| std::fs::read_to_string(d.join("certs/ca.pem")).unwrap();
        assert_eq!(pinned(&results.leader_ca), own_ca(&a));
        assert_eq!(pinned(&cascade.helper_ca), own_ca(&b));
        assert_eq!(pinned(&cascade.shufflers[0].ca), own_ca(&a));
        assert_eq!(pinned(&cascade.shufflers[1].ca), own_ca(&b));
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        // Two CAs; each operator's key only in its own folder; every folder trusts both.
        let (ca_a, ca_b) = (read(a.join("certs/ca.pem")), read(b.join("certs/ca.pem")));
        assert_ne!(ca_a, ca_b);
        assert_ne!(
            read(a.join("certs/ca-key.pem")),
            read(b.join("certs/ca-key.pem"))
        );
        assert!(!t.join("certs/ca-key.pem").exists());
        for d in [&a, &b, &t] {
            assert_eq!(read(d.join("certs/operators-ca.pem")), ca_a.clone() + &ca_b);
        }
        let (ea, eb, et) = (env_of(&a), env_of(&b), env_of(&t));
        // Shared between the operators: the peer token and the verification key; each keeps
        // its own admin tokens; only the tenant holds the collector key and the read token.
        assert_eq!(ea["HUSH_PEER_TOKEN"], eb["HUSH_PEER_TOKEN"]);
        assert_eq!(ea["HUSH_VDAF_VERIFY_KEY"], eb["HUSH_VDAF_VERIFY_KEY"]);
        assert_ne!(
            ea["HUSH_SHUFFLER_ADMIN_TOKEN"],
            eb["HUSH_SHUFFLER_ADMIN_TOKEN"]
        );
        assert!(!ea.contains_key("HUSH_HELPER_ADMIN_TOKEN"));
        // Only the leader checks the tenant's collector token.
        assert_eq!(ea["HUSH_TENANT_TOKEN"], et["HUSH_TENANT_TOKEN"]);
        assert!(!eb.contains_key("HUSH_TENANT_TOKEN"));
        assert!(!eb.contains_key("HUSH_LEADER_ADMIN_TOKEN"));
        for e in [&ea, &eb] {
            assert!(!e.contains_key("HUSH_COLLECTOR_KEY"));
            assert!(!e.contains_key("HUSH_RESULTS_READ_TOKEN"));
        }
        assert!(!et.contains_key("HUSH_PEER_TOKEN") && !et.contains_key("HUSH_VDAF_VERIFY_KEY"));
        // The three folders hold the same tasks.
        for f in ["task-latency.toml", "task-errors.toml"] {
            assert_eq!(read(a.join(f)), read(b.join(f)));
            assert_eq!(read(a.join(f)), read(t.join(f)));
        }
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = args(&tmp.path().join("x"), Layout::Trial);
        a.tenant = "Acme Corp".into();
        let e = run(a).unwrap_err();
        assert!(e.to_string().contains("--tenant"), "{e}");
        assert!(!tmp.path().join("x").exists());
        for bad in ["a b", "a:b", ":::", "-x.example", ""] {
            assert!(host_name(bad).is_err(), "{bad}");
        }
        for good in ["leader.example", "localhost", "::1", "10.0.0.1"] {
            assert!(host_name(good).is_ok(), "{good}");
        }
    }
}
