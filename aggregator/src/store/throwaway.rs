//! A private PostgreSQL server for tests and load runs: `initdb` in a temporary directory (mode
//! 0700), a server that listens only on a Unix socket in that directory (no TCP port, so no other
//! local user can reach it, and no port to race for), stopped and removed when
//! the process that started it ends (however it ends: the server is watched by a shell that
//! reads the starter's pipe, and kills the server and removes the directory when the pipe
//! closes). As root it runs as the `postgres` user, since PostgreSQL refuses to run as root.
//!
//! `HUSH_TEST_DATABASE_URL`, when set, names a server to use instead.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{PgSettings, Store};

/// A running throwaway server.
#[derive(Debug)]
pub struct ThrowawayPostgres {
    url: String,
    _keep: Option<(Child, ChildStdin)>,
}

/// The environment variable naming a server to use instead of a throwaway one.
pub const URL_ENV: &str = "HUSH_TEST_DATABASE_URL";

fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(d) = std::env::var("HUSH_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "PostgreSQL is not installed (no /usr/lib/postgresql): install Debian's postgresql \
             package (.ci/run does), set HUSH_PG_BIN to its bin directory, or set \
             HUSH_TEST_DATABASE_URL to a server's URL"
                .to_owned()
        })?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".to_owned())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program args…`, as the `postgres` user when this process is root.
fn command(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl ThrowawayPostgres {
    /// Starts a server (fsync off when `durable` is false: for tests, not for measurements).
    pub fn start(durable: bool) -> Result<Self, String> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "hush-pg-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("restricting {}: {e}", dir.display()))?;
        }
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?
                .success();
            if !ok {
                return Err(format!(
                    "cannot give {} to the postgres user",
                    dir.display()
                ));
            }
        }
        let data = dir.join("data");
        let out = command(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "hush", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Only names the socket file (`.s.PGSQL.5432` in `dir`): no TCP port is opened.
        let port: u16 = 5432;
        let fsync = if durable { "on" } else { "off" };
        // The shell starts the server, waits for its stdin to close (this process ended), then
        // stops the server and removes the directory.
        let script = r#"
            "$0" -D "$1" -p "$2" -k "$3" -c listen_addresses= -c fsync="$4" \
                -c max_connections=300 -c shared_buffers=128MB >"$3/log" 2>&1 &
            pid=$!
            cat >/dev/null
            kill -INT "$pid" 2>/dev/null
            wait "$pid"
            rm -rf "$3"
        "#;
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let mut child = c
            .arg(bin.join("postgres"))
            .arg(&data)
            .arg(port.to_string())
            .arg(&dir)
            .arg(fsync)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let start = Instant::now();
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .arg("-h")
                .arg(&dir)
                .args(["-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let mut log = String::new();
                let _ =
                    std::fs::File::open(dir.join("log")).map(|mut f| f.read_to_string(&mut log));
                return Err(format!("postgres did not start within 60 s:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            url: format!(
                "host={} port={port} user=hush dbname=postgres",
                dir.display()
            ),
            _keep: Some((child, stdin)),
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server this process shares among its tests: `HUSH_TEST_DATABASE_URL`, or a throwaway
    /// one started on first use. Panics, saying what to install, if there is none.
    pub fn shared() -> &'static ThrowawayPostgres {
        static SHARED: OnceLock<Result<ThrowawayPostgres, String>> = OnceLock::new();
        let r = SHARED.get_or_init(|| match std::env::var(URL_ENV) {
            Ok(url) => Ok(ThrowawayPostgres { url, _keep: None }),
            Err(_) => ThrowawayPostgres::start(false),
        });
        match r {
            Ok(p) => p,
            Err(e) => panic!("the PostgreSQL tests need a server: {e}"),
        }
    }
}

/// A schema name no other caller gets.
pub fn fresh_schema() -> String {
    format!("t_{:016x}", rand::random::<u64>())
}

/// A store on the shared server, in a schema of its own.
pub async fn fresh_store() -> Store {
    Store::connect(&PgSettings {
        url: ThrowawayPostgres::shared().url().to_owned(),
        schema: fresh_schema(),
        pool_size: 4,
    })
    .await
    .expect("a store on the test server")
}
