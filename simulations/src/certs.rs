//! A development CA and a certificate per component, written to a directory: for `hush certs`,
//! the demo and the load harness. Production deployments use each operator's own PKI.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use hush_server::tls::TlsFiles;
use hush_server::tls::dev::{DevCa, loopback_hosts};

/// The components of a two-shuffler deployment, and a certificate for operators' tools.
pub const COMPONENTS: [&str; 6] = [
    "leader",
    "helper",
    "shuffler-a",
    "shuffler-b",
    "collector",
    "operator",
];

/// Writes `contents` to a new file at `path`, refusing to replace an existing one unless
/// `force` (which removes it first, so a replaced file never keeps an old file's mode or
/// follows a symbolic link planted there); `secret` files (keys, tokens) are readable by the
/// owner only, the rest by everyone.
pub fn write(path: &Path, contents: &str, secret: bool, force: bool) -> anyhow::Result<()> {
    if force {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("replacing {}", path.display()));
            }
            _ => {}
        }
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).with_context(|| {
        format!(
            "writing {} (pass --force to overwrite an existing file)",
            path.display()
        )
    })?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Makes a CA and a certificate for each of `names` in `dir`; returns each component's
/// `[tls]` files (trusting this CA) in the order of `names`.
pub fn write_certs(
    dir: &Path,
    ca_name: &str,
    names: &[String],
    hosts: &[String],
    force: bool,
) -> anyhow::Result<Vec<TlsFiles>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = DevCa::new(ca_name)?;
    let ca_path = dir.join("ca.pem");
    write(&ca_path, ca.cert_pem(), false, force)?;
    write(&dir.join("ca-key.pem"), ca.key_pem(), true, force)?;
    let mut files = Vec::new();
    for name in names {
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
            "component name {name:?}: use letters, digits, '-' and '.'"
        );
        let issued = ca.issue(name, hosts)?;
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        write(&cert, &issued.cert_pem, false, force)?;
        write(&key, &issued.key_pem, true, force)?;
        files.push(TlsFiles {
            cert,
            key,
            ca: ca_path.clone(),
        });
    }
    Ok(files)
}

/// A development CA in `dir` with a certificate for each of [`COMPONENTS`] valid on loopback;
/// returns each component's `[tls]` config section and the CA certificate (PEM).
pub fn dev_tls_sections(
    dir: &Path,
    ca_name: &str,
) -> anyhow::Result<(std::collections::BTreeMap<String, String>, Vec<u8>)> {
    let names: Vec<String> = COMPONENTS.map(String::from).to_vec();
    let files = write_certs(dir, ca_name, &names, &loopback_hosts(), true)?;
    #[derive(serde::Serialize)]
    struct Section<'a> {
        tls: &'a TlsFiles,
    }
    let mut sections = std::collections::BTreeMap::new();
    for (name, f) in names.into_iter().zip(&files) {
        sections.insert(name, toml::to_string(&Section { tls: f })?);
    }
    let ca = std::fs::read(dir.join("ca.pem")).context("reading the CA certificate")?;
    Ok((sections, ca))
}
