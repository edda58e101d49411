//! The UDP socket under every endpoint: quinn's own tokio socket, with each segmentation-offload
//! send kept within what one UDP send may carry, so MTU discovery can go past 1,452 bytes.
//!
//! quinn 0.11 hands the socket up to 10 datagrams per send (its `MAX_TRANSMIT_SEGMENTS`),
//! whatever their size. At 1,452 bytes that is 14.5 KB; at a jumbo path's 8,972 it would be
//! 89.7 KB, above the 64 KiB one UDP send (GSO included) may hold, so the kernel would refuse
//! the whole batch with `EMSGSIZE`, which quinn-udp drops silently (as it must for MTU probes):
//! every batch lost, black-hole detection, back to 1,200 bytes. Here such a batch goes out as
//! several sends of whole datagrams, each within [`MAX_SEND_BYTES`].

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

impl BoundedGsoSocket {
    /// Wraps quinn's tokio socket for `socket`.
    pub(crate) fn wrap(socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
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
