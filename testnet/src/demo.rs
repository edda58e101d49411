//! The demo: a streaming job end to end through a running testnet, each step printed with the
//! time since submission. Used by `horde-testnet demo` and by the test that keeps it working.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use horde_node::client::{Client, JobConnection, JobHandle, JobRequest, VerifiedEndpoint};
use horde_protocol::{
    BlobHash, JobId, JobStatus, NodeAddr, Program, RelativePath, SecretKey, UploadSpec,
    UploadTarget, VolumeSource, VolumeSpec,
};
use horde_transport::tunnel::http_request;

use crate::demo_job::websocket::{accept_key, decode_frame, encode_frame};
use crate::{Runtime, Testnet};

/// The statuses a passing demo receives, in order.
pub const DEMO_STATUSES: [&str; 8] = [
    "Received",
    "Assigned",
    "Accepted",
    "ExecutorReady",
    "EndpointReady",
    "VolumesFetched",
    "UploadDone",
    "Completed",
];

/// What the demo observed, for callers that check it.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The job.
    pub job_id: JobId,
    /// Statuses in the order the client received them.
    pub statuses: Vec<String>,
    /// Milliseconds from submission to the verified endpoint.
    pub endpoint_ms: u128,
    /// Milliseconds for the whole demo.
    pub total_ms: u128,
}

/// Prints each step of the demo with the time since submission.
struct Steps<'a, W: Write> {
    out: &'a mut W,
    started: Instant,
}

impl<W: Write> Steps<'_, W> {
    fn step(&mut self, text: impl std::fmt::Display) {
        let _ = writeln!(
            self.out,
            "[{:>7.1} ms] {text}",
            self.started.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Runs the demo job (the program, for the process runner) through `testnet`, printing each
/// step to `out`.
pub async fn run_demo(testnet: &Testnet, out: &mut impl Write) -> anyhow::Result<DemoReport> {
    run_demo_with(testnet, demo_program(Runtime::Process).await?, out).await
}

/// What the demo asks to run on a class whose executors use `runtime`: the demo job's path
/// (process runners), or its image ([`crate::image::demo_job_image`], built unless the engine
/// has it already).
pub async fn demo_program(runtime: Runtime) -> anyhow::Result<Program> {
    Ok(match runtime {
        Runtime::Container => Program::Image {
            reference: crate::image::demo_job_image().await?,
        },
        _ => Program::Command {
            program: crate::demo_job_binary()?
                .to_str()
                .context("utf-8 path")?
                .to_owned(),
        },
    })
}

/// Runs the demo with `program` (from [`demo_program`], for the runner of the testnet's class)
/// through `testnet`, printing each step to `out`.
pub async fn run_demo_with(
    testnet: &Testnet,
    program: Program,
    out: &mut impl Write,
) -> anyhow::Result<DemoReport> {
    let storage = testnet.storage().context("the demo needs a storage node")?;
    let shown = match &program {
        Program::Image { reference } => format!("image {reference}"),
        Program::Command { program } => format!("program {program}"),
        other => format!("{other:?}"),
    };
    let request = demo_request(program, &storage);
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let mut steps = Steps {
        out,
        started: Instant::now(),
    };
    let mut job = client.submit(&request).await?;
    steps.step(format!("submitted job {} ({shown})", job.job_id()));
    let mut statuses = Vec::new();
    let endpoint = wait_for_endpoint(&mut job, &mut statuses, &mut steps).await?;
    let endpoint_ms = steps.started.elapsed().as_millis();
    let connection = job.connect_job(&endpoint).await?;
    http_echo_and_stream(&connection, &endpoint, &mut steps).await?;
    websocket_echo(&connection).await?;
    steps.step("WebSocket /ws -> echo round trip; receipt verified");
    volumes_and_outputs(&mut job, &connection, &storage, &mut steps).await?;
    let stdout = terminate(&mut job, &mut statuses, &mut steps).await?;
    read_back(&storage, stdout, &mut steps).await?;
    let total_ms = steps.started.elapsed().as_millis();
    steps.step("demo complete");
    Ok(DemoReport {
        job_id: job.job_id(),
        statuses,
        endpoint_ms,
        total_ms,
    })
}

/// The demo job: `program` on class `cpu`, with an inline volume, logs to `storage`.
fn demo_request(program: Program, storage: &NodeAddr) -> JobRequest {
    let mut request = JobRequest::command("cpu", "");
    request.program = program;
    request.volumes = vec![VolumeSpec {
        path: RelativePath("greeting.txt".into()),
        source: VolumeSource::Inline {
            bytes: b"hello, horde".to_vec(),
        },
    }];
    request.logs = Some(UploadTarget::Blob {
        storage: storage.clone(),
    });
    request
}

/// Follows the statuses (recording their names) until the endpoint is ready and verified.
async fn wait_for_endpoint(
    job: &mut JobHandle,
    statuses: &mut Vec<String>,
    steps: &mut Steps<'_, impl Write>,
) -> anyhow::Result<VerifiedEndpoint> {
    let endpoint = loop {
        let update = job
            .next_status()
            .await?
            .context("facilitator closed the stream")?;
        statuses.push(horde_node::client::describe::name(&update.status));
        steps.step(format!(
            "status #{}: {}",
            update.seq,
            horde_node::client::describe::name(&update.status)
        ));
        match update.status {
            JobStatus::EndpointReady(_) => break job.wait_for_endpoint().await?,
            status if status.is_terminal() => anyhow::bail!("job ended early: {status:?}"),
            _ => {}
        }
    };
    steps.step(format!(
        "endpoint verified: {} (job key {}, signed by miner {})",
        endpoint.address(),
        endpoint.job_key().fmt_short(),
        endpoint.record.miner.fmt_short()
    ));
    Ok(endpoint)
}

/// An HTTP echo (its receipt verified) and a server-sent-events stream through the tunnel.
async fn http_echo_and_stream(
    connection: &JobConnection,
    endpoint: &VerifiedEndpoint,
    steps: &mut Steps<'_, impl Write>,
) -> anyhow::Result<()> {
    let response = http_request(
        &connection.tunnel,
        "POST",
        "/echo",
        b"hello through the tunnel",
    )
    .await?;
    ensure!(
        response.body == b"hello through the tunnel",
        "echo mismatch"
    );
    let receipt = response.receipt.verify_by(&endpoint.job_key())?;
    steps.step(format!(
        "POST /echo -> {} {:?}; receipt verified ({} bytes in, {} out)",
        response.status,
        String::from_utf8_lossy(&response.body),
        receipt.bytes_in,
        receipt.bytes_out
    ));

    let response = http_request(&connection.tunnel, "GET", "/stream?n=5", b"").await?;
    let body = String::from_utf8_lossy(&response.body);
    let tokens = body.matches("data: token-").count();
    ensure!(tokens == 5 && body.contains("[DONE]"), "stream: {body}");
    steps.step(format!(
        "GET /stream -> {tokens} SSE tokens streamed, then [DONE]; receipt verified"
    ));
    Ok(())
}

/// A WebSocket echo on one tunnel stream: handshake, one text frame each way, close.
async fn websocket_echo(connection: &JobConnection) -> anyhow::Result<()> {
    let mut ws = connection.tunnel.open().await?;
    let key = "ZGVtby13ZWJzb2NrZXQta2V5";
    ws.write(
        format!(
            "GET /ws HTTP/1.1\r\nHost: job\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut received = Vec::new();
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        received.extend_from_slice(&ws.read().await?.context("websocket handshake")?);
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    ensure!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
    ensure!(head.contains(&accept_key(key)), "bad Sec-WebSocket-Accept");
    let mut buffer = received[head_end..].to_vec();
    ws.write(&encode_frame(
        true,
        0x1,
        b"ping over QUIC",
        Some([1, 2, 3, 4]),
    ))
    .await?;
    let echoed = loop {
        if let Some((frame, used)) =
            decode_frame(&buffer, 1 << 20).map_err(|e| anyhow::anyhow!("websocket: {e}"))?
        {
            buffer.drain(..used);
            break frame;
        }
        buffer.extend_from_slice(&ws.read().await?.context("websocket echo")?);
    };
    ensure!(
        echoed.payload == b"ping over QUIC",
        "websocket echo mismatch"
    );
    ws.write(&encode_frame(true, 0x8, b"", Some([5, 6, 7, 8])))
        .await?;
    ws.finish_sending().await?;
    while ws.read().await?.is_some() {}
    ensure!(ws.receipt().is_some(), "websocket stream without receipt");
    Ok(())
}

/// A volume list sent mid-session (the job reads it), then an output the job writes, uploaded to
/// `storage`.
async fn volumes_and_outputs(
    job: &mut JobHandle,
    connection: &JobConnection,
    storage: &NodeAddr,
    steps: &mut Steps<'_, impl Write>,
) -> anyhow::Result<()> {
    job.send_volumes(
        1,
        vec![VolumeSpec {
            path: RelativePath("later.txt".into()),
            source: VolumeSource::Inline {
                bytes: b"fetched mid-session".to_vec(),
            },
        }],
        vec![UploadSpec {
            path: RelativePath("answer.txt".into()),
            target: UploadTarget::Blob {
                storage: storage.clone(),
            },
        }],
    )
    .await?;
    job.wait_for(|s| matches!(s, JobStatus::VolumesFetched { volume_msg_id: 1 }))
        .await?;
    let response = http_request(&connection.tunnel, "GET", "/volume?path=later.txt", b"").await?;
    ensure!(response.body == b"fetched mid-session", "volume mismatch");
    steps.step("volume list 1 fetched mid-session; the job reads it");

    let response =
        http_request(&connection.tunnel, "POST", "/output?path=answer.txt", b"42").await?;
    ensure!(response.status == 200, "output: {}", response.status);
    let done = job
        .wait_for(|s| matches!(s, JobStatus::UploadDone(_)))
        .await?;
    if let JobStatus::UploadDone(done) = done {
        for output in &done.outputs {
            steps.step(format!(
                "uploaded {} ({} bytes, blake3 {})",
                output.path,
                output.size,
                output.hash.fmt_short()
            ));
        }
    }
    Ok(())
}

/// Ends the job, records the rest of its statuses, and returns its uploaded stdout.
async fn terminate(
    job: &mut JobHandle,
    statuses: &mut Vec<String>,
    steps: &mut Steps<'_, impl Write>,
) -> anyhow::Result<BlobHash> {
    job.terminate().await?;
    let end = job.wait_for_end().await?;
    statuses.extend(
        job.history()
            .iter()
            .skip(statuses.len())
            .map(|u| horde_node::client::describe::name(&u.status)),
    );
    let JobStatus::Completed(result) = end else {
        anyhow::bail!("job ended: {end:?}");
    };
    steps.step(format!(
        "terminated: Completed, exit {:?}, {} outputs (stdout, stderr)",
        result.exit_code,
        result.outputs.len()
    ));
    let stdout = result
        .outputs
        .iter()
        .find(|o| o.path.0 == "stdout")
        .context("stdout was not uploaded")?;
    Ok(stdout.hash)
}

/// Downloads the job's stdout from `storage` with a fresh key.
async fn read_back(
    storage: &NodeAddr,
    stdout: BlobHash,
    steps: &mut Steps<'_, impl Write>,
) -> anyhow::Result<()> {
    let downloader = horde_transport::HordeEndpoint::bind(
        &SecretKey::generate(),
        horde_transport::EndpointConfig::new(
            ([127, 0, 0, 1], 0).into(),
            &[horde_transport::ALPN_BLOB],
        ),
    )?;
    let log = horde_node::client::blob::get_to_memory(
        &downloader,
        storage,
        stdout,
        16 << 20,
        &Default::default(),
        &mut horde_node::client::progress::NoProgress,
    )
    .await?;
    steps.step(format!(
        "job stdout read back from storage: {} bytes, {} lines",
        log.len(),
        log.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count()
    ));
    Ok(())
}
