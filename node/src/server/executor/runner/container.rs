//! The container runner: jobs as containers through the Docker Engine API (`bollard`; Docker
//! Engine or Podman's compatible service, one client for both).
//!
//! A job's container has every capability dropped, `no-new-privileges`, a read-only root with a
//! private tmpfs `/tmp` (and one like it at each `VOLUME` the image declares, never an engine
//! volume on the host's disk), a non-root uid from the class (whatever user the image names),
//! the class's memory/CPU/pids limits, an `fsize` ulimit of the class's disk limit, the job's
//! volume read-only at `/horde/volume` and its output directory read-write at
//! `/horde/output`, no published port, and network mode `none`: under
//! `network = "none"` no network but its own loopback; under `"internet"` the executor adds a
//! veth pair to the container's namespace once it runs ([`super::egress`]). The executor
//! reaches the job's port, and the job its executor's outputs endpoint, through sockets made
//! inside the container's network namespace ([`netns`]). The job's own command starts only
//! once those are in place ([`gate`]): its first instruction can reach its executor. stdout
//! and stderr are attached before start and written to the job's log files as they come (each
//! up to the disk limit, the rest dropped). The container is removed at every end: exit, stop,
//! and the executor's death ([`guard`]).
//!
//! Layout:
//! - `container/engine.rs`: the engine's address and kind, error mapping.
//! - `container/cgroup.rs`: the job's cgroup parent, which holds its memory limit and whose OOM
//!   counter says whether the job was killed for memory (Podman's API never does).
//! - `container/spec.rs`: the create request (pure; unit-tested setting by setting).
//! - `container/image.rs`: references (present, pulled, digest-checked), archives (fetched from
//!   storage, loaded).
//! - `container/netns.rs`: the per-job thread inside the container's network namespace.
//! - `container/guard.rs`: the container guard process and reaping of stale containers.
//! - `container/state.rs`: container state read leniently (Podman's states are not bollard's).
//! - `container/gate.rs`: the start gate, which holds the job's command until the executor
//!   holds the container's network namespace.

mod cgroup;
pub mod engine;
pub mod gate;
pub mod guard;
pub mod image;
mod netns;
pub mod spec;
mod state;

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, WaitContainerOptions,
};
use futures::StreamExt as _;
use horde_protocol::Program;
use horde_transport::HordeEndpoint;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use engine::{Engine, EngineKind};
pub use guard::{GUARD_CONTAINER_SUBCOMMAND, guard_container};

use self::netns::NetnsHandle;
use super::egress::{Egress, JobLink};
use crate::server::executor::runner::{
    JobDialer, JobEvent, JobExit, JobProcess, Launch, Runner, RunnerError,
};

/// After the container has exited, how long its output may take to drain into the log files
/// before the exit is reported anyway.
const LOG_DRAIN: Duration = Duration::from_secs(2);

/// After SIGKILL, how long the engine may take to report the container gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How often a container's init killed without the engine is checked for being gone.
const REAP_POLL: Duration = Duration::from_millis(10);

/// Removals retried after the engine failed one, [`REMOVE_RETRY_DELAY`] apart.
const REMOVE_RETRIES: u32 = 30;
/// 30 × 2 s: an engine restart has a minute to come back.
const REMOVE_RETRY_DELAY: Duration = Duration::from_secs(2);

/// The job's stdout and stderr, as the executor uploads them.
const LOG_DIR: &str = "logs/output";

/// How a [`ContainerRunner`] is set up.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// The engine socket (`unix:///…`); `None`: `DOCKER_HOST`, else the standard socket.
    pub engine: Option<String>,
    /// The `horde` binary that runs the container guards (`/proc/self/exe` in the node; tests
    /// name the built binary).
    pub guard_program: PathBuf,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        Self {
            engine: None,
            guard_program: PathBuf::from("/proc/self/exe"),
        }
    }
}

/// Runs jobs as containers (see the module docs).
#[derive(Debug, Clone)]
pub struct ContainerRunner {
    engine: Engine,
    config: ContainerConfig,
    /// `PID.STARTTIME` of this executor, the value of the executor label.
    executor: String,
    /// The endpoint `image_blob` archives are fetched with.
    blob_endpoint: Option<Arc<HordeEndpoint>>,
    /// Egress for `network = "internet"` jobs (without it, such jobs are refused).
    egress: Option<Egress>,
}

impl ContainerRunner {
    /// Connects to the engine and removes containers left by executors that are gone.
    pub async fn start(config: ContainerConfig) -> Result<Self, RunnerError> {
        let address = engine::engine_address(config.engine.as_deref())?;
        let engine = Engine::connect(&address).await?;
        let reaped = guard::reap_stale(&engine).await?;
        cgroup::CgroupParent::reap_stale();
        if reaped > 0 {
            tracing::info!(reaped, "removed stale job containers");
        }
        Ok(Self {
            engine,
            config,
            executor: guard::executor_identity(),
            blob_endpoint: None,
            egress: None,
        })
    }

    /// Gives `network = "internet"` jobs egress through `egress`.
    pub fn with_egress(mut self, egress: Egress) -> Self {
        self.egress = Some(egress);
        self
    }

    /// Fetch `image_blob` archives with `endpoint` (without one, such jobs are refused).
    pub fn with_blob_endpoint(mut self, endpoint: Arc<HordeEndpoint>) -> Self {
        self.blob_endpoint = Some(endpoint);
        self
    }

    /// The engine this runner uses.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The image id `program` runs: resolved, pulled, or fetched and loaded.
    async fn image(&self, launch: &Launch) -> Result<String, RunnerError> {
        match &launch.program {
            Program::Image { reference } => image::resolve(&self.engine, reference).await,
            Program::ImageBlob {
                hash,
                size,
                storage,
            } => {
                let endpoint = self.blob_endpoint.as_ref().ok_or_else(|| {
                    RunnerError::Unsupported("image_blob (no storage endpoint)".into())
                })?;
                let dir = launch.job_dir.join("image");
                tokio::fs::create_dir_all(&dir).await?;
                let archive = dir.join("archive.tar");
                image::fetch(endpoint, storage, *hash, *size, &archive).await?;
                let loaded = image::load(&self.engine, &archive).await;
                let _ = tokio::fs::remove_file(&archive).await;
                loaded
            }
            Program::Command { program } => Err(RunnerError::Unsupported(format!(
                "program {program} (a container runner runs images)"
            ))),
            other => Err(RunnerError::Unsupported(format!("{other:?}"))),
        }
    }
}

#[async_trait]
impl Runner for ContainerRunner {
    async fn start(&self, launch: Launch) -> Result<Box<dyn JobProcess>, RunnerError> {
        let egress = super::egress::for_launch(self.egress.as_ref(), &launch)?;
        let image_id = self.image(&launch).await?;
        let run = image::run(&self.engine, &image_id, &launch.args).await?;
        prepare_dirs(&launch)?;
        let gate = gate::Gate::prepare(&launch.job_dir)?;
        let mut body = spec::create_body(&spec::ContainerPlan {
            launch: &launch,
            image_id: &image_id,
            engine: self.engine.kind,
            executor: &self.executor,
            network_mode: "none",
            command: &run.command,
            image_volumes: &run.volumes,
        })?;
        let name = container_name(&launch);
        // The guard first, under the name the container will have: never a container unguarded.
        let guard = guard::spawn_guard(&self.config.guard_program, &name, &self.engine)?;
        // The memory limit on a cgroup parent of the runner's, where the OOM kill is counted
        // (made once nothing before the job's own removal can fail).
        let cgroup = launch
            .policy
            .memory_bytes
            .and_then(|bytes| cgroup::CgroupParent::create(&name, bytes));
        if let (Some(cgroup), Some(host)) = (&cgroup, body.host_config.as_mut()) {
            host.cgroup_parent = Some(cgroup.path().to_owned());
            (host.memory, host.memory_swap) = (None, None);
        }
        let mut job = ContainerJob {
            engine: self.engine.clone(),
            name: name.clone(),
            port: launch.port,
            guard: Some(guard),
            gate: Some(gate),
            netns: None,
            link: None,
            outputs: None,
            exit: None,
            monitor: None,
            pidfd: None,
            init: None,
            cgroup,
        };
        match job.launch(body, &launch, egress).await {
            Ok(()) => Ok(Box::new(job)),
            Err(error) => {
                Box::new(job).remove().await;
                Err(error)
            }
        }
    }
}

/// `horde-<job id>-<random>`: unique even when a job id is retried on the same engine.
fn container_name(launch: &Launch) -> String {
    let mut salt = [0u8; 4];
    let _ = getrandom::fill(&mut salt);
    format!("horde-{}-{}", launch.job_id, hex::encode(salt))
}

/// The output directory belongs to the job's uid; the log files exist for the writer.
fn prepare_dirs(launch: &Launch) -> Result<(), RunnerError> {
    let output = launch.job_dir.join("output");
    std::fs::create_dir_all(&output)?;
    std::fs::create_dir_all(launch.job_dir.join("volume"))?;
    std::fs::create_dir_all(launch.job_dir.join(LOG_DIR))?;
    let uid = launch.policy.uid.unwrap_or(spec::DEFAULT_UID);
    let owner = rustix::fs::Uid::from_raw(uid);
    let group = rustix::fs::Gid::from_raw(uid);
    rustix::fs::chown(&output, Some(owner), Some(group)).map_err(io::Error::from)?;
    Ok(())
}

/// One job's container and what was made for it.
#[derive(Debug)]
pub struct ContainerJob {
    engine: Engine,
    name: String,
    port: u16,
    guard: Option<tokio::process::Child>,
    /// The start gate, held open until the job is removed ([`gate`]).
    gate: Option<gate::Gate>,
    netns: Option<NetnsHandle>,
    /// The job's veth pair, under `network = "internet"`.
    link: Option<JobLink>,
    outputs: Option<tokio::net::TcpListener>,
    /// The exit, once the monitor has seen it (`Err`: the engine failed while waiting).
    exit: Option<watch::Receiver<Option<MonitorResult>>>,
    monitor: Option<JoinHandle<()>>,
    /// The container's first process (its init), held from the start: the job can be killed
    /// without the engine when the engine is gone ([`JobProcess::stop`]).
    pidfd: Option<OwnedFd>,
    /// That process's pid.
    init: Option<u32>,
    /// The container's cgroup parent, where this host can make one ([`cgroup`]).
    cgroup: Option<cgroup::CgroupParent>,
}

/// How the monitor saw the container end: its exit, or why the engine could not say.
type MonitorResult = Result<JobExit, Arc<RunnerError>>;

impl ContainerJob {
    /// Creates, attaches, starts, enters the network namespace, gives it egress, and releases
    /// the job's command.
    async fn launch(
        &mut self,
        body: bollard::models::ContainerCreateBody,
        launch: &Launch,
        egress: Option<&Egress>,
    ) -> Result<(), RunnerError> {
        let engine = &self.engine;
        let options = CreateContainerOptions {
            name: Some(self.name.clone()),
            ..CreateContainerOptions::default()
        };
        engine
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|error| engine::engine_error(engine, "creating the container", error))?;
        // Attached before start: no output is missed, and the engine keeps no log of its own.
        let attach = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..AttachContainerOptions::default()
        };
        let attached = engine
            .streams
            .attach_container(&self.name, Some(attach))
            .await
            .map_err(|error| engine::engine_error(engine, "attaching", error))?;
        let logs_dir = launch.job_dir.join(LOG_DIR);
        let logs = tokio::spawn(write_logs(
            attached.output,
            logs_dir,
            launch.policy.disk_limit(),
        ));
        engine
            .docker
            .start_container(&self.name, None)
            .await
            .map_err(|error| engine::engine_error(engine, "starting the container", error))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        self.exit = Some(exit_rx);
        self.monitor = Some(tokio::spawn(monitor(
            engine.clone(),
            self.name.clone(),
            self.cgroup.clone(),
            logs,
            exit_tx,
        )));

        let namespace = self.namespace().await?;
        let network = match egress {
            Some(egress) => Some((egress, namespace.try_clone()?)),
            None => None,
        };
        let thread = format!("netns-{}", launch.job_id.fmt_short());
        let (netns, outputs) =
            NetnsHandle::enter(namespace, thread, spec::outputs_port(launch.port)).await?;
        self.outputs = Some(outputs);
        self.netns = Some(netns);
        if let Some((egress, namespace)) = network {
            self.link = Some(egress.attach(launch.job_id, &namespace).await?);
        }
        if let Some(gate) = self.gate.as_mut() {
            gate.release()
                .map_err(|error| RunnerError::io("releasing the job's start gate", error))?;
        }
        Ok(())
    }

    /// The container's network namespace, opened through its first process, checked to still
    /// be that container's after opening (a pid cannot have been reused in between).
    /// Also holds the process itself (a pidfd), checked the same way.
    async fn namespace(&mut self) -> Result<std::fs::File, RunnerError> {
        let pid = self.running_pid().await?;
        let namespace = std::fs::File::open(format!("/proc/{pid}/ns/net"));
        let pidfd = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .and_then(|pid| {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            });
        let again = self.running_pid().await?;
        match namespace {
            Ok(namespace) if again == pid => {
                self.pidfd = pidfd;
                self.init = u32::try_from(pid).ok();
                Ok(namespace)
            }
            _ => Err(self.exited_at_once().await),
        }
    }

    /// Kills the container's init without the engine (its pid namespace goes with it) and
    /// waits up to `within` for it to be gone. Whether it is gone.
    async fn kill_without_engine(&mut self, within: Duration) -> bool {
        let Some(pidfd) = self.pidfd.take() else {
            return false;
        };
        if let Err(error) =
            rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL)
        {
            // ESRCH: it is gone already.
            return error == rustix::io::Errno::SRCH;
        }
        // Gone once reaped (by the engine's shim): then any signal, a harmless SIGCONT here,
        // fails with ESRCH.
        let started = tokio::time::Instant::now();
        while started.elapsed() < within {
            let signalled =
                rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::CONT);
            if signalled == Err(rustix::io::Errno::SRCH) {
                return true;
            }
            tokio::time::sleep(REAP_POLL).await;
        }
        false
    }

    /// The pid of the container's first process while it runs.
    async fn running_pid(&mut self) -> Result<i64, RunnerError> {
        let state = state::inspect(&self.engine, &self.name).await?;
        match state {
            Some(state) if state.pid > 0 && state.running => Ok(state.pid),
            _ => Err(self.exited_at_once().await),
        }
    }

    async fn exited_at_once(&mut self) -> RunnerError {
        match tokio::time::timeout(KILL_WAIT, monitored(&mut self.exit)).await {
            Ok(Ok(exit)) => RunnerError::ExitedAtOnce(exit),
            Ok(Err(error)) => copy_error(&error),
            Err(_) => RunnerError::Engine("the container is not running".into()),
        }
    }

    async fn kill(&self, signal: &str) {
        let options = KillContainerOptions {
            signal: signal.to_owned(),
        };
        // Not running any more (409) or gone (404): nothing to signal.
        let _ = self
            .engine
            .docker
            .kill_container(&self.name, Some(options))
            .await;
    }
}

/// Writes the attached output into `dir/stdout` and `dir/stderr` as it comes, each up to
/// `limit` bytes (the class's disk limit, as `RLIMIT_FSIZE` bounds a file the job writes
/// itself); past it the output is read and dropped, so the job is never held by its logs.
async fn write_logs(
    mut output: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
    dir: PathBuf,
    limit: u64,
) -> io::Result<()> {
    let mut stdout = CappedLog::create(&dir.join("stdout"), limit).await?;
    let mut stderr = CappedLog::create(&dir.join("stderr"), limit).await?;
    while let Some(chunk) = output.next().await {
        match chunk {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                stdout.write(&message).await?;
            }
            Ok(LogOutput::StdErr { message }) => stderr.write(&message).await?,
            Ok(LogOutput::StdIn { .. }) => {}
            Err(error) => return Err(io::Error::other(error)),
        }
    }
    stdout.file.flush().await?;
    stderr.file.flush().await
}

/// A log file that keeps the first `left` bytes written to it.
struct CappedLog {
    file: tokio::fs::File,
    left: u64,
}

impl CappedLog {
    async fn create(path: &std::path::Path, limit: u64) -> io::Result<Self> {
        Ok(Self {
            file: tokio::fs::File::create(path).await?,
            left: limit,
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let kept = usize::try_from(self.left).map_or(bytes.len(), |left| left.min(bytes.len()));
        if kept > 0 {
            self.file.write_all(&bytes[..kept]).await?;
            self.left -= kept as u64;
        }
        Ok(())
    }
}

/// Waits for the container to stop, lets its output drain, and publishes how it ended.
async fn monitor(
    engine: Engine,
    name: String,
    cgroup: Option<cgroup::CgroupParent>,
    logs: JoinHandle<io::Result<()>>,
    exit: watch::Sender<Option<MonitorResult>>,
) {
    let options = WaitContainerOptions {
        condition: "not-running".to_owned(),
    };
    let mut wait = engine.streams.wait_container(&name, Some(options));
    let waited = match wait.next().await {
        // A non-zero exit comes as this "error": the exit is read from inspect below.
        Some(Ok(_)) | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => Ok(()),
        Some(Err(error)) => Err(engine::engine_error(
            &engine,
            "waiting for the container",
            error,
        )),
        // The connection closed without an answer: the engine went away (a stopped engine
        // closes its connections; an engine that answers never ends a wait this way).
        None => Err(RunnerError::EngineUnavailable {
            engine: engine.address.clone(),
            reason: "waiting for the container: the engine closed the connection".into(),
        }),
    };
    if waited.is_ok() {
        if let Ok(Ok(Err(error))) = tokio::time::timeout(LOG_DRAIN, logs).await {
            tracing::warn!(container = %name, %error, "writing the job's output");
        }
    } else {
        logs.abort();
    }
    let result = match waited {
        Ok(()) => match state::inspect(&engine, &name).await {
            Ok(Some(state)) => {
                let killed = cgroup
                    .as_ref()
                    .is_some_and(cgroup::CgroupParent::out_of_memory);
                Ok(job_exit(state.exit_code, state.oom_killed || killed))
            }
            Ok(None) => Err(RunnerError::Engine(
                "the container was removed before its exit could be read".into(),
            )),
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        tracing::warn!(container = %name, %error, "lost the job's container");
    }
    let _ = exit.send(Some(result.map_err(Arc::new)));
}

/// A container's exit code as a [`JobExit`]: its init reports a job killed by signal N as
/// 128 + N, as shells do.
fn job_exit(code: i64, out_of_memory: bool) -> JobExit {
    let code = i32::try_from(code).unwrap_or(-1);
    match code {
        129..=192 => JobExit {
            code: None,
            signal: Some(code - 128),
            out_of_memory,
        },
        code => JobExit {
            code: Some(code),
            signal: None,
            out_of_memory,
        },
    }
}

/// Connects to the job's port inside its network namespace.
#[derive(Debug)]
struct NetnsDialer {
    netns: NetnsHandle,
    port: u16,
}

#[async_trait]
impl JobDialer for NetnsDialer {
    async fn connect(&self) -> io::Result<tokio::net::TcpStream> {
        self.netns.connect(self.port).await
    }
}

/// A dialer for a job that never got a namespace: every connect fails.
#[derive(Debug)]
struct NoDialer;

#[async_trait]
impl JobDialer for NoDialer {
    async fn connect(&self) -> io::Result<tokio::net::TcpStream> {
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the job's container is not running",
        ))
    }
}

/// A job dropped without [`JobProcess::remove`] (a panic, a forgotten handle): its guard is told
/// now, as if the executor had ended, and removes the container.
impl Drop for ContainerJob {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let pid = guard
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

/// The next connection the job opened to its executor URL (never, without a listener).
async fn accept_outputs(
    outputs: &Option<tokio::net::TcpListener>,
) -> io::Result<tokio::net::TcpStream> {
    match outputs {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// The container's exit, once its monitor has seen it. When the engine could not say how it
/// ended, the error carries the [`RunnerError`] (an `Arc<RunnerError>`, typically
/// [`RunnerError::EngineUnavailable`]).
async fn wait_exit(
    exit: &mut Option<watch::Receiver<Option<MonitorResult>>>,
) -> io::Result<JobExit> {
    monitored(exit).await.map_err(io::Error::other)
}

/// The container's exit as its monitor saw it.
async fn monitored(exit: &mut Option<watch::Receiver<Option<MonitorResult>>>) -> MonitorResult {
    let ended = || Arc::new(RunnerError::Engine("the container monitor ended".into()));
    let Some(exit) = exit.as_mut() else {
        return Err(Arc::new(RunnerError::Engine(
            "the container never started".into(),
        )));
    };
    match exit.wait_for(Option::is_some).await {
        Ok(result) => (*result).clone().unwrap_or_else(|| Err(ended())),
        Err(_) => Err(ended()),
    }
}

/// A copy of a monitor's error (the monitor keeps its own).
fn copy_error(error: &RunnerError) -> RunnerError {
    match error {
        RunnerError::EngineUnavailable { engine, reason } => RunnerError::EngineUnavailable {
            engine: engine.clone(),
            reason: reason.clone(),
        },
        other => RunnerError::Engine(other.to_string()),
    }
}

#[async_trait]
impl JobProcess for ContainerJob {
    fn dialer(&self) -> Arc<dyn JobDialer> {
        match &self.netns {
            Some(netns) => Arc::new(NetnsDialer {
                netns: netns.clone(),
                port: self.port,
            }),
            None => Arc::new(NoDialer),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.init
    }

    async fn accept_outputs(&mut self) -> io::Result<tokio::net::TcpStream> {
        accept_outputs(&self.outputs).await
    }

    async fn wait(&mut self) -> io::Result<JobExit> {
        wait_exit(&mut self.exit).await
    }

    async fn next_event(&mut self) -> JobEvent {
        tokio::select! {
            exit = wait_exit(&mut self.exit) => JobEvent::Exited(exit),
            Ok(stream) = accept_outputs(&self.outputs) => JobEvent::Outputs(stream),
        }
    }

    /// When the engine is gone (its monitor lost the container), the container's init is
    /// killed through the pidfd held since the start: nothing of the job runs afterwards either
    /// way, though its exit status is then unknown (`None`).
    async fn stop(&mut self, grace: Duration) -> Option<JobExit> {
        self.exit.as_ref()?;
        self.kill("SIGTERM").await;
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(Ok(exit)) => return Some(exit),
            Ok(Err(_)) => {
                self.kill_without_engine(KILL_WAIT).await;
                return None;
            }
            Err(_) => {}
        }
        self.kill("SIGKILL").await;
        match tokio::time::timeout(KILL_WAIT, self.wait()).await {
            Ok(Ok(exit)) => Some(exit),
            _ => {
                self.kill_without_engine(KILL_WAIT).await;
                None
            }
        }
    }

    async fn remove(mut self: Box<Self>) {
        self.gate = None;
        self.netns = None;
        self.outputs = None;
        if let Some(link) = self.link.take() {
            link.remove().await;
        }
        if let Some(monitor) = self.monitor.take() {
            monitor.abort();
        }
        let Err(error) = guard::remove_container(&self.engine, &self.name).await else {
            if let Some(mut guard) = self.guard.take() {
                let _ = guard.start_kill();
                let _ = guard.wait().await;
            }
            if let Some(cgroup) = self.cgroup.take() {
                cgroup.remove().await;
            }
            return;
        };
        // The engine failed us: keep trying in the background, the guard alive meanwhile (it
        // removes the container if this executor ends first; a later start reaps it otherwise).
        tracing::warn!(container = %self.name, %error, "removing the job's container");
        let (engine, name, guard) = (self.engine.clone(), self.name.clone(), self.guard.take());
        let cgroup = self.cgroup.take();
        tokio::spawn(async move {
            for _ in 0..REMOVE_RETRIES {
                tokio::time::sleep(REMOVE_RETRY_DELAY).await;
                if guard::remove_container(&engine, &name).await.is_ok() {
                    if let Some(mut guard) = guard {
                        let _ = guard.start_kill();
                        let _ = guard.wait().await;
                    }
                    if let Some(cgroup) = cgroup {
                        cgroup.remove().await;
                    }
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_above_128_are_signals() {
        assert_eq!(
            job_exit(0, false),
            JobExit {
                code: Some(0),
                signal: None,
                out_of_memory: false
            }
        );
        assert_eq!(
            job_exit(137, true),
            JobExit {
                code: None,
                signal: Some(9),
                out_of_memory: true
            }
        );
        assert_eq!(job_exit(3, false).code, Some(3));
    }
}
