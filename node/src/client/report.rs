//! Cross-validation: compare a job's answer with a trusted job's, and turn a wrong one into a
//! signed miner report.

use crate::client::{ClientError, JobConnection, VerifiedEndpoint};
use horde_protocol::{
    EndpointRecord, JobId, JobReceipt, MinerReport, SecretKey, Signed, UnixMillis,
};
use horde_transport::tunnel::{HttpResponse, http_request};

/// What a miner report is built from: the miner's endpoint record for the job, the job's receipt
/// for the disputed stream, and digests of what was asked and answered.
#[derive(Debug, Clone)]
pub struct ReportEvidence {
    /// The job that answered wrongly.
    pub job_id: JobId,
    /// The miner's signed endpoint record for the job.
    pub endpoint: Signed<EndpointRecord>,
    /// The job's receipt for the disputed stream.
    pub receipt: Signed<JobReceipt>,
    /// BLAKE3 of the request (for HTTP: of the request body).
    pub request_digest: [u8; 32],
    /// BLAKE3 of the response (for HTTP: of the response body).
    pub response_digest: [u8; 32],
    /// The trusted job's receipt for the same request, if one was run.
    pub trusted_receipt: Option<Signed<JobReceipt>>,
}

impl ReportEvidence {
    /// Evidence from a verified endpoint, the disputed receipt and the request and response
    /// payloads (their BLAKE3 digests go into the report).
    pub fn new(
        endpoint: &VerifiedEndpoint,
        receipt: Signed<JobReceipt>,
        request: &[u8],
        response: &[u8],
    ) -> Self {
        Self {
            job_id: endpoint.record.job_id,
            endpoint: endpoint.signed.clone(),
            receipt,
            request_digest: *blake3::hash(request).as_bytes(),
            response_digest: *blake3::hash(response).as_bytes(),
            trusted_receipt: None,
        }
    }

    /// Adds the trusted job's receipt for the same request.
    pub fn with_trusted_receipt(mut self, receipt: Signed<JobReceipt>) -> Self {
        self.trusted_receipt = Some(receipt);
        self
    }

    /// The report, signed by `reporter` (the account that owns the job).
    pub fn sign(self, reporter: &SecretKey, details: &str, at: UnixMillis) -> Signed<MinerReport> {
        let report = MinerReport {
            job_id: self.job_id,
            endpoint: self.endpoint,
            receipt: self.receipt,
            request_digest: self.request_digest,
            response_digest: self.response_digest,
            trusted_receipt: self.trusted_receipt,
            details: details.to_owned(),
            reported_at: at,
        };
        Signed::sign(reporter, &report)
    }
}

/// One request run on a job and on a trusted job, and the judgement.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The request body sent to both.
    pub request: Vec<u8>,
    /// The job's answer (its receipt is the disputed one).
    pub answer: HttpResponse,
    /// The trusted job's answer.
    pub trusted: HttpResponse,
    /// Whether the judge found them to agree.
    pub agree: bool,
}

impl Comparison {
    /// The evidence for a report against the job whose verified endpoint is `endpoint`.
    pub fn evidence(&self, endpoint: &VerifiedEndpoint) -> ReportEvidence {
        ReportEvidence::new(
            endpoint,
            self.answer.receipt.clone(),
            &self.request,
            &self.answer.body,
        )
        .with_trusted_receipt(self.trusted.receipt.clone())
    }
}

/// The default judge: same status and byte-equal bodies.
pub fn byte_equal(answer: &HttpResponse, trusted: &HttpResponse) -> bool {
    answer.status == trusted.status && answer.body == trusted.body
}

/// Sends one HTTP request to `job` and the same to `trusted`, verifies both receipts, and judges
/// the answers with `agree` (e.g. [`byte_equal`], or a comparison that tolerates nondeterminism).
pub async fn compare_http(
    job: &JobConnection,
    trusted: &JobConnection,
    method: &str,
    path: &str,
    body: &[u8],
    agree: impl FnOnce(&HttpResponse, &HttpResponse) -> bool,
) -> Result<Comparison, ClientError> {
    let (answer, trusted_answer) = tokio::try_join!(
        http_request(&job.tunnel, method, path, body),
        http_request(&trusted.tunnel, method, path, body),
    )?;
    let agree = agree(&answer, &trusted_answer);
    Ok(Comparison {
        request: body.to_vec(),
        answer,
        trusted: trusted_answer,
        agree,
    })
}
