//! The container runner against a real engine (Docker Engine or Podman's service on
//! `DOCKER_HOST` / the standard socket), with real jobs in an image built here from local
//! files: a rootfs holding a statically linked busybox, imported into the engine.
//!
//! Each test fails with a clear message when no engine answers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on any error.

#[path = "support/engine.rs"]
mod engine;
#[path = "support/internet.rs"]
mod internet;

use std::collections::HashMap;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::RemoveImageOptions;
use horde_node::server::executor::disk::JobProcesses;
use horde_node::server::executor::runner::container::{ContainerRunner, image};
use horde_node::server::executor::runner::egress::Egress;
use horde_node::server::executor::runner::{ClassPolicy, NetworkPolicy, Runner, RunnerError};
use horde_protocol::{JobId, Program};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use self::engine::{
    IMAGE, JOB_PORT, READY_WITHIN, containers_of, host_process_with, http_get, image_program,
    import, import_with, job_dir, launch, negotiated, policy, remove, rootfs_tar, run_to_exit,
    runner, save, test_image, until_ready,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reads_its_volume_writes_its_output_and_reaches_its_executor() {
    let runner = runner().await;
    let dir = job_dir();
    let script = r#"
        cp /horde/volume/in.txt /horde/output/copy.txt
        echo "to stdout"; echo "to stderr" >&2
        wget -q -O - --post-data=files-ready "$HORDE_EXECUTOR_URL/outputs"
        mkdir /tmp/www && echo "served from the job" > /tmp/www/index.html
        exec httpd -f -p "$HORDE_JOB_PORT" -h /tmp/www
    "#;
    let launch = launch(dir.path(), image_program(), script, policy());
    let id = launch.job_id;
    let mut job = runner.start(launch).await.unwrap();

    // The job's POST to HORDE_EXECUTOR_URL arrives here.
    let mut outputs = tokio::time::timeout(READY_WITHIN, job.accept_outputs())
        .await
        .unwrap()
        .unwrap();
    let mut request = vec![0u8; 4096];
    let mut read = 0;
    while !String::from_utf8_lossy(&request[..read]).contains("files-ready") {
        let n = outputs.read(&mut request[read..]).await.unwrap();
        assert!(n > 0, "the outputs request ended early");
        read += n;
    }
    assert!(String::from_utf8_lossy(&request[..read]).starts_with("POST /outputs "));
    outputs
        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nnoted-ok")
        .await
        .unwrap();
    drop(outputs);

    until_ready(job.as_ref()).await;
    let response = http_get(job.as_ref(), "/index.html").await;
    assert!(response.contains("served from the job"), "{response}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("output/copy.txt")).unwrap(),
        "volume says hi\n"
    );

    let exit = job.stop(Duration::from_secs(3)).await.unwrap();
    assert!(!exit.out_of_memory, "{exit:?}");
    let stdout = std::fs::read_to_string(dir.path().join("logs/output/stdout")).unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("logs/output/stderr")).unwrap();
    assert!(
        stdout.contains("to stdout") && stdout.contains("noted-ok"),
        "{stdout}"
    );
    // Its one POST was answered: the start gate holds the job until the endpoint listens.
    assert_eq!(stderr, "to stderr\n");
    remove(job, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_job_is_refused_everything() {
    let runner = runner().await;
    let dir = job_dir();
    // Host secrets the job must not reach.
    let host = tempfile::tempdir().unwrap();
    let key_file = host.path().join("hotkey.json");
    std::fs::write(&key_file, r#"{"secretSeed":"0x00"}"#).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // A host process to see and signal, and a host listener to reach.
    let marker = format!("98765{}", std::process::id());
    let mut host_process = KillOnDrop(
        std::process::Command::new("sleep")
            .arg(&marker)
            .spawn()
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let accepting = tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let host_ip = host_addresses()
        .into_iter()
        .next()
        .unwrap_or("192.0.2.2".into());

    let script = r#"
        tries=0
        try() { name=$1; shift; tries=$((tries+1))
                if "$@" >/dev/null 2>&1; then echo "ESCAPED $name"; else echo "refused $name"; fi; }
        must() { name=$1; shift
                 if "$@" >/dev/null 2>&1; then echo "ok $name"; else echo "FAILED $name"; fi; }
        try read-key-file cat "$KEY_FILE"
        try list-host-dir ls "$HOST_DIR"
        try find-key-files sh -c 'find / -name hotkey.json 2>/dev/null | grep -q .'
        printf %s "$MARKER" > /tmp/marker
        try see-host-process sh -c 'grep -l -f /tmp/marker /proc/[0-9]*/cmdline | grep -q .'
        try ps-host-process sh -c 'ps | grep -q -f /tmp/marker'
        try signal-host-process kill -0 "$HOST_PID"
        try stop-host-process kill -STOP "$HOST_PID"
        try write-root touch /x
        try write-etc touch /etc/x
        try write-bin touch /bin/x
        try write-volume touch /horde/volume/x
        try run-as-root sh -c '[ "$(id -u)" = 0 ]'
        try other-uid sh -c '[ "$(id -u)" != "$EXPECTED_UID" ]'
        try capabilities sh -c 'grep -q "^CapEff:[[:space:]]*0*$" /proc/self/status && exit 1 || exit 0'
        try new-privileges sh -c 'grep -q "^NoNewPrivs:[[:space:]]*1" /proc/self/status && exit 1 || exit 0'
        try mount mount -t tmpfs none /tmp
        try chroot chroot / true
        try host-loopback nc -w 2 127.0.0.1 "$HOST_PORT"
        try host-bridge nc -w 2 172.17.0.1 "$HOST_PORT"
        try host-address nc -w 2 "$HOST_IP" "$HOST_PORT"
        try any-interface sh -c 'ip -o link | grep -v " lo:" | grep -q .'
        try any-route sh -c 'ip route | grep -q .'
        nc -l -p 9999 >/dev/null 2>&1 &
        sleep 0.2
        must own-loopback nc -w 2 127.0.0.1 9999
        must write-tmp touch /tmp/ok
        must write-output touch /horde/output/ok
        must read-volume cat /horde/volume/in.txt
        echo "tries $tries"
    "#;
    let mut policy = policy();
    policy.uid = Some(4321);
    let mut launch = launch(dir.path(), image_program(), script, policy);
    launch.env = vec![
        ("KEY_FILE".into(), key_file.display().to_string()),
        ("HOST_DIR".into(), host.path().display().to_string()),
        ("MARKER".into(), marker.clone()),
        ("HOST_PID".into(), host_process.0.id().to_string()),
        ("HOST_PORT".into(), host_port.to_string()),
        ("HOST_IP".into(), host_ip),
        ("EXPECTED_UID".into(), "4321".into()),
    ];
    let id = launch.job_id;
    let mut job = runner.start(launch).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), job.wait())
        .await
        .unwrap()
        .unwrap();
    let stdout = std::fs::read_to_string(dir.path().join("logs/output/stdout")).unwrap();
    println!("{stdout}");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(!stdout.contains("ESCAPED"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert_eq!(stdout.matches("refused ").count(), 22, "{stdout}");
    assert!(stdout.contains("tries 22"), "{stdout}");
    assert_eq!(stdout.matches("ok ").count(), 4, "{stdout}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // The host process was neither stopped nor killed.
    assert!(host_process.0.try_wait().unwrap().is_none());
    let state = std::fs::read_to_string(format!("/proc/{}/stat", host_process.0.id())).unwrap();
    assert!(!state.contains(") T "), "stopped: {state}");
    drop(host_process);
    accepting.abort();
    remove(job, id).await;
}

/// A host process killed when the test ends, failed or not (a leaked one would hold the test
/// harness's output pipe open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host's global IPv4 addresses (not loopback, not docker0).
fn host_addresses() -> Vec<String> {
    internet::host_addresses()
        .into_iter()
        .filter(|address| !address.starts_with("127.") && !address.starts_with("172.17."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_job_started_outlives_it() {
    let runner = runner().await;
    let dir = job_dir();
    let stopped = format!("1234{}1", std::process::id());
    let exited = format!("1234{}2", std::process::id());

    // Stopped by the executor: a `setsid` child and a daemonized grandchild go with it.
    let script = format!(
        "setsid sleep {stopped} & (setsid sh -c 'sleep {stopped} &' &); \
         exec httpd -f -p $HORDE_JOB_PORT -h /tmp"
    );
    let launch1 = launch(dir.path(), image_program(), &script, policy());
    let id = launch1.job_id;
    let mut job = runner.start(launch1).await.unwrap();
    until_ready(job.as_ref()).await;
    assert!(host_process_with(&stopped), "the children run meanwhile");
    job.stop(Duration::from_secs(2)).await.unwrap();
    assert!(
        !host_process_with(&stopped),
        "a child outlived the stopped job"
    );
    remove(job, id).await;

    // Ended on its own, leaving a `setsid` child behind.
    let dir = job_dir();
    let script = format!("setsid sleep {exited} & sleep 0.5; exit 0");
    let launch2 = launch(dir.path(), image_program(), &script, policy());
    let id = launch2.job_id;
    let mut job = runner.start(launch2).await.unwrap();
    let exit = job.wait().await.unwrap();
    assert_eq!(exit.code, Some(0));
    assert!(!host_process_with(&exited), "a child outlived the job");
    remove(job, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_limit_ends_out_of_memory() {
    let runner = runner().await;
    let dir = job_dir();
    let mut policy = policy();
    policy.memory_bytes = Some(32 << 20);
    let script = "sleep 0.3; dd if=/dev/zero of=/dev/null bs=256M count=1; echo survived";
    let launch = launch(dir.path(), image_program(), script, policy);
    let id = launch.job_id;
    let mut job = runner.start(launch).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), job.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.out_of_memory, "{exit:?}");
    remove(job, id).await;
}

/// No file a job writes grows past its class's disk limit: not one in its output directory (the
/// `fsize` ulimit: the writer gets SIGXFSZ, 128 + 25), not its stdout (the executor keeps the
/// first `disk_bytes` of it and drops the rest, the job never held by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_file_grows_past_the_disk_limit() {
    let runner = runner().await;
    let dir = job_dir();
    let mut policy = policy();
    let limit: u64 = 4 << 20;
    policy.disk_bytes = Some(limit);
    let script = "dd if=/dev/zero of=/horde/output/big bs=1M count=16 2>/dev/null; \
                  echo \"dd $?\" >&2; head -c 16777216 /dev/zero; echo \"flood $?\" >&2";
    let launch = launch(dir.path(), image_program(), script, policy);
    let exit = run_to_exit(&runner, launch).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    let size = |path: &str| std::fs::metadata(dir.path().join(path)).unwrap().len();
    assert_eq!(size("output/big"), limit);
    assert_eq!(size("logs/output/stdout"), limit);
    let stderr = std::fs::read_to_string(dir.path().join("logs/output/stderr")).unwrap();
    assert!(stderr.contains("dd 153"), "{stderr}");
    assert!(stderr.contains("flood 0"), "{stderr}");
}

/// A file the job deleted but keeps open is in no directory, yet holds its space: it is found
/// through the container's pid namespace, counted once, and not before it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_the_job_holds_open_is_counted() {
    let runner = runner().await;
    let dir = job_dir();
    let script = "exec 3>/horde/output/held; rm /horde/output/held; sleep 1; \
                  head -c 4194304 /dev/zero >&3; sleep 600";
    let launch = launch(dir.path(), image_program(), script, policy());
    let id = launch.job_id;
    let job = runner.start(launch).await.unwrap();
    let output = dir.path().join("output");
    let processes = JobProcesses::of(job.pid().expect("the container's pid"), &output)
        .expect("the container has a pid namespace of its own");
    assert_eq!(
        processes.deleted_but_open(),
        0,
        "counted before it was written"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes.deleted_but_open() < 4 << 20 {
        assert!(Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(processes.deleted_but_open() < 5 << 20);
    remove(job, id).await;
}

/// An image's `VOLUME`s are tmpfs of the class's `tmp_mb`, not engine volumes on the host's
/// disk (writable whatever the read-only root, and measured by nothing); an image declaring
/// more than `MAX_IMAGE_VOLUMES` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_images_volumes_are_bounded_tmpfs() {
    let runner = runner().await;
    let docker = negotiated().await;
    let dir = job_dir();
    let tag = JobId::random().to_string();
    let name = format!("horde-test-volumes:{}", &tag[..12]);
    let tar = rootfs_tar(dir.path(), &[]);
    let changes = vec!["VOLUME /data".to_owned()];
    let id = import_with(&docker, &name, tar.clone(), changes).await;
    let mut small = policy();
    small.tmp_bytes = Some(1 << 20);
    let script = "dd if=/dev/zero of=/data/big bs=1M count=4 2>/dev/null; echo \"dd $?\"; \
                  grep ' /data ' /proc/mounts";
    let program = Program::Image {
        reference: name.clone(),
    };
    let exit = run_to_exit(&runner, launch(dir.path(), program, script, small)).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    let stdout = std::fs::read_to_string(dir.path().join("logs/output/stdout")).unwrap();
    assert!(stdout.contains("dd 1"), "the 4 MiB write fit:\n{stdout}");
    assert!(stdout.contains("tmpfs /data tmpfs"), "{stdout}");

    let many = format!("horde-test-volumes:{}", &tag[12..24]);
    let changes = (0..=image::MAX_IMAGE_VOLUMES)
        .map(|n| format!("VOLUME /v{n}"))
        .collect();
    let many_id = import_with(&docker, &many, tar, changes).await;
    let program = Program::Image {
        reference: many.clone(),
    };
    let other = job_dir();
    match runner
        .start(launch(other.path(), program, "true", policy()))
        .await
    {
        Err(RunnerError::Refused(why)) => assert!(why.contains("declares 9 volumes"), "{why}"),
        Err(error) => panic!("{error}"),
        Ok(_) => panic!("an image with 9 volumes ran"),
    }
    let force = RemoveImageOptions {
        force: true,
        ..RemoveImageOptions::default()
    };
    for image in [id, many_id] {
        docker
            .remove_image(&image, Some(force.clone()), None)
            .await
            .unwrap();
    }
}

/// Not a test on its own: the "executor" of [`the_container_is_gone_soon_after_its_executor_is_killed`],
/// run in a child process. Starts a job through the runner, says so, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_executor() {
    let Ok(job) = std::env::var("HORDE_TEST_CHILD_JOB") else {
        return;
    };
    let dir = PathBuf::from(std::env::var("HORDE_TEST_CHILD_DIR").unwrap());
    let runner = internet_runner().await;
    let mut launch = launch(&dir, image_program(), "sleep 600", internet_policy());
    launch.job_id = job.parse().unwrap();
    let job = runner.start(launch).await.unwrap();
    println!("STARTED");
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(job);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_is_gone_soon_after_its_executor_is_killed() {
    test_image();
    let dir = job_dir();
    let job = JobId::random();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_executor",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HORDE_TEST_CHILD_JOB", job.to_string())
        .env("HORDE_TEST_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the child executor ended").unwrap();
        if line.contains("STARTED") {
            break;
        }
    }
    assert_eq!(containers_of(job).await.len(), 1, "the job runs");
    assert_eq!(internet::job_links(job).len(), 1, "with its veth pair");
    child.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    child.wait().unwrap();
    while !containers_of(job).await.is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the container outlived its executor by 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "container gone {:?} after its executor's SIGKILL",
        killed.elapsed()
    );
    // Its veth pair goes with its network namespace.
    while !internet::job_links(job).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the job's veth pair outlived its executor by 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_containers_are_reaped_at_start() {
    test_image();
    let docker = negotiated().await;
    let job = JobId::random();
    let body = bollard::models::ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec!["sleep".into(), "600".into()]),
        labels: Some(HashMap::from([
            ("horde.job".to_owned(), job.to_string()),
            // An executor that is not running: pid 4194303 is above any pid_max default.
            ("horde.executor".to_owned(), "4194303.5".to_owned()),
        ])),
        host_config: Some(bollard::models::HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker.create_container(None, body).await.unwrap();
    assert_eq!(containers_of(job).await.len(), 1);
    runner().await;
    assert_eq!(containers_of(job).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_and_bad_jobs_are_typed_failures_leaving_nothing() {
    let runner = runner().await;
    let image_id = test_image();

    // Pinned to its id: runs.
    let dir = job_dir();
    let pinned = Program::Image {
        reference: format!("{IMAGE}@{image_id}"),
    };
    let exit = run_to_exit(&runner, launch(dir.path(), pinned, "exit 0", policy())).await;
    assert_eq!(exit.code, Some(0));

    // Pinned to another digest: refused.
    let other = format!("{IMAGE}@sha256:{}", "0".repeat(64));
    let launch2 = launch(
        dir.path(),
        Program::Image { reference: other },
        "true",
        policy(),
    );
    let id = launch2.job_id;
    let error = runner.start(launch2).await.unwrap_err();
    assert!(
        matches!(error, RunnerError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(containers_of(id).await.is_empty());

    // Absent, and no registry to pull from.
    let absent = Program::Image {
        reference: "horde-test-absent:never".into(),
    };
    let launch3 = launch(dir.path(), absent, "true", policy());
    let id = launch3.job_id;
    let started = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(60), runner.start(launch3))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(error, RunnerError::ImageMissing { .. }), "{error}");
    println!("absent image refused in {:?}", started.elapsed());
    assert!(containers_of(id).await.is_empty());

    // A program, not an image.
    let command = Program::Command {
        program: "/bin/sh".into(),
    };
    let error = runner
        .start(launch(dir.path(), command, "true", policy()))
        .await
        .unwrap_err();
    assert!(matches!(error, RunnerError::Unsupported(_)), "{error}");

    // Exits at once: a typed failure at start, or an exit seen at once.
    let exit = run_to_exit(
        &runner,
        launch(dir.path(), image_program(), "exit 3", policy()),
    )
    .await;
    assert_eq!(exit.code, Some(3));

    // Never opens its port: connects are refused (a readiness probe fails on that).
    let launch5 = launch(dir.path(), image_program(), "sleep 600", policy());
    let id = launch5.job_id;
    let mut job = runner.start(launch5).await.unwrap();
    let error = job.dialer().connect().await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    let exit = job.stop(Duration::from_millis(500)).await.unwrap();
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    remove(job, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_that_are_not_images_are_refused() {
    let runner = runner().await;
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 10_000]).unwrap();
    let error = image::load(runner.engine(), &junk).await.unwrap_err();
    assert!(matches!(error, RunnerError::NotAnImage(_)), "{error}");
    // A valid tar holding no image.
    let tar = rootfs_tar(dir.path(), &[]);
    let not_image = dir.path().join("rootfs.tar");
    std::fs::write(&not_image, tar).unwrap();
    let error = image::load(runner.engine(), &not_image).await.unwrap_err();
    assert!(matches!(error, RunnerError::NotAnImage(_)), "{error}");
}

/// An archive whose manifest tags a name the engine has for another image is refused before
/// the engine loads it: the name keeps its image, and the archive's image is not loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_would_retag_an_existing_name_is_refused() {
    let runner = runner().await;
    let existing = test_image().to_owned();
    let docker = negotiated().await;
    let dir = tempfile::tempdir().unwrap();
    // An image of its own under a name, saved (its manifest carries the name), then removed;
    // the name is given to the test image instead.
    let marker = format!("retag-{}", JobId::random());
    let name = format!("horde-test-retag:{}", &marker[6..18]);
    let own = import(
        &docker,
        &name,
        rootfs_tar(dir.path(), &[("marker", &marker)]),
    )
    .await;
    let archive = dir.path().join("retag.tar");
    std::fs::write(&archive, save(&docker, &name).await).unwrap();
    let force = RemoveImageOptions {
        force: true,
        ..RemoveImageOptions::default()
    };
    docker.remove_image(&own, Some(force), None).await.unwrap();
    let (repo, tag) = name.split_once(':').unwrap();
    let options = bollard::query_parameters::TagImageOptions {
        repo: Some(repo.into()),
        tag: Some(tag.into()),
    };
    docker.tag_image(&existing, Some(options)).await.unwrap();

    let error = image::load(runner.engine(), &archive).await.unwrap_err();
    let untag = RemoveImageOptions::default();
    let name_now = docker.inspect_image(&name).await.map(|image| image.id);
    let own_now = docker.inspect_image(&own).await.is_ok();
    docker.remove_image(&name, Some(untag), None).await.unwrap();
    match &error {
        RunnerError::Retag {
            name: retagged,
            existing: was,
            archive,
        } => {
            // Podman's `save` writes the name fully qualified.
            let qualified = format!("docker.io/library/{name}");
            assert!(retagged == &name || retagged == &qualified, "{retagged}");
            assert_eq!((was, archive), (&existing, &own));
        }
        other => panic!("{other}"),
    }
    assert_eq!(name_now.unwrap(), Some(existing), "the name kept its image");
    assert!(!own_now, "the archive's image was not loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_blob_runs_from_storage_and_a_corrupted_one_is_refused() {
    use horde_node::server::storage::{BlobStore, StoreLimits, serve};
    use horde_transport::test_utils::{localhost_endpoint, seeded_key};

    test_image();
    let docker = negotiated().await;
    // An image of its own, saved to an archive and removed from the engine, so only the
    // archive can bring it back.
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("blob-image-{}", JobId::random());
    let name = format!("horde-test-blob:{}", &marker[11..23]);
    let tar = rootfs_tar(dir.path(), &[("marker", &marker)]);
    import(&docker, &name, tar).await;
    let saved = save(&docker, &name).await;
    let force = RemoveImageOptions {
        force: true,
        ..RemoveImageOptions::default()
    };
    docker.remove_image(&name, Some(force), None).await.unwrap();
    let archive = dir.path().join("image.tar");
    std::fs::write(&archive, &saved).unwrap();

    // A storage node holding the archive.
    let store_dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(store_dir.path(), StoreLimits::default()).unwrap());
    let storage_endpoint = Arc::new(localhost_endpoint(&seeded_key(20)));
    let storage = horde_protocol::NodeAddr {
        hotkey: storage_endpoint.hotkey(),
        addrs: vec![storage_endpoint.local_addr().unwrap()],
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(storage_endpoint, Arc::clone(&store), cancel.clone()));
    let client = Arc::new(localhost_endpoint(&seeded_key(1)));
    let hash = horde_node::client::blob::put_file(
        &client,
        &storage,
        &archive,
        &horde_node::client::blob::TransferPolicy::default(),
        &mut horde_node::client::progress::NoProgress,
    )
    .await
    .unwrap();

    let runner = runner().await.with_blob_endpoint(Arc::clone(&client));
    let program = Program::ImageBlob {
        hash,
        size: saved.len() as u64,
        storage: storage.clone(),
    };
    let first = job_dir();
    let launch1 = launch(first.path(), program.clone(), "cat /marker", policy());
    assert_eq!(run_to_exit(&runner, launch1).await.code, Some(0));
    let stdout = std::fs::read_to_string(first.path().join("logs/output/stdout")).unwrap();
    assert_eq!(stdout, marker, "the job ran the archive's image");

    // One bit flipped on the storage node's disk: refused as an integrity failure.
    let force = RemoveImageOptions {
        force: true,
        ..RemoveImageOptions::default()
    };
    let _ = docker.remove_image(&name, Some(force), None).await;
    let blob = store.blob_path(&hash);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[saved.len() / 2] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let second = job_dir();
    let launch2 = launch(second.path(), program, "true", policy());
    let id = launch2.job_id;
    let error = runner.start(launch2).await.unwrap_err();
    assert!(matches!(error, RunnerError::Integrity(_)), "{error}");
    assert!(containers_of(id).await.is_empty());
    assert!(
        docker.inspect_image(&name).await.is_err(),
        "nothing was loaded"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_of_start_and_of_tunnel_connections() {
    let runner = runner().await;
    let mut starts = Vec::new();
    let mut last = None;
    for _ in 0..10 {
        let dir = job_dir();
        let launch = launch(
            dir.path(),
            image_program(),
            "exec httpd -f -p $HORDE_JOB_PORT -h /tmp",
            policy(),
        );
        let id = launch.job_id;
        let started = Instant::now();
        let job = runner.start(launch).await.unwrap();
        until_ready(job.as_ref()).await;
        starts.push(started.elapsed());
        if let Some((job, id)) = last.replace((job, id)) {
            remove(job, id).await;
        }
        drop(dir);
    }
    let (job, id) = last.unwrap();
    starts.sort();
    println!(
        "container start -> port ready: p50 {:?}, min {:?}, max {:?} (10 runs)",
        starts[starts.len() / 2],
        starts[0],
        starts[starts.len() - 1]
    );

    // Tunnel connections: through the namespace thread vs a plain loopback connect.
    const CONNECTS: u32 = 200;
    let dialer = job.dialer();
    let mut through = Vec::new();
    for _ in 0..CONNECTS {
        let started = Instant::now();
        let stream = dialer.connect().await.unwrap();
        through.push(started.elapsed());
        drop(stream);
        // Paced, so the server's accept backlog never fills (its SYN retries would be measured).
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The baseline: the same server (busybox httpd) on the host's loopback.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let address: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut server = std::process::Command::new("busybox")
        .args(["httpd", "-f", "-p", &address.to_string(), "-h", "/tmp"])
        .spawn()
        .expect("busybox on the host");
    while tokio::net::TcpStream::connect(address).await.is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut plain = Vec::new();
    for _ in 0..CONNECTS {
        let started = Instant::now();
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        plain.push(started.elapsed());
        drop(stream);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.kill().unwrap();
    let _ = server.wait();
    through.sort();
    plain.sort();
    let p = |samples: &[Duration], q: usize| samples[samples.len() * q / 100];
    println!(
        "tunnel connect through the namespace thread: p50 {:?} p99 {:?}; plain loopback: p50 {:?} p99 {:?}",
        p(&through, 50),
        p(&through, 99),
        p(&plain, 50),
        p(&plain, 99)
    );
    remove(job, id).await;
}

async fn internet_runner() -> ContainerRunner {
    let egress = Egress::prepare()
        .await
        .expect("this host gives jobs egress (the node runs as root, `ip` and `nft` installed)");
    runner().await.with_egress(egress)
}

fn internet_policy() -> ClassPolicy {
    ClassPolicy {
        network: NetworkPolicy::Internet,
        ..policy()
    }
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
    let other_dir = job_dir();
    let other = launch(
        other_dir.path(),
        image_program(),
        internet::OTHER_JOB,
        internet_policy(),
    );
    let other_id = other.job_id;
    let other_job = runner.start(other).await.unwrap();
    let other_outputs = internet::outputs_port(&other_dir.path().join("output")).await;
    let other_address = internet::job_address(other_id);
    for (policy, internet) in [(internet_policy(), true), (policy(), false)] {
        let dir = job_dir();
        let launch = launch(dir.path(), image_program(), internet::PROBE, policy);
        let id = launch.job_id;
        let others = (other_address, [JOB_PORT, other_outputs]);
        let job = internet::probe(&runner, launch, internet, &peer, &host, others).await;
        remove(job, id).await;
        assert_eq!(internet::job_links(id), Vec::<String>::new(), "left behind");
    }
    assert_eq!(host.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(peer.answers());
    remove(other_job, other_id).await;
    assert_eq!(internet::job_links(other_id), Vec::<String>::new());
}
