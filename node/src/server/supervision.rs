//! Child processes that do not outlive the process that starts them, however it ends — a clean
//! exit, SIGKILL, the OOM killer, a crash. An executor never outlives its miner, nor a job (with
//! everything it started) its executor, and nothing keeps running (holding a GPU, a port, a job
//! directory) with no one supervising it.
//!
//! A miner starts each executor as `horde exec-tied --parent PID -- PROGRAM ARGS…`
//! ([`tied_command`]): the kernel kills it (SIGKILL) when the thread that started it ends.
//! That launcher asks for the parent-death signal (`PR_SET_PDEATHSIG`), checks that its parent
//! is still the one that started it (else the parent is already gone and it exits), then execs
//! the program in its place: same pid, process group, environment, working directory and open
//! files. The signal setting survives the exec.
//!
//! The kernel ties the child to the starting *thread*: the roles start children from tokio
//! worker threads, which live as long as the node's runtime (never start one from
//! `spawn_blocking` or `block_in_place`: that thread's exit would kill the child). The signal
//! setting is cleared by the kernel when the program is set-user-ID, set-group-ID or has file
//! capabilities.
//!
//! That signal reaches only the process itself, not what it started. A job and its own children
//! (a shell's commands, worker processes) share the job's process group, so the executor starts
//! the job directly and, beside it, a *group guard* ([`guard_command`],
//! `horde guard-group --parent PID --group PGID`): tied to the executor with SIGTERM, which it
//! catches, it kills the job's whole process group with SIGKILL when the executor is gone. The
//! executor stops the guard when the job has ended. The job's start thus pays no extra exec.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

/// The hidden `horde` subcommand that starts a tied child.
pub const TIED_SUBCOMMAND: &str = "exec-tied";

/// The hidden `horde` subcommand that guards a job's process group.
pub const GUARD_SUBCOMMAND: &str = "guard-group";

/// The running binary, as the launcher: `/proc/self/exe` names it even after the file has been
/// replaced or deleted (a rebuild while a node runs).
const LAUNCHER: &str = "/proc/self/exe";

/// A command that runs `program` tied to this process (see the module docs). Add its arguments,
/// environment and settings as for `program` itself.
pub fn tied_command(program: &Path) -> tokio::process::Command {
    let mut command = launcher(TIED_SUBCOMMAND);
    command.arg("--").arg(program);
    command
}

/// A command for the group guard of process group `group` (see the module docs), tied to this
/// process. Keep its child handle (with `kill_on_drop`) for as long as the group must be
/// guarded.
pub fn guard_command(group: u32) -> tokio::process::Command {
    let mut command = launcher(GUARD_SUBCOMMAND);
    command.arg("--group").arg(group.to_string());
    command
}

/// This binary's `subcommand`, told this process is its parent.
fn launcher(subcommand: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(LAUNCHER);
    command
        .arg(subcommand)
        .arg("--parent")
        .arg(std::process::id().to_string());
    command
}

/// The group guard (`horde guard-group`): waits for SIGTERM, which the kernel sends when
/// `parent` ends, then kills process group `group` with SIGKILL. If `parent` is already gone
/// when it starts, it kills the group at once.
pub fn guard_group(parent: u32, group: u32) -> std::io::Result<()> {
    let group = i32::try_from(group)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("{group} is not a process group id")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        parent_ended(parent).await?;
        // Gone already (ESRCH) is what was wanted.
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        Ok(())
    })
}

/// Returns once `parent`, this process's parent, has ended (at once if it already has): the
/// kernel sends SIGTERM at its death (`PR_SET_PDEATHSIG`), which this catches. For the guards.
pub(crate) async fn parent_ended(parent: u32) -> std::io::Result<()> {
    // Catch SIGTERM before asking for it, and ask before checking the parent: the parent's end
    // cannot slip between the steps unnoticed.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
    if parent_is(parent) {
        terminate.recv().await;
    }
    Ok(())
}

/// Whether this process's parent is still `parent`.
fn parent_is(parent: u32) -> bool {
    rustix::process::getppid().and_then(|pid| u32::try_from(pid.as_raw_nonzero().get()).ok())
        == Some(parent)
}

/// The launcher (`horde exec-tied`): ties this process to `parent`, then execs `program` with
/// `args`. Returns only if that fails.
pub fn exec_tied(parent: u32, program: &OsStr, args: &[OsString]) -> std::io::Error {
    if let Err(error) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        return error.into();
    }
    // The parent may have ended before the signal was asked for: then this process has been
    // given to another parent, and must not start the program.
    if !parent_is(parent) {
        return std::io::Error::other(format!("the parent process {parent} is gone"));
    }
    std::process::Command::new(program).args(args).exec()
}

/// Where `program` is, as `exec` would find it: a name with a `/` is a path (relative to `cwd`,
/// the child's working directory), any other name is looked up in `path_var` (the child's
/// `PATH`). Errors as `exec` would give them — `NotFound`, `PermissionDenied` for a file that is
/// not executable — but before anything is started, so the caller can report them as such.
pub fn resolve_program(
    program: &str,
    path_var: Option<&OsStr>,
    cwd: &Path,
) -> std::io::Result<PathBuf> {
    let executable = |path: &Path| -> std::io::Result<()> {
        let metadata = std::fs::metadata(path)?;
        // Executable by this process (its user and groups, the mount), as exec will check.
        let allowed = rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok();
        if metadata.is_file() && allowed {
            Ok(())
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} is not an executable file", path.display()),
            ))
        }
    };
    if program.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    // Absolute, so the result does not depend on the working directory it is used from.
    let cwd = std::path::absolute(cwd)?;
    if program.contains('/') {
        let path = cwd.join(program);
        executable(&path)?;
        return Ok(path);
    }
    let mut refused = None;
    for dir in std::env::split_paths(path_var.unwrap_or_default()) {
        let candidate = cwd.join(dir).join(program);
        match executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                refused = Some(error);
            }
            Err(_) => {}
        }
    }
    Err(refused.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{program} is not in PATH"),
        )
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn programs_resolve_as_exec_would_find_them() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("job.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("data.txt");
        std::fs::write(&plain, "x").unwrap();
        let path_var = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).unwrap();
        let cwd = Path::new("/");

        // By name through PATH, by absolute path, by path relative to the working directory.
        assert_eq!(
            resolve_program("job.sh", Some(&path_var), cwd).unwrap(),
            script
        );
        let absolute = script.to_str().unwrap();
        assert_eq!(resolve_program(absolute, None, cwd).unwrap(), script);
        assert_eq!(
            resolve_program("./job.sh", None, dir.path()).unwrap(),
            dir.path().join("./job.sh")
        );

        // Missing, not executable, a directory, empty: each refused with exec's kind of error.
        let kind = |program: &str| {
            resolve_program(program, Some(&path_var), dir.path())
                .unwrap_err()
                .kind()
        };
        assert_eq!(kind("no-such-job"), std::io::ErrorKind::NotFound);
        assert_eq!(kind("./no-such-job"), std::io::ErrorKind::NotFound);
        assert_eq!(kind("data.txt"), std::io::ErrorKind::PermissionDenied);
        assert_eq!(kind("./data.txt"), std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            kind(dir.path().to_str().unwrap()),
            std::io::ErrorKind::PermissionDenied
        );
        assert_eq!(kind(""), std::io::ErrorKind::InvalidInput);
        // No PATH at all: nothing is found by name.
        assert_eq!(
            resolve_program("job.sh", None, cwd).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
