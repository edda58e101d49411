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
//! | executor | `G` go (cold) | – | the job's stdout file |
//! | executor | `J` job (pre-made) | port `u16`, then the program, its arguments and environment ([`encode_job`]) | stdout, stderr, and the program's file when it is outside `/usr` |
//! | init | `S` started / `F` failed | – / the reason (UTF-8) | – |
//! | executor | `C` connect | request id `u64` | – |
//! | init | `c` connected / `e` refused | request id `u64` / + errno `i32` | the socket (`c`) |
//! | init | `o` outputs connection | – | the socket |
//! | executor | `T` terminate | – | – |
//! | init | `x` exited | code `i32`, signal `i32` (`i32::MIN` = none) | – |

use std::collections::HashMap;
use std::ffi::OsString;
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
/// Longest `J` message: a job whose program, arguments and environment need more starts in a
/// sandbox of its own (its arguments on `bwrap`'s command line).
pub(crate) const MAX_JOB_MESSAGE: usize = 64 * 1024;
/// Most descriptors in one message (`J`: stdout, stderr, the program).
const MAX_FDS: usize = 3;
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
                let mut space = [MaybeUninit::uninit();
                    rustix::cmsg_space!(ScmRights(MAX_FDS), ScmCredentials(1))];
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
        self.recv_up_to(MAX_MESSAGE).await
    }

    /// The next datagram of at most `limit` bytes (longer ones are cut); `None` once the other
    /// end has closed.
    async fn recv_up_to(&self, limit: usize) -> std::io::Result<Option<Datagram>> {
        self.fd
            .async_io(Interest::READABLE, || {
                let fd = self.fd.as_fd();
                let mut bytes = vec![0u8; limit];
                let mut space = [MaybeUninit::uninit();
                    rustix::cmsg_space!(ScmRights(MAX_FDS), ScmCredentials(1))];
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
                bytes.truncate(received.bytes.min(limit));
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

/// The job's connected socket, sent as a descriptor: the dialer's caller registers it with its
/// own runtime (a job endpoint served on a thread of its own polls its streams there).
type ConnectReply = oneshot::Sender<std::io::Result<OwnedFd>>;

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
        tcp_from_fd(answer.await.map_err(|_| gone())??)
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
                        let stream = fds.pop().ok_or_else(|| std::io::Error::other("no socket"));
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
    /// The job's port (inside the sandbox's network namespace); with a pre-made sandbox's
    /// init, it comes with the job (`J`).
    pub port: Option<u16>,
    /// Drop to this uid (and gid) first: set when bubblewrap ran as root.
    pub uid: Option<u32>,
    /// `RLIMIT_AS` for the job, when no memory cgroup could be had.
    pub address_space: Option<u64>,
    /// `RLIMIT_FSIZE` for the job: the most one file it writes may hold.
    pub file_size: Option<u64>,
    /// The job's program; `None` for a pre-made sandbox, whose job comes later (`J`).
    pub program: Option<OsString>,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// The job a pre-made sandbox's init is given (`J`): everything the cold init has on its
/// command line and in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobMessage {
    /// The job's port.
    pub(crate) port: u16,
    /// The program as the job names it: what runs (resolved with the job's `PATH`) unless its
    /// file comes beside the message, and the job's `argv[0]` either way.
    pub(crate) program: OsString,
    /// Its arguments.
    pub(crate) args: Vec<OsString>,
    /// Its whole environment.
    pub(crate) env: Vec<(OsString, OsString)>,
}

impl JobMessage {
    /// `J`, the port, then each string as a `u32` length and its bytes: the program, the count
    /// of arguments and each, the count of variables and each name and value.
    pub(crate) fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt as _;
        let mut bytes = vec![b'J'];
        bytes.extend_from_slice(&self.port.to_le_bytes());
        let mut put = |text: &[u8]| {
            bytes.extend_from_slice(&(text.len() as u32).to_le_bytes());
            bytes.extend_from_slice(text);
        };
        put(self.program.as_bytes());
        put(&(self.args.len() as u32).to_le_bytes());
        for arg in &self.args {
            put(arg.as_bytes());
        }
        put(&(self.env.len() as u32).to_le_bytes());
        for (name, value) in &self.env {
            put(name.as_bytes());
            put(value.as_bytes());
        }
        bytes
    }

    /// The message [`Self::encode`] made; `None` for anything else.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        use std::os::unix::ffi::OsStrExt as _;
        let rest = bytes.strip_prefix(b"J")?;
        let port = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?);
        let mut fields = Fields(&rest[2..]);
        let string = |text: &[u8]| std::ffi::OsStr::from_bytes(text).to_owned();
        let program = string(fields.next()?);
        let args = (0..fields.count()?)
            .map(|_| fields.next().map(string))
            .collect::<Option<Vec<_>>>()?;
        let env = (0..fields.count()?)
            .map(|_| Some((string(fields.next()?), string(fields.next()?))))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            port,
            program,
            args,
            env,
        })
    }
}

/// The length-prefixed fields of a [`JobMessage`].
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn next(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.0.get(..4)?.try_into().ok()?) as usize;
        let field = self.0.get(4..4usize.checked_add(len)?)?;
        self.0 = &self.0[4 + len..];
        Some(field)
    }

    fn count(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.next()?.try_into().ok()?) as usize)
    }
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

/// The job's command, once the executor has said go: `G` for a cold sandbox (the program and
/// arguments from the command line, the environment inherited), `J` for a pre-made one
/// (everything from the message). With the port, and the program's file while it must stay
/// open (until the spawn). `None` when the executor said anything else.
async fn job_command(
    channel: &Channel,
    args: &SandboxInitArgs,
) -> std::io::Result<Option<(u16, tokio::process::Command, Option<OwnedFd>)>> {
    if let Some(program) = &args.program {
        let stdout = match channel.recv().await? {
            Some(Datagram { bytes, mut fds, .. }) if bytes.first() == Some(&b'G') => fds.pop(),
            _ => return Ok(None),
        };
        let mut command = tokio::process::Command::new(program);
        command.args(&args.args);
        if let Some(stdout) = stdout {
            command.stdout(std::process::Stdio::from(stdout));
        }
        return Ok(args.port.map(|port| (port, command, None)));
    }
    let Some(Datagram { bytes, fds, .. }) = channel.recv_up_to(MAX_JOB_MESSAGE).await? else {
        return Ok(None);
    };
    let Some(job) = JobMessage::decode(&bytes) else {
        return Ok(None);
    };
    let mut fds = fds.into_iter();
    let (stdout, stderr, file) = (fds.next(), fds.next(), fds.next());
    // A program from outside the sandbox's own files: exec'd through its descriptor (the path
    // is resolved before the descriptor, close-on-exec, is closed).
    let mut command = match &file {
        Some(file) => {
            use std::os::fd::AsRawFd as _;
            let mut command =
                tokio::process::Command::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
            command.arg0(&job.program);
            command
        }
        None => tokio::process::Command::new(&job.program),
    };
    command.args(&job.args).env_clear().envs(job.env);
    if let Some(stdout) = stdout {
        command.stdout(std::process::Stdio::from(stdout));
    }
    if let Some(stderr) = stderr {
        command.stderr(std::process::Stdio::from(stderr));
    }
    Ok(Some((job.port, command, file)))
}

async fn run_init(args: SandboxInitArgs, control: OwnedFd) -> std::io::Result<i32> {
    let channel = Channel::new(control)?;
    let outputs = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let outputs_port = outputs.local_addr()?.port();
    let mut hello = vec![b'H'];
    hello.extend_from_slice(&outputs_port.to_le_bytes());
    channel.send(&hello, &[], true).await?;
    // Go: the executor has put this process in the job's cgroups, and hands over the stdout
    // log (and, to a pre-made sandbox, the job itself).
    let Some((port, mut command, file)) = job_command(&channel, &args).await? else {
        return Ok(1);
    };
    // No core files: a job killed by SIGXFSZ (or anything else) leaves none on the host.
    for (resource, bytes) in [
        (rustix::process::Resource::As, args.address_space),
        (rustix::process::Resource::Fsize, args.file_size),
        (rustix::process::Resource::Core, Some(0)),
    ] {
        if let Some(bytes) = bytes {
            let limit = rustix::process::Rlimit {
                current: Some(bytes),
                maximum: Some(bytes),
            };
            rustix::process::setrlimit(resource, limit)?;
        }
    }
    command
        .env(EXECUTOR_URL_ENV, format!("http://127.0.0.1:{outputs_port}"))
        .current_dir(OUTPUT_DIR)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let spawned = command.spawn();
    drop(file);
    let mut child = match spawned {
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
                        connect_job(&channel, id, port).await?;
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

#[cfg(test)]
mod tests {
    use super::JobMessage;

    #[test]
    fn a_job_message_reads_back_as_sent_and_a_cut_one_not_at_all() {
        let job = JobMessage {
            port: 8080,
            program: "/srv/job".into(),
            args: vec!["-c".into(), "".into(), "é\n".into()],
            env: vec![("A".into(), "1=2".into()), ("EMPTY".into(), "".into())],
        };
        let bytes = job.encode();
        assert_eq!(JobMessage::decode(&bytes), Some(job));
        for cut in 0..bytes.len() {
            assert_eq!(JobMessage::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut huge_count = bytes[..3].to_vec();
        huge_count.extend_from_slice(&0u32.to_le_bytes());
        huge_count.extend_from_slice(&4u32.to_le_bytes());
        huge_count.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(JobMessage::decode(&huge_count), None);
    }
}
