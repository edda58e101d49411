//! `horde job request`: one HTTP request through a tunnel stream, the response body's exact
//! bytes streamed to stdout or to a file, as curl does: the head goes to stderr (or, with `-i`,
//! to stdout before the body). With `-o FILE` the bytes go to a temporary file beside FILE,
//! renamed to FILE only once the job's receipt verifies; on stdout a receipt that does not
//! verify makes the command fail after the bytes were written.

use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use super::{JobStateArgs, append_receipt, connect_job};
use crate::client::{HttpResponseStream, RequestBody};

/// What `horde job request` was asked.
#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The job id.
    job: String,
    /// HTTP method.
    method: String,
    /// Request path.
    path: String,
    /// Request body.
    #[arg(long)]
    data: Option<String>,
    /// Request body: the bytes of this file, streamed.
    #[arg(long, conflicts_with = "data")]
    data_file: Option<PathBuf>,
    /// Write the body to FILE, which appears only once the job's receipt verifies.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Write the response head to stdout before the body (as curl -i).
    #[arg(short, long)]
    include: bool,
    /// Give up after this many seconds (the whole exchange, as curl's -m): a job that never
    /// answers, or never ends its answer, is an error and a non-zero exit, and with -o no file
    /// appears. Default: no limit.
    #[arg(short = 'm', long, value_name = "SECS", value_parser = max_time)]
    max_time: Option<std::time::Duration>,
    #[command(flatten)]
    common: JobStateArgs,
}

/// A file being written under a temporary name beside its final one; removed when dropped
/// unless [`persist`](Self::persist)ed.
struct PendingFile {
    temp: PathBuf,
    target: PathBuf,
    kept: bool,
}

impl PendingFile {
    fn new(target: &Path) -> anyhow::Result<Self> {
        let name = target
            .file_name()
            .with_context(|| format!("-o {}: not a file name", target.display()))?;
        // The process id: no other running `horde` has it.
        let temp = target.with_file_name(format!(
            ".{}.horde-{}.part",
            name.to_string_lossy(),
            std::process::id()
        ));
        Ok(Self {
            temp,
            target: target.to_owned(),
            kept: false,
        })
    }

    fn persist(mut self) -> anyhow::Result<()> {
        std::fs::rename(&self.temp, &self.target)
            .with_context(|| format!("renaming into {}", self.target.display()))?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Sends the request and streams the answer; see the module docs.
pub(super) async fn request(args: RequestArgs) -> anyhow::Result<()> {
    let (job_id, _endpoint, connection) = connect_job(&args.common, &args.job).await?;
    // The answer is complete, checked and kept before the connection closes; closing then only
    // waits for the close to leave, not for QUIC's draining period.
    let answer = exchange(&args, &connection);
    let answer = match args.max_time {
        Some(limit) => tokio::time::timeout(limit, answer)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "no whole answer within {} s (--max-time)",
                    limit.as_secs_f64()
                ))
            }),
        None => answer.await,
    };
    let result = match answer {
        Ok(receipt) => keep_receipt(&args.common, &job_id, &connection, &receipt),
        Err(error) => Err(error),
    };
    connection.close().await;
    result
}

/// `--max-time`: seconds, positive and finite.
fn max_time(text: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{text}: must be more than 0 seconds"));
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|error| format!("{text}: {error}"))
}

/// Verifies the receipt against the pinned job key, reports it on stderr and appends it to
/// the job's receipt file.
fn keep_receipt(
    common: &JobStateArgs,
    job_id: &horde_protocol::JobId,
    connection: &crate::client::JobConnection,
    receipt: &horde_protocol::Signed<horde_protocol::JobReceipt>,
) -> anyhow::Result<()> {
    let verified = receipt.verify_by(&connection.tunnel.job_key())?;
    eprintln!(
        "receipt verified: stream {} in {} bytes (blake3 {}), out {} bytes (blake3 {})",
        verified.stream,
        verified.bytes_in,
        hex::encode(verified.digest_in),
        verified.bytes_out,
        hex::encode(verified.digest_out)
    );
    append_receipt(common, job_id, receipt)
}

/// Sends the request, writes the head and body where asked, and returns the verified receipt;
/// with `-o`, the file is renamed into place only after that.
async fn exchange(
    args: &RequestArgs,
    connection: &crate::client::JobConnection,
) -> anyhow::Result<horde_protocol::Signed<horde_protocol::JobReceipt>> {
    let (method, path) = (args.method.as_str(), args.path.as_str());
    let mut response = match &args.data_file {
        Some(file) => {
            let reader = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("--data-file {}", file.display()))?;
            let len = reader.metadata().await?.len();
            let body = RequestBody::Reader { len, reader };
            connection.request(method, path, body).await?
        }
        None => {
            let data = args.data.as_deref().unwrap_or_default().as_bytes();
            let body = RequestBody::<tokio::fs::File>::Bytes(data);
            connection.request(method, path, body).await?
        }
    };
    let mut stdout = std_stream(std::io::stdout().as_fd())?;
    if args.include {
        stdout.write_all(response.head_bytes()).await?;
    } else {
        let mut stderr = std_stream(std::io::stderr().as_fd())?;
        stderr.write_all(response.head_bytes()).await?;
        stderr.flush().await?;
    }
    match &args.output {
        None => {
            copy_body(&mut response, &mut stdout).await?;
            Ok(response.finish().await?)
        }
        Some(target) => {
            stdout.flush().await?;
            let pending = PendingFile::new(target)?;
            let mut file = tokio::fs::File::create(&pending.temp)
                .await
                .with_context(|| format!("creating {}", pending.temp.display()))?;
            copy_body(&mut response, &mut file).await?;
            file.sync_all().await?;
            drop(file);
            let receipt = response.finish().await?;
            pending.persist()?;
            Ok(receipt)
        }
    }
}

/// The process's stdout or stderr as an async file (a duplicate of its descriptor).
fn std_stream(fd: BorrowedFd<'_>) -> anyhow::Result<tokio::fs::File> {
    let owned = fd
        .try_clone_to_owned()
        .context("duplicating stdout/stderr")?;
    Ok(tokio::fs::File::from_std(std::fs::File::from(owned)))
}

/// Writes the body's bytes to `out` as they arrive.
async fn copy_body(
    response: &mut HttpResponseStream,
    out: &mut (impl AsyncWrite + Unpin),
) -> anyhow::Result<()> {
    while let Some(piece) = response.next_body().await? {
        out.write_all(&piece).await.context("writing the body")?;
    }
    out.flush().await.context("writing the body")?;
    Ok(())
}
