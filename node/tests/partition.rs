//! A partitioned network heals (issue 17): six in-process discovery nodes in two network
//! namespaces the test creates, joined by a veth pair. Cutting the link makes each half forget
//! the other's nodes once their records expire; bringing it back up makes the halves find each
//! other again and reconverge, with no restart. Needs root (`ip netns`); the machines CI runs on
//! give it.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use horde_node::client::now;
use horde_node::server::discovery::{
    BootstrapPeer, Directory, Discovery, DiscoveryConfig, LocalNode, peer_id, quic_multiaddr,
};
use horde_protocol::{Hotkey, Role, SecretKey};
use tokio_util::sync::CancellationToken;

/// Record lifetime of every node: a cut half is forgotten within it (plus a sweep).
const TTL: Duration = Duration::from_secs(3);

/// How long the link stays cut: longer than the discovery connections' QUIC idle timeout
/// (10 s), so the halves' connections are gone and must be made again.
const CUT_FOR: Duration = Duration::from_secs(13);

/// The two ends of the link.
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);

/// Runs `ip ARGS`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Two network namespaces joined by a veth pair (`ADDR_A` in the first, `ADDR_B` in the
/// second); both are deleted on drop, and the pair with them.
struct Link {
    a: String,
    b: String,
    end_a: String,
}

impl Link {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let link = Self {
            a: format!("hdpa{tag}"),
            b: format!("hdpb{tag}"),
            end_a: format!("hva{tag}"),
        };
        let end_b = format!("hvb{tag}");
        ip(&["netns", "add", &link.a]);
        ip(&["netns", "add", &link.b]);
        ip(&[
            "link",
            "add",
            &link.end_a,
            "type",
            "veth",
            "peer",
            "name",
            &end_b,
        ]);
        ip(&["link", "set", &link.end_a, "netns", &link.a]);
        ip(&["link", "set", &end_b, "netns", &link.b]);
        for (ns, end, addr) in [(&link.a, &link.end_a, ADDR_A), (&link.b, &end_b, ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", end]);
            ip(&["-n", ns, "link", "set", end, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        link
    }

    /// Takes the link down (`false`) or up again (`true`).
    fn set_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.a, "link", "set", &self.end_a, state]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// A node started in a namespace: its hotkey, directory and bootstrap address.
struct Started {
    hotkey: Hotkey,
    directory: Arc<Directory>,
    bootstrap: BootstrapPeer,
}

/// Starts one discovery node per role in `roles` inside namespace `ns`, listening on `addr`, on
/// a thread of its own that entered the namespace (sockets stay in the namespace they were made
/// in). The first node joins through `bootstrap`, if given; the others through the first.
/// The nodes run until `cancel`.
fn start_in(
    ns: &str,
    addr: Ipv4Addr,
    roles: &[Role],
    bootstrap: Option<BootstrapPeer>,
    cancel: &CancellationToken,
) -> Vec<Started> {
    let path = format!("/run/netns/{ns}");
    let roles = roles.to_vec();
    let cancel = cancel.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            netns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut started = Vec::new();
            let mut running = Vec::new();
            let mut join = bootstrap;
            for role in roles {
                let key = SecretKey::generate();
                let config = DiscoveryConfig {
                    listen: SocketAddr::from((addr, 0)),
                    bootstrap: join.iter().cloned().collect(),
                    record_ttl: TTL,
                    ..DiscoveryConfig::default()
                };
                let local = LocalNode {
                    role,
                    addrs: vec![SocketAddr::from((addr, 7000))],
                    capacity: None,
                    state_dir: None,
                };
                let node = Discovery::start(&key, local, &config, cancel.child_token())
                    .await
                    .unwrap();
                let bootstrap = BootstrapPeer {
                    peer: peer_id(&key.hotkey()),
                    addr: quic_multiaddr(node.listen_addrs()[0]),
                };
                join.get_or_insert_with(|| bootstrap.clone());
                started.push(Started {
                    hotkey: key.hotkey(),
                    directory: node.directory().clone(),
                    bootstrap,
                });
                running.push(node);
            }
            tx.send(started).unwrap();
            // The services run on this thread's runtime until `cancel`.
            cancel.cancelled().await;
            for node in running {
                node.stopped().await;
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

/// Which of `nodes` each of `observers` knows now: `(observer index, node index)` pairs missing.
fn missing(observers: &[&Started], nodes: &[&Started]) -> Vec<(usize, usize)> {
    let now = now();
    let mut missing = Vec::new();
    for (o, observer) in observers.iter().enumerate() {
        for (n, node) in nodes.iter().enumerate() {
            if node.hotkey != observer.hotkey && observer.directory.get(&node.hotkey, now).is_none()
            {
                missing.push((o, n));
            }
        }
    }
    missing
}

/// Waits up to `limit` until `done` holds; returns how long it took.
async fn within(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_network_reconverges_after_the_link_heals() {
    let link = Link::new();
    let cancel = CancellationToken::new();
    // Half A: the facilitator and two miners; half B: a validator and two miners, joining
    // through the facilitator across the link.
    let a = start_in(
        &link.a,
        ADDR_A,
        &[Role::Facilitator, Role::Miner, Role::Miner],
        None,
        &cancel,
    );
    let boot = a[0].bootstrap.clone();
    let b = start_in(
        &link.b,
        ADDR_B,
        &[Role::Validator, Role::Miner, Role::Miner],
        Some(boot),
        &cancel,
    );
    let all: Vec<&Started> = a.iter().chain(&b).collect();
    let half_a: Vec<&Started> = a.iter().collect();
    let half_b: Vec<&Started> = b.iter().collect();

    let converged = within(
        Duration::from_secs(20),
        "every node knows every other",
        || missing(&all, &all).is_empty(),
    )
    .await;

    link.set_up(false);
    let forgotten = within(
        TTL + Duration::from_secs(5),
        "each half forgets the other",
        || {
            missing(&half_a, &half_b).len() == half_a.len() * half_b.len()
                && missing(&half_b, &half_a).len() == half_b.len() * half_a.len()
        },
    )
    .await;
    // Each half still knows itself (its own records are refreshed across its own links).
    assert_eq!(missing(&half_a, &half_a), Vec::new());
    assert_eq!(missing(&half_b, &half_b), Vec::new());
    tokio::time::sleep(CUT_FOR.saturating_sub(forgotten)).await;
    assert_eq!(missing(&half_a, &half_a), Vec::new());
    assert_eq!(missing(&half_b, &half_b), Vec::new());

    link.set_up(true);
    let healed = within(Duration::from_secs(30), "the halves reconverge", || {
        missing(&all, &all).is_empty()
    })
    .await;
    println!(
        "converged {converged:?}; halves forgot each other {forgotten:?} after the cut; \
         reconverged {healed:?} after the link came back"
    );
    cancel.cancel();
}
