//! Accounting receipts on disk: an append-only log in the node's data directory, written by
//! validators and miners, read by `horde receipts` while the node runs.
//!
//! `<data_dir>/receipts.log` starts with the 8-byte magic [`MAGIC`], then holds one record per
//! stored receipt:
//!
//! ```text
//! u32 big-endian body length | first 8 bytes of BLAKE3(body) | body (postcard StoredReceipt)
//! ```
//!
//! Each append is written at the end of the last good record (positioned writes) and made
//! durable with `fdatasync` before the caller hears it succeeded. A crash can only leave an incomplete (or,
//! with reordered sector writes, garbled) *last* record: on reopen the writer finds it — too
//! short, or its checksum does not match and nothing follows it — truncates it and logs a warning.
//! A bad record with more records after it is not a torn write but damage, and the writer refuses
//! to open the log (the node does not start) rather than drop the receipts behind it; the
//! operator moves the file aside. A failed append (disk full) truncates the file back to its last
//! good record, so a later append never lands behind garbage.
//!
//! Readers ([`read_log`]) open the file read-only and never change it; a record being written at
//! that moment is reported as an incomplete tail and skipped.
//!
//! Limits: one record at most [`MAX_RECORD_LEN`] bytes; the whole log at most
//! `[receipts] max_log_bytes` (default [`DEFAULT_MAX_LOG_BYTES`]). A full log refuses further
//! receipts with [`ReceiptLogError::Full`]; the node logs each refused receipt and keeps
//! running jobs.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use horde_protocol::codec::{from_bytes_exact, to_bytes};
use horde_protocol::{AccountingRecord, UnixMillis};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// The log's file name in the data directory.
pub const RECEIPTS_FILE: &str = "receipts.log";

/// The first bytes of every receipt log: names the format and its version.
pub const MAGIC: &[u8; 8] = b"hrdrcpt1";

/// Largest record body accepted. A receipt with its countersignature and note is well under
/// 1 KiB; 16 KiB leaves room for long executor class names and notes while keeping a corrupt
/// length field from making a reader allocate much.
pub const MAX_RECORD_LEN: u32 = 16 * 1024;

/// Default cap on the log: 64 MiB, about 150 000 receipts (50 000 jobs at three receipts each)
/// — months of a busy node — and still read whole in a fraction of a second.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 20;

/// Smallest log size limit accepted: the magic and one record of the largest size.
pub const MIN_LOG_BYTES: u64 = (MAGIC.len() + RECORD_HEADER_LEN) as u64 + MAX_RECORD_LEN as u64;

/// Length prefix and checksum in front of each body.
const RECORD_HEADER_LEN: usize = 4 + CHECKSUM_LEN;
const CHECKSUM_LEN: usize = 8;

/// The receipt log's path in a data directory.
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RECEIPTS_FILE)
}

/// One stored receipt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct StoredReceipt {
    /// The receipt, with the miner's countersignature when it gave one.
    pub record: AccountingRecord,
    /// When this node stored it.
    pub stored_at: UnixMillis,
    /// Why it is not countersigned (no answer in time, refused, bad countersignature); `None`
    /// when it is.
    pub note: Option<String>,
}

/// The receipt log cannot be opened, read or appended to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptLogError {
    /// Reading, writing or syncing failed.
    #[error("receipt log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not start with the receipt log magic.
    #[error("receipt log {path}: not a horde receipt log (bad magic)")]
    NotAReceiptLog {
        /// The file.
        path: String,
    },
    /// A record before the end is damaged: not a torn write, so it is not truncated.
    #[error(
        "receipt log {path}: damaged record at offset {offset}: {reason}; move the file aside \
         to start a new log"
    )]
    Corrupt {
        /// The file.
        path: String,
        /// Where the damaged record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The log reached its size limit.
    #[error("receipt log {path} is full ({limit} bytes); receipt not stored")]
    Full {
        /// The file.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// The record is larger than [`MAX_RECORD_LEN`].
    #[error("receipt record of {0} bytes is over the {MAX_RECORD_LEN}-byte limit")]
    TooLarge(usize),
    /// An earlier append failed and could not be undone; appends are refused until reopen.
    #[error("receipt log {path}: an earlier write could not be undone; restart the node")]
    Poisoned {
        /// The file.
        path: String,
    },
}

/// What reading a log found.
#[derive(Debug, Default)]
pub struct LogContents {
    /// Every complete, checksummed record, in order.
    pub entries: Vec<StoredReceipt>,
    /// Bytes of all complete records, magic included: where the next record goes.
    pub good_len: u64,
    /// An incomplete or garbled last record (being written, or torn by a crash): its offset and
    /// length.
    pub torn_tail: Option<(u64, u64)>,
    /// A damaged record with more after it (not a torn write): reading stopped there, so
    /// `entries` are only those before it.
    pub damage: Option<ReceiptLogError>,
}

/// Why a record does not read back.
enum Damage {
    /// The last record is cut short, or garbled with nothing after it.
    Torn,
    /// A record with more bytes after it is bad.
    Corrupt(String),
}

/// Parses the records after the magic, up to the first damaged one.
fn scan(path: &str, bytes: &[u8]) -> Result<LogContents, ReceiptLogError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC[..] {
        return Err(ReceiptLogError::NotAReceiptLog {
            path: path.to_owned(),
        });
    }
    let mut contents = LogContents::default();
    let mut offset = MAGIC.len();
    while offset < bytes.len() {
        match parse_record(&bytes[offset..]) {
            Ok((entry, len)) => {
                contents.entries.push(entry);
                offset += len;
            }
            Err(Damage::Torn) => {
                contents.torn_tail = Some((offset as u64, (bytes.len() - offset) as u64));
                break;
            }
            Err(Damage::Corrupt(reason)) => {
                contents.damage = Some(ReceiptLogError::Corrupt {
                    path: path.to_owned(),
                    offset: offset as u64,
                    reason,
                });
                break;
            }
        }
    }
    contents.good_len = offset as u64;
    Ok(contents)
}

/// Parses one record at the start of `rest`; returns it and its length.
fn parse_record(rest: &[u8]) -> Result<(StoredReceipt, usize), Damage> {
    let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
        return Err(Damage::Torn);
    };
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&header[..4]);
    let len = u32::from_be_bytes(len_bytes);
    let end = RECORD_HEADER_LEN + len as usize;
    let is_last = |end: usize| end >= rest.len();
    if len > MAX_RECORD_LEN {
        // A garbled length: torn if it is the last thing written, damage otherwise.
        return Err(if is_last(end) {
            Damage::Torn
        } else {
            Damage::Corrupt(format!("length {len} over the {MAX_RECORD_LEN}-byte limit"))
        });
    }
    let Some(body) = rest.get(RECORD_HEADER_LEN..end) else {
        return Err(Damage::Torn);
    };
    if blake3::hash(body).as_bytes()[..CHECKSUM_LEN] != header[4..] {
        return Err(if is_last(end) {
            Damage::Torn
        } else {
            Damage::Corrupt("checksum mismatch".to_owned())
        });
    }
    let entry = from_bytes_exact(body)
        .map_err(|e| Damage::Corrupt(format!("record does not decode: {e}")))?;
    Ok((entry, end))
}

/// Reads a log without changing it (safe while a node appends to it). Damage part-way is
/// reported in [`LogContents::damage`] with the records before it.
pub fn read_log(path: &Path) -> Result<LogContents, ReceiptLogError> {
    let shown = path.display().to_string();
    let io = |source| ReceiptLogError::Io {
        path: shown.clone(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(io)?;
    scan(&shown, &bytes)
}

/// The writer's side of a log: open once per node.
#[derive(Debug)]
pub struct ReceiptLog {
    path: String,
    file: File,
    len: u64,
    max_bytes: u64,
    poisoned: bool,
}

impl ReceiptLog {
    /// Opens the log, creating it if missing; truncates a torn last record (with a warning).
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, ReceiptLogError> {
        let shown = path.display().to_string();
        let io = |source| ReceiptLogError::Io {
            path: shown.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(io)?;
        // A crash while creating the file can leave part of the magic: start over.
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes) {
            file.set_len(0).map_err(io)?;
            file.write_all_at(MAGIC, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
            }
            bytes = MAGIC.to_vec();
        }
        let mut contents = scan(&shown, &bytes)?;
        if let Some(damage) = contents.damage.take() {
            return Err(damage);
        }
        if let Some((offset, torn)) = contents.torn_tail {
            warn!(path = %shown, offset, bytes = torn,
                "receipt log: incomplete last record (torn by a crash) truncated");
            file.set_len(offset).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        Ok(Self {
            path: shown,
            file,
            len: contents.good_len,
            max_bytes,
            poisoned: false,
        })
    }

    /// The log's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log holds no records.
    pub fn is_empty(&self) -> bool {
        self.len <= MAGIC.len() as u64
    }

    /// Appends one record and syncs it to disk before returning.
    pub fn append(&mut self, entry: &StoredReceipt) -> Result<(), ReceiptLogError> {
        if self.poisoned {
            return Err(ReceiptLogError::Poisoned {
                path: self.path.clone(),
            });
        }
        let body = to_bytes(entry);
        let len = u32::try_from(body.len())
            .ok()
            .filter(|len| *len <= MAX_RECORD_LEN)
            .ok_or(ReceiptLogError::TooLarge(body.len()))?;
        let mut record = Vec::with_capacity(RECORD_HEADER_LEN + body.len());
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&blake3::hash(&body).as_bytes()[..CHECKSUM_LEN]);
        record.extend_from_slice(&body);
        if self.len.saturating_add(record.len() as u64) > self.max_bytes {
            return Err(ReceiptLogError::Full {
                path: self.path.clone(),
                limit: self.max_bytes,
            });
        }
        let written = self
            .file
            .write_all_at(&record, self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            // Take back whatever part was written, so the next record follows a good one.
            let undone = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data());
            if undone.is_err() {
                self.poisoned = true;
            }
            return Err(ReceiptLogError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += record.len() as u64;
        Ok(())
    }
}

/// A time window over receipts' `issued_at`: `since` inclusive, `until` exclusive; an absent
/// bound is open.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TimeWindow {
    /// Earliest time included.
    pub since: Option<UnixMillis>,
    /// First time no longer included.
    pub until: Option<UnixMillis>,
}

impl TimeWindow {
    /// Whether `at` falls in the window.
    pub fn contains(&self, at: UnixMillis) -> bool {
        self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at < until)
    }
}

/// A cheap, cloneable handle on a node's receipt log for async code: appends run on the blocking
/// pool, one at a time.
#[derive(Debug, Clone)]
pub struct ReceiptStore {
    log: Arc<Mutex<ReceiptLog>>,
}

impl ReceiptStore {
    /// Opens `<data_dir>/receipts.log` (see [`ReceiptLog::open`]).
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Self, ReceiptLogError> {
        Ok(Self {
            log: Arc::new(Mutex::new(ReceiptLog::open(
                &log_path(data_dir),
                max_bytes,
            )?)),
        })
    }

    /// Stores a record, durably, stamped with `stored_at`.
    pub async fn append(
        &self,
        record: AccountingRecord,
        note: Option<String>,
        stored_at: UnixMillis,
    ) -> Result<(), ReceiptLogError> {
        let log = Arc::clone(&self.log);
        let entry = StoredReceipt {
            record,
            stored_at,
            note,
        };
        tokio::task::spawn_blocking(move || {
            log.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .append(&entry)
        })
        .await
        .map_err(|e| ReceiptLogError::Io {
            path: RECEIPTS_FILE.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?
    }
}

/// Receipts for tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::StoredReceipt;
    use horde_protocol::{
        AccountingReceipt, AccountingRecord, Countersignature, ExecutorClass, JobId, ReceiptKind,
        SecretKey, Signed, UnixMillis,
    };

    /// A stored receipt by validator key `[1; 32]` for miner key `[2; 32]`, class `cpu`, issued
    /// and stored at `at`, countersigned if asked.
    pub(crate) fn stored(
        kind: ReceiptKind,
        job_id: JobId,
        at: UnixMillis,
        countersign: bool,
        note: Option<&str>,
    ) -> StoredReceipt {
        let (validator, miner) = (
            SecretKey::from_seed(&[1; 32]),
            SecretKey::from_seed(&[2; 32]),
        );
        let receipt = Signed::sign(
            &validator,
            &AccountingReceipt {
                kind,
                job_id,
                validator: validator.hotkey(),
                miner: miner.hotkey(),
                executor_class: ExecutorClass("cpu".into()),
                issued_at: at,
            },
        );
        StoredReceipt {
            record: AccountingRecord {
                countersignature: countersign.then(|| Countersignature::sign(&miner, &receipt)),
                receipt,
            },
            stored_at: at,
            note: note.map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::stored;
    use super::*;
    use horde_protocol::{JobId, ReceiptKind};

    fn entry(seed: u8) -> StoredReceipt {
        stored(
            ReceiptKind::Started,
            JobId([seed; 16]),
            UnixMillis(u64::from(seed) * 1000),
            true,
            None,
        )
    }

    fn write_log(path: &Path, count: u8) -> Vec<StoredReceipt> {
        let mut log = ReceiptLog::open(path, DEFAULT_MAX_LOG_BYTES).unwrap();
        let entries: Vec<_> = (1..=count).map(entry).collect();
        for entry in &entries {
            log.append(entry).unwrap();
        }
        entries
    }

    #[test]
    fn appends_survive_reopen_and_read_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        let mut log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
        assert!(log.is_empty());
        log.append(&entry(1)).unwrap();
        // A reader sees it while the writer is open.
        assert_eq!(read_log(&path).unwrap().entries, vec![entry(1)]);
        log.append(&entry(2)).unwrap();
        drop(log);
        let mut log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
        log.append(&entry(3)).unwrap();
        let contents = read_log(&path).unwrap();
        assert_eq!(contents.entries, vec![entry(1), entry(2), entry(3)]);
        assert_eq!(contents.torn_tail, None);
        assert_eq!(contents.good_len, log.len());
    }

    /// A crash can cut the file anywhere after the last synced record: at every such point,
    /// reopening keeps exactly the complete records, truncates the rest, and appends again.
    #[test]
    fn torn_tail_at_every_cut_is_truncated_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full.log");
        let entries = write_log(&full, 3);
        let bytes = std::fs::read(&full).unwrap();
        let ends: Vec<usize> = {
            let mut ends = vec![MAGIC.len()];
            let mut offset = MAGIC.len();
            while offset < bytes.len() {
                let len = u32::from_be_bytes(bytes[offset..offset + 4].try_into().unwrap());
                offset += RECORD_HEADER_LEN + len as usize;
                ends.push(offset);
            }
            ends
        };
        assert_eq!(ends.len(), 4);
        for cut in MAGIC.len()..bytes.len() {
            let path = dir.path().join(format!("cut-{cut}.log"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let complete = ends.iter().filter(|end| **end <= cut).count() - 1;
            let read = read_log(&path).unwrap();
            assert_eq!(read.entries, entries[..complete], "cut {cut}");
            assert_eq!(read.torn_tail.is_some(), !ends.contains(&cut), "cut {cut}");
            let mut log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
            assert_eq!(log.len(), ends[complete] as u64, "cut {cut}");
            log.append(&entry(9)).unwrap();
            drop(log);
            let mut expected = entries[..complete].to_vec();
            expected.push(entry(9));
            let read = read_log(&path).unwrap();
            assert_eq!(read.entries, expected, "cut {cut}");
            assert_eq!(read.torn_tail, None, "cut {cut}");
        }
    }

    #[test]
    fn garbled_last_record_is_torn_but_garbled_middle_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        write_log(&path, 2);
        let mut bytes = std::fs::read(&path).unwrap();
        // Garble the last byte: the last record's checksum fails with nothing after it.
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
        assert_eq!(read_log(&path).unwrap().entries, vec![entry(1)]);
        drop(log);

        // Garble the first record's body with a second one after it.
        let path = dir.path().join("m.log");
        write_log(&path, 2);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[MAGIC.len() + RECORD_HEADER_LEN + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let error = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap_err();
        assert!(
            matches!(error, ReceiptLogError::Corrupt { offset: 8, .. }),
            "{error}"
        );
        // Readers get what they can, and the damage.
        let read = read_log(&path).unwrap();
        assert!(read.entries.is_empty());
        assert!(matches!(
            read.damage,
            Some(ReceiptLogError::Corrupt { offset: 8, .. })
        ));
        // The damaged file was not changed.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn foreign_files_are_refused_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        std::fs::write(&path, b"these are not receipts").unwrap();
        assert!(matches!(
            ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES),
            Err(ReceiptLogError::NotAReceiptLog { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"these are not receipts");
        // A crash during creation leaves part of the magic: that is just an empty log.
        std::fs::write(&path, &MAGIC[..3]).unwrap();
        let log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
        assert!(log.is_empty());
        assert_eq!(std::fs::read(&path).unwrap(), MAGIC);
    }

    #[test]
    fn time_window_is_half_open() {
        let window = TimeWindow {
            since: Some(UnixMillis(1_000)),
            until: Some(UnixMillis(2_000)),
        };
        let issued = |seed: u8| entry(seed).record.verify().unwrap().receipt.issued_at;
        // entry(n) is issued at n seconds.
        let kept: Vec<u8> = (0..4).filter(|n| window.contains(issued(*n))).collect();
        assert_eq!(kept, vec![1]);
        assert!(TimeWindow::default().contains(UnixMillis(0)));
        assert!(
            TimeWindow {
                since: None,
                until: Some(UnixMillis(1))
            }
            .contains(UnixMillis(0))
        );
        assert!(
            !TimeWindow {
                since: Some(UnixMillis(1)),
                until: None
            }
            .contains(UnixMillis(0))
        );
    }

    #[test]
    fn size_limits_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let one = {
            let mut log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
            log.append(&entry(1)).unwrap();
            log.len()
        };
        let mut log = ReceiptLog::open(&path, one + 10).unwrap();
        assert!(matches!(
            log.append(&entry(2)),
            Err(ReceiptLogError::Full { .. })
        ));
        assert_eq!(log.len(), one);
        let mut huge = entry(3);
        huge.note = Some("x".repeat(MAX_RECORD_LEN as usize));
        let mut log = ReceiptLog::open(&path, DEFAULT_MAX_LOG_BYTES).unwrap();
        assert!(matches!(
            log.append(&huge),
            Err(ReceiptLogError::TooLarge(_))
        ));
        assert_eq!(read_log(&path).unwrap().entries, vec![entry(1)]);
    }
}
