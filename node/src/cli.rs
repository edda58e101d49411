//! The `horde` command line: one clap tree, one tokio runtime, errors on one line.
//!
//! Layout:
//! - `cli.rs`: [`Cli`], dispatch ([`main`]), the one-line error report.
//! - `cli/key.rs`: `horde key …`; `cli/node.rs`: `horde node`; `cli/job.rs` (+ `job/`): `horde job …`;
//!   `cli/blob.rs`: `horde blob …`; `cli/nodes.rs`: `horde nodes`; `cli/receipts.rs`:
//!   `horde receipts`; `cli/internal.rs`: hidden subcommands the node starts itself.

/// `println!` for a command's output. When the reader has gone away (`horde job status ID |
/// head -1`), the command ends quietly with status 141, as a shell tool killed by `SIGPIPE`
/// does, instead of panicking; any other write error ends it with a one-line message.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*), true)
    };
}

/// `print!` for a command's output; see [`out!`].
macro_rules! out_part {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*), false)
    };
}

pub mod blob;
pub mod internal;
pub mod job;
pub mod key;
pub mod node;
mod nodes;
pub mod receipts;

use std::future::Future;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::server::discovery::BootstrapPeer;

/// horde: a QUIC peer-to-peer network for streaming compute jobs.
#[derive(Debug, Parser)]
#[command(name = "horde", version)]
pub struct Cli {
    /// On failure, print the whole error report (every cause, and a backtrace when
    /// `RUST_BACKTRACE` asks for one) instead of one line.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or inspect hotkey files.
    Key {
        #[command(subcommand)]
        command: key::KeyCommand,
    },
    /// Run a node.
    Node(node::NodeArgs),
    /// Put and get blobs on a storage node.
    Blob {
        #[command(subcommand)]
        command: blob::BlobCommand,
    },
    /// Run streaming jobs and talk to them.
    Job {
        #[command(subcommand)]
        command: job::JobCommand,
    },
    /// List the nodes a node has discovered (asked over its discovery port).
    Nodes {
        /// The node to ask: `HOTKEY@IP:PORT` of its discovery listener.
        #[arg(long)]
        peer: BootstrapPeer,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the accounting receipts a validator or miner stored, verifying each.
    Receipts(receipts::ReceiptsArgs),
    #[command(flatten)]
    Internal(internal::InternalCommand),
}

/// Exit code of `horde job run --follow` / `horde job status` when the job completed but some
/// upload (a declared output, a mid-session upload, stdout/stderr to `logs_storage`) failed;
/// each is printed as `not uploaded: PATH to TARGET: REASON`. Any other failure exits 1; clap's
/// usage errors exit 2.
pub const EXIT_NOT_UPLOADED: u8 = 3;

/// A failure that exits with its own code rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct CommandFailed {
    /// The process's exit code.
    pub(crate) code: u8,
    /// The one-line error.
    pub(crate) message: String,
}

/// Parses the command line, runs the command, prints a failure on one line; the process's exit
/// code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", describe_error(&error, verbose));
            match error.downcast_ref::<CommandFailed>() {
                Some(failed) => std::process::ExitCode::from(failed.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Key { command } => key::run(command),
        Command::Receipts(args) => receipts::run(&args),
        Command::Internal(command) => internal::run(command),
        Command::Blob { command } => {
            block_on_one_thread(false, async { Ok(blob::run_command(command).await?) })
        }
        Command::Job { command } if command.is_relay() => {
            block_on_one_thread(true, job::run_command(command))
        }
        Command::Job { command } => block_on(job::run_command(command)),
        Command::Nodes { peer, json } => block_on(nodes::run(&peer, json)),
        Command::Node(args) => {
            let config = node::load(args)?;
            block_on(async { Ok(crate::server::run_until_signal(config).await?) })
        }
    }
}

/// Writes one piece of a command's output to stdout (a line when `line`); see [`out!`].
pub(crate) fn write_out(args: std::fmt::Arguments<'_>, line: bool) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| {
            if line {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(STATUS_OUTPUT_CLOSED)
        }
        Err(error) => {
            eprintln!("error: writing to standard output: {error}");
            std::process::exit(1)
        }
    }
}

/// The exit status when the reader of stdout went away: 128 + SIGPIPE, what a shell reports for
/// a tool the signal ended.
const STATUS_OUTPUT_CLOSED: i32 = 141;

/// The one tokio runtime of a `horde` process, built for the commands that need one.
fn block_on(future: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

/// A current-thread runtime for a relay (`horde job forward`) and for blob transfers: like
/// nginx's worker, one thread carries every hop (local socket → tunnel stream → quinn's
/// connection → UDP socket and back), so no wake-up crosses threads; on a loaded machine each
/// crossing is a futex wake and a scheduling delay on the round trip. A blob's disk work runs on
/// threads of its own (the writer, the checkpoints, hashing a file to upload). Measured, `horde
/// blob get` of 1 GiB across a veth pair at MTU 1,500: 3.85–4.01 Gbit/s at 3.06–3.48 CPU s/GiB
/// (both ends) on the 2-worker runtime, 4.80–5.52 at 2.66–2.73 on this one (benches/RESULTS.md,
/// "One thread for the blob CLI"). A relay (`spin`) also spins for its answers before it
/// sleeps ([`crate::client::one_thread_runtime`]).
fn block_on_one_thread(
    spin: bool,
    future: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    crate::client::one_thread_runtime(spin)
        .context("starting the async runtime")?
        .block_on(future)
}

/// One line per failure for the person at the terminal: `error: what: why: …`, each cause once
/// (our error types include their cause in their own message, so the plain chain says it twice).
/// With `--verbose`, the full report (with its backtrace when `RUST_BACKTRACE` asks) instead; the
/// environment alone never turns a user-facing error into a stack trace.
fn describe_error(error: &anyhow::Error, verbose: bool) -> String {
    if verbose {
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
