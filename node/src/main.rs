//! The `horde` binary: parse the command line, load config, init tracing, run, wait for ctrl-c.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use horde_node::config::{NodeConfig, Overrides};
use horde_protocol::{Role, SecretKey};

/// horde: a QUIC peer-to-peer network for streaming compute jobs.
#[derive(Debug, Parser)]
#[command(name = "horde", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or inspect hotkey files.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Run a node.
    Node(NodeArgs),
    /// Put and get blobs on a storage node.
    Blob {
        #[command(subcommand)]
        command: horde_node::blob_client::BlobCommand,
    },
    /// Run streaming jobs and talk to them.
    Job {
        #[command(subcommand)]
        command: horde_node::job_cli::JobCommand,
    },
    /// List the nodes a node has discovered (asked over its discovery port).
    Nodes {
        /// The node to ask: `HOTKEY@IP:PORT` of its discovery listener.
        #[arg(long)]
        peer: horde_node::discovery::BootstrapPeer,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the accounting receipts a validator or miner stored, verifying each.
    Receipts(horde_node::receipts_cli::ReceiptsArgs),
    /// Internal: start PROGRAM tied to process PARENT (killed when PARENT's starting thread
    /// ends). Used by executors for job processes and by miners for executors.
    #[command(name = horde_node::tied::TIED_SUBCOMMAND, hide = true)]
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
    #[command(name = horde_node::tied::GUARD_SUBCOMMAND, hide = true)]
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
    #[command(name = horde_node::runner::bridge::SANDBOX_INIT_SUBCOMMAND, hide = true)]
    SandboxInit {
        /// The job's port inside the sandbox.
        #[arg(long)]
        port: u16,
        /// Drop to this uid (and gid) first.
        #[arg(long)]
        uid: Option<u32>,
        /// RLIMIT_AS for the job, in bytes.
        #[arg(long)]
        address_space: Option<u64>,
        /// The job's program.
        program: std::ffi::OsString,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Generate a new hotkey and write it as a JSON key file with mode 0600.
    Generate {
        /// Where to write the key file (never overwritten).
        #[arg(long, short, default_value = "hotkey.json")]
        out: PathBuf,
    },
    /// Show the SS58 address and hex public key of a key file.
    Show {
        /// The key file.
        #[arg(default_value = "hotkey.json")]
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// The node's config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// The role to play (overrides the file): facilitator, validator, miner, executor, storage.
    #[arg(long)]
    role: Option<Role>,
    /// The hotkey file (overrides the file).
    #[arg(long)]
    key: Option<PathBuf>,
    /// QUIC listen address (overrides the file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// State directory (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A discovery peer to join through, `HOTKEY@IP:PORT` or `/ip4/…/udp/…/quic-v1/p2p/…`
    /// (repeatable; added to the file's `[discovery] bootstrap`).
    #[arg(long)]
    bootstrap: Vec<horde_node::discovery::BootstrapPeer>,
    /// UDP address of the discovery (libp2p QUIC) listener (overrides the file).
    #[arg(long)]
    p2p_listen: Option<SocketAddr>,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", describe_error(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// One line per failure for the person at the terminal: `error: what: why: …`, each cause once
/// (our error types include their cause in their own message, so the plain chain says it twice).
/// With `RUST_BACKTRACE` set, the full report with its backtrace instead.
fn describe_error(error: &anyhow::Error) -> String {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|value| value != "0") {
        return format!("Error: {error:?}");
    }
    format!("error: {}", one_line(error))
}

/// `error` and its causes on one line, `: `-separated, skipping a cause its effect already quotes.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Key { command } => key_command(command),
        Command::Blob { command } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            Ok(runtime.block_on(horde_node::blob_client::run_command(command))?)
        }
        Command::Job { command } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(horde_node::job_cli::run_command(command))
        }
        Command::Nodes { peer, json } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let records = runtime.block_on(horde_node::discovery::list_nodes(&peer))?;
            horde_node::discovery::print_nodes(&records, json);
            Ok(())
        }
        Command::Receipts(args) => horde_node::receipts_cli::run(&args),
        Command::ExecTied {
            parent,
            program,
            args,
        } => {
            let error = horde_node::tied::exec_tied(parent, &program, &args);
            Err(anyhow::Error::new(error).context(format!(
                "starting {}",
                std::path::Path::new(&program).display()
            )))
        }
        Command::SandboxInit {
            port,
            uid,
            address_space,
            program,
            args,
        } => {
            let code = horde_node::runner::bridge::sandbox_init(
                horde_node::runner::bridge::SandboxInitArgs {
                    port,
                    uid,
                    address_space,
                    program,
                    args,
                },
            )
            .context("sandbox init")?;
            std::process::exit(code)
        }
        Command::GuardGroup { parent, group } => horde_node::tied::guard_group(parent, group)
            .with_context(|| format!("guarding process group {group}")),
        Command::Node(args) => {
            init_tracing();
            let overrides = Overrides {
                role: args.role,
                key_file: args.key,
                listen: args.listen,
                data_dir: args.data_dir,
                bootstrap: args.bootstrap,
                p2p_listen: args.p2p_listen,
            };
            let config = NodeConfig::load(&args.config, &overrides)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            Ok(runtime.block_on(horde_node::run_until_signal(config))?)
        }
    }
}

fn key_command(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Generate { out } => {
            let key = SecretKey::generate();
            key.write_key_file(&out)?;
            let hotkey = key.hotkey();
            println!("wrote {}", out.display());
            println!("ss58: {hotkey}");
            println!("hex:  0x{}", hotkey.to_hex());
        }
        KeyCommand::Show { file } => {
            let hotkey = SecretKey::read_key_file(&file)?.hotkey();
            println!("ss58: {hotkey}");
            println!("hex:  0x{}", hotkey.to_hex());
        }
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connect: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out");
        let quoted = anyhow::Error::new(Quoting(timed_out())).context("submitting the job");
        assert_eq!(
            one_line(&quoted),
            "submitting the job: connect: handshake timed out"
        );
        let plain = anyhow::Error::new(timed_out()).context("reading job.toml");
        assert_eq!(one_line(&plain), "reading job.toml: handshake timed out");
    }
}
