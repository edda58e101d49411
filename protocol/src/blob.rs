//! The `horde/blob/1` protocol: request and response messages, and the verified-streaming tree.
//!
//! A blob is addressed by its plain BLAKE3 hash. To let a receiver check every piece *before* it
//! keeps it, the blob is cut into **chunk groups** of [`CHUNK_GROUP_LEN`] bytes (16 BLAKE3 chunks)
//! and groups are gathered into **segments** of [`SEGMENT_GROUPS`] groups (16 MiB). Both are
//! aligned power-of-two subtrees of the BLAKE3 tree, so their chaining values (CVs) merge into the
//! root hash exactly as BLAKE3 itself does:
//!
//! ```text
//! root hash ── segment CVs (in the response header, checked against the root)
//!                 └─ group CVs of one segment (sent before its data, checked against the segment CV)
//!                       └─ group bytes (checked against their group CV before being handed out)
//! ```
//!
//! A blob of a single segment skips the segment level (its group CVs merge straight into the
//! root), and a blob of a single group is checked with `blake3::hash` directly.
//!
//! The **outboard** a store keeps beside each blob is the group CVs followed by the segment CVs,
//! 32 bytes each (about 0.2% of the blob). [`Outboard`] computes it; [`plan`] lists the exact
//! byte pieces a `Get` response carries after its header, so sender and receiver walk the same
//! sequence.
//!
//! Wire flow on one bidirectional stream (frames are [`crate::codec`] frames):
//! - `Get`: client sends [`BlobRequest::Get`]; server answers [`BlobResponse::Header`] (or
//!   `NotFound` / `Error`), then the raw pieces of [`plan`]: for each segment touched, its group
//!   CVs, then the requested groups' bytes.
//! - `Put`: client sends [`BlobRequest::Put`]; server answers [`BlobResponse::PutReady`] with the
//!   offset to start from (non-zero when resuming a partial upload); client sends the raw bytes
//!   from there to the end and finishes its side; server answers [`BlobResponse::Stored`] after
//!   it verified the hash it computed and fsynced the blob.
//! - `Stat`: client sends [`BlobRequest::Stat`]; server answers [`BlobResponse::Status`].

use std::ops::Range;

use blake3::hazmat::{ChainingValue, HasherExt as _, Mode, merge_subtrees_non_root};
use serde::{Deserialize, Serialize};

use crate::job::BlobHash;

#[cfg(test)]
use proptest_derive::Arbitrary;

/// One chunk group: 16 BLAKE3 chunks of 1 KiB. A corrupt sender is caught within this many
/// bytes, and a resume re-fetches at most this much beyond what is missing.
pub const CHUNK_GROUP_LEN: u64 = 16 * 1024;

/// Groups per segment: 1024 groups = 16 MiB, so a segment's group CVs are 32 KiB on the wire and
/// the header of a 1 GiB blob carries only 64 segment CVs (2 KiB).
pub const SEGMENT_GROUPS: u64 = 1024;

/// Bytes per segment.
pub const SEGMENT_LEN: u64 = CHUNK_GROUP_LEN * SEGMENT_GROUPS;

/// Largest data piece of a `Get` response walked at once: 1 MiB (64 groups), large enough to
/// amortize per-piece work, small enough to bound the receiver's buffer.
pub const MAX_DATA_PIECE: u64 = 64 * CHUNK_GROUP_LEN;

/// Cap on a request frame: requests are a hash, a size and a few ranges; 4 KiB is plenty, and a
/// peer announcing more is refused before anything is allocated.
pub const MAX_REQUEST_LEN: u32 = 4 * 1024;

/// Cap on a response frame. The `Get` header carries the segment CVs: 1 MiB holds 32 768 of them,
/// a 512 GiB blob.
pub const MAX_RESPONSE_LEN: u32 = crate::codec::MAX_FRAME_LEN;

/// Largest blob the protocol can describe: what one response header's segment CVs can cover,
/// with room for the frame's other fields.
pub const MAX_PROTOCOL_BLOB_SIZE: u64 = (MAX_RESPONSE_LEN as u64 / 32 - 64) * SEGMENT_LEN;

/// Default cap on one blob: 64 GiB, room for model weights and datasets while bounding disk use
/// per upload (and well under what a `Get` header can describe).
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 64 << 30;

/// Most ranges one `Get` may ask for (keeps the request under [`MAX_REQUEST_LEN`]).
pub const MAX_RANGES: usize = 64;

/// Length of a chaining value.
pub const CV_LEN: usize = 32;

/// A client's request, the first frame on a blob stream.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum BlobRequest {
    /// Upload a blob of `size` bytes.
    Put {
        /// Exact size of the blob.
        size: u64,
        /// The hash the client expects; required to resume, and checked by the store.
        hash: Option<BlobHash>,
        /// Continue a partial upload of `hash` if the store holds one.
        resume: bool,
    },
    /// Download byte ranges of a blob (an empty list means the whole blob).
    Get {
        /// The blob.
        hash: BlobHash,
        /// Byte ranges; the server widens them to chunk groups and clamps them to the size.
        ranges: Vec<ByteRange>,
    },
    /// Ask whether the store holds a blob, or part of an upload of it.
    Stat {
        /// The blob.
        hash: BlobHash,
    },
}

/// A half-open byte range `start..end`; `end = u64::MAX` means "to the end of the blob".
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Everything from `start` to the end of the blob.
    pub fn from_offset(start: u64) -> Self {
        Self {
            start,
            end: u64::MAX,
        }
    }
}

/// What a store knows about a hash.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum BlobStatus {
    /// Nothing.
    Absent,
    /// The complete, verified blob.
    Complete {
        /// Its size.
        size: u64,
    },
    /// Part of an upload that declared this hash.
    Partial {
        /// Bytes received so far (what a resumed put continues from).
        received: u64,
        /// The declared size.
        size: u64,
    },
}

/// Why a store refused a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum BlobErrorKind {
    /// The request was malformed (bad frame, bad ranges, wrong byte count).
    BadRequest,
    /// This hotkey may not put blobs here.
    NotAllowed,
    /// The blob is larger than the store accepts.
    TooLarge,
    /// The uploaded bytes do not hash to the declared hash.
    HashMismatch,
    /// Another upload of the same hash is in progress.
    Busy,
    /// The store failed locally (an I/O error other than running out of room).
    Internal,
    /// The store has no room for the upload (disk full, quota or file size limit reached).
    StorageFull,
}

/// A server's answer frame.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum BlobResponse {
    /// The blob exists; the pieces of [`plan`] follow this frame as raw bytes.
    Header {
        /// Its size.
        size: u64,
        /// Its segment CVs when it has more than one segment, else empty.
        segment_cvs: Vec<[u8; 32]>,
    },
    /// The store does not hold this blob.
    NotFound,
    /// Answer to `Stat`.
    Status(BlobStatus),
    /// Send the blob's bytes starting at `offset`.
    PutReady {
        /// Where the upload continues (0 unless a partial upload is resumed).
        offset: u64,
    },
    /// The blob is stored, verified and fsynced under `hash`.
    Stored {
        /// The hash the store computed.
        hash: BlobHash,
        /// Its size.
        size: u64,
    },
    /// The request was refused.
    Error {
        /// Why.
        kind: BlobErrorKind,
        /// A human-readable detail.
        message: String,
    },
}

/// Number of chunk groups in a blob of `size` bytes.
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_GROUP_LEN)
}

/// Number of segments in a blob of `size` bytes.
pub fn segment_count(size: u64) -> u64 {
    size.div_ceil(SEGMENT_LEN)
}

/// Length of the outboard of a blob of `size` bytes: group CVs then segment CVs.
pub fn outboard_len(size: u64) -> u64 {
    (group_count(size) + segment_count(size)) * CV_LEN as u64
}

/// The chaining value of the subtree holding `data`, which starts at byte `offset` of the blob
/// (a multiple of [`CHUNK_GROUP_LEN`] for groups, of [`SEGMENT_LEN`] for segments).
pub fn subtree_cv(offset: u64, data: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(data);
    hasher.finalize_non_root()
}

/// Merges sibling CVs of equal-size aligned subtrees (the last may be shorter) layer by layer,
/// the way BLAKE3 builds its tree, until two remain. `cvs` must hold at least two.
fn merge_to_two(cvs: &[ChainingValue]) -> (ChainingValue, ChainingValue) {
    debug_assert!(cvs.len() >= 2);
    let mut layer = cvs.to_vec();
    while layer.len() > 2 {
        let mut next = Vec::with_capacity(layer.len().div_ceil(2));
        for pair in layer.chunks(2) {
            match pair {
                [left, right] => next.push(merge_subtrees_non_root(left, right, Mode::Hash)),
                [odd] => next.push(*odd),
                _ => {}
            }
        }
        layer = next;
    }
    (layer[0], layer[1])
}

/// The root hash of a tree whose leaves (equal aligned subtrees) have these CVs; at least two.
pub fn root_of(cvs: &[ChainingValue]) -> Option<BlobHash> {
    if cvs.len() < 2 {
        return None;
    }
    let (left, right) = merge_to_two(cvs);
    Some(BlobHash(
        *blake3::hazmat::merge_subtrees_root(&left, &right, Mode::Hash).as_bytes(),
    ))
}

/// The non-root CV of a subtree whose leaves have these CVs; at least one.
pub fn parent_cv_of(cvs: &[ChainingValue]) -> Option<ChainingValue> {
    match cvs {
        [] => None,
        [one] => Some(*one),
        _ => {
            let (left, right) = merge_to_two(cvs);
            Some(merge_subtrees_non_root(&left, &right, Mode::Hash))
        }
    }
}

/// The verification data of a blob: one CV per chunk group and one per segment.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Outboard {
    /// The blob's size.
    pub size: u64,
    /// One CV per chunk group.
    pub group_cvs: Vec<ChainingValue>,
    /// One CV per segment (computed from the group CVs).
    pub segment_cvs: Vec<ChainingValue>,
}

impl Outboard {
    /// Computes the outboard of `data`.
    pub fn of(data: &[u8]) -> Self {
        let group_cvs = data
            .chunks(CHUNK_GROUP_LEN as usize)
            .enumerate()
            .map(|(index, group)| subtree_cv(index as u64 * CHUNK_GROUP_LEN, group))
            .collect();
        Self::from_group_cvs(data.len() as u64, group_cvs)
    }

    /// Builds the outboard from the group CVs of a blob of `size` bytes.
    pub fn from_group_cvs(size: u64, group_cvs: Vec<ChainingValue>) -> Self {
        let segment_cvs = group_cvs
            .chunks(SEGMENT_GROUPS as usize)
            .filter_map(parent_cv_of)
            .collect();
        Self {
            size,
            group_cvs,
            segment_cvs,
        }
    }

    /// The root hash, given the blob's bytes when it is a single group (whose root is not a
    /// merge of CVs). Returns `None` for a single-group blob without its bytes.
    pub fn root(&self, single_group: Option<&[u8]>) -> Option<BlobHash> {
        match self.group_cvs.len() {
            0 => Some(BlobHash::of(&[])),
            1 => single_group.map(BlobHash::of),
            _ if self.segment_cvs.len() > 1 => root_of(&self.segment_cvs),
            _ => root_of(&self.group_cvs),
        }
    }

    /// The serialized outboard: group CVs then segment CVs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(outboard_len(self.size) as usize);
        for cv in self.group_cvs.iter().chain(&self.segment_cvs) {
            bytes.extend_from_slice(cv);
        }
        bytes
    }

    /// The segment CVs a `Get` header carries: all of them when there is more than one segment.
    pub fn header_segment_cvs(&self) -> Vec<[u8; 32]> {
        if self.segment_cvs.len() > 1 {
            self.segment_cvs.clone()
        } else {
            Vec::new()
        }
    }
}

/// Splits serialized CVs into 32-byte values; `None` if the length is not a multiple of 32.
pub fn cvs_from_bytes(bytes: &[u8]) -> Option<Vec<ChainingValue>> {
    if !bytes.len().is_multiple_of(CV_LEN) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(CV_LEN)
            .map(|cv| {
                let mut value = [0u8; CV_LEN];
                value.copy_from_slice(cv);
                value
            })
            .collect(),
    )
}

/// Why a request's ranges were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum RangeError {
    /// More than [`MAX_RANGES`] ranges.
    #[error("{0} ranges requested, at most {MAX_RANGES} allowed")]
    TooMany(usize),
    /// A range with `start > end`.
    #[error("range {start}..{end} is reversed")]
    Reversed {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
}

/// Widens ranges to chunk groups, clamps them to `size`, drops empty ones, sorts and merges
/// them. An empty request list means the whole blob. Both ends call this so they agree.
pub fn normalize_ranges(ranges: &[ByteRange], size: u64) -> Result<Vec<Range<u64>>, RangeError> {
    if ranges.len() > MAX_RANGES {
        return Err(RangeError::TooMany(ranges.len()));
    }
    if ranges.is_empty() {
        let whole = std::iter::once(0..size).filter(|range| !range.is_empty());
        return Ok(whole.collect());
    }
    let mut widened = Vec::with_capacity(ranges.len());
    for range in ranges {
        if range.start > range.end {
            return Err(RangeError::Reversed {
                start: range.start,
                end: range.end,
            });
        }
        let start = range.start / CHUNK_GROUP_LEN * CHUNK_GROUP_LEN;
        let end = range
            .end
            .min(size)
            .div_ceil(CHUNK_GROUP_LEN)
            .saturating_mul(CHUNK_GROUP_LEN)
            .min(size);
        if start < end {
            widened.push(start..end);
        }
    }
    widened.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(widened.len());
    for range in widened {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    Ok(merged)
}

/// One piece of a `Get` response body, after the header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Piece {
    /// The group CVs of segment `segment` (groups `first_group..first_group + count`).
    GroupCvs {
        /// The segment index.
        segment: u64,
        /// Its first group.
        first_group: u64,
        /// Its number of groups.
        count: u64,
    },
    /// Blob bytes `offset..offset + len`, whole chunk groups (the blob's last may be short).
    Data {
        /// First byte.
        offset: u64,
        /// Length, at most [`MAX_DATA_PIECE`].
        len: u64,
    },
}

impl Piece {
    /// Bytes this piece occupies on the wire.
    pub fn wire_len(&self) -> u64 {
        match self {
            Self::GroupCvs { count, .. } => count * CV_LEN as u64,
            Self::Data { len, .. } => *len,
        }
    }
}

/// The pieces a `Get` response body carries for normalized `ranges` of a blob of `size` bytes,
/// in order. A single-group blob has no CV piece (it is checked against the root directly).
pub fn plan(size: u64, ranges: &[Range<u64>]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let groups = group_count(size);
    for segment in 0..segment_count(size) {
        let segment_range = segment * SEGMENT_LEN..((segment + 1) * SEGMENT_LEN).min(size);
        let mut announced = false;
        for range in ranges {
            let start = range.start.max(segment_range.start);
            let end = range.end.min(segment_range.end);
            if start >= end {
                continue;
            }
            if !announced && groups > 1 {
                let first_group = segment * SEGMENT_GROUPS;
                pieces.push(Piece::GroupCvs {
                    segment,
                    first_group,
                    count: (groups - first_group).min(SEGMENT_GROUPS),
                });
            }
            announced = true;
            let mut offset = start;
            while offset < end {
                let len = (end - offset).min(MAX_DATA_PIECE);
                pieces.push(Piece::Data { offset, len });
                offset += len;
            }
        }
    }
    pieces
}

/// Total wire bytes of the pieces of a plan.
pub fn plan_wire_len(pieces: &[Piece]) -> u64 {
    pieces.iter().map(Piece::wire_len).sum()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::{from_bytes_exact, to_bytes};

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    #[test]
    fn outboard_root_equals_plain_blake3() {
        for len in [
            0,
            1,
            1024,
            CHUNK_GROUP_LEN as usize,
            CHUNK_GROUP_LEN as usize + 1,
            3 * CHUNK_GROUP_LEN as usize + 5,
            SEGMENT_LEN as usize,
            SEGMENT_LEN as usize + CHUNK_GROUP_LEN as usize,
            2 * SEGMENT_LEN as usize + 17,
        ] {
            let bytes = data(len);
            let outboard = Outboard::of(&bytes);
            let single = (outboard.group_cvs.len() == 1).then_some(&bytes[..]);
            assert_eq!(
                outboard.root(single),
                Some(BlobHash::of(&bytes)),
                "len {len}"
            );
            assert_eq!(outboard.to_bytes().len() as u64, outboard_len(len as u64));
        }
    }

    #[test]
    fn ranges_are_widened_clamped_and_merged() {
        let size = 10 * CHUNK_GROUP_LEN + 10;
        let g = CHUNK_GROUP_LEN;
        assert_eq!(normalize_ranges(&[], size).unwrap(), vec![0..size]);
        assert_eq!(normalize_ranges(&[], 0).unwrap(), vec![]);
        assert_eq!(
            normalize_ranges(&[ByteRange::from_offset(g + 1)], size).unwrap(),
            vec![g..size]
        );
        assert_eq!(
            normalize_ranges(
                &[
                    ByteRange {
                        start: 5 * g,
                        end: 6 * g
                    },
                    ByteRange { start: 1, end: 2 },
                    ByteRange {
                        start: 5 * g + 3,
                        end: 7 * g - 1
                    },
                ],
                size
            )
            .unwrap(),
            vec![0..g, 5 * g..7 * g]
        );
        assert_eq!(
            normalize_ranges(&[ByteRange::from_offset(size + g)], size).unwrap(),
            vec![]
        );
        assert!(matches!(
            normalize_ranges(&[ByteRange { start: 2, end: 1 }], size),
            Err(RangeError::Reversed { .. })
        ));
        let many = vec![ByteRange::from_offset(0); MAX_RANGES + 1];
        assert!(matches!(
            normalize_ranges(&many, size),
            Err(RangeError::TooMany(_))
        ));
    }

    #[test]
    fn plan_covers_ranges_with_cvs_before_data() {
        let size = 2 * SEGMENT_LEN + 100;
        let ranges = normalize_ranges(&[ByteRange::from_offset(SEGMENT_LEN - 1)], size).unwrap();
        let pieces = plan(size, &ranges);
        let data_len: u64 = pieces
            .iter()
            .filter_map(|piece| match piece {
                Piece::Data { len, .. } => Some(*len),
                _ => None,
            })
            .sum();
        assert_eq!(data_len, size - (SEGMENT_LEN - CHUNK_GROUP_LEN));
        assert!(matches!(
            pieces[0],
            Piece::GroupCvs {
                segment: 0,
                first_group: 0,
                count: SEGMENT_GROUPS
            }
        ));
        assert!(matches!(pieces.last(), Some(Piece::Data { len: 100, .. })));
        // A single-group blob has no CV piece.
        let whole: Vec<Range<u64>> = std::iter::once(0..10).collect();
        assert_eq!(plan(10, &whole), vec![Piece::Data { offset: 0, len: 10 }]);
    }

    #[test]
    fn snapshot_get_request() {
        let request = BlobRequest::Get {
            hash: BlobHash([0xaa; 32]),
            ranges: vec![ByteRange::from_offset(16384)],
        };
        assert_eq!(
            hex::encode(to_bytes(&request)),
            "01aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa01808001ffffffffffffffffff01"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn requests_round_trip(request in any::<BlobRequest>()) {
            prop_assert_eq!(from_bytes_exact::<BlobRequest>(&to_bytes(&request)).unwrap(), request);
        }

        #[test]
        fn responses_round_trip(response in any::<BlobResponse>()) {
            prop_assert_eq!(from_bytes_exact::<BlobResponse>(&to_bytes(&response)).unwrap(), response);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = from_bytes_exact::<BlobRequest>(&bytes);
            let _ = from_bytes_exact::<BlobResponse>(&bytes);
        }

        #[test]
        fn normalized_ranges_are_aligned_and_sorted(
            size in 0u64..(4 * CHUNK_GROUP_LEN * 1000),
            ranges in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8),
        ) {
            let ranges: Vec<ByteRange> = ranges
                .into_iter()
                .map(|(a, b)| ByteRange { start: a.min(b) % (size + 10), end: a.max(b) })
                .collect();
            let normalized = normalize_ranges(&ranges, size).unwrap();
            let mut previous_end = None;
            for range in &normalized {
                prop_assert!(range.start < range.end && range.end <= size);
                prop_assert_eq!(range.start % CHUNK_GROUP_LEN, 0);
                prop_assert!(range.end % CHUNK_GROUP_LEN == 0 || range.end == size);
                if let Some(end) = previous_end {
                    prop_assert!(range.start > end);
                }
                previous_end = Some(range.end);
            }
        }
    }
}
