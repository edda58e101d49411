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

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use horde_protocol::messages::{
    DeclineReason, ExecutorRegistration, HordeFailure, InitialJobDetails,
};
use horde_protocol::{
    ClassCapacity, ControlMessage, DownMessage, EndpointRecord, ExecutorClass, Hotkey, Role,
    SecretKey, Signed, UpMessage,
};
use horde_transport::{FramedRecv, FramedSend, JobSession, codes, open_session};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::client::now;
use crate::config::MinerConfig;
use crate::peers::serve_streams;

/// How long an endpoint record stays valid beyond the job's execution and upload deadlines.
const ENDPOINT_RECORD_MARGIN_MS: u64 = 60_000;

/// The environment variable carrying an executor's registration token.
pub const EXECUTOR_TOKEN_ENV: &str = "HORDE_EXECUTOR_TOKEN";

#[derive(Debug)]
enum SlotState {
    Starting,
    Idle(quinn::Connection),
    Busy,
}

#[derive(Debug)]
struct Slot {
    class: ExecutorClass,
    token: [u8; 16],
    hotkey: Hotkey,
    state: SlotState,
    child: Option<tokio::process::Child>,
}

#[derive(Debug, Default)]
struct Pool {
    slots: HashMap<u64, Slot>,
    next_id: u64,
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
    /// The service; `listen` is the miner's own QUIC address, which spawned executors dial.
    pub fn new(
        key: SecretKey,
        config: MinerConfig,
        data_dir: PathBuf,
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
            cancel,
        })
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

    /// Starts the `prewarm` executors of every class.
    pub fn prewarm(self: &Arc<Self>) {
        for class in &self.config.classes {
            for _ in 0..class.prewarm {
                if let Err(error) = self.spawn_executor(&class.class) {
                    warn!(%error, class = %class.class, "could not start executor");
                }
            }
        }
    }

    /// Kills every executor process.
    pub fn kill_executors(&self) {
        let mut pool = self.lock_pool();
        for slot in pool.slots.values_mut() {
            if let Some(child) = slot.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        pool.slots.clear();
    }

    fn spawn_executor(self: &Arc<Self>, class: &ExecutorClass) -> Result<u64, String> {
        let mut pool = self.lock_pool();
        let id = pool.next_id;
        pool.next_id += 1;
        let dir = self.data_dir.join("executors").join(format!("{id}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let key_path = dir.join("hotkey.json");
        let _ = std::fs::remove_file(&key_path);
        let key = SecretKey::generate();
        key.write_key_file(&key_path).map_err(|e| e.to_string())?;
        let miner_addr = horde_protocol::NodeAddr::new(self.key.hotkey(), self.listen);
        let config = format!(
            "role = \"executor\"\nkey_file = \"hotkey.json\"\nlisten = \"127.0.0.1:0\"\n\
             data_dir = \"data\"\n\n[executor]\nminer = \"{miner_addr}\"\nclass = \"{}\"\n\
             job_host = \"{}\"\n",
            class.0.replace('"', ""),
            self.config.job_host,
        );
        let config_path = dir.join("executor.toml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let program = match &self.config.executor_program {
            Some(program) => program.clone(),
            None => std::env::current_exe().map_err(|e| format!("locating horde binary: {e}"))?,
        };
        let log = std::fs::File::create(dir.join("executor.log")).map_err(|e| e.to_string())?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let token = horde_protocol::JobId::random().0;
        let child = tokio::process::Command::new(&program)
            .arg("node")
            .arg("--config")
            .arg(&config_path)
            .env(EXECUTOR_TOKEN_ENV, hex::encode(token))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", program.display()))?;
        info!(slot = id, %class, executor = %key.hotkey().fmt_short(), "executor spawned");
        pool.slots.insert(
            id,
            Slot {
                class: class.clone(),
                token,
                hotkey: key.hotkey(),
                state: SlotState::Starting,
                child: Some(child),
            },
        );
        Ok(id)
    }

    /// Reserves a free executor of `class`, spawning one if the class has room, waiting at
    /// most `wait` for one to register.
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
                // Reap slots whose process exited.
                pool.slots.retain(|_, slot| {
                    slot.child
                        .as_mut()
                        .is_none_or(|child| matches!(child.try_wait(), Ok(None)))
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
                if !starting {
                    if !room {
                        return Err(DeclineReason::Busy);
                    }
                    self.spawn_executor(class)
                        .map_err(DeclineReason::ExecutorUnavailable)?;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(DeclineReason::ExecutorUnavailable(
                    "no executor registered within the reservation deadline".to_owned(),
                ));
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
        let mut pool = self.lock_pool();
        if let Some(mut slot) = pool.slots.remove(&slot_id)
            && let Some(child) = slot.child.as_mut()
        {
            let _ = child.start_kill();
        }
        info!(slot = slot_id, "executor gone");
    }

    fn horde_failed(&self, reason: String) -> UpMessage {
        UpMessage::HordeFailed(HordeFailure {
            reported_by: Role::Miner,
            reporter: self.key.hotkey(),
            reason,
        })
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
                    .send_up(&self.horde_failed(format!("executor unreachable: {error}")))
                    .await;
                let _ = upstream.finish();
                return;
            }
        };
        if upstream.send_up(&UpMessage::Accepted).await.is_err() {
            downstream.abort(codes::CANCELLED);
            return;
        }
        let mut validator_open = true;
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    downstream.abort(codes::SHUTDOWN);
                    let _ = upstream.send_up(&self.horde_failed("miner shutting down".into())).await;
                    break;
                }
                message = downstream.recv() => {
                    let message = match message {
                        Ok(Some(ControlMessage::Up(message))) => message,
                        Ok(Some(other)) => {
                            warn!(message = ?other, "unexpected message from executor");
                            downstream.abort(codes::PROTOCOL_VIOLATION);
                            let _ = upstream.send_up(&self.horde_failed("executor violated the protocol".into())).await;
                            break;
                        }
                        Ok(None) => {
                            let _ = upstream.send_up(&self.horde_failed("executor ended the job session without a result".into())).await;
                            break;
                        }
                        Err(error) => {
                            let _ = upstream.send_up(&self.horde_failed(format!("executor lost: {error}"))).await;
                            break;
                        }
                    };
                    let message = match message {
                        UpMessage::EndpointReady(ready) => {
                            let record = EndpointRecord {
                                job_id,
                                miner: self.key.hotkey(),
                                address: ready.address,
                                job_key: ready.job_key,
                                expires_at: now().plus_millis(
                                    deadlines
                                        .execution_ms
                                        .saturating_add(deadlines.upload_ms)
                                        .saturating_add(ENDPOINT_RECORD_MARGIN_MS),
                                ),
                            };
                            UpMessage::Endpoint(Signed::sign(&self.key, &record))
                        }
                        other => other,
                    };
                    let terminal = matches!(
                        message,
                        UpMessage::Finished(_) | UpMessage::Failed(_) | UpMessage::HordeFailed(_) | UpMessage::Declined(_)
                    );
                    if upstream.send_up(&message).await.is_err() {
                        warn!("validator link lost; ending the job");
                        downstream.abort(codes::CANCELLED);
                        break;
                    }
                    if terminal {
                        break;
                    }
                }
                message = upstream.recv(), if validator_open => match message {
                    Ok(Some(ControlMessage::Down(message))) => {
                        if let Err(error) = downstream.send_down(&message).await {
                            let _ = upstream.send_up(&self.horde_failed(format!("executor lost: {error}"))).await;
                            break;
                        }
                    }
                    Ok(Some(other)) => warn!(message = ?other, "unexpected message from validator"),
                    Ok(None) => validator_open = false,
                    Err(error) => {
                        warn!(%error, "validator link lost; ending the job");
                        downstream.abort(codes::CANCELLED);
                        break;
                    }
                },
            }
        }
        let _ = upstream.finish();
        drop(reservation);
        debug!("job over; executor released");
    }
}
