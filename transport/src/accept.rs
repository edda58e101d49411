//! The accept loop: every authenticated incoming connection of a [`HordeEndpoint`] handed to a
//! handler on a task of its own, owned by the loop.
//!
//! [`serve_connections`] (also [`HordeEndpoint::serve`]) keeps one task per connection in a
//! [`JoinSet`], each with a child of the loop's cancellation token and a tracing span naming the
//! peer. When `cancel` fires the loop stops accepting, cancels the handlers' tokens, lets them
//! end for up to its `grace`, then closes the connections still open with
//! [`codes::SHUTDOWN`] and aborts their tasks. Nothing outlives the call.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info_span};

use crate::codes;
use crate::endpoint::{HordeEndpoint, IncomingConnection};

/// How long [`HordeEndpoint::serve`] lets the handlers end on their own after cancellation
/// before it closes their connections: a stream in flight (a blob piece, a job message) gets a
/// moment to finish, a stuck one holds shutdown up for no longer than this.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Accepts connections on `endpoint` until `cancel` fires or the endpoint closes, and runs
/// `handler(connection, token)` for each on a task owned here; `token` is a child of `cancel`.
///
/// At shutdown the handlers' tokens are cancelled first; those still running after `grace` have
/// their connection closed with [`codes::SHUTDOWN`] and are aborted. Returns once every task
/// has ended. Dropping the future aborts the tasks (their connections then close when the last
/// handle to them is dropped).
pub async fn serve_connections<H, Fut>(
    endpoint: &HordeEndpoint,
    cancel: &CancellationToken,
    grace: Duration,
    mut handler: H,
) where
    H: FnMut(IncomingConnection, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let children = cancel.child_token();
    let mut tasks = JoinSet::new();
    // The connection of every running task, to close it if the task outlives the grace.
    let mut open = HashMap::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(ended) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                open.remove(&task_id(&ended));
                continue;
            }
            accepted = endpoint.accept() => accepted,
        };
        let incoming = match accepted {
            None => break,
            Some(Ok(incoming)) => incoming,
            Some(Err(error)) => {
                debug!(%error, "incoming connection failed");
                continue;
            }
        };
        let span = info_span!(
            "peer",
            peer = %incoming.peer.fmt_short(),
            remote = %incoming.connection.remote_address()
        );
        let connection = incoming.connection.clone();
        let task = tasks.spawn(handler(incoming, children.child_token()).instrument(span));
        open.insert(task.id(), connection);
    }
    children.cancel();
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            () = &mut deadline => break,
            ended = tasks.join_next_with_id() => match ended {
                Some(ended) => {
                    open.remove(&task_id(&ended));
                }
                None => break,
            },
        }
    }
    for connection in open.values() {
        connection.close(codes::SHUTDOWN, b"shutting down");
    }
    tasks.shutdown().await;
}

fn task_id(ended: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match ended {
        Ok((id, ())) => *id,
        Err(error) => error.id(),
    }
}

impl HordeEndpoint {
    /// [`serve_connections`] on this endpoint with [`DEFAULT_SHUTDOWN_GRACE`].
    pub async fn serve<H, Fut>(&self, cancel: &CancellationToken, handler: H)
    where
        H: FnMut(IncomingConnection, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        serve_connections(self, cancel, DEFAULT_SHUTDOWN_GRACE, handler).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::mpsc;

    use horde_protocol::Hotkey;

    use super::*;
    use crate::test_utils::{localhost_endpoint, seeded_key};
    use crate::tls::ALPN_CONTROL;

    /// A server endpoint and a client endpoint that trusts it.
    fn endpoints() -> (Arc<HordeEndpoint>, HordeEndpoint, Hotkey) {
        let server_key = seeded_key(50);
        let server = Arc::new(localhost_endpoint(&server_key));
        (
            server,
            localhost_endpoint(&seeded_key(51)),
            server_key.hotkey(),
        )
    }

    #[tokio::test]
    async fn hands_each_connection_over_and_cancels_handlers_at_shutdown() {
        let (server, client, server_hotkey) = endpoints();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let (seen, mut seen_rx) = mpsc::channel(4);
        let ended = Arc::new(AtomicUsize::new(0));
        let serving = tokio::spawn({
            let (server, cancel, ended) = (Arc::clone(&server), cancel.clone(), Arc::clone(&ended));
            async move {
                server
                    .serve(&cancel, move |incoming, token| {
                        let (seen, ended) = (seen.clone(), Arc::clone(&ended));
                        async move {
                            let _ = seen.send((incoming.peer, incoming.alpn)).await;
                            // A well-behaved handler ends on its token.
                            token.cancelled().await;
                            ended.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                    .await;
            }
        });
        let mut connections = Vec::new();
        for _ in 0..2 {
            let connection = client
                .connect(addr, &server_hotkey, ALPN_CONTROL)
                .await
                .unwrap();
            let (peer, alpn) = seen_rx.recv().await.unwrap();
            assert_eq!(peer, seeded_key(51).hotkey());
            assert_eq!(alpn, ALPN_CONTROL);
            connections.push(connection);
        }
        cancel.cancel();
        serving.await.unwrap();
        assert_eq!(ended.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_handler_that_ignores_cancellation_is_closed_with_shutdown_after_the_grace() {
        let (server, client, server_hotkey) = endpoints();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let (started, mut started_rx) = mpsc::channel(1);
        let serving = tokio::spawn({
            let (server, cancel) = (Arc::clone(&server), cancel.clone());
            async move {
                serve_connections(&server, &cancel, Duration::from_millis(200), move |_, _| {
                    let started = started.clone();
                    async move {
                        let _ = started.send(()).await;
                        std::future::pending::<()>().await;
                    }
                })
                .await;
            }
        });
        let connection = client
            .connect(addr, &server_hotkey, ALPN_CONTROL)
            .await
            .unwrap();
        started_rx.recv().await.unwrap();
        let cancelled_at = tokio::time::Instant::now();
        cancel.cancel();
        serving.await.unwrap();
        assert!(cancelled_at.elapsed() >= Duration::from_millis(200));
        match connection.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, codes::SHUTDOWN);
            }
            other => panic!("closed by {other}"),
        }
    }

    #[tokio::test]
    async fn ends_when_the_endpoint_closes() {
        let (server, _client, _) = endpoints();
        let cancel = CancellationToken::new();
        let serving = tokio::spawn({
            let (server, cancel) = (Arc::clone(&server), cancel.clone());
            async move { server.serve(&cancel, |_, _| async {}).await }
        });
        server.close(codes::SHUTDOWN, b"done");
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the loop ends with its endpoint")
            .unwrap();
    }
}
