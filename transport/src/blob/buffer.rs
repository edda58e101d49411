//! [`BlobBuffer`]: the in-memory destination of a whole-blob download.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use memmap2::MmapMut;

/// Buffers of at least this many bytes are anonymous mappings whose pages are faulted in ahead
/// of the data, [`POPULATE_STEP`] at a time. Below that the heap is as good.
pub const MAPPED_MIN: usize = 8 << 20;

/// Pages of a mapped buffer are populated this far at a time (`MADV_POPULATE_WRITE`: one system
/// call instead of 256 page faults), just before the download writes them, so they are still in
/// cache when it does. Filling a fresh 1 GiB buffer this way took 0.35–0.41 CPU s here against
/// 0.46–0.49 s for a `Vec` faulted in page by page (steps of 256 KiB to 1 MiB were as good;
/// 2 MiB and more lose the cache, a populate of everything up front is no better than faults).
///
/// Not with transparent huge pages (`MADV_HUGEPAGE`): they cut the faults to 512 per GiB, but
/// on this project's VMs (virtio-balloon free page reporting of 2 MiB blocks) every fresh huge
/// page is also faulted in by the host, and filling 1 GiB of them took 0.5–1.8 CPU s.
const POPULATE_STEP: usize = 1 << 20;

/// Memory for a blob fetched into memory, holding only verified bytes: `[..]` (through
/// [`Deref`]) is the blob's verified prefix, never the room after it.
///
/// Large buffers ([`MAPPED_MIN`] and more) are anonymous memory maps whose pages a download
/// faults in a MiB at a time, ahead of the data, with one system call each; smaller ones, or
/// where mapping fails, live on the heap. A buffer is reusable: [`Self::clear`] keeps its
/// (already faulted-in) memory for the next download. [`Self::into_bytes`] hands the contents
/// on without a copy.
pub struct BlobBuffer {
    memory: Memory,
    /// `memory[..len]` holds verified bytes.
    len: usize,
    /// `memory[..populated]` is faulted in (or heap memory, which is not populated ahead).
    populated: usize,
}

/// The memory behind a [`BlobBuffer`]; every byte of it is initialized (zeroed lazily by the OS
/// where it is fresh).
enum Memory {
    Heap(Vec<u8>),
    Mapped(MmapMut),
}

impl Memory {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Heap(vec) => vec,
            Self::Mapped(map) => map,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Self::Heap(vec) => vec,
            Self::Mapped(map) => map,
        }
    }
}

impl BlobBuffer {
    /// An empty buffer with no memory.
    pub fn new() -> Self {
        Self {
            memory: Memory::Heap(Vec::new()),
            len: 0,
            populated: 0,
        }
    }

    /// An empty buffer with room for `capacity` bytes: mapped from [`MAPPED_MIN`] on, on the
    /// heap below that or when the mapping fails. Nothing is written (fresh memory is zeroed
    /// lazily by the OS as it is first touched).
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_capacity_mapped_by(capacity, map)
    }

    /// [`Self::with_capacity`] with `map` making the mapping (a test makes it fail).
    fn with_capacity_mapped_by(capacity: usize, map: fn(usize) -> Option<MmapMut>) -> Self {
        let mapped = if capacity >= MAPPED_MIN {
            map(capacity)
        } else {
            None
        };
        let memory = mapped.map_or_else(|| Memory::Heap(vec![0; capacity]), Memory::Mapped);
        Self {
            memory,
            len: 0,
            populated: 0,
        }
    }

    /// Verified bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer holds room for without new memory.
    pub fn capacity(&self) -> usize {
        self.memory.as_slice().len()
    }

    /// Whether the memory is a mapping (rather than the heap).
    pub fn is_mapped(&self) -> bool {
        matches!(self.memory, Memory::Mapped(_))
    }

    /// Forgets the contents, keeps the memory for the next download.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The contents as [`Bytes`], without a copy (the memory is released when the last clone
    /// of them is dropped).
    pub fn into_bytes(self) -> Bytes {
        match self.memory {
            Memory::Heap(mut vec) => {
                vec.truncate(self.len);
                Bytes::from(vec)
            }
            Memory::Mapped(_) => Bytes::from_owner(self),
        }
    }

    /// Makes room for `capacity` bytes, keeping the contents: the memory is kept if it is large
    /// enough, otherwise the contents move to a new buffer.
    pub(super) fn reserve_total(&mut self, capacity: usize) {
        if self.capacity() >= capacity {
            return;
        }
        let mut grown = Self::with_capacity(capacity);
        grown.prepare(self.len);
        grown.memory.as_mut_slice()[..self.len].copy_from_slice(self);
        grown.len = self.len;
        *self = grown;
    }

    /// The whole memory, held bytes and room after them, for a receiver to fill; the caller
    /// then says how much of it is verified with [`Self::set_verified_len`].
    pub(super) fn memory_mut(&mut self) -> &mut [u8] {
        self.memory.as_mut_slice()
    }

    /// Declares `memory[..len]` verified (at most the capacity).
    pub(super) fn set_verified_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// `memory[..end]` is about to be written: faults in the pages of a mapping up to there and
    /// [`POPULATE_STEP`] beyond, unless already done. Best effort: where the kernel cannot
    /// (before Linux 5.14), the writes fault the pages in one by one.
    pub(super) fn prepare(&mut self, end: usize) {
        if end <= self.populated {
            return;
        }
        let Memory::Mapped(map) = &self.memory else {
            return;
        };
        let capacity = map.len();
        let target = end.saturating_add(POPULATE_STEP).min(capacity);
        #[cfg(target_os = "linux")]
        if let Err(error) = map.advise_range(
            memmap2::Advice::PopulateWrite,
            self.populated,
            target - self.populated,
        ) {
            tracing::debug!(%error, "populating a blob buffer failed; faulting pages one by one");
            self.populated = capacity;
            return;
        }
        self.populated = target;
    }
}

/// An anonymous mapping of `capacity` bytes; `None` if the mapping fails.
fn map(capacity: usize) -> Option<MmapMut> {
    MmapMut::map_anon(capacity)
        .inspect_err(|error| tracing::debug!(%error, capacity, "mapping a blob buffer failed"))
        .ok()
}

impl Default for BlobBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for BlobBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.memory.as_slice()[..self.len]
    }
}

impl AsRef<[u8]> for BlobBuffer {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for BlobBuffer {
    /// A buffer holding `bytes` (which the caller vouches for: a verified prefix of the blob).
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            len: bytes.len(),
            memory: Memory::Heap(bytes),
            populated: 0,
        }
    }
}

impl fmt::Debug for BlobBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobBuffer")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_live_on_the_heap_and_large_ones_are_mapped() {
        let empty = BlobBuffer::new();
        assert_eq!((empty.len(), empty.capacity()), (0, 0));
        assert!(empty.is_empty() && !empty.is_mapped());

        let small = BlobBuffer::with_capacity(MAPPED_MIN - 1);
        assert!(!small.is_mapped());
        assert_eq!(small.capacity(), MAPPED_MIN - 1);
        assert!(small.is_empty(), "room is not contents");

        let large = BlobBuffer::with_capacity(MAPPED_MIN + 1);
        assert!(large.is_mapped(), "{large:?}");
        assert_eq!(large.capacity(), MAPPED_MIN + 1);
        assert!(large.is_empty());
    }

    #[test]
    fn only_verified_bytes_are_visible_and_survive_into_bytes() {
        for capacity in [0, 1, 4096, MAPPED_MIN, 3 * MAPPED_MIN / 2] {
            let mut buffer = BlobBuffer::with_capacity(capacity);
            let memory = buffer.memory_mut();
            for (index, byte) in memory.iter_mut().enumerate() {
                *byte = index as u8;
            }
            let verified = capacity / 2;
            buffer.set_verified_len(verified);
            assert_eq!(buffer.len(), verified);
            let expected: Vec<u8> = (0..verified).map(|index| index as u8).collect();
            assert!(buffer[..] == expected[..], "capacity {capacity}");
            let bytes = buffer.into_bytes();
            assert!(bytes == expected, "capacity {capacity}");
        }
        // A length past the memory is clamped to it.
        let mut buffer = BlobBuffer::with_capacity(10);
        buffer.set_verified_len(11);
        assert_eq!(buffer.len(), 10);
    }

    #[test]
    fn pages_are_populated_a_step_ahead_of_the_writes_and_stay_populated() {
        let capacity = MAPPED_MIN + POPULATE_STEP / 2;
        let mut buffer = BlobBuffer::with_capacity(capacity);
        assert_eq!(buffer.populated, 0);
        buffer.prepare(1);
        assert_eq!(buffer.populated, 1 + POPULATE_STEP);
        // Within what is populated: nothing to do.
        buffer.prepare(POPULATE_STEP);
        assert_eq!(buffer.populated, 1 + POPULATE_STEP);
        buffer.prepare(MAPPED_MIN);
        assert_eq!(buffer.populated, capacity, "clamped to the mapping");
        buffer.memory_mut().fill(7);
        buffer.set_verified_len(capacity);
        assert!(buffer.iter().all(|&byte| byte == 7));
        buffer.clear();
        assert_eq!(
            buffer.populated, capacity,
            "a cleared buffer keeps its pages"
        );

        // Heap memory is left to fault in as it is written.
        let mut heap = BlobBuffer::with_capacity(MAPPED_MIN - 1);
        heap.prepare(100);
        assert_eq!(heap.populated, 0);
    }

    #[test]
    fn growing_keeps_the_contents_and_clearing_keeps_the_memory() {
        let prefix: Vec<u8> = (0..5000u32).map(|index| (index % 251) as u8).collect();
        let mut buffer = BlobBuffer::from(prefix.clone());
        assert_eq!(buffer.len(), prefix.len());
        buffer.reserve_total(MAPPED_MIN);
        assert!(buffer.is_mapped());
        assert!(buffer[..] == prefix[..]);
        assert!(buffer.capacity() >= MAPPED_MIN);
        // Enough room already: nothing moves.
        let before = buffer.memory_mut().as_ptr();
        buffer.reserve_total(100);
        assert_eq!(buffer.memory_mut().as_ptr(), before);
        buffer.clear();
        assert!(buffer.is_empty());
        assert!(buffer.capacity() >= MAPPED_MIN);
        assert_eq!(buffer.memory_mut().as_ptr(), before);
    }

    #[test]
    fn a_mapping_that_cannot_be_made_falls_back_to_the_heap() {
        assert!(map(usize::MAX).is_none(), "too large to map");
        let mut buffer = BlobBuffer::with_capacity_mapped_by(MAPPED_MIN, |_| None);
        assert!(!buffer.is_mapped());
        assert_eq!(buffer.capacity(), MAPPED_MIN);
        buffer.memory_mut()[..3].copy_from_slice(b"abc");
        buffer.set_verified_len(3);
        assert_eq!(buffer.into_bytes(), &b"abc"[..]);
    }
}
