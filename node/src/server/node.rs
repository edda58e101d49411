//! Node start-up and shutdown: load the hotkey, bind the QUIC endpoint for the role, accept
//! connections and hand them to the role, stop cleanly on a signal.

use std::net::SocketAddr;
use std::sync::Arc;

use horde_protocol::{Hotkey, Role, SecretKey};
use horde_transport::{ALPN_BLOB, ALPN_CONTROL, EndpointConfig, HordeEndpoint, codes};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::server::config::NodeConfig;
use crate::server::discovery::{Discovery, DiscoveryError, LocalNode};
use crate::server::executor;
use crate::server::facilitator::Facilitator;
use crate::server::facilitator::store::{JobStore, JobStoreError};
use crate::server::miner::Miner;
use crate::server::receipts::ReceiptStore;
use crate::server::storage::BlobStore;
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

/// The service a role runs on incoming connections.
#[derive(Debug, Clone)]
enum Service {
    Facilitator(Arc<Facilitator>),
    Validator(Arc<Validator>),
    Miner(Arc<Miner>),
    Storage(Arc<BlobStore>),
    /// Executors dial their miner; they accept nothing.
    None,
}

/// A running node. Dropping it does not stop it: call [`RunningNode::shutdown`].
#[derive(Debug)]
pub struct RunningNode {
    role: Role,
    endpoint: Arc<HordeEndpoint>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    service: Service,
    /// Cancelled when the role's own work ends (an executor whose miner went away).
    role_done: CancellationToken,
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
        let endpoint_config = EndpointConfig::new(config.listen, role_alpns(config.role))
            .with_max_connections(config.max_connections)
            .with_max_connections_per_peer(config.max_connections_per_peer);
        let endpoint = Arc::new(HordeEndpoint::bind(&key, endpoint_config)?);
        let cancel = CancellationToken::new();
        let role_done = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let listen = endpoint.local_addr().map_err(|source| NodeError::DataDir {
            path: "listen address".to_owned(),
            source,
        })?;
        // Miners publish their free capacity; the service is built first so it can be watched.
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
        let discovery = if config.discovery.enabled {
            let local = LocalNode {
                role: config.role,
                addrs: vec![listen],
                capacity: miner.as_ref().map(|m| m.capacity_updates()),
            };
            let discovery =
                Discovery::start(&key, local, &config.discovery, cancel.child_token()).await?;
            info!(bootstrap = %discovery.bootstrap_addr(), "discovery listening");
            Some(discovery)
        } else {
            None
        };
        let directory = discovery.as_ref().map(|d| Arc::clone(d.directory()));
        let service = match config.role {
            Role::Facilitator => {
                let store = JobStore::open(&config.data_dir.join("jobs.redb"))?;
                Service::Facilitator(
                    Facilitator::start(
                        Arc::clone(&endpoint),
                        store,
                        config.facilitator.clone(),
                        directory,
                        cancel.child_token(),
                    )
                    .await?,
                )
            }
            Role::Validator => Service::Validator(
                Validator::new(
                    Arc::clone(&endpoint),
                    key.clone(),
                    config.validator.clone(),
                    directory,
                    ReceiptStore::open(&config.data_dir, config.receipts.max_log_bytes)?,
                    config.receipts.countersign_timeout,
                    cancel.child_token(),
                )
                .map_err(|e| NodeError::Config(e.to_string()))?,
            ),
            Role::Miner => match miner {
                Some(miner) => {
                    miner.prewarm();
                    Service::Miner(miner)
                }
                None => Service::None,
            },
            Role::Storage => Service::Storage(Arc::new(
                BlobStore::open(&config.data_dir, config.storage.clone())
                    .map_err(NodeError::Blobs)?,
            )),
            Role::Executor => {
                let executor_config = config.executor.clone().ok_or_else(|| {
                    NodeError::Config("role executor needs an [executor] section".to_owned())
                })?;
                let endpoint = Arc::clone(&endpoint);
                let data_dir = config.data_dir.clone();
                let cancel = cancel.child_token();
                let done = role_done.clone();
                tasks.spawn(async move {
                    if let Err(error) =
                        executor::run(endpoint, executor_config, data_dir, cancel).await
                    {
                        warn!(%error, "executor stopped");
                    }
                    done.cancel();
                });
                Service::None
            }
            _ => Service::None,
        };
        tasks.spawn(accept_loop(
            service.clone(),
            Arc::clone(&endpoint),
            cancel.child_token(),
        ));
        Ok(Self {
            role: config.role,
            endpoint,
            cancel,
            tasks,
            service,
            role_done,
            discovery,
        })
    }

    /// Resolves when the role's own work ended (only executors end by themselves).
    pub async fn role_done(&self) {
        self.role_done.cancelled().await;
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
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Service::Miner(miner) = &self.service {
            miner.kill_executors();
        }
        self.endpoint.close(codes::SHUTDOWN, b"node shutting down");
        let discovery = self.discovery.take();
        let drain = async {
            while self.tasks.join_next().await.is_some() {}
            match &self.service {
                // Killed above, at the start of the shutdown.
                Service::Miner(miner) => miner.wait_for_executors().await,
                Service::Facilitator(facilitator) => facilitator.wait_for_jobs().await,
                _ => {}
            }
            if let Some(discovery) = discovery {
                discovery.stopped().await;
            }
            self.endpoint.wait_idle().await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!("shutdown grace period over; aborting remaining tasks");
            self.tasks.abort_all();
        }
    }
}

async fn accept_loop(service: Service, endpoint: Arc<HordeEndpoint>, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = endpoint.accept() => accepted,
        };
        let Some(accepted) = accepted else { break };
        let (connection, peer, alpn) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "incoming connection failed");
                continue;
            }
        };
        let span =
            info_span!("peer", peer = %peer.fmt_short(), remote = %connection.remote_address());
        connections.spawn(
            handle_connection(
                service.clone(),
                connection,
                peer,
                alpn,
                cancel.child_token(),
            )
            .instrument(span),
        );
    }
    // Each connection ends with its streams, which end on the role's cancellation or with the
    // endpoint's close; the node's shutdown bounds the wait.
    while connections.join_next().await.is_some() {}
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
            crate::server::storage::serve_connection(connection, store, cancel).await;
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
