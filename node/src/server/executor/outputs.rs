//! A job's outputs: the uploads the job asks for while it runs (`POST /outputs`), and at its end
//! the declared outputs, stdout and stderr, and the job's last message.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use horde_protocol::messages::{
    FailureReason, JobFinished, OutputLocation, OutputRef, UpMessage, UploadDone,
};
use horde_protocol::{BlobHash, JobSpec, RelativePath, Stage, UploadSpec, UploadTarget};

use tracing::warn;

use super::{
    Ending, JobExit, JobRunner, LOG_TAIL_BYTES, Outcome, exit_code_reason, failed, http, volumes,
};

impl JobRunner {
    /// Uploads the declared outputs and the logs, and builds the job's last message: every
    /// upload that failed (now, or mid-session: `not_uploaded`) is in its outputs as
    /// [`OutputLocation::NotUploaded`], and one that failed at the end fails the job in Upload (a
    /// declared output the job never wrote is left out).
    /// A declared output already uploaded mid-session (`sent`) and unchanged since, or removed
    /// since, is not sent again: the copy sent then is the one reported.
    pub(super) async fn results(
        &self,
        spec: &JobSpec,
        job_dir: &Path,
        ending: Ending,
        not_uploaded: Vec<OutputRef>,
        mut sent: HashMap<String, OutputRef>,
        budget: &mut volumes::OutputBudget,
    ) -> Outcome {
        let (exit, terminated) = match &ending {
            Ending::Exited(exit) => (Some(*exit), false),
            Ending::Terminated(exit) => (Some(*exit), true),
            Ending::TimedOut => (None, true),
            Ending::Abandoned => return None,
        };
        let mut kept = Vec::new();
        let mut declared = Vec::new();
        for upload in &spec.uploads {
            match sent.remove(&upload.path.0) {
                Some(earlier) if volumes::unchanged_since(job_dir, &earlier).await => {
                    kept.push(earlier);
                }
                // Changed since, or something else in its place: sent again, or refused
                // saying why.
                Some(_) => declared.push(upload.clone()),
                None if job_dir.join("output").join(&upload.path.0).is_file() => {
                    declared.push(upload.clone());
                }
                None => {}
            }
        }
        let limit = Duration::from_millis(spec.deadlines.upload_ms);
        let (mut outputs, upload_error) = self.upload_each(job_dir, &declared, limit, budget).await;
        outputs.append(&mut kept);
        let mut result = self.finish_logs(job_dir, spec, exit, terminated).await;
        outputs.append(&mut result.outputs);
        outputs.extend(not_uploaded);
        result.outputs = outputs;
        if let Some(reason) = upload_error {
            return Some(failed(Stage::Upload, reason, Some(result)));
        }
        Some(match ending {
            Ending::TimedOut => failed(Stage::Execution, FailureReason::Timeout, Some(result)),
            Ending::Exited(exit) | Ending::Terminated(exit) if exit.out_of_memory => {
                failed(Stage::Execution, FailureReason::OutOfMemory, Some(result))
            }
            Ending::Exited(exit) if !exit.success() => {
                failed(Stage::Execution, exit_code_reason(&exit), Some(result))
            }
            _ => UpMessage::Finished(result),
        })
    }

    /// Uploads the files the job said are ready, as the volume lists (or the spec) declared,
    /// one by one within the job's `budget`; what the spec declared is remembered in `sent`.
    /// After a failure, the files sent before it are still reported (`UploadDone`) and those
    /// not tried stay declared.
    pub(super) async fn upload_ready(
        &self,
        job_dir: &Path,
        paths: &[String],
        pending: &mut HashMap<String, (UploadSpec, Option<u64>)>,
        not_uploaded: &mut Vec<OutputRef>,
        sent: &mut HashMap<String, OutputRef>,
        budget: &mut volumes::OutputBudget,
    ) -> (Vec<UpMessage>, Result<usize, http::OutputsRefusal>) {
        // Every path is checked before any is taken: a request naming one undeclared file
        // leaves the others declared for a later one.
        if let Some(path) = paths.iter().find(|path| !pending.contains_key(*path)) {
            let refusal = http::OutputsRefusal {
                status: 400,
                reason: format!("{path}: no upload declared for this file"),
            };
            return (Vec::new(), Err(refusal));
        }
        let mut by_list: HashMap<Option<u64>, Vec<UploadSpec>> = HashMap::new();
        for (spec, list) in paths.iter().filter_map(|path| pending.remove(path)) {
            by_list.entry(list).or_default().push(spec);
        }
        let mut count = 0;
        // One message per volume list the files came from, with what was sent of it; after a
        // failure the files not tried yet stay declared, for a later request.
        let mut messages = Vec::new();
        let mut refusal = None;
        for (volume_msg_id, uploads) in by_list {
            let mut outputs = Vec::new();
            for upload in uploads {
                if refusal.is_some() {
                    pending.insert(upload.path.0.clone(), (upload, volume_msg_id));
                    continue;
                }
                let one = std::slice::from_ref(&upload);
                match volumes::upload(job_dir, one, &self.endpoint, &self.http, budget).await {
                    Ok(mut sent_now) => outputs.append(&mut sent_now),
                    Err(error) => {
                        let refused = http::OutputsRefusal::upload_failed(&error);
                        not_uploaded.push(not_uploaded_ref(&upload, refused.reason.clone()));
                        refusal = Some(refused);
                    }
                }
            }
            if outputs.is_empty() {
                continue;
            }
            count += outputs.len();
            if volume_msg_id.is_none() {
                sent.extend(outputs.iter().map(|out| (out.path.0.clone(), out.clone())));
            }
            messages.push(UpMessage::UploadDone(UploadDone {
                volume_msg_id,
                outputs,
            }));
        }
        match refusal {
            Some(refusal) => (messages, Err(refusal)),
            None => (messages, Ok(count)),
        }
    }

    /// Uploads each of `uploads` from `dir`'s `output/`, all within `limit` and `budget`: where
    /// each went, or, for each that failed, [`OutputLocation::NotUploaded`] naming its target
    /// and why; and the first failure's reason.
    async fn upload_each(
        &self,
        dir: &Path,
        uploads: &[UploadSpec],
        limit: Duration,
        budget: &mut volumes::OutputBudget,
    ) -> (Vec<OutputRef>, Option<FailureReason>) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut outputs = Vec::with_capacity(uploads.len());
        let mut first_failure = None;
        for upload in uploads {
            let one = std::slice::from_ref(upload);
            let sent = volumes::upload(dir, one, &self.endpoint, &self.http, budget);
            let (reason, failure) = match tokio::time::timeout_at(deadline, sent).await {
                Ok(Ok(refs)) => {
                    outputs.extend(refs);
                    continue;
                }
                Ok(Err(error)) => {
                    let reason = error.to_string();
                    (reason.clone(), FailureReason::Upload(reason))
                }
                Err(_) => (
                    format!("the upload deadline ({} ms) passed", limit.as_millis()),
                    FailureReason::Timeout,
                ),
            };
            warn!(path = %upload.path, %reason, "upload failed");
            first_failure.get_or_insert(failure);
            outputs.push(not_uploaded_ref(upload, reason));
        }
        (outputs, first_failure)
    }

    /// Uploads stdout/stderr when the spec names a target, and builds the job's result.
    pub(super) async fn finish_logs(
        &self,
        job_dir: &Path,
        spec: &JobSpec,
        exit: Option<JobExit>,
        terminated: bool,
    ) -> JobFinished {
        let logs_dir = job_dir.join("logs");
        let stdout_tail = tail(&logs_dir.join("output/stdout"));
        let stderr_tail = tail(&logs_dir.join("output/stderr"));
        let mut outputs: Vec<OutputRef> = Vec::new();
        if let Some(target) = &spec.logs {
            let uploads: Vec<UploadSpec> = ["stdout", "stderr"]
                .iter()
                .map(|name| UploadSpec {
                    path: RelativePath((*name).to_owned()),
                    target: target.clone(),
                })
                .collect();
            let limit = Duration::from_millis(spec.deadlines.upload_ms);
            // The logs have an `output_mb` of their own: a job that used its outputs' budget
            // still has its stdout and stderr uploaded.
            let budget = &mut volumes::OutputBudget::new(self.config.policy.output_limit());
            (outputs, _) = self.upload_each(&logs_dir, &uploads, limit, budget).await;
        }
        JobFinished {
            exit_code: exit.and_then(|e| e.code),
            terminated,
            outputs,
            stdout_tail,
            stderr_tail,
        }
    }
}

/// An output that was not uploaded: where it was to go and why ([`OutputLocation::NotUploaded`];
/// a URL is shown without its query, which may hold a presigned credential).
fn not_uploaded_ref(upload: &UploadSpec, reason: String) -> OutputRef {
    let target = match &upload.target {
        UploadTarget::Blob { storage } => format!("blob storage {storage}"),
        UploadTarget::HttpPut { url, .. } => url.split('?').next().unwrap_or_default().to_owned(),
        other => format!("{other:?}"),
    };
    OutputRef {
        path: upload.path.clone(),
        size: 0,
        hash: BlobHash([0; 32]),
        location: OutputLocation::NotUploaded { target, reason },
    }
}

/// The last [`LOG_TAIL_BYTES`] of a log file, lossily decoded.
fn tail(path: &Path) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
