//! The job ids a validator has accepted, kept until their spec expires, so that a signed spec
//! replayed as a new `Assign` — by any node that has seen it: a miner, an executor, a facilitator
//! — is refused with `DuplicateJobId` instead of being driven again (and earning its miner
//! accounting receipts again). After its expiry a spec is refused as `Expired` anyway.
//!
//! Persisted in `<data_dir>/seen_jobs.bin`, so a restart keeps them: fixed
//! [`RECORD_LEN`]-byte records (job id, then the expiry in Unix milliseconds, little-endian),
//! appended as ids are accepted. An append is one `write`, not synced: it survives the process
//! being killed, not the machine losing power (syncing would put a disk flush on every job's
//! path). When the file holds [`COMPACT_FACTOR`] times as many records as live ids, it is
//! rewritten without the expired ones (temporary file, sync, rename). A torn last record — a
//! write cut short — is ignored on loading.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use horde_protocol::{JobId, UnixMillis};

/// One record: a 16-byte job id and an 8-byte expiry.
const RECORD_LEN: usize = 24;

/// Most ids kept. At ~100 bytes each in memory (two indexes) that is ~100 MiB at most, and a
/// million jobs alive at once is far beyond what one validator drives. When full, the ids whose
/// specs live longest are forgotten first: short-lived specs, the normal case, stay protected.
/// (Tests use a small table.)
pub(crate) const MAX_SEEN_JOBS: usize = if cfg!(test) { 4096 } else { 1 << 20 };

/// The file is compacted once it holds this many times more records than live ids ...
const COMPACT_FACTOR: usize = 2;

/// ... and at least this many records (1.5 MiB), so small files are never rewritten.
const COMPACT_MIN_RECORDS: usize = 65_536;

/// The seen-jobs file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct SeenJobsError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// What [`SeenJobs::insert`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A new id, now recorded.
    New,
    /// The id was accepted before and its spec has not expired: a replay.
    Replayed,
}

#[derive(Debug, Default)]
struct Ids {
    expiry: HashMap<JobId, UnixMillis>,
    /// The same ids by expiry, to drop the expired ones and, when full, the longest-lived.
    by_expiry: BTreeSet<(UnixMillis, JobId)>,
}

impl Ids {
    fn insert(&mut self, job_id: JobId, expires_at: UnixMillis) {
        if let Some(old) = self.expiry.insert(job_id, expires_at) {
            self.by_expiry.remove(&(old, job_id));
        }
        self.by_expiry.insert((expires_at, job_id));
    }

    fn remove_expired(&mut self, now: UnixMillis) {
        while let Some(&(expires_at, job_id)) = self.by_expiry.first() {
            if expires_at >= now {
                break;
            }
            self.by_expiry.pop_first();
            self.expiry.remove(&job_id);
        }
    }

    /// Makes room for one more id, expiring at `expires_at`: false if the table is full of ids
    /// that all expire no later than it (it is then not kept).
    fn make_room(&mut self, expires_at: UnixMillis) -> bool {
        if self.expiry.len() < MAX_SEEN_JOBS {
            return true;
        }
        match self.by_expiry.last() {
            Some(&(latest, job_id)) if latest > expires_at => {
                self.by_expiry.pop_last();
                self.expiry.remove(&job_id);
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
struct State {
    ids: Ids,
    /// The open file and how many records it holds.
    file: Option<(File, usize)>,
}

/// The job ids accepted and not yet expired; see the module docs.
#[derive(Debug)]
pub(crate) struct SeenJobs {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl SeenJobs {
    /// The ids recorded at `path` (none if it does not exist yet) that have not expired at
    /// `now`; `None` keeps them in memory only.
    pub(crate) fn load(path: Option<PathBuf>, now: UnixMillis) -> Result<Self, SeenJobsError> {
        let mut ids = Ids::default();
        let mut file = None;
        if let Some(path) = &path {
            let error = |source| SeenJobsError {
                path: path.display().to_string(),
                source,
            };
            let mut bytes = Vec::new();
            match File::open(path) {
                Ok(mut existing) => {
                    existing.read_to_end(&mut bytes).map_err(error)?;
                }
                Err(source) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(error(source)),
            }
            for record in bytes.chunks_exact(RECORD_LEN) {
                let (id, expiry) = record.split_at(16);
                let mut job_id = [0u8; 16];
                job_id.copy_from_slice(id);
                let mut expires_at = [0u8; 8];
                expires_at.copy_from_slice(expiry);
                ids.insert(JobId(job_id), UnixMillis(u64::from_le_bytes(expires_at)));
            }
            ids.remove_expired(now);
            while ids.expiry.len() > MAX_SEEN_JOBS {
                let _ = ids
                    .by_expiry
                    .pop_last()
                    .map(|(_, id)| ids.expiry.remove(&id));
            }
            // Starts from a compact file: only the live ids, whole records.
            file = Some((rewrite(path, &ids).map_err(error)?, ids.expiry.len()));
        }
        Ok(Self {
            path,
            state: Mutex::new(State { ids, file }),
        })
    }

    /// Records that `job_id`, whose spec expires at `expires_at`, is accepted now (`now`), or
    /// finds it was accepted before. An error writing the file is returned after the id is
    /// recorded in memory: replays are still refused until a restart. Blocking (a write, now
    /// and then a rewrite and fsync): call it from a blocking context.
    pub(crate) fn insert(
        &self,
        job_id: JobId,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> (Seen, Result<(), SeenJobsError>) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.ids.remove_expired(now);
        if state.ids.expiry.contains_key(&job_id) {
            return (Seen::Replayed, Ok(()));
        }
        if !state.ids.make_room(expires_at) {
            return (Seen::New, Ok(()));
        }
        state.ids.insert(job_id, expires_at);
        (Seen::New, self.append(&mut state, job_id, expires_at))
    }

    fn append(
        &self,
        state: &mut State,
        job_id: JobId,
        expires_at: UnixMillis,
    ) -> Result<(), SeenJobsError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let error = |source| SeenJobsError {
            path: path.display().to_string(),
            source,
        };
        let live = state.ids.expiry.len();
        if let Some((_, records)) = &state.file
            && *records >= COMPACT_MIN_RECORDS.max(COMPACT_FACTOR * live)
        {
            // The new id is in `ids` already: the rewrite includes it.
            state.file = None;
            state.file = Some((rewrite(path, &state.ids).map_err(error)?, live));
            return Ok(());
        }
        let Some((file, records)) = &mut state.file else {
            // A failed rewrite left no file open: try again from the ids in memory.
            state.file = Some((rewrite(path, &state.ids).map_err(error)?, live));
            return Ok(());
        };
        let mut record = [0u8; RECORD_LEN];
        record[..16].copy_from_slice(&job_id.0);
        record[16..].copy_from_slice(&expires_at.0.to_le_bytes());
        if let Err(source) = file.write_all(&record) {
            // Part of the record may be in the file, which would shift every later one: the
            // next insert rewrites the file whole from the ids in memory instead.
            state.file = None;
            return Err(error(source));
        }
        *records += 1;
        Ok(())
    }
}

/// Writes `ids` over `path` atomically (`crate::atomic_file::write_atomically`) and returns the file open
/// for appending.
fn rewrite(path: &Path, ids: &Ids) -> std::io::Result<File> {
    let mut bytes = Vec::with_capacity(ids.expiry.len() * RECORD_LEN);
    for (job_id, expires_at) in &ids.expiry {
        bytes.extend_from_slice(&job_id.0);
        bytes.extend_from_slice(&expires_at.0.to_le_bytes());
    }
    crate::atomic_file::write_atomically(path, &bytes, 0o600)?;
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn later(ms: u64) -> UnixMillis {
        UnixMillis(NOW.0 + ms)
    }

    #[test]
    fn a_replay_is_found_until_the_spec_expires() {
        let seen = SeenJobs::load(None, NOW).unwrap();
        let (first, written) = seen.insert(JobId([1; 16]), later(1000), NOW);
        assert_eq!(first, Seen::New);
        written.unwrap();
        assert_eq!(
            seen.insert(JobId([1; 16]), later(1000), NOW).0,
            Seen::Replayed
        );
        assert_eq!(seen.insert(JobId([2; 16]), later(1000), NOW).0, Seen::New);
        // Expired: forgotten (the validator refuses the spec as expired by then anyway).
        assert_eq!(
            seen.insert(JobId([1; 16]), later(1000), later(1001)).0,
            Seen::New
        );
    }

    #[test]
    fn ids_survive_a_restart_and_a_torn_last_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen_jobs.bin");
        {
            let seen = SeenJobs::load(Some(path.clone()), NOW).unwrap();
            for byte in 1..=3u8 {
                seen.insert(JobId([byte; 16]), later(u64::from(byte) * 1000), NOW)
                    .1
                    .unwrap();
            }
        }
        // A write cut short after the three records.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[9u8; 10]).unwrap();
        drop(file);
        // Loaded 1.5 s later: job 1 has expired, jobs 2 and 3 have not.
        let seen = SeenJobs::load(Some(path.clone()), later(1500)).unwrap();
        assert_eq!(
            seen.insert(JobId([2; 16]), later(2000), later(1500)).0,
            Seen::Replayed
        );
        assert_eq!(
            seen.insert(JobId([3; 16]), later(3000), later(1500)).0,
            Seen::Replayed
        );
        assert_eq!(
            seen.insert(JobId([1; 16]), later(9000), later(1500)).0,
            Seen::New
        );
        // The file was compacted on loading: two live records, then the one just added.
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            3 * RECORD_LEN as u64
        );
    }

    #[test]
    fn when_full_the_longest_lived_ids_are_forgotten_first() {
        let mut ids = Ids::default();
        for n in 0..MAX_SEEN_JOBS as u64 {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            ids.insert(JobId(id), later(10_000 + n));
        }
        // A spec expiring sooner than the latest makes room by dropping the latest ...
        assert!(ids.make_room(later(5)));
        let last = (MAX_SEEN_JOBS as u64 - 1).to_le_bytes();
        assert!(!ids.expiry.keys().any(|id| id.0[..8] == last));
        ids.insert(JobId([0xff; 16]), later(5));
        // ... one expiring after every kept id is not kept.
        assert!(!ids.make_room(later(u64::MAX / 2)));
        assert_eq!(ids.expiry.len(), MAX_SEEN_JOBS);
    }
}
