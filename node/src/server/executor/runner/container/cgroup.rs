//! The job's cgroup parent: the engine makes the container's cgroups below one the runner makes
//! (`HostConfig.CgroupParent`, a path from the hierarchies' root), beneath the executor's own
//! v1 memory cgroup, and the class's memory limit is set on that parent instead of the
//! container's own cgroup. So the kernel's out-of-memory handling happens at the parent, and
//! the runner learns of it there: v1 counts a kill in the victim's own cgroup only (`oom_kill`
//! of `memory.oom_control`, which the engine removes with the container), so the runner
//! registers an eventfd for the parent's `memory.oom_control` (`cgroup.event_control`, as
//! Docker Engine does for the container's own), signalled when the parent runs out of memory;
//! its `oom_kill` is read too, as the process runner reads its jobs'
//! ([`super::super::process::oom_killed`]). Podman's service (4.3)
//! never sets `State.OOMKilled`; Docker Engine does; a job is out of memory when either says
//! so. Under Podman the container's monitor (`conmon`) lives below the parent too: its memory,
//! about a megabyte, counts towards the job's limit.
//!
//! Without a writable v1 memory cgroup (another host layout), or for a class without a memory
//! limit, no parent is made: the engine sets the limit and only its word counts. The parent is
//! removed with the job, in every hierarchy the engine made it in; one left by an executor that
//! was killed is reaped at the next runner's start, as the process runner's are.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::super::CGROUP_ROOT;
use super::super::process::{oom_killed, own_cgroup, reap_stale_cgroups};

/// One job's cgroup parent (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct CgroupParent {
    /// Its path from the hierarchies' root: what the engine is given.
    relative: String,
    /// Its directory in the memory hierarchy.
    memory: PathBuf,
    /// Signalled when the parent runs out of memory.
    oom_events: Option<Arc<OwnedFd>>,
}

impl CgroupParent {
    /// Makes `horde-job-NAME` below this executor's memory cgroup, limited to `bytes` (swap
    /// included where the kernel counts it); `None` where it cannot.
    pub(super) fn create(name: &str, bytes: u64) -> Option<Self> {
        let own = own_cgroup("memory")?;
        let memory = own.join(format!("horde-job-{name}"));
        std::fs::create_dir(&memory).ok()?;
        let relative = memory
            .strip_prefix(Path::new(CGROUP_ROOT).join("memory"))
            .ok()
            .and_then(Path::to_str)
            .map(|path| format!("/{path}"));
        let limited = std::fs::write(memory.join("memory.limit_in_bytes"), bytes.to_string());
        match (relative, limited) {
            (Some(relative), Ok(())) => {
                let swap = memory.join("memory.memsw.limit_in_bytes");
                let _ = std::fs::write(swap, bytes.to_string());
                let oom_events = oom_events(&memory).map(Arc::new);
                if oom_events.is_none() {
                    tracing::warn!(
                        "no out-of-memory notification for a job's cgroup: only the engine can \
                         say it ran out of memory"
                    );
                }
                Some(Self {
                    relative,
                    memory,
                    oom_events,
                })
            }
            _ => {
                let _ = std::fs::remove_dir(&memory);
                None
            }
        }
    }

    /// Empty job cgroup parents older than a minute, left by executors that were killed, in
    /// every hierarchy the engine made them in.
    pub(super) fn reap_stale() {
        let memory = Path::new(CGROUP_ROOT).join("memory");
        let Some(own) = own_cgroup("memory") else {
            return;
        };
        let (Ok(relative), Ok(hierarchies)) =
            (own.strip_prefix(&memory), std::fs::read_dir(CGROUP_ROOT))
        else {
            return;
        };
        for hierarchy in hierarchies.filter_map(Result::ok) {
            reap_stale_cgroups(&hierarchy.path().join(relative));
        }
    }

    /// The engine's `CgroupParent`.
    pub(super) fn path(&self) -> &str {
        &self.relative
    }

    /// Whether the job ran out of memory (the kernel then kills one of its processes).
    pub(super) fn out_of_memory(&self) -> bool {
        let signalled = self.oom_events.as_ref().is_some_and(|events| {
            let mut count = [0u8; 8];
            rustix::io::read(events.as_ref(), &mut count).is_ok_and(|n| n == 8)
                && u64::from_ne_bytes(count) > 0
        });
        signalled || oom_killed(&self.memory)
    }

    /// Removes it (and anything the engine left in it) from every v1 hierarchy, once the
    /// container is gone: cgroups of exited processes go a moment after them.
    pub(super) async fn remove(&self) {
        let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
            return;
        };
        let dirs: Vec<PathBuf> = hierarchies
            .filter_map(Result::ok)
            .map(|entry| entry.path().join(self.relative.trim_start_matches('/')))
            .filter(|dir| dir.is_dir())
            .collect();
        for _ in 0..50 {
            if dirs.iter().all(|dir| remove_tree(dir)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(parent = %self.relative, "a job's cgroup parent could not be removed");
    }
}

/// A non-blocking eventfd the kernel signals when the memory cgroup `dir` runs out of memory.
fn oom_events(dir: &Path) -> Option<OwnedFd> {
    use rustix::event::{EventfdFlags, eventfd};
    let events = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).ok()?;
    // The registration keeps its own reference to the control file.
    let control = std::fs::File::open(dir.join("memory.oom_control")).ok()?;
    let line = format!("{} {}", events.as_raw_fd(), control.as_raw_fd());
    std::fs::write(dir.join("cgroup.event_control"), line).ok()?;
    Some(events)
}

/// Removes the cgroup `dir` and the cgroups below it, deepest first; whether it is gone.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}
