//! One upload being written to the store ([`PutSession`]), how it starts
//! ([`BlobStore::begin_put`]: the space check before a byte is written) and the small file
//! helpers it shares with the store.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use blake3::hazmat::HasherExt as _;
use horde_protocol::BlobHash;
use horde_protocol::blob::{BlobStatus, CHUNK_GROUP_LEN, Outboard, outboard_len};
use tracing::info;

use super::{BlobStore, BlobStoreError, WRITE_BUFFER, is_out_of_room};

impl BlobStore {
    /// Starts an upload of `size` bytes. With a declared `hash` the bytes go to `partial/<hash>`
    /// and, when `resume` is set, continue after what an earlier attempt left there; without one
    /// they go to a fresh temporary file. The bytes still to come (and the outboard) are
    /// reserved first: an upload past `[storage] max_bytes` or the disk's free space is refused
    /// [`BlobStoreError::NoRoom`] before a byte is written, and a partial of `hash` it would
    /// have continued is reclaimed. Blocking.
    pub fn begin_put(
        self: &Arc<Self>,
        size: u64,
        hash: Option<BlobHash>,
        resume: bool,
    ) -> Result<PutSession, BlobStoreError> {
        if size > self.limits.max_blob_size {
            return Err(BlobStoreError::TooLarge {
                size,
                max: self.limits.max_blob_size,
            });
        }
        let (path, offset, counted) = match hash {
            Some(hash) => {
                let lock = self
                    .uploads
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(hash);
                if !lock {
                    return Err(BlobStoreError::Busy(hash));
                }
                match self.open_partial(hash, size, resume) {
                    Ok(found) => found,
                    Err(error) => {
                        self.release(&hash);
                        return Err(error);
                    }
                }
            }
            None => {
                let need = size.saturating_add(outboard_len(size));
                self.space.reserve(need, 0)?;
                (self.tmp.join(temp_name()), 0, 0)
            }
        };
        let reserved = size
            .saturating_sub(offset)
            .saturating_add(outboard_len(size));
        let mut session = PutSession {
            store: Arc::clone(self),
            declared: hash,
            size,
            path,
            file: None,
            group_cvs: Vec::new(),
            position: 0,
            buffer: Vec::with_capacity(WRITE_BUFFER),
            buffer_start: 0,
            reserved,
            counted,
            end: SessionEnd::Kept,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(offset == 0)
            .read(true)
            .write(true)
            .open(&session.path);
        let mut file = file.map_err(|error| session.note(error))?;
        if offset > 0 {
            // Rebuild the group CVs of the kept prefix.
            file.set_len(offset)?;
            file.seek(SeekFrom::Start(0))?;
            let mut group = vec![0u8; CHUNK_GROUP_LEN as usize];
            while session.position < offset {
                file.read_exact(&mut group)?;
                session
                    .group_cvs
                    .push(horde_protocol::blob::subtree_cv(session.position, &group));
                session.position += CHUNK_GROUP_LEN;
            }
        }
        file.seek(SeekFrom::Start(offset))?;
        session.buffer_start = offset;
        session.file = Some(file);
        Ok(session)
    }

    /// Finds the partial file of `hash` and reserves room for the rest of the upload: returns
    /// its path, the group-aligned offset at which to continue and the bytes of it counted as
    /// held. Refused for room, the partial is reclaimed. The caller holds the upload lock.
    fn open_partial(
        &self,
        hash: BlobHash,
        size: u64,
        resume: bool,
    ) -> Result<(PathBuf, u64, u64), BlobStoreError> {
        let path = self.partial_path(&hash);
        let on_disk = fs::metadata(&path).map_or(0, |meta| meta.len());
        let mut offset = 0;
        if resume
            && let Ok(BlobStatus::Partial { received, size: s }) = self.stat(&hash)
            && s == size
            && size > CHUNK_GROUP_LEN
        {
            // Whole groups only, and at least the last group is sent again so the final group
            // (possibly short) is always hashed from fresh bytes.
            offset = (received / CHUNK_GROUP_LEN * CHUNK_GROUP_LEN)
                .min((size - 1) / CHUNK_GROUP_LEN * CHUNK_GROUP_LEN);
        }
        let need = (size - offset).saturating_add(outboard_len(size));
        if let Err(no_room) = self.space.reserve(need, on_disk.saturating_sub(offset)) {
            if on_disk > 0 {
                let _ = fs::remove_file(&path);
                info!(hash = %hash.fmt_short(), bytes = on_disk, "partial upload reclaimed: no room for the rest");
            }
            let _ = fs::remove_file(self.partial_size_path(&hash));
            self.space.forget(offset);
            return Err(no_room.into());
        }
        if let Err(error) =
            write_synced(&self.partial_size_path(&hash), size.to_string().as_bytes())
        {
            self.space.settle(need, offset, on_disk);
            return Err(error.into());
        }
        Ok((path, offset, offset))
    }

    /// Removes the partial upload of `hash` (its bytes and its `.size`) and returns the bytes
    /// freed.
    pub(super) fn remove_partial(&self, hash: &BlobHash) -> u64 {
        let path = self.partial_path(hash);
        let bytes = fs::metadata(&path).map_or(0, |meta| meta.len());
        let _ = fs::remove_file(&path);
        let _ = fs::remove_file(self.partial_size_path(hash));
        bytes
    }
}

/// How a [`PutSession`] left its file, for the space accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// Not finished: a declared-hash partial is kept for a resume, a temporary file removed.
    Kept,
    /// Refused for room: the file is reclaimed, partial or not.
    Reclaimed,
    /// The bytes failed their hash: the file was removed.
    Removed,
    /// Stored under its hash; `true` if it replaced an identical blob already there.
    Stored(bool),
}

fn temp_name() -> String {
    let mut bytes = [0u8; 8];
    // A clash only makes two uploads share a temp name, which `create_new`-free opening would
    // corrupt; the OS random source failing is not recoverable here anyway.
    getrandom::fill(&mut bytes).unwrap_or_default();
    format!("upload-{}", hex::encode(bytes))
}

/// Writes a small file and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One upload being written: hashes every chunk group as it completes and writes in large
/// batches. Blocking; dropping it unfinished keeps a declared-hash partial for a later resume
/// and deletes an anonymous temporary file, but a write refused for want of room reclaims
/// either. Whatever it leaves on disk replaces its reservation in the store's accounting.
#[derive(Debug)]
pub struct PutSession {
    store: Arc<BlobStore>,
    declared: Option<BlobHash>,
    size: u64,
    path: PathBuf,
    file: Option<File>,
    group_cvs: Vec<[u8; 32]>,
    /// Bytes hashed into `group_cvs` or sitting in `buffer`.
    position: u64,
    buffer: Vec<u8>,
    /// Blob offset of `buffer[0]`.
    buffer_start: u64,
    /// Bytes reserved for it in the store's accounting.
    reserved: u64,
    /// Bytes of its file counted as held when it started (a resumed partial's prefix).
    counted: u64,
    end: SessionEnd,
}

impl PutSession {
    /// Where the upload continues (the bytes already held).
    pub fn offset(&self) -> u64 {
        self.buffer_start + self.buffer.len() as u64
    }

    /// Marks the session for reclaiming when `error` says the disk is out of room.
    fn note(&mut self, error: io::Error) -> io::Error {
        if is_out_of_room(&error) {
            self.end = SessionEnd::Reclaimed;
        }
        error
    }

    /// Appends bytes.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), BlobStoreError> {
        let received = self.offset() + data.len() as u64;
        if received > self.size {
            return Err(BlobStoreError::WrongLength {
                received,
                size: self.size,
            });
        }
        while !data.is_empty() {
            let take = (WRITE_BUFFER - self.buffer.len()).min(data.len());
            self.buffer.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.hash_complete_groups();
            if self.buffer.len() == WRITE_BUFFER {
                self.flush().map_err(|error| self.note(error))?;
            }
        }
        Ok(())
    }

    /// Hashes the whole groups in the buffer not hashed yet.
    fn hash_complete_groups(&mut self) {
        let group = CHUNK_GROUP_LEN as usize;
        loop {
            let start = (self.position - self.buffer_start) as usize;
            if self.buffer.len() - start < group {
                break;
            }
            let cv =
                horde_protocol::blob::subtree_cv(self.position, &self.buffer[start..start + group]);
            self.group_cvs.push(cv);
            self.position += CHUNK_GROUP_LEN;
        }
    }

    /// Writes the buffer out, keeping the unhashed tail of a group in it.
    fn flush(&mut self) -> io::Result<()> {
        let hashed = (self.position - self.buffer_start) as usize;
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(&self.buffer[..hashed])?;
        self.buffer.drain(..hashed);
        self.buffer_start = self.position;
        Ok(())
    }

    /// Checks the length and hash, fsyncs, writes the outboard and renames both into place.
    pub fn finish(mut self) -> Result<BlobHash, BlobStoreError> {
        let received = self.offset();
        if received != self.size {
            return Err(BlobStoreError::WrongLength {
                received,
                size: self.size,
            });
        }
        // The last, short group.
        let tail_start = (self.position - self.buffer_start) as usize;
        let single_group = self.size <= CHUNK_GROUP_LEN;
        let hash = if single_group {
            BlobHash::of(&self.buffer)
        } else {
            if tail_start < self.buffer.len() {
                let mut hasher = blake3::Hasher::new();
                hasher.set_input_offset(self.position);
                hasher.update(&self.buffer[tail_start..]);
                self.group_cvs.push(hasher.finalize_non_root());
                self.position = self.size;
            }
            let outboard = Outboard::from_group_cvs(self.size, std::mem::take(&mut self.group_cvs));
            let hash = outboard.root(None).ok_or_else(|| {
                BlobStoreError::Io(io::Error::other("multi-group outboard without a root"))
            })?;
            self.group_cvs = outboard.group_cvs;
            hash
        };
        if let Some(declared) = self.declared
            && declared != hash
        {
            // The partial is worthless: the next attempt starts over.
            self.end = SessionEnd::Removed;
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(self.store.partial_size_path(&declared));
            return Err(BlobStoreError::HashMismatch {
                declared,
                actual: hash,
            });
        }
        if single_group {
            self.group_cvs = if self.size == 0 {
                Vec::new()
            } else {
                vec![horde_protocol::blob::subtree_cv(0, &self.buffer)]
            };
        }
        self.position = self.size;
        self.store_as(hash).map_err(|error| self.note(error))?;
        Ok(hash)
    }

    /// Writes the rest, fsyncs, writes the outboard and renames both into place under `hash`.
    fn store_as(&mut self, hash: BlobHash) -> io::Result<()> {
        self.flush()?;
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("upload file already closed"))?;
        file.sync_all()?;
        drop(file);
        let outboard = Outboard::from_group_cvs(self.size, std::mem::take(&mut self.group_cvs));
        let outboard_tmp = self.store.tmp.join(temp_name());
        if let Err(error) = write_synced(&outboard_tmp, &outboard.to_bytes()) {
            let _ = fs::remove_file(&outboard_tmp);
            return Err(error);
        }
        let blob_path = self.store.blob_path(&hash);
        let replaced = blob_path.exists();
        fs::rename(&outboard_tmp, self.store.outboard_path(&hash))?;
        fs::rename(&self.path, &blob_path)?;
        self.end = SessionEnd::Stored(replaced);
        if let Some(declared) = self.declared {
            let _ = fs::remove_file(self.store.partial_size_path(&declared));
        }
        sync_dir(&self.store.blobs)
    }
}

impl Drop for PutSession {
    fn drop(&mut self) {
        let kept = match (self.end, self.declared) {
            (SessionEnd::Stored(true) | SessionEnd::Removed, _) => 0,
            (SessionEnd::Stored(false), _) => self.size + outboard_len(self.size),
            (SessionEnd::Kept, Some(_)) => {
                // Keep what arrived, in whole groups, for a resume.
                let _ = self.flush();
                if let Some(file) = self.file.take() {
                    let _ = file.sync_data();
                }
                fs::metadata(&self.path).map_or(0, |meta| meta.len())
            }
            (SessionEnd::Reclaimed, Some(declared)) => {
                self.file = None;
                let bytes = self.store.remove_partial(&declared);
                info!(hash = %declared.fmt_short(), bytes, "partial upload reclaimed: the disk is full");
                0
            }
            (SessionEnd::Kept | SessionEnd::Reclaimed, None) => {
                self.file = None;
                let _ = fs::remove_file(&self.path);
                0
            }
        };
        self.store.space.settle(self.reserved, self.counted, kept);
        if let Some(declared) = self.declared {
            self.store.release(&declared);
        }
    }
}
