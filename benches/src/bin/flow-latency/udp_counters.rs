//! The kernel's UDP error counters (`/proc/net/snmp`, `Udp:` `RcvbufErrors` and `SndbufErrors`)
//! read around each bulk transfer: a datagram dropped at a full receive buffer halves the
//! sender's congestion window, and a send refused by a full send buffer makes the sender wait
//! for the socket (benches/RESULTS.md, "UDP socket buffers"). The counters are per network
//! namespace: the file is opened once on each side and re-read, and keeps the namespace it was
//! opened in.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};

use anyhow::Context as _;

/// `RcvbufErrors` and `SndbufErrors` of one namespace at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UdpErrors {
    pub(crate) receive_buffer: u64,
    pub(crate) send_buffer: u64,
}

impl UdpErrors {
    /// What rose from `before` to `self`.
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            receive_buffer: self.receive_buffer.saturating_sub(before.receive_buffer),
            send_buffer: self.send_buffer.saturating_sub(before.send_buffer),
        }
    }
}

/// The counters of the namespace the file was opened in.
pub(crate) struct UdpCounters {
    snmp: File,
}

impl UdpCounters {
    /// Opens the calling thread's namespace's counters.
    pub(crate) fn open() -> anyhow::Result<Self> {
        let snmp = File::open("/proc/thread-self/net/snmp").context("opening the UDP counters")?;
        Ok(Self { snmp })
    }

    /// The counters now.
    pub(crate) fn read(&mut self) -> anyhow::Result<UdpErrors> {
        self.snmp.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        self.snmp.read_to_string(&mut text)?;
        parse(&text).context("no Udp: lines in /proc/net/snmp")
    }
}

/// `RcvbufErrors` and `SndbufErrors` from the text of `/proc/net/snmp` (a `Udp:` line of names,
/// then one of values).
fn parse(text: &str) -> Option<UdpErrors> {
    let mut lines = text.lines().filter(|line| line.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let at = names.iter().position(|n| *n == name)?;
        values.get(at)?.parse().ok()
    };
    Some(UdpErrors {
        receive_buffer: field("RcvbufErrors")?,
        send_buffer: field("SndbufErrors")?,
    })
}

/// The UDP error counters of the clients' namespace and, across a veth pair, of the servers'.
pub(crate) struct Counters {
    pub(crate) clients: UdpCounters,
    /// `None` when servers and clients share the namespace.
    pub(crate) servers: Option<UdpCounters>,
}

impl Counters {
    /// Receive-buffer drops on the clients' side, send-buffer refusals on the servers'.
    fn read(&mut self) -> anyhow::Result<UdpErrors> {
        let clients = self.clients.read()?;
        let send_buffer = match &mut self.servers {
            Some(servers) => servers.read()?.send_buffer,
            None => clients.send_buffer,
        };
        Ok(UdpErrors {
            receive_buffer: clients.receive_buffer,
            send_buffer,
        })
    }

    /// Runs `transfer` and adds the counters' rise over it to `sum`.
    pub(crate) async fn around<T>(
        &mut self,
        sum: &mut UdpErrors,
        transfer: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let before = self.read()?;
        let result = transfer.await?;
        let rise = self.read()?.since(before);
        sum.receive_buffer += rise.receive_buffer;
        sum.send_buffer += rise.send_buffer;
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
        assert!(parse("Tcp: a\nTcp: 1\n").is_none());
    }

    #[test]
    fn reads_this_machine() {
        UdpCounters::open().unwrap().read().unwrap();
    }
}
