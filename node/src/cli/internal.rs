//! Hidden subcommands the node starts itself (process supervision); not for people.

use anyhow::Context as _;

use crate::server::executor::runner::{bridge, container};
use crate::server::supervision;

/// Internal subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum InternalCommand {
    /// Internal: start PROGRAM tied to process PARENT (killed when PARENT's starting thread
    /// ends). Used by miners for executors.
    #[command(name = supervision::TIED_SUBCOMMAND, hide = true)]
    ExecTied {
        /// The pid of the process that must still be this process's parent.
        #[arg(long)]
        parent: u32,
        /// The program to exec.
        program: std::ffi::OsString,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Internal: kill process group GROUP with SIGKILL once process PARENT is gone. Started by
    /// executors beside each job.
    #[command(name = supervision::GUARD_SUBCOMMAND, hide = true)]
    GuardGroup {
        /// The pid of the process whose end triggers the kill.
        #[arg(long)]
        parent: u32,
        /// The process group to kill.
        #[arg(long)]
        group: u32,
    },
    /// Internal: the init of a job's sandbox (run by bubblewrap inside it, with the bridge's
    /// socket as stdout): starts PROGRAM and connects the executor to it.
    #[command(name = bridge::SANDBOX_INIT_SUBCOMMAND, hide = true)]
    SandboxInit {
        /// The job's port inside the sandbox (required with PROGRAM).
        #[arg(long)]
        port: Option<u16>,
        /// Drop to this uid (and gid) first.
        #[arg(long)]
        uid: Option<u32>,
        /// RLIMIT_AS for the job, in bytes.
        #[arg(long)]
        address_space: Option<u64>,
        /// RLIMIT_FSIZE for the job, in bytes.
        #[arg(long)]
        file_size: Option<u64>,
        /// The job's program; none for a pre-made sandbox, whose job comes over the bridge.
        #[arg(requires = "port")]
        program: Option<std::ffi::OsString>,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Internal: force-remove container CONTAINER once process PARENT is gone. Started by
    /// executors beside each job container.
    #[command(name = container::GUARD_CONTAINER_SUBCOMMAND, hide = true)]
    GuardContainer {
        /// The pid of the process whose end triggers the removal.
        #[arg(long)]
        parent: u32,
        /// The container's name or id.
        #[arg(long)]
        container: String,
        /// The engine socket (`unix:///…`); default: `DOCKER_HOST`, else the standard socket.
        #[arg(long)]
        engine: Option<String>,
    },
}

/// Runs an internal command (synchronously: these exec or block on purpose).
pub(crate) fn run(command: InternalCommand) -> anyhow::Result<()> {
    match command {
        InternalCommand::ExecTied {
            parent,
            program,
            args,
        } => {
            let error = supervision::exec_tied(parent, &program, &args);
            Err(anyhow::Error::new(error).context(format!(
                "starting {}",
                std::path::Path::new(&program).display()
            )))
        }
        InternalCommand::GuardGroup { parent, group } => supervision::guard_group(parent, group)
            .with_context(|| format!("guarding process group {group}")),
        InternalCommand::SandboxInit {
            port,
            uid,
            address_space,
            file_size,
            program,
            args,
        } => {
            let code = bridge::sandbox_init(bridge::SandboxInitArgs {
                port,
                uid,
                address_space,
                file_size,
                program,
                args,
            })
            .context("sandbox init")?;
            std::process::exit(code)
        }
        InternalCommand::GuardContainer {
            parent,
            container,
            engine,
        } => {
            let engine = container::engine::engine_address(engine.as_deref())?;
            container::guard_container(parent, &container, &engine)
                .with_context(|| format!("guarding container {container}"))
        }
    }
}
