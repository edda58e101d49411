//! Outgoing connections shared between jobs: one QUIC connection per peer and protocol, reused
//! by every job session to that peer (each session is its own stream), re-dialed once closed.

use std::collections::HashMap;
use std::sync::Arc;

use horde_protocol::{Hotkey, NodeAddr};
use horde_transport::HordeEndpoint;
use tokio::sync::Mutex;

/// A cache of live connections, keyed by peer hotkey and ALPN.
#[derive(Debug)]
pub(crate) struct Peers {
    endpoint: Arc<HordeEndpoint>,
    connections: Mutex<HashMap<(Hotkey, Vec<u8>), quinn::Connection>>,
}

impl Peers {
    /// A cache dialing with `endpoint`'s identity.
    pub(crate) fn new(endpoint: Arc<HordeEndpoint>) -> Self {
        Self {
            endpoint,
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// A live connection to `node` on `alpn`: the cached one, or a new dial over its addresses.
    ///
    /// The lock is held while dialing so concurrent jobs to one peer share a single handshake.
    pub(crate) async fn connect(
        &self,
        node: &NodeAddr,
        alpn: &[u8],
    ) -> Result<quinn::Connection, String> {
        let key = (node.hotkey, alpn.to_vec());
        let mut connections = self.connections.lock().await;
        if let Some(connection) = connections.get(&key) {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
            connections.remove(&key);
        }
        let mut last = String::from("no address");
        for addr in &node.addrs {
            match self.endpoint.connect(*addr, &node.hotkey, alpn).await {
                Ok(connection) => {
                    connections.insert(key, connection.clone());
                    return Ok(connection);
                }
                Err(error) => last = format!("{addr}: {error}"),
            }
        }
        Err(last)
    }
}
