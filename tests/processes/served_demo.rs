//! `hush demo --serve` as a process for the tests that need a running cluster: started with
//! extra flags, ready once it prints its dashboard link, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::hush_bin;

/// A served demo; killed if the test fails before [`ServedDemo::stop`].
pub(crate) struct ServedDemo {
    child: Option<Child>,
    reader: Option<JoinHandle<String>>,
    /// Its data directory (certificates in `certs/`, the client configuration in `client/`).
    pub(crate) data: tempfile::TempDir,
    /// The results service's HTTPS address.
    pub(crate) results: SocketAddr,
}

impl ServedDemo {
    /// Runs `hush demo ARGS --serve --data-dir TMP` and waits (up to five minutes) until it
    /// serves.
    pub(crate) fn start(args: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let log = data.path().join("demo.log");
        let mut child = Command::new(hush_bin())
            .arg("demo")
            .args(args)
            .arg("--serve")
            .arg("--data-dir")
            .arg(data.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("run hush demo --serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.trim().strip_prefix("dashboard") {
                    let url = url.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(url);
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut demo = Self {
            child: Some(child),
            reader: Some(reader),
            data,
            results: "0.0.0.0:0".parse().unwrap(),
        };
        let url = rx
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| {
                panic!(
                    "hush demo --serve printed no dashboard link; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        // https://127.0.0.1:PORT/dashboard#token=...
        demo.results = url
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .expect("the dashboard's address");
        demo
    }

    /// The client configuration the demo wrote.
    pub(crate) fn client_config(&self) -> PathBuf {
        self.data.path().join("client/client.toml")
    }

    /// The demo's CA certificate.
    pub(crate) fn ca(&self) -> Vec<u8> {
        std::fs::read(self.data.path().join("certs/ca.pem")).unwrap()
    }

    /// SIGTERM; the demo drains and must exit 0. Returns its stdout.
    pub(crate) fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        let out = self.reader.take().unwrap().join().unwrap();
        assert!(
            status.success(),
            "hush demo --serve: {status}\n{out}\n{}",
            std::fs::read_to_string(self.data.path().join("demo.log")).unwrap_or_default()
        );
        assert!(out.contains("summary after"), "{out}");
        out
    }
}

impl Drop for ServedDemo {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
