//! The client side of `Stat` and `Put`.

use bytes::Bytes;
use horde_protocol::BlobHash;
use horde_protocol::blob::{BlobRequest, BlobResponse, BlobStatus};

use super::{BlobError, STOP_CANCELLED, read_response, refused, unexpected, write_request};

/// Client side of `Stat`.
pub async fn stat(connection: &quinn::Connection, hash: BlobHash) -> Result<BlobStatus, BlobError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_request(&mut send, &BlobRequest::Stat { hash }).await?;
    let _ = send.finish();
    match read_response(&mut recv).await? {
        BlobResponse::Status(status) => Ok(status),
        BlobResponse::Error { kind, message } => Err(refused(kind, message)),
        other => Err(unexpected(&other)),
    }
}

/// The client side of a `Put` once the store accepted it: write bytes from [`Self::offset`] to
/// the end, then [`Self::finish`].
#[derive(Debug)]
pub struct PutUpload {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    size: u64,
    offset: u64,
    position: u64,
}

/// Client side of `Put`: announces `size` (and `hash`, to let the store resume a partial upload
/// when `resume` is set) and waits for the store's go-ahead.
pub async fn start_put(
    connection: &quinn::Connection,
    size: u64,
    hash: Option<BlobHash>,
    resume: bool,
) -> Result<PutUpload, BlobError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_request(&mut send, &BlobRequest::Put { size, hash, resume }).await?;
    match read_response(&mut recv).await? {
        BlobResponse::PutReady { offset } if offset <= size => Ok(PutUpload {
            send,
            recv,
            size,
            offset,
            position: offset,
        }),
        BlobResponse::Error { kind, message } => Err(refused(kind, message)),
        other => Err(unexpected(&other)),
    }
}

impl PutUpload {
    /// Where the upload starts (non-zero when the store resumes a partial upload).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the blob sent or already held by the store.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Sends the next bytes of the blob.
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), BlobError> {
        let end = self.position + bytes.len() as u64;
        if end > self.size {
            return Err(BlobError::Protocol(format!(
                "writing past the announced size {}",
                self.size
            )));
        }
        match self.send.write_chunk(bytes).await {
            Ok(()) => {
                self.position = end;
                Ok(())
            }
            // The store stopped us: its error frame says why.
            Err(quinn::WriteError::Stopped(code)) => match read_response(&mut self.recv).await {
                Ok(BlobResponse::Error { kind, message }) => Err(refused(kind, message)),
                _ => Err(quinn::WriteError::Stopped(code).into()),
            },
            Err(error) => Err(error.into()),
        }
    }

    /// Ends the upload and waits for the store to verify, fsync and confirm it.
    pub async fn finish(mut self) -> Result<(BlobHash, u64), BlobError> {
        self.finish_inner().await
    }

    async fn finish_inner(&mut self) -> Result<(BlobHash, u64), BlobError> {
        if self.position != self.size {
            return Err(BlobError::Protocol(format!(
                "finishing at {} of {} bytes",
                self.position, self.size
            )));
        }
        let _ = self.send.finish();
        match read_response(&mut self.recv).await? {
            BlobResponse::Stored { hash, size } => Ok((hash, size)),
            BlobResponse::Error { kind, message } => Err(refused(kind, message)),
            other => Err(unexpected(&other)),
        }
    }
}

impl Drop for PutUpload {
    fn drop(&mut self) {
        // quinn finishes a dropped stream gracefully; an unfinished upload must not look like a
        // complete one, so abandon it explicitly (a no-op after `finish`).
        let _ = self.send.reset(STOP_CANCELLED);
    }
}

/// Uploads `bytes` in one go (no resume) and returns the hash the store confirmed.
pub async fn put_bytes(
    connection: &quinn::Connection,
    bytes: Bytes,
) -> Result<BlobHash, BlobError> {
    let hash = BlobHash::of(&bytes);
    let mut upload = start_put(connection, bytes.len() as u64, Some(hash), false).await?;
    let mut offset = 0;
    while offset < bytes.len() {
        let end = (offset + 1024 * 1024).min(bytes.len());
        upload.write(bytes.slice(offset..end)).await?;
        offset = end;
    }
    let (stored, _) = upload.finish().await?;
    if stored != hash {
        return Err(BlobError::Integrity { offset: 0 });
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use horde_protocol::blob::BlobErrorKind;

    use super::*;
    use crate::blob::{read_request, write_response};
    use crate::test_utils::connected_pair;

    /// A store that accepts every put from `offset` and answers `Stored` with `claimed` (or
    /// the true hash), and `Stat` with `Absent`.
    async fn store(offset: u64, claimed: Option<BlobHash>) -> crate::test_utils::ConnectedPair {
        let pair = connected_pair().await;
        let server = pair.server.clone();
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = server.accept_bi().await {
                match read_request(&mut recv).await {
                    Ok(Some(BlobRequest::Put { size, .. })) => {
                        let ready = BlobResponse::PutReady { offset };
                        write_response(&mut send, &ready).await.unwrap();
                        let Ok(bytes) = recv.read_to_end(1 << 24).await else {
                            continue;
                        };
                        let hash = claimed.unwrap_or_else(|| BlobHash::of(&bytes));
                        let stored = BlobResponse::Stored { hash, size };
                        write_response(&mut send, &stored).await.unwrap();
                    }
                    Ok(Some(BlobRequest::Stat { .. })) => {
                        let status = BlobResponse::Status(BlobStatus::Absent);
                        write_response(&mut send, &status).await.unwrap();
                    }
                    _ => {
                        let refusal = BlobResponse::Error {
                            kind: BlobErrorKind::BadRequest,
                            message: "no".to_owned(),
                        };
                        write_response(&mut send, &refusal).await.unwrap();
                    }
                }
                let _ = send.finish();
            }
        });
        pair
    }

    #[tokio::test]
    async fn put_bytes_returns_the_hash_the_store_confirmed() {
        let pair = store(0, None).await;
        let bytes = Bytes::from(vec![3u8; 3 << 20]);
        let hash = put_bytes(&pair.client, bytes.clone()).await.unwrap();
        assert_eq!(hash, BlobHash::of(&bytes));
        let status = stat(&pair.client, hash).await.unwrap();
        assert_eq!(status, BlobStatus::Absent);
    }

    #[tokio::test]
    async fn put_refuses_a_store_that_confirms_another_hash() {
        let pair = store(0, Some(BlobHash::of(b"something else"))).await;
        let error = put_bytes(&pair.client, Bytes::from_static(b"the blob"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, BlobError::Integrity { offset: 0 }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_upload_never_writes_past_its_size_or_finishes_short() {
        let pair = store(2, None).await;
        let mut upload = start_put(&pair.client, 5, None, true).await.unwrap();
        assert_eq!((upload.offset(), upload.position()), (2, 2));
        let error = upload.write(Bytes::from_static(b"four")).await.unwrap_err();
        assert!(matches!(error, BlobError::Protocol(_)), "{error}");
        upload.write(Bytes::from_static(b"ab")).await.unwrap();
        assert_eq!(upload.position(), 4);
        let error = upload.finish().await.unwrap_err();
        assert!(matches!(error, BlobError::Protocol(_)), "{error}");
    }
}
