//! What a running job keeps on the node's disk: its output directory and its stdout/stderr
//! logs, the only host directories a job can write (its `/tmp`, and a container's image
//! volumes, are tmpfs of their own size; its volume and root are read-only).
//!
//! Two bounds, one per kind of attack:
//! - **One file**: the runner gives the job `RLIMIT_FSIZE` = the class's disk limit, so the
//!   kernel refuses (SIGXFSZ, then `EFBIG`) any write past it in any one file, logs included.
//! - **All files together**: [`DiskWatch`] measures the job's directories while it runs (the
//!   blocks each entry takes on disk, directories included, and the number of entries) and
//!   reports the first time either is over the class's limit; the executor then kills the job
//!   at once (`FailureReason::OverDiskLimit`), also while it uploads or fetches for the job. A
//!   job writing many files at full speed can get past the limit by what it writes between two
//!   measurements (at least [`MEASURE_EVERY`] apart, longer when a measurement itself takes
//!   long: ten times its duration, at most [`MEASURE_EVERY_MAX`]), as with the kubelet's
//!   ephemeral-storage eviction; the per-file bound holds regardless.
//!
//! What cannot be measured twice in a row counts against the job: a directory the executor
//! cannot read (a job running as the node's own uid can `chmod 000` one) or a path too long to
//! name stops it, since whatever is behind it could not be counted (and could not be uploaded
//! either). An entry removed or replaced while walked is skipped.
//!
//! Files the job deleted but keeps open (or never named: `O_TMPFILE`) are not in its directories
//! but hold their space: each measurement also counts, once each, the deleted files on the
//! directories' filesystem that the processes of the job's pid namespace hold open
//! ([`JobProcesses`]: listed from the job's own cgroup, or found among all of `/proc` when it
//! has none; a runner without a pid namespace of its own gives none).
//! `fallocate` with `FALLOC_FL_KEEP_SIZE` is not checked by the kernel against `RLIMIT_FSIZE`;
//! its blocks are counted at the next measurement. The unisolated runner's job gets no `RLIMIT_FSIZE`
//! (it runs with the node's privileges anyway); the walk still bounds it.

use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::runner::cgroup_in;
use tracing::{debug, warn};

/// Most entries (files, directories, links, anything) in a job's output directory and logs
/// together: millions of empty files fill a filesystem's inodes while taking few blocks.
pub const MAX_JOB_FILES: u64 = 100_000;

/// The shortest time between two measurements of a job's directories.
pub const MEASURE_EVERY: Duration = Duration::from_millis(250);

/// The longest time between two measurements, however long one takes.
pub const MEASURE_EVERY_MAX: Duration = Duration::from_secs(2);

/// A measurement takes at most this share of the time between two (a job with many files makes
/// the walk longer; the interval grows with it, up to [`MEASURE_EVERY_MAX`]).
const MEASURE_SHARE: u32 = 10;

/// Measurements in a row that could not be made before the job is stopped for it.
const UNMEASURABLE_IN_A_ROW: u32 = 2;

/// What a job may keep on the node's disk while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Bytes of disk (blocks in use, not apparent sizes: a sparse file counts what it holds).
    pub bytes: u64,
    /// Entries.
    pub files: u64,
}

/// What was found in a job's directories; a measurement stops early once over a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of disk in use.
    pub bytes: u64,
    /// Entries.
    pub files: u64,
}

impl Usage {
    /// Why this usage is over `limits`, or `None` within them.
    fn over(&self, limits: &DiskLimits) -> Option<String> {
        if self.bytes > limits.bytes {
            return Some(format!(
                "the job's output directory and logs take more than {} bytes of disk (the \
                 class's disk_mb)",
                limits.bytes
            ));
        }
        if self.files > limits.files {
            return Some(format!(
                "the job's output directory and logs hold more than {} files",
                limits.files
            ));
        }
        None
    }
}

/// Most cgroups read for a job's processes: its own and those below it.
const MAX_JOB_CGROUPS: usize = 64;

/// The job's processes, for the files they hold open: its pid namespace (the inode of
/// `/proc/PID/ns/pid`) and the filesystem of its directories. They are listed from the job's
/// cgroup when it has one of its own (the container's, the process runner's job cgroup), else
/// found among all of `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProcesses {
    pid_namespace: u64,
    device: u64,
    /// The job's cgroup, when it is not the executor's own.
    cgroup: Option<PathBuf>,
}

impl JobProcesses {
    /// For the job whose first process is `pid`, its directories on `dir`'s filesystem. `None`
    /// when that process shares the executor's pid namespace (nothing tells the job's processes
    /// from the node's) or cannot be seen.
    pub fn of(pid: u32, dir: &Path) -> Option<Self> {
        let pid_namespace = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?.ino();
        let own = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
        if pid_namespace == own {
            return None;
        }
        let device = std::fs::metadata(dir).ok()?.dev();
        let cgroup = job_cgroup(pid);
        debug!(listed_from = ?cgroup, "the job's processes, for the files they hold open");
        Some(Self {
            pid_namespace,
            device,
            cgroup,
        })
    }

    /// The `/proc` directories of the processes that may be the job's: its cgroup's and those
    /// of the cgroups below it (at most [`MAX_JOB_CGROUPS`]), else every process's.
    fn candidates(&self) -> Vec<PathBuf> {
        if let Some(cgroup) = &self.cgroup
            && let Some(pids) = cgroup_pids(cgroup)
        {
            return pids
                .into_iter()
                .map(|pid| PathBuf::from(format!("/proc/{pid}")))
                .collect();
        }
        let Ok(processes) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        processes
            .flatten()
            .filter(|process| {
                process
                    .file_name()
                    .as_bytes()
                    .iter()
                    .all(u8::is_ascii_digit)
            })
            .map(|process| process.path())
            .collect()
    }

    /// The disk held by deleted files on the directories' filesystem that the job's processes
    /// keep open, each file once. A process that ends or cannot be read is skipped.
    pub fn deleted_but_open(&self) -> u64 {
        let mut counted = HashSet::new();
        let mut bytes = 0u64;
        for dir in self.candidates() {
            let in_job = std::fs::metadata(dir.join("ns/pid"))
                .is_ok_and(|meta| meta.ino() == self.pid_namespace);
            if !in_job {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                let path = fd.path();
                let deleted = std::fs::read_link(&path)
                    .is_ok_and(|target| target.as_os_str().as_bytes().ends_with(b" (deleted)"));
                if !deleted {
                    continue;
                }
                if let Ok(meta) = std::fs::metadata(&path)
                    && meta.is_file()
                    && meta.dev() == self.device
                    && counted.insert(meta.ino())
                {
                    bytes = bytes.saturating_add(meta.blocks().saturating_mul(512));
                }
            }
        }
        bytes
    }
}

/// `pid`'s cgroup (the `pids` controller's in a v1 hierarchy, the unified one in v2), when it
/// can be read and is not this process's own.
fn job_cgroup(pid: u32) -> Option<PathBuf> {
    let job = cgroup_of(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| cgroup_of(&text));
    (own.as_ref() != Some(&job) && job.join("cgroup.procs").is_file()).then_some(job)
}

/// The cgroup that `/proc/PID/cgroup`'s `text` names: the `pids` hierarchy's, else the unified
/// one's.
fn cgroup_of(text: &str) -> Option<PathBuf> {
    cgroup_in(text, "pids").or_else(|| cgroup_in(text, ""))
}

/// The processes of `cgroup` and of the cgroups below it (where a job can make cgroups of its
/// own, its processes in them count too), reading at most [`MAX_JOB_CGROUPS`] cgroups; `None`
/// when `cgroup`'s own list cannot be read.
fn cgroup_pids(cgroup: &Path) -> Option<Vec<u32>> {
    let mut pids = Vec::new();
    let mut cgroups = vec![cgroup.to_owned()];
    let mut read = 0;
    while let Some(dir) = cgroups.pop() {
        let text = std::fs::read_to_string(dir.join("cgroup.procs"));
        if read == 0 {
            text.as_ref().ok()?;
        }
        read += 1;
        pids.extend(
            text.unwrap_or_default()
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if read + cgroups.len() >= MAX_JOB_CGROUPS {
                break;
            }
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                cgroups.push(entry.path());
            }
        }
    }
    Some(pids)
}

/// Why a measurement stopped short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotWithin {
    /// Over a limit: why.
    Over(String),
    /// Something could not be measured: what and why.
    Unmeasurable(String),
}

/// Measures `roots` (each a directory, its entries walked without following links) and the
/// deleted files `processes` hold open, stopping once over `limits`. An entry removed or
/// replaced while walked is skipped.
pub fn measure(
    roots: &[PathBuf],
    processes: Option<&JobProcesses>,
    limits: &DiskLimits,
) -> Result<Usage, NotWithin> {
    let mut usage = Usage {
        bytes: processes.map_or(0, JobProcesses::deleted_but_open),
        files: 0,
    };
    if let Some(why) = usage.over(limits) {
        return Err(NotWithin::Over(why));
    }
    let mut pending: Vec<PathBuf> = roots.to_vec();
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if gone(&error) => continue,
            Err(error) => return Err(unmeasurable(&dir, &error)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) if gone(&error) => break,
                Err(error) => return Err(unmeasurable(&dir, &error)),
            };
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(error) if gone(&error) => continue,
                Err(error) => return Err(unmeasurable(&path, &error)),
            };
            usage.files += 1;
            usage.bytes = usage
                .bytes
                .saturating_add(meta.blocks().saturating_mul(512));
            if let Some(why) = usage.over(limits) {
                return Err(NotWithin::Over(why));
            }
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(usage)
}

/// Removed, or replaced by something else, while walked (by the job): nothing there to count.
fn gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn unmeasurable(path: &Path, error: &io::Error) -> NotWithin {
    NotWithin::Unmeasurable(format!(
        "the job's output could not be measured ({}: {error}); it is stopped since what it \
         holds there cannot be counted",
        path.display()
    ))
}

/// Measures a job's directories on a task of its own while it runs; dropped, it stops.
#[derive(Debug)]
pub struct DiskWatch {
    over: oneshot::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl DiskWatch {
    /// Starts measuring `roots` and what `processes` hold open against `limits`: the first
    /// measurement at once, then at least [`MEASURE_EVERY`] apart.
    pub fn start(roots: Vec<PathBuf>, processes: Option<JobProcesses>, limits: DiskLimits) -> Self {
        let (report, over) = oneshot::channel();
        let watched = std::sync::Arc::new((roots, processes));
        let task = tokio::spawn(async move {
            let mut unmeasurable = 0;
            loop {
                let watched = std::sync::Arc::clone(&watched);
                let started = Instant::now();
                let measured = tokio::task::spawn_blocking(move || {
                    measure(&watched.0, watched.1.as_ref(), &limits)
                })
                .await;
                let took = started.elapsed();
                match measured {
                    Ok(Ok(usage)) => {
                        unmeasurable = 0;
                        debug!(?usage, ?took, "job's disk measured");
                    }
                    Ok(Err(NotWithin::Over(why))) => {
                        let _ = report.send(why);
                        return;
                    }
                    Ok(Err(NotWithin::Unmeasurable(why))) => {
                        unmeasurable += 1;
                        if unmeasurable >= UNMEASURABLE_IN_A_ROW {
                            let _ = report.send(why);
                            return;
                        }
                        debug!(%why, "job's disk not measured; trying again");
                    }
                    // The measuring thread panicked or the runtime is going away.
                    Err(error) => {
                        warn!(%error, "the job's disk is no longer measured");
                        return;
                    }
                }
                let wait = (took * MEASURE_SHARE).clamp(MEASURE_EVERY, MEASURE_EVERY_MAX);
                tokio::time::sleep(wait).await;
            }
        });
        Self { over, task }
    }

    /// Resolves, with why, once the job is over its limits; never while it is within them.
    pub async fn exceeded(&mut self) -> String {
        match (&mut self.over).await {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }

    /// `work`'s outcome, unless the job goes over its limits first: then why.
    pub async fn unless_over<T>(&mut self, work: impl Future<Output = T>) -> Result<T, String> {
        tokio::select! {
            biased;
            why = self.exceeded() => Err(why),
            done = work => Ok(done),
        }
    }
}

impl Drop for DiskWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_cgroup_named_is_the_pids_hierarchys_else_the_unified_one() {
        let v1 = "12:pids:/docker/abc\n11:memory:/docker/abc\n0::/system.slice/docker.service\n";
        assert_eq!(
            cgroup_of(v1),
            Some(PathBuf::from("/sys/fs/cgroup/pids/docker/abc"))
        );
        assert_eq!(
            cgroup_of("0::/system.slice/horde.service\n"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/horde.service"))
        );
        assert_eq!(cgroup_of("3:memory:/x\n"), None);
        assert_eq!(cgroup_of("garbage"), None);
        // Outside the reader's cgroup namespace: not followed.
        assert_eq!(cgroup_of("0::/../../system.slice\n"), None);
    }

    /// A job in a cgroup of its own has its processes listed from that cgroup and the ones below
    /// it (not every process of the host); one in the executor's own cgroup is looked for among
    /// all of `/proc`. Needs root (to make cgroups); said and skipped otherwise.
    #[test]
    fn a_jobs_processes_are_listed_from_its_own_cgroups() {
        let sleep = || {
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap()
        };
        let (mut first, mut second) = (sleep(), sleep());
        assert_eq!(
            job_cgroup(first.id()),
            None,
            "the child shares the test's cgroup"
        );
        let own = cgroup_of(&std::fs::read_to_string("/proc/self/cgroup").unwrap()).unwrap();
        let job = own.join(format!("horde-disk-test-{}", std::process::id()));
        let below = job.join("below");
        let made = std::fs::create_dir(&job).and_then(|()| std::fs::create_dir(&below));
        let listed = made.as_ref().ok().map(|()| {
            std::fs::write(job.join("cgroup.procs"), first.id().to_string()).unwrap();
            std::fs::write(below.join("cgroup.procs"), second.id().to_string()).unwrap();
            let processes = JobProcesses {
                pid_namespace: 0,
                device: 0,
                cgroup: job_cgroup(first.id()),
            };
            let mut candidates = processes.candidates();
            candidates.sort();
            (processes.cgroup.clone(), candidates)
        });
        for sleeper in [&mut first, &mut second] {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
        }
        let _ = std::fs::remove_dir(&below);
        let _ = std::fs::remove_dir(&job);
        if let Err(error) = made {
            eprintln!("skipped: cannot make cgroups at {}: {error}", job.display());
            return;
        }
        let (cgroup, candidates) = listed.unwrap();
        assert_eq!(cgroup, Some(job));
        let mut expected: Vec<_> = [first.id(), second.id()]
            .iter()
            .map(|pid| PathBuf::from(format!("/proc/{pid}")))
            .collect();
        expected.sort();
        assert_eq!(candidates, expected);
    }

    fn limits(bytes: u64, files: u64) -> DiskLimits {
        DiskLimits { bytes, files }
    }

    #[test]
    fn counts_blocks_and_entries_of_every_level() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/one"), vec![1u8; 100_000]).unwrap();
        std::fs::write(dir.path().join("two"), b"x").unwrap();
        let usage = measure(&[dir.path().to_owned()], None, &limits(u64::MAX, u64::MAX)).unwrap();
        assert_eq!(usage.files, 4, "a, a/b, a/b/one, two");
        assert!(usage.bytes >= 100_000, "{usage:?}");
    }

    #[test]
    fn a_sparse_file_counts_what_it_holds_not_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("sparse")).unwrap();
        file.set_len(1 << 40).unwrap();
        let usage = measure(&[dir.path().to_owned()], None, &limits(1 << 20, 10)).unwrap();
        assert!(usage.bytes < 1 << 20, "{usage:?}");
    }

    #[test]
    fn over_bytes_or_entries_says_which() {
        let dir = tempfile::tempdir().unwrap();
        for name in 0..20 {
            std::fs::write(dir.path().join(name.to_string()), vec![7u8; 8192]).unwrap();
        }
        let roots = [dir.path().to_owned()];
        let Err(NotWithin::Over(why)) = measure(&roots, None, &limits(64 * 1024, 1000)) else {
            panic!("not over")
        };
        assert!(why.contains("more than 65536 bytes"), "{why}");
        let Err(NotWithin::Over(why)) = measure(&roots, None, &limits(u64::MAX, 19)) else {
            panic!("not over")
        };
        assert!(why.contains("more than 19 files"), "{why}");
        assert!(measure(&roots, None, &limits(u64::MAX, 20)).is_ok());
    }

    #[test]
    fn a_tree_too_deep_to_name_stops_the_job() {
        // Built the way a job can: each level made relative to the one above, past PATH_MAX.
        use rustix::fs::{Mode, OFlags};
        let dir = tempfile::tempdir().unwrap();
        let name = "d".repeat(250);
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        let mut level = rustix::fs::open(dir.path(), flags, Mode::empty()).unwrap();
        for _ in 0..20 {
            rustix::fs::mkdirat(&level, name.as_str(), Mode::from_raw_mode(0o700)).unwrap();
            level = rustix::fs::openat(&level, name.as_str(), flags, Mode::empty()).unwrap();
        }
        let roots = [dir.path().to_owned()];
        let Err(NotWithin::Unmeasurable(why)) = measure(&roots, None, &limits(u64::MAX, u64::MAX))
        else {
            panic!("measured")
        };
        assert!(why.contains("could not be measured"), "{why}");
    }

    #[tokio::test]
    async fn the_watch_reports_growth_past_the_limit_while_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = DiskWatch::start(vec![dir.path().to_owned()], None, limits(1 << 20, 1000));
        let quiet = tokio::time::timeout(MEASURE_EVERY * 3, watch.exceeded()).await;
        assert!(quiet.is_err(), "reported while within its limits");
        std::fs::write(dir.path().join("big"), vec![1u8; 2 << 20]).unwrap();
        let why = tokio::time::timeout(MEASURE_EVERY * 8, watch.exceeded())
            .await
            .expect("the growth was seen");
        assert!(why.contains("more than 1048576 bytes"), "{why}");
    }
}
