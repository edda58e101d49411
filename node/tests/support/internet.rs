//! Shared by the runner tests of `network = "internet"` (`runner.rs`, `container.rs`): an
//! "internet peer" in a network namespace the test makes and removes, a host listener on every
//! address, the probe script a job runs, and the host's view of a job's veth pair.
//!
//! These machines reach no internet: the peer stands for it. It is a network namespace
//! (`ip netns add`) joined to the host by a veth pair on 198.18.X.0/30 (RFC 2544's benchmark
//! range: outside 127/8 and outside every address the host had), running a TCP server that
//! answers `peer-hi`. Its guard removes the namespace and the pair even when the test fails.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use horde_node::server::executor::runner::egress::HOST_LINK_PREFIX;
use horde_node::server::executor::runner::{JobEvent, JobExit, JobProcess, Launch, Runner};
use horde_protocol::JobId;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The port the peer's server listens on.
pub(crate) const PEER_PORT: u16 = 7000;

/// Runs `ip ARGS…`; panics with its message when it fails.
pub(crate) fn ip(args: &[&str]) {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The internet peer (see the module docs); removed when dropped.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Its namespace's name.
    pub(crate) netns: String,
    /// The host end of its veth pair.
    pub(crate) link: String,
    /// Its address.
    pub(crate) address: Ipv4Addr,
    server: Option<std::process::Child>,
}

impl Peer {
    /// Makes the namespace, the pair, the addresses, and starts the server; returns once the
    /// host reaches it.
    pub(crate) fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let third = u8::try_from((pid % 60) * 4 + n % 4).unwrap();
        let mut peer = Self {
            netns: format!("horde-peer-{pid}-{n}"),
            link: format!("hp{}-{}", pid % 100_000, n % 100),
            address: Ipv4Addr::new(198, 18, third, 2),
            server: None,
        };
        let host = format!("198.18.{third}.1/30");
        let address = format!("{}/30", peer.address);
        let (netns, link) = (peer.netns.clone(), peer.link.clone());
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["addr", "add", &host, "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        ip(&["-n", &netns, "addr", "add", &address, "dev", "eth0"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let gateway = format!("198.18.{third}.1");
        ip(&["-n", &netns, "route", "add", "default", "via", &gateway]);
        let port = PEER_PORT.to_string();
        peer.server = Some(
            std::process::Command::new("ip")
                .args(["netns", "exec", &netns, "busybox", "nc", "-ll", "-p", &port])
                .args(["-e", "echo", "peer-hi"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let started = Instant::now();
        while !peer.answers() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the peer never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    /// Whether the host reaches the peer's server (and it says `peer-hi`).
    pub(crate) fn answers(&self) -> bool {
        use std::io::Read as _;
        let address = std::net::SocketAddr::from((self.address, PEER_PORT));
        let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut said = String::new();
        let _ = stream.read_to_string(&mut said);
        said.contains("peer-hi")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.link])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A listener on `0.0.0.0` counting the connections it accepts.
#[derive(Debug)]
pub(crate) struct HostListener {
    /// Its port.
    pub(crate) port: u16,
    /// Connections accepted so far.
    pub(crate) accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HostListener {
    /// Listens on every host address.
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every IPv4 address of the host, on every interface (loopback, docker0, the peer's and the
/// jobs' veth ends included).
pub(crate) fn host_addresses() -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            Some(words.next()?.split('/').next()?.to_owned())
        })
        .collect()
}

/// The host ends of `job`'s veth pairs (by the alias each carries).
pub(crate) fn job_links(job: JobId) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(HOST_LINK_PREFIX))
        .filter(|name| {
            std::fs::read_to_string(format!("/sys/class/net/{name}/ifalias"))
                .is_ok_and(|alias| alias.contains(&job.to_string()))
        })
        .collect()
}

/// The job's address: the one after its host end's.
pub(crate) fn job_address(job: JobId) -> Ipv4Addr {
    let links = job_links(job);
    assert_eq!(links.len(), 1, "one pair per job: {links:?}");
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &links[0]])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let host: Ipv4Addr = text
        .split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("no address on {}: {text}", links[0]));
    Ipv4Addr::from(u32::from(host) + 1)
}

/// The probe a job runs (with busybox): every host address (`HOST_ADDRS` and its own
/// gateway) on `HOST_PORT`, another job (`OTHER_JOB`, its `OTHER_PORTS`: its port and its
/// executor URL's), the peer (`PEER`), and its own executor URL. One line per attempt:
/// `ESCAPED …` when a forbidden one succeeds.
pub(crate) const PROBE: &str = r#"
    if [ "$EXPECT" = internet ]; then
        i=0
        while ! busybox ip route | grep -q default && [ $i -lt 200 ]; do
            i=$((i+1)); sleep 0.05
        done
    fi
    gateway=$(busybox ip route | busybox awk '/default/ {print $3}')
    for address in $HOST_ADDRS $gateway; do
        ( if busybox nc -w 3 "$address" "$HOST_PORT" </dev/null >/dev/null 2>&1
          then echo "ESCAPED host $address"; else echo "refused host $address"; fi ) &
    done
    for port in $OTHER_PORTS; do
        ( if busybox nc -w 3 "$OTHER_JOB" "$port" </dev/null >/dev/null 2>&1
          then echo "ESCAPED other-job $OTHER_JOB:$port"; else echo "refused other-job $port"; fi ) &
    done
    wait
    if busybox nc -w 3 "$PEER" "$PEER_PORT" </dev/null 2>/dev/null | grep -q peer-hi
    then echo "peer reached"; else echo "peer unreachable"; fi
    # A container's executor URL opens a few milliseconds after it starts: retried.
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        said=$(busybox wget -q -O - --post-data=probe "$HORDE_EXECUTOR_URL/outputs" 2>&1) && break
        sleep 0.1
    done
    case "$said" in
        *noted*) echo "executor reached" ;;
        *) echo "executor unreachable: $said" ;;
    esac
"#;

/// Runs [`PROBE`] as `launch` (under `internet` or `none`) and checks what it saw
/// ([`check_probe`]); `others` is the other job's address and ports. Returns the ended job.
pub(crate) async fn probe(
    runner: &dyn Runner,
    mut launch: Launch,
    internet: bool,
    peer: &Peer,
    host: &HostListener,
    others: (Ipv4Addr, [u16; 2]),
) -> Box<dyn JobProcess> {
    let expect = if internet { "internet" } else { "none" };
    launch.env = probe_env(expect, peer, host.port, others.0, &others.1);
    let (id, env, dir) = (launch.job_id, launch.env.clone(), launch.job_dir.clone());
    let mut job = runner.start(launch).await.unwrap();
    assert_eq!(job_links(id).len(), usize::from(internet));
    let exit = run_answering_outputs(&mut job, Duration::from_secs(60)).await;
    let stdout = std::fs::read_to_string(dir.join("logs/output/stdout")).unwrap();
    println!("{stdout}");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    check_probe(&stdout, &env, internet);
    job
}

/// The environment of [`PROBE`].
pub(crate) fn probe_env(
    expect: &str,
    peer: &Peer,
    host_port: u16,
    other_job: Ipv4Addr,
    other_ports: &[u16],
) -> Vec<(String, String)> {
    let ports: Vec<String> = other_ports.iter().map(u16::to_string).collect();
    vec![
        ("EXPECT".into(), expect.into()),
        ("HOST_ADDRS".into(), host_addresses().join(" ")),
        ("HOST_PORT".into(), host_port.to_string()),
        ("OTHER_JOB".into(), other_job.to_string()),
        ("OTHER_PORTS".into(), ports.join(" ")),
        ("PEER".into(), peer.address.to_string()),
        ("PEER_PORT".into(), PEER_PORT.to_string()),
    ]
}

/// Checks a probe's output against its environment `env`: nothing escaped, every attempt
/// made and refused (each host address, the gateway under `internet`, each of the other job's
/// ports), the peer reached under `internet` only, the job's own executor reached under both.
pub(crate) fn check_probe(stdout: &str, env: &[(String, String)], internet: bool) {
    let count = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map_or(0, |(_, value)| value.split_whitespace().count())
    };
    let attempts = count("HOST_ADDRS") + usize::from(internet) + count("OTHER_PORTS");
    assert!(!stdout.contains("ESCAPED"), "{stdout}");
    assert_eq!(stdout.matches("refused ").count(), attempts, "{stdout}");
    let peer = if internet {
        "peer reached"
    } else {
        "peer unreachable"
    };
    assert!(stdout.contains(peer), "{stdout}");
    assert!(stdout.contains("executor reached"), "{stdout}");
}

/// Runs a job to its end, answering its connections to its executor URL with `noted`.
pub(crate) async fn run_answering_outputs(
    job: &mut Box<dyn JobProcess>,
    within: Duration,
) -> JobExit {
    let deadline = Instant::now() + within;
    loop {
        let event = tokio::time::timeout_at(deadline.into(), job.next_event())
            .await
            .expect("the job ended in time");
        match event {
            JobEvent::Exited(exit) => return exit.unwrap(),
            JobEvent::Outputs(mut stream) => {
                tokio::spawn(async move {
                    let mut request = vec![0u8; 4096];
                    let mut read = 0;
                    while !String::from_utf8_lossy(&request[..read]).contains("probe") {
                        match stream.read(&mut request[read..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read += n,
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nnoted")
                        .await;
                });
            }
        }
    }
}

/// A shell line for the "other job": writes its executor URL's port to its output directory,
/// then serves its port on every address of its namespace.
pub(crate) const OTHER_JOB: &str = r#"
    echo "${HORDE_EXECUTOR_URL##*:}" > /horde/output/outputs_port
    exec busybox nc -ll -p "$HORDE_JOB_PORT" -e echo other-job
"#;

/// The other job's executor URL port, once it has written it under `output`.
pub(crate) async fn outputs_port(output: &std::path::Path) -> u16 {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(output.join("outputs_port"))
            && let Ok(port) = text.trim().parse()
        {
            return port;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the other job never said its executor URL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stale job link: a veth pair whose host end carries an alias naming an executor that is
/// gone (or `executor`), its other end in a namespace of its own (so the kernel does not
/// remove it); both removed when dropped.
#[derive(Debug)]
pub(crate) struct StaleLink {
    /// The host end.
    pub(crate) name: String,
    netns: String,
}

impl StaleLink {
    /// Makes one for `job`, its alias naming `executor`.
    pub(crate) fn new(slot: u32, job: JobId, executor: &str) -> Self {
        let link = Self {
            name: format!("{HOST_LINK_PREFIX}{slot}"),
            netns: format!("horde-stale-{}-{slot}", std::process::id()),
        };
        ip(&["netns", "add", &link.netns]);
        ip(&[
            "link",
            "add",
            &link.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &link.netns,
        ]);
        let alias = horde_node::server::executor::runner::egress::link_alias(job, executor);
        ip(&["link", "set", "dev", &link.name, "alias", &alias]);
        link
    }

    /// Whether the host end still exists.
    pub(crate) fn exists(&self) -> bool {
        std::path::Path::new("/sys/class/net")
            .join(&self.name)
            .exists()
    }
}

impl Drop for StaleLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}
