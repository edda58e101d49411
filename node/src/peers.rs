//! Connections between roles: outgoing ones shared between jobs (one QUIC connection per peer and
//! protocol, reused by every job session to that peer, re-dialed once closed), and the loop that
//! serves the streams of incoming ones.

use std::collections::HashMap;
use std::sync::Arc;

use horde_protocol::{ControlMessage, Hotkey, NodeAddr};
use horde_transport::{FramedRecv, FramedSend, HordeEndpoint, accept_stream, split};
use tokio::sync::Mutex;
use tracing::Instrument as _;

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

/// A one-shot exchange on a stream of its own: opens a stream on `connection`, sends `message`,
/// finishes, and returns the peer's single answer. The caller bounds it with a timeout.
pub(crate) async fn request(
    connection: &quinn::Connection,
    message: &ControlMessage,
) -> Result<ControlMessage, String> {
    let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = split(send, recv);
    send.send(message).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    match recv.recv::<ControlMessage>().await {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err("the peer ended the stream without an answer".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// Accepts the streams of an incoming connection until it closes or `cancel` fires, and runs
/// `handle(send, recv, first message)` for each on its own task (in the current span), so one
/// slow job never holds up another.
pub(crate) async fn serve_streams<F, Fut>(
    connection: &quinn::Connection,
    cancel: &tokio_util::sync::CancellationToken,
    handle: F,
) where
    F: Fn(FramedSend, FramedRecv, ControlMessage) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            accepted = accept_stream(connection) => accepted,
        };
        match accepted {
            Ok(Some((send, recv, first))) => {
                tokio::spawn(handle(send, recv, first).in_current_span());
            }
            Ok(None) => return,
            // A dead connection fails every accept: stop, rather than spin on it.
            Err(_) if connection.close_reason().is_some() => return,
            Err(error) => tracing::debug!(%error, "incoming stream failed"),
        }
    }
}
