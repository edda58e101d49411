//! Busy-polling before a thread sleeps, for the relays on a tunnel's path (`horde job forward`
//! and the job endpoint's thread).
//!
//! A keep-alive round trip through the tunnel crosses more processes than one through an
//! nginx proxy, and on a virtual machine each wake-up of a sleeping thread costs tens of
//! microseconds: the round trip's time is mostly wake-ups (benches/RESULTS.md). A relay that
//! expects an answer soon can keep its CPU for a short window instead of sleeping, and see the
//! answer arrive without being woken. [`before_park`] is that window: installed as a
//! current-thread runtime's `on_thread_park` hook, it polls the sockets registered with
//! [`watch`] until one is readable or the window has passed, then lets the runtime sleep as
//! usual (which returns at once when something arrived). The window bounds the CPU it costs:
//! at most one window each time the thread would sleep.
//!
//! A spin only pays when the answer comes on a watched socket. It does not end for a wake-up
//! from another thread (a dial through the process runner's bridge) or a timer; code that
//! waits for one says so with [`hold`], and after [`MISSES_BEFORE_BACKING_OFF`] spins in a row
//! that saw nothing, only every [`PROBE_EVERY`]th sleep spins until one sees something again.
//! While spinning the thread yields, so a process woken on its CPU (the job answering) runs at
//! once instead of waiting for the spinner's time slice to end.
//!
//! A spin does not take a CPU several others wait for: it does not start, and it ends, while
//! more threads are runnable than the process has CPUs plus one (the kernel's count,
//! `/proc/loadavg`), as in a bulk transfer, where every process on the path has work. One
//! thread waiting is allowed: that is the job just woken by the request, which the spin's
//! yields let run.
//!
//! A process may also spin only while it relays something ([`only_while_relaying`], the
//! executor's job endpoint): between two tunnel streams nothing it waits for is near, and on
//! two vCPUs its spin took a CPU from the processes setting up the next connection (a new
//! connection through `forward` cost +0.08 ms with the executor spinning, nothing with only
//! `forward` spinning; benches/RESULTS.md).
//!
//! Off unless [`enable`] was called (the window comes from `HORDE_SPIN_US` when set).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::event::epoll;

/// The window a relay spins before it sleeps when `HORDE_SPIN_US` does not say.
pub const DEFAULT_SPIN_WINDOW: Duration = Duration::from_micros(100);

/// Spins in a row that saw nothing, after which [`before_park`] backs off.
pub const MISSES_BEFORE_BACKING_OFF: u32 = 2;

/// While backed off, one sleep in this many still spins, to notice answers coming back.
pub const PROBE_EVERY: u32 = 16;

/// How a spin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spin {
    /// A watched socket became readable.
    Readable,
    /// The window passed with nothing readable.
    Nothing,
    /// At least two threads waited for a CPU ([`CROWDED_CHECKS`] checks in a row), or the spin
    /// was not started for that.
    Crowded,
}

/// Checks in a row (one every [`CROWDED_CHECK_EVERY`] polls) that see the CPUs crowded before a
/// spin gives up its CPU.
pub const CROWDED_CHECKS: u32 = 2;

/// Sockets to poll for readability, and how long to poll them.
#[derive(Debug)]
pub struct SpinSet {
    /// The watched sockets, level-triggered for readability.
    epoll: OwnedFd,
    window: Duration,
    /// The kernel's count of runnable threads, where it can be read.
    runnable: Option<Runnable>,
    /// Waits for something no watched socket brings ([`hold`]) now in progress.
    holds: AtomicU32,
    /// Spin only while [`Self::relays`] is above zero ([`only_while_relaying`]).
    gated: AtomicBool,
    /// What the process relays now ([`relaying`]).
    relays: AtomicU32,
    /// Spins in a row that saw nothing.
    misses: AtomicU32,
    /// Sleeps without a spin since backing off.
    skipped: AtomicU32,
}

impl SpinSet {
    /// An empty set that polls for `window`.
    pub fn new(window: Duration) -> std::io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        Ok(Self {
            epoll,
            window,
            runnable: Runnable::open(),
            holds: AtomicU32::new(0),
            gated: AtomicBool::new(false),
            relays: AtomicU32::new(0),
            misses: AtomicU32::new(0),
            skipped: AtomicU32::new(0),
        })
    }

    /// Adds `socket`; it leaves the set by itself when it is closed.
    pub fn watch(&self, socket: impl AsFd) -> std::io::Result<()> {
        epoll::add(
            &self.epoll,
            socket,
            epoll::EventData::new_u64(0),
            epoll::EventFlags::IN,
        )?;
        Ok(())
    }

    /// Whether at least two runnable threads wait for a CPU (never, where the count cannot be
    /// read).
    fn crowded(&self) -> bool {
        self.runnable.as_ref().is_some_and(Runnable::crowded)
    }

    /// Polls the sockets until one is readable, the window has passed, or other threads need
    /// the CPU; not at all while they do.
    pub fn spin(&self) -> Spin {
        if self.crowded() {
            return Spin::Crowded;
        }
        let started = Instant::now();
        let mut events = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }];
        let mut crowded = 0;
        for polls in 1u32.. {
            match epoll::wait(&self.epoll, &mut events[..], Some(&NO_WAIT)) {
                Ok(0) => {}
                Ok(_) => return Spin::Readable,
                // The set cannot be polled: sleep as usual.
                Err(_) => return Spin::Nothing,
            }
            if started.elapsed() >= self.window {
                return Spin::Nothing;
            }
            if polls % YIELD_EVERY == 0 {
                if polls % CROWDED_CHECK_EVERY == 0 {
                    if self.crowded() {
                        crowded += 1;
                        if crowded >= CROWDED_CHECKS {
                            return Spin::Crowded;
                        }
                    } else {
                        crowded = 0;
                    }
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Spin::Nothing
    }

    /// Spins before a sleep unless a [`hold`] is in progress or recent spins saw nothing (then
    /// one sleep in [`PROBE_EVERY`]); returns whether a socket became readable. A spin cut
    /// short (or not started) because the CPUs were crowded is not counted as one that saw
    /// nothing.
    pub fn spin_if_useful(&self) -> bool {
        if self.holds.load(Ordering::Relaxed) > 0
            || (self.gated.load(Ordering::Relaxed) && self.relays.load(Ordering::Relaxed) == 0)
        {
            return false;
        }
        if self.misses.load(Ordering::Relaxed) >= MISSES_BEFORE_BACKING_OFF
            && self.skipped.fetch_add(1, Ordering::Relaxed) + 1 < PROBE_EVERY
        {
            return false;
        }
        self.skipped.store(0, Ordering::Relaxed);
        match self.spin() {
            Spin::Readable => {
                self.misses.store(0, Ordering::Relaxed);
                true
            }
            Spin::Nothing => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                false
            }
            Spin::Crowded => false,
        }
    }
}

/// The kernel's count of runnable threads, all CPUs (the fourth field of `/proc/loadavg`,
/// `RUNNABLE/TOTAL`; read again with one `pread`, a few microseconds), against the machine's
/// online CPUs (the count covers them all, whatever this process's affinity or quota; inside a
/// container both are the host's).
#[derive(Debug)]
struct Runnable {
    loadavg: OwnedFd,
    cpus: u32,
}

impl Runnable {
    fn open() -> Option<Self> {
        let loadavg = rustix::fs::open(
            "/proc/loadavg",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()?;
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
        let runnable = Self {
            loadavg,
            cpus: cpus_in(&online)?,
        };
        // At least this thread runs: a count of zero is a `/proc` that does not count (some
        // sandboxes write a fixed line), where spins never give way.
        (runnable.count()? >= 1).then_some(runnable)
    }

    /// Runnable threads now, this one among them.
    fn count(&self) -> Option<u32> {
        let mut buffer = [0u8; 128];
        let read = rustix::io::pread(&self.loadavg, &mut buffer, 0).ok()?;
        runnable_in(buffer.get(..read)?)
    }

    /// More runnable threads than CPUs plus one (this one counted): at least two wait for a
    /// CPU.
    fn crowded(&self) -> bool {
        self.count()
            .is_some_and(|runnable| runnable > self.cpus.saturating_add(1))
    }
}

/// How many CPUs a kernel CPU list names (`0-3,6,8-9` is 7).
fn cpus_in(list: &str) -> Option<u32> {
    let mut cpus = 0u32;
    for part in list.trim().split(',') {
        cpus += match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (u32, u32) = (first.parse().ok()?, last.parse().ok()?);
                last.checked_sub(first)? + 1
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (cpus > 0).then_some(cpus)
}

/// The runnable count of a `/proc/loadavg` line (`0.52 0.58 0.59 3/467 12345`).
fn runnable_in(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let (runnable, _total) = line.split_ascii_whitespace().nth(3)?.split_once('/')?;
    runnable.parse().ok()
}

/// A count on the process's spin set ([`hold`]'s or [`relaying`]'s), raised while the guard
/// is alive; nothing when spinning is off.
#[derive(Debug)]
pub struct Counted(Option<&'static AtomicU32>);

impl Counted {
    fn raise(count: fn(&'static SpinSet) -> &'static AtomicU32) -> Self {
        match SPIN.get() {
            Some(Some(set)) => {
                let count = count(set);
                count.fetch_add(1, Ordering::Relaxed);
                Self(Some(count))
            }
            _ => Self(None),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// No spinning until the returned guard is dropped (a wait for another thread's answer, which
/// no watched socket brings).
pub fn hold() -> Counted {
    Counted::raise(|set| &set.holds)
}

/// Marks a relay in progress (a tunnel stream served) until the guard is dropped: where
/// [`only_while_relaying`] was called, spins need one.
pub fn relaying() -> Counted {
    Counted::raise(|set| &set.relays)
}

/// From now on this process spins only while a [`relaying`] guard is alive.
pub fn only_while_relaying() {
    if let Some(Some(set)) = SPIN.get() {
        set.gated.store(true, Ordering::Relaxed);
    }
}

/// Polls between two reads of the runnable count while spinning: a read formats all of
/// `/proc/loadavg` (a few microseconds; read at every yield it took about a tenth of a relay's
/// CPU in a profile of a keep-alive loop).
const CROWDED_CHECK_EVERY: u32 = 4 * YIELD_EVERY;

/// Polls between two yields of the CPU while spinning (a poll is a system call, about a
/// microsecond here): a process woken on the spinner's CPU (the job, the other relay) waits at
/// most that long. Spinning without yielding made the keep-alive round trip's p99 about 1 ms,
/// the scheduler's tick, on two vCPUs (benches/RESULTS.md).
const YIELD_EVERY: u32 = 8;

const NO_WAIT: rustix::event::Timespec = rustix::event::Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

static SPIN: OnceLock<Option<SpinSet>> = OnceLock::new();

/// The window `HORDE_SPIN_US` names (`0` turns spinning off), else [`DEFAULT_SPIN_WINDOW`].
pub fn configured_window() -> Duration {
    std::env::var("HORDE_SPIN_US")
        .ok()
        .and_then(|value| value.trim().parse().ok())
        .map_or(DEFAULT_SPIN_WINDOW, Duration::from_micros)
}

/// Turns spinning on for this process with `window` (a zero window leaves it off). The first
/// call decides; returns whether spinning is on.
pub fn enable(window: Duration) -> bool {
    SPIN.get_or_init(|| {
        if window.is_zero() {
            return None;
        }
        SpinSet::new(window).ok()
    })
    .is_some()
}

/// Adds `socket` to the sockets [`before_park`] watches (nothing when spinning is off).
pub fn watch(socket: impl AsFd) {
    if let Some(Some(spin)) = SPIN.get() {
        // A socket that cannot be watched is only not spun for.
        let _ = spin.watch(socket);
    }
}

/// Polls the watched sockets until one is readable or the window has passed (at once when
/// spinning is off). For `tokio::runtime::Builder::on_thread_park`.
pub fn before_park() {
    if let Some(Some(spin)) = SPIN.get() {
        spin.spin_if_useful();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set that does not read the runnable count: other tests running at the same time may
    /// crowd the CPUs, which these tests are not about.
    fn uncounted(window: Duration) -> SpinSet {
        SpinSet {
            runnable: None,
            ..SpinSet::new(window).unwrap()
        }
    }

    #[test]
    fn a_readable_socket_ends_the_spin_and_a_closed_one_leaves_the_set() {
        // A window no test run reaches: the spin can only end early because a socket is
        // readable.
        let set = uncounted(Duration::from_secs(3600));
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set.watch(&receiver).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .send_to(b"answer", receiver.local_addr().unwrap())
            .unwrap();
        assert_eq!(set.spin(), Spin::Readable);
        // Still readable (nothing was read): it ends at once again.
        assert_eq!(set.spin(), Spin::Readable);
        // Closed, it is out of the set: a short window passes with nothing readable.
        drop(receiver);
        let short = SpinSet {
            window: Duration::from_millis(1),
            ..set
        };
        assert_eq!(short.spin(), Spin::Nothing);
    }

    #[test]
    fn the_runnable_count_is_read_from_loadavg() {
        assert_eq!(runnable_in(b"0.52 0.58 0.59 3/467 12345\n"), Some(3));
        assert_eq!(runnable_in(b"0.52 0.58 0.59 12/4670 1\n"), Some(12));
        assert_eq!(runnable_in(b"0.52 0.58"), None);
        assert_eq!(runnable_in(b"0.52 0.58 0.59 x/4 1"), None);
        let runnable = Runnable::open().expect("/proc/loadavg readable");
        assert!(runnable.count().is_some_and(|n| n >= 1), "this thread runs");
        assert_eq!(cpus_in("0-1\n"), Some(2));
        assert_eq!(cpus_in("0-3,6,8-9"), Some(7));
        assert_eq!(cpus_in("0"), Some(1));
        assert_eq!(cpus_in("3-1"), None);
        assert_eq!(cpus_in(""), None);
    }

    /// Busy threads beyond the CPUs: a spin with a window no run reaches ends, saying why,
    /// instead of taking a CPU from them, and is not counted as one that saw nothing.
    #[test]
    fn a_spin_gives_way_while_other_threads_want_the_cpus() {
        let set = SpinSet::new(Duration::from_secs(30)).unwrap();
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set.watch(&receiver).unwrap();
        let cpus = set.runnable.as_ref().expect("/proc/loadavg readable").cpus;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy: Vec<_> = (0..=cpus + 1)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let ended = set.spin();
        let useful = (0..MISSES_BEFORE_BACKING_OFF + 1)
            .map(|_| set.spin_if_useful())
            .collect::<Vec<_>>();
        stop.store(true, Ordering::Relaxed);
        for thread in busy {
            thread.join().unwrap();
        }
        assert_eq!(ended, Spin::Crowded);
        assert_eq!(useful, vec![false; useful.len()]);
        // Not misses: spins that gave way do not back off the next ones.
        assert_eq!(set.misses.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn after_spins_that_saw_nothing_only_every_probe_spins() {
        let set = uncounted(Duration::from_micros(1));
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set.watch(&receiver).unwrap();
        for _ in 0..MISSES_BEFORE_BACKING_OFF {
            assert!(!set.spin_if_useful());
        }
        // Backed off: a datagram waiting is not seen until the probe.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .send_to(b"answer", receiver.local_addr().unwrap())
            .unwrap();
        for _ in 1..PROBE_EVERY {
            assert!(!set.spin_if_useful());
        }
        assert!(set.spin_if_useful(), "the probe sees it");
        // Seen: spinning again at every sleep.
        assert!(set.spin_if_useful());
        // A hold: no spin, however readable.
        set.holds.fetch_add(1, Ordering::Relaxed);
        assert!(!set.spin_if_useful());
        set.holds.fetch_sub(1, Ordering::Relaxed);
        assert!(set.spin_if_useful());
        // Gated: no spin without something relayed, however readable; one with.
        set.gated.store(true, Ordering::Relaxed);
        assert!(!set.spin_if_useful());
        set.relays.fetch_add(1, Ordering::Relaxed);
        assert!(set.spin_if_useful());
    }
}
