//! horde-benches: throughput and latency benchmarks that measure horde's path and its baselines
//! (plain TCP, TCP + TLS, raw quinn) in the same run and print ratios.

/// The median of `values` (the mean of the middle two for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// nginx's program, if installed (Debian puts it in `/usr/sbin`; `.ci/bench-tools` installs it).
pub fn nginx_program() -> Option<std::path::PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|path| path.exists())
}

/// A free TCP port on 127.0.0.1 (bound, then released for a server to take).
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Runs a tool to its end with no input; its output, or an error with its stderr unless it
/// exited 0.
pub fn run_tool(command: &mut std::process::Command) -> anyhow::Result<std::process::Output> {
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| anyhow::anyhow!("running {command:?}: {error}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{command:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// A self-signed RSA-2048 certificate made with openssl's defaults (as the reference system
/// makes its own) for `subject`, with `subjectAltName` `san` (`IP:127.0.0.1`), written to
/// `cert` and its key to `key`.
pub fn self_signed_rsa(
    cert: &std::path::Path,
    key: &std::path::Path,
    subject: &str,
    san: &str,
) -> anyhow::Result<()> {
    run_tool(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", &format!("/CN={subject}")])
            .args(["-addext", &format!("subjectAltName={san}")])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(cert),
    )
    .map_err(|error| error.context("openssl (.ci/bench-tools installs it)"))?;
    Ok(())
}
