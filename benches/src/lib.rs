//! horde-benches: throughput and latency benchmarks that measure horde's path and its baselines
//! (plain TCP, TCP + TLS, raw quinn) in the same run and print ratios. This library holds what
//! several bench binaries share: medians and quantiles, and the CPU time and load figures read
//! from `/proc`.
//!
//! Layout: `lib.rs` (this), `netns.rs` (network namespaces joined by a veth pair, made and
//! removed by a bench, and the ways into them).

use anyhow::Context as _;

pub mod netns;

/// Clock ticks per second of `/proc/PID/stat` CPU times (`getconf CLK_TCK`, 100 on Linux).
const CLK_TCK: f64 = 100.0;

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

/// Starts nginx through `command` (nginx itself, or a wrapper such as `ip netns exec … nginx`)
/// with `config` written to `dir/nginx.conf`, `dir` as its prefix and its output in
/// `dir/nginx.out`; see [`nginx_logs`] when it does not come up.
pub fn spawn_nginx(
    command: &mut std::process::Command,
    dir: &std::path::Path,
    config: &str,
) -> anyhow::Result<std::process::Child> {
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.join("nginx.out"))?;
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|error| anyhow::anyhow!("starting nginx: {error}"))
}

/// What an nginx started by [`spawn_nginx`] printed and logged (`error_log dir/error.log`).
pub fn nginx_logs(dir: &std::path::Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    read("nginx.out") + &read("error.log")
}

/// Writes `size` random bytes (BLAKE3's output stream of `seed`: incompressible, the same in
/// every run) to `path` and syncs it; returns their BLAKE3 hash.
pub fn write_random_file(
    path: &std::path::Path,
    size: u64,
    seed: &[u8],
) -> std::io::Result<[u8; 32]> {
    use std::io::Write as _;
    let mut stream = blake3::Hasher::new().update(seed).finalize_xof();
    let mut hasher = blake3::Hasher::new();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut piece = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        stream.fill(&mut piece[..n]);
        hasher.update(&piece[..n]);
        file.write_all(&piece[..n])?;
        left -= n as u64;
    }
    file.into_inner()?.sync_all()?;
    Ok(*hasher.finalize().as_bytes())
}

/// The `q` quantile (0..=1) of sorted `values` (nearest rank); NaN for none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// `n`, p50, p99, max of `values` (sorted here).
pub fn latency_summary(mut values: Vec<f64>) -> (usize, f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values.len(),
        quantile(&values, 0.5),
        quantile(&values, 0.99),
        values.last().copied().unwrap_or(f64::NAN),
    )
}

/// CPU time (user + system, seconds) of process `pid` so far, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("no ) in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let ticks: f64 = fields.get(11).context("no utime")?.parse::<f64>()?
        + fields.get(12).context("no stime")?.parse::<f64>()?;
    Ok(ticks / CLK_TCK)
}

/// Bytes received on the loopback interface so far (`/proc/net/dev`, `lo`): every packet between
/// processes on this machine, IP and UDP headers included. On `lo` every byte sent is received
/// once, so this is also what was sent.
pub fn loopback_bytes() -> anyhow::Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev")?;
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .context("no lo in /proc/net/dev")?;
    Ok(line
        .split_whitespace()
        .next()
        .context("no receive bytes for lo")?
        .parse()?)
}

/// The load average (1, 5, 15 min) of the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 51.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert!(quantile(&[], 0.5).is_nan());
        let (n, p50, p99, max) = latency_summary(vec![3.0, 1.0, 2.0]);
        assert_eq!((n, p50, p99, max), (3, 2.0, 3.0, 3.0));
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        // Spin until the kernel has charged at least one tick.
        let start = std::time::Instant::now();
        while cpu_secs(std::process::id()).unwrap_or(0.0) <= 0.0 {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
        }
    }
}
