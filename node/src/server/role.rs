//! How every role starts and stops: a role's `start` returns a [`RoleHandle`] that owns the
//! role's tasks in a `JoinSet` under the role's own cancellation token (a child of the node's),
//! and [`RoleHandle::shutdown`] is the same call for every role.
//!
//! Tasks a role starts while it runs (a facilitator's job drivers, a miner's executor watchers)
//! go into its [`ChildTasks`], a `JoinSet` kept with the state they belong to; one of the
//! handle's tasks closes it when the role is cancelled and waits for them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use horde_protocol::Role;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, warn};

use crate::server::facilitator::Facilitator;
use crate::server::miner::Miner;
use crate::server::storage::BlobStore;
use crate::server::validator::Validator;

/// What a role does with incoming connections.
#[derive(Debug, Clone)]
pub(crate) enum Service {
    Facilitator(Arc<Facilitator>),
    Validator(Arc<Validator>),
    Miner(Arc<Miner>),
    Storage(Arc<BlobStore>),
    /// Executors dial their miner; they accept nothing.
    None,
}

/// The role is shutting down: the task was not started.
#[derive(Debug, thiserror::Error)]
#[error("the role is shutting down")]
pub(crate) struct ShuttingDown;

/// The tasks a role starts while it runs, in a `JoinSet`, until the role closes it at shutdown.
#[derive(Debug, Default)]
pub(crate) struct ChildTasks {
    running: JoinSet<()>,
    closed: bool,
}

impl ChildTasks {
    /// Starts `task` (in the current span) unless the set is closed; forgets tasks that ended.
    pub(crate) fn spawn(
        &mut self,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ShuttingDown> {
        if self.closed {
            return Err(ShuttingDown);
        }
        while self.running.try_join_next().is_some() {}
        self.running.spawn(task.in_current_span());
        Ok(())
    }

    /// Closes the set: no task starts any more. Returns the running ones, to wait for.
    pub(crate) fn close(&mut self) -> JoinSet<()> {
        self.closed = true;
        std::mem::take(&mut self.running)
    }
}

/// Waits for every task in `tasks` (taken with [`ChildTasks::close`]) to end.
pub(crate) async fn join_all(mut tasks: JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// A running role: the tasks it owns, under its own cancellation token.
#[derive(Debug)]
pub(crate) struct RoleHandle {
    role: Role,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    service: Service,
    /// Cancelled when the role's own work ends (an executor whose miner went away).
    done: CancellationToken,
}

impl RoleHandle {
    /// A handle for `role` serving `service`, whose tasks stop on `cancel`.
    pub(crate) fn new(role: Role, service: Service, cancel: CancellationToken) -> Self {
        Self {
            role,
            cancel,
            tasks: JoinSet::new(),
            service,
            done: CancellationToken::new(),
        }
    }

    /// Runs `task` as one of the role's tasks (in the current span).
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task.in_current_span());
    }

    /// The role's cancellation token (a child of the node's).
    pub(crate) fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// What incoming connections are handed to.
    pub(crate) fn service(&self) -> &Service {
        &self.service
    }

    /// A token to cancel when the role's own work ends.
    pub(crate) fn done_token(&self) -> CancellationToken {
        self.done.clone()
    }

    /// Resolves when the role's own work ended (only executors end by themselves).
    pub(crate) async fn done(&self) {
        self.done.cancelled().await;
    }

    /// Cancels the role and waits for its tasks to end, at most `grace`; then aborts what is
    /// left.
    pub(crate) async fn shutdown(mut self, grace: Duration) {
        self.cancel.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            warn!(role = %self.role, ?grace, "role's grace period over; aborting its remaining tasks");
            self.tasks.abort_all();
        }
    }
}
