//! The Rust client's side of the Python SDK benchmark (`benches/python_sdk.py`): attaches to a
//! running job, then times `requests` HTTP round trips (`POST /echo`, a new tunnel stream each,
//! the job's receipt verified) through `JobConnection::request`, exactly what
//! `horde.Job.request` runs under Python. Prints one line: `median_us P p90_us Q n N`.
//!
//! `cargo run --release -p horde-benches --bin sdk-request-rtt -- --facilitator HOTKEY@IP:PORT
//! --account ACCOUNT.json --job JOB_ID --client-key JOB_KEY.json [--requests N] [--body-bytes N]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use horde_node::client::{Client, RequestBody};
use horde_protocol::{JobId, NodeAddr, SecretKey};

/// Times request round trips to one job through the Rust client.
#[derive(Debug, clap::Parser)]
#[command(name = "sdk-request-rtt")]
struct Args {
    /// The facilitator: HOTKEY@IP:PORT.
    #[arg(long)]
    facilitator: NodeAddr,
    /// The account key file that owns the job.
    #[arg(long)]
    account: PathBuf,
    /// The job id.
    #[arg(long)]
    job: String,
    /// The job's per-job client key file.
    #[arg(long)]
    client_key: PathBuf,
    /// Round trips to time (after 10 untimed ones).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Request body size (echoed back).
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

/// Untimed round trips first: the connection is warm when timing starts.
const WARM_UP: usize = 10;

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let account = SecretKey::read_key_file(&args.account)?;
    let client_key = SecretKey::read_key_file(&args.client_key)?;
    let job_id: JobId = args
        .job
        .parse()
        .map_err(|_| anyhow::anyhow!("bad job id"))?;
    let client = Client::new(account, args.facilitator)?;
    let mut job = client.attach(job_id, Some(client_key)).await?;
    let endpoint = job.wait_for_endpoint().await?;
    let connection = job.connect_job(&endpoint).await?;
    let body = vec![b'x'; args.body_bytes];
    let mut times = Vec::with_capacity(args.requests);
    for i in 0..WARM_UP + args.requests {
        let started = Instant::now();
        let mut response = connection
            .request("POST", "/echo", RequestBody::<&[u8]>::Bytes(&body))
            .await?;
        let mut received = 0;
        while let Some(piece) = response.next_body().await? {
            received += piece.len();
        }
        response
            .finish()
            .await?
            .verify_by(&endpoint.job_key())
            .context("receipt")?;
        anyhow::ensure!(received == body.len(), "echo of {received} bytes");
        if i >= WARM_UP {
            times.push(started.elapsed().as_micros());
        }
    }
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!("median_us {} p90_us {} n {}", at(0.5), at(0.9), times.len());
    connection.close().await;
    client.close().await;
    Ok(())
}
