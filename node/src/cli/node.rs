//! `horde node`: load the config (file + flags), init tracing, run the role until a signal.

use std::net::SocketAddr;
use std::path::PathBuf;

use horde_protocol::Role;

use crate::server::config::{NodeConfig, Overrides};
use crate::server::discovery::BootstrapPeer;

/// `horde node` flags; each overrides the config file.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
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
    bootstrap: Vec<BootstrapPeer>,
    /// UDP address of the discovery (libp2p QUIC) listener (overrides the file).
    #[arg(long)]
    p2p_listen: Option<SocketAddr>,
}

/// Loads the node's config; the caller runs it with [`crate::server::run_until_signal`].
pub(crate) fn load(args: NodeArgs) -> anyhow::Result<NodeConfig> {
    init_tracing();
    let overrides = Overrides {
        role: args.role,
        key_file: args.key,
        listen: args.listen,
        data_dir: args.data_dir,
        bootstrap: args.bootstrap,
        p2p_listen: args.p2p_listen,
    };
    Ok(NodeConfig::load(&args.config, &overrides)?)
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
