//! The job's cgroup parent: the engine makes the container's cgroups below one the runner makes
//! (`HostConfig.CgroupParent`, a path from the hierarchies' root), beneath the executor's own
//! v1 memory cgroup. The engine still sets the class's limits on the container's own cgroups;
//! the parent has none. It is there to count: `oom_kill` in its `memory.oom_control` counts the
//! kernel's OOM kills below it, read as the process runner reads its jobs' own
//! ([`super::super::process::oom_killed`]). Podman's service (4.3) never sets
//! `State.OOMKilled`; Docker Engine does; a job is out of memory when either says so.
//!
//! Without a writable v1 memory cgroup (another host layout), no parent is made and only the
//! engine's word counts. The parent is removed with the job, in every hierarchy the engine made
//! it in; one left by an executor that was killed is reaped at the next runner's start, as the
//! process runner's are.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::process::{oom_killed, own_cgroup, reap_stale_cgroups};

/// Where v1 hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One job's cgroup parent (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct CgroupParent {
    /// Its path from the hierarchies' root: what the engine is given.
    relative: String,
    /// Its directory in the memory hierarchy.
    memory: PathBuf,
}

impl CgroupParent {
    /// Makes `horde-job-NAME` below this executor's memory cgroup; `None` where it cannot.
    pub(super) fn create(name: &str) -> Option<Self> {
        let own = own_cgroup("memory")?;
        let memory = own.join(format!("horde-job-{name}"));
        std::fs::create_dir(&memory).ok()?;
        let relative = memory
            .strip_prefix(Path::new(CGROUP_ROOT).join("memory"))
            .ok()?
            .to_str()
            .map(|path| format!("/{path}"));
        match relative {
            Some(relative) => Some(Self { relative, memory }),
            None => {
                let _ = std::fs::remove_dir(&memory);
                None
            }
        }
    }

    /// Empty job cgroup parents older than a minute, left by executors that were killed.
    pub(super) fn reap_stale() {
        if let Some(own) = own_cgroup("memory") {
            reap_stale_cgroups(&own);
        }
    }

    /// The engine's `CgroupParent`.
    pub(super) fn path(&self) -> &str {
        &self.relative
    }

    /// Whether the kernel killed a process of the job for memory.
    pub(super) fn out_of_memory(&self) -> bool {
        oom_killed(&self.memory)
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
