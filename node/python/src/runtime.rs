//! The tokio runtime the SDK's futures run on, and the two ways Python waits for them:
//! [`block_on`] (the synchronous API: the GIL released, Ctrl-C checked every
//! [`SIGNAL_CHECK_INTERVAL`]) and [`awaitable`] (the asyncio API: an `asyncio.Future` completed
//! from the runtime through `call_soon_threadsafe`, so no call blocks the event loop).
//!
//! The runtime belongs to one process: a child made by `fork()` inherits none of its threads, so
//! the child gets a runtime of its own on first use, and objects made in the parent refuse to
//! work in the child ([`ProcessBound`]) rather than hang on connections it does not own.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::IntoPyObjectExt as _;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};
use tokio::runtime::Runtime;

use crate::errors::HordeError;

/// How often a blocking call wakes to let Python run its signal handlers (Ctrl-C): often enough
/// to feel immediate, rare enough to cost nothing.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// Worker threads of the runtime: one, so a connection's every hop (UDP socket → quinn's endpoint
/// → its connection → the task reading the stream) stays on one thread, as in `horde job
/// forward` and `horde blob`; a blob's disk work has threads of its own. Measured with
/// `benches/python_sdk.py`, two runs each, alternating: request round trip 1.30 / 1.18× the Rust
/// client's with two workers, 1.11 / 0.99× with one; 1 GiB `blob_get` 0.92 / 0.86× the one-thread
/// CLI's rate with two, 0.93 / 1.00× with one (benches/RESULTS.md, "One thread for the blob
/// CLI"). A Python callback that calls the SDK while the runtime runs it is served too
/// ([`block_on`] hands the worker's other tasks to a fresh thread while it waits).
const WORKER_THREADS: usize = 1;

/// The runtime of this process, with the process id it was made in. A runtime is leaked rather
/// than dropped: after a fork its threads are gone and dropping it would wait for them.
static RUNTIME: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);

/// The runtime of the current process, made on first use.
pub(crate) fn runtime() -> PyResult<&'static Runtime> {
    let pid = std::process::id();
    let mut current = RUNTIME
        .lock()
        .map_err(|_| HordeError::new_err("the runtime lock is poisoned"))?;
    if let Some((owner, runtime)) = *current
        && owner == pid
    {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("horde-sdk")
        .enable_all()
        .build()
        .map_err(|e| HordeError::new_err(format!("starting the async runtime: {e}")))?;
    let runtime: &'static Runtime = Box::leak(Box::new(runtime));
    *current = Some((pid, runtime));
    Ok(runtime)
}

/// Marks an object as owned by the process that made it (its connections live in that
/// process's runtime).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcessBound(u32);

impl ProcessBound {
    /// Owned by the current process.
    pub(crate) fn here() -> Self {
        Self(std::process::id())
    }

    /// Fails in a forked child: the parent's connections are not the child's.
    pub(crate) fn check(self, what: &str) -> PyResult<()> {
        if self.0 == std::process::id() {
            Ok(())
        } else {
            Err(HordeError::new_err(format!(
                "this {what} was made in process {} before a fork: a child process does not \
                 share its parent's connections; make a new one in the child",
                self.0
            )))
        }
    }
}

/// Runs `future` on the runtime and waits for it with the GIL released, waking every
/// [`SIGNAL_CHECK_INTERVAL`] to run Python's signal handlers: a `KeyboardInterrupt` (or any
/// exception a handler raises) cancels the future — its task is aborted, so its streams are
/// reset and its connections released — and is raised.
pub(crate) fn block_on<F, T>(py: Python<'_>, future: F) -> PyResult<T>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: Send + 'static,
{
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let task = runtime()?.spawn(async move {
        let _ = done.send(future.await);
    });
    // Called on the runtime's worker (a progress callback calling the SDK): the worker's other
    // tasks, this call's among them, move to another thread while this one waits.
    if tokio::runtime::Handle::try_current().is_ok() {
        return tokio::task::block_in_place(|| wait_for(py, result, &task));
    }
    wait_for(py, result, &task)
}

/// Waits for `task`'s result with the GIL released, running Python's signal handlers every
/// [`SIGNAL_CHECK_INTERVAL`] (see [`block_on`]).
fn wait_for<T>(
    py: Python<'_>,
    mut result: std::sync::mpsc::Receiver<PyResult<T>>,
    task: &tokio::task::JoinHandle<()>,
) -> PyResult<T>
where
    T: Send + 'static,
{
    loop {
        let (receiver, received) = py.detach(move || {
            let received = result.recv_timeout(SIGNAL_CHECK_INTERVAL);
            (result, received)
        });
        result = receiver;
        match received {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(error) = py.check_signals() {
                    task.abort();
                    return Err(error);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(HordeError::new_err(
                    "the operation's task ended without a result",
                ));
            }
        }
    }
}

/// Runs `future` on the runtime and returns an `asyncio.Future` of the running loop that it
/// completes (from the runtime, with `call_soon_threadsafe`). Cancelling the asyncio future
/// aborts the task.
pub(crate) fn awaitable<'py, F, T>(py: Python<'py>, future: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let asyncio_future = event_loop.call_method0("create_future")?;
    let target = asyncio_future.clone().unbind();
    let event_loop = event_loop.unbind();
    let task = runtime()?.spawn(async move {
        let result = future.await;
        Python::attach(|py| {
            let outcome = result.and_then(|value| value.into_py_any(py));
            let (ok, value) = match outcome {
                Ok(value) => (true, value),
                Err(error) => (false, error.into_value(py).into_any()),
            };
            let complete = PyCFunction::new_closure(
                py,
                None,
                None,
                |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
                    let (future, ok, value): (Bound<'_, PyAny>, bool, Bound<'_, PyAny>) =
                        args.extract()?;
                    if future.call_method0("done")?.is_truthy()? {
                        return Ok(()); // cancelled meanwhile
                    }
                    let method = if ok { "set_result" } else { "set_exception" };
                    future.call_method1(method, (value,))?;
                    Ok(())
                },
            );
            let scheduled = complete.and_then(|complete| {
                event_loop.call_method1(py, "call_soon_threadsafe", (complete, target, ok, value))
            });
            if let Err(error) = scheduled {
                // The loop is closed: nobody awaits the result any more.
                tracing::debug!(%error, "completing an asyncio future");
            }
        });
    });
    let abort = task.abort_handle();
    let on_done = PyCFunction::new_closure(
        py,
        None,
        None,
        move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
            if args.get_item(0)?.call_method0("cancelled")?.is_truthy()? {
                abort.abort();
            }
            Ok(())
        },
    )?;
    asyncio_future.call_method1("add_done_callback", (on_done,))?;
    Ok(asyncio_future)
}
