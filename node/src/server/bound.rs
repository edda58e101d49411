//! The addresses a node bound, kept in its data dir (`bound.toml`): a node configured with port 0
//! binds any free port on its first start and the same port again on later starts, so peers and
//! bootstrap lists naming it stay valid; a harness reads the file to learn the ports without
//! choosing them itself (choosing a free port and handing it to a process is a race).

use std::net::SocketAddr;
use std::path::Path;

use tracing::warn;

/// The file, in the node's data dir.
pub const BOUND_FILE: &str = "bound.toml";

/// What a node bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundAddrs {
    /// The QUIC endpoint.
    pub listen: SocketAddr,
    /// The discovery (libp2p QUIC) listener, when discovery runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<SocketAddr>,
}

impl BoundAddrs {
    /// Reads `data_dir/bound.toml`; `None` when it is missing or unreadable.
    pub fn read(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(data_dir.join(BOUND_FILE)).ok()?;
        toml::from_str(&text).ok()
    }

    /// Writes `data_dir/bound.toml` (atomically).
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        crate::atomic_file::write_atomically(&data_dir.join(BOUND_FILE), text.as_bytes(), 0o644)
    }
}

/// The address to bind: `configured`, or when its port is 0, the port bound last time
/// (`earlier`) on the same IP.
pub fn reuse(configured: SocketAddr, earlier: Option<SocketAddr>) -> SocketAddr {
    match earlier {
        Some(earlier) if configured.port() == 0 && earlier.ip() == configured.ip() => earlier,
        _ => configured,
    }
}

/// Binds `configured` (or the earlier port, see [`reuse`]) with `bind`; when the earlier port is
/// taken now, binds `configured` as given (a fresh port) and says so.
pub fn bind_reusing<T, E: std::fmt::Display>(
    what: &str,
    configured: SocketAddr,
    earlier: Option<SocketAddr>,
    mut bind: impl FnMut(SocketAddr) -> Result<T, E>,
) -> Result<T, E> {
    let wanted = reuse(configured, earlier);
    match bind(wanted) {
        Err(error) if wanted != configured => {
            warn!(%wanted, %error, "{what}: the port bound last time is taken; binding a new one");
            bind(configured)
        }
        result => result,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn port_zero_reuses_the_earlier_port_and_the_file_round_trips() {
        let zero: SocketAddr = ([127, 0, 0, 1], 0).into();
        let earlier: SocketAddr = ([127, 0, 0, 1], 4321).into();
        assert_eq!(reuse(zero, Some(earlier)), earlier);
        assert_eq!(reuse(zero, None), zero);
        // A fixed port in the config wins; another IP is not reused.
        let fixed: SocketAddr = ([127, 0, 0, 1], 5000).into();
        assert_eq!(reuse(fixed, Some(earlier)), fixed);
        assert_eq!(reuse(([127, 0, 0, 2], 0).into(), Some(earlier)).port(), 0);

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(BoundAddrs::read(dir.path()), None);
        let bound = BoundAddrs {
            listen: earlier,
            discovery: Some(fixed),
        };
        bound.write(dir.path()).unwrap();
        assert_eq!(BoundAddrs::read(dir.path()), Some(bound));
        std::fs::write(dir.path().join(BOUND_FILE), "garbage").unwrap();
        assert_eq!(BoundAddrs::read(dir.path()), None);
    }

    #[test]
    fn a_taken_earlier_port_falls_back_to_a_fresh_one() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let earlier = taken.local_addr().unwrap();
        let zero: SocketAddr = ([127, 0, 0, 1], 0).into();
        let socket = bind_reusing("test", zero, Some(earlier), std::net::UdpSocket::bind).unwrap();
        assert_ne!(socket.local_addr().unwrap(), earlier);
        drop(taken);
        drop(socket);
        // Free again: reused.
        let socket = bind_reusing("test", zero, Some(earlier), std::net::UdpSocket::bind).unwrap();
        assert_eq!(socket.local_addr().unwrap(), earlier);
    }
}
