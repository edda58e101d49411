//! The process runner on its own: a real bubblewrap sandbox around a shell job, reached through
//! the runner's dialer and bridge.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use horde_node::server::executor::runner::process::ProcessRunner;
use horde_node::server::executor::runner::{ClassPolicy, JobEvent, Launch, Runner as _};
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
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.starts_with(b"sleep\x0030"))
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

/// Start latency (until the job's program runs) of the sandbox against a plain child process,
/// in the same run. Printed; asserted only loosely (machines differ).
#[tokio::test]
async fn sandbox_start_costs_milliseconds() {
    use horde_node::server::executor::runner::unisolated::UnisolatedRunner;
    let dir = tempfile::tempdir().unwrap();
    let sandboxed = runner().await;
    let rounds = 10;
    let mut timings = Vec::new();
    for runner in [
        &sandboxed as &dyn horde_node::server::executor::runner::Runner,
        &UnisolatedRunner,
    ] {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let job = runner
                .start(launch(dir.path(), "exit 0", ClassPolicy::default()))
                .await
                .unwrap();
            samples.push(started.elapsed());
            job.remove().await;
        }
        samples.sort();
        timings.push(samples[rounds / 2]);
    }
    println!(
        "start p50: sandbox {:?}, plain process {:?}",
        timings[0], timings[1]
    );
    assert!(timings[0] < Duration::from_secs(2));
}
