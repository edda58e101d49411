//! The job actor: one task per job handle that owns the Rust [`JobHandle`], reads its pushed
//! statuses into a `watch` channel every Python caller reads from, and serves volume lists and
//! terminate requests from a bounded inbox (`biased;`: a command goes before the next status;
//! reading statuses is cancel-safe). It ends when the job has ended and every Python handle is
//! gone, or at once when the handles are gone: the job itself keeps running (until terminated
//! or its deadline) and can be attached again by id.

use horde_node::client::{JobHandle, VerifiedEndpoint};
use horde_protocol::messages::StatusUpdate;
use horde_protocol::{UploadSpec, VolumeSpec};
use tokio::sync::{mpsc, oneshot, watch};

use crate::errors::Failure;

/// Commands waiting for the actor: a caller sends one and waits for its answer, so a handful
/// is plenty.
pub(crate) const INBOX: usize = 8;

/// What every caller can see of the job.
#[derive(Debug, Default, Clone)]
pub(crate) struct JobState {
    /// Statuses in order, each once.
    pub(crate) statuses: Vec<StatusUpdate>,
    /// The endpoint record once `EndpointReady` arrived: verified, or why it was refused.
    pub(crate) endpoint: Option<Result<VerifiedEndpoint, Failure>>,
    /// The status stream ended: after the terminal status (`Ok`), or broken for good.
    pub(crate) closed: Option<Result<(), Failure>>,
}

/// A request to the actor.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send a signed volume list.
    Volumes {
        volume_msg_id: u64,
        fetch: Vec<VolumeSpec>,
        upload: Vec<UploadSpec>,
        reply: oneshot::Sender<Result<(), Failure>>,
    },
    /// Ask for the job to end.
    Terminate {
        reply: oneshot::Sender<Result<(), Failure>>,
    },
}

/// Runs the actor until the job has ended and the inbox is closed, or the inbox closes.
pub(crate) async fn run(
    mut handle: JobHandle,
    mut inbox: mpsc::Receiver<Command>,
    state: watch::Sender<JobState>,
) {
    loop {
        let open = state.borrow().closed.is_none();
        tokio::select! {
            biased;
            command = inbox.recv() => {
                let Some(command) = command else { return };
                serve(&mut handle, command, open).await;
            }
            update = handle.next_status(), if open => match update {
                Ok(Some(update)) => {
                    let endpoint = match update.status {
                        horde_protocol::JobStatus::EndpointReady(_) => {
                            Some(handle.wait_for_endpoint().await.map_err(Failure::from))
                        }
                        _ => None,
                    };
                    let terminal = update.status.is_terminal();
                    state.send_modify(|state| {
                        state.statuses.push(update);
                        if endpoint.is_some() {
                            state.endpoint = endpoint;
                        }
                        if terminal {
                            state.closed = Some(Ok(()));
                        }
                    });
                }
                Ok(None) => state.send_modify(|state| state.closed = Some(Ok(()))),
                Err(error) => {
                    let failure = Failure::from(error);
                    state.send_modify(|state| state.closed = Some(Err(failure)));
                }
            },
        }
    }
}

async fn serve(handle: &mut JobHandle, command: Command, open: bool) {
    let ended = || Err(Failure::Ended("the job has ended already".to_owned()));
    match command {
        Command::Volumes {
            volume_msg_id,
            fetch,
            upload,
            reply,
        } => {
            let result = if open {
                handle
                    .send_volumes(volume_msg_id, fetch, upload)
                    .await
                    .map_err(Failure::from)
            } else {
                ended()
            };
            let _ = reply.send(result);
        }
        Command::Terminate { reply } => {
            let result = if open {
                handle.terminate().await.map_err(Failure::from)
            } else {
                ended()
            };
            let _ = reply.send(result);
        }
    }
}
