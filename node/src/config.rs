//! Node configuration: one TOML file per node, `deny_unknown_fields`, validated at load time.
//!
//! The commented example lives in `node/horde.example.toml`; every field has a default that works
//! for a single machine, so the smallest valid file names only the role.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use horde_protocol::{ExecutorClass, Hotkey, NodeAddr, Role};

use crate::runner::{ClassPolicy, Gpus, NetworkPolicy, Runtime};

use crate::discovery::{BootstrapPeer, DiscoveryConfig, MIN_RECORD_TTL};
use serde::{Deserialize, Serialize};

/// Default QUIC listen address: loopback with an OS-chosen port, safe for a single machine.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// Default cap on concurrent QUIC connections per node. A validator talks to every miner it
/// drives and a facilitator to every client; 1024 keeps worst-case window memory bounded.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown fields.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the line and field).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    role: Option<String>,
    key_file: Option<PathBuf>,
    listen: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_peer: Option<usize>,
    data_dir: Option<PathBuf>,
    facilitator: Option<FacilitatorFile>,
    validator: Option<ValidatorFile>,
    miner: Option<MinerFile>,
    executor: Option<ExecutorFile>,
    storage: Option<StorageFile>,
    discovery: Option<DiscoveryFile>,
    receipts: Option<ReceiptsFile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DiscoveryFile {
    enabled: Option<bool>,
    listen: Option<String>,
    bootstrap: Option<Vec<String>>,
    record_ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReceiptsFile {
    max_log_bytes: Option<u64>,
    countersign_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StorageFile {
    max_blob_size: Option<u64>,
    put_allowlist: Option<Vec<String>>,
    progress_timeout_ms: Option<u64>,
    max_transfers: Option<usize>,
    max_transfers_per_peer: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FacilitatorFile {
    validators: Option<Vec<String>>,
    miners: Option<Vec<String>>,
    allowed_clients: Option<Vec<String>>,
    validator_silence_ms: Option<u64>,
    trusted_miners: Option<Vec<String>>,
    exclusion_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ValidatorFile {
    miners: Option<Vec<String>>,
    trusted_miners: Option<Vec<String>>,
    allowed_facilitators: Option<Vec<String>>,
    exclusion_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassFile {
    class: String,
    max_executors: Option<u32>,
    prewarm: Option<u32>,
    runtime: Option<Runtime>,
    network: Option<NetworkPolicy>,
    memory_mb: Option<u64>,
    cpus: Option<f64>,
    pids: Option<u64>,
    tmp_mb: Option<u64>,
    gpus: Option<Gpus>,
    uid: Option<u32>,
    allow_unisolated: Option<bool>,
}

/// An executor class's runner, network and limits, as written in `[executor.policy]` (the
/// miner writes it for the executors it spawns, from the class's own fields).
#[derive(Debug, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    runtime: Option<Runtime>,
    network: Option<NetworkPolicy>,
    memory_mb: Option<u64>,
    cpus: Option<f64>,
    pids: Option<u64>,
    tmp_mb: Option<u64>,
    gpus: Option<Gpus>,
    uid: Option<u32>,
}

const MIB: u64 = 1024 * 1024;

impl PolicyFile {
    fn from_class(class: &ClassFile) -> Self {
        Self {
            runtime: class.runtime,
            network: class.network,
            memory_mb: class.memory_mb,
            cpus: class.cpus,
            pids: class.pids,
            tmp_mb: class.tmp_mb,
            gpus: class.gpus,
            uid: class.uid,
        }
    }

    fn from_policy(policy: &ClassPolicy) -> Self {
        Self {
            runtime: Some(policy.runtime),
            network: Some(policy.network),
            memory_mb: policy.memory_bytes.map(|b| b / MIB),
            cpus: policy.cpus,
            pids: policy.pids,
            tmp_mb: policy.tmp_bytes.map(|b| b / MIB),
            gpus: policy.gpus,
            uid: policy.uid,
        }
    }

    /// The validated policy; `what` names the section in errors.
    fn validate(self, what: &str, allow_unisolated: bool) -> Result<ClassPolicy, String> {
        let invalid = |why: String| format!("{what}: {why}");
        let positive = |name: &str, value: Option<u64>| match value {
            Some(0) => Err(invalid(format!("{name} must be at least 1"))),
            _ => Ok(value),
        };
        let megabytes = |name: &str, value: Option<u64>| -> Result<Option<u64>, String> {
            positive(name, value)?
                .map(|mb| {
                    mb.checked_mul(MIB)
                        .ok_or_else(|| invalid(format!("{name} is too large")))
                })
                .transpose()
        };
        if let Some(cpus) = self.cpus
            && !(cpus.is_finite() && (0.01..=4096.0).contains(&cpus))
        {
            return Err(invalid(format!(
                "cpus = {cpus} must be between 0.01 and 4096"
            )));
        }
        let policy = ClassPolicy {
            runtime: self.runtime.unwrap_or_default(),
            network: self.network.unwrap_or_default(),
            memory_bytes: megabytes("memory_mb", self.memory_mb)?,
            cpus: self.cpus,
            pids: positive("pids", self.pids)?,
            tmp_bytes: megabytes("tmp_mb", self.tmp_mb)?,
            gpus: self.gpus,
            uid: self.uid,
            allow_unisolated,
        };
        if policy.runtime == Runtime::Process {
            if policy.network == NetworkPolicy::Internet {
                return Err(invalid(
                    "network = \"internet\" is not available with runtime = \"process\" yet \
                     (the process runner has no NAT to keep a job off the host's addresses); \
                     use network = \"none\" or runtime = \"container\""
                        .to_owned(),
                ));
            }
            if policy.gpus.is_some() {
                return Err(invalid("gpus need runtime = \"container\"".to_owned()));
            }
        }
        Ok(policy)
    }
}

/// The `[executor]` lines (after `[executor]`'s own keys) that give a spawned executor its
/// class's policy.
pub fn executor_policy_toml(policy: &ClassPolicy) -> String {
    let table = toml::to_string(&PolicyFile::from_policy(policy)).unwrap_or_default();
    format!(
        "allow_unisolated = {}\n\n[executor.policy]\n{table}",
        policy.allow_unisolated
    )
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MinerFile {
    classes: Option<Vec<ClassFile>>,
    allowed_validators: Option<Vec<String>>,
    executor_program: Option<PathBuf>,
    job_host: Option<IpAddr>,
    registration_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExecutorFile {
    miner: Option<String>,
    class: Option<String>,
    job_host: Option<IpAddr>,
    allow_unisolated: Option<bool>,
    policy: Option<PolicyFile>,
}

/// Default time the facilitator waits for any word from a job's validator before it fails the
/// job: longer than the QUIC idle timeout (10 s), so a dead link is reported by QUIC first.
pub const DEFAULT_VALIDATOR_SILENCE_MS: u64 = 30_000;

/// Facilitator settings.
#[derive(Debug, Clone)]
pub struct FacilitatorConfig {
    /// Validators to choose from (static peers).
    pub validators: Vec<NodeAddr>,
    /// Miners to choose from (static peers).
    pub miners: Vec<NodeAddr>,
    /// Client account keys allowed to submit; `None` accepts any key (testnet).
    pub allowed_clients: Option<Vec<Hotkey>>,
    /// How long a job's validator may stay silent before the job fails.
    pub validator_silence_ms: u64,
    /// The miners the validators trust: `on_trusted_miner` jobs are only sent to these (the
    /// validators check again against their own `trusted_miners`). Empty: such jobs are refused
    /// with `NoMiner`.
    pub trusted_miners: Vec<Hotkey>,
    /// How long a miner with a verified report against it is not chosen.
    pub exclusion: std::time::Duration,
}

impl Default for FacilitatorConfig {
    fn default() -> Self {
        Self {
            validators: Vec::new(),
            miners: Vec::new(),
            allowed_clients: None,
            validator_silence_ms: DEFAULT_VALIDATOR_SILENCE_MS,
            trusted_miners: Vec::new(),
            exclusion: std::time::Duration::from_secs(DEFAULT_EXCLUSION_SECS),
        }
    }
}

/// Default time a reported miner stays excluded from selection: an hour, long enough to take a
/// cheating miner out of rotation, short enough that a mistaken report heals by itself.
pub const DEFAULT_EXCLUSION_SECS: u64 = 3600;

/// Validator settings.
#[derive(Debug, Clone)]
pub struct ValidatorConfig {
    /// Miners this validator knows and will drive jobs on.
    pub miners: Vec<NodeAddr>,
    /// Miners trusted for `on_trusted_miner` jobs.
    pub trusted_miners: Vec<Hotkey>,
    /// Facilitators allowed to assign jobs; `None` accepts any (testnet).
    pub allowed_facilitators: Option<Vec<Hotkey>>,
    /// How long a miner with a verified report against it is excluded from selection.
    pub exclusion: std::time::Duration,
    /// Where exclusions are persisted (JSON, written atomically); `None` keeps them in memory.
    pub exclusions_file: Option<PathBuf>,
    /// Where accepted job ids are persisted until their spec expires; `None` keeps them in
    /// memory.
    pub seen_jobs_file: Option<PathBuf>,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        Self {
            miners: Vec::new(),
            trusted_miners: Vec::new(),
            allowed_facilitators: None,
            exclusion: std::time::Duration::from_secs(DEFAULT_EXCLUSION_SECS),
            exclusions_file: None,
            seen_jobs_file: None,
        }
    }
}

/// One executor class a miner offers.
#[derive(Debug, Clone)]
pub struct ClassConfig {
    /// The class.
    pub class: ExecutorClass,
    /// Most executors of this class running at once.
    pub max_executors: u32,
    /// Executors started at miner start-up, before any job asks.
    pub prewarm: u32,
    /// The runner, network and limits its jobs get.
    pub policy: ClassPolicy,
}

/// Miner settings.
#[derive(Debug, Clone)]
pub struct MinerConfig {
    /// Executor classes offered.
    pub classes: Vec<ClassConfig>,
    /// Validators allowed to send jobs; `None` accepts any (testnet).
    pub allowed_validators: Option<Vec<Hotkey>>,
    /// The `horde` binary to spawn executors with (default: this binary).
    pub executor_program: Option<PathBuf>,
    /// The address job endpoints listen on and advertise.
    pub job_host: IpAddr,
    /// How long a spawned executor may take to register before it is killed and its start
    /// counted as failed.
    pub registration_timeout: std::time::Duration,
}

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The miner to register with.
    pub miner: NodeAddr,
    /// The class served.
    pub class: ExecutorClass,
    /// The address job endpoints listen on and advertise.
    pub job_host: IpAddr,
    /// The class's runner, network and limits (`[executor.policy]`, `allow_unisolated`).
    pub policy: ClassPolicy,
}

/// Default time a validator waits for a miner's countersignature: a miner answers in one round
/// trip and an fsync, so 5 s is generous; past it the receipt is stored uncountersigned.
pub const DEFAULT_COUNTERSIGN_TIMEOUT_MS: u64 = 5_000;

/// Accounting receipts (validators and miners): `[receipts]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptsConfig {
    /// Cap on `<data_dir>/receipts.log`; receipts past it are refused (and logged).
    pub max_log_bytes: u64,
    /// How long a validator waits for the miner to countersign a receipt.
    pub countersign_timeout: std::time::Duration,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        Self {
            max_log_bytes: crate::receipts::DEFAULT_MAX_LOG_BYTES,
            countersign_timeout: std::time::Duration::from_millis(DEFAULT_COUNTERSIGN_TIMEOUT_MS),
        }
    }
}

/// Loopback: the default for job endpoints, right for a single machine.
const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Longest executor registration timeout accepted: an executor that has not registered within
/// an hour is hung, and a longer wait would only keep its class's jobs declined.
const MAX_REGISTRATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The role this node plays.
    pub role: Role,
    /// The hotkey file (JSON, mode 0600). Relative paths are relative to the config file.
    pub key_file: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Cap on concurrent QUIC connections.
    pub max_connections: usize,
    /// Cap on concurrent incoming QUIC connections from one hotkey.
    pub max_connections_per_peer: usize,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// `[facilitator]` settings.
    pub facilitator: FacilitatorConfig,
    /// `[validator]` settings.
    pub validator: ValidatorConfig,
    /// `[miner]` settings (`None` unless the section is present).
    pub miner: Option<MinerConfig>,
    /// `[executor]` settings (`None` unless the section is present).
    pub executor: Option<ExecutorConfig>,
    /// `[storage]` settings: blob size limit and who may put (defaults: 64 GiB, anyone).
    pub storage: crate::storage::StoreLimits,
    /// `[discovery]` settings (on by default, listening on loopback with an OS-chosen port).
    pub discovery: DiscoveryConfig,
    /// `[receipts]` settings: receipt log size and countersignature deadline.
    pub receipts: ReceiptsConfig,
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

impl NodeConfig {
    /// Reads and validates a config file, then applies command-line overrides.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &shown, base, overrides)
    }

    /// Validates config text; relative paths are taken relative to `base`.
    pub fn parse(
        text: &str,
        shown: &str,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: shown.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: shown.to_owned(),
            message,
        };
        let role = match (&overrides.role, &file.role) {
            (Some(role), _) => *role,
            (None, Some(text)) => text.parse().map_err(invalid)?,
            (None, None) => {
                return Err(invalid(
                    "no role: set `role = \"…\"` or pass --role".to_owned(),
                ));
            }
        };
        let listen = match (&overrides.listen, &file.listen) {
            (Some(addr), _) => *addr,
            (None, text) => text
                .as_deref()
                .unwrap_or(DEFAULT_LISTEN)
                .parse()
                .map_err(|e| invalid(format!("listen: {e}")))?,
        };
        let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(invalid("max_connections must be at least 1".to_owned()));
        }
        // Above `max_connections` it has no effect, which is allowed: lowering `max_connections`
        // alone must not make a file invalid.
        let max_connections_per_peer = file
            .max_connections_per_peer
            .unwrap_or(horde_transport::DEFAULT_MAX_CONNECTIONS_PER_PEER);
        if max_connections_per_peer == 0 {
            return Err(invalid(
                "max_connections_per_peer must be at least 1".to_owned(),
            ));
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let key_file = overrides
            .key_file
            .clone()
            .or(file.key_file.map(resolve))
            .unwrap_or_else(|| base.join("hotkey.json"));
        let data_dir = overrides
            .data_dir
            .clone()
            .or(file.data_dir.map(resolve))
            .unwrap_or_else(|| base.join(format!("{role}-data")));
        let nodes =
            |field: &str, list: Option<Vec<String>>| -> Result<Vec<NodeAddr>, ConfigError> {
                list.unwrap_or_default()
                    .iter()
                    .map(|t| {
                        t.parse()
                            .map_err(|e| invalid(format!("{field}: {t:?}: {e}")))
                    })
                    .collect()
            };
        let keys =
            |field: &str, list: Option<Vec<String>>| -> Result<Option<Vec<Hotkey>>, ConfigError> {
                list.map(|list| {
                    list.iter()
                        .map(|t| {
                            t.parse()
                                .map_err(|e| invalid(format!("{field}: {t:?}: {e}")))
                        })
                        .collect()
                })
                .transpose()
            };
        let facilitator_file = file.facilitator.unwrap_or_default();
        let facilitator = FacilitatorConfig {
            validators: nodes("facilitator.validators", facilitator_file.validators)?,
            miners: nodes("facilitator.miners", facilitator_file.miners)?,
            allowed_clients: keys(
                "facilitator.allowed_clients",
                facilitator_file.allowed_clients,
            )?,
            validator_silence_ms: facilitator_file
                .validator_silence_ms
                .unwrap_or(DEFAULT_VALIDATOR_SILENCE_MS),
            trusted_miners: keys(
                "facilitator.trusted_miners",
                facilitator_file.trusted_miners,
            )?
            .unwrap_or_default(),
            exclusion: std::time::Duration::from_secs(
                facilitator_file
                    .exclusion_secs
                    .unwrap_or(DEFAULT_EXCLUSION_SECS),
            ),
        };
        let validator_file = file.validator.unwrap_or_default();
        let validator = ValidatorConfig {
            miners: nodes("validator.miners", validator_file.miners)?,
            trusted_miners: keys("validator.trusted_miners", validator_file.trusted_miners)?
                .unwrap_or_default(),
            allowed_facilitators: keys(
                "validator.allowed_facilitators",
                validator_file.allowed_facilitators,
            )?,
            exclusion: std::time::Duration::from_secs(
                validator_file
                    .exclusion_secs
                    .unwrap_or(DEFAULT_EXCLUSION_SECS),
            ),
            exclusions_file: Some(data_dir.join("exclusions.json")),
            seen_jobs_file: Some(data_dir.join("seen_jobs.bin")),
        };
        let miner = match file.miner {
            None => None,
            Some(miner_file) => {
                let mut classes = Vec::new();
                for class in miner_file.classes.unwrap_or_default() {
                    if class.class.is_empty() || class.class.len() > 64 {
                        return Err(invalid(format!(
                            "miner.classes: class name {:?} must be 1 to 64 characters",
                            class.class
                        )));
                    }
                    let max_executors = class.max_executors.unwrap_or(1);
                    let prewarm = class.prewarm.unwrap_or(0);
                    if max_executors == 0 || prewarm > max_executors {
                        return Err(invalid(format!(
                            "miner.classes: {}: need 1 <= max_executors and prewarm <= max_executors",
                            class.class
                        )));
                    }
                    let policy = PolicyFile::from_class(&class)
                        .validate(
                            &format!("miner.classes: {}", class.class),
                            class.allow_unisolated.unwrap_or(false),
                        )
                        .map_err(invalid)?;
                    classes.push(ClassConfig {
                        class: ExecutorClass(class.class),
                        max_executors,
                        prewarm,
                        policy,
                    });
                }
                let registration_timeout = miner_file.registration_timeout_ms.map_or(
                    crate::miner::DEFAULT_REGISTRATION_TIMEOUT,
                    std::time::Duration::from_millis,
                );
                if registration_timeout.is_zero() || registration_timeout > MAX_REGISTRATION_TIMEOUT
                {
                    return Err(invalid(format!(
                        "miner.registration_timeout_ms must be 1 to {}",
                        MAX_REGISTRATION_TIMEOUT.as_millis()
                    )));
                }
                Some(MinerConfig {
                    classes,
                    allowed_validators: keys(
                        "miner.allowed_validators",
                        miner_file.allowed_validators,
                    )?,
                    executor_program: miner_file.executor_program.map(resolve),
                    job_host: miner_file.job_host.unwrap_or(LOCALHOST),
                    registration_timeout,
                })
            }
        };
        let executor = match file.executor {
            None => None,
            Some(executor_file) => {
                let miner = executor_file
                    .miner
                    .ok_or_else(|| invalid("executor.miner is required".to_owned()))?;
                let miner = miner
                    .parse()
                    .map_err(|e| invalid(format!("executor.miner: {e}")))?;
                let class = executor_file
                    .class
                    .ok_or_else(|| invalid("executor.class is required".to_owned()))?;
                let policy = executor_file
                    .policy
                    .unwrap_or_default()
                    .validate(
                        "executor.policy",
                        executor_file.allow_unisolated.unwrap_or(false),
                    )
                    .map_err(invalid)?;
                Some(ExecutorConfig {
                    miner,
                    class: ExecutorClass(class),
                    job_host: executor_file.job_host.unwrap_or(LOCALHOST),
                    policy,
                })
            }
        };
        let storage_file = file.storage.unwrap_or_default();
        let max_blob_size = storage_file
            .max_blob_size
            .unwrap_or(crate::storage::DEFAULT_MAX_BLOB_SIZE);
        let protocol_max = horde_protocol::blob::MAX_PROTOCOL_BLOB_SIZE;
        if max_blob_size == 0 || max_blob_size > protocol_max {
            return Err(invalid(format!(
                "storage.max_blob_size must be between 1 and {protocol_max} bytes"
            )));
        }
        let defaults = crate::storage::StoreLimits::default();
        let progress_timeout = storage_file
            .progress_timeout_ms
            .map_or(defaults.progress_timeout, std::time::Duration::from_millis);
        if progress_timeout.is_zero() {
            return Err(invalid(
                "storage.progress_timeout_ms must be above 0".to_owned(),
            ));
        }
        let max_transfers = storage_file.max_transfers.unwrap_or(defaults.max_transfers);
        if max_transfers == 0 {
            return Err(invalid("storage.max_transfers must be above 0".to_owned()));
        }
        // Unset, the default share shrinks to a smaller `max_transfers` rather than make a file
        // that lowers only `max_transfers` invalid.
        let max_transfers_per_peer = storage_file
            .max_transfers_per_peer
            .unwrap_or(defaults.max_transfers_per_peer.min(max_transfers));
        if max_transfers_per_peer == 0 || max_transfers_per_peer > max_transfers {
            return Err(invalid(format!(
                "storage.max_transfers_per_peer must be between 1 and max_transfers ({max_transfers})"
            )));
        }
        let storage = crate::storage::StoreLimits {
            max_blob_size,
            put_allowlist: keys("storage.put_allowlist", storage_file.put_allowlist)?,
            progress_timeout,
            max_transfers,
            max_transfers_per_peer,
        };
        let receipts_file = file.receipts.unwrap_or_default();
        let receipts = ReceiptsConfig {
            max_log_bytes: receipts_file
                .max_log_bytes
                .unwrap_or(crate::receipts::DEFAULT_MAX_LOG_BYTES),
            countersign_timeout: std::time::Duration::from_millis(
                receipts_file
                    .countersign_timeout_ms
                    .unwrap_or(DEFAULT_COUNTERSIGN_TIMEOUT_MS),
            ),
        };
        let smallest_log = crate::receipts::MIN_LOG_BYTES;
        if receipts.max_log_bytes < smallest_log {
            return Err(invalid(format!(
                "receipts.max_log_bytes must be at least {smallest_log}"
            )));
        }
        if receipts.countersign_timeout.is_zero() {
            return Err(invalid(
                "receipts.countersign_timeout_ms must be at least 1".to_owned(),
            ));
        }
        if role == Role::Executor && executor.is_none() {
            return Err(invalid(
                "role executor needs an [executor] section".to_owned(),
            ));
        }
        let discovery_file = file.discovery.unwrap_or_default();
        let mut bootstrap = Vec::new();
        for text in discovery_file.bootstrap.unwrap_or_default() {
            bootstrap.push(
                text.parse::<BootstrapPeer>()
                    .map_err(|e| invalid(format!("discovery.bootstrap: {e}")))?,
            );
        }
        bootstrap.extend(overrides.bootstrap.iter().cloned());
        let record_ttl = match discovery_file.record_ttl_secs {
            None => DiscoveryConfig::default().record_ttl,
            Some(secs) => {
                let ttl = std::time::Duration::from_secs(secs);
                let max =
                    std::time::Duration::from_millis(crate::discovery::MAX_RECORD_LIFETIME_MS);
                if ttl < MIN_RECORD_TTL || ttl > max {
                    return Err(invalid(format!(
                        "discovery.record_ttl_secs must be {} to {}",
                        MIN_RECORD_TTL.as_secs(),
                        max.as_secs()
                    )));
                }
                ttl
            }
        };
        let discovery = DiscoveryConfig {
            // Executors are children of their miner and never join.
            enabled: discovery_file.enabled.unwrap_or(true) && role != Role::Executor,
            listen: match (&overrides.p2p_listen, &discovery_file.listen) {
                (Some(addr), _) => *addr,
                (None, Some(text)) => text
                    .parse()
                    .map_err(|e| invalid(format!("discovery.listen: {e}")))?,
                (None, None) => DiscoveryConfig::default().listen,
            },
            bootstrap,
            record_ttl,
        };
        Ok(Self {
            role,
            key_file,
            listen,
            max_connections,
            max_connections_per_peer,
            data_dir,
            facilitator,
            validator,
            miner,
            executor,
            storage,
            discovery,
            receipts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(
            text,
            "test.toml",
            Path::new("/etc/horde"),
            &Overrides::default(),
        )
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
        let text = include_str!("../horde.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.role, Role::Validator);
    }

    #[test]
    fn storage_section_is_validated() {
        let config = parse("role = \"storage\"").unwrap();
        assert_eq!(config.storage, crate::storage::StoreLimits::default());
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
        assert_eq!(config.storage.max_transfers_per_peer, 2);
        let config = parse("role = \"storage\"\n[storage]\nmax_transfers = 4").unwrap();
        assert_eq!(
            config.storage.max_transfers_per_peer, 4,
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
            crate::miner::DEFAULT_REGISTRATION_TIMEOUT
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
    fn class_policies_are_parsed_validated_and_passed_to_executors() {
        let config = parse(
            "role = \"miner\"\n[[miner.classes]]\nclass = \"cpu\"\nmemory_mb = 64\ncpus = 1.5\n\
             pids = 32\ntmp_mb = 8\nuid = 4242\nallow_unisolated = true\n",
        )
        .unwrap();
        let policy = &config.miner.unwrap().classes[0].policy;
        assert_eq!(
            *policy,
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
        let executor = parse(&format!(
            "role = \"executor\"\n[executor]\nminer = \"{}@127.0.0.1:1\"\nclass = \"cpu\"\n{}",
            horde_protocol::SecretKey::from_seed(&[1; 32]).hotkey(),
            executor_policy_toml(policy)
        ))
        .unwrap();
        assert_eq!(executor.executor.unwrap().policy, *policy);
        for (class, needle) in [
            (
                "network = \"internet\"",
                "not available with runtime = \"process\"",
            ),
            ("gpus = 2", "gpus need runtime = \"container\""),
            ("gpus = \"some\"", "gpus"),
            ("memory_mb = 0", "memory_mb"),
            ("cpus = -1.0", "cpus"),
            ("runtime = \"vm\"", "runtime"),
        ] {
            let text = format!("role = \"miner\"\n[[miner.classes]]\nclass = \"cpu\"\n{class}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{class:?}: {err}");
        }
        let container = parse(
            "role = \"miner\"\n[[miner.classes]]\nclass = \"gpu\"\nruntime = \"container\"\n\
             network = \"internet\"\ngpus = \"all\"\n",
        )
        .unwrap();
        let policy = &container.miner.unwrap().classes[0].policy;
        assert_eq!(policy.gpus, Some(Gpus::All));
        assert_eq!(policy.network, NetworkPolicy::Internet);
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
