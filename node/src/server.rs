//! The node's roles (feature `server`): facilitator, validator, miner, executor and storage, with
//! discovery and the node's configuration, start-up and shutdown.
//!
//! Layout:
//! - `server/config.rs` (+ `config/encoding.rs`): the TOML node configuration
//!   ([`config::NodeConfig`]), one serde type per section, validated at load.
//! - `server/node.rs`: start-up and shutdown ([`RunningNode`], [`run_until_signal`]).
//! - `server/bound.rs`: the ports a node bound, kept in its data dir and reused on restart.
//! - `server/role.rs`: how every role starts and stops: `start(…) -> RoleHandle`, a `JoinSet`
//!   under the role's child cancellation token, one `shutdown(grace)` for all.
//! - `server/relay.rs`: the relay loop of one hop (`Relay`, driven by a role's `RelayPolicy`)
//!   and `Hop::failed`, the one way a hop reports `HordeFailed`.
//! - `server/streams.rs`: incoming job streams dispatched to a role, and outgoing connections
//!   shared by every job to a peer.
//! - `server/receipts.rs`: the accounting-receipt log validators and miners keep.
//! - `server/supervision.rs`: process supervision (a child tied to its parent's life).
//! - `server/cleanup.rs`: removing a directory a job wrote in, whatever the job did to its
//!   permissions (the executor's job directories, the miner's ended executors).
//! - `server/discovery.rs` (+ `discovery/`): libp2p discovery and the node-record directory.
//! - `server/facilitator.rs` (+ `facilitator/store.rs`), `server/validator.rs`
//!   (+ `validator/seen.rs`), `server/miner.rs`, `server/executor.rs` (+ `executor/http.rs`,
//!   `executor/outputs.rs`, `executor/disk.rs`, `executor/volumes.rs`, `executor/volumes/upload.rs`),
//!   `server/storage.rs`: the roles, one
//!   folder each. Roles never import each other; what two roles share lives here or in
//!   `horde-protocol`.

pub mod bound;
pub mod cleanup;
pub mod config;
pub mod discovery;
pub mod executor;
pub mod facilitator;
pub mod miner;
mod node;
pub mod receipts;
mod relay;
mod role;
pub mod storage;
mod streams;
pub mod supervision;
pub mod validator;

/// The environment variable carrying an executor's one-time registration token (miner → the
/// executor it starts).
pub const EXECUTOR_TOKEN_ENV: &str = "HORDE_EXECUTOR_TOKEN";

pub use node::{NodeError, RunningNode, role_alpns, run_until_signal};
