//! The client SDK (feature `client`): what an application needs to run jobs and move blobs,
//! built on `horde-protocol` and `horde-transport` with tokio only — no libp2p, no database, no
//! command-line parser.
//!
//! ```text
//! let client = Client::new(account_key, facilitator)?;
//! let mut job = client.submit(&JobRequest::from_file("job.toml".as_ref())?).await?;
//! let endpoint = job.wait_for_endpoint().await?;      // verified against the chosen miner
//! let connection = job.connect_job(&endpoint).await?; // TLS pinned to the job key
//! ```
//!
//! Layout:
//! - `client/job.rs`: [`Client`] (one shared connection to a facilitator), [`JobRequest`],
//!   [`JobHandle`] (pushed statuses, re-attach, volume lists, terminate), [`ClientError`].
//! - `client/spec.rs`: job-spec and volume-list TOML files ([`JobRequest::from_file`],
//!   [`spec::VolumeListFile`]).
//! - `client/endpoint.rs`: [`VerifiedEndpoint`] (the miner-signed record, checked) and
//!   [`JobConnection`] (QUIC to the job, pinned to the job key; [`JobConnection::request`]: one
//!   HTTP request, the response's exact bytes streamed, then its verified receipt).
//! - `client/report.rs`: cross-validation ([`compare_http`]) and [`ReportEvidence`].
//! - `client/describe.rs`: statuses, refusals and failures in words, as the CLI prints them.
//! - `client/blob.rs`: `horde/blob/1` put and get with retries and resume.
//! - `client/progress.rs`: transfer progress callbacks and the stderr reporter.
//! - `client/runtime.rs`: [`one_thread_runtime`], one thread that spins before it sleeps, for
//!   the lowest round trips.

pub mod blob;
pub mod describe;
mod endpoint;
mod job;
pub mod progress;
mod report;
mod runtime;
pub mod spec;

pub use crate::clock::now;
pub use endpoint::{JobConnection, VerifiedEndpoint};
pub use horde_transport::tunnel::{HttpResponseStream, RequestBody};
pub use job::{Client, ClientError, DEFAULT_SPEC_LIFETIME, JobHandle, JobRequest, REATTACH_WINDOW};
pub use report::{Comparison, ReportEvidence, byte_equal, compare_http};
pub use runtime::one_thread_runtime;
