//! The start gate: a job's container is started held, and released once the executor holds
//! the container's network namespace.
//!
//! The container's network namespace exists only once the engine has started the container,
//! and the executor's outputs endpoint (`HORDE_EXECUTOR_URL`) can only listen inside it after
//! that. Without a gate, a job that POSTs to its executor in its first milliseconds finds
//! nothing listening and is refused. So the container's first program (after the engine's
//! init) is `start-gate` (`node/gate/start-gate.c`, linked statically by `build.rs` so that it
//! runs in any image), bind-mounted read-only from the job's directory at [`GATE_DIR`]. It
//! blocks reading a named pipe there until the executor writes one byte into it, then executes
//! the job's own command (the image's entrypoint and command, or the job's arguments). The
//! executor releases the gate once the outputs listener is bound in the namespace and, under
//! `network = "internet"`, the job's veth pair is in place.
//!
//! The executor opens the pipe read-write before the container is created and keeps it open
//! until the job is removed: the byte stays in the pipe whenever the gate opens it, and a gate
//! never released (the start failed) sees end-of-file when the executor closes it, and exits.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// The start gate program, built by `build.rs`.
const GATE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/start-gate"));

/// Where the gate's directory (the program and its pipe) appears in the container, read-only.
pub const GATE_DIR: &str = "/horde/start";
/// The gate program inside the container.
pub const GATE_PROGRAM: &str = "/horde/start/gate";
/// The gate's pipe inside the container.
pub const GATE_PIPE: &str = "/horde/start/pipe";

/// The gate's directory in the job's directory (bind-mounted at [`GATE_DIR`]).
pub(crate) const HOST_DIR: &str = "start";

/// The executor's end of one job's gate.
#[derive(Debug)]
pub(crate) struct Gate {
    pipe: OwnedFd,
    released: bool,
}

impl Gate {
    /// Writes the gate program and makes its pipe in `job_dir/start`, readable by every uid
    /// (the job runs as the class's), and opens the pipe.
    pub(crate) fn prepare(job_dir: &Path) -> io::Result<Self> {
        let dir: PathBuf = job_dir.join(HOST_DIR);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let program = dir.join("gate");
        std::fs::write(&program, GATE)?;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
        let pipe = dir.join("pipe");
        match std::fs::remove_file(&pipe) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &pipe,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )?;
        // mknod's mode is masked by the umask; the job's uid must be able to read it.
        std::fs::set_permissions(&pipe, std::fs::Permissions::from_mode(0o644))?;
        // Read-write: never blocks, and keeps the pipe (and a byte written into it) alive
        // whether or not the gate has opened it yet.
        let pipe = rustix::fs::open(
            &pipe,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(Self {
            pipe,
            released: false,
        })
    }

    /// Lets the job's command run.
    pub(crate) fn release(&mut self) -> io::Result<()> {
        if !self.released {
            rustix::io::write(&self.pipe, b"g")?;
            self.released = true;
        }
        Ok(())
    }
}

/// The container's command: the gate, then the job's own command.
pub(crate) fn gated(command: &[String]) -> Vec<String> {
    [GATE_PROGRAM, GATE_PIPE]
        .into_iter()
        .map(str::to_owned)
        .chain(command.iter().cloned())
        .collect()
}
