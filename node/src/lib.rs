//! horde-node: the roles of a horde node, its configuration, the client SDK, and the `horde`
//! binary (a thin `main.rs` over this library).
//!
//! Layout:
//! - `config.rs`: the TOML node configuration ([`config::NodeConfig`]), validated at load time.
//! - `node.rs`: start-up and shutdown ([`RunningNode`], [`run_until_signal`]).

pub mod config;
mod node;

pub use node::{NodeError, RunningNode, role_alpns, run_until_signal};
