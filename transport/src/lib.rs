//! horde-transport: the QUIC layer of horde.
//!
//! Every horde link is a QUIC connection (quinn) authenticated by mutual TLS 1.3 where the
//! certificate key *is* the node's ed25519 hotkey. This crate turns a [`SecretKey`] into a tuned
//! QUIC endpoint, dials peers by hotkey, and carries typed, length-prefixed postcard messages over
//! bidirectional streams.
//!
//! Main types:
//! - [`HordeEndpoint`]: a bound quinn endpoint with our identity, a cap on incoming connections
//!   and on those of any one hotkey, and explicit flow-control limits ([`TransportTuning`]).
//!   [`HordeEndpoint::connect`] dials a hotkey, [`HordeEndpoint::accept`] yields authenticated
//!   connections.
//! - [`HotkeyServerVerifier`] / [`HotkeyClientVerifier`]: the rustls verifiers that accept exactly
//!   one self-signed ed25519 certificate and bind it to a hotkey; [`remote_hotkey`] reads the
//!   peer's identity from a connection.
//! - [`FramedSend`] / [`FramedRecv`]: typed frame channels (`u32` BE length + postcard) over a
//!   QUIC stream, with the length checked before allocating.
//! - [`JobSession`]: one bidirectional stream per job per hop, carrying [`ControlMessage`]s.
//! - [`ConnectionCache`]: the dialer; [`serve_connections`]: the accept loop.
//!
//! Layout:
//! - `tls.rs`: certificates, server-name convention, verifiers, rustls configs (the ALPNs live
//!   in [`horde_protocol::wire`] and are re-exported here).
//! - `endpoint.rs`: [`EndpointConfig`], [`TransportTuning`], [`HordeEndpoint`].
//! - `admission.rs`: [`AdmissionLimits`], [`KnownKeys`]: admission that favours known keys
//!   (unknown ones bounded per source address and in total, closed when they open no stream).
//! - `accept.rs`: [`serve_connections`] / [`HordeEndpoint::serve`], the accept loop that owns
//!   one task per incoming connection.
//! - `closing.rs`: [`close_promptly`], [`close_endpoint_promptly`]: closing a one-shot
//!   command's connections without waiting out QUIC's draining period.
//! - `dialer.rs`: [`ConnectionCache`], one shared connection (and one dial in flight) per peer
//!   hotkey and ALPN.
//! - `framed.rs`: the framed channels and the cancel-safe frame reader.
//! - `peer_quota.rs`: [`PeerQuota`], a per-hotkey share of a shared limit (connections here,
//!   transfer slots in the storage role).
//! - `session.rs`: [`open_session`], [`accept_stream`] (or [`accept_framed_stream`] then
//!   [`read_first_message`]), [`JobSession`].
//! - `blob.rs` + `blob/`: the `horde/blob/1` protocol ([`blob`]): `serve.rs`, `get.rs`,
//!   `verify.rs`, `sink.rs`, `put.rs`, `buffer.rs`.
//! - `tunnel.rs` + `tunnel/`: the `horde/job/1` job tunnel ([`tunnel`]): `wire.rs`, `server.rs`,
//!   `client.rs`, `request.rs` (one streamed HTTP request, exact body bytes), `forward.rs`.
//! - `udp.rs`: the socket under every endpoint, keeping each segmentation-offload send within
//!   64 KiB so MTU discovery may go up to [`MAX_UDP_PAYLOAD`] (jumbo frames, loopback).
//! - `spin.rs`: [`spin`], the tunnel relays' busy-poll of their sockets before they sleep.
//! - `http.rs`: [`http`], the one HTTP/1.1 head and body-framing parser (on `httparse`).
//! - `test_utils.rs` + `test_utils/impaired_path.rs`, `test_utils/small_disk.rs` (feature
//!   `test-utils`): seeded keys, an endpoint pair on `127.0.0.1:0`, an impaired UDP path, a
//!   small tmpfs for full-disk tests.
//! - [`codes`] (here): the application error codes of [`horde_protocol::wire::codes`] as
//!   `quinn::VarInt`s.
//!
//! [`SecretKey`]: horde_protocol::SecretKey
//! [`ControlMessage`]: horde_protocol::ControlMessage

#![deny(missing_docs)]

mod accept;
mod admission;
pub mod blob;
mod closing;
mod dialer;
mod endpoint;
mod framed;
pub mod http;
mod peer_quota;
mod session;
pub mod spin;
mod tls;
pub mod tunnel;
mod udp;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use accept::{DEFAULT_SHUTDOWN_GRACE, serve_connections};
pub use admission::{
    AdmissionLimits, FIRST_STREAM_TIMEOUT, KnownKeys, UNKNOWN_PER_ADDRESS_DIVISOR,
    UNKNOWN_SHARE_DIVISOR,
};
pub use closing::{
    CLOSE_SEND_TIMEOUT, ENDPOINT_CLOSE_GRACE, close_endpoint_promptly, close_promptly,
};
pub use dialer::{ConnectionCache, DEFAULT_MAX_PEERS, DialError};
pub use endpoint::{
    AcceptError, ConfigError, ConnectError, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER, EndpointConfig, HANDSHAKE_TIMEOUT, HordeEndpoint,
    IncomingConnection, KEEP_ALIVE_INTERVAL, MAX_CONCURRENT_BIDI_STREAMS,
    MAX_CONCURRENT_UNI_STREAMS, MAX_IDLE_TIMEOUT, RECEIVE_BUFFER_BUDGET, RECEIVE_WINDOW,
    SEND_WINDOW, STREAM_RECEIVE_WINDOW, TransportTuning, transport_config,
};
pub use framed::{ChannelError, FrameReader, FramedRecv, FramedSend, split};
pub use peer_quota::{PeerPermit, PeerQuota};
pub use session::{
    FIRST_FRAME_TIMEOUT, JobSession, SessionError, accept_framed_stream, accept_stream,
    open_session, read_first_message,
};
pub use tls::{
    ALPN_BLOB, ALPN_CONTROL, ALPN_JOB, CERTIFICATE_VALIDITY_BACKDATE, CERTIFICATE_VALIDITY_PERIOD,
    ClientPolicy, HotkeyClientVerifier, HotkeyServerVerifier, PeerCertificateError, TlsError,
    client_tls_config, default_validity, hotkey_from_server_name, parse_certificate_hotkey,
    remote_hotkey, self_signed_certificate, server_name_for, server_tls_config,
};
pub use udp::{MAX_UDP_PAYLOAD, SOCKET_BUFFER, enlarge_receive_buffer};

/// QUIC application error codes horde uses when it closes a connection or stops/resets a stream:
/// [`horde_protocol::wire::codes`] as [`quinn::VarInt`]s.
///
/// The numbers are part of the wire protocol: append new ones there, never renumber.
pub mod codes {
    use horde_protocol::wire::codes as wire;
    use quinn::VarInt;

    /// Orderly shutdown: the node or the job is going away, nothing went wrong.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(wire::SHUTDOWN);
    /// The peer sent something the protocol does not allow (bad frame, undecodable message,
    /// unexpected first message).
    pub const PROTOCOL_VIOLATION: VarInt = VarInt::from_u32(wire::PROTOCOL_VIOLATION);
    /// The peer announced a frame larger than the cap.
    pub const FRAME_TOO_LARGE: VarInt = VarInt::from_u32(wire::FRAME_TOO_LARGE);
    /// The job this stream belonged to was cancelled or ended; the stream is no longer wanted.
    pub const CANCELLED: VarInt = VarInt::from_u32(wire::CANCELLED);
    /// The peer is authenticated but not allowed here (wrong role, wrong ALPN use).
    pub const NOT_ALLOWED: VarInt = VarInt::from_u32(wire::NOT_ALLOWED);
    /// The node is at capacity for this kind of work.
    pub const BUSY: VarInt = VarInt::from_u32(wire::BUSY);
    /// A local failure unrelated to the peer's behaviour.
    pub const INTERNAL: VarInt = VarInt::from_u32(wire::INTERNAL);
    /// The stream made no progress within its deadline: the peer sent nothing, or read nothing
    /// of what we sent, for that long. The stream is given up; its resources are released.
    pub const TIMED_OUT: VarInt = VarInt::from_u32(wire::TIMED_OUT);
    /// The node has no room for the data (disk full, quota or file size limit reached); the
    /// request itself was fine.
    pub const STORAGE_FULL: VarInt = VarInt::from_u32(wire::STORAGE_FULL);
    /// The peer's key already holds its share of this node's connections
    /// (`max_connections_per_peer`); the extra connection is closed right after its handshake.
    /// Close one, or retry later.
    pub const TOO_MANY_CONNECTIONS: VarInt = VarInt::from_u32(wire::TOO_MANY_CONNECTIONS);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every source file is named in the `//!` layout list, and every file the list names
    /// exists.
    #[test]
    fn the_layout_list_matches_the_files() {
        let doc: String = include_str!("lib.rs")
            .lines()
            .take_while(|line| line.starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        let layout = &doc[doc.find("Layout:").expect("a layout list")..];
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|ext| ext == "rs") {
                    files.push(path);
                }
            }
        }
        for file in &files {
            let name = file.file_name().unwrap().to_str().unwrap();
            if name != "lib.rs" {
                assert!(
                    layout.contains(&format!("`{name}`")) || layout.contains(&format!("/{name}`")),
                    "{name} missing from the layout list"
                );
            }
        }
        for named in layout.split('`').skip(1).step_by(2) {
            if let Some(name) = named.strip_suffix(".rs") {
                let name = format!("{}.rs", name.rsplit('/').next().unwrap());
                assert!(
                    files
                        .iter()
                        .any(|file| file.file_name().unwrap().to_str() == Some(&name)),
                    "the layout names {named}, which does not exist"
                );
            }
        }
    }
}
