//! The facilitator's job store: every job and every status change, in redb (an embedded,
//! transactional store that fsyncs each commit), so a restart loses nothing.
//!
//! Tables: `jobs` maps a job id to its record (the client-signed spec bytes, the owner, the next
//! status number, whether it ended); `statuses` maps `job id ‖ seq` to one [`StatusUpdate`].
//! Inserting a job checks for its id in the same transaction, so a job id is accepted once.
//! `reports` holds every accepted miner report twice, by `d ‖ report digest` and by
//! `s ‖ job id ‖ stream`, so a report (or another report on the same receipt) is accepted once;
//! `exclusions` maps a reported miner's hotkey to the time its exclusion ends.
//!
//! New jobs and status changes — the writes every job makes several of — go through one writer
//! thread that commits whatever is queued in one transaction (group commit): a caller's answer
//! still comes only after the commit holding its write, but hundreds of jobs at once share
//! fsyncs instead of queueing one fsync each (a few ms on a virtual disk, which capped the
//! facilitator near 100 commits/s: about a dozen jobs per second).
//!
//! After an I/O error (a full disk) redb refuses every later operation until the database is
//! opened again; the store then reopens it at once and before each operation until that works,
//! so the facilitator serves again as soon as the disk has room, without a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use horde_protocol::codec::{from_bytes_exact, to_bytes};
use horde_protocol::messages::StatusUpdate;
use horde_protocol::{Hotkey, JobId, JobSpec, JobStatus, Signed, UnixMillis};
use redb::{Database, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

const JOBS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("jobs");
const STATUSES: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("statuses");
const REPORTS: TableDefinition<'_, &[u8], u64> = TableDefinition::new("reports");
const EXCLUSIONS: TableDefinition<'_, &[u8], u64> = TableDefinition::new("exclusions");

/// A store operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum JobStoreError {
    /// The job id was used before.
    #[error("job {0} exists already")]
    Duplicate(JobId),
    /// No such job.
    #[error("no job {0}")]
    UnknownJob(JobId),
    /// The report (or another on the same receipt) was accepted before.
    #[error("duplicate report: {0}")]
    DuplicateReport(&'static str),
    /// The job already reached a terminal status.
    #[error("job {0} has ended")]
    Ended(JobId),
    /// The database failed.
    #[error("job store: {0}")]
    Database(String),
    /// Reading or writing the database's file failed (a full disk): the store reopens it.
    #[error("job store: {0}")]
    Io(String),
    /// A stored record did not decode (corruption or a version mismatch).
    #[error("job store record: {0}")]
    Corrupt(String),
}

/// What is stored per job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// The client-signed spec, as received.
    pub spec: Signed<JobSpec>,
    /// The account that submitted it (its connection's hotkey, which signed the spec).
    pub owner: Hotkey,
    /// Number of statuses stored.
    pub next_seq: u32,
    /// Whether a terminal status was stored.
    pub ended: bool,
}

/// Writes waiting for the writer thread: 1,024 — far more than the jobs one facilitator
/// drives at once make in one commit's time; a caller beyond it waits for room.
const WRITE_QUEUE: usize = 1024;

/// Most writes committed in one transaction (each ~1 KiB: a transaction stays below 1 MiB).
const MAX_BATCH: usize = 512;

/// The job store. Cheap to clone; reads and rare writes run on the blocking pool, job writes on
/// the writer thread (see the module docs).
#[derive(Debug, Clone)]
pub struct JobStore {
    db: Arc<Shared>,
    writes: mpsc::Sender<JobWrite>,
}

/// The database, opened again after an I/O error (see the module docs).
#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// `None` from an I/O error until it is opened again.
    db: RwLock<Option<Database>>,
    /// When opening it again was last tried: at most once per [`REOPEN_INTERVAL`].
    last_reopen: Mutex<Option<Instant>>,
    /// How many times opening it again was tried.
    reopens: AtomicU64,
}

/// The least time between two attempts to open the database again after an I/O error: while
/// the disk stays full, a burst of submissions is refused at once instead of each trying to
/// open (and repair) the database first.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

impl Shared {
    /// Runs `work` on the database, opening it again first if an I/O error closed it. An I/O
    /// error of `work` closes it (redb refuses every later operation until it is opened again)
    /// and opens it again, at most once per [`REOPEN_INTERVAL`].
    fn with<T>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, JobStoreError>,
    ) -> Result<T, JobStoreError> {
        let outcome = {
            let mut db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            if db.is_none() {
                drop(db);
                self.reopen();
                db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            }
            match db.as_ref() {
                Some(db) => work(db),
                None => {
                    return Err(JobStoreError::Io(
                        "closed after an I/O error; it could not be opened again yet".to_owned(),
                    ));
                }
            }
        };
        if let Err(JobStoreError::Io(error)) = &outcome {
            warn!(%error, "job store I/O error: closing the database to open it again");
            *self.db.write().unwrap_or_else(PoisonError::into_inner) = None;
            self.reopen();
        }
        outcome
    }

    /// Opens the closed database again, unless it is open or the last attempt was less than
    /// [`REOPEN_INTERVAL`] ago.
    fn reopen(&self) {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if db.is_some() {
            return;
        }
        {
            let mut last = self
                .last_reopen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < REOPEN_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let attempt = self.reopens.fetch_add(1, Ordering::Relaxed) + 1;
        match open_database(&self.path) {
            Ok(opened) => {
                info!(path = %self.path.display(), attempt, "job store opened again");
                *db = Some(opened);
            }
            Err(error) => {
                warn!(%error, attempt, "job store: opening it again failed; retried in {REOPEN_INTERVAL:?} at the earliest")
            }
        }
    }
}

/// Opens (or creates) the database at `path` with every table.
fn open_database(path: &Path) -> Result<Database, JobStoreError> {
    let database = Database::create(path).map_err(db_err)?;
    let txn = database.begin_write().map_err(db_err)?;
    txn.open_table(JOBS).map_err(db_err)?;
    txn.open_table(STATUSES).map_err(db_err)?;
    txn.open_table(REPORTS).map_err(db_err)?;
    txn.open_table(EXCLUSIONS).map_err(db_err)?;
    txn.commit().map_err(db_err)?;
    Ok(database)
}

/// A job write for the writer thread, with where its outcome goes.
#[derive(Debug)]
enum JobWrite {
    Insert {
        spec: Signed<JobSpec>,
        job_id: JobId,
        owner: Hotkey,
        at: UnixMillis,
        reply: oneshot::Sender<Result<StatusUpdate, JobStoreError>>,
    },
    Append {
        job_id: JobId,
        status: JobStatus,
        at: UnixMillis,
        reply: oneshot::Sender<Result<StatusUpdate, JobStoreError>>,
    },
}

impl JobWrite {
    fn answer(self, outcome: Result<StatusUpdate, JobStoreError>) {
        let (JobWrite::Insert { reply, .. } | JobWrite::Append { reply, .. }) = self;
        // A caller that gave up no longer waits; its write stands.
        let _ = reply.send(outcome);
    }

    /// Applies the write in `txn`. A refusal (duplicate id, unknown or ended job) changes
    /// nothing and is this write's answer; a database error spoils the whole transaction.
    fn apply(&self, txn: &redb::WriteTransaction) -> Result<Applied, JobStoreError> {
        let mut jobs = txn.open_table(JOBS).map_err(db_err)?;
        let (job_id, record, update) = match self {
            JobWrite::Insert {
                spec,
                job_id,
                owner,
                at,
                ..
            } => {
                if jobs.get(job_id.0.as_slice()).map_err(db_err)?.is_some() {
                    return Ok(Err(JobStoreError::Duplicate(*job_id)));
                }
                let record = JobRecord {
                    spec: spec.clone(),
                    owner: *owner,
                    next_seq: 1,
                    ended: false,
                };
                let update = StatusUpdate {
                    job_id: *job_id,
                    seq: 0,
                    at: *at,
                    status: JobStatus::Received,
                };
                (job_id, record, update)
            }
            JobWrite::Append {
                job_id, status, at, ..
            } => {
                let mut record: JobRecord = match jobs.get(job_id.0.as_slice()).map_err(db_err)? {
                    Some(bytes) => decode(bytes.value())?,
                    None => return Ok(Err(JobStoreError::UnknownJob(*job_id))),
                };
                if record.ended {
                    return Ok(Err(JobStoreError::Ended(*job_id)));
                }
                let update = StatusUpdate {
                    job_id: *job_id,
                    seq: record.next_seq,
                    at: *at,
                    status: status.clone(),
                };
                record.next_seq += 1;
                record.ended = update.status.is_terminal();
                (job_id, record, update)
            }
        };
        jobs.insert(job_id.0.as_slice(), to_bytes(&record).as_slice())
            .map_err(db_err)?;
        let mut statuses = txn.open_table(STATUSES).map_err(db_err)?;
        statuses
            .insert(
                status_key(job_id, update.seq).as_slice(),
                to_bytes(&update).as_slice(),
            )
            .map_err(db_err)?;
        Ok(Ok(update))
    }
}

/// One write's own outcome inside a transaction that may still fail as a whole.
type Applied = Result<StatusUpdate, JobStoreError>;

/// Answers each write of a batch: its own outcome once the commit is durable, or the
/// database's error for all if the transaction failed.
fn answer_batch(batch: Vec<JobWrite>, outcomes: Result<Vec<Applied>, JobStoreError>) {
    match outcomes {
        Ok(outcomes) => {
            for (write, outcome) in batch.into_iter().zip(outcomes) {
                write.answer(outcome);
            }
        }
        Err(error) => {
            for write in batch {
                write.answer(Err(error.clone()));
            }
        }
    }
}

/// Applies `batch` in one transaction and commits it.
fn apply_batch(db: &Database, batch: &[JobWrite]) -> Result<Vec<Applied>, JobStoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    let outcomes = batch
        .iter()
        .map(|write| write.apply(&txn))
        .collect::<Result<Vec<_>, _>>()?;
    txn.commit().map_err(db_err)?;
    Ok(outcomes)
}

/// The writer thread: takes the writes queued since the last commit (up to [`MAX_BATCH`]) and
/// commits them together, until every [`JobStore`] handle is gone. Holds the database weakly,
/// so a dropped store closes it (and can be opened again) without waiting for this thread.
fn write_jobs(db: Weak<Shared>, mut writes: mpsc::Receiver<JobWrite>) {
    while let Some(first) = writes.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match writes.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        // The database is let go before anyone is answered: a caller that then drops the
        // store finds it closed at once.
        let outcomes = match db.upgrade() {
            Some(db) => db.with(|db| apply_batch(db, &batch)),
            None => Err(JobStoreError::Database("store closed".to_owned())),
        };
        answer_batch(batch, outcomes);
    }
}

fn status_key(job_id: &JobId, seq: u32) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(&job_id.0);
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

impl JobStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, JobStoreError> {
        let db = Arc::new(Shared {
            path: path.to_owned(),
            db: RwLock::new(Some(open_database(path)?)),
            last_reopen: Mutex::new(None),
            reopens: AtomicU64::new(0),
        });
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let weak = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("job-store-writer".to_owned())
            .spawn(move || write_jobs(weak, queue))
            .map_err(|e| JobStoreError::Database(format!("writer thread: {e}")))?;
        Ok(Self { db, writes })
    }

    /// Queues a job write for the writer thread and waits for its commit.
    async fn write(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<StatusUpdate, JobStoreError>>) -> JobWrite,
    ) -> Result<StatusUpdate, JobStoreError> {
        let (reply, answer) = oneshot::channel();
        let closed = || JobStoreError::Database("store writer gone".to_owned());
        self.writes.send(make(reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, JobStoreError> + Send + 'static,
    ) -> Result<T, JobStoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || db.with(work))
            .await
            .map_err(|e| JobStoreError::Database(format!("store task: {e}")))?
    }

    /// Stores a new job with its first status, `Received`. Refuses a known job id.
    pub async fn insert_job(
        &self,
        spec: Signed<JobSpec>,
        job_id: JobId,
        owner: Hotkey,
        at: UnixMillis,
    ) -> Result<StatusUpdate, JobStoreError> {
        self.write(|reply| JobWrite::Insert {
            spec,
            job_id,
            owner,
            at,
            reply,
        })
        .await
    }

    /// Appends a status; refuses after a terminal one.
    pub async fn append_status(
        &self,
        job_id: JobId,
        status: JobStatus,
        at: UnixMillis,
    ) -> Result<StatusUpdate, JobStoreError> {
        self.write(|reply| JobWrite::Append {
            job_id,
            status,
            at,
            reply,
        })
        .await
    }

    /// The job's record.
    pub async fn job(&self, job_id: JobId) -> Result<Option<JobRecord>, JobStoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let jobs = txn.open_table(JOBS).map_err(db_err)?;
            jobs.get(job_id.0.as_slice())
                .map_err(db_err)?
                .map(|bytes| decode(bytes.value()))
                .transpose()
        })
        .await
    }

    /// Every status of the job, in order.
    pub async fn history(&self, job_id: JobId) -> Result<Vec<StatusUpdate>, JobStoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(db_err)?;
            let statuses = txn.open_table(STATUSES).map_err(db_err)?;
            let start = status_key(&job_id, 0);
            let end = status_key(&job_id, u32::MAX);
            let mut history = Vec::new();
            for entry in statuses
                .range(start.as_slice()..=end.as_slice())
                .map_err(db_err)?
            {
                let (_, value) = entry.map_err(db_err)?;
                history.push(decode(value.value())?);
            }
            Ok(history)
        })
        .await
    }

    /// Records an accepted report, refusing one whose digest, or whose (job, stream), is known.
    pub async fn insert_report(
        &self,
        digest: [u8; 32],
        job_id: JobId,
        stream: u64,
        at: UnixMillis,
    ) -> Result<(), JobStoreError> {
        self.blocking(move |db| {
            let mut by_digest = vec![b'd'];
            by_digest.extend_from_slice(&digest);
            let mut by_stream = vec![b's'];
            by_stream.extend_from_slice(&job_id.0);
            by_stream.extend_from_slice(&stream.to_be_bytes());
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut reports = txn.open_table(REPORTS).map_err(db_err)?;
                if reports.get(by_digest.as_slice()).map_err(db_err)?.is_some() {
                    return Err(JobStoreError::DuplicateReport(
                        "this report was accepted before",
                    ));
                }
                if reports.get(by_stream.as_slice()).map_err(db_err)?.is_some() {
                    return Err(JobStoreError::DuplicateReport(
                        "a report on this receipt was accepted before",
                    ));
                }
                reports.insert(by_digest.as_slice(), at.0).map_err(db_err)?;
                reports.insert(by_stream.as_slice(), at.0).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Excludes `miner` until `until` (an existing later end is kept).
    pub async fn exclude(&self, miner: Hotkey, until: UnixMillis) -> Result<(), JobStoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut exclusions = txn.open_table(EXCLUSIONS).map_err(db_err)?;
                let key = miner.as_bytes().as_slice();
                let existing = exclusions.get(key).map_err(db_err)?.map(|v| v.value());
                let until = existing.unwrap_or(0).max(until.0);
                exclusions.insert(key, until).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Every miner exclusion, with the time it ends (ended ones included).
    pub async fn exclusions(&self) -> Result<Vec<(Hotkey, UnixMillis)>, JobStoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(db_err)?;
            let exclusions = txn.open_table(EXCLUSIONS).map_err(db_err)?;
            let mut all = Vec::new();
            for entry in exclusions.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let bytes: [u8; 32] = key
                    .value()
                    .try_into()
                    .map_err(|_| JobStoreError::Corrupt("exclusion key length".to_owned()))?;
                let miner = Hotkey::from_bytes(bytes)
                    .map_err(|e| JobStoreError::Corrupt(format!("exclusion key: {e}")))?;
                all.push((miner, UnixMillis(value.value())));
            }
            Ok(all)
        })
        .await
    }

    /// Jobs without a terminal status (for recovery after a restart).
    pub async fn unfinished(&self) -> Result<Vec<JobId>, JobStoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(db_err)?;
            let jobs = txn.open_table(JOBS).map_err(db_err)?;
            let mut unfinished = Vec::new();
            for entry in jobs.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let record: JobRecord = decode(value.value())?;
                if !record.ended {
                    let id: [u8; 16] = key
                        .value()
                        .try_into()
                        .map_err(|_| JobStoreError::Corrupt("job key length".to_owned()))?;
                    unfinished.push(JobId(id));
                }
            }
            Ok(unfinished)
        })
        .await
    }
}

fn db_err(error: impl Into<redb::Error>) -> JobStoreError {
    match error.into() {
        error @ (redb::Error::Io(_) | redb::Error::PreviousIo) => {
            JobStoreError::Io(error.to_string())
        }
        error => JobStoreError::Database(error.to_string()),
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JobStoreError> {
    from_bytes_exact(bytes).map_err(|e| JobStoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use horde_protocol::SecretKey;
    use horde_protocol::messages::{HordeFailure, JobFinished};
    use horde_protocol::records::Role;
    use horde_transport::test_utils::SmallDisk;

    fn spec(job_id: JobId, key: &SecretKey) -> Signed<JobSpec> {
        let spec = crate::client::JobRequest::command("cpu", "true").into_spec(
            job_id,
            SecretKey::from_seed(&[9; 32]).hotkey(),
            UnixMillis(1),
        );
        Signed::sign(key, &spec)
    }

    #[tokio::test]
    async fn the_store_works_again_once_a_full_disk_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let Some(disk) = SmallDisk::mount_over(dir.path(), 16 << 20) else {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        };
        let store = JobStore::open(&disk.path().join("jobs.redb")).unwrap();
        let key = SecretKey::from_seed(&[4; 32]);
        let insert = |n: u32| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&n.to_be_bytes());
            let job_id = JobId(id);
            store.insert_job(spec(job_id, &key), job_id, key.hotkey(), UnixMillis(1))
        };
        // Fill the disk, then insert until a commit needs room there is not.
        let filler = disk.fill("filler");
        let mut failure = None;
        for n in 0..20_000 {
            if let Err(error) = insert(n).await {
                failure = Some(error);
                break;
            }
        }
        assert!(matches!(failure, Some(JobStoreError::Io(_))), "{failure:?}");
        // Still full: still refused, with the same typed error; a burst of them tries to open
        // the database again at most once per interval, not once each.
        let tried = store.db.reopens.load(Ordering::Relaxed);
        let burst = Instant::now();
        for n in 30_000..30_050 {
            assert!(matches!(insert(n).await, Err(JobStoreError::Io(_))));
        }
        let intervals = burst.elapsed().as_secs_f64() / REOPEN_INTERVAL.as_secs_f64();
        let reopened = store.db.reopens.load(Ordering::Relaxed) - tried;
        assert!(
            reopened as f64 <= intervals.ceil() + 1.0,
            "{reopened} attempts to open it again in {intervals:.2} intervals"
        );
        // Room again: the same store works, no restart (redb alone refuses every operation
        // after an I/O error until the database is opened again), once the interval is past.
        std::fs::remove_file(&filler).unwrap();
        std::thread::sleep(REOPEN_INTERVAL);
        insert(30_001).await.expect("the store works again");
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&30_001u32.to_be_bytes());
        assert!(store.job(JobId(id)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn reports_are_accepted_once_and_exclusions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let miner = SecretKey::from_seed(&[3; 32]).hotkey();
        let job_id = JobId([7; 16]);
        {
            let store = JobStore::open(&path).unwrap();
            store
                .insert_report([1; 32], job_id, 4, UnixMillis(1))
                .await
                .unwrap();
            assert!(matches!(
                store.insert_report([1; 32], job_id, 8, UnixMillis(2)).await,
                Err(JobStoreError::DuplicateReport(_))
            ));
            assert!(matches!(
                store.insert_report([2; 32], job_id, 4, UnixMillis(2)).await,
                Err(JobStoreError::DuplicateReport(_))
            ));
            store.exclude(miner, UnixMillis(100)).await.unwrap();
            store.exclude(miner, UnixMillis(50)).await.unwrap();
        }
        let store = JobStore::open(&path).unwrap();
        assert_eq!(
            store.exclusions().await.unwrap(),
            vec![(miner, UnixMillis(100))]
        );
        assert!(matches!(
            store.insert_report([1; 32], job_id, 9, UnixMillis(3)).await,
            Err(JobStoreError::DuplicateReport(_))
        ));
    }

    /// A status write for a batch, and where its answer arrives.
    fn append(
        job_id: JobId,
        status: JobStatus,
    ) -> (
        JobWrite,
        oneshot::Receiver<Result<StatusUpdate, JobStoreError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let write = JobWrite::Append {
            job_id,
            status,
            at: UnixMillis(5),
            reply,
        };
        (write, answer)
    }

    /// A new job for a batch, and where its answer arrives.
    fn insert(
        job_id: JobId,
        key: &SecretKey,
    ) -> (
        JobWrite,
        oneshot::Receiver<Result<StatusUpdate, JobStoreError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let write = JobWrite::Insert {
            spec: spec(job_id, key),
            job_id,
            owner: key.hotkey(),
            at: UnixMillis(4),
            reply,
        };
        (write, answer)
    }

    #[tokio::test]
    async fn one_commit_answers_each_write_of_its_batch_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.redb")).unwrap();
        let key = SecretKey::from_seed(&[1; 32]);
        let (a, b) = (JobId([1; 16]), JobId([2; 16]));
        let finished = JobStatus::Completed(JobFinished {
            exit_code: Some(0),
            terminated: true,
            outputs: Vec::new(),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
        });
        let (writes, answers): (Vec<_>, Vec<_>) = vec![
            insert(a, &key),
            append(a, JobStatus::Accepted),
            insert(a, &key),
            append(b, JobStatus::Accepted),
            append(a, finished.clone()),
            append(a, JobStatus::ExecutorReady),
        ]
        .into_iter()
        .unzip();
        let outcomes = store.db.with(|db| apply_batch(db, &writes));
        answer_batch(writes, outcomes);
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.unwrap());
        }
        assert_eq!(outcomes[0].as_ref().unwrap().seq, 0);
        assert_eq!(outcomes[1].as_ref().unwrap().seq, 1);
        assert!(matches!(outcomes[2], Err(JobStoreError::Duplicate(id)) if id == a));
        assert!(matches!(outcomes[3], Err(JobStoreError::UnknownJob(id)) if id == b));
        assert_eq!(outcomes[4].as_ref().unwrap().seq, 2);
        assert!(matches!(outcomes[5], Err(JobStoreError::Ended(id)) if id == a));
        let history: Vec<JobStatus> = store
            .history(a)
            .await
            .unwrap()
            .into_iter()
            .map(|update| update.status)
            .collect();
        assert_eq!(
            history,
            vec![JobStatus::Received, JobStatus::Accepted, finished]
        );
        assert!(store.job(b).await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_jobs_writing_at_once_each_get_their_own_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.redb")).unwrap();
        let key = SecretKey::from_seed(&[1; 32]);
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..200u8 {
            let (store, key) = (store.clone(), key.clone());
            tasks.spawn(async move {
                let job_id = JobId([n; 16]);
                store
                    .insert_job(spec(job_id, &key), job_id, key.hotkey(), UnixMillis(1))
                    .await
                    .unwrap();
                for (seq, status) in [JobStatus::Accepted, JobStatus::ExecutorReady]
                    .into_iter()
                    .enumerate()
                {
                    let update = store
                        .append_status(job_id, status, UnixMillis(2))
                        .await
                        .unwrap();
                    assert_eq!(update.seq as usize, seq + 1);
                }
                job_id
            });
        }
        while let Some(job_id) = tasks.join_next().await {
            let history = store.history(job_id.unwrap()).await.unwrap();
            assert_eq!(history.len(), 3);
        }
        assert_eq!(store.unfinished().await.unwrap().len(), 200);
    }

    #[tokio::test]
    async fn statuses_survive_reopen_and_ids_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let key = SecretKey::from_seed(&[1; 32]);
        let job_id = JobId([7; 16]);
        {
            let store = JobStore::open(&path).unwrap();
            store
                .insert_job(spec(job_id, &key), job_id, key.hotkey(), UnixMillis(1))
                .await
                .unwrap();
            let second = store
                .insert_job(spec(job_id, &key), job_id, key.hotkey(), UnixMillis(2))
                .await;
            assert!(matches!(second, Err(JobStoreError::Duplicate(id)) if id == job_id));
            let update = store
                .append_status(job_id, JobStatus::Accepted, UnixMillis(3))
                .await
                .unwrap();
            assert_eq!(update.seq, 1);
            assert_eq!(store.unfinished().await.unwrap(), vec![job_id]);
        }
        let store = JobStore::open(&path).unwrap();
        let history = store.history(job_id).await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].status, JobStatus::Received);
        assert_eq!(history[1].status, JobStatus::Accepted);
        let record = store.job(job_id).await.unwrap().unwrap();
        assert_eq!(record.owner, key.hotkey());
        assert_eq!(record.spec.verify().unwrap().job_id, job_id);

        let failure = JobStatus::HordeFailed(HordeFailure {
            reported_by: Role::Facilitator,
            reporter: key.hotkey(),
            reason: "test".into(),
        });
        store
            .append_status(job_id, failure, UnixMillis(4))
            .await
            .unwrap();
        assert!(store.unfinished().await.unwrap().is_empty());
        let after_end = store
            .append_status(
                job_id,
                JobStatus::Completed(JobFinished {
                    exit_code: Some(0),
                    terminated: false,
                    outputs: vec![],
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                }),
                UnixMillis(5),
            )
            .await;
        assert!(matches!(after_end, Err(JobStoreError::Ended(_))));
        assert!(matches!(
            store
                .append_status(JobId([0; 16]), JobStatus::Accepted, UnixMillis(6))
                .await,
            Err(JobStoreError::UnknownJob(_))
        ));
    }
}
