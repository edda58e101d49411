//! Node configuration: one TOML file per node, `deny_unknown_fields`, validated at load time.
//!
//! Each section is one serde type that is also what the role runs with: [`NodeConfig`] (the
//! top-level keys), [`FacilitatorConfig`], [`ValidatorConfig`], [`MinerConfig`] (with
//! [`ClassConfig`] per `[[miner.classes]]`), [`ExecutorConfig`], [`ReceiptsConfig`],
//! [`StoreLimits`] (`[storage]`) and [`DiscoveryConfig`]. A field is added in one place: the
//! type (with its serde default), its rule in the type's `validate`, and the commented example.
//! Loading reads the file, takes `--role`, resolves relative paths, applies the other command-line
//! overrides and validates; the testnet writes node files by serializing the same types.
//!
//! The commented example lives in `node/horde.example.toml`; every field has a default that works
//! for a single machine, so the smallest valid file names only the role.
//!
//! Layout: `config.rs` (the node and role sections), `config/encoding.rs` (values written as
//! text, seconds or milliseconds).

mod encoding;

pub(crate) use encoding::{millis, secs, text, text_list};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use horde_protocol::{ExecutorClass, Hotkey, NodeAddr, Role};
use serde::{Deserialize, Serialize};

use crate::server::discovery::BootstrapPeer;
pub use crate::server::discovery::DiscoveryConfig;
use crate::server::executor::runner::{ClassPolicy, Gpus, NetworkPolicy, Runtime};
pub use crate::server::storage::StoreLimits;

/// Default QUIC listen address: loopback with an OS-chosen port, safe for a single machine.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// Default cap on concurrent QUIC connections per node: transport's, derived from the memory
/// each connection may hold (4 GiB / 32 MiB receive window = 128; it used to be 1,024 here, which
/// is 32 GiB of worst-case buffering on a 24 GiB machine).
pub const DEFAULT_MAX_CONNECTIONS: usize = horde_transport::DEFAULT_MAX_CONNECTIONS;

/// Default time the facilitator waits for any word from a job's validator before it fails the
/// job: longer than the QUIC idle timeout (10 s), so a dead link is reported by QUIC first.
pub const DEFAULT_VALIDATOR_SILENCE_MS: u64 = 30_000;

/// Default time a reported miner stays excluded from selection: an hour, long enough to take a
/// cheating miner out of rotation, short enough that a mistaken report heals by itself.
pub const DEFAULT_EXCLUSION_SECS: u64 = 3600;

/// Default time a validator waits for a miner's countersignature: a miner answers in one round
/// trip and an fsync, so 5 s is generous; past it the receipt is stored uncountersigned.
pub const DEFAULT_COUNTERSIGN_TIMEOUT_MS: u64 = 5_000;

/// Loopback: the default for job endpoints, right for a single machine.
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Longest executor registration timeout accepted: an executor that has not registered within
/// an hour is hung, and a longer wait would only keep its class's jobs declined.
const MAX_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(3600);

/// Longest executor class name, as the miner's record carries it.
const MAX_CLASS_NAME_LEN: usize = 64;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has unknown fields or a value of the wrong shape.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the line or the field).
        message: String,
    },
    /// Neither the file nor the command line names the role.
    #[error("config {path}: no role: set `role = \"…\"` or pass --role")]
    NoRole {
        /// The file.
        path: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config {path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// The field and what is wrong with it.
        source: InvalidField,
    },
    /// The configuration could not be written as TOML.
    #[error("config: cannot write as TOML: {0}")]
    Write(String),
}

/// A config value out of range or inconsistent with another: the field, as its dotted path
/// (`miner.classes[0].max_executors`), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
#[non_exhaustive]
pub struct InvalidField {
    /// The field's dotted path in the file.
    pub field: String,
    /// What is wrong with its value.
    pub reason: String,
}

impl InvalidField {
    /// The value of `field` is wrong because of `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A node's configuration: the file's top-level keys and one field per section.
///
/// Read with [`NodeConfig::load`] (or [`NodeConfig::parse`]); written with
/// [`NodeConfig::to_toml`]. Loaded, relative paths are resolved and it is valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The role this node plays (in the file or `--role`).
    #[serde(with = "text")]
    pub role: Role,
    /// The hotkey file (JSON, mode 0600). Relative paths are relative to the config file.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// QUIC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Cap on concurrent QUIC connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Cap on concurrent incoming QUIC connections from one hotkey. Above `max_connections` it
    /// has no effect, which is allowed: lowering `max_connections` alone must not make a file
    /// invalid.
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Where the node keeps its state. Empty in a file: `<role>-data` beside the config file.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub data_dir: PathBuf,
    /// `[facilitator]` settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub facilitator: FacilitatorConfig,
    /// `[validator]` settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub validator: ValidatorConfig,
    /// `[miner]` settings (`None` unless the section is present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miner: Option<MinerConfig>,
    /// `[executor]` settings (`None` unless the section is present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorConfig>,
    /// `[storage]` settings: blob size limit and who may put (defaults: 64 GiB, anyone).
    #[serde(default, skip_serializing_if = "is_default")]
    pub storage: StoreLimits,
    /// `[discovery]` settings (on by default, listening on loopback with an OS-chosen port).
    #[serde(default, skip_serializing_if = "is_default")]
    pub discovery: DiscoveryConfig,
    /// `[receipts]` settings: receipt log size and countersignature deadline.
    #[serde(default, skip_serializing_if = "is_default")]
    pub receipts: ReceiptsConfig,
}

fn default_key_file() -> PathBuf {
    PathBuf::from("hotkey.json")
}

fn default_listen() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 0)
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

fn default_max_connections_per_peer() -> usize {
    horde_transport::DEFAULT_MAX_CONNECTIONS_PER_PEER
}

fn path_is_empty(path: &Path) -> bool {
    path.as_os_str().is_empty()
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// Facilitator settings: `[facilitator]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FacilitatorConfig {
    /// Validators to choose from (static peers), `HOTKEY@IP:PORT`.
    #[serde(with = "text_list")]
    pub validators: Vec<NodeAddr>,
    /// Miners to choose from (static peers), `HOTKEY@IP:PORT`.
    #[serde(with = "text_list")]
    pub miners: Vec<NodeAddr>,
    /// Client account keys allowed to submit; `None` accepts any key (testnet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_clients: Option<Vec<Hotkey>>,
    /// How long a job's validator may stay silent before the job fails.
    pub validator_silence_ms: u64,
    /// The miners the validators trust: `on_trusted_miner` jobs are only sent to these (the
    /// validators check again against their own `trusted_miners`). Empty: such jobs are refused
    /// with `NoMiner`.
    pub trusted_miners: Vec<Hotkey>,
    /// How long a miner with a verified report against it is not chosen.
    #[serde(rename = "exclusion_secs", with = "secs")]
    pub exclusion: Duration,
}

impl Default for FacilitatorConfig {
    fn default() -> Self {
        Self {
            validators: Vec::new(),
            miners: Vec::new(),
            allowed_clients: None,
            validator_silence_ms: DEFAULT_VALIDATOR_SILENCE_MS,
            trusted_miners: Vec::new(),
            exclusion: Duration::from_secs(DEFAULT_EXCLUSION_SECS),
        }
    }
}

/// Validator settings: `[validator]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidatorConfig {
    /// Miners this validator knows and will drive jobs on, `HOTKEY@IP:PORT`.
    #[serde(with = "text_list")]
    pub miners: Vec<NodeAddr>,
    /// Miners trusted for `on_trusted_miner` jobs.
    pub trusted_miners: Vec<Hotkey>,
    /// Facilitators allowed to assign jobs; `None` accepts any (testnet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_facilitators: Option<Vec<Hotkey>>,
    /// How long a miner with a verified report against it is excluded from selection.
    #[serde(rename = "exclusion_secs", with = "secs")]
    pub exclusion: Duration,
    /// Where exclusions are persisted (JSON, written atomically); `None` keeps them in memory.
    /// Not in the file: loading sets `<data_dir>/exclusions.json`.
    #[serde(skip)]
    pub exclusions_file: Option<PathBuf>,
    /// Where accepted job ids are persisted until their spec expires; `None` keeps them in
    /// memory. Not in the file: loading sets `<data_dir>/seen_jobs.bin`.
    #[serde(skip)]
    pub seen_jobs_file: Option<PathBuf>,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        Self {
            miners: Vec::new(),
            trusted_miners: Vec::new(),
            allowed_facilitators: None,
            exclusion: Duration::from_secs(DEFAULT_EXCLUSION_SECS),
            exclusions_file: None,
            seen_jobs_file: None,
        }
    }
}

/// One executor class a miner offers: `[[miner.classes]]`, with the runner, network and limits
/// its jobs get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    /// The class (1 to 64 characters).
    pub class: ExecutorClass,
    /// Most executors of this class running at once (at least 1).
    #[serde(default = "default_max_executors")]
    pub max_executors: u32,
    /// Executors started at miner start-up, before any job asks (at most `max_executors`).
    #[serde(default)]
    pub prewarm: u32,
    /// `"process"` (bubblewrap sandbox, the default), `"container"` (Docker Engine API), or
    /// `"unisolated"` (a plain child process; needs `allow_unisolated = true`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub runtime: Runtime,
    /// `"none"` (only the job's own loopback, the default) or `"internet"` (a veth pair and NAT
    /// per job, never the host's own addresses; needs the node to run as root).
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: NetworkPolicy,
    /// Memory limit, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU time, in CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Most processes and threads at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Size of the job's private `/tmp`, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_mb: Option<u64>,
    /// Most bytes the job's outputs send, all its uploads together, MiB (default
    /// 4096: [`crate::server::executor::runner::DEFAULT_OUTPUT_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_mb: Option<u64>,
    /// Most disk the job's output directory and logs take while it runs, MiB; also the most
    /// any one file it writes may hold (default twice `output_mb`). A job past it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// `"all"` or a number (container runtime only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Gpus>,
    /// The host uid (and gid) jobs run as when the node is root (default 65534).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Run jobs even where this host cannot isolate them (said loudly at start).
    #[serde(default, skip_serializing_if = "is_default")]
    pub allow_unisolated: bool,
}

const MIB: u64 = 1024 * 1024;

impl ClassConfig {
    /// A class with every default: one executor, none prewarmed, the process runner, no network.
    pub fn new(class: ExecutorClass) -> Self {
        Self {
            class,
            max_executors: default_max_executors(),
            prewarm: 0,
            runtime: Runtime::default(),
            network: NetworkPolicy::default(),
            memory_mb: None,
            cpus: None,
            pids: None,
            tmp_mb: None,
            output_mb: None,
            disk_mb: None,
            gpus: None,
            uid: None,
            allow_unisolated: false,
        }
    }

    /// The policy its executors apply to jobs.
    pub fn policy(&self) -> ClassPolicy {
        ClassPolicy {
            runtime: self.runtime,
            network: self.network,
            memory_bytes: self.memory_mb.map(|mb| mb.saturating_mul(MIB)),
            cpus: self.cpus,
            pids: self.pids,
            tmp_bytes: self.tmp_mb.map(|mb| mb.saturating_mul(MIB)),
            output_bytes: self.output_mb.map(|mb| mb.saturating_mul(MIB)),
            disk_bytes: self.disk_mb.map(|mb| mb.saturating_mul(MIB)),
            gpus: self.gpus,
            uid: self.uid,
            allow_unisolated: self.allow_unisolated,
        }
    }
}

fn default_max_executors() -> u32 {
    1
}

impl ClassConfig {
    /// Checks the class as `miner.classes[index]`.
    pub fn validate(&self, index: usize) -> Result<(), InvalidField> {
        let field = |name: &str| format!("miner.classes[{index}].{name}");
        let name = &self.class.0;
        if name.is_empty() || name.len() > MAX_CLASS_NAME_LEN {
            return Err(InvalidField::new(
                field("class"),
                format!("class name {name:?} must be 1 to {MAX_CLASS_NAME_LEN} characters"),
            ));
        }
        if self.max_executors == 0 {
            return Err(InvalidField::new(
                field("max_executors"),
                format!("{name}: need 1 <= max_executors"),
            ));
        }
        if self.prewarm > self.max_executors {
            return Err(InvalidField::new(
                field("prewarm"),
                format!("{name}: need prewarm <= max_executors"),
            ));
        }
        self.policy()
            .validate()
            .map_err(|reason| InvalidField::new(field("policy"), format!("{name}: {reason}")))
    }
}

/// Miner settings: `[miner]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MinerConfig {
    /// Executor classes offered.
    pub classes: Vec<ClassConfig>,
    /// Validators allowed to send jobs; `None` accepts any (testnet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_validators: Option<Vec<Hotkey>>,
    /// The `horde` binary to spawn executors with (default: this binary). Relative paths are
    /// relative to the config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executor_program: Option<PathBuf>,
    /// The address job endpoints listen on and advertise.
    pub job_host: IpAddr,
    /// How long a spawned executor may take to register before it is killed and its start
    /// counted as failed.
    #[serde(rename = "registration_timeout_ms", with = "millis")]
    pub registration_timeout: Duration,
}

impl Default for MinerConfig {
    fn default() -> Self {
        Self {
            classes: Vec::new(),
            allowed_validators: None,
            executor_program: None,
            job_host: LOCALHOST,
            registration_timeout: crate::server::miner::DEFAULT_REGISTRATION_TIMEOUT,
        }
    }
}

impl MinerConfig {
    /// Checks `[miner]` and each of its classes.
    pub fn validate(&self) -> Result<(), InvalidField> {
        for (index, class) in self.classes.iter().enumerate() {
            class.validate(index)?;
        }
        if self.registration_timeout.is_zero()
            || self.registration_timeout > MAX_REGISTRATION_TIMEOUT
        {
            return Err(InvalidField::new(
                "miner.registration_timeout_ms",
                format!("must be 1 to {}", MAX_REGISTRATION_TIMEOUT.as_millis()),
            ));
        }
        Ok(())
    }
}

/// Executor settings: `[executor]` (the miner writes it for each executor it starts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    /// The miner to register with, `HOTKEY@IP:PORT`.
    #[serde(with = "text")]
    pub miner: NodeAddr,
    /// The class served.
    pub class: ExecutorClass,
    /// The address job endpoints listen on and advertise.
    #[serde(default = "default_job_host")]
    pub job_host: IpAddr,
    /// The class's runner, network and limits (written by the miner from its class).
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: ClassPolicy,
}

fn default_job_host() -> IpAddr {
    LOCALHOST
}

/// Accounting receipts (validators and miners): `[receipts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsConfig {
    /// Cap on `<data_dir>/receipts.log`; receipts past it are refused (and logged).
    pub max_log_bytes: u64,
    /// How long a validator waits for the miner to countersign a receipt.
    #[serde(rename = "countersign_timeout_ms", with = "millis")]
    pub countersign_timeout: Duration,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        Self {
            max_log_bytes: crate::server::receipts::DEFAULT_MAX_LOG_BYTES,
            countersign_timeout: Duration::from_millis(DEFAULT_COUNTERSIGN_TIMEOUT_MS),
        }
    }
}

impl ReceiptsConfig {
    /// Checks `[receipts]`.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let smallest_log = crate::server::receipts::MIN_LOG_BYTES;
        if self.max_log_bytes < smallest_log {
            return Err(InvalidField::new(
                "receipts.max_log_bytes",
                format!("must be at least {smallest_log}"),
            ));
        }
        if self.countersign_timeout.is_zero() {
            return Err(InvalidField::new(
                "receipts.countersign_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--role`.
    pub role: Option<Role>,
    /// `--key`.
    pub key_file: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--bootstrap` (added to the file's list).
    pub bootstrap: Vec<BootstrapPeer>,
    /// `--p2p-listen`.
    pub p2p_listen: Option<SocketAddr>,
}

impl Overrides {
    /// Puts the flags other than `--role` (which [`NodeConfig::parse`] takes before the typed
    /// read, since defaults follow from it) over the loaded file.
    fn apply(&self, config: &mut NodeConfig) {
        // Paths given on the command line are relative to the working directory.
        if let Some(key_file) = &self.key_file {
            config.key_file = absolute(key_file);
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = absolute(data_dir);
        }
        config
            .discovery
            .bootstrap
            .extend(self.bootstrap.iter().cloned());
        if let Some(p2p_listen) = self.p2p_listen {
            config.discovery.listen = p2p_listen;
        }
    }
}

/// `path` against the working directory: a relative path (`horde node --config node.toml`,
/// `--data-dir data`) would otherwise reach places that do not share the node's working
/// directory, such as a Docker Engine mounting a job's volume ("mount path must be absolute").
/// An empty path is the working directory; one that cannot be made absolute (the working
/// directory unreadable) is kept as it is, and its first use names it.
fn absolute(path: &Path) -> PathBuf {
    let path = if path_is_empty(path) {
        Path::new(".")
    } else {
        path
    };
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

impl NodeConfig {
    /// A configuration for `role` with every default: what a file holding only `role` loads to,
    /// before its paths are resolved.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            key_file: default_key_file(),
            listen: default_listen(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: default_max_connections_per_peer(),
            data_dir: PathBuf::new(),
            facilitator: FacilitatorConfig::default(),
            validator: ValidatorConfig::default(),
            miner: None,
            executor: None,
            storage: StoreLimits::default(),
            discovery: DiscoveryConfig::default(),
            receipts: ReceiptsConfig::default(),
        }
    }

    /// Reads and validates a config file, then applies command-line overrides.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, NodeConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| NodeConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &shown, base, overrides)
    }

    /// Reads config text (`shown` names it in errors): takes `--role`, resolves relative paths
    /// against `base`, applies the other overrides, fills in what follows from the role and
    /// the data directory, and validates.
    pub fn parse(
        text: &str,
        shown: &str,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Self, NodeConfigError> {
        let parse_error = |e: toml::de::Error| NodeConfigError::Parse {
            path: shown.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        };
        // Syntax errors name the line; the typed read below names the field.
        let mut table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        if let Some(role) = overrides.role {
            table.insert("role".to_owned(), role.as_str().into());
        }
        if !table.contains_key("role") {
            return Err(NodeConfigError::NoRole {
                path: shown.to_owned(),
            });
        }
        let mut config: Self = table.try_into().map_err(parse_error)?;
        config.resolve_paths(base);
        overrides.apply(&mut config);
        config.derive_settings();
        config
            .validate()
            .map_err(|source| NodeConfigError::Invalid {
                path: shown.to_owned(),
                source,
            })?;
        Ok(config)
    }

    /// Checks every value and how they fit together, naming the field at fault.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.role == Role::Client {
            return Err(InvalidField::new("role", "a client is not a node"));
        }
        if self.max_connections == 0 {
            return Err(InvalidField::new("max_connections", "must be at least 1"));
        }
        if self.max_connections_per_peer == 0 {
            return Err(InvalidField::new(
                "max_connections_per_peer",
                "must be at least 1",
            ));
        }
        if self.role == Role::Executor && self.executor.is_none() {
            return Err(InvalidField::new(
                "executor",
                "role executor needs an [executor] section",
            ));
        }
        if let Some(miner) = &self.miner {
            miner.validate()?;
        }
        if let Some(executor) = &self.executor {
            executor
                .policy
                .validate()
                .map_err(|reason| InvalidField::new("executor.policy", reason))?;
        }
        self.storage.validate()?;
        self.discovery.validate()?;
        self.receipts.validate()
    }

    /// The configuration as a TOML file that [`NodeConfig::load`] reads back (sections left at
    /// their defaults are left out).
    pub fn to_toml(&self) -> Result<String, NodeConfigError> {
        toml::to_string(self).map_err(|e| NodeConfigError::Write(e.to_string()))
    }

    /// Makes the file's relative paths relative to `base` (the config file's directory), and
    /// an empty `data_dir` `<base>/<role>-data`; all absolute, `base` against the working
    /// directory.
    fn resolve_paths(&mut self, base: &Path) {
        let base = absolute(base);
        if path_is_empty(&self.data_dir) {
            self.data_dir = PathBuf::from(format!("{}-data", self.role));
        }
        // `join` keeps an absolute path as it is.
        self.data_dir = base.join(&self.data_dir);
        self.key_file = base.join(&self.key_file);
        if let Some(program) = self
            .miner
            .as_mut()
            .and_then(|miner| miner.executor_program.as_mut())
        {
            *program = base.join(&*program);
        }
    }

    /// Fills in what follows from the role and the final data directory.
    fn derive_settings(&mut self) {
        self.validator.exclusions_file = Some(self.data_dir.join("exclusions.json"));
        self.validator.seen_jobs_file = Some(self.data_dir.join("seen_jobs.bin"));
        // Executors are children of their miner and never join.
        if self.role == Role::Executor {
            self.discovery.enabled = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, NodeConfigError> {
        NodeConfig::parse(
            text,
            "test.toml",
            Path::new("/etc/horde"),
            &Overrides::default(),
        )
    }

    /// Issue 16, item 11: the node's default connection cap is transport's, and what it may
    /// buffer fits the memory budget it is derived from.
    #[test]
    fn the_default_connection_cap_is_derived_from_memory() {
        let config = parse("role = \"facilitator\"").unwrap();
        assert_eq!(
            config.max_connections,
            horde_transport::DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(config.max_connections, 128);
        let worst_case = config.max_connections as u64 * horde_transport::RECEIVE_WINDOW;
        assert!(worst_case <= horde_transport::RECEIVE_BUFFER_BUDGET);
    }

    #[test]
    fn class_policies_are_parsed_validated_and_passed_to_executors() {
        let config = parse(
            "role = \"miner\"\n[[miner.classes]]\nclass = \"cpu\"\nmemory_mb = 64\ncpus = 1.5\n\
             pids = 32\ntmp_mb = 8\nuid = 4242\nallow_unisolated = true\n",
        )
        .unwrap();
        let policy = config.miner.unwrap().classes[0].policy();
        assert_eq!(
            policy,
            ClassPolicy {
                memory_bytes: Some(64 * MIB),
                cpus: Some(1.5),
                pids: Some(32),
                tmp_bytes: Some(8 * MIB),
                uid: Some(4242),
                allow_unisolated: true,
                ..ClassPolicy::default()
            }
        );
        // What the miner writes for its executors reads back as the same policy.
        let mut executor = NodeConfig::new(Role::Executor);
        executor.executor = Some(ExecutorConfig {
            miner: format!(
                "{}@127.0.0.1:1",
                horde_protocol::SecretKey::from_seed(&[1; 32]).hotkey()
            )
            .parse()
            .unwrap(),
            class: ExecutorClass("cpu".into()),
            job_host: LOCALHOST,
            policy: policy.clone(),
        });
        let read = parse(&executor.to_toml().unwrap()).unwrap();
        assert_eq!(read.executor.unwrap().policy, policy);
        for (class, needle) in [
            ("gpus = 2", "gpus need runtime = \"container\""),
            ("gpus = \"some\"", "gpus"),
            ("memory_mb = 0", "memory must be at least 1"),
            ("cpus = -1.0", "cpus"),
            ("uid = 0", "never run as root"),
            ("runtime = \"vm\"", "runtime"),
            ("runtime = \"unisolated\"", "needs allow_unisolated = true"),
        ] {
            let text = format!("role = \"miner\"\n[[miner.classes]]\nclass = \"cpu\"\n{class}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{class:?}: {err}");
        }
        let gpu = parse(
            "role = \"miner\"\n[[miner.classes]]\nclass = \"gpu\"\nruntime = \"container\"\n\
             gpus = \"all\"\n",
        )
        .unwrap();
        assert_eq!(gpu.miner.unwrap().classes[0].policy().gpus, Some(Gpus::All));
        let plain = parse(
            "role = \"miner\"\n[[miner.classes]]\nclass = \"cpu\"\nruntime = \"unisolated\"\n\
             allow_unisolated = true\n",
        )
        .unwrap();
        assert_eq!(
            plain.miner.unwrap().classes[0].policy().runtime,
            Runtime::Unisolated
        );
        for runtime in ["process", "container"] {
            let internet = parse(&format!(
                "role = \"miner\"\n[[miner.classes]]\nclass = \"net\"\nruntime = \"{runtime}\"\n\
                 network = \"internet\"\n"
            ))
            .unwrap();
            let policy = internet.miner.unwrap().classes[0].policy();
            assert_eq!(policy.network, NetworkPolicy::Internet, "{runtime}");
        }
    }

    #[test]
    fn minimal_file_gets_working_defaults() {
        let config = parse("role = \"validator\"").unwrap();
        assert_eq!(config.role, Role::Validator);
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.key_file, Path::new("/etc/horde/hotkey.json"));
        assert_eq!(config.data_dir, Path::new("/etc/horde/validator-data"));
        assert_eq!(
            config.max_connections_per_peer,
            horde_transport::DEFAULT_MAX_CONNECTIONS_PER_PEER
        );
        let config = parse("role = \"facilitator\"\nmax_connections_per_peer = 64").unwrap();
        assert_eq!(config.max_connections_per_peer, 64);
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../horde.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.role, Role::Validator);
    }

    #[test]
    fn storage_section_is_validated() {
        let config = parse("role = \"storage\"").unwrap();
        assert_eq!(
            config.storage,
            crate::server::storage::StoreLimits::default()
        );
        let key = horde_protocol::SecretKey::from_seed(&[3; 32]).hotkey();
        let config = parse(&format!(
            "role = \"storage\"\n[storage]\nmax_blob_size = 1048576\nput_allowlist = [\"{key}\"]\n\
             progress_timeout_ms = 1500\nmax_transfers = 3\nmax_transfers_per_peer = 2"
        ))
        .unwrap();
        assert_eq!(config.storage.max_blob_size, 1 << 20);
        assert_eq!(config.storage.put_allowlist, Some(vec![key]));
        assert_eq!(
            config.storage.progress_timeout,
            std::time::Duration::from_millis(1500)
        );
        assert_eq!(config.storage.max_transfers, 3);
        assert_eq!(config.storage.max_transfers_per_peer, Some(2));
        let config = parse("role = \"storage\"\n[storage]\nmax_transfers = 4").unwrap();
        assert_eq!(
            config.storage.transfers_per_peer(),
            4,
            "an unset share fits a smaller max_transfers"
        );
        for (text, needle) in [
            ("[storage]\nmax_blob_size = 0", "max_blob_size"),
            (
                "[storage]\nmax_blob_size = 18446744073709551615",
                "max_blob_size",
            ),
            ("[storage]\nput_allowlist = [\"nope\"]", "put_allowlist"),
            ("[storage]\nprogress_timeout_ms = 0", "progress_timeout_ms"),
            ("[storage]\nmax_transfers = 0", "max_transfers"),
            (
                "[storage]\nmax_transfers_per_peer = 0",
                "max_transfers_per_peer",
            ),
            (
                "[storage]\nmax_transfers = 8\nmax_transfers_per_peer = 9",
                "max_transfers_per_peer",
            ),
            ("[storage]\nmax_size = 1", "max_size"),
        ] {
            let err = parse(&format!("role = \"storage\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn discovery_section_and_flags() {
        let config = parse("role = \"miner\"").unwrap();
        assert!(config.discovery.enabled);
        assert!(config.discovery.bootstrap.is_empty());
        let key = horde_protocol::SecretKey::from_seed(&[4; 32]).hotkey();
        let text = format!(
            "role = \"validator\"\n[discovery]\nlisten = \"127.0.0.1:4100\"\n\
             bootstrap = [\"{key}@127.0.0.1:4001\"]\nrecord_ttl_secs = 5"
        );
        let flag: BootstrapPeer = format!("{key}@127.0.0.1:4002").parse().unwrap();
        let overrides = Overrides {
            bootstrap: vec![flag.clone()],
            ..Overrides::default()
        };
        let config = NodeConfig::parse(&text, "t.toml", Path::new("/x"), &overrides).unwrap();
        assert_eq!(config.discovery.listen, "127.0.0.1:4100".parse().unwrap());
        assert_eq!(config.discovery.bootstrap.len(), 2);
        assert_eq!(config.discovery.bootstrap[1], flag);
        assert_eq!(
            config.discovery.record_ttl,
            std::time::Duration::from_secs(5)
        );
        for (text, needle) in [
            (
                "[discovery]\nbootstrap = [\"nobody\"]",
                "discovery.bootstrap",
            ),
            ("[discovery]\nrecord_ttl_secs = 1", "record_ttl_secs"),
            ("[discovery]\nrecord_ttl_secs = 100000", "record_ttl_secs"),
            ("[discovery]\nlisten = \"here\"", "discovery.listen"),
        ] {
            let err = parse(&format!("role = \"miner\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let off = parse("role = \"miner\"\n[discovery]\nenabled = false").unwrap();
        assert!(!off.discovery.enabled);
    }

    #[test]
    fn receipts_section_is_validated() {
        let config = parse("role = \"miner\"").unwrap();
        assert_eq!(config.receipts, ReceiptsConfig::default());
        let config = parse(
            "role = \"validator\"\n[receipts]\nmax_log_bytes = 1048576\ncountersign_timeout_ms = 250",
        )
        .unwrap();
        assert_eq!(config.receipts.max_log_bytes, 1 << 20);
        assert_eq!(config.receipts.countersign_timeout.as_millis(), 250);
        for (text, needle) in [
            ("[receipts]\nmax_log_bytes = 100", "max_log_bytes"),
            (
                "[receipts]\ncountersign_timeout_ms = 0",
                "countersign_timeout_ms",
            ),
            ("[receipts]\nmax_bytes = 1", "max_bytes"),
        ] {
            let err = parse(&format!("role = \"validator\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse("role = \"miner\"\nlisen = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn trusted_miners_and_exclusion_periods_parse() {
        let miner = horde_protocol::SecretKey::from_seed(&[4; 32]).hotkey();
        let config = parse(&format!(
            "role = \"facilitator\"\n[facilitator]\ntrusted_miners = [\"{miner}\"]\n\
             exclusion_secs = 5\n[validator]\ntrusted_miners = [\"{miner}\"]\nexclusion_secs = 7\n"
        ))
        .unwrap();
        assert_eq!(config.facilitator.trusted_miners, vec![miner]);
        assert_eq!(config.facilitator.exclusion.as_secs(), 5);
        assert_eq!(config.validator.trusted_miners, vec![miner]);
        assert_eq!(config.validator.exclusion.as_secs(), 7);
        assert_eq!(
            config.validator.exclusions_file.as_deref(),
            Some(Path::new("/etc/horde/facilitator-data/exclusions.json"))
        );
        let defaults = parse("role = \"validator\"").unwrap();
        assert_eq!(
            defaults.validator.exclusion.as_secs(),
            DEFAULT_EXCLUSION_SECS
        );
        assert_eq!(
            defaults.facilitator.exclusion.as_secs(),
            DEFAULT_EXCLUSION_SECS
        );
    }

    #[test]
    fn miner_registration_timeout_is_validated() {
        let timeout = |config: NodeConfig| config.miner.unwrap().registration_timeout;
        let defaults = parse("role = \"miner\"\n[miner]").unwrap();
        assert_eq!(
            timeout(defaults),
            crate::server::miner::DEFAULT_REGISTRATION_TIMEOUT
        );
        let config = parse("role = \"miner\"\n[miner]\nregistration_timeout_ms = 2000").unwrap();
        assert_eq!(timeout(config), std::time::Duration::from_secs(2));
        for text in [
            "role = \"miner\"\n[miner]\nregistration_timeout_ms = 0",
            "role = \"miner\"\n[miner]\nregistration_timeout_ms = 3600001",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains("registration_timeout_ms"), "{text:?}: {err}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        for (text, needle) in [
            ("role = \"wizard\"", "unknown role"),
            ("", "no role"),
            ("role = \"client\"", "unknown role"),
            ("role = \"miner\"\nlisten = \"nowhere\"", "listen"),
            ("role = \"miner\"\nmax_connections = 0", "max_connections"),
            (
                "role = \"miner\"\nmax_connections_per_peer = 0",
                "max_connections_per_peer",
            ),
            ("role = 3", "role"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn miner_classes_are_validated_by_index() {
        for (text, needle) in [
            (
                "[[miner.classes]]\nclass = \"cpu\"\n[[miner.classes]]\nclass = \"gpu\"\nmax_executors = 0",
                "miner.classes[1].max_executors",
            ),
            (
                "[[miner.classes]]\nclass = \"cpu\"\nprewarm = 2",
                "miner.classes[0].prewarm",
            ),
            ("[[miner.classes]]\nclass = \"\"", "miner.classes[0].class"),
            ("[[miner.classes]]\nmax_executors = 1", "class"),
        ] {
            let err = parse(&format!("role = \"miner\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn role_may_come_from_the_command_line_alone() {
        let overrides = Overrides {
            role: Some(Role::Storage),
            ..Overrides::default()
        };
        let config = NodeConfig::parse("", "t", Path::new("/x"), &overrides).unwrap();
        assert_eq!(config.role, Role::Storage);
        assert_eq!(config.data_dir, Path::new("/x/storage-data"));
    }

    /// What the testnet writes is what a node reads back.
    #[test]
    fn a_written_config_reads_back() {
        let key = horde_protocol::SecretKey::from_seed(&[5; 32]).hotkey();
        let peer = NodeAddr::new(key, "127.0.0.1:4000".parse().unwrap());
        let mut config = NodeConfig::new(Role::Miner);
        config.listen = "127.0.0.1:4001".parse().unwrap();
        config.data_dir = "data".into();
        config.facilitator.validators = vec![peer.clone()];
        config.validator.trusted_miners = vec![key];
        config.discovery.bootstrap = vec![format!("{key}@127.0.0.1:4002").parse().unwrap()];
        config.receipts.countersign_timeout = std::time::Duration::from_millis(1500);
        config.storage.max_transfers_per_peer = Some(3);
        config.miner = Some(MinerConfig {
            classes: vec![ClassConfig {
                max_executors: 2,
                prewarm: 1,
                memory_mb: Some(64),
                ..ClassConfig::new(ExecutorClass("cpu".into()))
            }],
            executor_program: Some("/bin/horde".into()),
            ..MinerConfig::default()
        });
        config.executor = Some(ExecutorConfig {
            miner: peer,
            class: ExecutorClass("cpu".into()),
            job_host: LOCALHOST,
            policy: ClassPolicy {
                pids: Some(32),
                ..ClassPolicy::default()
            },
        });
        let text = config.to_toml().unwrap();
        let read = NodeConfig::parse(&text, "t", Path::new("/x"), &Overrides::default())
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(read.data_dir, Path::new("/x/data"));
        // Read from a config named relative to the working directory (`--config node.toml`),
        // and with `--data-dir` relative too: every path comes out absolute, against it.
        let here = std::env::current_dir().unwrap();
        let relative = NodeConfig::parse(&text, "t", Path::new(""), &Overrides::default()).unwrap();
        assert_eq!(relative.data_dir, here.join("data"));
        assert!(relative.key_file.is_absolute(), "{:?}", relative.key_file);
        let overridden = Overrides {
            data_dir: Some("elsewhere".into()),
            ..Overrides::default()
        };
        let relative = NodeConfig::parse(&text, "t", Path::new("/x"), &overridden).unwrap();
        assert_eq!(relative.data_dir, here.join("elsewhere"));
        assert_eq!(read.facilitator, config.facilitator);
        assert_eq!(
            read.validator.trusted_miners,
            config.validator.trusted_miners
        );
        assert_eq!(read.discovery, config.discovery);
        assert_eq!(read.receipts, config.receipts);
        assert_eq!(read.storage, config.storage);
        assert_eq!(read.miner, config.miner);
        assert_eq!(read.executor, config.executor);
        let defaults = NodeConfig::new(Role::Storage).to_toml().unwrap();
        assert!(
            !defaults.contains('['),
            "default sections are left out: {defaults}"
        );
    }

    #[test]
    fn overrides_win() {
        let overrides = Overrides {
            role: Some(Role::Miner),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            key_file: Some("/k.json".into()),
            data_dir: None,
            p2p_listen: Some("127.0.0.1:7001".parse().unwrap()),
            ..Overrides::default()
        };
        let config = NodeConfig::parse(
            "role = \"validator\"\nlisten = \"127.0.0.1:1\"",
            "t",
            Path::new("/x"),
            &overrides,
        )
        .unwrap();
        assert_eq!(config.role, Role::Miner);
        assert_eq!(config.discovery.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.key_file, Path::new("/k.json"));
    }
}
