//! The demo: a streaming job end to end through a running testnet, each step printed with the
//! time since submission. Used by `horde-testnet demo` and by the test that keeps it working.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use horde_node::client::{Client, JobRequest};
use horde_protocol::{
    JobStatus, RelativePath, SecretKey, UploadSpec, UploadTarget, VolumeSource, VolumeSpec,
};
use horde_transport::tunnel::http_request;

use crate::Testnet;
use crate::demo_job::websocket::{accept_key, decode_frame, encode_frame};

/// What the demo observed, for callers that check it.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Statuses in the order the client received them.
    pub statuses: Vec<String>,
    /// Milliseconds from submission to the verified endpoint.
    pub endpoint_ms: u128,
    /// Milliseconds for the whole demo.
    pub total_ms: u128,
}

fn status_name(status: &JobStatus) -> String {
    let shown = format!("{status:?}");
    shown
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Runs the demo job through `testnet`, printing each step to `out`.
pub async fn run_demo(testnet: &Testnet, out: &mut impl Write) -> anyhow::Result<DemoReport> {
    let storage = testnet.storage().context("the demo needs a storage node")?;
    let program = crate::demo_job_binary()?;
    let mut request = JobRequest::command("cpu", program.to_str().context("utf-8 path")?);
    request.volumes = vec![VolumeSpec {
        path: RelativePath("greeting.txt".into()),
        source: VolumeSource::Inline {
            bytes: b"hello, horde".to_vec(),
        },
    }];
    request.logs = Some(UploadTarget::Blob {
        storage: storage.clone(),
    });
    let client = Client::new(SecretKey::generate(), testnet.facilitator())?;
    let started = Instant::now();
    let step = |out: &mut dyn Write, text: String| {
        let _ = writeln!(
            out,
            "[{:>7.1} ms] {text}",
            started.elapsed().as_secs_f64() * 1e3
        );
    };
    let mut job = client.submit(&request).await?;
    step(out, format!("submitted job {}", job.job_id()));
    let mut statuses = Vec::new();
    let endpoint = loop {
        let update = job
            .next_status()
            .await?
            .context("facilitator closed the stream")?;
        statuses.push(status_name(&update.status));
        step(
            out,
            format!("status #{}: {}", update.seq, status_name(&update.status)),
        );
        match update.status {
            JobStatus::EndpointReady(_) => break job.wait_for_endpoint().await?,
            status if status.is_terminal() => anyhow::bail!("job ended early: {status:?}"),
            _ => {}
        }
    };
    let endpoint_ms = started.elapsed().as_millis();
    step(
        out,
        format!(
            "endpoint verified: {} (job key {}, signed by miner {})",
            endpoint.address(),
            endpoint.job_key().fmt_short(),
            endpoint.record.miner.fmt_short()
        ),
    );
    let connection = job.connect_job(&endpoint).await?;
    let call = |method: &'static str, path: &'static str, body: &'static [u8]| {
        let connection = &connection;
        async move { http_request(&connection.tunnel, method, path, body).await }
    };

    let response = call("POST", "/echo", b"hello through the tunnel").await?;
    ensure!(
        response.body == b"hello through the tunnel",
        "echo mismatch"
    );
    let receipt = response.receipt.verify_by(&endpoint.job_key())?;
    step(
        out,
        format!(
            "POST /echo -> {} {:?}; receipt verified ({} bytes in, {} out)",
            response.status,
            String::from_utf8_lossy(&response.body),
            receipt.bytes_in,
            receipt.bytes_out
        ),
    );

    let response = call("GET", "/stream?n=5", b"").await?;
    let body = String::from_utf8_lossy(&response.body);
    let tokens = body.matches("data: token-").count();
    ensure!(tokens == 5 && body.contains("[DONE]"), "stream: {body}");
    step(
        out,
        format!("GET /stream -> {tokens} SSE tokens streamed, then [DONE]; receipt verified"),
    );

    // WebSocket echo on one tunnel stream.
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
    step(
        out,
        "WebSocket /ws -> echo round trip; receipt verified".to_owned(),
    );

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
    let response = call("GET", "/volume?path=later.txt", b"").await?;
    ensure!(response.body == b"fetched mid-session", "volume mismatch");
    step(
        out,
        "volume list 1 fetched mid-session; the job reads it".to_owned(),
    );

    let response = call("POST", "/output?path=answer.txt", b"42").await?;
    ensure!(response.status == 200, "output: {}", response.status);
    let done = job
        .wait_for(|s| matches!(s, JobStatus::UploadDone(_)))
        .await?;
    if let JobStatus::UploadDone(done) = done {
        for output in &done.outputs {
            step(
                out,
                format!(
                    "uploaded {} ({} bytes, blake3 {})",
                    output.path,
                    output.size,
                    output.hash.fmt_short()
                ),
            );
        }
    }

    job.terminate().await?;
    let end = job.wait_for_end().await?;
    statuses.extend(
        job.history()
            .iter()
            .skip(statuses.len())
            .map(|u| status_name(&u.status)),
    );
    let JobStatus::Completed(result) = end else {
        anyhow::bail!("job ended: {end:?}");
    };
    step(
        out,
        format!(
            "terminated: Completed, exit {:?}, {} outputs (stdout, stderr)",
            result.exit_code,
            result.outputs.len()
        ),
    );
    let stdout = result
        .outputs
        .iter()
        .find(|o| o.path.0 == "stdout")
        .context("stdout was not uploaded")?;
    let downloader = horde_transport::HordeEndpoint::bind(
        &SecretKey::generate(),
        horde_transport::EndpointConfig::new(
            ([127, 0, 0, 1], 0).into(),
            &[horde_transport::ALPN_BLOB],
        ),
    )?;
    let log = horde_node::client::blob::get_to_memory(
        &downloader,
        &storage,
        stdout.hash,
        16 << 20,
        &Default::default(),
    )
    .await?;
    step(
        out,
        format!(
            "job stdout read back from storage: {} bytes, {} lines",
            log.len(),
            log.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count()
        ),
    );
    let total_ms = started.elapsed().as_millis();
    step(out, "demo complete".to_owned());
    Ok(DemoReport {
        statuses,
        endpoint_ms,
        total_ms,
    })
}
