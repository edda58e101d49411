//! The runtime a latency-sensitive client runs its job connections on: one thread for every hop,
//! spinning briefly before it sleeps.

use tokio::runtime::{Builder, Runtime};

/// A current-thread tokio runtime like the one `horde job forward` runs on: one thread carries
/// every hop of a job connection (the application's task, the tunnel stream, quinn's connection,
/// the UDP socket), so no wake-up crosses threads; with `spin`, it also polls its sockets for up
/// to `HORDE_SPIN_US` (default [`horde_transport::spin::DEFAULT_SPIN_WINDOW`], `0` = off) before
/// it sleeps, where a CPU is free, so an answer arriving soon finds it awake
/// ([`horde_transport::spin`]). Spinning is per process and decided by the first call that asks
/// for it; it watches the endpoints bound after that call.
///
/// Measured on two vCPUs (`flow-latency`, benches/RESULTS.md "Spins that give way, and a client
/// runtime that spins"): a keep-alive round trip to a job took 1.15–1.30× as long as the same
/// request through nginx with mutual TLS from a client on a 2-worker runtime, and 0.54–0.82× on
/// this runtime (0.99–1.44× with spinning off everywhere).
pub fn one_thread_runtime(spin: bool) -> std::io::Result<Runtime> {
    if spin {
        horde_transport::spin::enable(horde_transport::spin::configured_window());
    }
    let mut builder = Builder::new_current_thread();
    builder.enable_all();
    if spin {
        builder.on_thread_park(horde_transport::spin::before_park);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A loopback echo on both runtimes: one that spins still sleeps and wakes as a runtime must
    /// (a spin that never ended, or a park that missed its wake-up, would hang here).
    #[test]
    fn both_runtimes_carry_a_round_trip() {
        for spin in [false, true] {
            let runtime = one_thread_runtime(spin).unwrap();
            let echoed = runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let server = tokio::spawn(async move {
                    let (mut tcp, _) = listener.accept().await.unwrap();
                    let mut buffer = [0u8; 5];
                    tcp.read_exact(&mut buffer).await.unwrap();
                    // An answer that comes after a timer, not a socket: the spin must end.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    tcp.write_all(&buffer).await.unwrap();
                });
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.write_all(b"hello").await.unwrap();
                let mut answer = [0u8; 5];
                tcp.read_exact(&mut answer).await.unwrap();
                server.await.unwrap();
                answer
            });
            assert_eq!(&echoed, b"hello", "spin {spin}");
        }
    }
}
