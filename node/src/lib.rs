//! horde-node: the roles of a horde node, its configuration, the client SDK, and the `horde`
//! binary (a thin `main.rs` over this library).
//!
//! Layout:
//! - `config.rs`: the TOML node configuration ([`config::NodeConfig`]), validated at load time.
//! - `node.rs`: start-up and shutdown ([`RunningNode`], [`run_until_signal`]).
//! - `client.rs`: the client SDK ([`client::Client`], [`client::JobHandle`]).
//! - `facilitator.rs` (+ `facilitator/store.rs`), `validator.rs`, `miner.rs`, `executor.rs`: the
//!   roles of the streaming-job flow, one file each.
//! - `job_cli.rs`: the `horde job …` commands.
//! - `discovery.rs` (+ `discovery/directory.rs`): libp2p discovery and the node-record directory.
//! - `receipts.rs`: the accounting-receipt log validators and miners keep; `receipts_cli.rs`:
//!   `horde receipts`.
//! - `peers.rs`: outgoing connections shared by every job to a peer.
//! - `storage.rs`: the storage role (content-addressed blob store served over `horde/blob/1`).
//! - `blob_client.rs`: blob put/get for clients and executors, with resume and progress.
//! - `volumes.rs`: materializing job volumes and uploading outputs.
//! - `runner.rs` (+ `runner/`): how an executor starts a job and isolates it (bubblewrap
//!   sandboxes, the in-sandbox init and its bridge to the executor).

pub mod blob_client;
pub mod client;
pub mod config;
pub mod discovery;
pub mod executor;
pub mod facilitator;
pub mod job_cli;
pub mod miner;
mod node;
mod peers;
pub mod receipts;
pub mod receipts_cli;
pub mod runner;
pub mod storage;
pub mod tied;
pub mod validator;
pub mod volumes;

pub use node::{NodeError, RunningNode, role_alpns, run_until_signal};
