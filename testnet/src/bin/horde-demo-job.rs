//! horde-demo-job: the demo job the executor runs in tests and demos.
//!
//! Reads `HORDE_JOB_PORT`, `HORDE_VOLUME_DIR`, `HORDE_OUTPUT_DIR` and `HORDE_EXECUTOR_URL` from the
//! environment and serves `/health`, `/echo`, `/stream`, `/ws`, `/volume`, `/output` and `/exit`
//! on `127.0.0.1:$HORDE_JOB_PORT` (see [`horde_testnet::demo_job`]). `--fail-health` makes
//! `/health` answer 503 forever, for negative tests.

use horde_testnet::demo_job::{DemoConfig, run};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = DemoConfig::from_env(std::env::args().skip(1))?;
    run(config).await
}
