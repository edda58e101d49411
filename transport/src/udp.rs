//! The UDP socket under every endpoint: quinn's own tokio socket, with each segmentation-offload
//! send kept within what one UDP send may carry, so MTU discovery can go past 1,452 bytes.
//!
//! quinn 0.11 hands the socket up to 10 datagrams per send (its `MAX_TRANSMIT_SEGMENTS`),
//! whatever their size. At 1,452 bytes that is 14.5 KB; at a jumbo path's 8,972 it would be
//! 89.7 KB, above the 64 KiB one UDP send (GSO included) may hold, so the kernel would refuse
//! the whole batch with `EMSGSIZE`, which quinn-udp drops silently (as it must for MTU probes):
//! every batch lost, black-hole detection, back to 1,200 bytes. Here such a batch goes out as
//! several sends of whole datagrams, each within [`MAX_SEND_BYTES`].
//!
//! The socket's kernel receive buffer is raised to [`SOCKET_BUFFER`] (as far as the system allows):
//! with Linux's default 208 KiB receive buffer, a receiver that is busy for a third of a
//! millisecond at 5 Gbit/s (a TCP write, a hash, a scheduling delay on a loaded machine) loses
//! datagrams, and every loss halves the sender's congestion window.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most one UDP send may carry: an IPv4 datagram is at most 65,535 bytes, less 20 of IP and
/// 8 of UDP header (IPv6 allows 65,527; the smaller holds for both).
pub(crate) const MAX_SEND_BYTES: usize = 65_535 - 20 - 8;

/// The largest UDP payload MTU discovery searches up to, and the `max_udp_payload_size` we
/// announce: 8,972 bytes, what a 9,000-byte jumbo MTU carries over IPv4 (less 20 of IP and 8 of
/// UDP header). quinn's default stops at 1,452 (Ethernet's 1,500 over IPv6), leaving loopback
/// and jumbo LANs at a sixth of the packet size they carry. Searching higher is safe: a path
/// that drops the larger probes keeps the last size that passed (probes are not data).
pub const MAX_UDP_PAYLOAD: u16 = 9_000 - 20 - 8;

/// quinn's socket, with segmentation-offload batches split to fit one send each.
pub(crate) struct BoundedGsoSocket {
    inner: Arc<dyn AsyncUdpSocket>,
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
        Ok(Arc::new(Self { inner }))
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

    /// Sends the pieces in order. Should the socket refuse a later piece as full, the error
    /// goes back to quinn, which offers the whole transmit again: the earlier pieces are then
    /// sent twice, and the peer discards the duplicate packets.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if transmit.contents.len() <= MAX_SEND_BYTES {
            return self.inner.try_send(transmit);
        }
        for piece in split(transmit) {
            self.inner.try_send(&piece)?;
        }
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
}
