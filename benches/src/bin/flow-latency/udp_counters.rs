//! The kernel's UDP counters (`/proc/net/snmp`, `Udp:`) read around each bulk transfer: the
//! errors `RcvbufErrors` and `SndbufErrors` (a datagram dropped at a full receive buffer halves
//! the sender's congestion window, and a send refused by a full send buffer makes the sender
//! wait for the socket: benches/RESULTS.md, "UDP socket buffers"), and `InDatagrams` /
//! `OutDatagrams`, which count what a socket received and sent (a GSO send and a GRO
//! super-datagram count once each), so their number per GiB says how well the offloads batch on
//! each path. The counters are per network namespace: the file is opened once on each side and
//! re-read, and keeps the namespace it was opened in.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};

use anyhow::Context as _;

/// The UDP counters of one namespace at one moment, or their rise summed over a row: the errors
/// `RcvbufErrors` and `SndbufErrors`, `InDatagrams` / `OutDatagrams` of the clients' namespace
/// and, across veth, the servers'.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UdpCounts {
    pub(crate) receive_buffer: u64,
    pub(crate) send_buffer: u64,
    pub(crate) in_datagrams: u64,
    pub(crate) out_datagrams: u64,
    pub(crate) server_in: u64,
    pub(crate) server_out: u64,
}

impl UdpCounts {
    /// What rose from `before` to `self`.
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            receive_buffer: self.receive_buffer.saturating_sub(before.receive_buffer),
            send_buffer: self.send_buffer.saturating_sub(before.send_buffer),
            in_datagrams: self.in_datagrams.saturating_sub(before.in_datagrams),
            out_datagrams: self.out_datagrams.saturating_sub(before.out_datagrams),
            server_in: self.server_in.saturating_sub(before.server_in),
            server_out: self.server_out.saturating_sub(before.server_out),
        }
    }

    /// Adds `rise` to these sums.
    fn add(&mut self, rise: Self) {
        self.receive_buffer += rise.receive_buffer;
        self.send_buffer += rise.send_buffer;
        self.in_datagrams += rise.in_datagrams;
        self.out_datagrams += rise.out_datagrams;
        self.server_in += rise.server_in;
        self.server_out += rise.server_out;
    }
}

/// `/proc/net/snmp` of the namespace the file was opened in, re-read for each [`UdpCounts`].
pub(crate) struct UdpSnmpFile {
    snmp: File,
}

impl UdpSnmpFile {
    /// Opens the calling thread's namespace's counters.
    pub(crate) fn open() -> anyhow::Result<Self> {
        let snmp = File::open("/proc/thread-self/net/snmp").context("opening the UDP counters")?;
        Ok(Self { snmp })
    }

    /// The counters now.
    pub(crate) fn read(&mut self) -> anyhow::Result<UdpCounts> {
        self.snmp.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        self.snmp.read_to_string(&mut text)?;
        parse(&text).context("no Udp: lines in /proc/net/snmp")
    }
}

/// The `Udp:` counters from the text of `/proc/net/snmp` (a `Udp:` line of names, then one of
/// values); the servers' datagram counts are left at 0.
fn parse(text: &str) -> Option<UdpCounts> {
    let mut lines = text.lines().filter(|line| line.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = names.iter().position(|n| *n == name)?;
        values.get(at)?.parse().ok()
    };
    Some(UdpCounts {
        receive_buffer: field("RcvbufErrors")?,
        send_buffer: field("SndbufErrors")?,
        in_datagrams: field("InDatagrams")?,
        out_datagrams: field("OutDatagrams")?,
        server_in: 0,
        server_out: 0,
    })
}

/// The UDP counters of the clients' namespace and, across a veth pair, of the servers'.
pub(crate) struct Counters {
    pub(crate) clients: UdpSnmpFile,
    /// `None` when servers and clients share the namespace.
    pub(crate) servers: Option<UdpSnmpFile>,
}

impl Counters {
    /// Receive-buffer drops on the clients' side, send-buffer refusals on the servers'.
    fn read(&mut self) -> anyhow::Result<UdpCounts> {
        let clients = self.clients.read()?;
        let servers = self.servers.as_mut().map(UdpSnmpFile::read).transpose()?;
        Ok(UdpCounts {
            send_buffer: servers.map_or(clients.send_buffer, |servers| servers.send_buffer),
            server_in: servers.map_or(0, |servers| servers.in_datagrams),
            server_out: servers.map_or(0, |servers| servers.out_datagrams),
            ..clients
        })
    }

    /// Runs `transfer` and adds the counters' rise over it to `sum`.
    pub(crate) async fn around<T>(
        &mut self,
        sum: &mut UdpCounts,
        transfer: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let before = self.read()?;
        let result = transfer.await?;
        sum.add(self.read()?.since(before));
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_udp_lines_not_udplite() {
        let text = "Tcp: RtoAlgorithm InSegs\nTcp: 1 5\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            Udp: 35 0 0 36 7 3\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            UdpLite: 0 0 0 0 9 9\n";
        let errors = parse(text).unwrap();
        assert_eq!((errors.receive_buffer, errors.send_buffer), (7, 3));
        assert_eq!((errors.in_datagrams, errors.out_datagrams), (35, 36));
        assert!(parse("Tcp: a\nTcp: 1\n").is_none());
    }

    #[test]
    fn reads_this_machine() {
        UdpSnmpFile::open().unwrap().read().unwrap();
    }
}
