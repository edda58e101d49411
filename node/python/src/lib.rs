//! The `horde` Python package's native module (`horde._native`): horde-node's client SDK, in
//! its client-only build, for Python through PyO3. The QUIC connections, TLS key pinning,
//! signatures, receipt and blob verification are the Rust client's; this crate only bridges
//! them: every operation is a future on a tokio runtime that Python either waits for (the GIL
//! released, Ctrl-C honoured) or awaits (an asyncio future).
//!
//! Built two ways: by maturin into the wheel (a cdylib with PyO3's `extension-module` feature,
//! see `pyproject.toml`), and as an rlib by `cargo test --workspace` and clippy.
//!
//! Layout:
//! - `runtime.rs`: the per-process runtime, blocking with signal checks, asyncio futures.
//! - `errors.rs`: the exception hierarchy and the mapping from the Rust client's errors.
//! - `keys.rs`: `Key` (key files, SS58).
//! - `client.rs`: `Client` (submit, attach).
//! - `job.rs`: `Job` (statuses, endpoint, requests, volumes, terminate, report), with
//!   `job/actor.rs` and `job/http.rs`.
//! - `blob.rs`: blob put and get with progress.
//! - `types.rs`: `Status`, `Output`, `Endpoint`, `Receipt`.
//!
//! The Python side (`python/horde/`) adds `JobSpec`, `Response`, the asyncio classes and the
//! type stubs.

mod blob;
mod client;
mod errors;
mod job;
mod keys;
mod runtime;
mod types;

use pyo3::prelude::*;

/// The native module.
#[pymodule]
#[pyo3(name = "_native")]
fn native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(module)?;
    keys::register(module)?;
    blob::register(module)?;
    module.add_class::<client::Client>()?;
    module.add_class::<job::Job>()?;
    module.add_class::<job::http::ResponseStream>()?;
    module.add_class::<job::http::Forward>()?;
    module.add_class::<types::Status>()?;
    module.add_class::<types::Output>()?;
    module.add_class::<types::Endpoint>()?;
    module.add_class::<types::Receipt>()?;
    Ok(())
}
