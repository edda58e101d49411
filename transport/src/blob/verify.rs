//! The verifier of a `Get` response: the planned pieces and the CVs checked so far ([`Tree`]),
//! and [`Verifier`], which copies received frames into a [`Sink`]'s window and checks each chunk
//! group there against the root hash before handing it on.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use horde_protocol::BlobHash;
use horde_protocol::blob::{
    CHUNK_GROUP_LEN, Piece, SEGMENT_LEN, cvs_from_bytes, parent_cv_of, root_of, subtree_cv,
};

use super::sink::Sink;
use super::{BlobError, STOP_CANCELLED, STOP_INTEGRITY, within_progress_timeout};
use crate::codes;

/// Chunks taken from quinn per `read_chunks` call (one lock of the connection for all of them).
const READ_BATCH: usize = 64;

/// The verification tree of one response: the planned pieces and the CVs checked so far.
#[derive(Debug)]
pub(super) struct Tree {
    hash: BlobHash,
    size: u64,
    segment_cvs: Vec<[u8; 32]>,
    pieces: std::vec::IntoIter<Piece>,
    /// The piece being received and how much of it arrived.
    current: Option<Piece>,
    piece_received: u64,
    cv_buffer: Vec<u8>,
    group_cvs: Vec<[u8; 32]>,
    first_group: u64,
}

impl Tree {
    /// The tree of a response for `hash` (of `size` bytes, with the header's `segment_cvs`)
    /// carrying `pieces`.
    pub(super) fn new(
        hash: BlobHash,
        size: u64,
        segment_cvs: Vec<[u8; 32]>,
        pieces: Vec<Piece>,
    ) -> Self {
        Self {
            hash,
            size,
            segment_cvs,
            pieces: pieces.into_iter(),
            current: None,
            piece_received: 0,
            cv_buffer: Vec::new(),
            group_cvs: Vec::new(),
            first_group: 0,
        }
    }

    fn group_is_valid(&self, offset: u64, group: &[u8]) -> bool {
        if self.size <= CHUNK_GROUP_LEN {
            return BlobHash::of(group) == self.hash;
        }
        let index = (offset / CHUNK_GROUP_LEN).checked_sub(self.first_group);
        index
            .and_then(|index| self.group_cvs.get(index as usize))
            .is_some_and(|expected| subtree_cv(offset, group) == *expected)
    }

    /// Checks a complete CV block of `segment` against the header (or the root).
    fn accept_cvs(&mut self, segment: u64, first_group: u64) -> Result<(), BlobError> {
        let cvs = cvs_from_bytes(&self.cv_buffer)
            .ok_or_else(|| BlobError::Protocol("bad CV block".to_owned()))?;
        self.cv_buffer.clear();
        let valid = if self.segment_cvs.is_empty() {
            root_of(&cvs) == Some(self.hash)
        } else {
            self.segment_cvs
                .get(segment as usize)
                .is_some_and(|expected| parent_cv_of(&cvs).as_ref() == Some(expected))
        };
        if !valid {
            return Err(BlobError::Integrity {
                offset: segment * SEGMENT_LEN,
            });
        }
        self.group_cvs = cvs;
        self.first_group = first_group;
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.current.is_none() && self.pieces.as_slice().is_empty()
    }

    /// Bytes still expected on the wire.
    fn missing(&self) -> u64 {
        let current = self
            .current
            .map_or(0, |piece| piece.wire_len() - self.piece_received);
        current
            + self
                .pieces
                .as_slice()
                .iter()
                .map(Piece::wire_len)
                .sum::<u64>()
    }
}

fn consumer_gone() -> BlobError {
    BlobError::Io(io::Error::other("the consumer of the blob went away"))
}

/// Copies received frames into its [`Sink`]'s window, verifies each chunk group there, and only
/// then hands the window on.
pub(super) struct Verifier<K> {
    tree: Tree,
    /// Blob offset of the window's first byte.
    window_base: u64,
    /// Bytes copied into the window.
    filled: usize,
    /// `window[..verified]` is verified.
    verified: usize,
    pub(super) sink: K,
    /// How long to wait for the next bytes from the peer.
    progress_timeout: Duration,
}

impl<K: Sink> Verifier<K> {
    /// A verifier for data starting at blob offset `start`.
    pub(super) fn new(tree: Tree, sink: K, start: u64, progress_timeout: Duration) -> Self {
        Self {
            tree,
            window_base: start,
            filled: 0,
            verified: 0,
            sink,
            progress_timeout,
        }
    }

    /// Feeds received bytes. Bytes beyond the plan are ignored.
    fn push(&mut self, mut bytes: &[u8]) -> Result<(), BlobError> {
        while !bytes.is_empty() {
            let piece = match self.tree.current {
                Some(piece) => piece,
                None => match self.tree.pieces.next() {
                    Some(piece) => {
                        self.start_piece(piece)?;
                        piece
                    }
                    None => return Ok(()),
                },
            };
            let wanted = (piece.wire_len() - self.tree.piece_received) as usize;
            let taken = match piece {
                Piece::GroupCvs {
                    segment,
                    first_group,
                    ..
                } => {
                    let take = wanted.min(bytes.len());
                    self.tree.cv_buffer.extend_from_slice(&bytes[..take]);
                    if take == wanted {
                        self.tree.accept_cvs(segment, first_group)?;
                    }
                    take
                }
                Piece::Data { offset, len } => {
                    let room = self.sink.window().len().saturating_sub(self.filled);
                    let take = wanted.min(bytes.len()).min(room);
                    if take == 0 {
                        return Err(BlobError::Protocol(
                            "the destination has no room for the planned data".into(),
                        ));
                    }
                    self.sink.prepare(self.filled + take);
                    let window = self.sink.window();
                    window[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
                    self.filled += take;
                    self.verify_groups(offset + len)?;
                    // A full window of verified groups goes on at once.
                    if take == room && self.verified == self.filled && !self.emit() {
                        return Err(consumer_gone());
                    }
                    take
                }
            };
            bytes = &bytes[taken..];
            self.tree.piece_received += taken as u64;
            if taken == wanted {
                self.tree.current = None;
            }
        }
        Ok(())
    }

    fn start_piece(&mut self, piece: Piece) -> Result<(), BlobError> {
        self.tree.current = Some(piece);
        self.tree.piece_received = 0;
        if let Piece::Data { offset, .. } = piece {
            let end = self.window_base + self.filled as u64;
            if offset != end {
                // A new range: hand on what the previous one left, continue at `offset`.
                if self.verified != self.filled {
                    return Err(BlobError::Protocol(
                        "unverified bytes between ranges".into(),
                    ));
                }
                if !self.emit() {
                    return Err(consumer_gone());
                }
                self.window_base = offset;
            }
        }
        Ok(())
    }

    /// Verifies the complete groups of the window up to `piece_end`, in place.
    fn verify_groups(&mut self, piece_end: u64) -> Result<(), BlobError> {
        let window = self.sink.window();
        loop {
            let offset = self.window_base + self.verified as u64;
            let group_len = CHUNK_GROUP_LEN.min(piece_end.saturating_sub(offset)) as usize;
            if group_len == 0 || self.filled - self.verified < group_len {
                return Ok(());
            }
            let group = &window[self.verified..self.verified + group_len];
            if !self.tree.group_is_valid(offset, group) {
                return Err(BlobError::Integrity { offset });
            }
            self.verified += group_len;
        }
    }

    /// Hands the verified front of the window on and starts the next window after it; bytes
    /// copied but not verified are dropped (only called when there are none, or on a failure).
    fn emit(&mut self) -> bool {
        let len = self.verified;
        self.filled = 0;
        self.verified = 0;
        if len == 0 {
            return true;
        }
        let delivered = self.sink.accept(self.window_base, len);
        self.window_base += len as u64;
        delivered
    }

    /// Reads and verifies the response body until the plan is complete or the transfer fails.
    /// On a failure, the bytes verified before it are handed on, nothing after them, then the
    /// error is returned (and the stream stopped with [`STOP_INTEGRITY`] for an integrity
    /// failure, [`codes::TIMED_OUT`] when the peer sent nothing for the progress timeout,
    /// [`STOP_CANCELLED`] otherwise).
    pub(super) async fn receive(
        &mut self,
        mut recv: quinn::RecvStream,
        wire_bytes: &AtomicU64,
    ) -> Result<(), BlobError> {
        let result = self.receive_body(&mut recv, wire_bytes).await;
        match &result {
            Err(BlobError::Integrity { .. }) => {
                let _ = recv.stop(STOP_INTEGRITY);
            }
            Err(BlobError::Stalled { .. }) => {
                let _ = recv.stop(codes::TIMED_OUT);
            }
            Err(_) => {
                let _ = recv.stop(STOP_CANCELLED);
            }
            Ok(()) => {}
        }
        let delivered = self.emit() && self.sink.flush().await;
        match result {
            Ok(()) if !delivered => Err(consumer_gone()),
            result => result,
        }
    }

    async fn receive_body(
        &mut self,
        recv: &mut quinn::RecvStream,
        wire_bytes: &AtomicU64,
    ) -> Result<(), BlobError> {
        let mut chunks = vec![Bytes::new(); READ_BATCH];
        while !self.tree.is_complete() {
            let read = recv.read_chunks(&mut chunks);
            let Some(count) = within_progress_timeout(self.progress_timeout, read).await? else {
                return Err(BlobError::Truncated {
                    missing: self.tree.missing(),
                });
            };
            for chunk in &mut chunks[..count] {
                let chunk = std::mem::take(chunk);
                wire_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                self.push(&chunk)?;
            }
            if !self.sink.flush().await {
                return Err(consumer_gone());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use horde_protocol::blob::{normalize_ranges, plan};

    use super::*;
    use crate::blob::ServedBlob;
    use crate::blob::sink::WholeSink;

    /// A blob of a few chunk groups and the bytes a server sends for all of it.
    fn blob_and_wire(size: usize) -> (Vec<u8>, BlobHash, Tree, Vec<u8>) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let (served, hash) = ServedBlob::from_memory(Bytes::from(data.clone()));
        let ranges = normalize_ranges(&[], served.size).unwrap();
        let pieces = plan(served.size, &ranges);
        let mut wire = Vec::new();
        for piece in &pieces {
            wire.extend_from_slice(&served.read_piece(*piece).unwrap());
        }
        let tree = Tree::new(hash, served.size, served.segment_cvs().unwrap(), pieces);
        (data, hash, tree, wire)
    }

    fn verifier(tree: Tree, size: usize) -> Verifier<WholeSink<Vec<u8>>> {
        let sink = WholeSink {
            dest: vec![0u8; size],
            accepted: 0,
            end: size,
            position: None,
        };
        Verifier::new(tree, sink, 0, Duration::from_secs(1))
    }

    #[test]
    fn accepts_the_blob_in_any_slicing() {
        let size = 3 * CHUNK_GROUP_LEN as usize + 100;
        for piece_len in [1, 1000, CHUNK_GROUP_LEN as usize, usize::MAX] {
            let (data, _, tree, wire) = blob_and_wire(size);
            let mut verifier = verifier(tree, size);
            for piece in wire.chunks(piece_len.min(wire.len())) {
                verifier.push(piece).unwrap();
            }
            assert!(verifier.tree.is_complete());
            assert_eq!(verifier.tree.missing(), 0);
            assert!(verifier.emit());
            assert_eq!(verifier.sink.accepted, size);
            assert_eq!(verifier.sink.dest, data);
        }
    }

    #[test]
    fn rejects_a_corrupted_chunk_and_keeps_only_what_verified_before_it() {
        let size = 3 * CHUNK_GROUP_LEN as usize + 100;
        let (data, _, tree, mut wire) = blob_and_wire(size);
        // The CV block comes first; corrupt a byte of the second chunk group's data.
        let cv_len = wire.len() - size;
        wire[cv_len + CHUNK_GROUP_LEN as usize + 5] ^= 1;
        let mut verifier = verifier(tree, size);
        let error = verifier.push(&wire).unwrap_err();
        assert!(
            matches!(error, BlobError::Integrity { offset } if offset == CHUNK_GROUP_LEN),
            "{error}"
        );
        assert!(verifier.emit());
        assert_eq!(verifier.sink.accepted, CHUNK_GROUP_LEN as usize);
        assert_eq!(
            &verifier.sink.dest[..CHUNK_GROUP_LEN as usize],
            &data[..CHUNK_GROUP_LEN as usize]
        );
    }

    #[test]
    fn rejects_cvs_that_do_not_lead_to_the_root() {
        let size = 2 * CHUNK_GROUP_LEN as usize;
        let (_, _, tree, mut wire) = blob_and_wire(size);
        wire[0] ^= 1;
        let mut verifier = verifier(tree, size);
        assert!(matches!(
            verifier.push(&wire),
            Err(BlobError::Integrity { offset: 0 })
        ));
        assert_eq!(verifier.sink.accepted, 0);
    }

    #[test]
    fn a_single_group_blob_is_checked_against_its_hash() {
        let size = 1000;
        let (data, hash, tree, wire) = blob_and_wire(size);
        assert_eq!(hash, BlobHash::of(&data));
        let mut verifier = verifier(tree, size);
        verifier.push(&wire).unwrap();
        assert!(verifier.emit());
        assert_eq!(verifier.sink.dest, data);

        let (_, _, tree, mut wire) = blob_and_wire(size);
        wire[999] ^= 0x80;
        let mut corrupted = self::verifier(tree, size);
        assert!(matches!(
            corrupted.push(&wire),
            Err(BlobError::Integrity { offset: 0 })
        ));
    }
}
