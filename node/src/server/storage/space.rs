//! What the store holds on disk and what it may still take: the bytes of stored blobs and of
//! partial uploads ([`SpaceUsage::held`]), the room reserved by uploads in flight, the
//! `[storage] max_bytes` cap and the filesystem's free space (statvfs). An upload reserves its
//! whole declared size before a byte is written, or is refused; when it ends, what it left on
//! disk replaces its reservation.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use horde_protocol::{ClassCapacity, ExecutorClass, STORAGE_CAPACITY_CLASS};
use tokio::sync::watch;

const MIB: u64 = 1 << 20;

/// What the store holds and may take, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceUsage {
    /// Bytes of stored blobs (with their outboards) and partial uploads on disk, not counting the
    /// uploads in flight.
    pub held: u64,
    /// Bytes reserved by uploads in flight (what they may still write).
    pub reserved: u64,
    /// `[storage] max_bytes`, if set.
    pub cap: Option<u64>,
    /// Bytes the filesystem still gives an unprivileged writer (statvfs `f_bavail`).
    pub fs_available: u64,
}

impl SpaceUsage {
    /// The bound in force: the cap, or what is held plus what the filesystem has free.
    pub fn limit(&self) -> u64 {
        self.cap
            .unwrap_or_else(|| self.held.saturating_add(self.fs_available))
    }
}

/// Why an upload finds no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// It would take the store past `[storage] max_bytes`.
    #[error(
        "{need} bytes do not fit under the store's cap of {cap} bytes ({committed} held or reserved)"
    )]
    Cap {
        /// Bytes the upload needs.
        need: u64,
        /// Held plus reserved.
        committed: u64,
        /// The cap.
        cap: u64,
    },
    /// The filesystem has less free space than it needs.
    #[error("{need} bytes do not fit in the {available} bytes free on the store's disk")]
    Disk {
        /// Bytes the upload needs.
        need: u64,
        /// Free bytes (statvfs).
        available: u64,
    },
}

#[derive(Debug, Default)]
struct Counts {
    held: u64,
    reserved: u64,
}

/// The store's space accounting; one per store.
#[derive(Debug)]
pub(super) struct Space {
    root: PathBuf,
    cap: Option<u64>,
    counts: Mutex<Counts>,
    published: watch::Sender<Vec<ClassCapacity>>,
}

/// Bytes a filesystem gives an unprivileged writer at `path`.
fn fs_available(path: &Path) -> io::Result<u64> {
    let stat = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Sum of the lengths of the files directly in `dir`, but for the few bytes of the `.size`
/// files beside partial uploads.
fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() && !entry.file_name().to_string_lossy().ends_with(".size") {
            total = total.saturating_add(meta.len());
        }
    }
    Ok(total)
}

impl Space {
    /// Counts what `dirs` (under `root`) hold. Blocking.
    pub(super) fn scan(root: &Path, dirs: &[&Path], cap: Option<u64>) -> io::Result<Self> {
        let mut held = 0u64;
        for dir in dirs {
            held = held.saturating_add(dir_bytes(dir)?);
        }
        let space = Self {
            root: root.to_owned(),
            cap,
            counts: Mutex::new(Counts { held, reserved: 0 }),
            published: watch::Sender::new(Vec::new()),
        };
        space.publish();
        Ok(space)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What is held and reserved now, with the filesystem's free space.
    pub(super) fn usage(&self) -> SpaceUsage {
        let (held, reserved) = {
            let counts = self.counts();
            (counts.held, counts.reserved)
        };
        SpaceUsage {
            held,
            reserved,
            cap: self.cap,
            fs_available: fs_available(&self.root).unwrap_or(0),
        }
    }

    /// Reserves `need` bytes for an upload whose file now holds `released` bytes fewer than
    /// were counted (a partial started over), or refuses it: past the cap (held + reserved +
    /// `need`), or more than the filesystem has free.
    pub(super) fn reserve(&self, need: u64, released: u64) -> Result<(), NoRoom> {
        let result = {
            let mut counts = self.counts();
            counts.held = counts.held.saturating_sub(released);
            let committed = counts.held.saturating_add(counts.reserved);
            match self.cap {
                Some(cap) if committed.saturating_add(need) > cap => Err(NoRoom::Cap {
                    need,
                    committed,
                    cap,
                }),
                _ => match fs_available(&self.root) {
                    Ok(available) if need > available => Err(NoRoom::Disk { need, available }),
                    // An unreadable statvfs leaves the write to find out.
                    _ => {
                        counts.reserved = counts.reserved.saturating_add(need);
                        Ok(())
                    }
                },
            }
        };
        self.publish();
        result
    }

    /// An upload ended: its `reserved` bytes are given back, and the `counted` bytes its file
    /// held when it started are replaced by the `kept` bytes it leaves on disk.
    pub(super) fn settle(&self, reserved: u64, counted: u64, kept: u64) {
        {
            let mut counts = self.counts();
            counts.reserved = counts.reserved.saturating_sub(reserved);
            counts.held = counts.held.saturating_sub(counted).saturating_add(kept);
        }
        self.publish();
    }

    /// `bytes` held on disk were removed (an expired or reclaimed partial).
    pub(super) fn forget(&self, bytes: u64) {
        self.settle(0, bytes, 0);
    }

    /// Updates the published capacity entry when its MiB values change.
    fn publish(&self) {
        let usage = self.usage();
        let limit = usage.limit();
        let committed = usage.held.saturating_add(usage.reserved);
        let entry = ClassCapacity {
            class: ExecutorClass(STORAGE_CAPACITY_CLASS.to_owned()),
            free: mib(limit.saturating_sub(committed)),
            total: mib(limit),
        };
        self.published.send_if_modified(|published| {
            if published.as_slice() == std::slice::from_ref(&entry) {
                false
            } else {
                *published = vec![entry];
                true
            }
        });
    }

    /// The capacity entry to publish, updated as the store fills and empties.
    pub(super) fn capacity_updates(&self) -> watch::Receiver<Vec<ClassCapacity>> {
        self.published.subscribe()
    }
}

/// Whole MiB, saturating at `u32::MAX` (4 PiB).
fn mib(bytes: u64) -> u32 {
    u32::try_from(bytes / MIB).unwrap_or(u32::MAX)
}
