//! Pre-made sandboxes: the sandbox of the next job, made before the job arrives.
//!
//! Making a sandbox costs tens of milliseconds (`bwrap`'s namespaces — the network one most —,
//! its mounts, the cgroups, the init's start), which a job would otherwise wait for. So the
//! runner makes the next job's sandbox when the executor starts and again after each job
//! ([`super::super::Runner::prepare_next`]), as the cold path would for that job but with no job
//! in it: its cgroups (the init already in them), its uid, its limits, its binds — the volume
//! and output directories from a slot directory beside the jobs' own (`.sandbox-PID-N/`), the
//! output one already handed to the job's uid — and its init waiting (`horde sandbox-init`
//! without a program; see `bridge.rs`).
//!
//! When a job arrives, the executor has fetched its volume into `<job_dir>/volume/`. The
//! runner moves what it holds into the slot's `volume/` (renames, on the same filesystem),
//! and then the slot's `volume/` and `output/` become the job's (renamed over the empty ones):
//! the sandbox bound those very directories, so it sees the job's files, and the executor finds
//! the job's outputs and writes its mid-session volumes where it always does. Under
//! `network = "internet"` the job's link is attached then, to the waiting sandbox, before its
//! program runs. Then the init gets the job (`J`): port, program, arguments, environment, the
//! stdout and stderr logs, and — for a program outside `/usr` — the program's file, which it
//! executes through its descriptor (`/proc/self/fd/N`, i.e. `fexecve`): a cold sandbox would
//! bind that one file at its own path instead. The job's `/proc/self/exe` then names the host
//! path of the file, which the job cannot open.
//!
//! A pre-made sandbox runs one job, never a second: it is taken when a job starts, and the
//! next one is made after that job ends. Jobs it does not fit start cold, as before: a script
//! (`#!`) outside `/usr` (its interpreter would need a path to it), an argument naming a host
//! program outside `/usr` (bound at its own path only by a cold sandbox), a job whose program,
//! arguments and environment exceed [`MAX_JOB_MESSAGE`], or a job directory on another
//! filesystem than the slot. A pre-made sandbox that has died, failed or is not up in time is
//! logged and the job starts cold.
//!
//! Between jobs the pre-made sandbox runs nothing of any job: `bwrap` and the waiting init,
//! its `/horde/output` bound from the slot directory (the testnet's process scans tell it from
//! a job's by that path).

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::debug;

use super::super::bridge::{BridgeHandle, JobMessage, MAX_JOB_MESSAGE};
use super::super::egress::Egress;
use super::super::{ClassPolicy, Launch, RunnerError};
use super::{
    JobCgroup, Opened, ProcessJob, SANDBOX_START, Sandboxes, attach, base_env, host_programs,
    in_system_dirs, job_env, job_started, log_files, reachable_by_others,
};

/// Slot directories' names start with this (a job directory is named by its job id).
const SLOT_PREFIX: &str = ".sandbox-";

/// The name of this executor's `made`-th slot directory.
pub(super) fn slot_name(made: u64) -> String {
    format!("{SLOT_PREFIX}{}-{made}", std::process::id())
}

/// Removes slot directories left in `jobs_dir` by an earlier executor (their sandboxes died
/// with it).
pub(super) fn reap_stale(jobs_dir: &Path) {
    let _ = std::fs::create_dir_all(jobs_dir);
    let own = format!("{SLOT_PREFIX}{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(SLOT_PREFIX) && !name.starts_with(&own) {
            let _ = crate::server::cleanup::remove_tree(&entry.path());
        }
    }
}

/// Whether `launch` can start in a pre-made sandbox: `Some` with the program's file to pass
/// (for a program outside `/usr`), `None` when it needs a cold one.
pub(super) fn program_file(launch: &Launch, program: &str) -> Option<Option<OwnedFd>> {
    let path = Path::new(program);
    // Arguments naming host programs are bound at their own paths by a cold sandbox only.
    if !host_programs(launch, program)
        .iter()
        .all(|bound| bound == path)
    {
        return None;
    }
    let size = program.len()
        + launch.args.iter().map(|a| a.len() + 4).sum::<usize>()
        + launch
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>();
    if size + 1024 > MAX_JOB_MESSAGE {
        return None;
    }
    if !program.starts_with('/') || in_system_dirs(path) || !reachable_by_others(path) {
        return Some(None);
    }
    let open = |flags| {
        rustix::fs::open(
            path,
            flags | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    };
    match open(rustix::fs::OFlags::RDONLY) {
        Ok(file) => {
            let mut magic = [0u8; 2];
            let script =
                rustix::io::pread(&file, &mut magic, 0).is_ok_and(|n| n == 2) && &magic == b"#!";
            (!script).then_some(Some(file))
        }
        // Executable but not readable: not a script either.
        Err(_) => open(rustix::fs::OFlags::PATH).ok().map(Some),
    }
}

/// Why a pre-made sandbox did not start the job.
#[derive(Debug)]
pub(super) enum WarmError {
    /// The job's own failure (its program could not start, its files could not be moved):
    /// the job fails with it.
    Job(RunnerError),
    /// The sandbox could not be used: the job starts cold.
    Unusable(String),
}

/// A sandbox made ahead, its init waiting for a job.
#[derive(Debug)]
pub(super) struct Slot {
    /// The slot directory: `volume/`, `output/` (bound), `stderr` (bwrap's).
    dir: PathBuf,
    opened: Opened,
    cgroup: Option<JobCgroup>,
    /// The policy it was made for.
    policy: ClassPolicy,
}

impl Slot {
    /// Makes a sandbox for the next job under `policy`, its directories in `dir`.
    pub(super) async fn make(
        sandboxes: Sandboxes,
        policy: ClassPolicy,
        dir: PathBuf,
    ) -> Result<Self, RunnerError> {
        let made = std::time::Instant::now();
        let _ = crate::server::cleanup::remove_tree(&dir);
        let cgroup = match Self::prepare(&sandboxes, &policy, &dir) {
            Ok(cgroup) => cgroup,
            Err(error) => {
                let _ = crate::server::cleanup::remove_tree(&dir);
                return Err(error);
            }
        };
        let opened = match std::fs::File::create(dir.join("stderr")) {
            Ok(stderr) => {
                sandboxes
                    .open(
                        sandboxes.binds(&policy, &dir, Vec::new()),
                        sandboxes.init_command(&policy, None),
                        base_env(),
                        (stderr, &dir.join("stderr")),
                    )
                    .await
            }
            Err(error) => Err(RunnerError::io("the pre-made sandbox's stderr", error)),
        };
        let joined = match (&opened, &cgroup) {
            (Ok(opened), Some(cgroup)) => cgroup.add(opened.pid),
            _ => Ok(()),
        };
        match (opened, joined) {
            (Ok(opened), Ok(())) => {
                debug!(elapsed = ?made.elapsed(), "pre-made sandbox up");
                Ok(Self {
                    dir,
                    opened,
                    cgroup,
                    policy,
                })
            }
            (opened, joined) => {
                if let Ok(mut opened) = opened {
                    let _ = opened.child.kill().await;
                }
                if let Some(cgroup) = cgroup {
                    cgroup.remove().await;
                }
                let _ = crate::server::cleanup::remove_tree(&dir);
                Err(joined.err().unwrap_or_else(|| {
                    RunnerError::Unavailable("the pre-made sandbox failed".into())
                }))
            }
        }
    }

    /// The slot's directories (the output one the job's uid's) and cgroups.
    fn prepare(
        sandboxes: &Sandboxes,
        policy: &ClassPolicy,
        dir: &Path,
    ) -> Result<Option<JobCgroup>, RunnerError> {
        for sub in ["volume", "output"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| RunnerError::io("the pre-made sandbox's directories", e))?;
        }
        if let Some(uid) = sandboxes.job_uid(policy) {
            let owner = Some(rustix::fs::Uid::from_raw(uid));
            let group = Some(rustix::fs::Gid::from_raw(uid));
            rustix::fs::chown(dir.join("output"), owner, group).map_err(|e| {
                RunnerError::io("handing the output directory to the job", e.into())
            })?;
        }
        let name = dir
            .file_name()
            .map(|name| name.to_string_lossy().trim_start_matches('.').to_owned())
            .unwrap_or_default();
        match &sandboxes.cgroups {
            Some(parents) => Ok(Some(JobCgroup::create(parents, &name, policy)?)),
            None => Ok(None),
        }
    }

    /// Starts `launch`'s job in this sandbox (`file`: the program's, from [`program_file`]).
    pub(super) async fn start(
        mut self,
        launch: &Launch,
        program: &str,
        file: Option<OwnedFd>,
        egress: Option<&Egress>,
    ) -> Result<ProcessJob, WarmError> {
        let phase = std::time::Instant::now();
        if let Err(reason) = self.usable_for(launch) {
            self.discard().await;
            return Err(WarmError::Unusable(reason));
        }
        let logs = log_files(&launch.job_dir.join("logs/output"));
        let logs = logs.and_then(|logs| self.adopt(&launch.job_dir).map(|()| logs));
        let (stdout, stderr) = match logs {
            Ok(files) => files,
            Err(error) => {
                self.discard().await;
                return Err(WarmError::Job(error));
            }
        };
        let adopted = phase.elapsed();
        let link = match egress {
            Some(egress) => match attach(egress, launch.job_id, self.opened.pid).await {
                Ok(link) => Some(link),
                Err(error) => {
                    self.discard().await;
                    return Err(WarmError::Job(error));
                }
            },
            None => None,
        };
        let message = JobMessage {
            port: launch.port,
            program: program.into(),
            args: launch.args.iter().map(Into::into).collect(),
            env: job_env(launch)
                .into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        };
        let (stdout, stderr) = (OwnedFd::from(stdout), OwnedFd::from(stderr));
        let mut fds = vec![stdout.as_fd(), stderr.as_fd()];
        fds.extend(file.as_ref().map(|file| file.as_fd()));
        let channel = &self.opened.channel;
        let mut sent = Duration::ZERO;
        let started = tokio::time::timeout(SANDBOX_START, async {
            channel
                .send(&message.encode(), &fds, false)
                .await
                .map_err(|e| RunnerError::io("sandbox socket", e))?;
            sent = phase.elapsed();
            job_started(channel, program).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(RunnerError::Unavailable(
                "the pre-made sandbox did not start the job in time".into(),
            ))
        });
        drop(fds);
        if let Err(error) = started {
            if let Some(link) = link {
                link.remove().await;
            }
            self.discard().await;
            return Err(match error {
                RunnerError::Spawn { .. } => WarmError::Job(error),
                other => WarmError::Unusable(other.to_string()),
            });
        }
        debug!(?adopted, ?sent, started = ?phase.elapsed(), "job handed to the pre-made sandbox");
        let _ = crate::server::cleanup::remove_tree(&self.dir);
        let Opened {
            child,
            channel,
            pid,
        } = self.opened;
        Ok(ProcessJob {
            child,
            bridge: BridgeHandle::start(channel),
            cgroup: self.cgroup,
            link,
            init: pid,
            exit: None,
        })
    }

    /// Whether this sandbox can take `launch`: made for its policy, still up, its slot on the
    /// job directory's filesystem.
    fn usable_for(&mut self, launch: &Launch) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt as _;
        if self.policy != launch.policy {
            return Err("it was made for another policy".into());
        }
        if !matches!(self.opened.child.try_wait(), Ok(None)) {
            return Err("it has ended".into());
        }
        let device = |path: &Path| std::fs::metadata(path).map(|m| m.dev()).ok();
        let volume = device(&launch.job_dir.join("volume"));
        if volume.is_none() || volume != device(&self.dir) {
            return Err("the job directory is on another filesystem".into());
        }
        Ok(())
    }

    /// Makes the slot's bound `volume/` and `output/` the job's: what the job's own held moved
    /// in, then renamed over them.
    fn adopt(&self, job_dir: &Path) -> Result<(), RunnerError> {
        for sub in ["volume", "output"] {
            let (bound, target) = (self.dir.join(sub), job_dir.join(sub));
            let io =
                |error| RunnerError::io(format!("moving the job's {sub} into its sandbox"), error);
            for entry in std::fs::read_dir(&target).map_err(io)? {
                let entry = entry.map_err(io)?;
                std::fs::rename(entry.path(), bound.join(entry.file_name())).map_err(io)?;
            }
            std::fs::remove_dir(&target).map_err(io)?;
            std::fs::rename(&bound, &target).map_err(io)?;
        }
        Ok(())
    }

    /// Ends the sandbox and removes what was made for it.
    pub(super) async fn discard(mut self) {
        let _ = self.opened.child.kill().await;
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove().await;
        }
        let _ = crate::server::cleanup::remove_tree(&self.dir);
    }
}
