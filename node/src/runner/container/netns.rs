//! How the executor reaches a job's port without publishing it anywhere: a thread of the
//! executor enters the job's network namespace and makes sockets there.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life,
//! whichever thread uses it later. So one dedicated thread per job moves into the container's
//! namespace (`setns`, through `/proc/<pid>/ns/net` of the container's first process) and
//! answers requests on a bounded channel: "a new, unconnected TCP socket" (the tokio side then
//! connects it to `127.0.0.1:PORT` asynchronously, so a slow connect never blocks the thread)
//! and, once, "a listener on `127.0.0.1:OUTPUTS_PORT`" for the job's `HORDE_EXECUTOR_URL`.
//! Nothing is bound on the host's loopback: no other job and no other local process can reach
//! the job's port or the outputs endpoint; only this executor holds sockets inside.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd as _;

use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the namespace thread: connects are quick (one `socket()` each), so a
/// few dozen cover a burst of tunnel streams opening at once.
const REQUEST_QUEUE: usize = 64;

enum Request {
    /// A new TCP socket, not yet connected.
    Socket(oneshot::Sender<io::Result<socket2::Socket>>),
    /// A listener on `127.0.0.1:port`.
    Listen(u16, oneshot::Sender<io::Result<std::net::TcpListener>>),
}

/// A thread inside one job's network namespace. Dropping every handle ends the thread.
#[derive(Debug, Clone)]
pub(crate) struct NetnsHandle {
    requests: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(_) => f.write_str("Socket"),
            Self::Listen(port, _) => write!(f, "Listen({port})"),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the job's network namespace thread is gone",
    )
}

impl NetnsHandle {
    /// Starts a thread in the network namespace `namespace` (an open `/proc/<pid>/ns/net`).
    /// Returns once the thread is inside it.
    pub(crate) async fn enter(namespace: File, name: String) -> io::Result<Self> {
        let (requests, inbox) = mpsc::channel(REQUEST_QUEUE);
        let (entered, entered_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(namespace, inbox, entered))?;
        entered_rx.await.map_err(|_| gone())??;
        Ok(Self { requests })
    }

    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Request,
    ) -> io::Result<T> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(request(reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// A connection to `127.0.0.1:port` inside the namespace.
    pub(crate) async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let socket = self.ask(Request::Socket).await?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket
            .connect(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
            .await
    }

    /// A listener on `127.0.0.1:port` inside the namespace.
    pub(crate) async fn listen(&self, port: u16) -> io::Result<tokio::net::TcpListener> {
        let listener = self.ask(|reply| Request::Listen(port, reply)).await?;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    }
}

/// The namespace thread: enter, report, then make sockets until every handle is dropped.
fn serve(
    namespace: File,
    mut inbox: mpsc::Receiver<Request>,
    entered: oneshot::Sender<io::Result<()>>,
) {
    let result = rustix::thread::move_into_link_name_space(
        namespace.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(io::Error::from);
    drop(namespace);
    let failed = result.is_err();
    if entered.send(result).is_err() || failed {
        return;
    }
    while let Some(request) = inbox.blocking_recv() {
        match request {
            Request::Socket(reply) => {
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .and_then(|socket| socket.set_nonblocking(true).map(|()| socket));
                let _ = reply.send(socket);
            }
            Request::Listen(port, reply) => {
                let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
                let _ = reply.send(std::net::TcpListener::bind(address));
            }
        }
    }
}
