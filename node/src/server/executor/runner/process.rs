//! The process runner: each job in a bubblewrap sandbox (Debian's `bwrap`).
//!
//! `bwrap` unshares the pid, mount, network, IPC, UTS and (where it can) cgroup namespaces,
//! dies with the executor (`--die-with-parent`), starts a new session, drops every capability,
//! and builds a root of its own: read-only binds of `/usr` (with the `/bin`, `/lib*`, `/sbin`
//! links) and of a short list of `/etc` files programs need (never `/etc` whole), a new `/proc`
//! of the job's pid namespace, a minimal `/dev`, a private tmpfs `/tmp`, the job's volume
//! read-only at [`VOLUME_DIR`] and its output directory at [`OUTPUT_DIR`]. Node data, key
//! files, the host's `/tmp`, `/work`, `/root`, `/home` are never bound. A program named by an
//! absolute path outside `/usr` is bound read-only at its own path (that file alone).
//!
//! What it runs is `horde sandbox-init` (this binary, bound read-only at `/horde/init`; see
//! `bridge.rs`), which starts the job. Its arguments go to `bwrap` through a pipe (`--args 0`)
//! so that no host path of the job appears in any process's command line.
//!
//! **Users.** When the node runs as root, `bwrap` runs as root without a user namespace (a
//! user namespace made by root maps root), and the init drops to the class's uid (default
//! 65534) before anything else: the job's real host uid is that unprivileged uid, with no
//! capabilities and `no_new_privs`. The job's output directory is chowned to it. Otherwise
//! `bwrap` makes a user namespace (the job keeps the node's uid on the host, with no
//! capabilities) and forbids further user namespaces inside.
//!
//! **Limits.** When the executor can write a cgroup (v1: the `memory`, `pids` and `cpu`
//! hierarchies under its own), each job gets one: `memory.limit_in_bytes` (and the swap
//! limit), `pids.max`, a CFS quota for `cpus`; the kernel's OOM kill is read back from
//! `memory.oom_control`, and anything left in the cgroup is killed at the end. Without one,
//! memory falls back to `RLIMIT_AS` (a poor stand-in: it counts address space, not memory) and
//! pids and CPU are not limited; the executor says so at start. Whatever the cgroups, the init
//! gives the job `RLIMIT_FSIZE` = the class's disk limit: no file it writes (its logs included)
//! grows past it (the executor measures all of them together: [`crate::server::executor::disk`]).
//!
//! **Egress.** Under `network = "internet"` the sandbox keeps its own network namespace, and
//! between the init's hello and the go the executor gives it a veth pair, an address and a
//! default route ([`super::egress`]) through `/proc/<init pid>/ns/net`, so the job starts
//! with its network up; `/etc/resolv.conf` is bound too. The pair is deleted when the job is
//! stopped or removed (and by the kernel with the namespace, whatever ended it).
//!
//! **Sandboxes made ahead.** `bwrap`'s setup (tens of milliseconds, the network namespace
//! most) and the cgroups are made before the job arrives: the next job's sandbox is made when
//! the executor starts and after each job, with everything above but the job, and the job is
//! handed to its waiting init when it starts; a job it does not fit, or a sandbox that failed,
//! starts cold as described above (`process/slot.rs` says which and how).
//!
//! Layout: `process.rs` (the runner, its sandboxes, the job's cgroups and its process),
//! `process/slot.rs` (sandboxes made ahead of their jobs), `process/pin.rs` (the init binary
//! kept under the executor's own name, so replacing `horde` on disk breaks no sandbox).

use std::ffi::OsString;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use horde_protocol::Program;
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, info, warn};

mod pin;
mod slot;

use slot::Slot;

use super::bridge::{BridgeHandle, Channel, Datagram, SANDBOX_INIT_SUBCOMMAND};
use super::egress::{Egress, JobLink};
use super::{
    ClassPolicy, DEFAULT_JOB_UID, JOB_PORT_ENV, JobDialer, JobEvent, JobExit, JobProcess, Launch,
    NetworkPolicy, OUTPUT_DIR, OUTPUT_DIR_ENV, Runner, RunnerError, VOLUME_DIR, VOLUME_DIR_ENV,
};

/// Where the horde binary (the sandbox's init) is bound inside the sandbox.
const INIT_PATH: &str = "/horde/init";
/// How long the sandbox may take to come up (bwrap, the init's hello).
const SANDBOX_START: Duration = Duration::from_secs(10);
/// Host directories bound read-only when they exist; `/bin`, `/lib`… are links into `/usr`
/// on merged-usr systems and are recreated as such.
const SYSTEM_DIRS: [&str; 6] = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/// The `/etc` entries programs need (the dynamic linker's cache, users and groups without
/// passwords, name service and TLS roots, Debian's alternatives links) — nothing else of `/etc`.
const ETC_FILES: [&str; 13] = [
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/localtime",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/mime.types",
    "/etc/os-release",
];
/// The v1 cgroup hierarchies a job gets a cgroup in.
const CGROUP_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// CFS period for the CPU quota: the kernel's default, 100 ms.
const CFS_PERIOD_US: u64 = 100_000;

/// Runs jobs in bubblewrap sandboxes.
#[derive(Debug)]
pub struct ProcessRunner {
    sandboxes: Sandboxes,
    /// Egress, when the class's network is `internet`.
    egress: Option<Egress>,
    /// The class's policy, which pre-made sandboxes are made for.
    policy: ClassPolicy,
    /// The pre-made sandbox for the next job, made or being made ([`Runner::prepare_next`]).
    next: std::sync::Mutex<Option<tokio::task::JoinHandle<Result<Slot, RunnerError>>>>,
    /// Pre-made sandboxes so far (their directories' names).
    made: std::sync::atomic::AtomicU64,
    /// The executor's own name for the init binary, when [`ProcessRunner::pin_init`] made one.
    pinned: Option<pin::PinnedInit>,
}

impl Drop for ProcessRunner {
    fn drop(&mut self) {
        let next = self.next.get_mut().map(Option::take);
        if let (Ok(Some(next)), Ok(runtime)) = (next, tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                if let Ok(Ok(slot)) = next.await {
                    slot.discard().await;
                }
            });
        }
    }
}

/// How this host makes sandboxes (what a pre-made one is made with, off the runner).
#[derive(Debug, Clone)]
pub(super) struct Sandboxes {
    bwrap: PathBuf,
    /// The node runs as root: no user namespace, the init drops to the job uid.
    root: bool,
    /// The executor's own cgroup directory in each of [`CGROUP_CONTROLLERS`], when writable.
    cgroups: Option<Vec<PathBuf>>,
    /// The `horde` binary bound into the sandbox as its init: this very binary, through
    /// `/proc/PID/exe` until [`ProcessRunner::pin_init`] gives it a name of the executor's own.
    init: PathBuf,
}

/// A sandbox that has started and said hello: its `bwrap`, the bridge's socket, its init's pid.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) child: tokio::process::Child,
    pub(super) channel: Channel,
    pub(super) pid: i32,
}

impl ProcessRunner {
    /// A runner for `policy` if this host can isolate jobs: `bwrap` is installed and a
    /// sandbox starts (a trivial one is tried); under `network = "internet"`, if this host
    /// can also give jobs egress ([`Egress::prepare`]).
    pub async fn detect(policy: &ClassPolicy) -> Result<Self, RunnerError> {
        if policy.gpus.is_some() {
            return Err(RunnerError::Refused(
                "gpus need the container runtime".into(),
            ));
        }
        let bwrap = crate::server::supervision::resolve_program(
            "bwrap",
            Some(std::ffi::OsStr::new("/usr/bin:/bin:/usr/local/bin")),
            Path::new("/"),
        )
        .map_err(|error| RunnerError::Unavailable(format!("bubblewrap (bwrap): {error}")))?;
        let root = rustix::process::geteuid().is_root();
        // Egress first: a host that cannot give it refuses the class's jobs whatever else.
        let egress = match policy.network {
            NetworkPolicy::Internet => Some(Egress::prepare().await?),
            NetworkPolicy::None => None,
        };
        let runner = Self {
            sandboxes: Sandboxes {
                bwrap,
                root,
                cgroups: writable_cgroups(),
                init: PathBuf::from(format!("/proc/{}/exe", std::process::id())),
            },
            egress,
            policy: policy.clone(),
            next: std::sync::Mutex::new(None),
            made: std::sync::atomic::AtomicU64::new(0),
            pinned: None,
        };
        runner.sandboxes.self_test().await?;
        match &runner.sandboxes.cgroups {
            Some(_) => info!("jobs run in bubblewrap sandboxes with cgroup limits"),
            None => warn!(
                "jobs run in bubblewrap sandboxes, but no writable cgroup: memory is limited by \
                 RLIMIT_AS only, pids and CPU are not limited"
            ),
        }
        Ok(runner)
    }

    /// Uses `horde` (a path to the `horde` binary) as the sandbox's init: for callers that are
    /// not the `horde` binary themselves (tests, benches).
    pub fn with_init_binary(mut self, horde: PathBuf) -> Self {
        self.sandboxes.init = horde;
        self
    }

    /// Keeps the init binary as it is now under a name of this executor's own in `dir`, so that
    /// replacing the `horde` file on disk while the node runs does not break later sandboxes
    /// (`process/pin.rs`). Where no name can be made (the directory not writable, the disk
    /// full), says so and binds the binary where it is, as before.
    pub fn pin_init(mut self, dir: &Path) -> Self {
        match pin::PinnedInit::new(&self.sandboxes.init, dir) {
            Ok(pinned) => {
                self.sandboxes.init = pinned.path().to_path_buf();
                self.pinned = Some(pinned);
            }
            Err(error) => warn!(
                %error,
                dir = %dir.display(),
                "could not keep a copy of the sandbox init: replacing the horde binary on disk \
                 makes new jobs fail until the node restarts"
            ),
        }
        self
    }
}

impl Sandboxes {
    /// The uid the job runs as on the host, when the node is root (else its own, in a user
    /// namespace).
    fn job_uid(&self, policy: &ClassPolicy) -> Option<u32> {
        self.root.then(|| policy.uid.unwrap_or(DEFAULT_JOB_UID))
    }

    /// Runs `true` in a sandbox made as for a job: fails when this host cannot make one.
    async fn self_test(&self) -> Result<(), RunnerError> {
        let mut args = self.base_args(None);
        args.push("--".into());
        args.push("true".into());
        let output = tokio::time::timeout(
            SANDBOX_START,
            tokio::process::Command::new(&self.bwrap)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| RunnerError::Unavailable("bwrap did not finish a trivial sandbox".into()))?
        .map_err(|error| RunnerError::Unavailable(format!("running bwrap: {error}")))?;
        if !output.status.success() {
            return Err(RunnerError::Unavailable(format!(
                "bwrap cannot make a sandbox here: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The sandbox's namespaces and root filesystem, without the job's own binds.
    fn base_args(&self, tmp_bytes: Option<u64>) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&[
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "horde-job",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
        ]);
        if self.root {
            // The init needs these two to drop to the job's uid; it loses them with the drop.
            push(&["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]);
        } else {
            push(&["--unshare-user", "--disable-userns"]);
        }
        push(&["--ro-bind", "/usr", "/usr"]);
        for dir in SYSTEM_DIRS {
            match std::fs::read_link(dir) {
                Ok(target) => {
                    args.extend(["--symlink".into(), target.into_os_string(), dir.into()]);
                }
                Err(_) => args.extend(["--ro-bind-try".into(), dir.into(), dir.into()]),
            }
        }
        for file in ETC_FILES {
            args.extend(["--ro-bind-try".into(), file.into(), file.into()]);
        }
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        push(&["--proc", "/proc", "--dev", "/dev", "--perms", "1777"]);
        if let Some(bytes) = tmp_bytes {
            args.extend(["--size".into(), bytes.to_string().into()]);
        }
        args.extend(["--tmpfs".into(), "/tmp".into()]);
        args
    }

    /// bwrap's options for a sandbox under `policy` whose job directory (`volume/`,
    /// `output/`) is `dir`, with `programs` bound at their own paths (given through
    /// `--args 0`).
    pub(super) fn binds(
        &self,
        policy: &ClassPolicy,
        dir: &Path,
        programs: Vec<PathBuf>,
    ) -> Vec<OsString> {
        let mut args = self.base_args(Some(policy.tmp_limit()));
        args.extend([
            "--perms".into(),
            "0755".into(),
            "--dir".into(),
            "/horde".into(),
            "--ro-bind".into(),
            dir.join("volume").into_os_string(),
            VOLUME_DIR.into(),
            "--bind".into(),
            dir.join("output").into_os_string(),
            OUTPUT_DIR.into(),
            "--ro-bind".into(),
            self.init.clone().into_os_string(),
            INIT_PATH.into(),
        ]);
        let mut made = std::collections::HashSet::new();
        for path in programs {
            // Parent directories bwrap would otherwise make 0700: the job's uid must pass them.
            let parents: Vec<&Path> = path.ancestors().skip(1).collect();
            for dir in parents.into_iter().rev().filter(|d| *d != Path::new("/")) {
                if made.insert(dir.to_path_buf()) {
                    args.extend(["--perms".into(), "0755".into(), "--dir".into(), dir.into()]);
                }
            }
            args.extend(["--ro-bind".into(), path.clone().into(), path.into()]);
        }
        if policy.network == NetworkPolicy::Internet {
            args.extend([
                "--ro-bind-try".into(),
                "/etc/resolv.conf".into(),
                "/etc/resolv.conf".into(),
            ]);
        }
        args.extend(["--chdir".into(), OUTPUT_DIR.into()]);
        args
    }

    /// The command bwrap runs: the init, told the job's port and program (`job`), or neither
    /// for a pre-made sandbox. (bwrap 0.8 reads options only from `--args`; the command stays
    /// on its command line.)
    pub(super) fn init_command(
        &self,
        policy: &ClassPolicy,
        job: Option<(u16, &str, &[String])>,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--".into(),
            INIT_PATH.into(),
            SANDBOX_INIT_SUBCOMMAND.into(),
        ];
        if let Some(uid) = self.job_uid(policy) {
            args.extend(["--uid".into(), uid.to_string().into()]);
        }
        if self.cgroups.is_none()
            && let Some(bytes) = policy.memory_bytes
        {
            args.extend(["--address-space".into(), bytes.to_string().into()]);
        }
        // No file the job writes (its logs included) grows past its disk limit.
        let file_size = policy.disk_limit().to_string();
        args.extend(["--file-size".into(), file_size.into()]);
        if let Some((port, program, job_args)) = job {
            args.extend(["--port".into(), port.to_string().into()]);
            args.extend(["--".into(), program.into()]);
            args.extend(job_args.iter().map(OsString::from));
        }
        args
    }

    /// Starts `bwrap` with `binds` (through `--args 0`), `command` and `env` (nothing else of
    /// the executor's environment), its stderr to `stderr` (at `stderr_path`); returns once
    /// the init has said hello.
    pub(super) async fn open(
        &self,
        binds: Vec<OsString>,
        command: Vec<OsString>,
        env: Vec<(String, String)>,
        stderr: (std::fs::File, &Path),
    ) -> Result<Opened, RunnerError> {
        let io = |context: &str| {
            let context = context.to_owned();
            move |error: std::io::Error| RunnerError::io(context, error)
        };
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| RunnerError::io("socket pair", e.into()))?;
        rustix::net::sockopt::set_socket_passcred(&ours, true)
            .map_err(|e| RunnerError::io("socket pair", e.into()))?;
        let (args_read, args_write) = std::io::pipe().map_err(io("argument pipe"))?;
        let mut child = tokio::process::Command::new(&self.bwrap)
            .args(["--args", "0"])
            .args(command)
            .env_clear()
            .envs(env)
            .stdin(args_read)
            .stdout(std::process::Stdio::from(theirs))
            .stderr(stderr.0)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("starting bwrap"))?;
        let result = tokio::time::timeout(SANDBOX_START, async {
            let mut args = Vec::new();
            for arg in binds {
                args.extend_from_slice(arg.as_encoded_bytes());
                args.push(0);
            }
            let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(args_write))
                .map_err(io("argument pipe"))?;
            pipe.write_all(&args).await.map_err(io("argument pipe"))?;
            drop(pipe);
            let channel = Channel::new(ours).map_err(io("sandbox socket"))?;
            let hello = recv(&channel).await?;
            if hello.bytes.first() != Some(&b'H') {
                return Err(closed());
            }
            let pid = hello.pid.ok_or_else(|| {
                RunnerError::Unavailable("the sandbox sent no credentials".into())
            })?;
            Ok((channel, pid))
        })
        .await
        .unwrap_or_else(|_| {
            Err(RunnerError::Unavailable(
                "the sandbox did not come up in time".into(),
            ))
        });
        match result {
            Ok((channel, pid)) => Ok(Opened {
                child,
                channel,
                pid,
            }),
            Err(error) => {
                let _ = child.kill().await;
                Err(bwrap_said(stderr.1, error))
            }
        }
    }
}

/// The job's environment: the runner's `PATH` and `HOME`, the spec's, the `HORDE_*` paths.
fn job_env(launch: &Launch) -> Vec<(String, String)> {
    let mut env = base_env();
    env.extend(launch.env.iter().cloned());
    env.push((JOB_PORT_ENV.to_owned(), launch.port.to_string()));
    env.push((VOLUME_DIR_ENV.to_owned(), VOLUME_DIR.to_owned()));
    env.push((OUTPUT_DIR_ENV.to_owned(), OUTPUT_DIR.to_owned()));
    env
}

/// The environment every sandbox starts with (a pre-made one's init has only this).
pub(super) fn base_env() -> Vec<(String, String)> {
    vec![
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("HOME".to_owned(), "/tmp".to_owned()),
    ]
}

/// `error`, or bwrap's own complaint (in its stderr at `stderr`) if it made one: the better
/// reason. A spawn failure is the job's own and stays.
pub(super) fn bwrap_said(stderr: &Path, error: RunnerError) -> RunnerError {
    let said = std::fs::read_to_string(stderr).unwrap_or_default();
    match (&error, said.lines().find(|l| l.starts_with("bwrap:"))) {
        (RunnerError::Spawn { .. }, _) | (_, None) => error,
        (_, Some(line)) => RunnerError::Unavailable(line.to_owned()),
    }
}

fn closed() -> RunnerError {
    RunnerError::Unavailable("the sandbox ended before its job started".into())
}

/// The sandbox's next message; its end is [`closed`].
async fn recv(channel: &Channel) -> Result<Datagram, RunnerError> {
    channel
        .recv()
        .await
        .map_err(|e| RunnerError::io("sandbox socket", e))?
        .ok_or_else(closed)
}

/// Whether `path` is in the system directories every sandbox binds.
fn in_system_dirs(path: &Path) -> bool {
    path.starts_with("/usr") || SYSTEM_DIRS.iter().any(|dir| path.starts_with(dir))
}

/// Host programs bound read-only into the sandbox at their own paths: the program, and any
/// argument naming one (`/bin/sh -c '…' /path/to/job`), when it is an absolute path outside the
/// system directories to a file that others may execute on this host anyway. Nothing else of
/// the host's files is bound.
fn host_programs(launch: &Launch, program: &str) -> Vec<PathBuf> {
    std::iter::once(program)
        .chain(launch.args.iter().map(String::as_str))
        .filter(|arg| arg.starts_with('/'))
        .map(PathBuf::from)
        .filter(|path| !in_system_dirs(path) && reachable_by_others(path))
        .collect()
}

/// Whether every directory above `path` lets others through and `path` itself is a file
/// others may execute: a program the job's uid could reach on the host anyway.
fn reachable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(metadata) = std::fs::metadata(path) else {
        return false;
    };
    if !metadata.is_file() || metadata.permissions().mode() & 0o001 == 0 {
        return false;
    }
    path.ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// The executor's own cgroup directory in each of [`CGROUP_CONTROLLERS`] (v1), if it can make
/// cgroups below them.
fn writable_cgroups() -> Option<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for controller in CGROUP_CONTROLLERS {
        let dir = own_cgroup(controller)?;
        let probe = dir.join(format!("horde-probe-{}", std::process::id()));
        std::fs::create_dir(&probe).ok()?;
        let _ = std::fs::remove_dir(&probe);
        reap_stale_cgroups(&dir);
        dirs.push(dir);
    }
    Some(dirs)
}

/// This process's own cgroup directory in v1 hierarchy `controller`.
pub(super) fn own_cgroup(controller: &str) -> Option<PathBuf> {
    super::cgroup_in(
        &std::fs::read_to_string("/proc/self/cgroup").ok()?,
        controller,
    )
}

/// Whether the kernel killed a process for memory in the v1 memory cgroup `dir` or below it
/// (`oom_kill` of `memory.oom_control` counts its descendants' kills too).
pub(super) fn oom_killed(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("memory.oom_control")).is_ok_and(|text| {
        text.lines().any(|line| {
            line.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

/// Job cgroups left behind by an executor that was killed before it could remove them: empty
/// ones (the kernel refuses to remove any other) older than a job's start.
pub(super) fn reap_stale_cgroups(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > Duration::from_secs(60)));
        if stale
            && entry
                .file_name()
                .to_string_lossy()
                .starts_with("horde-job-")
        {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// One job's cgroups (one per controller), removed by [`JobCgroup::remove`].
#[derive(Debug)]
pub(super) struct JobCgroup {
    dirs: Vec<PathBuf>,
}

impl JobCgroup {
    /// Cgroups `horde-job-NAME` below `parents`, with `policy`'s limits.
    pub(super) fn create(
        parents: &[PathBuf],
        name: &str,
        policy: &ClassPolicy,
    ) -> Result<Self, RunnerError> {
        let name = format!("horde-job-{name}");
        let mut cgroup = Self { dirs: Vec::new() };
        for parent in parents {
            let dir = parent.join(&name);
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir)
                .map_err(|e| RunnerError::io(format!("creating {}", dir.display()), e))?;
            cgroup.dirs.push(dir);
        }
        let write = |file: &str, value: String| -> Result<(), RunnerError> {
            let Some(dir) = cgroup.dirs.iter().find(|d| d.join(file).exists()) else {
                return Err(RunnerError::Unavailable(format!("no cgroup file {file}")));
            };
            std::fs::write(dir.join(file), value)
                .map_err(|e| RunnerError::io(format!("writing {file}"), e))
        };
        if let Some(bytes) = policy.memory_bytes {
            write("memory.limit_in_bytes", bytes.to_string())?;
            // Swap counts too, where the kernel accounts it.
            let _ = write("memory.memsw.limit_in_bytes", bytes.to_string());
        }
        write("pids.max", policy.pids_limit().to_string())?;
        if let Some(cpus) = policy.cpus {
            write("cpu.cfs_period_us", CFS_PERIOD_US.to_string())?;
            let quota = (cpus * CFS_PERIOD_US as f64).round().max(1000.0) as u64;
            write("cpu.cfs_quota_us", quota.to_string())?;
        }
        Ok(cgroup)
    }

    pub(super) fn add(&self, pid: i32) -> Result<(), RunnerError> {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(|e| RunnerError::io(format!("joining {}", dir.display()), e))?;
        }
        Ok(())
    }

    fn out_of_memory(&self) -> bool {
        self.dirs.iter().any(|dir| oom_killed(dir))
    }

    /// Kills whatever is left in the cgroups and removes them.
    pub(super) async fn remove(&self) {
        for _ in 0..50 {
            let mut left = false;
            for dir in &self.dirs {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    left = true;
                    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                }
            }
            if !left
                && self
                    .dirs
                    .iter()
                    .all(|d| std::fs::remove_dir(d).is_ok() || !d.exists())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        warn!(dirs = ?self.dirs, "job cgroups could not be removed");
    }
}

#[async_trait]
impl Runner for ProcessRunner {
    async fn start(&self, launch: Launch) -> Result<Box<dyn JobProcess>, RunnerError> {
        let Program::Command { program } = &launch.program else {
            return Err(RunnerError::Refused(
                "this executor runs commands, not container images".into(),
            ));
        };
        let egress = super::egress::for_launch(self.egress.as_ref(), &launch)?;
        let started = std::time::Instant::now();
        if self.sandboxes.root {
            let path = Path::new(program);
            if program.starts_with('/') && !in_system_dirs(path) && !reachable_by_others(path) {
                return Err(RunnerError::Spawn {
                    program: program.clone(),
                    reason: "not an executable file that others may reach on this host".into(),
                });
            }
        }
        if let Some(file) = slot::program_file(&launch, program)
            && let Some(slot) = self.take_slot().await
        {
            match slot.start(&launch, program, file, egress).await {
                Ok(job) => {
                    debug!(elapsed = ?started.elapsed(), "job started in the pre-made sandbox");
                    return Ok(Box::new(job));
                }
                Err(slot::WarmError::Job(error)) => return Err(error),
                Err(slot::WarmError::Unusable(reason)) => {
                    warn!(%reason, "the pre-made sandbox is unusable: the job gets a new one");
                }
            }
        }
        let job = self.start_cold(&launch, program, egress).await?;
        debug!(elapsed = ?started.elapsed(), "job started in a new sandbox");
        Ok(Box::new(job))
    }

    fn prepare_next(&self, jobs_dir: &Path) {
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if next.is_some() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let made = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if made == 0 {
            slot::reap_stale(jobs_dir);
        }
        let dir = jobs_dir.join(slot::slot_name(made));
        *next = Some(tokio::spawn(Slot::make(
            self.sandboxes.clone(),
            self.policy.clone(),
            dir,
        )));
    }
}

impl ProcessRunner {
    /// The pre-made sandbox, if one was prepared and is up (waiting for it if it is still
    /// being made: never longer than a new one would take).
    async fn take_slot(&self) -> Option<Slot> {
        let next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        match tokio::time::timeout(SANDBOX_START, next).await {
            Ok(Ok(Ok(slot))) => Some(slot),
            Ok(Ok(Err(error))) => {
                warn!(%error, "the pre-made sandbox failed: the job gets a new one");
                None
            }
            Ok(Err(error)) => {
                warn!(%error, "making the pre-made sandbox failed: the job gets a new one");
                None
            }
            Err(_) => {
                warn!("the pre-made sandbox did not come up in time: the job gets a new one");
                None
            }
        }
    }

    /// A new sandbox for `launch` (cgroup, binds, init), started on the job's start path.
    async fn start_cold(
        &self,
        launch: &Launch,
        program: &str,
        egress: Option<&Egress>,
    ) -> Result<ProcessJob, RunnerError> {
        let phase = std::time::Instant::now();
        if let Some(uid) = self.sandboxes.job_uid(&launch.policy) {
            let owner = Some(rustix::fs::Uid::from_raw(uid));
            let group = Some(rustix::fs::Gid::from_raw(uid));
            rustix::fs::chown(launch.job_dir.join("output"), owner, group).map_err(|e| {
                RunnerError::io("handing the output directory to the job", e.into())
            })?;
        }
        let cgroup = match &self.sandboxes.cgroups {
            Some(parents) => Some(JobCgroup::create(
                parents,
                &launch.job_id.to_string(),
                &launch.policy,
            )?),
            None => None,
        };
        let prepared = phase.elapsed();
        let started = self.spawn(launch, program, cgroup.as_ref(), egress).await;
        debug!(?prepared, total = ?phase.elapsed(), "new sandbox: cgroup and chown, then bwrap");
        match started {
            Ok((child, bridge, link, init)) => Ok(ProcessJob {
                child,
                bridge,
                cgroup,
                link,
                init,
                exit: None,
            }),
            Err(error) => {
                if let Some(cgroup) = cgroup {
                    cgroup.remove().await;
                }
                Err(error)
            }
        }
    }

    /// Starts the sandbox and its job; returns once the init has started the job.
    async fn spawn(
        &self,
        launch: &Launch,
        program: &str,
        cgroup: Option<&JobCgroup>,
        egress: Option<&Egress>,
    ) -> Result<(tokio::process::Child, BridgeHandle, Option<JobLink>, i32), RunnerError> {
        let logs = launch.job_dir.join("logs/output");
        let (stdout, stderr) = log_files(&logs)?;
        let binds = self.sandboxes.binds(
            &launch.policy,
            &launch.job_dir,
            host_programs(launch, program),
        );
        let command = self
            .sandboxes
            .init_command(&launch.policy, Some((launch.port, program, &launch.args)));
        let stderr_path = logs.join("stderr");
        let Opened {
            mut child,
            channel,
            pid,
        } = self
            .sandboxes
            .open(binds, command, job_env(launch), (stderr, &stderr_path))
            .await?;
        let mut link = None;
        let result = tokio::time::timeout(SANDBOX_START, async {
            if let Some(cgroup) = cgroup {
                cgroup.add(pid)?;
            }
            if let Some(egress) = egress {
                link = Some(attach(egress, launch.job_id, pid).await?);
            }
            let stdout = OwnedFd::from(stdout);
            channel
                .send(b"G", &[stdout.as_fd()], false)
                .await
                .map_err(|e| RunnerError::io("sandbox socket", e))?;
            drop(stdout);
            job_started(&channel, program).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(RunnerError::Unavailable(
                "the sandbox did not come up in time".into(),
            ))
        });
        match result {
            Ok(()) => Ok((child, BridgeHandle::start(channel), link, pid)),
            Err(error) => {
                let _ = child.kill().await;
                if let Some(link) = link {
                    link.remove().await;
                }
                Err(bwrap_said(&stderr_path, error))
            }
        }
    }
}

/// The job's stdout and stderr logs, created (empty) in `logs`.
pub(super) fn log_files(logs: &Path) -> Result<(std::fs::File, std::fs::File), RunnerError> {
    let create = |name: &str| {
        std::fs::File::create(logs.join(name))
            .map_err(|e| RunnerError::io(format!("{name} log"), e))
    };
    Ok((create("stdout")?, create("stderr")?))
}

/// Gives the sandbox whose init is `pid` (it waits for its go: the pid is still the
/// sandbox's) its egress link.
pub(super) async fn attach(
    egress: &Egress,
    job: horde_protocol::JobId,
    pid: i32,
) -> Result<JobLink, RunnerError> {
    let path = format!("/proc/{pid}/ns/net");
    let namespace = std::fs::File::open(&path).map_err(|e| RunnerError::io(path, e))?;
    Ok(egress.attach(job, &namespace).await?)
}

/// The init's answer to the go: started, or why the job's program could not be.
pub(super) async fn job_started(channel: &Channel, program: &str) -> Result<(), RunnerError> {
    let answer = recv(channel).await?;
    match answer.bytes.first() {
        Some(b'S') => Ok(()),
        Some(b'F') => Err(RunnerError::Spawn {
            program: program.to_owned(),
            reason: String::from_utf8_lossy(&answer.bytes[1..]).into_owned(),
        }),
        _ => Err(closed()),
    }
}

/// A job running in a bubblewrap sandbox.
#[derive(Debug)]
pub(super) struct ProcessJob {
    /// The outer `bwrap` process (on the host).
    pub(super) child: tokio::process::Child,
    pub(super) bridge: BridgeHandle,
    pub(super) cgroup: Option<JobCgroup>,
    /// The job's veth pair, under `network = "internet"`.
    pub(super) link: Option<JobLink>,
    /// The sandbox's init (host pid), in the job's pid namespace.
    pub(super) init: i32,
    pub(super) exit: Option<JobExit>,
}

#[async_trait]
impl JobProcess for ProcessJob {
    fn dialer(&self) -> Arc<dyn JobDialer> {
        self.bridge.dialer()
    }

    fn pid(&self) -> Option<u32> {
        u32::try_from(self.init).ok()
    }

    async fn accept_outputs(&mut self) -> std::io::Result<tokio::net::TcpStream> {
        self.bridge.accept_outputs().await
    }

    async fn wait(&mut self) -> std::io::Result<JobExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let status = self.child.wait().await?;
        // The init reported the job's own status just before it exited; the bridge ends when
        // the sandbox's end of the socket closes, which is now.
        let reported = tokio::time::timeout(Duration::from_secs(1), self.bridge.reported_exit())
            .await
            .ok()
            .flatten();
        let mut exit = reported.unwrap_or_else(|| JobExit::from_status(status));
        exit.out_of_memory = self.cgroup.as_ref().is_some_and(JobCgroup::out_of_memory);
        self.exit = Some(exit);
        Ok(exit)
    }

    async fn next_event(&mut self) -> JobEvent {
        if self.exit.is_some() {
            return JobEvent::Exited(self.wait().await);
        }
        tokio::select! {
            status = self.child.wait() => match status {
                // The exit is read (with the init's report) on the next call.
                Ok(_) => JobEvent::Exited(self.wait().await),
                Err(error) => JobEvent::Exited(Err(error)),
            },
            Ok(stream) = self.bridge.accept_outputs() => JobEvent::Outputs(stream),
        }
    }

    async fn stop(&mut self, grace: Duration) -> Option<JobExit> {
        if self.exit.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.bridge.terminate();
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                debug!("the job outlived its grace period; killing its sandbox");
                let _ = self.child.start_kill();
            }
        }
        let exit = self.wait().await.ok();
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove().await;
        }
        if let Some(link) = self.link.take() {
            link.remove().await;
        }
        exit
    }

    async fn remove(mut self: Box<Self>) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove().await;
        }
        if let Some(link) = self.link.take() {
            link.remove().await;
        }
    }
}
