//! Hostile jobs through the real flow: a job that tries every way out of its sandbox (issue 15's
//! table), next to a victim job on the same miner. Every attempt must be refused; the test fails
//! naming any that succeeds.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use horde_node::client::{Client, JobHandle, JobRequest};
use horde_node::server::executor::disk::{MAX_JOB_FILES, MEASURE_EVERY};
use horde_protocol::messages::FailureReason;
use horde_protocol::{
    JobStatus, ReadinessProbe, RelativePath, SecretKey, Stage, VolumeSource, VolumeSpec,
};
use horde_testnet::{Testnet, TestnetConfig, demo_job_binary};
use horde_transport::test_utils::SmallDisk;

/// Every attempt the hostile job makes, one `refused NAME` / `SUCCEEDED NAME` line each.
const HOSTILE_SCRIPT: &str = r#"
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "SUCCEEDED $name"; else echo "refused $name"; fi; }
tcp() { python3 -c "import socket,sys; socket.create_connection(('$1', int('$2')), 2)"; }
for key in $KEY_FILES; do try "read-key:$(basename $(dirname $key))" cat "$key"; done
for dir in $DATA_DIRS; do try "list-data-dir:$(basename $dir)" ls "$dir"; done
try executor-environ cat /proc/$EXECUTOR_PID/environ
try executor-mem python3 -c "open('/proc/$EXECUTOR_PID/mem', 'rb')"
try executor-maps cat /proc/$EXECUTOR_PID/maps
try signal-executor kill -0 $EXECUTOR_PID
try signal-miner kill -0 $MINER_PID
if kill -STOP $MINER_PID 2>/dev/null; then echo "SUCCEEDED stop-miner"; kill -CONT $MINER_PID; else echo "refused stop-miner"; fi
try see-miner test -e /proc/$MINER_PID
try write-miner-config sh -c "echo '# pwned' >> '$MINER_CONFIG'"
try write-network-dir touch "$NETWORK_DIR/pwned"
try write-root touch /pwned
try write-usr touch /usr/pwned
try write-volume touch /horde/volume/pwned
try read-other-job cat "$VICTIM_DIR/volume/secret.txt"
try list-other-job ls "$VICTIM_DIR"
try tcp-host-service tcp 127.0.0.1 $HOST_PORT
try tcp-facilitator tcp 127.0.0.1 $FACILITATOR_PORT
try udp-facilitator python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.connect(('127.0.0.1', $FACILITATOR_PORT)); s.send(b'x' * 1200); s.recv(16)"
try other-job-outputs tcp 127.0.0.1 $VICTIM_OUTPUTS_PORT
try other-job-port tcp 127.0.0.1 $HORDE_JOB_PORT
try internet tcp 1.1.1.1 80
try host-address tcp 10.0.2.15 22
try list-host-processes sh -c "test \$(ls /proc | grep -c '^[0-9]') -gt 20"
# Known gap, reported but not (yet) refused: as root, bwrap makes no user namespace, so it cannot
# forbid nested ones (see the README); a nested one gives no way out of the sandbox by itself.
if unshare -Ur true >/dev/null 2>&1; then echo "gap new-user-namespace allowed"; fi
try setuid-root python3 -c "import os; os.setuid(0)"
echo private > /tmp/$NONCE && echo "wrote private-tmp"
setsid sleep 4243 &
(sleep 4244 &)
python3 -c "
import os, urllib.request, urllib.error
request = urllib.request.Request(os.environ['HORDE_EXECUTOR_URL'] + '/outputs', data=b'{\"paths\": []}', method='POST')
try:
    urllib.request.urlopen(request, timeout=5)
    print('REACHED own-executor', flush=True)
except urllib.error.HTTPError:
    print('REACHED own-executor', flush=True)
except Exception as error:
    print('UNREACHED own-executor', error, flush=True)
"
echo "uid $(id -u)"
echo DONE
exec python3 -m http.server --bind 127.0.0.1 "$HORDE_JOB_PORT"
"#;

/// The attempts the script makes besides the per-node ones: all must say `refused`.
const ATTEMPTS: [&str; 26] = [
    "executor-environ",
    "executor-mem",
    "executor-maps",
    "signal-executor",
    "signal-miner",
    "stop-miner",
    "see-miner",
    "write-miner-config",
    "write-network-dir",
    "write-root",
    "write-usr",
    "write-volume",
    "read-other-job",
    "list-other-job",
    "tcp-host-service",
    "tcp-facilitator",
    "udp-facilitator",
    "other-job-outputs",
    "other-job-port",
    "internet",
    "host-address",
    "list-host-processes",
    "setuid-root",
    "read-key:miner-0",
    "read-key:facilitator",
    "list-data-dir:data",
];

async fn submit(testnet: &Testnet, request: &JobRequest) -> (Client, JobHandle) {
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let job = client.submit(request).await.unwrap();
    (client, job)
}

/// The host directory of job `id` under the testnet (in its executor's data directory).
fn job_dir(testnet: &Testnet, id: &str) -> PathBuf {
    let executors = testnet.dir().join("miner-0/data/executors");
    for executor in std::fs::read_dir(executors).unwrap() {
        let dir = executor.unwrap().path().join("data/jobs").join(id);
        if dir.exists() {
            return dir;
        }
    }
    panic!("no job directory for {id}");
}

fn pid_of(testnet: &Testnet, needle: &str) -> u32 {
    let found: Vec<_> = testnet
        .processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(needle))
        .collect();
    assert!(!found.is_empty(), "no process mentions {needle}");
    found[0].0
}

fn sleepers() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.starts_with("sleep 424"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_job_is_refused_every_way_out() {
    let testnet = Testnet::start(TestnetConfig {
        executors_per_miner: 2,
        prewarm: 2,
        ..TestnetConfig::default()
    })
    .expect("testnet starts");
    let demo = demo_job_binary().expect("demo job binary");

    // The victim: the demo job with a secret volume, saying its executor URL.
    let mut victim = JobRequest::command("cpu", "/bin/sh");
    victim.args = vec![
        "-c".into(),
        "echo \"url $HORDE_EXECUTOR_URL\"; exec \"$0\"".into(),
        demo.to_str().unwrap().into(),
    ];
    victim.volumes = vec![VolumeSpec {
        path: RelativePath("secret.txt".into()),
        source: VolumeSource::Inline {
            bytes: b"VICTIM-SECRET".to_vec(),
        },
    }];
    let (_victim_client, mut victim_job) = submit(&testnet, &victim).await;
    victim_job.wait_for_endpoint().await.unwrap();
    let victim_dir = job_dir(&testnet, &victim_job.job_id().to_string());
    let victim_stdout = std::fs::read_to_string(victim_dir.join("logs/output/stdout")).unwrap();
    let victim_outputs_port = victim_stdout
        .lines()
        .find_map(|line| line.strip_prefix("url http://127.0.0.1:"))
        .expect("the victim printed its executor URL")
        .trim()
        .to_owned();

    // A service on the host's loopback, counting whoever reaches it.
    let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_service.local_addr().unwrap().port();
    let reached = Arc::new(AtomicU32::new(0));
    std::thread::spawn({
        let reached = reached.clone();
        move || {
            for _ in host_service.incoming() {
                reached.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    let dir = testnet.dir();
    let mut key_files = Vec::new();
    let mut data_dirs = Vec::new();
    for node in testnet.nodes() {
        key_files.push(dir.join(&node.name).join("hotkey.json"));
        data_dirs.push(dir.join(&node.name).join("data"));
    }
    for executor in std::fs::read_dir(dir.join("miner-0/data/executors")).unwrap() {
        let executor = executor.unwrap().path();
        key_files.push(executor.join("hotkey.json"));
        data_dirs.push(executor.join("data"));
    }
    let join = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let miner_config = dir.join("miner-0/node.toml");
    let miner_config_before = std::fs::read(&miner_config).unwrap();
    let nonce = format!("horde-hostile-{}", std::process::id());
    let executor_pid = pid_of(&testnet, "executors/");
    let miner_pid = pid_of(&testnet, "miner-0/node.toml");

    let mut hostile = JobRequest::command("cpu", "/bin/sh");
    hostile.args = vec!["-c".into(), HOSTILE_SCRIPT.into()];
    hostile.readiness = ReadinessProbe::Tcp;
    hostile.env = vec![
        ("KEY_FILES".into(), join(&key_files)),
        ("DATA_DIRS".into(), join(&data_dirs)),
        ("EXECUTOR_PID".into(), executor_pid.to_string()),
        ("MINER_PID".into(), miner_pid.to_string()),
        ("MINER_CONFIG".into(), miner_config.to_str().unwrap().into()),
        ("NETWORK_DIR".into(), dir.to_str().unwrap().into()),
        ("VICTIM_DIR".into(), victim_dir.to_str().unwrap().into()),
        ("VICTIM_OUTPUTS_PORT".into(), victim_outputs_port),
        ("HOST_PORT".into(), host_port.to_string()),
        (
            "FACILITATOR_PORT".into(),
            testnet.facilitator().addrs[0].port().to_string(),
        ),
        ("NONCE".into(), nonce.clone()),
    ];
    let (_client, mut job) = submit(&testnet, &hostile).await;
    job.wait_for_endpoint().await.unwrap();
    job.terminate().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(30), job.wait_for_end())
        .await
        .unwrap()
        .unwrap();
    let JobStatus::Completed(result) = end else {
        panic!("{end:?}\n{:?}", job.history());
    };
    let out = result.stdout_tail;
    assert!(out.contains("DONE"), "the script ran to its end:\n{out}");
    let succeeded: Vec<&str> = out.lines().filter(|l| l.starts_with("SUCCEEDED")).collect();
    assert!(succeeded.is_empty(), "escaped: {succeeded:?}\n{out}");
    for attempt in ATTEMPTS {
        assert!(
            out.lines().any(|l| l == format!("refused {attempt}")),
            "{attempt} was not tried:\n{out}"
        );
    }
    for node in testnet.nodes() {
        let line = format!("refused read-key:{}", node.name);
        assert!(out.contains(&line), "{line}:\n{out}");
    }
    assert!(out.contains("REACHED own-executor"), "{out}");
    if rustix::process::geteuid().is_root() {
        assert!(out.contains("uid 65534"), "{out}");
    }

    // On the host: nothing reached, nothing written, nothing left running.
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the host's loopback was reached"
    );
    assert_eq!(std::fs::read(&miner_config).unwrap(), miner_config_before);
    assert!(!dir.join("pwned").exists());
    assert!(
        !Path::new("/tmp").join(&nonce).exists(),
        "host /tmp written"
    );
    assert!(sleepers().is_empty(), "left running: {:?}", sleepers());
    assert!(
        std::fs::read(victim_dir.join("volume/secret.txt")).is_ok_and(|b| b == b"VICTIM-SECRET")
    );
    victim_job.terminate().await.unwrap();
    victim_job.wait_for_end().await.unwrap();
    assert!(
        testnet.sandbox_processes().is_empty(),
        "{:?}",
        testnet.sandbox_processes()
    );
}

/// What a job may keep on the node's disk in this test's class (`disk_mb`).
const SMALL_DISK_MB: u64 = 16;

/// Runs `script` on the small-disk class; its end, which must be a failure for going over the
/// disk limit: its stage, why, and the job's stdout tail.
async fn over_the_disk_limit(
    testnet: &Testnet,
    script: &str,
    serves: bool,
) -> (Stage, String, String) {
    let mut request = JobRequest::command("small-disk", "/bin/sh");
    request.args = vec!["-c".into(), script.into()];
    request.readiness = ReadinessProbe::Tcp;
    let (_client, mut job) = submit(testnet, &request).await;
    if serves {
        job.wait_for_endpoint().await.unwrap();
    }
    let end = tokio::time::timeout(Duration::from_secs(60), job.wait_for_end())
        .await
        .expect("the job was stopped in time")
        .unwrap();
    let JobStatus::Failed(failure) = end else {
        panic!("{end:?}\n{:?}", job.history());
    };
    let FailureReason::OverDiskLimit(why) = failure.reason else {
        panic!("{failure:?}");
    };
    let stdout = failure.result.map(|r| r.stdout_tail).unwrap_or_default();
    // Nothing of the job is left on the node's disk (removed once its end is sent).
    let executors = testnet.dir().join("miner-0/data/executors");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for executor in std::fs::read_dir(executors).unwrap() {
        let dir = executor.unwrap().path().join("data/jobs");
        let dir = dir.join(job.job_id().to_string());
        while dir.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} left behind",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (failure.stage, why, stdout)
}

/// Hostile jobs that try to fill the node's disk through the only host directories they can
/// write (their output directory and logs): many large files, one huge file, a stdout flood,
/// many empty files. Each is stopped at its class's `disk_mb` (or at `MAX_JOB_FILES` entries),
/// no file grows past it, and the executor runs the next job as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_filling_the_disk_is_stopped_at_its_class_limit() {
    let defaults = TestnetConfig::default();
    let testnet = Testnet::start(TestnetConfig {
        more_classes: vec![horde_node::server::config::ClassConfig {
            disk_mb: Some(SMALL_DISK_MB),
            ..horde_testnet::runner_class("small-disk", defaults.runtime)
        }],
        ..defaults
    })
    .expect("testnet starts");
    let limit = SMALL_DISK_MB << 20;

    // Many 1 MiB files, after the job's endpoint is up: stopped while it runs.
    let many = r#"(sleep 1; i=0; while :; do head -c 1048576 /dev/zero > "$HORDE_OUTPUT_DIR/f$i" || break; i=$((i+1)); done; sleep 600) &
exec python3 -m http.server --bind 127.0.0.1 "$HORDE_JOB_PORT""#;
    let (stage, why, _) = over_the_disk_limit(&testnet, many, true).await;
    assert_eq!(stage, Stage::Execution);
    assert!(why.contains(&format!("more than {limit} bytes")), "{why}");

    // One file as large as it can: the kernel stops it at the limit (SIGXFSZ, 128 + 25).
    let one = r#"dd if=/dev/zero of="$HORDE_OUTPUT_DIR/big" bs=1M count=64 2>/dev/null; echo "dd $?"; echo "size $(stat -c %s "$HORDE_OUTPUT_DIR/big")"; sleep 600"#;
    let (stage, why, stdout) = over_the_disk_limit(&testnet, one, false).await;
    assert_eq!(stage, Stage::Readiness);
    assert!(why.contains("bytes"), "{why}");
    assert!(stdout.contains("dd 153"), "{stdout}");
    assert!(stdout.contains(&format!("size {limit}")), "{stdout}");

    // stdout flooded: the log stops at the limit too.
    let flood = r#"head -c 67108864 /dev/zero | tr '\0' x; echo "flood $?" >&2; sleep 600"#;
    let (_, why, stdout) = over_the_disk_limit(&testnet, flood, false).await;
    assert!(why.contains("bytes"), "{why}");
    assert!(stdout.ends_with("xxxx"), "the log's tail is the flood's");

    // Files deleted but held open (each under the per-file limit): in no directory, on the disk.
    let held = r#"python3 -c "
import os, time
held = []
for i in range(4):
    f = open(os.path.join(os.environ['HORDE_OUTPUT_DIR'], 'h%d' % i), 'wb')
    os.unlink(f.name)
    f.write(bytes(15 << 20))
    f.flush()
    held.append(f)
print('holding', flush=True)
time.sleep(600)
""#;
    let (_, why, stdout) = over_the_disk_limit(&testnet, held, false).await;
    assert!(why.contains(&format!("more than {limit} bytes")), "{why}");
    assert!(stdout.contains("holding"), "{stdout}");

    // Many empty files: few blocks, many inodes.
    let files = r#"python3 -c "
import os
d = os.environ['HORDE_OUTPUT_DIR']
for i in range(150000):
    open(os.path.join(d, str(i)), 'w').close()
"; sleep 600"#;
    let (_, why, _) = over_the_disk_limit(&testnet, files, false).await;
    let most = MAX_JOB_FILES;
    assert!(why.contains(&format!("more than {most} files")), "{why}");

    // The executor runs the next job as before.
    let mut fine = JobRequest::command("small-disk", "/bin/sh");
    let script = r#"head -c 1048576 /dev/zero > "$HORDE_OUTPUT_DIR/ok"; echo fine
exec python3 -m http.server --bind 127.0.0.1 "$HORDE_JOB_PORT""#;
    fine.args = vec!["-c".into(), script.into()];
    fine.readiness = ReadinessProbe::Tcp;
    let (_client, mut job) = submit(&testnet, &fine).await;
    job.wait_for_endpoint().await.unwrap();
    tokio::time::sleep(MEASURE_EVERY * 2).await;
    job.terminate().await.unwrap();
    let end = job.wait_for_end().await.unwrap();
    let JobStatus::Completed(result) = end else {
        panic!("{end:?}");
    };
    assert!(result.stdout_tail.contains("fine"), "{result:?}");
}

/// The miner's disk full: a job fails at once in executor start-up saying so (before: it
/// started, died at its first write to stdout, "the job exited with status 101", nothing in its
/// logs; found from outside 2026-12-08), and once there is room the next job runs. Root only (a
/// small tmpfs over the miner's data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_a_full_miner_disk_fails_saying_so_and_the_next_runs_once_there_is_room() {
    let mut testnet = Testnet::start(TestnetConfig::default()).unwrap();
    testnet.kill("miner-0").unwrap();
    let data = testnet.dir().join("miner-0").join("data");
    // Its executors died with it; their directories (a link to the `horde` binary each) are
    // not copied onto the small disk.
    std::fs::remove_dir_all(data.join("executors")).unwrap();
    let Some(disk) = SmallDisk::mount_over(&data, 128 << 20) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    testnet.start_again("miner-0").unwrap();
    let filler = disk.fill("filler");
    let request = JobRequest::command("cpu", demo_job_binary().unwrap().to_str().unwrap());
    let client = Client::new(SecretKey::generate(), testnet.facilitator()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            // The restarted miner may not be chosen at once (its capacity is learnt anew).
            let mut job = client.submit(&request).await.unwrap();
            match job.wait_for_end().await.unwrap() {
                JobStatus::Rejected(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                end => break end,
            }
        }
    })
    .await
    .expect("the job ends within a minute");
    match &end {
        JobStatus::Failed(failure) => {
            assert_eq!(failure.stage, Stage::ExecutorStartup, "{end:?}");
            assert!(
                matches!(&failure.reason, FailureReason::Spawn(why) if why.contains("disk is full")),
                "{end:?}"
            );
        }
        other => panic!("{other:?}\n{}", testnet.log("miner-0")),
    }
    std::fs::remove_file(&filler).unwrap();
    let mut job = client.submit(&request).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), job.wait_for_endpoint())
        .await
        .expect("the next job is serving within 30 s")
        .unwrap();
    job.terminate().await.unwrap();
    job.wait_for_end().await.unwrap();
}
