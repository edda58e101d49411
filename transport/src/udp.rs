//! The UDP socket under every endpoint: quinn's own tokio socket, with segmentation-offload sends
//! joined up to what one UDP send may carry, and split down to it.
//!
//! quinn 0.11 hands the socket up to 10 datagrams per send (its private `MAX_TRANSMIT_SEGMENTS`),
//! whatever their size.
//! - **Joined.** At 1,452 bytes (an Ethernet path) 10 datagrams are 14.5 KB, and the kernel's
//!   cost of a send (and on the receiver, of the GRO datagram it arrives as) is paid per 10
//!   packets. A bulk sender's full batches are held here and go out together, up to
//!   [`MAX_SEND_BYTES`] (40 datagrams of 1,452 bytes) per send: the batch that would not fit, any
//!   other transmit, or the flusher task (which runs once the connection driver has yielded)
//!   sends what is held. A transmit that is not a full batch (a round trip's packet, an ACK, a
//!   probe) is never held. quinn believes held datagrams sent; they leave microseconds later, in
//!   order. Measured: benches/RESULTS.md, "Sends joined up to 64 KB".
//! - **Split.** At a jumbo path's 8,972 bytes 10 datagrams would be 89.7 KB, above the 64 KiB
//!   one UDP send (GSO included) may hold, so the kernel would refuse the whole batch with
//!   `EMSGSIZE`, which quinn-udp drops silently (as it must for MTU probes): every batch lost,
//!   black-hole detection, back to 1,200 bytes. Here such a batch goes out as several sends of
//!   whole datagrams, each within [`MAX_SEND_BYTES`].
//!
//! The socket's kernel receive buffer is raised to [`SOCKET_BUFFER`] (as far as the system allows):
//! with Linux's default 208 KiB receive buffer, a receiver that is busy for a third of a
//! millisecond at 5 Gbit/s (a TCP write, a hash, a scheduling delay on a loaded machine) loses
//! datagrams, and every loss halves the sender's congestion window.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::Notify;

/// The most one UDP send may carry: an IPv4 datagram is at most 65,535 bytes, less 20 of IP and
/// 8 of UDP header (IPv6 allows 65,527; the smaller holds for both).
pub(crate) const MAX_SEND_BYTES: usize = 65_535 - 20 - 8;

/// The largest UDP payload MTU discovery searches up to, and the `max_udp_payload_size` we
/// announce: 8,972 bytes, what a 9,000-byte jumbo MTU carries over IPv4 (less 20 of IP and 8 of
/// UDP header). quinn's default stops at 1,452 (Ethernet's 1,500 over IPv6), leaving loopback
/// and jumbo LANs at a sixth of the packet size they carry. Searching higher is safe: a path
/// that drops the larger probes keeps the last size that passed (probes are not data).
pub const MAX_UDP_PAYLOAD: u16 = 9_000 - 20 - 8;

/// quinn's socket, with segmentation-offload batches joined and split to fit one send each.
pub(crate) struct BoundedGsoSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// Full batches not sent yet (see the module documentation).
    held: Mutex<Held>,
    /// Wakes the flusher task when a batch is held.
    flush: Arc<Notify>,
}

/// The kernel receive buffer each endpoint's UDP socket asks for: 8 MiB, a stream's whole receive
/// window ([`crate::STREAM_RECEIVE_WINDOW`]), so the socket can hold what the peer may send before
/// the receiving task next runs. The kernel grants at most `net.core.rmem_max` (Linux's default
/// is 208 KiB; raise it to `8388608` for full bulk speed); the buffer is memory only while
/// datagrams wait in it. The send buffer keeps the system's default: raising it too showed no
/// gain, and one-process receivers (`horde job request`, `horde blob get`) ran 5–10 % slower
/// against senders with 8 MiB send buffers in A/B runs (benches/RESULTS.md, "UDP socket
/// buffers").
/// Measured (`horde job forward`, 1 GiB `GET /bytes` from a testnet job, loopback, 2-core
/// machine, `rmem_max` 4 MiB): with the default 208 KiB the forwarder's socket dropped ~600
/// datagrams per GiB (`UdpRcvbufErrors`) and ran at 4.3–5.3 Gbit/s with both processes
/// partly idle; see benches/RESULTS.md, "UDP socket buffers".
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Asks for a [`SOCKET_BUFFER`] receive buffer; returns what the kernel granted (Linux reports
/// twice the requested size, its bookkeeping included). A refusal is not an error: the socket
/// keeps its default buffer.
pub fn enlarge_receive_buffer(socket: &std::net::UdpSocket) -> usize {
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    socket.recv_buffer_size().unwrap_or(0)
}

impl BoundedGsoSocket {
    /// Wraps quinn's tokio socket for `socket`, its receive buffer enlarged
    /// ([`enlarge_receive_buffer`]).
    pub(crate) fn wrap(socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let receive = enlarge_receive_buffer(&socket);
        tracing::debug!(receive, "UDP socket receive buffer");
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
        Ok(Self::around(inner))
    }

    /// Joins and splits the sends of `inner`. Spawns the flusher: call inside a tokio runtime.
    fn around(inner: Arc<dyn AsyncUdpSocket>) -> Arc<Self> {
        let flush = Arc::new(Notify::new());
        let socket = Arc::new(Self {
            inner,
            held: Mutex::new(Held::default()),
            flush: flush.clone(),
        });
        tokio::spawn(flush_when_idle(Arc::downgrade(&socket), flush));
        socket
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends what `held` holds, if anything. On `WouldBlock` it stays held.
    fn send_held(&self, held: &mut Held) -> io::Result<()> {
        if held.contents.is_empty() {
            return Ok(());
        }
        self.inner.try_send(&held.transmit())?;
        held.contents.clear();
        Ok(())
    }

    /// Sends `transmit` at once, split when it is over [`MAX_SEND_BYTES`].
    ///
    /// Should the socket refuse a later piece as full, the error goes back to quinn, which
    /// offers the whole transmit again: the earlier pieces are then sent twice, and the peer
    /// discards the duplicate packets.
    fn send_now(&self, transmit: &Transmit) -> io::Result<()> {
        if transmit.contents.len() <= MAX_SEND_BYTES {
            return self.inner.try_send(transmit);
        }
        for piece in split(transmit) {
            self.inner.try_send(&piece)?;
        }
        Ok(())
    }
}

impl Drop for BoundedGsoSocket {
    fn drop(&mut self) {
        // Ends the flusher task (it finds no socket behind its weak reference).
        self.flush.notify_one();
    }
}

/// Sends what the socket holds once the task that held it has yielded: a bulk sender's driver
/// adds its next batches first (each held batch costs it nothing), so the send goes out full;
/// when the driver has nothing more (congestion window, pacing, end of data) the tail leaves
/// as soon as the runtime has run the tasks that were ready. Ends with the socket.
async fn flush_when_idle(socket: Weak<BoundedGsoSocket>, flush: Arc<Notify>) {
    let mut writable: Option<Pin<Box<dyn UdpPoller>>> = None;
    loop {
        flush.notified().await;
        // Runs again once the tasks ready now (the connection driver among them) have run.
        tokio::task::yield_now().await;
        let Some(socket) = socket.upgrade() else {
            return;
        };
        loop {
            let sent = {
                let mut held = socket.held();
                socket.send_held(&mut held)
            };
            match sent {
                Ok(()) => break,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    let poller = writable
                        .get_or_insert_with(|| Arc::clone(&socket.inner).create_io_poller());
                    if let Err(error) =
                        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await
                    {
                        tracing::debug!(%error, "UDP socket failed while held datagrams waited");
                        socket.held().contents.clear();
                        break;
                    }
                }
                Err(error) => {
                    // quinn-udp reports only `WouldBlock` (other send errors it logs and
                    // swallows); anything else loses these datagrams as a lost packet would.
                    tracing::debug!(%error, "held datagrams not sent");
                    socket.held().contents.clear();
                    break;
                }
            }
        }
    }
}

/// Full segmentation-offload batches of one destination held to go out in one send: whole
/// datagrams of `segment` bytes.
#[derive(Debug, Default)]
struct Held {
    contents: Vec<u8>,
    destination: Option<SocketAddr>,
    src_ip: Option<IpAddr>,
    ecn: Option<EcnCodepoint>,
    segment: usize,
}

impl Held {
    /// `transmit`'s segment size when it is a full batch worth holding: at least two datagrams,
    /// all of one size, and room in one send for another batch like it.
    fn holdable(transmit: &Transmit, max_segments: usize) -> Option<usize> {
        let segment = transmit.segment_size.filter(|&segment| segment > 0)?;
        let len = transmit.contents.len();
        let segments = len / segment;
        (len.is_multiple_of(segment)
            && segments >= 2
            && 2 * len <= MAX_SEND_BYTES
            && 2 * segments <= max_segments)
            .then_some(segment)
    }

    /// Whether `transmit` may join what is held (one send, same addressing, same datagram size,
    /// its last datagram possibly shorter).
    fn takes(&self, transmit: &Transmit, max_segments: usize) -> bool {
        let len = transmit.contents.len();
        let segment_fits = match transmit.segment_size {
            Some(segment) => segment == self.segment,
            None => len <= self.segment,
        };
        !self.contents.is_empty()
            && segment_fits
            && self.destination == Some(transmit.destination)
            && self.src_ip == transmit.src_ip
            && self.ecn == transmit.ecn
            && self.room_for(len, max_segments)
    }

    /// Holds `transmit` (after [`Held::holdable`], or when [`Held::takes`] it).
    fn push(&mut self, transmit: &Transmit, segment: usize) {
        if self.contents.is_empty() {
            self.contents.reserve(MAX_SEND_BYTES);
            self.destination = Some(transmit.destination);
            self.src_ip = transmit.src_ip;
            self.ecn = transmit.ecn;
            self.segment = segment;
        }
        self.contents.extend_from_slice(transmit.contents);
    }

    /// Whether `len` more bytes may follow what is held in the same send: all held datagrams
    /// full, within [`MAX_SEND_BYTES`] and the socket's segment limit.
    fn room_for(&self, len: usize, max_segments: usize) -> bool {
        self.contents.len().is_multiple_of(self.segment)
            && self.contents.len() + len <= MAX_SEND_BYTES
            && (self.contents.len() + len).div_ceil(self.segment) <= max_segments
    }

    fn transmit(&self) -> Transmit<'_> {
        Transmit {
            destination: self.destination.expect("held datagrams have a destination"),
            ecn: self.ecn,
            contents: &self.contents,
            segment_size: (self.contents.len() > self.segment).then_some(self.segment),
            src_ip: self.src_ip,
        }
    }
}

impl fmt::Debug for BoundedGsoSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedGsoSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

/// The pieces of `transmit`, each of whole datagrams and at most [`MAX_SEND_BYTES`]; the
/// transmit itself when it fits.
fn split<'a>(transmit: &Transmit<'a>) -> Vec<Transmit<'a>> {
    let Some(segment) = transmit.segment_size.filter(|&segment| segment > 0) else {
        return vec![transmit.clone()];
    };
    if transmit.contents.len() <= MAX_SEND_BYTES {
        return vec![transmit.clone()];
    }
    let per_send = (MAX_SEND_BYTES / segment).max(1) * segment;
    transmit
        .contents
        .chunks(per_send)
        .map(|contents| Transmit {
            contents,
            // A lone datagram is sent without the GSO option.
            segment_size: (contents.len() > segment).then_some(segment),
            ..transmit.clone()
        })
        .collect()
}

impl AsyncUdpSocket for BoundedGsoSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    /// Holds a full batch, joins a transmit to what is held, or sends (what is held first, so
    /// datagrams leave in the order quinn made them).
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let max_segments = self.inner.max_transmit_segments();
        let mut held = self.held();
        if !held.contents.is_empty() {
            if held.takes(transmit, max_segments) {
                let segment = held.segment;
                held.push(transmit, segment);
                let len = transmit.contents.len();
                if Held::holdable(transmit, max_segments).is_some()
                    && held.room_for(len, max_segments)
                {
                    return Ok(());
                }
                // Taken: should the socket be full, the flusher sends it once it is writable.
                return match self.send_held(&mut held) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
                    sent => sent,
                };
            }
            // Not taken: on `WouldBlock` quinn offers this transmit again later.
            self.send_held(&mut held)?;
        }
        if let Some(segment) = Held::holdable(transmit, max_segments) {
            held.push(transmit, segment);
            self.flush.notify_one();
            return Ok(());
        }
        drop(held);
        self.send_now(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's cap on a socket buffer request, from `/proc/sys/net/core/{name}`.
    fn system_max(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .expect("reading the system's socket buffer cap")
            .trim()
            .parse()
            .expect("a number")
    }

    #[test]
    fn the_receive_buffer_is_raised_as_far_as_the_system_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default_receive = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let receive = enlarge_receive_buffer(&socket);
        // Linux grants min(request, cap) and reports twice that (its bookkeeping).
        assert_eq!(receive, 2 * SOCKET_BUFFER.min(system_max("rmem_max")));
        assert!(receive >= default_receive);
    }

    fn transmit(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: SocketAddr::from(([127, 0, 0, 1], 9)),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    #[test]
    fn a_batch_within_one_send_is_left_whole() {
        let contents = vec![7u8; 10 * 1452];
        let pieces = split(&transmit(&contents, Some(1452)));
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].contents.len(), 10 * 1452);
        assert_eq!(pieces[0].segment_size, Some(1452));
    }

    #[test]
    fn a_jumbo_batch_is_split_into_whole_datagrams_within_one_send_each() {
        // Ten datagrams of 8,972 bytes, the last one short, as quinn builds them.
        let contents: Vec<u8> = (0..9 * 8972 + 100).map(|i| (i % 251) as u8).collect();
        let pieces = split(&transmit(&contents, Some(8972)));
        let lens: Vec<usize> = pieces.iter().map(|p| p.contents.len()).collect();
        assert_eq!(lens, vec![7 * 8972, 2 * 8972 + 100]);
        for piece in &pieces {
            assert!(piece.contents.len() <= MAX_SEND_BYTES);
            assert_eq!(piece.segment_size, Some(8972));
        }
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.contents.to_vec()).collect();
        assert_eq!(joined, contents);
    }

    #[test]
    fn a_lone_remaining_datagram_goes_without_the_segment_option() {
        let contents = vec![1u8; 8 * 8972];
        let pieces = split(&transmit(&contents, Some(8972)));
        let lens: Vec<usize> = pieces.iter().map(|p| p.contents.len()).collect();
        assert_eq!(lens, vec![7 * 8972, 8972]);
        assert_eq!(pieces[1].segment_size, None);
    }

    /// Datagram `seq` of a batch: its number in the first 4 bytes, `len` bytes in all.
    fn numbered(first: u32, count: u32, len: usize) -> Vec<u8> {
        let mut contents = Vec::new();
        for seq in first..first + count {
            let mut datagram = vec![0u8; len];
            datagram[..4].copy_from_slice(&seq.to_be_bytes());
            contents.extend_from_slice(&datagram);
        }
        contents
    }

    #[test]
    fn only_full_batches_with_room_for_another_are_held() {
        let batch = vec![0u8; 10 * 1452];
        assert_eq!(
            Held::holdable(&transmit(&batch, Some(1452)), 64),
            Some(1452)
        );
        // Without segmentation offload (one datagram per send) nothing is joined.
        assert_eq!(Held::holdable(&transmit(&batch, Some(1452)), 1), None);
        let one = vec![0u8; 1452];
        assert_eq!(Held::holdable(&transmit(&one, None), 64), None);
        let short_tail = vec![0u8; 9 * 1452 + 100];
        assert_eq!(Held::holdable(&transmit(&short_tail, Some(1452)), 64), None);
        // Jumbo batches already fill a send (and are split instead).
        let jumbo = vec![0u8; 10 * 8972];
        assert_eq!(Held::holdable(&transmit(&jumbo, Some(8972)), 64), None);
    }

    #[test]
    fn held_batches_fill_one_send_and_take_only_their_own_kind() {
        let batch = vec![0u8; 10 * 1452];
        let full = transmit(&batch, Some(1452));
        let mut held = Held::default();
        held.push(&full, 1452);
        for _ in 0..3 {
            assert!(held.takes(&full, 64));
            held.push(&full, 1452);
        }
        // 40 datagrams (58,080 bytes): a fifth batch would pass 64 KB.
        assert!(!held.takes(&full, 64));
        assert!(!held.room_for(batch.len(), 64));
        let out = held.transmit();
        assert_eq!(out.contents.len(), 40 * 1452);
        assert_eq!(out.segment_size, Some(1452));

        let mut held = Held::default();
        held.push(&full, 1452);
        let tail = vec![0u8; 3 * 1452 + 7];
        assert!(held.takes(&transmit(&tail, Some(1452)), 64));
        let small = vec![0u8; 60];
        assert!(
            held.takes(&transmit(&small, None), 64),
            "a short last datagram"
        );
        assert!(
            !held.takes(&transmit(&batch, Some(1200)), 64),
            "another size"
        );
        let mut elsewhere = full.clone();
        elsewhere.destination = SocketAddr::from(([127, 0, 0, 2], 9));
        assert!(!held.takes(&elsewhere, 64), "another destination");
        let mut marked = full.clone();
        marked.ecn = Some(EcnCodepoint::Ce);
        assert!(!held.takes(&marked, 64), "other ECN bits");
        assert!(!held.takes(&full, 19), "over the socket's segment limit");
        // Once a short datagram is held, nothing may follow it in the same send.
        held.push(&transmit(&small, None), 1452);
        assert!(!held.takes(&full, 64));
        assert_eq!(held.transmit().contents.len(), 10 * 1452 + 60);
    }

    /// Receives `count` datagrams and returns their numbers.
    fn receive_numbers(receiver: &std::net::UdpSocket, count: usize) -> Vec<u32> {
        let mut buf = vec![0u8; 65_536];
        (0..count)
            .map(|_| {
                let len = receiver
                    .recv(&mut buf)
                    .expect("a datagram within the timeout");
                assert!(len >= 4);
                u32::from_be_bytes(buf[..4].try_into().unwrap())
            })
            .collect()
    }

    /// quinn's tokio socket, recording the length of every send that went out.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<dyn AsyncUdpSocket>,
        sends: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncUdpSocket for Recording {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Arc::clone(&self.inner).create_io_poller()
        }
        fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
            self.inner.try_send(transmit)?;
            self.sends.lock().unwrap().push(transmit.contents.len());
            Ok(())
        }
        fn poll_recv(
            &self,
            cx: &mut Context,
            bufs: &mut [IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            self.inner.poll_recv(cx, bufs, meta)
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }
        fn max_transmit_segments(&self) -> usize {
            self.inner.max_transmit_segments()
        }
    }

    #[tokio::test]
    async fn joined_batches_arrive_whole_and_in_order_and_a_tail_is_flushed() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let destination = receiver.local_addr().unwrap();
        let sends = Arc::new(Mutex::new(Vec::new()));
        let inner = quinn::Runtime::wrap_udp_socket(
            &quinn::TokioRuntime,
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        )
        .unwrap();
        assert!(
            inner.max_transmit_segments() >= 40,
            "this kernel offers no UDP segmentation offload"
        );
        let socket = BoundedGsoSocket::around(Arc::new(Recording {
            inner,
            sends: sends.clone(),
        }));
        let mut writable = Arc::clone(&socket).create_io_poller();
        // As quinn's driver does: wait for the socket to be writable, then send.
        let mut send = async |contents: &[u8], segment_size: Option<usize>| {
            std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
                .await
                .unwrap();
            socket
                .try_send(&Transmit {
                    destination,
                    ecn: None,
                    contents,
                    segment_size,
                    src_ip: None,
                })
                .unwrap();
        };
        // Six full batches (the fifth starts a second send), then a lone round-trip datagram:
        // everything held goes out before it.
        for batch in 0..6 {
            send(&numbered(batch * 10, 10, 1452), Some(1452)).await;
        }
        send(&numbered(60, 1, 200), None).await;
        assert_eq!(receive_numbers(&receiver, 61), (0..61).collect::<Vec<_>>());
        assert_eq!(
            std::mem::take(&mut *sends.lock().unwrap()),
            vec![40 * 1452, 20 * 1452 + 200]
        );

        // Two full batches and nothing after them: the flusher sends them once this task yields.
        send(&numbered(100, 10, 1452), Some(1452)).await;
        send(&numbered(110, 10, 1452), Some(1452)).await;
        let received = tokio::task::spawn_blocking(move || receive_numbers(&receiver, 20))
            .await
            .unwrap();
        assert_eq!(received, (100..120).collect::<Vec<_>>());
        assert_eq!(*sends.lock().unwrap(), vec![20 * 1452]);
    }
}
