//! The process runner on its own: a real bubblewrap sandbox around a shell job, reached through
//! the runner's dialer and bridge.

#![allow(clippy::unwrap_used)]

#[path = "support/internet.rs"]
mod internet;

use std::path::Path;
use std::time::{Duration, Instant};

use horde_node::server::executor::runner::process::ProcessRunner;
use horde_node::server::executor::runner::{
    ClassPolicy, DEFAULT_TMP_BYTES, JobEvent, JobExit, Launch, NetworkPolicy, Runner as _,
};
use horde_protocol::{JobId, Program};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn launch(dir: &Path, script: &str, policy: ClassPolicy) -> Launch {
    for sub in ["volume", "output", "logs/output"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    Launch {
        job_id: JobId::random(),
        program: Program::Command {
            program: "/bin/sh".into(),
        },
        args: vec!["-c".into(), script.into()],
        env: vec![("GREETING".into(), "hello".into())],
        job_dir: dir.to_path_buf(),
        port: 8080,
        policy,
    }
}

async fn runner() -> ProcessRunner {
    ProcessRunner::detect(&ClassPolicy::default())
        .await
        .expect("this host isolates jobs (bubblewrap installed, namespaces allowed)")
        .with_init_binary(env!("CARGO_BIN_EXE_horde").into())
}

fn stdout(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("logs/output/stdout")).unwrap_or_default()
}

#[tokio::test]
async fn a_job_is_reached_through_its_dialer_and_reaches_its_executor() {
    let dir = tempfile::tempdir().unwrap();
    let runner = runner().await;
    // A one-request server on the job port, and a POST to the executor URL.
    let script = r#"
        echo "env $GREETING $HORDE_JOB_PORT $HORDE_VOLUME_DIR $HORDE_OUTPUT_DIR $(pwd)"
        echo "uid $(id -u)"
        python3 -c '
import os, socket, urllib.request
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["HORDE_JOB_PORT"]))); s.listen(8)
for _ in range(201):
    c, _ = s.accept(); c.sendall(c.recv(100).upper()); c.close()
print("served", flush=True)
' &
        sleep 0.5
        printf 'outputs\n' > /horde/output/ready.txt
        python3 -c '
import os, urllib.request
req = urllib.request.Request(os.environ["HORDE_EXECUTOR_URL"] + "/outputs", data=b"{}", method="POST")
try:
    urllib.request.urlopen(req, timeout=5)
except Exception as e:
    print("post", e, flush=True)
'
        wait
    "#;
    let started = Instant::now();
    let mut job = runner
        .start(launch(dir.path(), script, ClassPolicy::default()))
        .await
        .unwrap();
    println!("sandbox start: {:?}", started.elapsed());
    let dialer = job.dialer();
    let mut connection = None;
    for _ in 0..200 {
        if let Ok(stream) = dialer.connect().await {
            connection = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut connection = connection.expect("the job's port is reachable through the dialer");
    connection.write_all(b"ping").await.unwrap();
    let mut reply = Vec::new();
    connection.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"PING");
    // Per-connection cost through the bridge.
    let rounds = 200u32;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut stream = dialer.connect().await.unwrap();
        stream.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
    }
    println!(
        "bridge connect + 1-byte round trip: {:?} each",
        started.elapsed() / rounds
    );
    let direct = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = direct.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for stream in direct.incoming().take(rounds as usize) {
            let mut stream = stream.unwrap();
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).unwrap();
            stream.write_all(b"X").unwrap();
        }
    });
    let started = Instant::now();
    for _ in 0..rounds {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
    }
    println!(
        "host loopback connect + 1-byte round trip: {:?} each",
        started.elapsed() / rounds
    );
    // The job's request to its executor URL arrives as a connection.
    let outputs = tokio::time::timeout(Duration::from_secs(10), job.accept_outputs())
        .await
        .expect("the job reaches its executor URL")
        .unwrap();
    let mut head = [0u8; 4];
    let mut outputs = outputs;
    outputs.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"POST");
    drop(outputs);
    let exit = tokio::time::timeout(Duration::from_secs(10), job.wait())
        .await
        .unwrap()
        .unwrap();
    let out = stdout(dir.path());
    assert!(
        out.contains("env hello 8080 /horde/volume /horde/output /horde/output"),
        "{out}"
    );
    if rustix::process::geteuid().is_root() {
        assert!(out.contains("uid 65534"), "{out}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("output/ready.txt")).unwrap(),
        "outputs\n"
    );
    println!("{exit:?}\n{out}");
    job.remove().await;
}

#[tokio::test]
async fn stop_ends_everything_the_job_started() {
    let dir = tempfile::tempdir().unwrap();
    let runner = runner().await;
    let script = "trap '' TERM; setsid sleep 300 & (sleep 301 &) ; echo started; sleep 302";
    let mut job = runner
        .start(launch(dir.path(), script, ClassPolicy::default()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                // Exactly the job's three (a host's own `sleep 30` loop must not count).
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    [
                        &b"sleep\x00300\x00"[..],
                        b"sleep\x00301\x00",
                        b"sleep\x00302\x00",
                    ]
                    .contains(&c.as_slice())
                })
            })
            .count()
    };
    assert_eq!(sleeping(), 3);
    let started = Instant::now();
    let exit = job.stop(Duration::from_millis(200)).await;
    println!("stopped in {:?}: {exit:?}", started.elapsed());
    assert_eq!(sleeping(), 0, "nothing of the job outlives it");
    job.remove().await;
}

#[tokio::test]
async fn a_job_over_its_memory_limit_ends_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let runner = runner().await;
    let policy = ClassPolicy {
        memory_bytes: Some(64 << 20),
        ..ClassPolicy::default()
    };
    let script = "python3 -c 'x = bytearray(512 << 20); print(len(x))'";
    let mut job = runner
        .start(launch(dir.path(), script, policy))
        .await
        .unwrap();
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(30), job.next_event())
            .await
            .unwrap()
        {
            JobEvent::Exited(exit) => break exit.unwrap(),
            JobEvent::Outputs(_) => {}
        }
    };
    assert!(!exit.success(), "{exit:?}");
    println!("{exit:?}");
    job.remove().await;
}

#[tokio::test]
async fn a_class_without_a_tmp_limit_gets_the_default_one() {
    // Without it a job could fill half of the host's memory through its /tmp.
    let dir = tempfile::tempdir().unwrap();
    let runner = runner().await;
    let script = "python3 -c 'import os; s = os.statvfs(\"/tmp\"); \
                  print(\"tmp-kib\", s.f_blocks * s.f_frsize // 1024)'";
    let mut job = runner
        .start(launch(dir.path(), script, ClassPolicy::default()))
        .await
        .unwrap();
    let exit = exit_of(&mut job).await;
    assert!(exit.success(), "{exit:?}");
    let expected = format!("tmp-kib {}", DEFAULT_TMP_BYTES / 1024);
    assert!(
        stdout(dir.path()).contains(&expected),
        "{}",
        stdout(dir.path())
    );
    job.remove().await;
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let runner = runner().await;
    let mut launch = launch(dir.path(), "", ClassPolicy::default());
    launch.program = Program::Command {
        program: "no-such-program".into(),
    };
    let error = runner.start(launch).await.unwrap_err();
    assert!(error.to_string().contains("no-such-program"), "{error}");
}

/// Start p50 (until the job's program runs) of `rounds` trivial jobs under `policy`.
async fn start_p50(
    runner: &dyn horde_node::server::executor::runner::Runner,
    dir: &Path,
    policy: &ClassPolicy,
) -> Duration {
    let rounds = 10;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let job = runner
            .start(launch(dir, "exit 0", policy.clone()))
            .await
            .unwrap();
        samples.push(started.elapsed());
        job.remove().await;
    }
    samples.sort();
    samples[rounds / 2]
}

/// Start latency of the sandbox against a plain child process, in the same run. Printed;
/// asserted only loosely (machines differ).
#[tokio::test]
async fn sandbox_start_costs_milliseconds() {
    use horde_node::server::executor::runner::unisolated::UnisolatedRunner;
    let dir = tempfile::tempdir().unwrap();
    let policy = ClassPolicy::default();
    let sandbox = start_p50(&runner().await, dir.path(), &policy).await;
    let plain = start_p50(&UnisolatedRunner, dir.path(), &policy).await;
    println!("start p50: sandbox {sandbox:?}, plain process {plain:?}");
    assert!(sandbox < Duration::from_secs(2));
}

fn internet_policy() -> ClassPolicy {
    ClassPolicy {
        network: NetworkPolicy::Internet,
        ..ClassPolicy::default()
    }
}

async fn internet_runner() -> ProcessRunner {
    ProcessRunner::detect(&internet_policy())
        .await
        .expect("this host gives jobs egress (the node runs as root, `ip` and `nft` installed)")
        .with_init_binary(env!("CARGO_BIN_EXE_horde").into())
}

/// Under `internet` a job reaches the peer, and never an address of the host (loopback,
/// docker0, the veth ends, …, on a port where a host listener takes every address), nor
/// another job's port or executor URL; under `none` it does not even reach the peer. Both
/// reach their own executor URL. Each job's veth pair is gone once the job is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_reaches_the_peer_and_nothing_of_the_host_or_other_jobs() {
    let peer = internet::Peer::start();
    let host = internet::HostListener::start().await;
    let runner = internet_runner().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = launch(other_dir.path(), internet::OTHER_JOB, internet_policy());
    let other_id = other.job_id;
    let other_job = runner.start(other).await.unwrap();
    let other_outputs = internet::outputs_port(&other_dir.path().join("output")).await;
    let other_address = internet::job_address(other_id);
    for (policy, internet) in [(internet_policy(), true), (ClassPolicy::default(), false)] {
        let dir = tempfile::tempdir().unwrap();
        let launch = launch(dir.path(), internet::PROBE, policy);
        let id = launch.job_id;
        let others = (other_address, [launch.port, other_outputs]);
        let job = internet::probe(&runner, launch, internet, &peer, &host, others).await;
        job.remove().await;
        assert_eq!(internet::job_links(id), Vec::<String>::new(), "left behind");
    }
    assert_eq!(host.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(peer.answers());
    other_job.remove().await;
    assert_eq!(internet::job_links(other_id), Vec::<String>::new());
}

/// A job link whose executor is gone is deleted when a runner with egress starts; one of a
/// running executor is kept.
#[tokio::test]
async fn stale_job_links_are_reaped_at_start() {
    use horde_node::server::executor::runner::container::guard::executor_identity;
    let slot = 16_000 + std::process::id() % 300;
    let stale = internet::StaleLink::new(slot, JobId::random(), "4194303.5");
    let live = internet::StaleLink::new(slot + 1, JobId::random(), &executor_identity());
    assert!(stale.exists() && live.exists());
    internet_runner().await;
    assert!(!stale.exists(), "the stale link was not reaped");
    assert!(live.exists(), "a running executor's link was reaped");
}

/// Start latency with and without egress, in the same run (printed; the veth pair, its
/// addresses and route are a few `ip` calls).
#[tokio::test]
async fn egress_costs_milliseconds_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let runner = internet_runner().await;
    let none = start_p50(&runner, dir.path(), &ClassPolicy::default()).await;
    let internet = start_p50(&runner, dir.path(), &internet_policy()).await;
    println!("start p50: network none {none:?}, internet {internet:?}");
    assert!(internet < Duration::from_secs(2));
}

/// A node that is not root cannot make veth pairs: the runner for an `internet` class is
/// refused with a reason saying so, and `allow_unisolated` does not turn that into unisolated
/// jobs; the same for both runtimes. (Run as uid 65534 in a child of this test binary.)
#[tokio::test]
async fn internet_is_refused_at_start_on_a_node_that_is_not_root() {
    use horde_node::server::executor::runner::{RunnerError, Runtime, select};
    if std::env::var("HORDE_TEST_AS_NOBODY").is_ok() {
        for runtime in [Runtime::Process, Runtime::Container] {
            let policy = ClassPolicy {
                allow_unisolated: true,
                runtime,
                ..internet_policy()
            };
            let state = tempfile::tempdir().unwrap();
            match select(&policy, state.path()).await {
                Err(error @ RunnerError::Egress(_)) => println!("REFUSED: {error}"),
                Err(error) => println!("WRONG ERROR: {error}"),
                Ok(runner) => println!("WRONGLY STARTED: {runner:?}"),
            }
        }
        return;
    }
    let output = std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "internet_is_refused_at_start_on_a_node_that_is_not_root",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HORDE_TEST_AS_NOBODY", "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("REFUSED: job network: network = \"internet\" needs the node to run as root")
            && said.contains("runs as uid 65534"),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The job's exit, whatever outputs connections it makes first.
async fn exit_of(job: &mut Box<dyn horde_node::server::executor::runner::JobProcess>) -> JobExit {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), job.next_event())
            .await
            .unwrap()
        {
            JobEvent::Exited(exit) => break exit.unwrap(),
            JobEvent::Outputs(_) => {}
        }
    }
}

/// Runs `echo ran` in `dir` to its end: it must exit 0 having printed just that.
async fn echo_ran(runner: &ProcessRunner, dir: &Path) {
    let mut job = runner
        .start(launch(dir, "echo ran", ClassPolicy::default()))
        .await
        .unwrap();
    let exit = exit_of(&mut job).await;
    job.remove().await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(stdout(dir), "ran\n");
}

/// Pre-made sandboxes (`prepare_next`) in `jobs`, a directory others may pass (a job's uid
/// must reach a program in it).
fn jobs_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let jobs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(jobs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    jobs
}

/// A job whose program is outside `/usr` starts in the sandbox made before it: the program
/// runs from its descriptor (its host path is not in the sandbox, where a cold sandbox binds
/// it), the volume fetched before the start is there read-only, the output directory is
/// written where the executor looks for it, the job runs as the job uid. The next job gets a
/// new sandbox (a fresh `/tmp`), never the first one's.
#[tokio::test]
async fn jobs_start_in_sandboxes_made_before_them() {
    let jobs = jobs_dir();
    let runner = runner().await;
    let shell = jobs.path().join("bin/dash");
    std::fs::create_dir_all(shell.parent().unwrap()).unwrap();
    std::fs::copy("/bin/dash", &shell).unwrap();
    let script = r#"
        test -e "$SHELL_PATH" && echo "program visible" || echo "program hidden"
        cat /horde/volume/in.txt
        touch /horde/volume/new 2>/dev/null && echo "VOLUME WRITABLE"
        echo "tmp $(ls -A /tmp | wc -l)"; touch /tmp/mark
        echo "uid $(id -u)"; echo "$GREETING $HORDE_JOB_PORT"
        echo written > /horde/output/out.txt
    "#;
    for round in 0..2 {
        runner.prepare_next(jobs.path());
        let dir = jobs.path().join(format!("job-{round}"));
        let mut launch = launch(&dir, script, ClassPolicy::default());
        launch.program = Program::Command {
            program: shell.to_str().unwrap().to_owned(),
        };
        launch
            .env
            .push(("SHELL_PATH".into(), shell.to_str().unwrap().into()));
        std::fs::write(dir.join("volume/in.txt"), format!("volume {round}\n")).unwrap();
        let mut job = runner.start(launch).await.unwrap();
        let exit = exit_of(&mut job).await;
        job.remove().await;
        let out = stdout(&dir);
        assert!(exit.success(), "{exit:?}\n{out}");
        assert!(
            out.contains("program hidden"),
            "not the pre-made sandbox:\n{out}"
        );
        assert!(out.contains(&format!("volume {round}")), "{out}");
        assert!(!out.contains("VOLUME WRITABLE"), "{out}");
        assert!(out.contains("tmp 0"), "a sandbox used twice:\n{out}");
        assert!(out.contains("hello 8080"), "{out}");
        if rustix::process::geteuid().is_root() {
            assert!(out.contains("uid 65534"), "{out}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("output/out.txt")).unwrap(),
            "written\n"
        );
        assert!(dir.join("volume/in.txt").is_file());
        // Nothing of the slot is left beside the job's directory.
        let left: Vec<_> = std::fs::read_dir(jobs.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".sandbox-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// A pre-made sandbox that died before its job came is not used: the job starts in a new one.
#[tokio::test]
async fn a_dead_pre_made_sandbox_gives_way_to_a_new_one() {
    let jobs = jobs_dir();
    let runner = runner().await;
    runner.prepare_next(jobs.path());
    // Its pid 1 (bubblewrap's, inside the sandbox), which binds the slot's output.
    let slot = format!("{}/.sandbox-", jobs.path().display());
    let mut killed = 0;
    for _ in 0..500 {
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let bwrap = std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("bwrap"));
            let ours = std::fs::read_to_string(entry.path().join("mountinfo"))
                .is_ok_and(|m| m.contains(&slot));
            if bwrap && ours {
                let pid = entry.file_name().to_string_lossy().parse::<i32>().unwrap();
                rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid).unwrap(),
                    rustix::process::Signal::KILL,
                )
                .unwrap();
                killed += 1;
            }
        }
        if killed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // (Its init may still be bubblewrap's fork, not yet the init: killed too.)
    assert!(killed >= 1, "the pre-made sandbox was not found");
    echo_ran(&runner, &jobs.path().join("job")).await;
}

/// In a pre-made sandbox, a job over its memory limit ends out of memory (its cgroup was made
/// with the sandbox).
#[tokio::test]
async fn a_job_over_its_memory_limit_in_a_pre_made_sandbox_ends_out_of_memory() {
    let jobs = jobs_dir();
    let policy = ClassPolicy {
        memory_bytes: Some(64 << 20),
        ..ClassPolicy::default()
    };
    let runner = ProcessRunner::detect(&policy)
        .await
        .unwrap()
        .with_init_binary(env!("CARGO_BIN_EXE_horde").into());
    runner.prepare_next(jobs.path());
    let script = "python3 -c 'x = bytearray(512 << 20); print(len(x))'";
    let mut job = runner
        .start(launch(&jobs.path().join("job"), script, policy))
        .await
        .unwrap();
    let exit = exit_of(&mut job).await;
    job.remove().await;
    assert!(exit.out_of_memory, "{exit:?}");
}

/// Under `internet`, a job in a pre-made sandbox has its link before its program runs, and
/// reaches the peer and nothing of the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_in_a_pre_made_sandbox() {
    let peer = internet::Peer::start();
    let host = internet::HostListener::start().await;
    let runner = internet_runner().await;
    let jobs = jobs_dir();
    // Another job (in a new sandbox: none was made ahead), which the probe must not reach.
    let other = launch(
        &jobs.path().join("other"),
        internet::OTHER_JOB,
        internet_policy(),
    );
    let other_id = other.job_id;
    let other_job = runner.start(other).await.unwrap();
    let other_outputs = internet::outputs_port(&jobs.path().join("other/output")).await;
    runner.prepare_next(jobs.path());
    let launch = launch(&jobs.path().join("job"), internet::PROBE, internet_policy());
    let id = launch.job_id;
    let others = (
        internet::job_address(other_id),
        [launch.port, other_outputs],
    );
    let job = internet::probe(&runner, launch, true, &peer, &host, others).await;
    job.remove().await;
    other_job.remove().await;
    assert_eq!(internet::job_links(id), Vec::<String>::new(), "left behind");
    assert_eq!(host.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(peer.answers());
}

/// The `horde` binary replaced on disk while the executor runs (a new file renamed over it, as
/// a package upgrade does; the old one unlinked): jobs still start, cold and in pre-made
/// sandboxes, with the init the runner kept at start; its name goes with the runner. (Bound
/// where it was, the init would now be the new file — here a script that is no init at all —
/// and through `/proc/PID/exe` bwrap could not find it: "Can't find source path".)
#[tokio::test]
async fn replacing_the_binary_on_disk_breaks_no_sandbox() {
    use std::os::unix::fs::PermissionsExt as _;
    let jobs = jobs_dir();
    let install = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let binary = install.path().join("horde");
    std::fs::copy(env!("CARGO_BIN_EXE_horde"), &binary).unwrap();
    let runner = ProcessRunner::detect(&ClassPolicy::default())
        .await
        .unwrap()
        .with_init_binary(binary.clone())
        .pin_init(state.path());
    let upgrade = install.path().join("horde.new");
    std::fs::write(&upgrade, "#!/bin/sh\nexit 99\n").unwrap();
    std::fs::set_permissions(&upgrade, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&upgrade, &binary).unwrap();
    for (round, made_ahead) in [false, true].into_iter().enumerate() {
        if made_ahead {
            runner.prepare_next(jobs.path());
        }
        echo_ran(&runner, &jobs.path().join(format!("job-{round}"))).await;
    }
    let pinned = || std::fs::read_dir(state.path()).unwrap().count();
    assert_eq!(pinned(), 1);
    drop(runner);
    assert_eq!(pinned(), 0);
}
