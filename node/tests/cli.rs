//! The `horde` binary as an operator uses it: generate a key, start a node, read its identity and
//! address from the log, reach it over QUIC, stop it with SIGINT.

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use horde_protocol::{Hotkey, SecretKey};

const HORDE: &str = env!("CARGO_BIN_EXE_horde");

fn horde(args: &[&str]) -> std::process::Output {
    Command::new(HORDE).args(args).output().expect("runs horde")
}

#[test]
fn key_generate_then_show() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    let out = horde(&["key", "generate", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let generated = String::from_utf8(out.stdout).unwrap();
    let shown = horde(&["key", "show", path.to_str().unwrap()]);
    assert!(shown.status.success());
    let shown = String::from_utf8(shown.stdout).unwrap();
    let ss58 = shown
        .lines()
        .next()
        .unwrap()
        .strip_prefix("ss58: ")
        .unwrap();
    assert!(generated.contains(ss58));
    let from_file = SecretKey::read_key_file(&path).unwrap().hotkey();
    assert_eq!(ss58.parse::<Hotkey>().unwrap(), from_file);
    // A second generate never overwrites the key.
    let again = horde(&["key", "generate", "--out", path.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn output_to_a_reader_that_went_away_ends_quietly() {
    // `horde key show K | head -0`: the pipe's reading end is closed before horde writes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    SecretKey::generate().write_key_file(&path).unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(HORDE)
        .args(["key", "show", path.to_str().unwrap()])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(stderr.is_empty(), "nothing on stderr, no panic: {stderr}");
}

#[test]
fn a_key_that_could_not_be_written_leaves_no_file() {
    // A full disk, as the file-size limit makes it: the write fails (EFBIG, SIGXFSZ ignored).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    let out = Command::new("sh")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 0; exec \"$0\" key generate --out \"$1\"",
        ])
        .args([HORDE, path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("k.json"),
        "the error names the file: {stderr}"
    );
    assert!(!path.exists(), "no empty key file is left behind");
    // So the next try, with room, just works.
    assert!(
        horde(&["key", "generate", "--out", path.to_str().unwrap()])
            .status
            .success()
    );
}

#[test]
fn key_readable_by_others_is_refused_by_the_node() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("hotkey.json");
    SecretKey::generate().write_key_file(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "role = \"miner\"\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = horde(&["node", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "role = \"validator\"\nlisten_addr = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = horde(&["node", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_addr"), "{stderr}");
}

#[test]
fn node_starts_logs_identity_and_exits_zero_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("hotkey.json");
    assert!(
        horde(&["key", "generate", "--out", key_path.to_str().unwrap()])
            .status
            .success()
    );
    let hotkey = SecretKey::read_key_file(&key_path).unwrap().hotkey();
    let config = dir.path().join("node.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/horde.example.toml"),
        &config,
    )
    .unwrap();

    let mut child = Command::new(HORDE)
        .args([
            "node",
            "--role",
            "validator",
            "--config",
            config.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Read the log on a thread so a silent node fails the test by timeout, not by hanging.
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::sync_channel(64);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("node logs its start within 30 s");
        if line.contains("horde node started") {
            break line;
        }
    };
    assert!(started.contains(&hotkey.to_string()), "{started}");
    assert!(started.contains("role=validator"), "{started}");
    let listen = started
        .split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .expect("listen address in the log");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);

    // The node is really listening and really is that hotkey: a QUIC dial to it succeeds.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = horde_transport::test_utils::localhost_endpoint(&SecretKey::generate());
        let connection = client
            .connect(addr, &hotkey, horde_transport::ALPN_CONTROL)
            .await
            .expect("connects to the node");
        assert_eq!(horde_transport::remote_hotkey(&connection).unwrap(), hotkey);
        // The wrong expected hotkey is refused.
        let other = SecretKey::generate().hotkey();
        assert!(
            client
                .connect(addr, &other, horde_transport::ALPN_CONTROL)
                .await
                .is_err()
        );
    });

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node did not stop within 15 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let rest: Vec<String> = lines_rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

/// Runs `script` in `sh` (a parent process to kill) and returns it with its first line.
fn shell_parent(script: &str) -> (std::process::Child, String) {
    let mut parent = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(parent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (parent, line)
}

/// The state letter of a process (`R`, `S`, `Z`, …), or `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S …`: the state follows the last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn a_tied_child_runs_the_program_and_dies_with_its_parent() {
    // `sh` is the parent: it starts a tied `sleep`, prints its pid, and waits.
    let (mut parent, line) = shell_parent(&format!(
        "'{HORDE}' exec-tied --parent $$ -- sleep 600 & echo $!; wait"
    ));
    let child: u32 = line.trim().parse().unwrap();
    // The launcher becomes `sleep` itself: same pid.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"sleep\x00600") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{cmdline:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(process_state(child), Some('S' | 'R')));

    // SIGKILL leaves the parent no chance to clean up; the kernel kills the child for it.
    parent.kill().unwrap();
    parent.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(process_state(child), None | Some('Z')) {
        assert!(
            std::time::Instant::now() < deadline,
            "the tied child {child} outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_tied_child_whose_parent_is_not_there_does_not_start() {
    // This test process, not pid 1, is the launcher's parent: it refuses to run the program.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let out = horde(&[
        "exec-tied",
        "--parent",
        "1",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("parent process 1 is gone"), "{stderr}");
    assert!(!marker.exists());

    // With the right parent it runs, arguments and all; a missing program is a clear error.
    let ran = Command::new(HORDE)
        .args([
            "exec-tied",
            "--parent",
            &std::process::id().to_string(),
            "--",
        ])
        .args(["touch", marker.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ran.success() && marker.exists());
    let missing = horde(&[
        "exec-tied",
        "--parent",
        &std::process::id().to_string(),
        "--",
        "/nonexistent/job",
    ]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("starting /nonexistent/job"), "{stderr}");
}

#[test]
fn a_group_guard_kills_the_group_when_its_parent_dies() {
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
    // The guarded group: a `sleep` leading its own process group.
    let mut guarded = Command::new("sleep")
        .arg("600")
        .process_group(0)
        .spawn()
        .unwrap();
    let group = guarded.id();
    // `sh` is the guard's parent; once the guard is up it reports so and `sh` waits.
    let (mut parent, line) = shell_parent(&format!(
        "'{HORDE}' guard-group --parent $$ --group {group} & echo started; wait"
    ));
    assert_eq!(line.trim(), "started");
    // While the parent lives, the group is left alone.
    std::thread::sleep(Duration::from_millis(300));
    assert!(guarded.try_wait().unwrap().is_none());

    parent.kill().unwrap();
    parent.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = guarded.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            guarded.kill().unwrap();
            panic!("the guarded group outlived the guard's parent");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

/// Issue 16, item 9: a user-facing error is one line even with `RUST_BACKTRACE=1` in the
/// environment (`--verbose` asks for the whole report), and `horde job forward` on a busy port
/// names the address.
#[test]
fn errors_are_one_line_and_name_what_to_fix() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let state = tempfile::tempdir().unwrap();
    let run = |verbose: bool| {
        let mut command = Command::new(HORDE);
        if verbose {
            command.arg("--verbose");
        }
        command
            .args([
                "job",
                "forward",
                &"ab".repeat(16),
                "--listen",
                &addr.to_string(),
            ])
            .env("HORDE_STATE_DIR", state.path())
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap()
    };
    let output = run(false);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(&format!("listening on {addr}")), "{stderr}");
    let verbose = run(true);
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    assert!(stderr.lines().count() > 1, "{stderr}");
    drop(busy);
}

/// Issue 16, item 9: dialing a node under the wrong hotkey says which key answered and which
/// was dialed (not rustls's bare "NotValidForName"), on one line.
#[test]
fn a_wrong_hotkey_names_the_key_that_answered_and_the_one_dialed() {
    use horde_transport::test_utils::{localhost_endpoint, seeded_key};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A real QUIC endpoint of key 20, accepting (and dropping) whatever connects.
    let endpoint = runtime.block_on(async { localhost_endpoint(&seeded_key(20)) });
    let actual = endpoint.hotkey();
    let dialed = seeded_key(21).hotkey();
    let addr = endpoint.local_addr().unwrap();
    let accepting = runtime.spawn(async move { while endpoint.accept().await.is_some() {} });
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(HORDE)
        .args([
            "blob",
            "get",
            &"ab".repeat(32),
            "-o",
            out.path().join("blob").to_str().unwrap(),
            "--storage",
            &format!("{dialed}@{addr}"),
        ])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&actual.to_string()) && stderr.contains(&dialed.to_string()),
        "{stderr}"
    );
    accepting.abort();
}
