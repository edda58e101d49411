//! Node start-up and shutdown: load the hotkey, bind the QUIC endpoint for the role, accept
//! connections and hand them to the role, stop cleanly on a signal.

use std::net::SocketAddr;
use std::sync::Arc;

use horde_protocol::{Hotkey, Role, SecretKey};
use horde_transport::{
    ALPN_BLOB, ALPN_CONTROL, AdmissionLimits, EndpointConfig, HordeEndpoint, KnownKeys, codes,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::server::bound::{BoundAddrs, bind_reusing, reuse};
use crate::server::config::ExecutorConfig;
use crate::server::config::NodeConfig;
use crate::server::discovery::Directory;
use crate::server::discovery::{Discovery, DiscoveryConfig, DiscoveryError, LocalNode};
use crate::server::executor;
use crate::server::facilitator::Facilitator;
use crate::server::facilitator::store::{JobStore, JobStoreError};
use crate::server::miner::Miner;
use crate::server::receipts::ReceiptStore;
use crate::server::role::{RoleHandle, Service};
use crate::server::storage::{self, BlobStore};
use crate::server::validator::Validator;

/// How long shutdown waits for the node's tasks to end and its connections to close before it
/// aborts what is left.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A node that could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The hotkey file is missing, unreadable or unsafe.
    #[error(transparent)]
    Key(#[from] horde_protocol::KeyFileError),
    /// The QUIC endpoint could not be set up.
    #[error("QUIC endpoint: {0}")]
    Endpoint(#[from] horde_transport::ConfigError),
    /// The facilitator's job store could not be opened.
    #[error(transparent)]
    Store(#[from] JobStoreError),
    /// The storage role's blob store could not be opened.
    #[error("blob store: {0}")]
    Blobs(std::io::Error),
    /// The role's configuration is incomplete.
    #[error("config: {0}")]
    Config(String),
    /// Discovery could not start.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The accounting receipt log could not be opened.
    #[error(transparent)]
    Receipts(#[from] crate::server::receipts::ReceiptLogError),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The ALPNs a role serves on its node endpoint.
pub fn role_alpns(role: Role) -> &'static [&'static [u8]] {
    match role {
        Role::Storage => &[ALPN_BLOB],
        _ => &[ALPN_CONTROL],
    }
}

/// A running node. Dropping it does not stop it: call [`RunningNode::shutdown`].
#[derive(Debug)]
pub struct RunningNode {
    role: Role,
    endpoint: Arc<HordeEndpoint>,
    cancel: CancellationToken,
    /// The role's tasks, the accept loop and its connections among them.
    tasks: RoleHandle,
    discovery: Option<Discovery>,
}

impl RunningNode {
    /// Loads the key, binds the endpoint and starts accepting.
    pub async fn start(config: NodeConfig) -> Result<Self, NodeError> {
        let key = SecretKey::read_key_file(&config.key_file)?;
        Self::start_with_key(config, key).await
    }

    /// Like [`RunningNode::start`] with a key already in memory.
    pub async fn start_with_key(config: NodeConfig, key: SecretKey) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        // Port 0 binds a free port once and the same port on later starts (executors, many to
        // a data dir and never named by peers, always take a fresh one).
        let earlier = (config.role != Role::Executor)
            .then(|| BoundAddrs::read(&config.data_dir))
            .flatten();
        let endpoint = bind_reusing(
            "listen",
            config.listen,
            earlier.map(|b| b.listen),
            |listen| {
                let mut endpoint_config = EndpointConfig::new(listen, role_alpns(config.role))
                    .with_max_connections(config.max_connections)
                    .with_max_connections_per_peer(config.max_connections_per_peer);
                if config.role == Role::Facilitator {
                    // The internet-facing entry point: unknown keys get a bounded share of its
                    // slots.
                    endpoint_config = endpoint_config.with_admission(
                        AdmissionLimits::for_max_connections(config.max_connections),
                    );
                }
                HordeEndpoint::bind(&key, endpoint_config)
            },
        )?;
        let endpoint = Arc::new(endpoint);
        let cancel = CancellationToken::new();
        let listen = endpoint.local_addr().map_err(|source| NodeError::DataDir {
            path: "listen address".to_owned(),
            source,
        })?;
        // Miners publish their free capacity; the miner is built first so it can be watched.
        let miner = match (config.role, &config.miner) {
            (Role::Miner, Some(miner_config)) => Some(Miner::new(
                key.clone(),
                miner_config.clone(),
                config.data_dir.clone(),
                ReceiptStore::open(&config.data_dir, config.receipts.max_log_bytes)?,
                listen,
                cancel.child_token(),
            )),
            (Role::Miner, None) => {
                return Err(NodeError::Config(
                    "role miner needs a [miner] section".to_owned(),
                ));
            }
            _ => None,
        };
        // Storage publishes its space the same way; its store is opened first for that too.
        let store = match config.role {
            Role::Storage => Some(Arc::new(
                BlobStore::open(&config.data_dir, config.storage.clone())
                    .map_err(NodeError::Blobs)?,
            )),
            _ => None,
        };
        let discovery = if config.discovery.enabled {
            let capacity = match (&miner, &store) {
                (Some(miner), _) => Some(miner.capacity_updates()),
                (None, Some(store)) => Some(store.capacity_updates()),
                (None, None) => None,
            };
            let local = LocalNode {
                role: config.role,
                addrs: vec![listen],
                capacity,
                state_dir: Some(config.data_dir.clone()),
            };
            let wanted = reuse(config.discovery.listen, earlier.and_then(|b| b.discovery));
            let reused = DiscoveryConfig {
                listen: wanted,
                ..config.discovery.clone()
            };
            let discovery = match Discovery::start(
                &key,
                local.clone(),
                &reused,
                cancel.child_token(),
            )
            .await
            {
                Err(DiscoveryError::Listen { message, .. })
                    if wanted != config.discovery.listen =>
                {
                    warn!(%wanted, %message, "discovery: the port bound last time is taken; binding a new one");
                    Discovery::start(&key, local, &config.discovery, cancel.child_token()).await?
                }
                started => started?,
            };
            info!(bootstrap = %discovery.bootstrap_addr(), "discovery listening");
            Some(discovery)
        } else {
            None
        };
        if config.role != Role::Executor {
            let bound = BoundAddrs {
                listen,
                discovery: discovery
                    .as_ref()
                    .and_then(|d| d.listen_addrs().first().copied()),
            };
            if let Err(error) = bound.write(&config.data_dir) {
                warn!(%error, "bound addresses not kept; a restart binds new ports");
            }
        }
        let directory = discovery.as_ref().map(|d| Arc::clone(d.directory()));
        let mut tasks = start_role(
            &config,
            &key,
            &endpoint,
            directory,
            miner,
            store,
            cancel.child_token(),
        )
        .await?;
        let service = tasks.service().clone();
        if let Service::Facilitator(facilitator) = &service {
            endpoint.set_known_keys(Arc::clone(facilitator) as Arc<dyn KnownKeys>);
        }
        let accepting = accept_loop(service, Arc::clone(&endpoint), tasks.cancel().child_token());
        tasks.spawn(accepting);
        Ok(Self {
            role: config.role,
            endpoint,
            cancel,
            tasks,
            discovery,
        })
    }

    /// Resolves when the role's own work ended (only executors end by themselves).
    pub async fn role_done(&self) {
        self.tasks.done().await;
    }

    /// The node's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The node's hotkey.
    pub fn hotkey(&self) -> Hotkey {
        self.endpoint.hotkey()
    }

    /// The QUIC address the node listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The node's discovery service, when it runs.
    pub fn discovery(&self) -> Option<&Discovery> {
        self.discovery.as_ref()
    }

    /// The node's endpoint (for dialing peers with the node's identity).
    pub fn endpoint(&self) -> &Arc<HordeEndpoint> {
        &self.endpoint
    }

    /// Stops accepting, closes every connection with [`codes::SHUTDOWN`] and waits for the
    /// node's tasks (connections and their streams, the role's own tasks: a miner's executors
    /// reaped, a facilitator's jobs ended, discovery stopped) and for the close to reach peers,
    /// bounded by a grace period.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        self.cancel.cancel();
        self.endpoint.close(codes::SHUTDOWN, b"node shutting down");
        self.tasks.shutdown(SHUTDOWN_GRACE).await;
        let rest = async {
            if let Some(discovery) = self.discovery {
                discovery.stopped().await;
            }
            self.endpoint.wait_idle().await;
        };
        if tokio::time::timeout_at(deadline, rest).await.is_err() {
            warn!("shutdown grace period over; not waiting for discovery and the endpoint");
        }
    }
}

/// Starts `config.role` under `cancel` (a child of the node's token): every role the same way,
/// `start(…) -> RoleHandle`. `miner` is the miner built before discovery started.
async fn start_role(
    config: &NodeConfig,
    key: &SecretKey,
    endpoint: &Arc<HordeEndpoint>,
    directory: Option<Arc<Directory>>,
    miner: Option<Arc<Miner>>,
    store: Option<Arc<BlobStore>>,
    cancel: CancellationToken,
) -> Result<RoleHandle, NodeError> {
    Ok(match config.role {
        Role::Facilitator => {
            let store = JobStore::open(&config.data_dir.join("jobs.redb"))?;
            let facilitator = config.facilitator.clone();
            let warm_up = if config.discovery.enabled {
                config.discovery.record_ttl
            } else {
                std::time::Duration::ZERO
            };
            Facilitator::start(
                Arc::clone(endpoint),
                store,
                facilitator,
                directory,
                warm_up,
                cancel,
            )
            .await?
        }
        Role::Validator => Validator::new(
            Arc::clone(endpoint),
            key.clone(),
            config.validator.clone(),
            directory,
            ReceiptStore::open(&config.data_dir, config.receipts.max_log_bytes)?,
            config.receipts.countersign_timeout,
            cancel,
        )
        .map_err(|e| NodeError::Config(e.to_string()))?
        .start(),
        Role::Miner => match miner {
            Some(miner) => miner.start(),
            None => RoleHandle::new(Role::Miner, Service::None, cancel),
        },
        Role::Storage => match store {
            Some(store) => storage::start(store, cancel),
            None => RoleHandle::new(Role::Storage, Service::None, cancel),
        },
        Role::Executor => {
            let executor_config = config.executor.clone().ok_or_else(|| {
                NodeError::Config("role executor needs an [executor] section".to_owned())
            })?;
            start_executor(endpoint, executor_config, config, cancel)
        }
        other => RoleHandle::new(other, Service::None, cancel),
    })
}

/// The executor role: its one task is [`executor::run`], which ends by itself when its miner
/// goes away (the node then stops, see [`RunningNode::role_done`]).
fn start_executor(
    endpoint: &Arc<HordeEndpoint>,
    executor_config: ExecutorConfig,
    config: &NodeConfig,
    cancel: CancellationToken,
) -> RoleHandle {
    let mut handle = RoleHandle::new(Role::Executor, Service::None, cancel.clone());
    let endpoint = Arc::clone(endpoint);
    let data_dir = config.data_dir.clone();
    let done = handle.done_token();
    handle.spawn(async move {
        if let Err(error) = executor::run(endpoint, executor_config, data_dir, cancel).await {
            warn!(%error, "executor stopped");
        }
        done.cancel();
    });
    handle
}

/// The node's accept loop: transport's one loop ([`HordeEndpoint::serve`]), each connection
/// handed to the role's service.
async fn accept_loop(service: Service, endpoint: Arc<HordeEndpoint>, cancel: CancellationToken) {
    endpoint
        .serve(&cancel, move |incoming, token| {
            handle_connection(
                service.clone(),
                incoming.connection,
                incoming.peer,
                incoming.alpn,
                token,
            )
        })
        .await;
}

async fn handle_connection(
    service: Service,
    connection: quinn::Connection,
    peer: Hotkey,
    alpn: Vec<u8>,
    cancel: CancellationToken,
) {
    debug!(alpn = %String::from_utf8_lossy(&alpn), "connection accepted");
    match (service, alpn.as_slice()) {
        (Service::Facilitator(facilitator), ALPN_CONTROL) => {
            facilitator.handle_connection(connection, peer).await;
        }
        (Service::Validator(validator), ALPN_CONTROL) => {
            validator.handle_connection(connection, peer).await;
        }
        (Service::Miner(miner), ALPN_CONTROL) => miner.handle_connection(connection, peer).await,
        (Service::Storage(store), ALPN_BLOB) => {
            storage::serve_connection(connection, store, cancel).await;
        }
        _ => {
            info!(%peer, "no service for this protocol; closing connection");
            connection.close(codes::NOT_ALLOWED, b"no service for this protocol");
        }
    }
}

/// Starts a node from its config, logs its identity and address, and runs until SIGINT or
/// SIGTERM, then shuts down cleanly.
pub async fn run_until_signal(config: NodeConfig) -> Result<(), NodeError> {
    let role = config.role;
    let node = RunningNode::start(config).await?;
    let addr = node
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    info!(%role, hotkey = %node.hotkey(), hex = %node.hotkey().to_hex(), listen = %addr, "horde node started");
    tokio::select! {
        () = wait_for_signal() => info!("signal received; shutting down"),
        () = node.role_done() => info!("role finished; shutting down"),
    }
    node.shutdown().await;
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            warn!(%error, "cannot listen for SIGTERM; waiting for ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
