//! Nothing of a job outlives its executor: the container guard, and reaping at start.
//!
//! The engine runs containers on its own, so an executor that dies (SIGKILL, OOM, its miner's
//! death) would leave its job running. Beside each container the executor starts a *container
//! guard* (`horde guard-container --parent PID --container NAME --engine URL`), a small process
//! tied to the executor with `PR_SET_PDEATHSIG` the way `guard-group` guards process groups
//! ([`crate::server::supervision`]): when the executor is gone the kernel sends it SIGTERM, which it catches
//! and answers by force-removing the container through the engine API — within about the time
//! of one `docker rm -f` (well under the 5 s allowed). The guard is started *before* the
//! container is created, under the name the container will get, so there is no moment when a
//! container exists unguarded; when the job ends normally the executor removes the container
//! and kills the guard.
//!
//! What a guard cannot cover (the engine down when the executor died, or a machine reboot) is
//! caught at the next start: every container labelled [`EXECUTOR_LABEL`] whose executor
//! (`PID.STARTTIME`, so a reused pid does not count) no longer runs is removed.

use std::path::Path;
use std::process::Stdio;

use bollard::query_parameters::RemoveContainerOptions;

use super::engine::{Engine, engine_error, is_not_found};
use super::spec::EXECUTOR_LABEL;
use crate::server::executor::runner::RunnerError;

/// The hidden `horde` subcommand that guards a job's container.
pub const GUARD_CONTAINER_SUBCOMMAND: &str = "guard-container";

/// This process as an executor: `PID.STARTTIME` (start time in clock ticks since boot, from
/// `/proc/self/stat`), unique across pid reuse.
pub fn executor_identity() -> String {
    identity_of(std::process::id()).unwrap_or_else(|| std::process::id().to_string())
}

/// `PID.STARTTIME` of process `pid`, if it runs.
fn identity_of(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything; fields after the
    // last `)` are plain. Start time is field 22, the 20th after the name.
    let (_, rest) = stat.rsplit_once(')')?;
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid}.{start}"))
}

/// Whether the executor a container's label names still runs.
pub(crate) fn executor_alive(label: &str) -> bool {
    let Some(pid) = label
        .split('.')
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        // Not a label we wrote: leave the container alone.
        return true;
    };
    identity_of(pid).as_deref() == Some(label)
}

/// Starts the guard of container `name` (see the module docs): `program` is the `horde`
/// binary (`/proc/self/exe` in the node). Must run on a thread that lives as long as the
/// executor (a tokio worker, never `spawn_blocking`): the kernel ties the guard to it. Its
/// handle does not kill it when dropped: a dropped job is still guarded.
pub(crate) fn spawn_guard(
    program: &Path,
    name: &str,
    engine: &Engine,
) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(program)
        .arg(GUARD_CONTAINER_SUBCOMMAND)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--container")
        .arg(name)
        .arg("--engine")
        .arg(&engine.address)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
}

/// Force-removes container `name`; gone already is fine.
pub(crate) async fn remove_container(engine: &Engine, name: &str) -> Result<(), RunnerError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..RemoveContainerOptions::default()
    };
    match engine.docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(()),
        Err(error) if is_not_found(&error) => Ok(()),
        // "removal already in progress" (409): someone else is removing it.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(error) => Err(engine_error(engine, &format!("removing {name}"), error)),
    }
}

/// The container guard (`horde guard-container`): waits for SIGTERM, which the kernel sends
/// when `parent` ends, then force-removes `container` through the engine at `engine`. If
/// `parent` is already gone when it starts, it removes the container at once.
pub fn guard_container(parent: u32, container: &str, engine: &str) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        crate::server::supervision::parent_ended(parent).await?;
        let engine = Engine::connect(engine)
            .await
            .map_err(std::io::Error::other)?;
        remove_container(&engine, container)
            .await
            .map_err(std::io::Error::other)
    })
}

/// Removes every container labelled by an executor that no longer runs. Returns how many.
pub(crate) async fn reap_stale(engine: &Engine) -> Result<usize, RunnerError> {
    // Listed leniently: Podman's states (`stopped`, …) are not bollard's.
    let containers = super::state::list(engine, EXECUTOR_LABEL).await?;
    let mut reaped = 0;
    for container in containers {
        let id = container.id;
        let executor = container
            .labels
            .get(EXECUTOR_LABEL)
            .cloned()
            .unwrap_or_default();
        if executor_alive(&executor) {
            continue;
        }
        tracing::info!(container = %id, %executor, "removing a stale job container");
        remove_container(engine, &id).await?;
        reaped += 1;
    }
    Ok(reaped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_executor_is_known_by_pid_and_start_time() {
        let me = executor_identity();
        assert!(me.starts_with(&format!("{}.", std::process::id())), "{me}");
        assert!(executor_alive(&me));
        // Same pid, another start time: a reused pid, so the executor is gone.
        let reused = format!("{}.1", std::process::id());
        assert!(!executor_alive(&reused));
        assert!(!executor_alive("4194303.5"));
        assert!(executor_alive("not ours"));
    }
}
