//! Helpers for cross-validation tests: settings the harness does not write (trusted miners,
//! exclusion periods) edited into a node's config with a restart, and an `Assign` sent straight to
//! a validator to see whether it would drive a job on a miner.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use horde_node::server::config::NodeConfig;
use horde_protocol::messages::Assignment;
use horde_protocol::{
    ControlMessage, DownMessage, JobSpec, NodeAddr, SecretKey, Signed, UpMessage,
};
use horde_transport::{ALPN_CONTROL, EndpointConfig, HordeEndpoint, open_session};

use crate::Testnet;

/// Changes `name`'s config with `edit` and restarts the node so it reads it.
pub fn reconfigure(
    testnet: &mut Testnet,
    name: &str,
    edit: impl FnOnce(&mut NodeConfig),
) -> anyhow::Result<()> {
    testnet.edit_config(name, edit)?;
    testnet.restart(name)
}

/// Sends `Assign {spec, miner}` straight to `validator` (as a facilitator would) with a fresh
/// key, tells it to proceed once it acknowledged, and returns the validator's first answer after
/// that. A validator that accepts starts driving the job; dropping the returned session ends it.
pub async fn assign_directly(
    validator: &NodeAddr,
    spec: Signed<JobSpec>,
    miner: NodeAddr,
) -> anyhow::Result<(UpMessage, horde_transport::JobSession)> {
    let mut session = assign_without_proceeding(validator, spec, miner).await?;
    session.send_down(&DownMessage::Proceed).await?;
    match session.recv().await? {
        Some(ControlMessage::Up(message)) => Ok((message, session)),
        other => bail!("validator answered {other:?}"),
    }
}

/// Sends `Assign {spec, miner}` straight to `validator` with a fresh key and returns the session
/// once the validator acknowledged it (`AssignmentReceived`), without telling it to proceed:
/// the validator must not act on the job until it is told.
pub async fn assign_without_proceeding(
    validator: &NodeAddr,
    spec: Signed<JobSpec>,
    miner: NodeAddr,
) -> anyhow::Result<horde_transport::JobSession> {
    let key = SecretKey::generate();
    let bind: SocketAddr = ([127, 0, 0, 1], 0).into();
    let endpoint = HordeEndpoint::bind(&key, EndpointConfig::new(bind, &[ALPN_CONTROL]))?;
    let addr = *validator
        .addrs
        .first()
        .context("validator has no address")?;
    let connection = endpoint
        .connect(addr, &validator.hotkey, ALPN_CONTROL)
        .await?;
    let job_id = spec.verify()?.job_id;
    let mut session = open_session(
        &connection,
        job_id,
        &DownMessage::Assign(Assignment { spec, miner }),
    )
    .await?;
    match session.recv().await? {
        Some(ControlMessage::Up(UpMessage::AssignmentReceived)) => Ok(session),
        other => bail!("validator answered {other:?} instead of AssignmentReceived"),
    }
}
