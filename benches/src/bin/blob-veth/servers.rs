//! The servers in the server namespace: a `horde node --role storage` holding the blob, and
//! nginx serving the same file over HTTPS (TLS 1.3, a self-signed RSA-2048 certificate made
//! here with openssl) and HTTP; and what the bench reads of a running process (CPU time, peak
//! resident memory, reset before each transfer).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use horde_node::server::config::NodeConfig;
use horde_protocol::{NodeAddr, Role, SecretKey};

use horde_benches::netns::{SERVER_IP, VethPair};

/// The storage node's QUIC port in the server namespace (the namespace is ours alone).
const STORAGE_PORT: u16 = 4433;
/// nginx's HTTPS port.
pub(crate) const HTTPS_PORT: u16 = 8443;
/// nginx's HTTP port.
pub(crate) const HTTP_PORT: u16 = 8080;
/// The file nginx serves (and horde stores), under its root.
pub(crate) const BLOB_FILE: &str = "blob.bin";
/// How long a server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// A server process, killed when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    child: Child,
}

impl Server {
    /// Its process id (`ip netns exec` execs the program, so this is the server itself).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime is field 14, stime field 15 (1-based); `rest` starts at field 3.
    (field(11) + field(12)) / CLOCK_TICKS
}

/// Resets a process's peak resident set to its current one (`clear_refs` 5).
pub(crate) fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// A process's peak resident set since its last reset, in KiB (`VmHWM`).
pub(crate) fn peak_rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Starts a storage node in the server namespace and waits until it has started.
pub(crate) fn start_storage(
    pair: &VethPair,
    horde: &Path,
    dir: &Path,
) -> anyhow::Result<(Server, NodeAddr)> {
    std::fs::create_dir_all(dir)?;
    let key = SecretKey::generate();
    key.write_key_file(&dir.join("hotkey.json"))?;
    let mut config = NodeConfig::new(Role::Storage);
    config.key_file = "hotkey.json".into();
    let listen = format!("{SERVER_IP}:{STORAGE_PORT}").parse()?;
    config.listen = listen;
    config.data_dir = "data".into();
    config.discovery.enabled = false;
    let config_path = dir.join("node.toml");
    std::fs::write(&config_path, config.to_toml()?)?;
    let log_path = dir.join("node.log");
    let log = std::fs::File::create(&log_path)?;
    let child = VethPair::command(&pair.server, horde)
        .args(["node", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn,horde_node::server::node=info")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the storage node")?;
    let mut server = Server { child };
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("horde node started") {
            break;
        }
        if !server.running() || started.elapsed() > START_TIMEOUT {
            bail!("the storage node did not start; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, NodeAddr::new(key.hotkey(), listen)))
}

/// Starts nginx (one process: no master, one worker loop) in the server namespace, serving
/// `root` over HTTPS on [`HTTPS_PORT`] and HTTP on [`HTTP_PORT`]; returns it and the
/// certificate a client must trust.
pub(crate) fn start_nginx(
    pair: &VethPair,
    nginx: &Path,
    dir: &Path,
    root: &Path,
) -> anyhow::Result<(Server, PathBuf)> {
    std::fs::create_dir_all(dir.join("temp"))?;
    let cert = dir.join("cert.pem");
    horde_benches::self_signed_rsa(
        &cert,
        &dir.join("key.pem"),
        "horde-bench",
        &format!("IP:{SERVER_IP}"),
    )?;
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
           client_body_temp_path {dir}/temp;\n  proxy_temp_path {dir}/temp;\n\
           fastcgi_temp_path {dir}/temp;\n  uwsgi_temp_path {dir}/temp;\n\
           scgi_temp_path {dir}/temp;\n\
           default_type application/octet-stream;\n\
           server {{\n    listen {SERVER_IP}:{HTTPS_PORT} ssl;\n    ssl_protocols TLSv1.3;\n\
               ssl_certificate {cert};\n    ssl_certificate_key {dir}/key.pem;\n\
               root {root};\n  }}\n\
           server {{\n    listen {SERVER_IP}:{HTTP_PORT};\n    root {root};\n  }}\n}}\n",
        dir = dir.display(),
        cert = cert.display(),
        root = root.display(),
    );
    let child =
        horde_benches::spawn_nginx(&mut VethPair::command(&pair.server, nginx), dir, &config)?;
    let mut server = Server { child };
    // Listening once a TCP connect from the client side succeeds; probed with curl in the
    // client namespace (this thread is in neither).
    let started = Instant::now();
    loop {
        let probe = VethPair::command(&pair.client, Path::new("curl"))
            .args(["-s", "-o", "/dev/null", "--max-time", "1"])
            .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/"))
            .stdin(Stdio::null())
            .status();
        if probe.is_ok_and(|status| status.code() == Some(0)) {
            break;
        }
        if !server.running() || started.elapsed() > START_TIMEOUT {
            bail!("nginx did not start:\n{}", horde_benches::nginx_logs(dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((server, cert))
}

/// How long `sendme send` may take to import the file and print its ticket.
const SENDME_TICKET_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts `sendme send FILE` in the server namespace (in `dir`, where it keeps its temporary
/// store) and returns it with the ticket it printed. Its output goes on being read (and its
/// stderr to `dir/sendme.log`) so that it never blocks writing.
pub(crate) fn start_sendme(
    pair: &VethPair,
    dir: &Path,
    file: &Path,
) -> anyhow::Result<(Server, String)> {
    use std::io::{BufRead as _, Write as _};

    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("sendme.log"))?;
    // No relay server (none is reachable here; the ticket names the server's addresses).
    let mut child = VethPair::command(&pair.server, Path::new("sendme"))
        .args([
            "send",
            "--relay",
            "disabled",
            "--ticket-type",
            "addresses",
            "--no-progress",
        ])
        .arg(file)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting sendme send")?;
    let Some(stdout) = child.stdout.take() else {
        bail!("sendme send has no stdout");
    };
    let mut server = Server { child };
    let (found, ticket) = std::sync::mpsc::sync_channel(1);
    let out_path = dir.join("sendme.out");
    std::thread::spawn(move || {
        let mut found = Some(found);
        let mut copy = std::fs::File::create(out_path).ok();
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let line = match line {
                Ok(line) => line,
                Err(error) => {
                    if let Some(copy) = copy.as_mut() {
                        let _ = writeln!(copy, "(reading its output: {error})");
                    }
                    break;
                }
            };
            let line = String::from_utf8_lossy(&line);
            if let Some(copy) = copy.as_mut() {
                let _ = writeln!(copy, "{line}");
            }
            // "sendme receive TICKET"; a ticket is lowercase base32 starting with "blob".
            let ticket = line.find("blob").map(|at| {
                line[at..]
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect::<String>()
            });
            if line.contains("receive")
                && let Some(ticket) = ticket
                && let Some(sender) = found.take()
            {
                let _ = sender.send(ticket);
            }
        }
    });
    match ticket.recv_timeout(SENDME_TICKET_TIMEOUT) {
        Ok(ticket) => Ok((server, ticket)),
        Err(error) => {
            let running = server.running();
            bail!(
                "sendme send gave no ticket ({error}; running: {running}); its output:\n{}\n\
                 its log:\n{}",
                std::fs::read_to_string(dir.join("sendme.out")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("sendme.log")).unwrap_or_default()
            )
        }
    }
}
