//! `horde blob …`: put and get blobs on a storage node from the command line.

use std::path::PathBuf;

use horde_protocol::{BlobHash, NodeAddr};
use horde_transport::{ALPN_BLOB, HordeEndpoint};

use crate::client::blob::{TransferError, TransferPolicy, get_to_file, put_file};
use crate::client::progress::ProgressReporter;

/// `horde blob …`: the command-line front end of this module.
#[derive(Debug, clap::Subcommand)]
pub enum BlobCommand {
    /// Upload a file to a storage node; prints its BLAKE3 hash.
    Put {
        /// The file to upload.
        file: PathBuf,
        /// The storage node: HOTKEY@IP:PORT (hotkey in SS58 or hex).
        #[arg(long)]
        storage: NodeAddr,
        /// Client key file (default: a fresh key for this run).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Upload a container image archive (`docker save` format); prints the job-spec line that
    /// runs it (`image_blob = {…}`).
    PutImage {
        /// The image archive.
        archive: PathBuf,
        /// The storage node: HOTKEY@IP:PORT (hotkey in SS58 or hex).
        #[arg(long)]
        storage: NodeAddr,
        /// Client key file (default: a fresh key for this run).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Download a blob, verified while streaming; resumes an interrupted download.
    Get {
        /// The blob's BLAKE3 hash (64 hex digits).
        hash: BlobHash,
        /// Where to write it (appears only once complete and verified).
        #[arg(long, short)]
        out: PathBuf,
        /// The storage node: HOTKEY@IP:PORT (hotkey in SS58 or hex).
        #[arg(long)]
        storage: NodeAddr,
        /// Client key file (default: a fresh key for this run).
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// A `horde blob` command that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The key file could not be read.
    #[error("key file: {0}")]
    Key(#[from] horde_protocol::KeyFileError),
    /// The client endpoint could not be bound.
    #[error("client endpoint: {0}")]
    Endpoint(#[from] horde_transport::ConfigError),
    /// The transfer failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// Runs a `horde blob` command: binds an ephemeral client endpoint, transfers with a progress
/// line on stderr, prints the hash (put) or the final path (get) on stdout.
pub async fn run_command(command: BlobCommand) -> Result<(), CommandError> {
    let (storage, key) = match &command {
        BlobCommand::Put { storage, key, .. }
        | BlobCommand::PutImage { storage, key, .. }
        | BlobCommand::Get { storage, key, .. } => (storage, key),
    };
    let key = match key {
        Some(path) => horde_protocol::SecretKey::read_key_file(path)?,
        None => horde_protocol::SecretKey::generate(),
    };
    let bind = match storage.addrs.first() {
        Some(addr) if addr.ip().is_loopback() && addr.is_ipv4() => {
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0))
        }
        Some(addr) if addr.is_ipv6() => {
            std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        }
        _ => std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
    };
    let endpoint = HordeEndpoint::bind(
        &key,
        horde_transport::EndpointConfig::new(bind, &[ALPN_BLOB]),
    )?;
    let result = transfer(&command, &endpoint).await;
    // Tell the node before exiting, so it frees the connection's slot at once rather than at
    // its idle timeout (also after a failure), without waiting out QUIC's draining period.
    horde_transport::close_endpoint_promptly(&endpoint, horde_transport::codes::SHUTDOWN, b"done")
        .await;
    Ok(result?)
}

async fn transfer(command: &BlobCommand, endpoint: &HordeEndpoint) -> Result<(), TransferError> {
    match command {
        BlobCommand::Put { file, storage, .. } => {
            let mut progress = ProgressReporter::new("put");
            let policy = TransferPolicy::default();
            let hash = put_file(endpoint, storage, file, &policy, &mut progress).await?;
            out!("{hash}");
        }
        BlobCommand::PutImage {
            archive, storage, ..
        } => {
            let mut progress = ProgressReporter::new("put");
            let policy = TransferPolicy::default();
            let hash = put_file(endpoint, storage, archive, &policy, &mut progress).await?;
            let size = std::fs::metadata(archive).map_err(TransferError::Io)?.len();
            out!("{}", image_blob_line(&hash, size, storage));
        }
        BlobCommand::Get {
            hash, out, storage, ..
        } => {
            let mut progress = ProgressReporter::new("get");
            get_to_file(
                endpoint,
                storage,
                *hash,
                out,
                None,
                horde_protocol::blob::DEFAULT_MAX_BLOB_SIZE,
                &TransferPolicy::default(),
                &mut progress,
            )
            .await?;
            out!("{}", out.display());
        }
    }
    Ok(())
}

/// The job-spec line that runs the image archive `hash` held by `storage`.
fn image_blob_line(hash: &BlobHash, size: u64, storage: &NodeAddr) -> String {
    format!("image_blob = {{ hash = \"{hash}\", size = {size}, storage = \"{storage}\" }}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_image_prints_a_spec_line() {
        let storage: NodeAddr = format!(
            "{}@127.0.0.1:4000",
            horde_protocol::SecretKey::from_seed(&[1; 32]).hotkey()
        )
        .parse()
        .unwrap();
        let line = image_blob_line(&BlobHash([0xab; 32]), 12, &storage);
        assert_eq!(
            line,
            format!(
                "image_blob = {{ hash = \"{}\", size = 12, storage = \"{storage}\" }}",
                "ab".repeat(32)
            )
        );
    }
}
