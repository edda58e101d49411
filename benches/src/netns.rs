//! Two network namespaces joined by a veth pair, created by a bench and removed when dropped,
//! and the ways into them: a command run with `ip netns exec`, a thread moved into one, or a
//! runtime whose threads live in one (`blob-veth`, `flow-latency --veth`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// The server's address inside its namespace (RFC 2544 benchmarking range: never routed).
pub const SERVER_IP: &str = "198.18.0.1";
/// The client's address inside its namespace.
pub const CLIENT_IP: &str = "198.18.0.2";
/// The prefix both addresses share.
const PREFIX_LEN: u8 = 24;

/// A server and a client namespace joined by a veth pair; both are deleted (which deletes
/// the veth pair with them) when this is dropped.
#[derive(Debug)]
pub struct VethPair {
    /// The server's namespace.
    pub server: String,
    /// The client's namespace.
    pub client: String,
    server_link: String,
    client_link: String,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl VethPair {
    /// Creates the namespaces (named after this process, so two runs never collide), the
    /// veth pair between them with `mtu`, the addresses, and brings every link up.
    pub fn create(mtu: u32) -> anyhow::Result<Self> {
        let id = std::process::id();
        let pair = Self {
            server: format!("hbench-srv-{id}"),
            client: format!("hbench-cli-{id}"),
            server_link: format!("hbs{id}"),
            client_link: format!("hbc{id}"),
        };
        ip(&["netns", "add", &pair.server])?;
        // From here on, dropping `pair` removes whatever was made.
        ip(&["netns", "add", &pair.client])?;
        ip(&[
            "link",
            "add",
            &pair.server_link,
            "netns",
            &pair.server,
            "type",
            "veth",
            "peer",
            "name",
            &pair.client_link,
            "netns",
            &pair.client,
        ])?;
        for (namespace, link, address) in [
            (&pair.server, &pair.server_link, SERVER_IP),
            (&pair.client, &pair.client_link, CLIENT_IP),
        ] {
            let cidr = format!("{address}/{PREFIX_LEN}");
            ip(&["-n", namespace, "addr", "add", &cidr, "dev", link])?;
            ip(&["-n", namespace, "link", "set", "lo", "up"])?;
            ip(&["-n", namespace, "link", "set", link, "up"])?;
        }
        pair.set_mtu(mtu)?;
        Ok(pair)
    }

    /// Sets the MTU of both ends.
    pub fn set_mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        for (namespace, link) in [
            (&self.server, &self.server_link),
            (&self.client, &self.client_link),
        ] {
            ip(&["-n", namespace, "link", "set", link, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// A command that runs `program` inside `namespace`.
    pub fn command(namespace: &str, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", namespace]).arg(program);
        command
    }

    /// The file naming `namespace`, for `setns`.
    pub fn path(namespace: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(namespace)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for namespace in [&self.client, &self.server] {
            if let Err(error) = ip(&["netns", "del", namespace]) {
                eprintln!("removing namespace {namespace}: {error:#}");
            }
        }
    }
}

/// Moves the calling thread into `namespace`'s network namespace: sockets it (and the threads
/// it starts afterwards) create belong there.
pub fn enter(namespace: &str) -> anyhow::Result<()> {
    let path = VethPair::path(namespace);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("entering {namespace}"))?;
    Ok(())
}

/// A multi-threaded runtime whose worker threads live in `namespace`: they are started by a
/// thread that entered it, and inherit it (as do the processes and blocking threads they start).
pub fn runtime_in(namespace: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    let namespace = namespace.to_owned();
    std::thread::spawn(move || {
        enter(&namespace)?;
        Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

/// Runs `work` on a thread of its own that entered `namespace` (the sockets it creates and the
/// processes it starts belong there); its result.
pub fn run_in<T: Send>(
    namespace: &str,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(namespace)?;
                work()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })
}

/// Whether this process may create namespaces and links (root, with `ip` present); the reason
/// when it may not.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (it creates network namespaces and a veth pair)".to_owned());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => None,
        _ => Some("needs `ip` (iproute2; .ci/bench-tools installs it)".to_owned()),
    }
}
