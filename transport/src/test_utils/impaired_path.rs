//! A UDP relay on `127.0.0.1` between one client and one server that impairs the path the way
//! `tc netem` and `nft` would on a real link, without privileges: random loss (seeded, so a run
//! is repeatable), duplication, delay with jitter (which reorders), a size cap that silently
//! drops larger datagrams (an MTU black hole), and blackouts (a cut cable).
//!
//! The client dials [`ImpairedPath::addr`] instead of the server; the server sees the relay's
//! own socket as the client. Impairments apply to both directions and can be changed at any
//! time with [`ImpairedPath::set`], or at a given datagram with [`ImpairedPath::set_after`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;

/// Largest datagram relayed: the UDP maximum.
const MAX_DATAGRAM: usize = 65_535;

/// How a path is impaired. The default is a clean path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Probability that a datagram is dropped (0.0–1.0).
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Extra delay, uniform in `0..jitter`, per datagram: datagrams overtake each other.
    pub jitter: Duration,
    /// Datagrams larger than this are dropped without a word (no ICMP), as by
    /// `nft … meta length > N drop`.
    pub max_datagram: Option<usize>,
    /// Nothing gets through.
    pub blackout: bool,
}

/// Datagrams the relay saw, per fate.
#[derive(Debug, Default)]
pub struct PathCounts {
    /// Delivered (a duplicate counts twice).
    pub delivered: AtomicU64,
    /// Dropped by loss, the size cap or a blackout.
    pub dropped: AtomicU64,
}

/// The impairment in force, and the next one with the delivered count it starts at.
#[derive(Debug, Default)]
struct Impairments {
    now: Impairment,
    next: Option<(u64, Impairment)>,
}

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct ImpairedPath {
    addr: SocketAddr,
    impairment: Arc<Mutex<Impairments>>,
    counts: Arc<PathCounts>,
    _tasks: JoinSet<()>,
}

impl ImpairedPath {
    /// A clean relay in front of `server`; `seed` makes its random choices repeatable.
    pub async fn start(server: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        let back = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
        back.connect(server).await?;
        let addr = front.local_addr()?;
        let impairment = Arc::new(Mutex::new(Impairments::default()));
        let counts = Arc::new(PathCounts::default());
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let mut tasks = JoinSet::new();
        // Client → server.
        {
            let (front, back) = (Arc::clone(&front), Arc::clone(&back));
            let relay = Relay::new(&impairment, &counts, seed);
            let client = Arc::clone(&client);
            tasks.spawn(async move {
                let mut buffer = vec![0u8; MAX_DATAGRAM];
                while let Ok((len, from)) = front.recv_from(&mut buffer).await {
                    *client.lock().unwrap_or_else(PoisonError::into_inner) = Some(from);
                    relay.forward(&buffer[..len], Arc::clone(&back), None);
                }
            });
        }
        // Server → client.
        {
            let back = Arc::clone(&back);
            let relay = Relay::new(&impairment, &counts, seed ^ 0x9e37_79b9_7f4a_7c15);
            tasks.spawn(async move {
                let mut buffer = vec![0u8; MAX_DATAGRAM];
                while let Ok(len) = back.recv(&mut buffer).await {
                    let to = *client.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(to) = to {
                        relay.forward(&buffer[..len], Arc::clone(&front), Some(to));
                    }
                }
            });
        }
        Ok(Self {
            addr,
            impairment,
            counts,
            _tasks: tasks,
        })
    }

    /// The address to dial instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Impairs the path from now on (and forgets a pending [`Self::set_after`]).
    pub fn set(&self, impairment: Impairment) {
        *self
            .impairment
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Impairments {
            now: impairment,
            next: None,
        };
    }

    /// Impairs the path once it has delivered `datagrams` more datagrams than now. The relay
    /// switches itself between two datagrams, so a fast transfer cannot end before the switch,
    /// however late the test's own task runs.
    pub fn set_after(&self, datagrams: u64, impairment: Impairment) {
        let at = self.counts.delivered.load(Ordering::Relaxed) + datagrams;
        self.impairment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next = Some((at, impairment));
    }

    /// Waits until the impairment given to [`Self::set_after`] is in force.
    pub async fn switched(&self) {
        while self
            .impairment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// What the relay has done so far.
    pub fn counts(&self) -> &PathCounts {
        &self.counts
    }
}

/// One direction of the relay.
struct Relay {
    impairment: Arc<Mutex<Impairments>>,
    counts: Arc<PathCounts>,
    random: Mutex<u64>,
}

impl Relay {
    fn new(impairment: &Arc<Mutex<Impairments>>, counts: &Arc<PathCounts>, seed: u64) -> Self {
        Self {
            impairment: Arc::clone(impairment),
            counts: Arc::clone(counts),
            // xorshift64* needs a non-zero state.
            random: Mutex::new(seed | 1),
        }
    }

    /// A uniform number in `[0, 1)` (xorshift64*).
    fn uniform(&self) -> f64 {
        let mut state = self.random.lock().unwrap_or_else(PoisonError::into_inner);
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let value = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (value >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Sends `datagram` on `socket` (to `to`, or its connected peer), as impaired now.
    fn forward(&self, datagram: &[u8], socket: Arc<UdpSocket>, to: Option<SocketAddr>) {
        let impairment = {
            let mut impairments = self
                .impairment
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let delivered = self.counts.delivered.load(Ordering::Relaxed);
            if let Some((_, next)) = impairments.next.take_if(|(at, _)| delivered >= *at) {
                impairments.now = next;
            }
            impairments.now.clone()
        };
        let too_large = impairment
            .max_datagram
            .is_some_and(|max| datagram.len() > max);
        if impairment.blackout || too_large || self.uniform() < impairment.loss {
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let copies = if self.uniform() < impairment.duplicate {
            2
        } else {
            1
        };
        self.counts.delivered.fetch_add(copies, Ordering::Relaxed);
        let delay = impairment.delay + impairment.jitter.mul_f64(self.uniform());
        if delay.is_zero() {
            // In order, without a task per datagram. A full socket buffer drops the datagram,
            // as a congested link would.
            for _ in 0..copies {
                let _ = match to {
                    Some(to) => socket.try_send_to(datagram, to),
                    None => socket.try_send(datagram),
                };
            }
            return;
        }
        let datagram = datagram.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for _ in 0..copies {
                let _ = match to {
                    Some(to) => socket.send_to(&datagram, to).await,
                    None => socket.send(&datagram).await,
                };
            }
        });
    }
}
