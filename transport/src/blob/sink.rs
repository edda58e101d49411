//! Where verified bytes go: the [`Sink`] a verifier writes into (a window of destination
//! memory at a time), and the three sinks behind [`GetStream`]'s ways of reading.
//!
//! [`GetStream`]: super::GetStream

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::sync::mpsc;

use super::{BlobBuffer, BlobError, VerifiedData};

/// Verified bytes handed out per [`GetStream::next`], at most (whole chunk groups).
const OUTPUT_LEN: usize = 1 << 20;

/// What the receiving task hands [`GetStream::next`].
pub(super) enum Output {
    Data(VerifiedData),
    Done,
    Failed(BlobError),
}

/// Where verified bytes go. The verifier copies received bytes straight into the sink's current
/// *window* (destination memory), verifies each chunk group in place while it is still in cache,
/// and hands the window on once it is full of verified groups: one copy from the network frames
/// to the destination, no staging buffer. [`Self::window`] and [`Self::accept`] never block;
/// what the consumer must wait for happens in [`Self::flush`], between batches of frames.
pub(super) trait Sink: Send {
    /// Room for the next bytes of the blob, contiguous with what was last accepted (empty when
    /// the consumer is gone or has no more room). Its length is a multiple of
    /// [`CHUNK_GROUP_LEN`], except at the end of a destination that ends with the blob, so chunk
    /// groups never straddle two windows.
    fn window(&mut self) -> &mut [u8];
    /// Takes the first `len` bytes of the window (verified, at blob `offset`); the next
    /// [`Self::window`] is room for the bytes after them. `false` when the consumer is gone.
    fn accept(&mut self, offset: u64, len: usize) -> bool;
    /// The first `end` bytes of the window are about to be written (a destination may fault its
    /// memory in ahead of them). Never blocks for long.
    fn prepare(&mut self, _end: usize) {}
    /// Passes what was accepted on to the consumer, waiting while it is behind. `false` when the
    /// consumer is gone.
    fn flush(&mut self) -> impl Future<Output = bool> + Send;
}

/// Hands verified runs to [`GetStream::next`] without copying them again: each window is a
/// [`BytesMut`] whose verified front is frozen and queued.
pub(super) struct ChannelSink {
    pub(super) output: mpsc::Sender<Output>,
    window: BytesMut,
    /// Runs accepted but not yet sent (at most a few: one batch of frames fills few windows).
    pending: Vec<VerifiedData>,
}

impl ChannelSink {
    pub(super) fn new(output: mpsc::Sender<Output>) -> Self {
        Self {
            output,
            window: BytesMut::new(),
            pending: Vec::new(),
        }
    }
}

impl Sink for ChannelSink {
    fn window(&mut self) -> &mut [u8] {
        if self.window.is_empty() {
            // Reclaims the previous allocation when its runs were already dropped.
            self.window.reserve(OUTPUT_LEN);
            self.window.resize(OUTPUT_LEN, 0);
        }
        &mut self.window
    }

    fn accept(&mut self, offset: u64, len: usize) -> bool {
        let bytes = self.window.split_to(len).freeze();
        self.pending.push(VerifiedData { offset, bytes });
        !self.output.is_closed()
    }

    async fn flush(&mut self) -> bool {
        for data in self.pending.drain(..) {
            if self.output.send(Output::Data(data)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// A blocking consumer of verified bytes for [`GetStream::read_to_sink`], called on a writer
/// thread in blob order.
pub trait VerifiedSink: Send {
    /// Takes verified bytes that sit at `offset` in the blob. Whole windows start at an address
    /// aligned to [`SINK_ALIGN`] and are [`SINK_BATCH`] long (a writer may use direct I/O for
    /// them); the last one of a range may be shorter.
    fn write(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
}

/// Verified bytes gathered before one [`VerifiedSink::write`]: a multiple of the chunk group,
/// small enough that the window is still in cache when it is written out.
pub const SINK_BATCH: usize = 256 << 10;

/// Alignment of the windows [`VerifiedSink::write`] gets: the page size, enough for direct I/O
/// on 512 B and 4 KiB sector devices.
pub const SINK_ALIGN: usize = 4096;

/// A window of verified bytes on its way to the writer thread.
pub(super) struct WrittenWindow {
    /// Blob offset of the first byte.
    pub(super) offset: u64,
    pub(super) buffer: Vec<u8>,
    /// Where the bytes sit in `buffer`.
    pub(super) bytes: Range<usize>,
}

/// Windows of [`SINK_BATCH`] queued for the writer thread: enough to ride out a slow write
/// without stalling the network, few enough to bound the memory (2 MiB).
pub(super) const WRITE_QUEUE: usize = 8;

/// Feeds the writer thread of [`GetStream::read_to_sink`] with full windows and takes their
/// buffers back once written.
pub(super) struct WriterSink {
    /// The buffer of the current window (empty when there is none).
    pub(super) window: Vec<u8>,
    /// Where the window starts in it: the first address aligned to [`SINK_ALIGN`].
    pub(super) window_start: usize,
    pub(super) windows: mpsc::Sender<WrittenWindow>,
    /// Buffers the writer is done with.
    pub(super) spares: std::sync::mpsc::Receiver<Vec<u8>>,
    /// Windows accepted but not yet queued for the writer.
    pub(super) pending: Vec<WrittenWindow>,
}

impl Sink for WriterSink {
    fn window(&mut self) -> &mut [u8] {
        if self.window.is_empty() {
            // A buffer back from the writer, or a new one (allocated on first use: a transfer
            // that fails at once costs nothing; at most the queue's worth in flight).
            self.window = self.spares.try_recv().unwrap_or_default();
            self.window.resize(SINK_BATCH + SINK_ALIGN, 0);
            self.window_start = self
                .window
                .as_ptr()
                .align_offset(SINK_ALIGN)
                .min(SINK_ALIGN);
        }
        let start = self.window_start;
        &mut self.window[start..start + SINK_BATCH]
    }

    fn accept(&mut self, offset: u64, len: usize) -> bool {
        let buffer = std::mem::take(&mut self.window);
        let start = self.window_start;
        self.pending.push(WrittenWindow {
            offset,
            buffer,
            bytes: start..start + len,
        });
        !self.windows.is_closed()
    }

    async fn flush(&mut self) -> bool {
        for window in self.pending.drain(..) {
            if self.windows.send(window).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Memory a whole blob is received into: [`Destination::memory`] is at least the blob's size.
pub(super) trait Destination: Send {
    fn memory(&mut self) -> &mut [u8];
    /// `memory()[..end]` is about to be written.
    fn prepare(&mut self, _end: usize) {}
}

impl Destination for Vec<u8> {
    fn memory(&mut self) -> &mut [u8] {
        self
    }
}

impl Destination for BlobBuffer {
    fn memory(&mut self) -> &mut [u8] {
        self.memory_mut()
    }

    fn prepare(&mut self, end: usize) {
        BlobBuffer::prepare(self, end);
    }
}

/// The whole destination of [`GetStream::read_to_vec`] and [`GetStream::read_to_buffer`]: one
/// window from the accepted prefix to the end of the blob.
pub(super) struct WholeSink<D> {
    pub(super) dest: D,
    /// `dest[..accepted]` holds verified bytes (or the caller's verified prefix).
    pub(super) accepted: usize,
    /// The blob's size: the window ends there.
    pub(super) end: usize,
    /// Where `accepted` is published after each batch of frames, for a progress reader.
    pub(super) position: Option<Arc<AtomicU64>>,
}

impl<D: Destination> Sink for WholeSink<D> {
    fn window(&mut self) -> &mut [u8] {
        self.dest
            .memory()
            .get_mut(self.accepted..self.end)
            .unwrap_or_default()
    }

    fn accept(&mut self, _offset: u64, len: usize) -> bool {
        let end = self.accepted + len;
        if end > self.end {
            return false;
        }
        self.accepted = end;
        true
    }

    fn prepare(&mut self, end: usize) {
        self.dest.prepare(self.accepted + end);
    }

    async fn flush(&mut self) -> bool {
        if let Some(position) = &self.position {
            position.store(self.accepted as u64, Ordering::Relaxed);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_writer_sink_hands_aligned_windows_on_at_their_offsets() {
        let (windows, mut written) = mpsc::channel(WRITE_QUEUE);
        let (spare, spares) = std::sync::mpsc::sync_channel(2);
        let mut sink = WriterSink {
            window: Vec::new(),
            window_start: 0,
            windows,
            spares,
            pending: Vec::new(),
        };
        for (offset, fill) in [(4096u64, 1u8), (4096 + SINK_BATCH as u64, 2)] {
            let window = sink.window();
            assert_eq!(window.len(), SINK_BATCH);
            assert_eq!(window.as_ptr().align_offset(SINK_ALIGN), 0);
            window[..10].fill(fill);
            assert!(sink.accept(offset, 10));
        }
        assert!(sink.flush().await);
        let mut returned = Vec::new();
        for (offset, fill) in [(4096u64, 1u8), (4096 + SINK_BATCH as u64, 2)] {
            let window = written.recv().await.unwrap();
            assert_eq!(window.offset, offset);
            assert_eq!(window.bytes.len(), 10);
            assert!(
                window.buffer[window.bytes.clone()]
                    .iter()
                    .all(|b| *b == fill)
            );
            returned.push(window.buffer.as_ptr() as usize);
            spare.try_send(window.buffer).unwrap();
        }
        // A buffer back from the writer is reused for the next window.
        let reused = sink.window().as_ptr() as usize;
        assert!(
            returned
                .iter()
                .any(|start| (*start..start + SINK_ALIGN).contains(&reused))
        );
        drop(written);
        sink.window();
        assert!(!sink.accept(0, 1), "the writer is gone");
    }

    #[test]
    fn the_whole_sink_never_accepts_past_the_blob() {
        let mut sink = WholeSink {
            dest: vec![0u8; 10],
            accepted: 4,
            end: 10,
            position: None,
        };
        assert_eq!(sink.window().len(), 6);
        sink.window()[..6].copy_from_slice(b"abcdef");
        assert!(sink.accept(4, 4));
        assert_eq!(sink.window().len(), 2);
        assert!(!sink.accept(8, 3));
        assert!(sink.accept(8, 2));
        assert!(sink.window().is_empty());
        assert_eq!(&sink.dest[4..], b"abcdef");
    }

    #[tokio::test]
    async fn the_channel_sink_queues_runs_at_their_offsets_without_copying() {
        let (output, mut runs) = mpsc::channel(4);
        let mut sink = ChannelSink::new(output);
        assert_eq!(sink.window().len(), OUTPUT_LEN);
        sink.window()[..3].copy_from_slice(b"abc");
        assert!(sink.accept(100, 3));
        sink.window()[..2].copy_from_slice(b"de");
        assert!(sink.accept(103, 2));
        assert!(sink.flush().await);
        for (offset, bytes) in [(100, &b"abc"[..]), (103, b"de")] {
            match runs.recv().await {
                Some(Output::Data(data)) => {
                    assert_eq!(
                        data,
                        VerifiedData {
                            offset,
                            bytes: bytes.to_vec().into()
                        }
                    );
                }
                _ => panic!("expected data"),
            }
        }
        drop(runs);
        sink.window()[..1].copy_from_slice(b"f");
        assert!(!sink.accept(105, 1), "the consumer is gone");
        assert!(!sink.flush().await);
    }
}
