//! A real headless browser for the dashboard tests: Debian's chromium (`$HUSH_CHROMIUM`, or
//! `chromium` / `chromium-browser` on the `PATH`; .ci/run installs it when missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The chromium binary; panics with what to install when there is none.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSH_CHROMIUM") {
        return p.into();
    }
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the dashboard tests need a headless chromium: install Debian's (apt-get install \
         chromium; .ci/run does) or set HUSH_CHROMIUM to a chromium binary"
    );
}

/// What chromium rendered: the DOM after the page's script ran, and the page's console
/// (where the browser reports, among others, what the Content-Security-Policy refused).
#[derive(Debug)]
pub struct Rendered {
    /// The serialized DOM.
    pub dom: String,
    /// chromium's log lines that carry the page's console messages (a Content-Security-Policy
    /// violation shows as "… violates the following Content Security Policy directive …").
    pub console: Vec<String>,
}

/// Loads `url` in headless chromium (a fresh profile in `profile`, certificate errors ignored:
/// test servers use a CA of their own) and returns the rendered DOM. Kills chromium and panics
/// after a minute.
pub fn render(url: &str, profile: &Path) -> Rendered {
    let out_path = profile.join("dom.html");
    let log_path = profile.join("chromium.log");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--ignore-certificate-errors",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=20000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("profile").display()
        ))
        .arg("--dump-dom")
        .arg(url)
        .stdout(Stdio::from(
            std::fs::File::create(&out_path).expect("dom file"),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(&log_path).expect("log file"),
        ))
        .spawn()
        .expect("run chromium");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for chromium") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within a minute; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "chromium failed: {status}\n{log}");
    Rendered {
        dom: std::fs::read_to_string(&out_path).expect("a UTF-8 DOM"),
        console: log
            .lines()
            .filter(|l| l.contains("CONSOLE"))
            .map(str::to_owned)
            .collect(),
    }
}
