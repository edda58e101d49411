//! A verified job endpoint and the QUIC connection to it.

use std::net::SocketAddr;

use crate::client::ClientError;
use horde_protocol::{EndpointRecord, Hotkey, JobId, SecretKey, Signed, UnixMillis};
use horde_transport::tunnel::{
    HttpResponseStream, JobTunnel, RequestBody, TunnelError, http_request_streaming,
    http_request_streaming_with_headers,
};
use horde_transport::{ALPN_JOB, ClientPolicy, EndpointConfig, HordeEndpoint, close_promptly};
use tokio::io::AsyncRead;

/// An endpoint record that verified: signed by the miner the facilitator chose, for this job,
/// not expired. The job key is pinned from it.
#[derive(Debug, Clone)]
pub struct VerifiedEndpoint {
    /// The record as signed.
    pub signed: Signed<EndpointRecord>,
    /// Its content.
    pub record: EndpointRecord,
}

impl VerifiedEndpoint {
    /// Verifies `signed` for `job_id` against `miner` at time `now`.
    pub fn verify(
        signed: &Signed<EndpointRecord>,
        job_id: JobId,
        miner: &Hotkey,
        now: UnixMillis,
    ) -> Result<Self, ClientError> {
        let record = signed
            .verify_by(miner)
            .map_err(|e| ClientError::BadEndpoint(e.to_string()))?;
        if record.miner != *miner {
            return Err(ClientError::BadEndpoint(format!(
                "record names miner {}, expected {miner}",
                record.miner
            )));
        }
        if record.job_id != job_id {
            return Err(ClientError::BadEndpoint(format!(
                "record is for job {}, expected {job_id}",
                record.job_id
            )));
        }
        if record.expires_at < now {
            return Err(ClientError::BadEndpoint("record expired".to_owned()));
        }
        Ok(Self {
            signed: signed.clone(),
            record,
        })
    }

    /// The job endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.record.address
    }

    /// The pinned job key.
    pub fn job_key(&self) -> Hotkey {
        self.record.job_key
    }
}

/// A QUIC connection to a job endpoint, authenticated both ways: our certificate is the per-job
/// client key, theirs must be the pinned job key.
#[derive(Debug)]
pub struct JobConnection {
    /// The connection with the pinned job key checked and prepared: opens tunnel streams, and
    /// holds the job id, the job key and the QUIC connection.
    pub tunnel: JobTunnel,
    _endpoint: HordeEndpoint,
}

impl JobConnection {
    /// Closes the connection and waits until the close has been sent (up to
    /// [`CLOSE_SEND_TIMEOUT`](horde_transport::CLOSE_SEND_TIMEOUT)), so the job endpoint frees
    /// the slot at once rather than at its idle timeout, without waiting out QUIC's draining
    /// period. Call before a process exits.
    pub async fn close(&self) {
        close_promptly(self.tunnel.connection(), 0u32.into(), b"client done").await;
    }

    /// Sends one HTTP/1.1 request to the job through a new tunnel stream. The response's body
    /// comes as its exact bytes, streamed ([`HttpResponseStream::next_body`]: nothing is
    /// decoded as text, nothing held beyond one read), then the job's verified receipt
    /// ([`HttpResponseStream::finish`]); until that returns, treat the bytes as unproven. The
    /// request body is sent from memory or streamed from a reader ([`RequestBody`]).
    pub async fn request<R: AsyncRead + Unpin>(
        &self,
        method: &str,
        path: &str,
        body: RequestBody<'_, R>,
    ) -> Result<HttpResponseStream, TunnelError> {
        http_request_streaming(&self.tunnel, method, path, body).await
    }

    /// [`request`](Self::request) with the caller's `headers` added (see
    /// [`http_request_streaming_with_headers`] for the ones refused).
    pub async fn request_with_headers<R: AsyncRead + Unpin>(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: RequestBody<'_, R>,
    ) -> Result<HttpResponseStream, TunnelError> {
        http_request_streaming_with_headers(&self.tunnel, method, path, headers, body).await
    }

    /// Dials the verified endpoint with `client_key` as identity.
    pub async fn connect(
        job_id: JobId,
        client_key: SecretKey,
        endpoint: &VerifiedEndpoint,
    ) -> Result<Self, ClientError> {
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let config = EndpointConfig::new(bind, &[ALPN_JOB])
            .with_client_policy(ClientPolicy::Only(client_key.hotkey()))
            .with_max_connections(1);
        let local = HordeEndpoint::bind(&client_key, config)?;
        let connection = local
            .connect(endpoint.address(), &endpoint.job_key(), ALPN_JOB)
            .await?;
        let tunnel = JobTunnel::new(connection, job_id, client_key, endpoint.job_key())?;
        Ok(Self {
            tunnel,
            _endpoint: local,
        })
    }
}
