//! Egress for `network = "internet"`, the same for both runners: a veth pair per job, NAT, and
//! host firewall rules that keep the job off the host.
//!
//! Each job already has a network namespace of its own with only loopback (bubblewrap's
//! `--unshare-net`, the container's network mode `none`); the executor's paths to the job's
//! port and from its executor URL stay inside that namespace under every policy. For
//! `internet`, [`Egress::attach`] adds one veth pair: the job's end (`eth0`) is created
//! directly inside the job's namespace (one netlink request, so no half-made pair is ever left
//! on the host), the host end `hrd-eN` stays on the host, and the pair takes /30 number `N` of
//! [`POOL`]: `.1` on the host end, `.2` on `eth0`, the default route via `.1`. The pair goes
//! with the job's namespace (the kernel removes both ends when it goes, however the job ended),
//! and the executor deletes it explicitly at every end it sees.
//!
//! **Host rules.** [`Egress::prepare`] installs one nftables table, [`NFT_TABLE`], atomically
//! (one `nft -f` transaction, identical for every executor on the host), whose rules match the
//! host ends by name (`hrd-e*`), so there are no per-job rules to leak:
//! - prerouting: a packet from a job whose source is not the job's own address is dropped
//!   (strict reverse-path check), and so is every packet from a job to any address of the host
//!   (`fib daddr type local`: every address on every interface, docker0 and the veth ends
//!   included, and broadcast/multicast), before any DNAT could turn it into a host service;
//! - input: nothing from a job reaches the host itself;
//! - forward and output: nothing new enters a job's interface (no other job, no host process,
//!   no outside peer reaches a job's address); replies to the job's own connections do;
//! - postrouting: traffic from [`POOL`] leaving the host is masqueraded.
//!
//! Where Docker's `FORWARD` policy drops (it does wherever Docker runs), a drop in any base
//! chain is final, so two generic accepts for `hrd-e+` go into `DOCKER-USER` (Docker's place for
//! user rules; else `FORWARD`) through `iptables`; the filtering stays in our table. IPv4
//! forwarding is turned on if it is off. All of this is the host's own configuration, left in
//! place when executors end; it only ever matches `hrd-e*` interfaces.
//!
//! **Tools.** Links, addresses and routes are set with iproute2's `ip` and rules with `nft`
//! (Debian's `iproute2` and `nftables`), each call's failure a typed [`EgressError`] carrying
//! the command and its message: a netlink crate would do the link work, but the firewall
//! needs `nft` either way, and two well-known tools read better in a log than hand-built
//! netlink messages. The job's end is configured by a short-lived thread of the executor that
//! enters the job's namespace (`setns`) and runs `ip` from there.
//!
//! **Stale links.** Each host end carries an alias `horde-egress:JOB:EXECUTOR` (the executor's
//! `PID.STARTTIME`); [`Egress::prepare`] deletes those whose executor no longer runs (a job
//! namespace kept alive by an engine that lost its container, say).
//!
//! Needs root (veth pairs and firewall rules): elsewhere [`Egress::prepare`] fails with
//! [`EgressError::NotRoot`], and the executor refuses the class's jobs saying so.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use horde_protocol::JobId;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::oneshot;

use super::container::guard::{executor_alive, executor_identity};
use super::{Launch, NetworkPolicy, RunnerError};

/// The addresses jobs get: 100.80.0.0/16, in the shared address space of RFC 6598 (never
/// routed on the internet, rarely used on a LAN), one /30 per job: 2¹⁶ / 4 = 16,384 jobs at
/// once per host. A host that uses any of it already is refused at start
/// ([`EgressError::PoolInUse`]).
pub const POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 80, 0, 0), 16);
/// /30 slots in [`POOL`].
const SLOTS: u32 = 1 << (32 - 16 - 2);
/// Host ends of job veth pairs are named this plus the slot number (`hrd-e16383` fits the
/// kernel's 15 characters).
pub const HOST_LINK_PREFIX: &str = "hrd-e";
/// The job's end of the pair, inside its namespace.
const JOB_LINK: &str = "eth0";
/// The nftables table holding every egress rule.
pub const NFT_TABLE: &str = "horde_egress";
/// Marks our iptables rules and starts our link aliases.
const MARK: &str = "horde-egress";
/// How long one `ip`, `nft` or `iptables` call may take (they answer in milliseconds; the
/// xtables lock may make `iptables` wait for another caller).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Slots tried before giving up when other executors keep taking the ones picked.
const SLOT_ATTEMPTS: usize = 32;
/// Where the tools are looked for.
const TOOL_PATH: &str = "/usr/sbin:/sbin:/usr/bin:/bin";

/// Why egress cannot be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    /// Veth pairs and firewall rules need root.
    #[error(
        "network = \"internet\" needs the node to run as root (each job gets a veth pair and \
         the host firewall rules that keep it off the host); this node runs as uid {0}"
    )]
    NotRoot(u32),
    /// `ip`, `nft` missing.
    #[error("network = \"internet\" needs `{tool}` (Debian's {package}): {reason}")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// Its Debian package.
        package: &'static str,
        /// Why it was not found.
        reason: String,
    },
    /// A tool failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Its message (stderr), or why it could not run.
        reason: String,
    },
    /// An address of the pool is already on a host interface.
    #[error(
        "the job address pool {}/{} is in use on this host ({address} on {interface})",
        POOL.0,
        POOL.1
    )]
    PoolInUse {
        /// The address found.
        address: Ipv4Addr,
        /// Its interface.
        interface: String,
    },
    /// No slot could be had.
    #[error("no free job address in {}/{} after {SLOT_ATTEMPTS} tries", POOL.0, POOL.1)]
    Exhausted,
    /// Entering the job's namespace or reading the host's state failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> EgressError {
    let context = context.into();
    move |source| EgressError::Io { context, source }
}

/// The nftables ruleset (see the module docs), as one atomic `nft -f` transaction: the table
/// is made if absent and flushed, then filled, so it is never seen half-made or empty.
fn ruleset() -> String {
    let (base, prefix) = POOL;
    let jobs = format!("\"{HOST_LINK_PREFIX}*\"");
    format!(
        "table inet {NFT_TABLE}\n\
         flush table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \x20 chain prerouting {{\n\
         \x20   type filter hook prerouting priority raw; policy accept;\n\
         \x20   iifname {jobs} fib saddr . iif oif missing drop\n\
         \x20   iifname {jobs} fib daddr type {{ local, broadcast, multicast, anycast }} drop\n\
         \x20 }}\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter - 10; policy accept;\n\
         \x20   iifname {jobs} drop\n\
         \x20 }}\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority filter - 10; policy accept;\n\
         \x20   oifname {jobs} ct state established,related accept\n\
         \x20   oifname {jobs} drop\n\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter - 10; policy accept;\n\
         \x20   oifname {jobs} ct state established,related accept\n\
         \x20   oifname {jobs} drop\n\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {base}/{prefix} oifname != {jobs} masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// The iptables rules that let job traffic past a `FORWARD` chain whose policy drops.
fn forward_accepts() -> [Vec<String>; 2] {
    let jobs = format!("{HOST_LINK_PREFIX}+");
    let comment = ["-m", "comment", "--comment", MARK];
    let rule = |parts: &[&str]| -> Vec<String> {
        parts
            .iter()
            .chain(comment.iter())
            .map(|part| (*part).to_owned())
            .chain(["-j".to_owned(), "ACCEPT".to_owned()])
            .collect()
    };
    [
        rule(&["-i", &jobs]),
        rule(&[
            "-o",
            &jobs,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
        ]),
    ]
}

/// The egress `launch` gets from a runner holding `egress`: none under `network = "none"`;
/// under `"internet"`, a runner started without egress refuses the job.
pub(crate) fn for_launch<'a>(
    egress: Option<&'a Egress>,
    launch: &Launch,
) -> Result<Option<&'a Egress>, RunnerError> {
    match (launch.policy.network, egress) {
        (NetworkPolicy::None, _) => Ok(None),
        (NetworkPolicy::Internet, Some(egress)) => Ok(Some(egress)),
        (NetworkPolicy::Internet, None) => Err(RunnerError::Refused(
            "network = \"internet\": this runner was started without egress".into(),
        )),
    }
}

/// The alias a job's host end carries: `horde-egress:JOB:EXECUTOR`.
pub fn link_alias(job: JobId, executor: &str) -> String {
    format!("{MARK}:{job}:{executor}")
}

/// The address of slot `slot`'s host end (`.1`); the job's is the next one.
fn host_address(slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POOL.0) + slot * 4 + 1)
}

/// Whether `address` is in [`POOL`].
fn in_pool(address: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - u32::from(POOL.1));
    u32::from(address) & mask == u32::from(POOL.0)
}

/// Runs `program args…` (with `input` on stdin), bounded by [`COMMAND_TIMEOUT`]; its stdout.
async fn run(program: &Path, args: &[&str], input: Option<&str>) -> Result<String, EgressError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let failed = |reason: String| EgressError::Command {
        command: command.clone(),
        reason,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| failed(error.to_string()))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|error| failed(error.to_string()))?;
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| failed(format!("no answer within {COMMAND_TIMEOUT:?}")))?
        .map_err(|error| failed(error.to_string()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, EgressError> {
    crate::server::supervision::resolve_program(
        tool,
        Some(std::ffi::OsStr::new(TOOL_PATH)),
        Path::new("/"),
    )
    .map_err(|error| EgressError::MissingTool {
        tool,
        package,
        reason: error.to_string(),
    })
}

/// Egress for one executor: the host is prepared, and jobs are attached one by one.
#[derive(Debug, Clone)]
pub struct Egress {
    ip: PathBuf,
    /// `PID.STARTTIME` of this executor, in each link's alias.
    executor: String,
}

impl Egress {
    /// Prepares this host for `internet` jobs (see the module docs): root, the tools, the pool
    /// free, the nftables table, the forward accepts, IPv4 forwarding; deletes stale links.
    pub async fn prepare() -> Result<Self, EgressError> {
        let uid = rustix::process::geteuid();
        if !uid.is_root() {
            return Err(EgressError::NotRoot(uid.as_raw()));
        }
        let ip = find_tool("ip", "iproute2")?;
        let nft = find_tool("nft", "nftables")?;
        check_pool_free(&ip).await?;
        run(&nft, &["-f", "-"], Some(&ruleset())).await?;
        open_forwarding().await?;
        enable_forwarding()?;
        let egress = Self {
            ip,
            executor: executor_identity(),
        };
        let reaped = egress.reap_stale().await?;
        if reaped > 0 {
            tracing::info!(reaped, "deleted stale job network links");
        }
        Ok(egress)
    }

    /// Gives the job whose network namespace is `namespace` (an open `/proc/PID/ns/net`) its
    /// veth pair, addresses and default route.
    pub async fn attach(&self, job: JobId, namespace: &File) -> Result<JobLink, EgressError> {
        // `ip` opens the namespace through this process's descriptor: no pid to race.
        let netns = format!("/proc/{}/fd/{}", std::process::id(), namespace.as_raw_fd());
        let link = self.create_pair(&netns).await?;
        let configured = self.configure(&link, job, namespace).await;
        match configured {
            Ok(()) => Ok(link),
            Err(error) => {
                link.remove().await;
                Err(error)
            }
        }
    }

    /// Creates the pair on a free slot: the host end here, `eth0` in the job's namespace.
    async fn create_pair(&self, netns: &str) -> Result<JobLink, EgressError> {
        let taken = host_links();
        let mut salt = [0u8; 4];
        let _ = getrandom::fill(&mut salt);
        let mut slot = u32::from_le_bytes(salt) % SLOTS;
        for _ in 0..SLOT_ATTEMPTS {
            while taken.contains(&format!("{HOST_LINK_PREFIX}{slot}")) {
                slot = (slot + 1) % SLOTS;
            }
            let name = format!("{HOST_LINK_PREFIX}{slot}");
            let created = run(
                &self.ip,
                &[
                    "link", "add", &name, "type", "veth", "peer", "name", JOB_LINK, "netns", netns,
                ],
                None,
            )
            .await;
            match created {
                Ok(_) => {
                    return Ok(JobLink {
                        ip: self.ip.clone(),
                        name,
                        slot,
                    });
                }
                // Another executor took it since the listing: the next one.
                Err(EgressError::Command { reason, .. }) if reason.contains("File exists") => {
                    slot = (slot + 1) % SLOTS;
                }
                Err(error) => return Err(error),
            }
        }
        Err(EgressError::Exhausted)
    }

    /// Addresses both ends, brings them up, routes the job's traffic through the host end.
    async fn configure(
        &self,
        link: &JobLink,
        job: JobId,
        namespace: &File,
    ) -> Result<(), EgressError> {
        let host = host_address(link.slot);
        let guest = Ipv4Addr::from(u32::from(host) + 1);
        let name = &link.name;
        let alias = link_alias(job, &self.executor);
        let host_batch = format!(
            "link set dev {name} alias {alias}\naddr add {host}/30 dev {name}\n\
             link set dev {name} up\n"
        );
        run(&self.ip, &["-batch", "-"], Some(&host_batch)).await?;
        let job_batch = format!(
            "addr add {guest}/30 dev {JOB_LINK}\nlink set dev {JOB_LINK} up\n\
             route add default via {host} dev {JOB_LINK}\n"
        );
        let namespace = namespace
            .try_clone()
            .map_err(io_error("the job's network namespace"))?;
        let (done, result) = oneshot::channel();
        let ip = self.ip.clone();
        std::thread::Builder::new()
            .name(format!("egress-{}", job.fmt_short()))
            .spawn(move || {
                let _ = done.send(run_inside(&namespace, &ip, &job_batch));
            })
            .map_err(io_error("starting the egress thread"))?;
        result.await.map_err(|_| EgressError::Io {
            context: "the egress thread".into(),
            source: io::Error::other("ended without an answer"),
        })?
    }

    /// Deletes host ends whose alias names an executor that no longer runs. Returns how many.
    pub async fn reap_stale(&self) -> Result<usize, EgressError> {
        let mut reaped = 0;
        for name in host_links() {
            let alias = std::fs::read_to_string(format!("/sys/class/net/{name}/ifalias"))
                .unwrap_or_default();
            let Some(executor) = alias
                .trim()
                .strip_prefix(MARK)
                .and_then(|rest| rest.rsplit(':').next())
            else {
                continue;
            };
            if executor_alive(executor) {
                continue;
            }
            tracing::info!(link = %name, alias = alias.trim(), "deleting a stale job link");
            match run(&self.ip, &["link", "del", "dev", &name], None).await {
                Ok(_) => reaped += 1,
                Err(EgressError::Command { reason, .. }) if reason.contains("Cannot find") => {}
                Err(error) => return Err(error),
            }
        }
        Ok(reaped)
    }
}

/// Runs `ip -batch -` with `batch` inside `namespace`, on this (short-lived) thread: a child
/// starts in the network namespace of the thread that spawns it.
fn run_inside(namespace: &File, ip: &Path, batch: &str) -> Result<(), EgressError> {
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    rustix::thread::move_into_link_name_space(
        namespace.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|error| EgressError::Io {
        context: "entering the job's network namespace".into(),
        source: error.into(),
    })?;
    let command = format!("{} -batch - (in the job's namespace)", ip.display());
    let failed = |reason: String| EgressError::Command {
        command: command.clone(),
        reason,
    };
    let mut child = std::process::Command::new(ip)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| failed(error.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.as_bytes())
            .map_err(|error| failed(error.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| failed(error.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

/// The host ends of job pairs on this host.
fn host_links() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(HOST_LINK_PREFIX))
        .collect()
}

/// Fails when an address of [`POOL`] is on an interface other than a job's host end.
async fn check_pool_free(ip: &Path) -> Result<(), EgressError> {
    let listing = run(ip, &["-4", "-o", "addr", "show"], None).await?;
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        let interface = words.nth(1).unwrap_or_default().to_owned();
        let address = words
            .skip_while(|word| *word != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|text| text.parse::<Ipv4Addr>().ok());
        if let Some(address) = address
            && in_pool(address)
            && !interface.starts_with(HOST_LINK_PREFIX)
        {
            return Err(EgressError::PoolInUse { address, interface });
        }
    }
    Ok(())
}

/// Lets job traffic past an iptables `FORWARD` chain that drops (Docker's): two accepts for
/// `hrd-e+` in `DOCKER-USER`, else `FORWARD`. Nothing to do without iptables or such a chain.
async fn open_forwarding() -> Result<(), EgressError> {
    let Ok(iptables) = find_tool("iptables", "iptables") else {
        return Ok(());
    };
    let chain = if run(&iptables, &["-w", "-S", "DOCKER-USER"], None)
        .await
        .is_ok()
    {
        "DOCKER-USER"
    } else {
        let forward = run(&iptables, &["-w", "-S", "FORWARD"], None)
            .await
            .unwrap_or_default();
        if !forward.lines().any(|line| line == "-P FORWARD DROP") {
            return Ok(());
        }
        "FORWARD"
    };
    for rule in forward_accepts() {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        let check: Vec<&str> = ["-w", "-C", chain]
            .into_iter()
            .chain(rule.clone())
            .collect();
        if run(&iptables, &check, None).await.is_err() {
            let insert: Vec<&str> = ["-w", "-I", chain].into_iter().chain(rule).collect();
            run(&iptables, &insert, None).await?;
        }
    }
    Ok(())
}

/// Turns IPv4 forwarding on if it is off.
fn enable_forwarding() -> Result<(), EgressError> {
    const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
    let now = std::fs::read_to_string(FORWARDING).map_err(io_error(FORWARDING))?;
    if now.trim() != "1" {
        std::fs::write(FORWARDING, "1").map_err(io_error(FORWARDING))?;
        tracing::warn!("turned IPv4 forwarding on (net.ipv4.ip_forward = 1) for job egress");
    }
    Ok(())
}

/// One job's veth pair, deleted by [`JobLink::remove`] (and by the kernel with the job's
/// namespace).
#[derive(Debug)]
pub struct JobLink {
    ip: PathBuf,
    name: String,
    slot: u32,
}

impl JobLink {
    /// The host end's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's address.
    pub fn job_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(host_address(self.slot)) + 1)
    }

    /// Deletes the pair (gone already is fine).
    pub async fn remove(&self) {
        match run(&self.ip, &["link", "del", "dev", &self.name], None).await {
            Ok(_) => {}
            Err(EgressError::Command { reason, .. }) if reason.contains("Cannot find") => {}
            Err(error) => tracing::warn!(%error, "deleting a job's network link"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_thirty_twos_inside_the_pool() {
        assert_eq!(host_address(0), Ipv4Addr::new(100, 80, 0, 1));
        assert_eq!(host_address(1), Ipv4Addr::new(100, 80, 0, 5));
        assert_eq!(host_address(SLOTS - 1), Ipv4Addr::new(100, 80, 255, 253));
        assert!(in_pool(host_address(SLOTS - 1)));
        assert!(!in_pool(Ipv4Addr::new(100, 81, 0, 1)));
        assert!(!in_pool(Ipv4Addr::new(100, 79, 255, 255)));
        assert!(format!("{HOST_LINK_PREFIX}{}", SLOTS - 1).len() <= 15);
    }

    #[test]
    fn the_ruleset_matches_job_links_and_the_pool() {
        let rules = ruleset();
        assert!(rules.starts_with("table inet horde_egress\nflush table inet horde_egress\n"));
        assert!(rules.contains("iifname \"hrd-e*\" fib daddr type"));
        assert!(rules.contains("ip saddr 100.80.0.0/16 oifname != \"hrd-e*\" masquerade"));
        let accepts = forward_accepts();
        assert_eq!(accepts[0][..2], ["-i", "hrd-e+"]);
        assert_eq!(accepts[1].last().map(String::as_str), Some("ACCEPT"));
    }
}
