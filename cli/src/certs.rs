//! `hush certs`: a development CA and a certificate per component, for mutual TLS on loopback
//! or a test deployment. Production deployments use each operator's own PKI.

use std::path::PathBuf;

use hush_server::tls::dev::loopback_hosts;
use hush_sim::certs::{COMPONENTS, write_certs};

/// Make a development CA and certificates.
#[derive(Debug, clap::Args)]
pub(crate) struct CertsArgs {
    /// Directory to write `ca.pem`, `ca-key.pem` and `<name>.pem` / `<name>-key.pem` into
    /// (created if missing; existing files are not overwritten without --force).
    #[arg(long)]
    out: PathBuf,
    /// Components to issue certificates for (each valid as TLS server and client).
    /// Comma- or space-separated: `--names leader,helper` and `--names leader helper` alike.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = COMPONENTS.map(String::from))]
    names: Vec<String>,
    /// Host names and IP addresses every certificate is valid for, besides its own name.
    /// Comma- or space-separated, like --names.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = loopback_hosts())]
    hosts: Vec<String>,
    /// The CA's common name; one CA per operator ("operator-a dev CA") gives per-operator trust.
    #[arg(long, default_value = "hush dev CA")]
    ca_name: String,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(mut a: CertsArgs) -> anyhow::Result<()> {
    // The printed paths go into configs elsewhere: absolute, they mean the same there.
    a.out = std::path::absolute(&a.out)?;
    let files = write_certs(&a.out, &a.ca_name, &a.names, &a.hosts, a.force)?;
    println!("CA: {}", a.out.join("ca.pem").display());
    for (name, f) in a.names.iter().zip(&files) {
        println!(
            "{name}: [tls] cert = {:?}, key = {:?}, ca = {:?}",
            f.cert, f.key, f.ca
        );
    }
    println!(
        "hosts: {} (the CA key is {}; keep it, or delete it once every certificate is issued)",
        a.hosts.join(", "),
        a.out.join("ca-key.pem").display()
    );
    Ok(())
}

/// Refuses to serve plaintext unless asked to.
pub(crate) fn require_tls_or_insecure(has_tls: bool, insecure: bool) -> anyhow::Result<()> {
    match (has_tls, insecure) {
        (true, false) | (false, true) => Ok(()),
        (false, false) => anyhow::bail!(
            "the config has no [tls] section: add one (`hush certs` makes development \
             certificates) or pass --insecure to run plaintext"
        ),
        (true, true) => anyhow::bail!(
            "--insecure asks for plaintext but the config has a [tls] section: drop one of them"
        ),
    }
}
