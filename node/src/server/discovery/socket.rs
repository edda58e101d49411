//! The discovery listener's UDP receive buffer, enlarged as every other horde endpoint's is
//! (`horde_transport::SOCKET_BUFFER`, as far as `net.core.rmem_max` allows).
//!
//! libp2p's QUIC transport binds its socket itself and offers no way to set a socket option, so
//! it kept the system's default buffer (Linux: 208 KiB). The bootstrap peer of a network that
//! starts together (the facilitator: every joiner's first contact) then drops datagrams whenever
//! it waits for a core: at 256 nodes on two cores its socket alone dropped ~1,900 datagrams per
//! start (`ss -uam`: `d1913`; no other socket dropped any), Initial packets among them; 24 of
//! the 255 joiners lost their handshake to it, timed out after 5 s, redialed, and convergence
//! waited for them (11.1–14.4 s). With the buffer enlarged (system-wide, to check): no drop, no
//! failed dial, 9.7 s. See benches/RESULTS.md, "Join storms and the discovery socket".
//!
//! The socket is found by the address and port it is bound to (`/proc/self/net/udp` or `udp6`
//! name its inode), then among this process's descriptors (`/proc/self/fd`: `socket:[inode]`), and
//! duplicated with `pidfd_getfd` (Linux 5.6; a process may always take its own descriptors).
//! The duplicate shares the socket: the option set through it holds for libp2p's descriptor, and
//! dropping it leaves libp2p's open.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// Enlarges the receive buffer of this process's UDP socket bound to `bound` (its port, on its
/// address or the unspecified one); returns what the kernel granted (Linux reports twice the
/// requested size).
pub(super) fn enlarge_receive_buffer(bound: SocketAddr) -> io::Result<usize> {
    let socket = own_socket(bound)?;
    Ok(horde_transport::enlarge_receive_buffer(&socket))
}

/// A duplicate of this process's descriptor of the UDP socket bound to `bound`.
fn own_socket(bound: SocketAddr) -> io::Result<UdpSocket> {
    let table = if bound.is_ipv4() {
        "/proc/self/net/udp"
    } else {
        "/proc/self/net/udp6"
    };
    let inodes = inodes_bound_to(&std::fs::read_to_string(table)?, bound);
    let descriptor = descriptor_of(&inodes)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no UDP socket of this process is bound to port {}",
                bound.port()
            ),
        )
    })?;
    let process = pidfd_open(getpid(), PidfdFlags::empty())?;
    let duplicate = pidfd_getfd(&process, descriptor, PidfdGetfdFlags::empty())?;
    Ok(UdpSocket::from(duplicate))
}

/// The inodes of the sockets a `/proc/net/udp` table lists as bound to `bound`: its port, on its
/// address or on the unspecified one (every socket of the network namespace, of any process).
fn inodes_bound_to(table: &str, bound: SocketAddr) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode …`;
            // a local address is `HEXIP:HEXPORT`.
            let (ip, port) = fields.get(1)?.rsplit_once(':')?;
            let inode = fields.get(9)?.parse().ok()?;
            let ip = table_ip(ip)?;
            (u16::from_str_radix(port, 16).ok()? == bound.port()
                && (ip == bound.ip() || ip.is_unspecified()))
            .then_some(inode)
        })
        .collect()
}

/// An address as the kernel prints it in `/proc/net/udp{,6}`: the address's bytes read as
/// native-endian 32-bit words, each in 8 hex digits.
fn table_ip(hex: &str) -> Option<IpAddr> {
    let mut bytes = Vec::with_capacity(16);
    for word in hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// The first of this process's descriptors that refers to one of the sockets `inodes`.
fn descriptor_of(inodes: &[u64]) -> io::Result<Option<i32>> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        // A descriptor closed since the listing was read has no link any more.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        if inode.is_some_and(|inode| inodes.contains(&inode))
            && let Some(descriptor) = entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            return Ok(Some(descriptor));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The kernel's cap on a socket buffer request.
    fn rmem_max() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn the_buffer_of_a_socket_bound_elsewhere_in_the_process_is_enlarged() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let granted = enlarge_receive_buffer(socket.local_addr().unwrap()).unwrap();
        // Seen through the original descriptor: the duplicate set the socket's own option.
        let after = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        assert_eq!(after, granted);
        // Linux grants min(request, cap) and reports twice that (its bookkeeping).
        assert_eq!(after, 2 * horde_transport::SOCKET_BUFFER.min(rmem_max()));
        // The original descriptor still works after the duplicate was dropped.
        socket
            .send_to(b"ping", socket.local_addr().unwrap())
            .unwrap();
        let mut buffer = [0u8; 8];
        assert_eq!(socket.recv(&mut buffer).unwrap(), 4);
    }

    #[tokio::test]
    async fn a_discovery_node_listens_with_the_enlarged_buffer() {
        let cancel = tokio_util::sync::CancellationToken::new();
        let node = crate::server::discovery::Discovery::start(
            &horde_protocol::SecretKey::generate(),
            crate::server::discovery::LocalNode {
                role: horde_protocol::Role::Validator,
                addrs: Vec::new(),
                capacity: None,
                state_dir: None,
            },
            &crate::server::discovery::DiscoveryConfig::default(),
            cancel.clone(),
        )
        .await
        .unwrap();
        let listen = node.listen_addrs()[0];
        let receive = socket2::SockRef::from(&own_socket(listen).unwrap())
            .recv_buffer_size()
            .unwrap();
        assert_eq!(receive, 2 * horde_transport::SOCKET_BUFFER.min(rmem_max()));
        cancel.cancel();
        node.stopped().await;
    }

    #[test]
    fn a_port_no_socket_of_the_process_is_bound_to_is_not_found() {
        // Bound, then closed: nothing of this process holds the port now.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let error = enlarge_receive_buffer(SocketAddr::from(([127, 0, 0, 1], port))).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
    }

    #[test]
    // The kernel prints native-endian words; these literals are a little-endian machine's.
    #[cfg(target_endian = "little")]
    fn the_table_is_read_by_address_port_and_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
              1: 0100007F:C8F4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
              2: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 77 2 0000000000000000 0\n\
              3: 0200007F:C8F4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 0\n\
              4: garbage\n";
        let at = |ip: [u8; 4], port| SocketAddr::from((ip, port));
        assert_eq!(
            inodes_bound_to(table, at([127, 0, 0, 1], 0xC8F4)),
            vec![4242]
        );
        assert_eq!(inodes_bound_to(table, at([127, 0, 0, 2], 0xC8F4)), vec![99]);
        // A socket on the unspecified address holds the port on every address.
        assert_eq!(inodes_bound_to(table, at([127, 0, 0, 1], 53)), vec![77]);
        assert!(inodes_bound_to(table, at([127, 0, 0, 1], 1)).is_empty());
        assert_eq!(table_ip("0100007F"), Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(
            table_ip("00000000000000000000000001000000"),
            Some(IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
        );
    }
}
