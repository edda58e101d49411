//! horde-testnet: starts a local network of `horde node` processes with role flags, and is the
//! library multi-node tests use (the way libp2p uses `swarm-test`).
//!
//! [`Testnet::start`] generates a key per node in a directory (temporary unless given), writes
//! each node's config, starts one `horde node --role …` process per node and waits until each
//! has logged its start. With discovery nodes bind port 0 and keep the port (`data/bound.toml`,
//! read back after each start: no race); the facilitator starts first (and, when miners join
//! through the validators, the validators next). Static peer lists (no
//! discovery) need free ports picked here. Nodes can be killed and restarted with the same key and
//! port. Dropping the testnet kills every process.
//!
//! Layout: `lib.rs` (this harness), `binaries.rs` (finding and building the workspace's
//! binaries), `convergence.rs` (whether discovery converged: each node's directory asked),
//! `demo.rs` (the demo run through a network), `demo_job.rs`
//! (+ `demo_job/http.rs`, `demo_job/websocket.rs`: the demo job program's server), `image.rs`
//! (container images of workspace programs, built from local files), `processes.rs` (the
//! testnet's node, job and sandbox processes, from `/proc`), `reports.rs`
//! (helpers for miner-report tests), `bin/horde-testnet.rs` (the `up` / `demo` command line),
//! `bin/horde-demo-job.rs` (the demo job program).

mod binaries;
mod convergence;
pub mod demo;
pub mod demo_job;
pub mod image;
mod processes;
pub mod reports;

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
pub use binaries::{demo_job_binary, horde_binary, workspace_binary};
use horde_node::server::config::{ClassConfig, MinerConfig, NodeConfig};
use horde_node::server::discovery::{self, BootstrapPeer};
pub use horde_node::server::executor::runner::Runtime;
use horde_protocol::{ExecutorClass, Hotkey, NodeAddr, NodeRecord, Role, SecretKey};

/// How long a node has to log its start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Testnet::wait_converged`] waits for one observer's answer.
const OBSERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`Testnet::wait_converged`] asks the observers that still lack records.
const CONVERGE_POLL: Duration = Duration::from_millis(100);

/// The shape of the network to start.
#[derive(Debug, Clone)]
pub struct TestnetConfig {
    /// Validators.
    pub validators: usize,
    /// Miners.
    pub miners: usize,
    /// Most executors per miner (of the one class, [`TestnetConfig::class`]).
    pub executors_per_miner: u32,
    /// Executors each miner starts before any job asks.
    pub prewarm: u32,
    /// Storage nodes.
    pub storage: usize,
    /// The executor class miners offer.
    pub class: String,
    /// The runner of that class's executors (default: the process runner, bubblewrap).
    pub runtime: Runtime,
    /// Further classes every miner offers beside `class`, each with its own runner (see
    /// [`runner_class`]).
    pub more_classes: Vec<ClassConfig>,
    /// Where keys, configs, logs and state go (default: a temporary directory).
    pub dir: Option<PathBuf>,
    /// The `horde` binary (default: found next to the running program, built if missing).
    pub horde_bin: Option<PathBuf>,
    /// The program miners start as their executors (default: the `horde` binary).
    pub executor_program: Option<PathBuf>,
    /// How long miners give a spawned executor to register (ms); `None` keeps the default (30 s).
    pub registration_timeout_ms: Option<u64>,
    /// `RUST_LOG` for the nodes.
    pub log_filter: String,
    /// Facilitator's validator-silence limit (ms); `None` keeps the default.
    pub validator_silence_ms: Option<u64>,
    /// Nodes find each other by discovery, joining through the facilitator (`--bootstrap`);
    /// `false` writes static peer lists instead and turns discovery off (a closed deployment).
    pub discovery: bool,
    /// With discovery: the validators join through the facilitator and start first; every
    /// other node then joins through one validator (in turn), as a subnet's miners would know
    /// its validators, instead of all joining through the facilitator (`false`, the default).
    pub join_through_validators: bool,
    /// Lifetime of node records (seconds); `None` keeps the default (120 s).
    pub record_ttl_secs: Option<u64>,
    /// How long [`Testnet::start`] waits for discovery to converge.
    pub converge_timeout: Duration,
    /// The address miners' job endpoints listen on and advertise (`[miner] job_host`); `None`
    /// keeps the default (127.0.0.1).
    pub job_host: Option<IpAddr>,
}

impl Default for TestnetConfig {
    fn default() -> Self {
        Self {
            validators: 1,
            miners: 1,
            executors_per_miner: 1,
            prewarm: 1,
            storage: 1,
            class: "cpu".to_owned(),
            runtime: Runtime::default(),
            more_classes: Vec::new(),
            dir: None,
            horde_bin: None,
            executor_program: None,
            registration_timeout_ms: None,
            log_filter: "info".to_owned(),
            validator_silence_ms: None,
            discovery: true,
            join_through_validators: false,
            record_ttl_secs: None,
            converge_timeout: Duration::from_secs(30),
            job_host: None,
        }
    }
}

/// One node process of the testnet.
#[derive(Debug)]
pub struct NodeProcess {
    /// Its name (`facilitator`, `validator-0`, `miner-1`, `storage-0`, …).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its hotkey.
    pub hotkey: Hotkey,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its discovery (libp2p QUIC) address, when discovery runs.
    pub p2p: Option<SocketAddr>,
    /// Extra command-line arguments (`--bootstrap …`).
    args: Vec<String>,
    /// Its config file.
    pub config: PathBuf,
    /// What its config file holds.
    settings: NodeConfig,
    /// Its log file (stderr and stdout).
    pub log: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    /// The command-line arguments it is started with after its config file (`--role`,
    /// `--bootstrap PEER`).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The node's address for clients and peers.
    pub fn node_addr(&self) -> NodeAddr {
        NodeAddr::new(self.hotkey, self.addr)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

/// A running local network.
#[derive(Debug)]
pub struct Testnet {
    _temp: Option<tempfile::TempDir>,
    dir: PathBuf,
    horde_bin: PathBuf,
    log_filter: String,
    nodes: Vec<NodeProcess>,
    shape: TestnetConfig,
    started_in: Duration,
    converged_in: Option<Duration>,
}

/// Class `name` with one executor, prewarmed, run by `runtime` (`Runtime::Unisolated` with
/// `allow_unisolated = true`, which it needs).
pub fn runner_class(name: &str, runtime: Runtime) -> ClassConfig {
    ClassConfig {
        prewarm: 1,
        runtime,
        allow_unisolated: runtime == Runtime::Unisolated,
        ..ClassConfig::new(ExecutorClass(name.to_owned()))
    }
}

/// A free UDP port on 127.0.0.1 (bound then released; the node binds it right after).
fn free_udp_port() -> anyhow::Result<u16> {
    let socket = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    Ok(socket.local_addr()?.port())
}

struct Planned {
    name: String,
    role: Role,
    key: SecretKey,
    addr: SocketAddr,
    p2p: SocketAddr,
}

impl Planned {
    /// The node `name` of a network in `dir`: its key and ports from an earlier start in the
    /// same directory when there was one (so saved job state and specs naming its keys keep
    /// working after a restart), else a fresh key and port 0, or free ports if `pick_ports`.
    fn new(dir: &Path, name: String, role: Role, pick_ports: bool) -> anyhow::Result<Self> {
        let node_dir = dir.join(&name);
        let key = match SecretKey::read_key_file(&node_dir.join("hotkey.json")) {
            Ok(key) => key,
            Err(_) => SecretKey::generate(),
        };
        let earlier = NodeConfig::load(
            &node_dir.join("node.toml"),
            &horde_node::server::config::Overrides::default(),
        )
        .ok();
        let (addr, p2p) = match earlier {
            Some(config) if config.listen.port() != 0 && config.discovery.listen.port() != 0 => {
                (config.listen, config.discovery.listen)
            }
            _ if !pick_ports => (([127, 0, 0, 1], 0).into(), ([127, 0, 0, 1], 0).into()),
            _ => (
                ([127, 0, 0, 1], free_udp_port()?).into(),
                ([127, 0, 0, 1], free_udp_port()?).into(),
            ),
        };
        Ok(Self {
            name,
            role,
            key,
            addr,
            p2p,
        })
    }
}

/// The static peer list of `nodes`.
fn node_addrs(nodes: &[&Planned]) -> Vec<NodeAddr> {
    nodes
        .iter()
        .map(|n| NodeAddr::new(n.key.hotkey(), n.addr))
        .collect()
}

impl Testnet {
    /// Starts the network and waits until every node has logged its start.
    pub fn start(config: TestnetConfig) -> anyhow::Result<Self> {
        let (temp, dir) = match &config.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (None, dir.clone())
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("horde-testnet-")
                    .tempdir()?;
                let dir = temp.path().to_path_buf();
                (Some(temp), dir)
            }
        };
        let horde_bin = match &config.horde_bin {
            Some(bin) => bin.clone(),
            None => horde_binary()?,
        };
        let pick = !config.discovery;
        let mut planned = vec![Planned::new(
            &dir,
            "facilitator".to_owned(),
            Role::Facilitator,
            pick,
        )?];
        for i in 0..config.validators {
            planned.push(Planned::new(
                &dir,
                format!("validator-{i}"),
                Role::Validator,
                pick,
            )?);
        }
        for i in 0..config.miners {
            planned.push(Planned::new(&dir, format!("miner-{i}"), Role::Miner, pick)?);
        }
        for i in 0..config.storage {
            planned.push(Planned::new(
                &dir,
                format!("storage-{i}"),
                Role::Storage,
                pick,
            )?);
        }
        // Static peer lists only for a closed deployment; with discovery every node joins
        // through the facilitator, which therefore starts first.
        let (validators, miners) = if config.discovery {
            (Vec::new(), Vec::new())
        } else {
            let of_role = |role| {
                planned
                    .iter()
                    .filter(|p| p.role == role)
                    .collect::<Vec<_>>()
            };
            (
                node_addrs(&of_role(Role::Validator)),
                node_addrs(&of_role(Role::Miner)),
            )
        };
        let mut testnet = Self {
            _temp: temp,
            dir,
            horde_bin,
            log_filter: config.log_filter.clone(),
            nodes: Vec::new(),
            shape: config,
            started_in: Duration::ZERO,
            converged_in: None,
        };
        let spawned = Instant::now();
        testnet.spawn_planned(&planned, &validators, &miners)?;
        for index in 0..testnet.nodes.len() {
            testnet.wait_started(index)?;
        }
        testnet.started_in = spawned.elapsed();
        if testnet.shape.discovery {
            testnet.wait_converged(testnet.shape.converge_timeout)?;
            testnet.converged_in = Some(spawned.elapsed());
        }
        Ok(testnet)
    }

    /// Adds and spawns the planned nodes; with discovery the facilitator first (others join it),
    /// and with [`TestnetConfig::join_through_validators`] the validators next (the rest join
    /// them).
    fn spawn_planned(
        &mut self,
        planned: &[Planned],
        validators: &[NodeAddr],
        miners: &[NodeAddr],
    ) -> anyhow::Result<()> {
        let mut rest: Vec<&Planned> = planned.iter().collect();
        let mut bootstrap = vec![String::new()];
        if self.shape.discovery && !rest.is_empty() {
            let first = rest.remove(0);
            self.add_planned(first, validators, miners, "")?;
            self.spawn(0)?;
            self.wait_started(0)?;
            bootstrap = vec![self.bootstrap_peer(0)?];
            if self.shape.join_through_validators {
                let (ahead, after): (Vec<&Planned>, Vec<&Planned>) =
                    rest.into_iter().partition(|p| p.role == Role::Validator);
                rest = after;
                let started = self.add_and_spawn(&ahead, validators, miners, &bootstrap)?;
                for index in started.clone() {
                    self.wait_started(index)?;
                }
                if !started.is_empty() {
                    bootstrap = started
                        .map(|index| self.bootstrap_peer(index))
                        .collect::<anyhow::Result<_>>()?;
                }
            }
        }
        self.add_and_spawn(&rest, validators, miners, &bootstrap)?;
        Ok(())
    }

    /// Adds the planned nodes, the i-th with `bootstrap[i % len]` as its bootstrap peer, then
    /// spawns them all; their indices.
    fn add_and_spawn(
        &mut self,
        planned: &[&Planned],
        validators: &[NodeAddr],
        miners: &[NodeAddr],
        bootstrap: &[String],
    ) -> anyhow::Result<std::ops::Range<usize>> {
        let from = self.nodes.len();
        for (i, node) in planned.iter().enumerate() {
            self.add_planned(node, validators, miners, &bootstrap[i % bootstrap.len()])?;
        }
        for index in from..self.nodes.len() {
            self.spawn(index)?;
        }
        Ok(from..self.nodes.len())
    }

    /// A started node's discovery listener, as `--bootstrap` takes it.
    fn bootstrap_peer(&self, index: usize) -> anyhow::Result<String> {
        let node = &self.nodes[index];
        node.p2p
            .map(|p2p| format!("{}@{p2p}", node.hotkey))
            .with_context(|| format!("{} has no discovery address", node.name))
    }

    /// The discovery listener of the node called `name`, to dial it as a bootstrap peer.
    fn discovery_peer(&self, name: &str) -> anyhow::Result<BootstrapPeer> {
        Ok(self.bootstrap_peer(self.index(name)?)?.parse()?)
    }

    /// The facilitator's discovery listener.
    fn facilitator_peer(&self) -> anyhow::Result<String> {
        let index = self
            .nodes
            .iter()
            .position(|n| n.role == Role::Facilitator)
            .context("no facilitator")?;
        self.bootstrap_peer(index)
    }

    /// Reads the ports a started node bound (`data/bound.toml`, written before its start line).
    fn learn_ports(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let data_dir = node.config.with_file_name(&node.settings.data_dir);
        let bound = horde_node::server::bound::BoundAddrs::read(&data_dir)
            .with_context(|| format!("{} wrote no bound addresses", node.name))?;
        node.addr = bound.listen;
        if node.p2p.is_some() {
            node.p2p = bound.discovery;
        }
        Ok(())
    }

    /// Writes a planned node's key and config and adds it (not yet started).
    fn add_planned(
        &mut self,
        node: &Planned,
        validators: &[NodeAddr],
        miners: &[NodeAddr],
        bootstrap: &str,
    ) -> anyhow::Result<()> {
        let node_dir = self.dir.join(&node.name);
        std::fs::create_dir_all(&node_dir)?;
        let key_path = node_dir.join("hotkey.json");
        let kept =
            SecretKey::read_key_file(&key_path).is_ok_and(|key| key.hotkey() == node.key.hotkey());
        if !kept {
            let _ = std::fs::remove_file(&key_path);
            node.key.write_key_file(&key_path)?;
        }
        let settings = self.node_config(node, validators, miners);
        let config_path = node_dir.join("node.toml");
        std::fs::write(&config_path, settings.to_toml()?)?;
        // The role (also in the file) and the bootstrap peer go on the command line, the way an
        // operator joins.
        let mut args = vec!["--role".to_owned(), node.role.to_string()];
        let discovery = self.shape.discovery;
        if discovery && node.role != Role::Facilitator {
            args.extend(["--bootstrap".to_owned(), bootstrap.to_owned()]);
        }
        self.nodes.push(NodeProcess {
            name: node.name.clone(),
            role: node.role,
            hotkey: node.key.hotkey(),
            addr: node.addr,
            p2p: discovery.then_some(node.p2p),
            args,
            log: config_path.with_file_name("node.log"),
            config: config_path,
            settings,
            child: None,
        });
        Ok(())
    }

    /// The config file of a planned node: its address, its static peers (without discovery)
    /// and the settings of the network's shape.
    fn node_config(
        &self,
        node: &Planned,
        validators: &[NodeAddr],
        miners: &[NodeAddr],
    ) -> NodeConfig {
        let shape = &self.shape;
        let mut config = NodeConfig::new(node.role);
        config.key_file = "hotkey.json".into();
        config.listen = node.addr;
        config.data_dir = "data".into();
        if shape.discovery {
            config.discovery.listen = node.p2p;
            if let Some(ttl) = shape.record_ttl_secs {
                config.discovery.record_ttl = Duration::from_secs(ttl);
            }
        } else {
            config.discovery.enabled = false;
        }
        match node.role {
            Role::Facilitator => {
                config.facilitator.validators = validators.to_vec();
                config.facilitator.miners = miners.to_vec();
                if let Some(silence) = shape.validator_silence_ms {
                    config.facilitator.validator_silence_ms = silence;
                }
            }
            Role::Validator => config.validator.miners = miners.to_vec(),
            Role::Miner => {
                let mut classes = vec![ClassConfig {
                    max_executors: shape.executors_per_miner,
                    prewarm: shape.prewarm.min(shape.executors_per_miner),
                    ..runner_class(&shape.class, shape.runtime)
                }];
                classes.extend(shape.more_classes.iter().cloned());
                let mut miner = MinerConfig {
                    classes,
                    executor_program: Some(
                        shape
                            .executor_program
                            .clone()
                            .unwrap_or_else(|| self.horde_bin.clone()),
                    ),
                    ..MinerConfig::default()
                };
                if let Some(timeout) = shape.registration_timeout_ms {
                    miner.registration_timeout = Duration::from_millis(timeout);
                }
                if let Some(host) = shape.job_host {
                    miner.job_host = host;
                }
                config.miner = Some(miner);
            }
            _ => {}
        }
        config
    }

    /// Changes `name`'s config file with `edit` (the node reads it when next started).
    pub fn edit_config(
        &mut self,
        name: &str,
        edit: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<()> {
        let index = self.index(name)?;
        let node = &mut self.nodes[index];
        edit(&mut node.settings);
        std::fs::write(&node.config, node.settings.to_toml()?)
            .with_context(|| format!("writing {}", node.config.display()))
    }

    /// Starts one more node of `role` (a late joiner) through the facilitator, and waits until
    /// the facilitator knows it. Returns its name.
    pub fn add_node(&mut self, role: Role) -> anyhow::Result<String> {
        anyhow::ensure!(self.shape.discovery, "late joiners need discovery");
        let prefix = role.to_string();
        let n = self
            .nodes
            .iter()
            .filter(|n| n.name.starts_with(&format!("{prefix}-")))
            .count();
        let planned = Planned::new(&self.dir, format!("{prefix}-{n}"), role, false)?;
        let bootstrap = self.facilitator_peer()?;
        self.add_planned(&planned, &[], &[], &bootstrap)?;
        let index = self.nodes.len() - 1;
        self.spawn(index)?;
        self.wait_started(index)?;
        self.wait_converged(self.shape.converge_timeout)?;
        Ok(planned.name)
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.horde_bin)
            .args(["node", "--config"])
            .arg(&node.config)
            .args(&node.args)
            // Whatever the filter, keep the start/stop and discovery lines (the filter comes
            // last: it may raise them, e.g. `horde_node::server::discovery=debug`).
            .env(
                "RUST_LOG",
                format!(
                    "horde_node::server::node=info,horde_node::server::discovery=info,{}",
                    self.log_filter
                ),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", node.name))?;
        node.child = Some(child);
        Ok(())
    }

    fn wait_started(&mut self, index: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let node = &mut self.nodes[index];
            if !node.is_running() {
                bail!(
                    "{} exited during start-up; log:\n{}",
                    node.name,
                    read_log(&node.log)
                );
            }
            if self.count_starts(index) > 0 {
                return self.learn_ports(index);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start within {START_TIMEOUT:?}",
                    self.nodes[index].name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count_starts(&self, index: usize) -> usize {
        read_log(&self.nodes[index].log)
            .matches("horde node started")
            .count()
    }

    /// Time from spawning the nodes until discovery converged (every running node known to
    /// the facilitator, every running miner known to every validator), when discovery runs.
    pub fn converged_in(&self) -> Option<Duration> {
        self.converged_in
    }

    /// Time from spawning the nodes until every one had logged its start.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The process id of a running node.
    pub fn pid(&self, name: &str) -> anyhow::Result<u32> {
        let child = self.node(name)?.child.as_ref();
        Ok(child
            .with_context(|| format!("{name} is not running"))?
            .id())
    }

    /// Resident memory of a node's process (KiB), from `/proc/PID/status`.
    pub fn rss_kib(&self, name: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(name)?))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS for {name}"))
    }

    /// The network's directory (keys, configs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every node.
    pub fn nodes(&self) -> &[NodeProcess] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> anyhow::Result<&NodeProcess> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Whether the node called `name` is still running.
    pub fn is_running(&mut self, name: &str) -> anyhow::Result<bool> {
        let index = self.index(name)?;
        Ok(self.nodes[index].is_running())
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// The facilitator's address (what clients dial).
    pub fn facilitator(&self) -> NodeAddr {
        self.nodes
            .iter()
            .find(|n| n.role == Role::Facilitator)
            .map(NodeProcess::node_addr)
            .unwrap_or_else(|| NodeAddr {
                hotkey: SecretKey::from_seed(&[0; 32]).hotkey(),
                addrs: Vec::new(),
            })
    }

    /// The first storage node's address, if any.
    pub fn storage(&self) -> Option<NodeAddr> {
        self.nodes
            .iter()
            .find(|n| n.role == Role::Storage)
            .map(NodeProcess::node_addr)
    }

    /// Kills a node with SIGKILL (no clean shutdown).
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Freezes a node with SIGSTOP: it stays up but answers nothing (a hung process).
    pub fn pause(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, "-STOP")
    }

    /// Thaws a node frozen by [`Testnet::pause`].
    pub fn resume(&self, name: &str) -> anyhow::Result<()> {
        self.signal(name, "-CONT")
    }

    fn signal(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        let node = &self.nodes[self.index(name)?];
        let child = node
            .child
            .as_ref()
            .with_context(|| format!("{name} is not running"))?;
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {name} failed");
        Ok(())
    }

    /// Stops a node gracefully (SIGTERM), waiting up to 10 s before killing it.
    pub fn stop(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Restarts a killed node with the same key, port and state directory.
    pub fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        self.kill(name)?;
        self.start_again(name)?;
        // A restarted node has forgotten its directory: wait until it has learnt the network
        // again (and the network has its new record).
        if self.shape.discovery {
            self.wait_converged(self.shape.converge_timeout)?;
        }
        Ok(())
    }

    /// Starts a stopped (or killed) node again with the same key, port and state directory,
    /// and waits only until it has logged its start (not for discovery to converge).
    pub fn start_again(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        let before = self.count_starts(index);
        self.spawn(index)?;
        let deadline = Instant::now() + START_TIMEOUT;
        while self.count_starts(index) <= before {
            if !self.nodes[index].is_running() {
                bail!(
                    "{name} exited on restart:\n{}",
                    read_log(&self.nodes[index].log)
                );
            }
            if Instant::now() > deadline {
                bail!("{name} did not restart within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.learn_ports(index)?;
        Ok(())
    }

    /// A node's log so far.
    pub fn log(&self, name: &str) -> String {
        self.node(name)
            .map(|n| read_log(&n.log))
            .unwrap_or_default()
    }

    /// Stops every node with SIGINT and waits for them (killing any that linger).
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        // A frozen node cannot act on SIGINT.
        for node in &self.nodes {
            if let Some(child) = &node.child {
                // A node that already ended (stopped by `horde-testnet down`) has nothing to
                // signal: `kill`'s complaint about it is not worth showing.
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        for node in &mut self.nodes {
            if let Some(child) = &node.child {
                let _ = Command::new("kill")
                    .args(["-INT", &child.id().to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Executors whose miner was killed outright are orphans: reap them too (only `horde`
        // processes of this testnet, never whatever else names its directory).
        for (pid, _) in self.node_processes() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// What [`Testnet::scan_processes`] reads of a process.
struct ProcessInfo {
    /// `/proc/PID`.
    path: PathBuf,
    cmdline: String,
    environ: String,
}

/// Runs a future to completion on a runtime of its own, on a thread of its own (so it works
/// whether or not the caller is inside a runtime).
fn block_on<F>(future: F) -> anyhow::Result<F::Output>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(future))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("runtime thread panicked"))?
    })
}

fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text
}
