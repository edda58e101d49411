//! The miner role: a pool of executors per executor class, and the relay between validators and
//! executors.
//!
//! Executors are `horde node --role executor` child processes the miner spawns on demand (or at
//! start-up, `prewarm`), each with a key the miner generated and a one-time token in its
//! environment. An executor dials back, opens a registration stream with that token, and keeps it
//! open for as long as it lives. For each job the miner reserves a free executor of the class
//! (spawning one if the class has room, declining with `Busy` or `NoExecutorForClass`
//! otherwise), opens a job session to it on the executor's own connection, relays messages both
//! ways, turns the executor's `EndpointReady` into an [`EndpointRecord`] signed with the miner's
//! hotkey, and frees the executor when the job ends.
//!
//! Accounting: the miner tracks each job a validator sent it (validator, executor class, whether
//! it accepted the job, how the executor said it ended) for [`RECEIPT_WINDOW`] after the end.
//! A validator's receipt arrives on a stream of its own (`ControlMessage::Receipt`); the miner
//! countersigns it only if it is signed by that connection's validator, names this miner, and
//! matches a job that validator sent here — `Accepted` and `Finished` only for a job it accepted,
//! `Finished` with an outcome other than "completed" not for a job its executor reported
//! finished — then stores it in `<data_dir>/receipts.log` and answers with the
//! countersignature, or with `Refused(reason)`. The tracking is in memory: after a restart the
//! miner refuses receipts for jobs from before it (their validator keeps them, marked not
//! countersigned, with the refusal as the reason).
//!
//! Layout: `miner.rs` (the pool of executors, reservations, the relay to the executor),
//! `miner/receipts.rs` (the jobs tracked for receipts, and countersigning).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use horde_protocol::messages::{DeclineReason, ExecutorRegistration, InitialJobDetails};
use horde_protocol::{
    ClassCapacity, ControlMessage, Deadlines, DownMessage, EndpointRecord, ExecutorClass, Hotkey,
    JobId, Role, SecretKey, Signed, UpMessage,
};
use horde_transport::{FramedRecv, FramedSend, JobSession, codes, open_session};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::clock::now;
use crate::server::config::{
    ClassConfig, ExecutorConfig, MinerConfig, NodeConfig, NodeConfigError,
};
use crate::server::receipts::ReceiptStore;
use crate::server::relay::{Hop, Relay, RelayPolicy, Step, ends_job};
use crate::server::role::{ChildTasks, RoleHandle, Service, join_all};
use crate::server::streams::serve_streams;
use crate::server::{cleanup, supervision};

mod receipts;

pub use receipts::RECEIPT_WINDOW;
use receipts::TrackedJob;

/// How long an endpoint record stays valid beyond the job's execution and upload deadlines.
const ENDPOINT_RECORD_MARGIN_MS: u64 = 60_000;

/// Why an executor could not be started (a reservation waiting for it is declined with this).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The miner is shutting down and starts no more executors.
    #[error("miner shutting down")]
    ShuttingDown,
    /// The executor's directory, config or log could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The executor's key could not be written.
    #[error(transparent)]
    Key(#[from] horde_protocol::KeyFileError),
    /// The executor's config could not be written.
    #[error(transparent)]
    Config(#[from] NodeConfigError),
    /// No `executor_program` is set and this binary cannot be located.
    #[error("locating horde binary: {0}")]
    CurrentExe(std::io::Error),
    /// The executor program cannot be found.
    #[error("executor program {}: {source}", program.display())]
    Program {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The executor process could not be started.
    #[error("spawning {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Debug)]
enum SlotState {
    /// Spawned, not registered yet (its watcher enforces the registration timeout).
    Starting,
    Idle(quinn::Connection),
    Busy,
    /// The process ended (or was given up on) before it registered: why and when, for the next
    /// reservation of its class.
    Failed(String, tokio::time::Instant),
}

/// How long a spawned executor may take to register before it is killed and its start counted
/// as failed, unless `[miner] registration_timeout_ms` says otherwise: an executor registers
/// within milliseconds, a loaded machine may take seconds, and a hung one must not keep its
/// class waiting for ever.
pub const DEFAULT_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a failed executor start is reported to the jobs of its class: a job arriving later
/// tries a fresh executor instead of being declined for an old failure.
const FAILURE_MEMORY: Duration = Duration::from_secs(10);

/// How much of an executor's log a start-up failure quotes: its last line, at most this many
/// bytes (the whole log stays in the executor's directory).
const FAILURE_LOG_QUOTE: usize = 300;

/// Where each executor gets a directory of its own (`<id>/`: configuration, key, log, and its
/// data directory `data/` with its jobs' files, removed once the executor has ended).
const EXECUTORS_DIR: &str = "executors";
/// An executor's log and data directory in its own directory.
const EXECUTOR_LOG: &str = "executor.log";
const EXECUTOR_DATA: &str = "data";
/// An earlier run's [`EXECUTORS_DIR`], set aside at start to be removed.
const STALE_EXECUTORS_PREFIX: &str = "executors.stale-";

#[derive(Debug)]
struct Slot {
    class: ExecutorClass,
    token: [u8; 16],
    hotkey: Hotkey,
    state: SlotState,
    /// Cancelled to kill the executor process (its watcher then reaps it).
    stop: CancellationToken,
}

impl Slot {
    /// A slot for an executor just spawned with `token` and `hotkey`'s key.
    fn starting(class: ExecutorClass, token: [u8; 16], hotkey: Hotkey) -> Self {
        Self {
            class,
            token,
            hotkey,
            state: SlotState::Starting,
            stop: CancellationToken::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Pool {
    slots: HashMap<u64, Slot>,
    next_id: u64,
    /// Set by [`Miner::kill_executors`]: no executor is started any more, so none outlives the
    /// shutdown (set and checked under the pool lock, so no spawn slips in after the kill).
    closed: bool,
    /// The executor watchers ([`watch_executor`]), one per process; shutdown waits for them.
    watchers: ChildTasks,
}

/// The miner service.
#[derive(Debug)]
pub struct Miner {
    key: SecretKey,
    config: MinerConfig,
    data_dir: PathBuf,
    listen: std::net::SocketAddr,
    pool: Mutex<Pool>,
    registered: Notify,
    /// Free executors per class, published in the miner's node record.
    capacity: watch::Sender<Vec<ClassCapacity>>,
    receipts: ReceiptStore,
    jobs: Mutex<HashMap<JobId, TrackedJob>>,
    /// Signalled when a job starts being tracked.
    jobs_changed: Notify,
    cancel: CancellationToken,
}

/// Free and total executors of each configured class: a class is free up to `max_executors`
/// minus the executors busy with a job (free ones may still have to be started).
fn capacity_of(config: &MinerConfig, pool: &Pool) -> Vec<ClassCapacity> {
    config
        .classes
        .iter()
        .map(|class| {
            let busy = pool
                .slots
                .values()
                .filter(|s| s.class == class.class && matches!(s.state, SlotState::Busy))
                .count();
            let busy = u32::try_from(busy).unwrap_or(u32::MAX);
            ClassCapacity {
                class: class.class.clone(),
                free: class.max_executors.saturating_sub(busy),
                total: class.max_executors,
            }
        })
        .collect()
}

/// An executor reserved for one job; freed on drop.
#[derive(Debug)]
struct Reservation {
    miner: Arc<Miner>,
    slot: u64,
    connection: quinn::Connection,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut pool = self.miner.lock_pool();
        if let Some(slot) = pool.slots.get_mut(&self.slot)
            && self.connection.close_reason().is_none()
        {
            slot.state = SlotState::Idle(self.connection.clone());
        }
        drop(pool);
        self.miner.registered.notify_waiters();
        self.miner.publish_capacity();
    }
}

impl Miner {
    /// The service; `listen` is the miner's own QUIC address, which spawned executors dial;
    /// countersigned receipts go to `receipts`.
    pub fn new(
        key: SecretKey,
        config: MinerConfig,
        data_dir: PathBuf,
        receipts: ReceiptStore,
        listen: std::net::SocketAddr,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let capacity = watch::Sender::new(capacity_of(&config, &Pool::default()));
        Arc::new(Self {
            key,
            config,
            data_dir,
            listen,
            pool: Mutex::new(Pool::default()),
            registered: Notify::new(),
            capacity,
            receipts,
            jobs: Mutex::new(HashMap::new()),
            jobs_changed: Notify::new(),
            cancel,
        })
    }

    /// Starts the role: the `prewarm` executors of every class, a task removing what an earlier
    /// run's executors left (set aside first, so this run's start at once), and a task that,
    /// once the miner's token is cancelled, kills every executor and waits until each one is
    /// reaped.
    pub(crate) fn start(self: Arc<Self>) -> RoleHandle {
        let stale = self.set_aside_stale_executors();
        self.prewarm();
        let service = Service::Miner(Arc::clone(&self));
        let mut handle = RoleHandle::new(Role::Miner, service, self.cancel.clone());
        let cancel = self.cancel.clone();
        handle.spawn(async move {
            for dir in stale {
                // Not held up by shutdown: what is left is removed at the next start.
                let removed = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    removed = cleanup::remove_left_behind(dir.clone()) => removed,
                };
                match removed {
                    Ok(()) => info!(dir = %dir.display(), "removed an earlier run's executors"),
                    Err(error) => {
                        warn!(%error, dir = %dir.display(), "could not remove an earlier run's executors");
                    }
                }
            }
        });
        handle.spawn(async move {
            self.cancel.cancelled().await;
            self.shutdown().await;
        });
        handle
    }

    /// Free executors per class, now and on every change (for the miner's node record).
    pub fn capacity_updates(&self) -> watch::Receiver<Vec<ClassCapacity>> {
        self.capacity.subscribe()
    }

    fn publish_capacity(&self) {
        let capacity = capacity_of(&self.config, &self.lock_pool());
        self.capacity.send_if_modified(|current| {
            let changed = *current != capacity;
            *current = capacity;
            changed
        });
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The executor directories of an earlier run of this miner (each with its jobs' files, left
    /// when the miner was killed: its executors and their jobs died with it), moved out of the
    /// way of this run's executors at once, to be removed in the background. Also returns what
    /// an earlier move left unremoved.
    fn set_aside_stale_executors(&self) -> Vec<PathBuf> {
        let executors = self.data_dir.join(EXECUTORS_DIR);
        if executors.exists() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let aside = self
                .data_dir
                .join(format!("{STALE_EXECUTORS_PREFIX}{nanos}"));
            if let Err(error) = std::fs::rename(&executors, &aside) {
                warn!(%error, dir = %executors.display(), "could not set an earlier run's executors aside");
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.data_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(STALE_EXECUTORS_PREFIX)
            })
            .map(|entry| entry.path())
            .collect()
    }

    /// Starts the `prewarm` executors of every class.
    fn prewarm(self: &Arc<Self>) {
        for class in &self.config.classes {
            for _ in 0..class.prewarm {
                if let Err(error) = self.spawn_executor(&class.class) {
                    warn!(%error, class = %class.class, "could not start executor");
                }
            }
        }
    }

    /// Kills every executor process, and starts no other one from now on.
    fn kill_executors(&self) {
        let mut pool = self.lock_pool();
        pool.closed = true;
        for slot in pool.slots.values() {
            slot.stop.cancel();
        }
        pool.slots.clear();
    }

    /// Kills every executor process and waits until each one is reaped.
    pub async fn shutdown(&self) {
        self.kill_executors();
        self.wait_for_executors().await;
    }

    /// Waits until every executor's watcher has ended (after [`Miner::kill_executors`]: each
    /// process reaped).
    async fn wait_for_executors(&self) {
        let watchers = self.lock_pool().watchers.close();
        join_all(watchers).await;
    }

    fn spawn_executor(self: &Arc<Self>, class: &ExecutorClass) -> Result<u64, SpawnError> {
        let mut pool = self.lock_pool();
        if pool.closed {
            return Err(SpawnError::ShuttingDown);
        }
        let id = pool.next_id;
        pool.next_id += 1;
        let dir = self.data_dir.join(EXECUTORS_DIR).join(format!("{id}"));
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| SpawnError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let key_path = dir.join("hotkey.json");
        let _ = std::fs::remove_file(&key_path);
        let key = SecretKey::generate();
        key.write_key_file(&key_path)?;
        let policy = self
            .config
            .classes
            .iter()
            .find(|c| c.class == *class)
            .map(ClassConfig::policy)
            .unwrap_or_default();
        let mut config = NodeConfig::new(Role::Executor);
        config.data_dir = PathBuf::from(EXECUTOR_DATA);
        config.executor = Some(ExecutorConfig {
            miner: horde_protocol::NodeAddr::new(self.key.hotkey(), self.listen),
            class: class.clone(),
            job_host: self.config.job_host,
            policy,
        });
        let config_path = dir.join("executor.toml");
        std::fs::write(&config_path, config.to_toml()?).map_err(io_error(&config_path))?;
        let program = match &self.config.executor_program {
            Some(program) => program.clone(),
            None => std::env::current_exe().map_err(SpawnError::CurrentExe)?,
        };
        let log_path = dir.join(EXECUTOR_LOG);
        let log = std::fs::File::create(&log_path).map_err(io_error(&log_path))?;
        let log_err = log.try_clone().map_err(io_error(&log_path))?;
        let token = horde_protocol::JobId::random().0;
        // Tied to this miner: the executor (and with it its job) is killed with the miner,
        // however the miner ends.
        let program = supervision::resolve_program(
            &program.to_string_lossy(),
            std::env::var_os("PATH").as_deref(),
            Path::new("."),
        )
        .map_err(|source| SpawnError::Program {
            program: program.clone(),
            source,
        })?;
        let child = supervision::tied_command(&program)
            .arg("node")
            .arg("--config")
            .arg(&config_path)
            .env(crate::server::EXECUTOR_TOKEN_ENV, hex::encode(token))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SpawnError::Spawn {
                program: program.clone(),
                source,
            })?;
        info!(slot = id, %class, executor = %key.hotkey().fmt_short(), "executor spawned");
        let slot = Slot::starting(class.clone(), token, key.hotkey());
        self.add_slot(&mut pool, id, slot, child, dir);
        Ok(id)
    }

    /// Adds `slot` as `id` for executor process `child` (whose directory is `dir`) and starts
    /// the process's watcher.
    fn add_slot(
        self: &Arc<Self>,
        pool: &mut Pool,
        id: u64,
        slot: Slot,
        child: tokio::process::Child,
        dir: PathBuf,
    ) {
        let span = info_span!("executor", slot = id, class = %slot.class);
        let watcher = watch_executor(
            Arc::downgrade(self),
            id,
            child,
            slot.stop.clone(),
            self.config.registration_timeout,
            dir,
        );
        // Only fails once the executors are killed, and then dropping the watcher kills this one.
        if pool.watchers.spawn(watcher.instrument(span)).is_ok() {
            pool.slots.insert(id, slot);
        }
    }

    /// Slot `id` has not registered within the registration timeout: if it is still starting,
    /// it becomes [`SlotState::Failed`] (its watcher then kills the process). Whether it was.
    fn registration_overdue(&self, id: u64) -> bool {
        let mut pool = self.lock_pool();
        let Some(slot) = pool.slots.get_mut(&id) else {
            return false;
        };
        if !matches!(slot.state, SlotState::Starting) {
            return false;
        }
        let timeout = self.config.registration_timeout;
        warn!(slot = id, class = %slot.class, ?timeout, "executor did not register in time; killing it");
        slot.state = SlotState::Failed(
            format!(
                "executor did not register within the registration timeout ({timeout:?}); killed"
            ),
            tokio::time::Instant::now(),
        );
        true
    }

    /// The process of slot `id` ended with `status`. A slot still starting becomes
    /// [`SlotState::Failed`] with the reason (the exit status and the log's last line), which the
    /// next reservation of its class reports instead of waiting out its deadline; a slot that
    /// already failed keeps its reason; any other slot is removed.
    fn executor_exited(&self, id: u64, status: &str, log: &Path) {
        // Read before taking the pool lock: a file read never holds up reservations.
        let last_line = last_log_line(log);
        let mut pool = self.lock_pool();
        let Some(slot) = pool.slots.get_mut(&id) else {
            return;
        };
        match slot.state {
            SlotState::Starting => {
                let mut reason = format!("executor exited with {status} before registering");
                if let Some(line) = last_line {
                    reason.push_str(": ");
                    reason.push_str(&line);
                }
                warn!(slot = id, class = %slot.class, %reason, log = %log.display(), "executor failed to start");
                slot.state = SlotState::Failed(reason, tokio::time::Instant::now());
            }
            SlotState::Failed(..) => info!(slot = id, %status, "failed executor reaped"),
            SlotState::Idle(_) | SlotState::Busy => {
                info!(slot = id, %status, "executor process ended");
                pool.slots.remove(&id);
            }
        }
        drop(pool);
        self.registered.notify_waiters();
        self.publish_capacity();
    }

    /// Reserves a free executor of `class`, spawning one if the class has room, waiting at
    /// most `wait` for one to register; declines at once when the miner is cancelled.
    async fn reserve(
        self: &Arc<Self>,
        class: &ExecutorClass,
        wait: Duration,
    ) -> Result<Reservation, DeclineReason> {
        let Some(class_config) = self.config.classes.iter().find(|c| c.class == *class) else {
            return Err(DeclineReason::NoExecutorForClass);
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.registered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut pool = self.lock_pool();
                // Executors of the class that failed to start: their reason declines this job
                // unless a free executor turns up (a failing program fails again, so no retry).
                let mut failed = None;
                let now = tokio::time::Instant::now();
                pool.slots.retain(|_, slot| match &mut slot.state {
                    SlotState::Failed(reason, at) if slot.class == *class => {
                        if now.duration_since(*at) < FAILURE_MEMORY {
                            failed = Some(std::mem::take(reason));
                        }
                        false
                    }
                    _ => true,
                });
                let free = pool.slots.iter_mut().find(|(_, slot)| {
                    slot.class == *class
                        && matches!(&slot.state, SlotState::Idle(c) if c.close_reason().is_none())
                });
                if let Some((id, slot)) = free {
                    let SlotState::Idle(connection) =
                        std::mem::replace(&mut slot.state, SlotState::Busy)
                    else {
                        continue;
                    };
                    let reservation = Reservation {
                        miner: Arc::clone(self),
                        slot: *id,
                        connection,
                    };
                    drop(pool);
                    self.publish_capacity();
                    return Ok(reservation);
                }
                let of_class = pool.slots.values().filter(|s| s.class == *class).count();
                let starting = pool
                    .slots
                    .values()
                    .any(|s| s.class == *class && matches!(s.state, SlotState::Starting));
                let room = of_class < class_config.max_executors as usize;
                drop(pool);
                if let Some(reason) = failed {
                    return Err(DeclineReason::ExecutorUnavailable(reason));
                }
                if !starting {
                    if !room {
                        return Err(DeclineReason::Busy);
                    }
                    self.spawn_executor(class)
                        .map_err(|e| DeclineReason::ExecutorUnavailable(e.to_string()))?;
                }
            }
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    return Err(DeclineReason::ExecutorUnavailable(
                        "miner shutting down".to_owned(),
                    ));
                }
                woken = tokio::time::timeout_at(deadline, notified) => {
                    if woken.is_err() {
                        return Err(DeclineReason::ExecutorUnavailable(
                            "no executor registered within the reservation deadline".to_owned(),
                        ));
                    }
                }
            }
        }
    }

    /// Serves one connection: from a validator (job sessions) or an executor (registration).
    pub async fn handle_connection(self: Arc<Self>, connection: quinn::Connection, peer: Hotkey) {
        let cancel = self.cancel.clone();
        serve_streams(&connection, &cancel, |send, recv, first| {
            let this = Arc::clone(&self);
            let connection = connection.clone();
            async move {
                this.handle_stream(connection, peer, send, recv, first)
                    .await
            }
        })
        .await;
    }

    async fn handle_stream(
        self: Arc<Self>,
        connection: quinn::Connection,
        peer: Hotkey,
        mut send: FramedSend,
        mut recv: FramedRecv,
        first: ControlMessage,
    ) {
        match first {
            ControlMessage::RegisterExecutor(registration) => {
                self.handle_registration(connection, peer, send, recv, registration)
                    .await;
            }
            ControlMessage::Down(DownMessage::InitialDetails(details)) => {
                let span = info_span!("job", job = %details.job_id.fmt_short());
                let session = JobSession::new(details.job_id, peer, send, recv);
                self.handle_job(session, peer, details)
                    .instrument(span)
                    .await;
            }
            ControlMessage::Receipt(receipt) => {
                let span = info_span!("receipt", validator = %peer.fmt_short());
                self.handle_receipt(peer, send, receipt)
                    .instrument(span)
                    .await;
            }
            other => {
                warn!(%peer, message = ?other, "unexpected first message");
                recv.stop(codes::PROTOCOL_VIOLATION);
                send.reset(codes::PROTOCOL_VIOLATION);
            }
        }
    }

    async fn handle_registration(
        self: Arc<Self>,
        connection: quinn::Connection,
        peer: Hotkey,
        mut send: FramedSend,
        mut recv: FramedRecv,
        registration: ExecutorRegistration,
    ) {
        let slot_id = {
            let mut pool = self.lock_pool();
            let found = pool.slots.iter_mut().find(|(_, slot)| {
                slot.token == registration.token
                    && slot.hotkey == peer
                    && slot.class == registration.class
                    && matches!(slot.state, SlotState::Starting)
            });
            match found {
                Some((id, slot)) => {
                    slot.state = SlotState::Idle(connection.clone());
                    Some(*id)
                }
                None => None,
            }
        };
        let Some(slot_id) = slot_id else {
            warn!(%peer, "executor registration refused: unknown token or key");
            recv.stop(codes::NOT_ALLOWED);
            send.reset(codes::NOT_ALLOWED);
            connection.close(codes::NOT_ALLOWED, b"unknown executor");
            return;
        };
        info!(slot = slot_id, executor = %peer.fmt_short(), class = %registration.class, "executor registered");
        self.registered.notify_waiters();
        // The registration stream stays open for the executor's life.
        let _ = recv.recv::<ControlMessage>().await;
        if let Some(slot) = self.lock_pool().slots.remove(&slot_id) {
            slot.stop.cancel();
        }
        info!(slot = slot_id, "executor gone");
    }

    fn hop(&self) -> Hop {
        Hop {
            role: Role::Miner,
            hotkey: self.key.hotkey(),
        }
    }

    async fn handle_job(
        self: Arc<Self>,
        mut upstream: JobSession,
        validator: Hotkey,
        details: InitialJobDetails,
    ) {
        let decline = |reason| UpMessage::Declined(reason);
        let allowed = self
            .config
            .allowed_validators
            .as_ref()
            .is_none_or(|allowed| allowed.contains(&validator));
        if !allowed || details.validator != validator {
            let _ = upstream
                .send_up(&decline(DeclineReason::ValidatorNotAllowed))
                .await;
            let _ = upstream.finish();
            return;
        }
        let _tracking = self.track_job(&details, validator);
        let wait = Duration::from_millis(details.deadlines.reservation_ms);
        let reservation = match self.reserve(&details.executor_class, wait).await {
            Ok(reservation) => reservation,
            Err(reason) => {
                info!(?reason, "job declined");
                let _ = upstream.send_up(&decline(reason)).await;
                let _ = upstream.finish();
                return;
            }
        };
        let job_id = details.job_id;
        let deadlines = details.deadlines;
        let mut downstream = match open_session(
            &reservation.connection,
            job_id,
            &DownMessage::InitialDetails(details),
        )
        .await
        {
            Ok(session) => session,
            Err(error) => {
                let _ = upstream
                    .send_up(
                        &self
                            .hop()
                            .failed_up(format!("executor unreachable: {error}")),
                    )
                    .await;
                let _ = upstream.finish();
                return;
            }
        };
        self.update_job(job_id, |job| job.accepted = true);
        if upstream.send_up(&UpMessage::Accepted).await.is_err() {
            downstream.abort(codes::CANCELLED);
            return;
        }
        let mut policy = ExecutorSide {
            miner: &self,
            job_id,
            deadlines,
        };
        let relay = Relay::new(
            self.hop(),
            "executor".to_owned(),
            "validator",
            downstream,
            &self.cancel,
        );
        if let Some(last) = relay.run(&mut upstream, &mut policy).await
            && let Err(error) = upstream.send_up(&last).await
        {
            warn!(%error, "could not report to the validator");
        }
        let _ = upstream.finish();
        drop(reservation);
        debug!("job over; executor released");
    }
}

/// The miner's relay policy: the executor's `EndpointReady` becomes an [`EndpointRecord`] signed
/// with the miner's hotkey, the job's end is remembered for its receipts, and only the messages a
/// validator sends after the initial details (full details, volume lists, terminate requests)
/// go down. No deadline of its own: the validator enforces the stages.
#[derive(Debug)]
struct ExecutorSide<'a> {
    miner: &'a Miner,
    job_id: JobId,
    deadlines: Deadlines,
}

impl RelayPolicy for ExecutorSide<'_> {
    fn on_up(&mut self, message: UpMessage) -> Step {
        let message = match message {
            UpMessage::EndpointReady(ready) => {
                let record = EndpointRecord {
                    job_id: self.job_id,
                    miner: self.miner.key.hotkey(),
                    address: ready.address,
                    job_key: ready.job_key,
                    expires_at: now().plus_millis(
                        self.deadlines
                            .execution_ms
                            .saturating_add(self.deadlines.upload_ms)
                            .saturating_add(ENDPOINT_RECORD_MARGIN_MS),
                    ),
                };
                UpMessage::Endpoint(Signed::sign(&self.miner.key, &record))
            }
            other => other,
        };
        if ends_job(&message) {
            let completed = matches!(message, UpMessage::Finished(_));
            self.miner
                .update_job(self.job_id, |job| job.completed = Some(completed));
        }
        Step::Up(message)
    }

    fn on_down(&mut self, message: DownMessage) -> Step {
        match message {
            DownMessage::FullDetails(_) | DownMessage::Volumes(_) | DownMessage::Terminate(_) => {
                Step::Down(message)
            }
            other => {
                warn!(message = ?other, "unexpected message from validator");
                Step::Drop
            }
        }
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        None
    }

    fn on_deadline(&mut self) -> Step {
        Step::Drop
    }
}

/// Owns executor process `child` of slot `id`: kills it when `stop` is cancelled or when it has
/// not registered within `registration_timeout` (or the miner is gone by then: nothing could use
/// it), reaps it, tells the miner how it ended, and removes its data directory (in `dir`) with
/// whatever its job left there.
async fn watch_executor(
    miner: std::sync::Weak<Miner>,
    id: u64,
    mut child: tokio::process::Child,
    stop: CancellationToken,
    registration_timeout: Duration,
    dir: PathBuf,
) {
    let registration_deadline = tokio::time::sleep(registration_timeout);
    tokio::pin!(registration_deadline);
    let mut registering = true;
    let status = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                let _ = child.start_kill();
                break child.wait().await;
            }
            status = child.wait() => break status,
            () = &mut registration_deadline, if registering => {
                registering = false;
                if miner.upgrade().is_none_or(|miner| miner.registration_overdue(id)) {
                    let _ = child.start_kill();
                    break child.wait().await;
                }
            }
        }
    };
    let status = match status {
        Ok(status) => status.to_string(),
        Err(error) => format!("an unknown status ({error})"),
    };
    if let Some(miner) = miner.upgrade() {
        miner.executor_exited(id, &status, &dir.join(EXECUTOR_LOG));
    }
    if let Err(error) = cleanup::remove_left_behind(dir.join(EXECUTOR_DATA)).await {
        warn!(%error, dir = %dir.display(), "could not remove the ended executor's data");
    }
}

/// The last non-empty line of the log at `path`, at most [`FAILURE_LOG_QUOTE`] bytes of it
/// (read from the file's end, so a huge log costs no more than a small one).
fn last_log_line(path: &Path) -> Option<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let tail = 4 * FAILURE_LOG_QUOTE as u64;
    file.seek(SeekFrom::Start(len.saturating_sub(tail))).ok()?;
    let mut bytes = Vec::new();
    file.take(tail).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().map(str::trim).rfind(|line| !line.is_empty())?;
    let mut end = line.len().min(FAILURE_LOG_QUOTE);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use horde_protocol::{AccountingReceipt, JobOutcome, ReceiptKind};

    use super::receipts::RECEIPT_CLOCK_SKEW_MS;
    use super::*;
    use crate::server::receipts::{DEFAULT_MAX_LOG_BYTES, log_path, read_log};
    use horde_protocol::{Deadlines, Program, Stage, UnixMillis};

    const JOB: JobId = JobId([4; 16]);

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    fn miner(dir: &std::path::Path) -> Arc<Miner> {
        miner_with(dir, Vec::new(), DEFAULT_REGISTRATION_TIMEOUT)
    }

    fn miner_with(
        dir: &std::path::Path,
        classes: Vec<crate::server::config::ClassConfig>,
        registration_timeout: Duration,
    ) -> Arc<Miner> {
        let config = MinerConfig {
            classes,
            allowed_validators: None,
            executor_program: None,
            job_host: std::net::Ipv4Addr::LOCALHOST.into(),
            registration_timeout,
        };
        Miner::new(
            key(2),
            config,
            dir.to_path_buf(),
            ReceiptStore::open(dir, DEFAULT_MAX_LOG_BYTES).unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            CancellationToken::new(),
        )
    }

    fn details(job_id: JobId) -> InitialJobDetails {
        InitialJobDetails {
            job_id,
            executor_class: ExecutorClass("cpu".into()),
            program: Program::Command {
                program: "true".into(),
            },
            deadlines: Deadlines {
                reservation_ms: 1,
                executor_startup_ms: 1,
                volume_download_ms: 1,
                readiness_ms: 1,
                execution_ms: 1,
                upload_ms: 1,
            },
            client_key: key(7).hotkey(),
            validator: key(1).hotkey(),
        }
    }

    /// A receipt signed by `validator` for miner key 2, job [`JOB`], class `cpu`, issued now.
    fn receipt(validator: &SecretKey, kind: ReceiptKind) -> Signed<AccountingReceipt> {
        Signed::sign(validator, &payload(validator, kind))
    }

    fn payload(validator: &SecretKey, kind: ReceiptKind) -> AccountingReceipt {
        AccountingReceipt {
            kind,
            job_id: JOB,
            validator: validator.hotkey(),
            miner: key(2).hotkey(),
            executor_class: ExecutorClass("cpu".into()),
            issued_at: now(),
        }
    }

    fn finished(outcome: JobOutcome) -> ReceiptKind {
        ReceiptKind::Finished {
            outcome,
            started_at: UnixMillis(now().0 - 10),
            time_took_ms: 10,
        }
    }

    async fn refusal(
        miner: &Miner,
        peer: &SecretKey,
        receipt: &Signed<AccountingReceipt>,
    ) -> String {
        miner
            .countersign(&peer.hotkey(), receipt)
            .await
            .expect_err("refused")
            .to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn countersigns_only_receipts_it_agrees_with() {
        let dir = tempfile::tempdir().unwrap();
        let miner = miner(dir.path());
        let (validator, other) = (key(1), key(3));
        // Unknown job: refused after waiting for its session.
        let started = receipt(&validator, ReceiptKind::Started);
        assert!(
            refusal(&miner, &validator, &started)
                .await
                .contains("unknown here")
        );

        let tracking = miner.track_job(&details(JOB), validator.hotkey());
        let countersignature = miner
            .countersign(&validator.hotkey(), &started)
            .await
            .unwrap();
        countersignature
            .verify(&started, &started.verify().unwrap())
            .unwrap();
        // The same receipt again gets the same answer; a different one of the same kind does not.
        assert_eq!(
            miner.countersign(&validator.hotkey(), &started).await,
            Ok(countersignature)
        );
        let mut later = payload(&validator, ReceiptKind::Started);
        later.issued_at = later.issued_at.plus_millis(1);
        let reason = refusal(&miner, &validator, &Signed::sign(&validator, &later)).await;
        assert!(reason.contains("already countersigned"), "{reason}");

        // Presented by another validator than the one that signed it.
        let reason = refusal(&miner, &other, &started).await;
        assert!(reason.contains("names validator"), "{reason}");
        // Signed by another validator, for a job this one sent.
        let reason = refusal(&miner, &other, &receipt(&other, ReceiptKind::Started)).await;
        assert!(reason.contains("another validator"), "{reason}");
        // Signed by another key than the validator it names.
        let impostor = Signed::sign(&other, &payload(&validator, ReceiptKind::Started));
        let reason = refusal(&miner, &other, &impostor).await;
        assert!(reason.contains("signed by"), "{reason}");
        // For another miner.
        let mut for_other = payload(&validator, ReceiptKind::Started);
        for_other.miner = other.hotkey();
        let reason = refusal(&miner, &validator, &Signed::sign(&validator, &for_other)).await;
        assert!(reason.contains("names miner"), "{reason}");
        // Another class, or a date in the future.
        let mut class = payload(&validator, ReceiptKind::Accepted);
        class.executor_class = ExecutorClass("gpu".into());
        let mut future = payload(&validator, ReceiptKind::Accepted);
        future.issued_at = future.issued_at.plus_millis(RECEIPT_CLOCK_SKEW_MS + 1_000);
        miner.update_job(JOB, |job| job.accepted = true);
        let reason = refusal(&miner, &validator, &Signed::sign(&validator, &class)).await;
        assert!(reason.contains("class"), "{reason}");
        let reason = refusal(&miner, &validator, &Signed::sign(&validator, &future)).await;
        assert!(reason.contains("future"), "{reason}");
        // Tampered bytes.
        let good = receipt(&validator, ReceiptKind::Accepted);
        let mut bytes = good.bytes().to_vec();
        bytes[0] ^= 1;
        let tampered = Signed::from_parts(bytes, *good.signer(), *good.signature());
        let reason = refusal(&miner, &validator, &tampered).await;
        assert!(reason.contains("bad validator signature"), "{reason}");

        miner.countersign(&validator.hotkey(), &good).await.unwrap();
        // The executor reported the job finished: a receipt saying otherwise is refused.
        miner.update_job(JOB, |job| job.completed = Some(true));
        let timed_out = receipt(
            &validator,
            finished(JobOutcome::TimedOut {
                stage: Stage::Execution,
            }),
        );
        let reason = refusal(&miner, &validator, &timed_out).await;
        assert!(reason.contains("reported the job finished"), "{reason}");
        let done = receipt(&validator, finished(JobOutcome::Completed));
        miner.countersign(&validator.hotkey(), &done).await.unwrap();
        drop(tracking);

        // Stored once each, countersigned by this miner.
        let entries = read_log(&log_path(dir.path())).unwrap().entries;
        let kinds: Vec<_> = entries
            .iter()
            .map(|e| e.record.verify_countersigned().unwrap().kind.name())
            .collect();
        assert_eq!(kinds, vec!["started", "accepted", "finished"]);
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_and_finished_need_an_accepted_job() {
        let dir = tempfile::tempdir().unwrap();
        let miner = miner(dir.path());
        let validator = key(1);
        let _tracking = miner.track_job(&details(JOB), validator.hotkey());
        for kind in [ReceiptKind::Accepted, finished(JobOutcome::HordeFailed)] {
            let reason = refusal(&miner, &validator, &receipt(&validator, kind)).await;
            assert!(reason.contains("not accepted here"), "{reason}");
        }
    }

    /// Shutdown returns only once every executor process has been killed and reaped.
    #[tokio::test]
    async fn shutdown_kills_and_reaps_every_executor() {
        let dir = tempfile::tempdir().unwrap();
        let miner = miner(dir.path());
        let process = add_sleeping_executor(&miner, dir.path());
        assert!(process.exists());
        tokio::time::timeout(Duration::from_secs(10), miner.shutdown())
            .await
            .expect("shutdown ends");
        assert!(!process.exists(), "{} is still there", process.display());
    }

    /// Adds a starting executor of class `cpu` to `miner`'s pool: a `sleep` that never
    /// registers. Its `/proc` entry.
    fn add_sleeping_executor(miner: &Arc<Miner>, dir: &Path) -> PathBuf {
        let child = tokio::process::Command::new("sleep")
            .arg("600")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let process = Path::new("/proc").join(child.id().unwrap().to_string());
        let slot = Slot::starting(ExecutorClass("cpu".into()), [0; 16], key(9).hotkey());
        miner.add_slot(&mut miner.lock_pool(), 0, slot, child, dir.to_owned());
        process
    }

    /// A reservation waiting for an executor while the miner shuts down is declined at once, and
    /// no executor is started once the executors are killed: none is left to hold up shutdown
    /// until its registration timeout.
    #[tokio::test]
    async fn shutdown_declines_waiting_reservations_and_starts_no_executor() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = ExecutorClass("cpu".into());
        let class = ClassConfig::new(cpu.clone());
        let miner = miner_with(dir.path(), vec![class], DEFAULT_REGISTRATION_TIMEOUT);
        let process = add_sleeping_executor(&miner, dir.path());
        let mut reservation = tokio::spawn({
            let miner = Arc::clone(&miner);
            let cpu = cpu.clone();
            async move { miner.reserve(&cpu, Duration::from_secs(600)).await }
        });
        // Let the reservation start waiting for the starting executor.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!reservation.is_finished(), "{:?}", reservation.await);

        // What the node's shutdown does.
        miner.cancel.cancel();
        miner.kill_executors();
        let declined = tokio::time::timeout(Duration::from_secs(5), &mut reservation)
            .await
            .expect("the reservation ends promptly")
            .unwrap();
        match declined {
            Err(DeclineReason::ExecutorUnavailable(reason)) => {
                assert!(reason.contains("shutting down"), "{reason}");
            }
            other => panic!("expected a decline, got {other:?}"),
        }
        // A job ending now wakes reservations, which would find room for a new executor.
        let refused = miner
            .spawn_executor(&cpu)
            .expect_err("no executor starts")
            .to_string();
        assert!(refused.contains("shutting down"), "{refused}");
        tokio::time::timeout(Duration::from_secs(5), miner.shutdown())
            .await
            .expect("shutdown ends well before the registration timeout");
        assert!(!process.exists(), "{} is still there", process.display());
        assert!(miner.lock_pool().slots.is_empty());
        assert!(
            !dir.path().join("executors").exists(),
            "an executor was set up"
        );
    }

    /// An executor whose miner is gone is killed and reaped at its registration deadline.
    #[tokio::test]
    async fn executor_of_a_dropped_miner_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let miner = miner_with(dir.path(), Vec::new(), Duration::from_millis(100));
        let process = add_sleeping_executor(&miner, dir.path());
        drop(miner);
        let gone = async {
            while process.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .unwrap_or_else(|_| panic!("{} is still there", process.display()));
    }

    #[tokio::test(start_paused = true)]
    async fn ended_jobs_are_forgotten_after_the_receipt_window() {
        let dir = tempfile::tempdir().unwrap();
        let miner = miner(dir.path());
        let validator = key(1);
        drop(miner.track_job(&details(JOB), validator.hotkey()));
        assert!(miner.lock_jobs()[&JOB].ended.is_some());
        tokio::time::advance(RECEIPT_WINDOW + Duration::from_secs(1)).await;
        // Tracking another job prunes it.
        drop(miner.track_job(&details(JobId([5; 16])), validator.hotkey()));
        assert!(!miner.lock_jobs().contains_key(&JOB));
        let started = receipt(&validator, ReceiptKind::Started);
        assert!(
            refusal(&miner, &validator, &started)
                .await
                .contains("unknown here")
        );
    }
}
