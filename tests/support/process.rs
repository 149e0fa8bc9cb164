//! hush roles as real processes: spawn the `hush` binary, learn its address, SIGKILL or SIGTERM
//! it, restart it on the same port and data directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cluster::{ADMIN_TOKEN, PEER_TOKEN};

/// The arguments of `hush aggregator --insecure --role ROLE --config CONFIG`.
pub fn aggregator_args(role: &str, config: &str) -> Vec<String> {
    [
        "aggregator",
        "--insecure",
        "--role",
        role,
        "--config",
        config,
    ]
    .map(String::from)
    .to_vec()
}

/// Writes `config_text` to `dir/ROLE.toml` and runs a plaintext aggregator of `role` on it,
/// logging to `dir/ROLE.log`.
pub fn insecure_aggregator(bin: &Path, dir: &Path, role: &str, config_text: &str) -> HushProcess {
    let config = dir.join(format!("{role}.toml"));
    std::fs::write(&config, config_text).expect("write the config");
    HushProcess::spawn(
        bin,
        &aggregator_args(role, &config.display().to_string()),
        &dir.join(format!("{role}.log")),
    )
}

/// One `hush` process.
#[derive(Debug)]
pub struct HushProcess {
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
}

impl HushProcess {
    /// Runs `bin args...` with the test tokens in its environment, logs to `log`, and waits for
    /// its "listening on ADDR" line.
    pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Self {
        Self::spawn_with_env(bin, args, &[], log)
    }

    /// Like [`HushProcess::spawn`], with more environment variables (e.g. a results service's
    /// collector key and tenant token).
    pub fn spawn_with_env(bin: &Path, args: &[String], env: &[(&str, &str)], log: &Path) -> Self {
        let mut p = Self {
            bin: bin.to_owned(),
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log: log.to_owned(),
            child: None,
            addr: "0.0.0.0:0".parse().unwrap(),
            http_addr: None,
            metrics_addr: None,
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = Command::new(&self.bin)
            .args(&self.args)
            .env("HUSH_ADMIN_TOKEN", ADMIN_TOKEN)
            // An inherited role variable would take the admin token's place.
            .env_remove("HUSH_LEADER_ADMIN_TOKEN")
            .env_remove("HUSH_HELPER_ADMIN_TOKEN")
            .env_remove("HUSH_SHUFFLER_ADMIN_TOKEN")
            .env("HUSH_PEER_TOKEN", PEER_TOKEN)
            .env("RUST_LOG", "info,hush_aggregator=debug,hush_shuffler=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn hush");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let (http_tx, http_rx) = mpsc::channel();
        let (metrics_tx, metrics_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("metrics on ") {
                    let _ = metrics_tx.send(a.trim().to_owned());
                }
                if let Some(a) = line.strip_prefix("http on ") {
                    let _ = http_tx.send(a.trim().to_owned());
                }
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => {
                self.addr = a.parse().expect("an address");
                // A results service prints its HTTP address before the gRPC one.
                self.http_addr = http_rx
                    .try_recv()
                    .ok()
                    .map(|h| h.parse().expect("an address"));
                // So does a server with a Prometheus endpoint.
                self.metrics_addr = metrics_rx
                    .try_recv()
                    .ok()
                    .map(|h| h.parse().expect("an address"));
            }
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("{:?} did not start listening; its log:\n{log}", self.args);
            }
        }
        self.child = Some(child);
    }

    /// Peak resident memory (VmHWM) of the running process in MiB, read from /proc; NaN if it
    /// cannot be read.
    pub fn peak_rss_mib(&self) -> f64 {
        let Some(pid) = self.pid() else {
            return f64::NAN;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// CPU time (user + system, all threads) the running process has used so far, in seconds,
    /// from /proc; NaN if it cannot be read.
    pub fn cpu_seconds(&self) -> f64 {
        self.pid().map_or(f64::NAN, cpu_seconds_of)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP/JSON address, for a process that serves one (the results service).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The Prometheus endpoint's address, for a process started with `[metrics] listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the process with SIGKILL: no cleanup, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for a graceful exit; panics if it fails or takes over 30 s.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).expect("SIGTERM");
            for _ in 0..300 {
                if let Some(status) = c.try_wait().expect("wait") {
                    assert!(status.success(), "{:?} exited with {status}", self.args);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            panic!("{:?} did not stop within 30 s of SIGTERM", self.args);
        }
    }

    /// Starts the process again with the same arguments; `args` may be replaced first, e.g. to
    /// keep the port it had.
    pub fn restart_with(&mut self, args: Option<Vec<String>>) {
        assert!(
            self.child.is_none(),
            "stop the process before restarting it"
        );
        if let Some(a) = args {
            self.args = a;
        }
        self.start();
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HushProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU time (user + system, all threads) process `pid` has used so far, in seconds, from
/// /proc/<pid>/stat; NaN if it cannot be read. `std::process::id()` gives this process's own.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces, so split after its ')'): utime and
    // stime are the 12th and 13th, in clock ticks.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64);
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / hz,
        _ => f64::NAN,
    }
}

/// CPU time the calling thread has used so far, in seconds, to the nanosecond (the clock the
/// kernel keeps per thread); NaN if it cannot be read. For timing a loop on one thread, where
/// [`cpu_seconds_of`]'s 10 ms ticks and other threads would blur the figure.
pub fn thread_cpu_seconds() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(f64::NAN, |t| std::time::Duration::from(t).as_secs_f64())
}
