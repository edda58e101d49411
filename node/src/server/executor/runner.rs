//! Runners: how an executor starts a job and keeps it away from its host.
//!
//! A job is a stranger's program. Whatever runs it, the job sees only what its [`Launch`]
//! gives it: its volume read-only at [`VOLUME_DIR`], its output directory read-write at
//! [`OUTPUT_DIR`] (also its working directory), a private `/tmp`, its own port
//! ([`JOB_PORT_ENV`]) inside a network namespace of its own, and one way back to its executor,
//! [`EXECUTOR_URL_ENV`]. The executor reaches the job's port only through the
//! [`JobProcess::dialer`], and receives the job's connections to its executor URL from
//! [`JobProcess::accept_outputs`]: nothing of a job listens on the host.
//!
//! Layout:
//! - this file: the runner-independent pieces ([`Launch`], [`ClassPolicy`], the [`Runner`],
//!   [`JobProcess`] and [`JobDialer`] traits, [`JobExit`], [`RunnerError`], the in-job paths),
//!   and [`select`], which picks the runner an executor class asks for.
//! - `process.rs` (+ `process/`): the process runner (bubblewrap; the embedded default), its
//!   sandboxes made ahead of their jobs.
//! - `bridge.rs`: the in-sandbox init (`horde sandbox-init`) and the executor's end of its
//!   socket: connections to and from the job, passed as file descriptors.
//! - `container.rs` (+ `container/`): the container runner over the Docker Engine API (bollard).
//! - `egress.rs`: `network = "internet"` for both runners (a veth pair per job, NAT, host
//!   firewall rules).
//! - `unisolated.rs`: a plain child process, for hosts that cannot isolate and whose config
//!   says `allow_unisolated = true`.

pub mod bridge;
pub mod container;
pub mod egress;
pub mod process;
pub mod unisolated;

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use horde_protocol::{JobId, Program};
use serde::{Deserialize, Serialize};

pub use horde_transport::tunnel::JobConnector as JobDialer;

/// Where the job finds its volume (read-only), in every runner.
pub const VOLUME_DIR: &str = "/horde/volume";
/// Where the job writes its outputs (read-write; also its working directory), in every runner.
pub const OUTPUT_DIR: &str = "/horde/output";
/// The port the job listens on, on `127.0.0.1` inside its own network namespace.
pub const JOB_PORT_ENV: &str = "HORDE_JOB_PORT";
/// [`VOLUME_DIR`], as the job's environment says it.
pub const VOLUME_DIR_ENV: &str = "HORDE_VOLUME_DIR";
/// [`OUTPUT_DIR`], as the job's environment says it.
pub const OUTPUT_DIR_ENV: &str = "HORDE_OUTPUT_DIR";
/// `http://127.0.0.1:PORT`: the job's own executor (`POST /outputs`), reachable from inside the
/// job's network namespace only.
pub const EXECUTOR_URL_ENV: &str = "HORDE_EXECUTOR_URL";

/// Which runner an executor class uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A process in Linux namespaces (bubblewrap): the embedded default.
    #[default]
    Process,
    /// A container through the Docker Engine API.
    Container,
    /// A plain child process with the node's user and files, even where the process runner
    /// could isolate it: only with `allow_unisolated = true`. For measuring what isolation
    /// costs (flow-latency) against the runner jobs had before it.
    Unisolated,
}

/// What a job may reach on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkPolicy {
    /// Only the job's own loopback: no address at all beyond it.
    #[default]
    None,
    /// Real connectivity, but never the host's own addresses or loopback services.
    Internet,
}

/// GPUs a class asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpus {
    /// Every GPU of the host.
    All,
    /// This many.
    Count(u32),
}

impl Serialize for Gpus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => serializer.serialize_str("all"),
            Self::Count(count) => serializer.serialize_u32(*count),
        }
    }
}

impl<'de> Deserialize<'de> for Gpus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Count(u32),
            Word(String),
        }
        match Text::deserialize(deserializer)? {
            Text::Count(count) => Ok(Self::Count(count)),
            Text::Word(word) if word == "all" => Ok(Self::All),
            Text::Word(word) => Err(serde::de::Error::custom(format!(
                "gpus = {word:?}: expected \"all\" or a number"
            ))),
        }
    }
}

/// What an executor class allows its jobs: the runner, the network, the limits. The miner
/// builds it from its `[[miner.classes]]` entry and writes it into each executor's config
/// (`[executor.policy]`, in bytes).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassPolicy {
    /// The runner.
    pub runtime: Runtime,
    /// The egress policy.
    pub network: NetworkPolicy,
    /// Memory limit (RAM, page cache and `/tmp` included where the runner can count them).
    pub memory_bytes: Option<u64>,
    /// CPU time, in CPUs (1.5 = one and a half CPUs' worth of time per second).
    pub cpus: Option<f64>,
    /// Most processes and threads at once.
    pub pids: Option<u64>,
    /// Size of the job's private `/tmp`.
    pub tmp_bytes: Option<u64>,
    /// Most bytes the job's declared outputs send, all its uploads together (stdout and stderr
    /// have as much again); default [`DEFAULT_OUTPUT_BYTES`].
    pub output_bytes: Option<u64>,
    /// Most bytes of disk the job's output directory and logs take together while it runs (and
    /// the most any one file it writes may hold); default twice [`Self::output_limit`].
    pub disk_bytes: Option<u64>,
    /// GPUs (container runner only).
    pub gpus: Option<Gpus>,
    /// The host uid (and gid) the job runs as when the node runs as root; default
    /// [`DEFAULT_JOB_UID`].
    pub uid: Option<u32>,
    /// Run jobs even where this host cannot isolate them (no bubblewrap, no user namespaces).
    pub allow_unisolated: bool,
}

/// What a job's outputs may send when the class says nothing (`output_mb`).
pub const DEFAULT_OUTPUT_BYTES: u64 = 4 << 30;

/// The size of the private `/tmp` when the class names none (`tmp_mb`), for every runner: room
/// for scratch files, small enough that many jobs' tmpfs pages cannot crowd out the host's
/// memory (a tmpfs without a size may take half of it).
pub const DEFAULT_TMP_BYTES: u64 = 64 << 20;

/// Most processes and threads of a job when the class names none (`pids`), where the runner
/// can count them: a fork bomb stops there instead of at the host's own limit.
pub const DEFAULT_PIDS: u64 = 4096;

impl ClassPolicy {
    /// The size of the job's private `/tmp`.
    pub fn tmp_limit(&self) -> u64 {
        self.tmp_bytes.unwrap_or(DEFAULT_TMP_BYTES)
    }

    /// Most processes and threads of the job at once.
    pub fn pids_limit(&self) -> u64 {
        self.pids.unwrap_or(DEFAULT_PIDS)
    }

    /// What the job's outputs may send, all its uploads together.
    pub fn output_limit(&self) -> u64 {
        self.output_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES)
    }

    /// What the job may keep on the node's disk while it runs (its output directory and logs
    /// together; also the most one file may hold): the class's `disk_mb`, else room for
    /// outputs and logs each as large as [`Self::output_limit`].
    pub fn disk_limit(&self) -> u64 {
        self.disk_bytes
            .unwrap_or_else(|| self.output_limit().saturating_mul(2))
    }

    /// Checks the policy; the error says what is wrong (the caller names the field).
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("memory", self.memory_bytes),
            ("pids", self.pids),
            ("tmp", self.tmp_bytes),
            ("output", self.output_bytes),
            ("disk", self.disk_bytes),
        ] {
            if value == Some(0) {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if let Some(cpus) = self.cpus
            && !(cpus.is_finite() && (0.01..=4096.0).contains(&cpus))
        {
            return Err(format!("cpus = {cpus} must be between 0.01 and 4096"));
        }
        if self.uid == Some(0) {
            return Err("uid 0 is root: jobs never run as root".to_owned());
        }
        if self.runtime != Runtime::Container && self.gpus.is_some() {
            return Err("gpus need runtime = \"container\"".to_owned());
        }
        if self.runtime == Runtime::Unisolated && !self.allow_unisolated {
            return Err(
                "runtime = \"unisolated\" runs jobs with this node's user and files: it needs \
                 allow_unisolated = true"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// The uid (and gid) jobs run as when the node is root and the class names none: `nobody`,
/// which owns no file a job could use.
pub const DEFAULT_JOB_UID: u32 = 65534;

/// Everything a runner needs to start one job.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job.
    pub job_id: JobId,
    /// What to run.
    pub program: Program,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment, from the spec (the `HORDE_*` variables are added by the runner).
    pub env: Vec<(String, String)>,
    /// The host directory of the job: `volume/` (mounted read-only at [`VOLUME_DIR`]),
    /// `output/` (read-write at [`OUTPUT_DIR`]), `logs/output/{stdout,stderr}` (host files the
    /// runner writes the job's stdout and stderr to).
    pub job_dir: PathBuf,
    /// The port the job listens on, on 127.0.0.1 inside its own network namespace
    /// ([`JOB_PORT_ENV`]).
    pub port: u16,
    /// The class's policy.
    pub policy: ClassPolicy,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobExit {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Whether it was killed for going over its memory limit.
    pub out_of_memory: bool,
}

impl JobExit {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.out_of_memory
    }

    /// From a process's exit status.
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt as _;
        Self {
            code: status.code(),
            signal: status.signal(),
            out_of_memory: false,
        }
    }
}

/// What [`JobProcess::next_event`] saw.
#[derive(Debug)]
pub enum JobEvent {
    /// The job ended (or waiting for it failed).
    Exited(std::io::Result<JobExit>),
    /// The job opened a connection to its executor URL.
    Outputs(tokio::net::TcpStream),
}

/// The port jobs listen on inside their own network namespace (each job has its own, so one
/// number serves them all).
pub const DEFAULT_JOB_PORT: u16 = 8080;

/// A job that could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// This host cannot run the class's jobs as its policy requires (no bubblewrap, no user
    /// namespaces, no engine, …).
    #[error("this executor cannot isolate jobs: {0}")]
    Unavailable(String),
    /// The job asks for something this runner or class does not allow.
    #[error("{0}")]
    Refused(String),
    /// The program could not be started.
    #[error("starting {program}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        reason: String,
    },
    /// Setting up what the job runs in failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The container engine refused or failed.
    #[error("container engine: {0}")]
    Engine(String),
    /// No container engine answers.
    #[error("container engine unavailable at {engine}: {reason}")]
    EngineUnavailable {
        /// The engine's address.
        engine: String,
        /// Why.
        reason: String,
    },
    /// The image is not present and could not be pulled.
    #[error("image {reference} is not present and could not be pulled: {reason}")]
    ImageMissing {
        /// The reference asked for.
        reference: String,
        /// Why the pull failed.
        reason: String,
    },
    /// The image found under a digest-pinned reference is another image.
    #[error("image {reference}: expected {expected}, found {actual}")]
    DigestMismatch {
        /// The reference asked for.
        reference: String,
        /// The pinned digest.
        expected: String,
        /// The image id (and repo digests) found.
        actual: String,
    },
    /// An `image_blob` archive that the engine cannot load as an image.
    #[error("image archive is not an image: {0}")]
    NotAnImage(String),
    /// An `image_blob` archive whose manifest tags a name the engine already has for another
    /// image: loading it would move that name (and every later job naming it) to this one.
    #[error("image archive would retag {name} (now {existing}) to {archive}: refused")]
    Retag {
        /// The name (`repo:tag`) the archive carries.
        name: String,
        /// The image id the engine has under it.
        existing: String,
        /// The image id the archive holds.
        archive: String,
    },
    /// An `image_blob` archive whose bytes do not match its hash.
    #[error("image archive failed verification: {0}")]
    Integrity(String),
    /// An `image_blob` archive could not be fetched.
    #[error("fetching the image archive: {0}")]
    Fetch(String),
    /// An image reference that cannot be one (e.g. a malformed `@sha256:` digest).
    #[error("invalid image reference {reference}: {reason}")]
    InvalidReference {
        /// The reference.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The class's policy cannot be applied (uid 0, a limit out of range, …).
    #[error("class policy: {0}")]
    Policy(String),
    /// The program is not one this runner runs.
    #[error("this runner cannot run {0}")]
    Unsupported(String),
    /// The job exited before it could be reached.
    #[error("the job exited at once ({0:?})")]
    ExitedAtOnce(JobExit),
    /// Preparing the job (directories, files, the guard process) failed.
    #[error("preparing the job: {0}")]
    Prepare(#[from] std::io::Error),
    /// `network = "internet"` cannot be had on this host, or not for this job.
    #[error("job network: {0}")]
    Egress(#[from] egress::EgressError),
}

impl RunnerError {
    /// An [`RunnerError::Io`] saying what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Starts jobs.
#[async_trait]
pub trait Runner: Send + Sync + Debug {
    /// Starts `launch`'s job; returns once the job's program has been started.
    async fn start(&self, launch: Launch) -> Result<Box<dyn JobProcess>, RunnerError>;

    /// Prepares, off the next job's start path, what a job whose directory is in `jobs_dir`
    /// will need (the process runner: its sandbox, `process/slot.rs`). The executor calls it
    /// when it starts and after each job; a runner with nothing to prepare does nothing.
    fn prepare_next(&self, _jobs_dir: &std::path::Path) {}
}

/// A started job.
#[async_trait]
pub trait JobProcess: Send + Debug {
    /// How the executor reaches the job's port (the tunnel and the readiness probe).
    fn dialer(&self) -> Arc<dyn JobDialer>;
    /// The host pid of a process in the job's own pid namespace (its first one), where the job
    /// has a namespace of its own: the executor counts the files its processes hold open
    /// through it ([`crate::server::executor::disk`]).
    fn pid(&self) -> Option<u32> {
        None
    }
    /// The next connection the job opened to [`EXECUTOR_URL_ENV`]. Cancel-safe.
    async fn accept_outputs(&mut self) -> std::io::Result<tokio::net::TcpStream>;
    /// Waits for the job to end. Cancel-safe.
    async fn wait(&mut self) -> std::io::Result<JobExit>;
    /// Whichever comes first: the job's end ([`Self::wait`]) or its next outputs connection
    /// ([`Self::accept_outputs`]). Cancel-safe. The executor's running loop needs both at once,
    /// and two `&mut self` futures cannot be raced from outside: each runner races its own
    /// (disjoint) fields.
    async fn next_event(&mut self) -> JobEvent;
    /// SIGTERM, `grace`, SIGKILL; afterwards nothing of the job runs. `None` when its exit
    /// status could not be had.
    async fn stop(&mut self, grace: Duration) -> Option<JobExit>;
    /// Removes everything made for the job (stopping it first if it still runs).
    async fn remove(self: Box<Self>);
}

/// The runner for `policy`, as this host can provide it: an error (logged by the executor at
/// start, and given as the reason for every job it then refuses) when it cannot.
/// A process runner keeps its sandboxes' init binary under its own name in `data_dir`.
pub async fn select(
    policy: &ClassPolicy,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn Runner>, RunnerError> {
    match policy.runtime {
        Runtime::Process => match process::ProcessRunner::detect(policy).await {
            Ok(runner) => Ok(Arc::new(runner.pin_init(data_dir))),
            // A host that isolates but cannot give egress refuses the class's jobs: running
            // them unisolated would give them the host itself.
            Err(error) if policy.allow_unisolated && !matches!(error, RunnerError::Egress(_)) => {
                tracing::warn!(
                    %error,
                    "jobs run UNISOLATED (allow_unisolated = true): a job can read this \
                     node's files and reach its processes"
                );
                Ok(Arc::new(unisolated::UnisolatedRunner))
            }
            Err(error) => Err(error),
        },
        Runtime::Unisolated if policy.allow_unisolated => {
            tracing::warn!(
                "jobs run UNISOLATED (runtime = \"unisolated\"): a job can read this node's \
                 files and reach its processes"
            );
            Ok(Arc::new(unisolated::UnisolatedRunner))
        }
        Runtime::Unisolated => Err(RunnerError::Policy(
            "runtime = \"unisolated\" needs allow_unisolated = true".into(),
        )),
        Runtime::Container => {
            // Egress first, as for the process runner.
            let egress = match policy.network {
                NetworkPolicy::Internet => Some(egress::Egress::prepare().await?),
                NetworkPolicy::None => None,
            };
            let mut runner =
                container::ContainerRunner::start(container::ContainerConfig::default()).await?;
            if let Some(egress) = egress {
                runner = runner.with_egress(egress);
            }
            Ok(Arc::new(runner))
        }
    }
}

/// Where cgroup hierarchies are mounted.
pub(crate) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup directory that `/proc/PID/cgroup`'s `text` names in v1 hierarchy `controller`,
/// or in the unified (v2) hierarchy for `controller` `""` (its `0::/path` line). `None` for a
/// path outside the reader's cgroup namespace (one with `..`).
pub(crate) fn cgroup_in(text: &str, controller: &str) -> Option<PathBuf> {
    let path = text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (id, names, path) = (fields.next()?, fields.next()?, fields.next()?);
        let named = if controller.is_empty() {
            id == "0" && names.is_empty()
        } else {
            names.split(',').any(|n| n == controller)
        };
        named.then(|| path.to_owned())
    })?;
    if path.split('/').any(|part| part == "..") {
        return None;
    }
    Some(
        Path::new(CGROUP_ROOT)
            .join(controller)
            .join(path.trim_start_matches('/')),
    )
}
