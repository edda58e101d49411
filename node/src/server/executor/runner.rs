//! Runners: how an executor starts a job and keeps it isolated from its host.
//!
//! This worktree holds only the interface (the process runner's branch owns the real file); the
//! container runner lives in `runner/container.rs` and `runner/container/`.

pub mod container;

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use horde_protocol::{JobId, Program};

/// Everything a runner needs to start one job.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The job.
    pub job_id: JobId,
    /// What to run.
    pub program: Program,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (the runner adds the `HORDE_*` variables).
    pub env: Vec<(String, String)>,
    /// The job's host directory: `volume/` (mounted read-only at `/horde/volume`), `output/`
    /// (read-write at `/horde/output`), `logs/output/{stdout,stderr}` (host files the runner
    /// writes the job's stdout and stderr into).
    pub job_dir: PathBuf,
    /// The port the job listens on inside its own network namespace (`HORDE_JOB_PORT`).
    pub port: u16,
    /// The executor class's policy.
    pub policy: ClassPolicy,
}

/// What an executor class allows its jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassPolicy {
    /// Which runner.
    pub runtime: Runtime,
    /// Egress.
    pub network: NetworkPolicy,
    /// Memory limit.
    pub memory_bytes: Option<u64>,
    /// CPU limit, in CPUs.
    pub cpus: Option<f64>,
    /// Process (task) limit.
    pub pids: Option<u64>,
    /// Size of the private `/tmp`.
    pub tmp_bytes: Option<u64>,
    /// GPUs the job gets.
    pub gpus: Option<Gpus>,
    /// The uid the job runs as.
    pub uid: Option<u32>,
    /// Whether jobs may run on a host that cannot isolate them.
    pub allow_unisolated: bool,
}

/// Which runner an executor class uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// An isolated process.
    Process,
    /// A container through the Docker Engine API.
    Container,
}

/// A class's egress policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkPolicy {
    /// No network at all (only the job's own loopback).
    None,
    /// The internet, never the host's own addresses or loopback services.
    Internet,
}

/// GPUs a class gives its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpus {
    /// Every GPU of the host.
    All,
    /// This many.
    Count(u32),
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobExit {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Whether it was killed for exceeding its memory limit.
    pub out_of_memory: bool,
}

/// A runner could not start a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// No container engine answers.
    #[error("container engine unavailable at {engine}: {reason}")]
    EngineUnavailable {
        /// The engine's address.
        engine: String,
        /// Why.
        reason: String,
    },
    /// The engine refused or failed a request.
    #[error("container engine: {0}")]
    Engine(String),
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
    Io(#[from] io::Error),
}

/// Starts jobs.
#[async_trait]
pub trait Runner: Send + Sync + Debug {
    /// Starts `launch`'s job.
    async fn start(&self, launch: Launch) -> Result<Box<dyn JobProcess>, RunnerError>;
}

/// A running job.
#[async_trait]
pub trait JobProcess: Send + Debug {
    /// How the executor reaches the job's port.
    fn dialer(&self) -> Arc<dyn JobDialer>;
    /// The next connection the job opened to `HORDE_EXECUTOR_URL` (cancel-safe).
    async fn accept_outputs(&mut self) -> io::Result<tokio::net::TcpStream>;
    /// Waits for the job to end (cancel-safe).
    async fn wait(&mut self) -> io::Result<JobExit>;
    /// SIGTERM, `grace`, SIGKILL; afterwards nothing of the job runs.
    async fn stop(&mut self, grace: Duration) -> Option<JobExit>;
    /// Removes everything made for the job (container, network, …).
    async fn remove(self: Box<Self>);
}

/// Opens connections to a job's port.
#[async_trait]
pub trait JobDialer: Send + Sync + Debug {
    /// A new connection to the job's port.
    async fn connect(&self) -> io::Result<tokio::net::TcpStream>;
}
