//! The bridge between an executor and its job's sandbox: one Unix `SOCK_SEQPACKET` socket pair.
//!
//! Inside the sandbox, bubblewrap runs `horde sandbox-init` ([`sandbox_init`]), which holds
//! one end (as its stdout). It binds the outputs listener on `127.0.0.1` inside the job's
//! network namespace, starts the job as its child, and then:
//! - on a connect request from the executor, connects to `127.0.0.1:HORDE_JOB_PORT` and sends
//!   the connected socket back as a file descriptor (`SCM_RIGHTS`);
//! - passes each connection the job opens to `HORDE_EXECUTOR_URL` to the executor the same way;
//! - reports the job's exit status and exits with it (bubblewrap's pid 1 then takes everything
//!   left in the sandbox's pid namespace with it);
//! - stops the job when the executor asks, and kills it when the executor's end closes (the
//!   executor is gone).
//!
//! The executor thus talks to the job's own sockets: no copy hop, no host port, no path on a
//! filesystem another job could open.
//!
//! Messages (one datagram each; integers little-endian):
//!
//! | from | tag | body | ancillary |
//! |---|---|---|---|
//! | init | `H` hello | outputs port `u16` | `SCM_CREDENTIALS` (its pid, as the executor sees it) |
//! | executor | `G` go | – | the job's stdout file |
//! | init | `S` started / `F` failed | – / the reason (UTF-8) | – |
//! | executor | `C` connect | request id `u64` | – |
//! | init | `c` connected / `e` refused | request id `u64` / + errno `i32` | the socket (`c`) |
//! | init | `o` outputs connection | – | the socket |
//! | executor | `T` terminate | – | – |
//! | init | `x` exited | code `i32`, signal `i32` (`i32::MIN` = none) | – |

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::sync::Arc;

use async_trait::async_trait;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, UCred,
};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{EXECUTOR_URL_ENV, JobDialer, JobExit, OUTPUT_DIR};

/// The hidden `horde` subcommand that bubblewrap runs inside the sandbox.
pub const SANDBOX_INIT_SUBCOMMAND: &str = "sandbox-init";

/// Longest message: a spawn failure's reason, cut to fit.
const MAX_MESSAGE: usize = 1024;
/// "No value" in the exit message's code and signal fields.
const NONE: i32 = i32::MIN;
/// Connect requests waiting for the bridge at once: tunnel streams and probes beyond it wait
/// for a slot (each request is answered in microseconds on loopback).
const CONNECT_QUEUE: usize = 64;
/// Connections the job opened to its executor URL not yet taken by the executor; more are
/// closed (a job that opens that many at once is misbehaving).
const OUTPUTS_QUEUE: usize = 16;

/// One datagram received, with what came beside it.
#[derive(Debug, Default)]
pub(crate) struct Datagram {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) pid: Option<i32>,
}

/// One end of the bridge's socket pair, non-blocking, driven by the runtime. (A
/// `SOCK_SEQPACKET` socket, held as tokio's `UnixStream` only for its readiness: every read
/// and write goes through `recvmsg`/`sendmsg`.)
#[derive(Debug)]
pub(crate) struct Channel {
    fd: tokio::net::UnixStream,
}

impl Channel {
    /// Wraps `fd` (a `SOCK_SEQPACKET` socket), making it non-blocking.
    pub(crate) fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let socket = std::os::unix::net::UnixStream::from(fd);
        socket.set_nonblocking(true)?;
        Ok(Self {
            fd: tokio::net::UnixStream::from_std(socket)?,
        })
    }

    /// Sends one datagram with `fds` and, when `credentials`, this process's credentials.
    pub(crate) async fn send(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        credentials: bool,
    ) -> std::io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, || {
                let fd = self.fd.as_fd();
                let mut space =
                    [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1), ScmCredentials(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(std::io::Error::other(
                        "too many descriptors for one message",
                    ));
                }
                if credentials {
                    let ucred = UCred {
                        pid: rustix::process::getpid(),
                        uid: rustix::process::getuid(),
                        gid: rustix::process::getgid(),
                    };
                    control.push(SendAncillaryMessage::ScmCredentials(ucred));
                }
                rustix::net::sendmsg(
                    fd,
                    &[IoSlice::new(bytes)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map(drop)
                .map_err(std::io::Error::from)
            })
            .await
    }

    /// The next datagram; `None` once the other end has closed.
    pub(crate) async fn recv(&self) -> std::io::Result<Option<Datagram>> {
        self.fd
            .async_io(Interest::READABLE, || {
                let fd = self.fd.as_fd();
                let mut bytes = vec![0u8; MAX_MESSAGE];
                let mut space =
                    [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2), ScmCredentials(1))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let received = rustix::net::recvmsg(
                    fd,
                    &mut [IoSliceMut::new(&mut bytes)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )?;
                let mut datagram = Datagram::default();
                for message in control.drain() {
                    match message {
                        RecvAncillaryMessage::ScmRights(fds) => datagram.fds.extend(fds),
                        RecvAncillaryMessage::ScmCredentials(ucred) => {
                            datagram.pid = Some(ucred.pid.as_raw_nonzero().get());
                        }
                        _ => {}
                    }
                }
                if received.bytes == 0 {
                    // A seqpacket socket reads 0 only at the end (we never send empty messages).
                    return Ok(None);
                }
                bytes.truncate(received.bytes.min(MAX_MESSAGE));
                datagram.bytes = bytes;
                Ok(Some(datagram))
            })
            .await
    }
}

/// A TCP socket received as a file descriptor, as a tokio stream.
fn tcp_from_fd(fd: OwnedFd) -> std::io::Result<TcpStream> {
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------------
// Executor side
// ---------------------------------------------------------------------------------------------

type ConnectReply = oneshot::Sender<std::io::Result<TcpStream>>;

/// The executor's handle on a running sandbox's bridge (its actor runs until the sandbox's end
/// of the socket closes, or this handle is dropped).
#[derive(Debug)]
pub(crate) struct BridgeHandle {
    dialer: Arc<BridgeDialer>,
    terminate: mpsc::Sender<()>,
    outputs: mpsc::Receiver<TcpStream>,
    exit: oneshot::Receiver<JobExit>,
    actor: tokio::task::JoinHandle<()>,
}

impl Drop for BridgeHandle {
    fn drop(&mut self) {
        self.actor.abort();
    }
}

impl BridgeHandle {
    /// Runs the bridge over `channel`, once the sandbox has said its job started.
    pub(crate) fn start(channel: Channel) -> Self {
        let (requests_tx, requests) = mpsc::channel(CONNECT_QUEUE);
        let (terminate, terminate_rx) = mpsc::channel(1);
        let (outputs_tx, outputs) = mpsc::channel(OUTPUTS_QUEUE);
        let (exit_tx, exit) = oneshot::channel();
        let actor = tokio::spawn(bridge_actor(
            channel,
            requests,
            terminate_rx,
            outputs_tx,
            exit_tx,
        ));
        Self {
            dialer: Arc::new(BridgeDialer {
                requests: requests_tx,
            }),
            terminate,
            outputs,
            exit,
            actor,
        }
    }

    pub(crate) fn dialer(&self) -> Arc<dyn JobDialer> {
        self.dialer.clone()
    }

    /// The next connection the job opened to its executor URL. Cancel-safe.
    pub(crate) async fn accept_outputs(&mut self) -> std::io::Result<TcpStream> {
        match self.outputs.recv().await {
            Some(stream) => Ok(stream),
            None => std::future::pending().await,
        }
    }

    /// Asks the init to send SIGTERM to the job's process group.
    pub(crate) fn terminate(&self) {
        let _ = self.terminate.try_send(());
    }

    /// The exit the init reported, once the bridge has ended (`None` if it never said).
    /// Cancel-safe.
    pub(crate) async fn reported_exit(&mut self) -> Option<JobExit> {
        (&mut self.exit).await.ok()
    }
}

/// Opens connections to the job's port through the bridge.
#[derive(Debug)]
struct BridgeDialer {
    requests: mpsc::Sender<ConnectReply>,
}

#[async_trait]
impl JobDialer for BridgeDialer {
    async fn connect(&self) -> std::io::Result<TcpStream> {
        let (reply, answer) = oneshot::channel();
        let gone = || std::io::Error::new(std::io::ErrorKind::NotConnected, "the job has ended");
        self.requests.send(reply).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn bridge_actor(
    channel: Channel,
    mut requests: mpsc::Receiver<ConnectReply>,
    mut terminate: mpsc::Receiver<()>,
    outputs: mpsc::Sender<TcpStream>,
    exit: oneshot::Sender<JobExit>,
) {
    let mut pending: HashMap<u64, ConnectReply> = HashMap::new();
    let mut next_id = 0u64;
    let mut exit = Some(exit);
    loop {
        tokio::select! {
            received = channel.recv() => {
                let datagram = match received {
                    Ok(Some(datagram)) => datagram,
                    Ok(None) | Err(_) => break,
                };
                let Datagram { bytes, mut fds, .. } = datagram;
                match bytes.first() {
                    Some(b'c') => {
                        let stream = fds.pop().ok_or_else(|| std::io::Error::other("no socket")).and_then(tcp_from_fd);
                        if let Some(reply) = u64_at(&bytes, 1).and_then(|id| pending.remove(&id)) {
                            let _ = reply.send(stream);
                        }
                    }
                    Some(b'e') => {
                        let errno = i32_at(&bytes, 9).unwrap_or(0);
                        if let Some(reply) = u64_at(&bytes, 1).and_then(|id| pending.remove(&id)) {
                            let _ = reply.send(Err(std::io::Error::from_raw_os_error(errno)));
                        }
                    }
                    Some(b'o') => {
                        if let Some(stream) = fds.pop().map(tcp_from_fd).and_then(Result::ok) {
                            // Full: the job opened more connections than it waits on; close this one.
                            let _ = outputs.try_send(stream);
                        }
                    }
                    Some(b'x') => {
                        let field = |at| i32_at(&bytes, at).filter(|value| *value != NONE);
                        if let Some(exit) = exit.take() {
                            let _ = exit.send(JobExit { code: field(1), signal: field(5), out_of_memory: false });
                        }
                    }
                    _ => {}
                }
            }
            Some(reply) = requests.recv() => {
                let id = next_id;
                next_id += 1;
                let mut message = vec![b'C'];
                message.extend_from_slice(&id.to_le_bytes());
                match channel.send(&message, &[], false).await {
                    Ok(()) => {
                        pending.insert(id, reply);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            Some(()) = terminate.recv() => {
                let _ = channel.send(b"T", &[], false).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sandbox side
// ---------------------------------------------------------------------------------------------

/// What `horde sandbox-init` is told on its command line.
#[derive(Debug, Clone)]
pub struct SandboxInitArgs {
    /// The job's port (inside the sandbox's network namespace).
    pub port: u16,
    /// Drop to this uid (and gid) first: set when bubblewrap ran as root.
    pub uid: Option<u32>,
    /// `RLIMIT_AS` for the job, when no memory cgroup could be had.
    pub address_space: Option<u64>,
    /// The job's program.
    pub program: std::ffi::OsString,
    /// Its arguments.
    pub args: Vec<std::ffi::OsString>,
}

/// `horde sandbox-init`: runs inside the sandbox, with the bridge's socket as stdout. Returns
/// the exit code the init ends with (the job's, or 128 + its signal).
pub fn sandbox_init(args: SandboxInitArgs) -> std::io::Result<i32> {
    // Drop privileges before anything else, while this is the only thread: the setters change
    // the calling thread's credentials.
    if let Some(uid) = args.uid {
        drop_privileges(uid)?;
    }
    let control = rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_init(args, control))
}

fn drop_privileges(uid: u32) -> std::io::Result<()> {
    let (uid, gid) = (
        rustix::process::Uid::from_raw(uid),
        rustix::process::Gid::from_raw(uid),
    );
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid, gid, gid)?;
    rustix::thread::set_thread_res_uid(uid, uid, uid)?;
    if rustix::process::getuid() != uid || rustix::process::geteuid() != uid {
        return Err(std::io::Error::other("could not drop to the job's uid"));
    }
    Ok(())
}

async fn run_init(args: SandboxInitArgs, control: OwnedFd) -> std::io::Result<i32> {
    let channel = Channel::new(control)?;
    let outputs = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let outputs_port = outputs.local_addr()?.port();
    let mut hello = vec![b'H'];
    hello.extend_from_slice(&outputs_port.to_le_bytes());
    channel.send(&hello, &[], true).await?;
    // Go: the executor has put this process in the job's cgroups, and hands over the stdout log.
    let stdout = match channel.recv().await? {
        Some(Datagram { bytes, mut fds, .. }) if bytes.first() == Some(&b'G') => fds.pop(),
        _ => return Ok(1),
    };
    if let Some(bytes) = args.address_space {
        let limit = rustix::process::Rlimit {
            current: Some(bytes),
            maximum: Some(bytes),
        };
        rustix::process::setrlimit(rustix::process::Resource::As, limit)?;
    }
    let mut command = tokio::process::Command::new(&args.program);
    command
        .args(&args.args)
        .env(EXECUTOR_URL_ENV, format!("http://127.0.0.1:{outputs_port}"))
        .current_dir(OUTPUT_DIR)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(stdout) = stdout {
        command.stdout(std::process::Stdio::from(stdout));
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let mut message = b"F".to_vec();
            let reason = error.to_string();
            let cut = reason.len().min(MAX_MESSAGE - 1);
            message.extend_from_slice(&reason.as_bytes()[..cut]);
            channel.send(&message, &[], false).await?;
            return Ok(127);
        }
    };
    drop(command);
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw);
    let kill_group = |signal| {
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, signal);
        }
    };
    channel.send(b"S", &[], false).await?;
    loop {
        tokio::select! {
            status = child.wait() => {
                let exit = JobExit::from_status(status?);
                let mut message = vec![b'x'];
                message.extend_from_slice(&exit.code.unwrap_or(NONE).to_le_bytes());
                message.extend_from_slice(&exit.signal.unwrap_or(NONE).to_le_bytes());
                let _ = channel.send(&message, &[], false).await;
                kill_group(rustix::process::Signal::KILL);
                return Ok(exit.code.unwrap_or_else(|| 128 + exit.signal.unwrap_or(0)));
            }
            received = channel.recv() => match received {
                Ok(Some(Datagram { bytes, .. })) => match bytes.first() {
                    Some(b'C') => {
                        let id = u64_at(&bytes, 1).unwrap_or(u64::MAX);
                        connect_job(&channel, id, args.port).await?;
                    }
                    Some(b'T') => kill_group(rustix::process::Signal::TERM),
                    _ => {}
                },
                // The executor is gone: so is the job.
                Ok(None) | Err(_) => {
                    kill_group(rustix::process::Signal::KILL);
                    let _ = child.kill().await;
                    return Ok(137);
                }
            },
            accepted = outputs.accept() => {
                if let Ok((stream, _)) = accepted {
                    let fd = OwnedFd::from(stream.into_std()?);
                    channel.send(b"o", &[fd.as_fd()], false).await?;
                }
            }
        }
    }
}

/// Connects to the job's port and sends the socket (or the errno) back for request `id`.
async fn connect_job(channel: &Channel, id: u64, port: u16) -> std::io::Result<()> {
    let connected = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    match connected {
        Ok(stream) => {
            let fd = OwnedFd::from(stream.into_std()?);
            let mut message = vec![b'c'];
            message.extend_from_slice(&id.to_le_bytes());
            channel.send(&message, &[fd.as_fd()], false).await
        }
        Err(error) => {
            let mut message = vec![b'e'];
            message.extend_from_slice(&id.to_le_bytes());
            let errno = error
                .raw_os_error()
                .unwrap_or(rustix::io::Errno::TIMEDOUT.raw_os_error());
            message.extend_from_slice(&errno.to_le_bytes());
            channel.send(&message, &[], false).await
        }
    }
}
