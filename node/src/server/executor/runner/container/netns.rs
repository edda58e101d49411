//! How the executor reaches a job's port without publishing it anywhere: a thread of the
//! executor enters the job's network namespace and makes sockets there.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life,
//! whichever thread uses it later. So one dedicated thread per job moves into the container's
//! namespace (`setns`, through `/proc/<pid>/ns/net` of the container's first process), binds the
//! listener of the job's `HORDE_EXECUTOR_URL` on `127.0.0.1:OUTPUTS_PORT` there, then keeps a
//! few spare unconnected TCP sockets ready on a bounded channel, making another whenever one is
//! taken. A tunnel connection takes a spare and connects it to `127.0.0.1:PORT` from the tokio
//! side, asynchronously; the thread's only work is `socket()`, off the connection's path.
//! Nothing is bound on the host's loopback: no other job and no other local process can reach
//! the job's port or the outputs endpoint; only this executor holds sockets inside. The thread
//! ends when the last handle is dropped.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd as _;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

/// Spare sockets kept ready: a burst of this many tunnel streams opening at once pays no wait
/// for the thread (each costs one file descriptor while it waits).
const SPARE_SOCKETS: usize = 8;

type Spare = io::Result<socket2::Socket>;

/// Sockets made inside one job's network namespace.
#[derive(Debug, Clone)]
pub(crate) struct NetnsHandle {
    spares: Arc<Mutex<mpsc::Receiver<Spare>>>,
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the job's network namespace thread is gone",
    )
}

impl NetnsHandle {
    /// Starts a thread in the network namespace `namespace` (an open `/proc/<pid>/ns/net`) and
    /// returns once it is inside, with a listener on `127.0.0.1:outputs_port` made there.
    pub(crate) async fn enter(
        namespace: File,
        name: String,
        outputs_port: u16,
    ) -> io::Result<(Self, tokio::net::TcpListener)> {
        let (spares_tx, spares) = mpsc::channel(SPARE_SOCKETS);
        let (entered, entered_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(namespace, outputs_port, entered, spares_tx))?;
        let listener = entered_rx.await.map_err(|_| gone())??;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let handle = Self {
            spares: Arc::new(Mutex::new(spares)),
        };
        Ok((handle, listener))
    }

    /// A connection to `127.0.0.1:port` inside the namespace.
    pub(crate) async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let socket = self.spares.lock().await.recv().await.ok_or_else(gone)??;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        socket
            .connect(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
            .await
    }
}

/// The namespace thread: enter, bind the outputs listener, report, then keep spare sockets
/// ready until every handle is dropped.
fn serve(
    namespace: File,
    outputs_port: u16,
    entered: oneshot::Sender<io::Result<std::net::TcpListener>>,
    spares: mpsc::Sender<Spare>,
) {
    let inside = rustix::thread::move_into_link_name_space(
        namespace.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(io::Error::from);
    drop(namespace);
    let listener = inside.and_then(|()| {
        std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, outputs_port))
    });
    let failed = listener.is_err();
    if entered.send(listener).is_err() || failed {
        return;
    }
    loop {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .and_then(|socket| socket.set_nonblocking(true).map(|()| socket));
        if spares.blocking_send(socket).is_err() {
            return;
        }
    }
}
