//! horde-node: the client SDK, the roles of a horde node, and the `horde` command line, each
//! behind a Cargo feature so an application that embeds the client compiles only the client.
//!
//! Features (default: all three):
//! - `client`: [`client`] — submit jobs, follow statuses, reach jobs, move blobs (protocol +
//!   transport + tokio, serde/toml for spec files).
//! - `server`: [`server`] — the roles, discovery (libp2p), the job store (redb), URL volumes
//!   (ureq). Implies `client`.
//! - `cli`: [`cli`] — the `horde` binary's commands (clap, tracing-subscriber, anyhow). Implies
//!   `server`.
//!
//! Layout: `clock.rs` (the wall clock, read in one place), `atomic_file.rs` (the one atomic
//! file write), `client.rs` + `client/`,
//! `server.rs` + `server/`, `cli.rs` + `cli/`. Dependencies run `cli → server → client`, never
//! backwards.

#[cfg(feature = "server")]
mod atomic_file;
pub mod clock;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "cli")]
pub mod cli;
