//! The bench binaries answer `--help` with their usage and exit 0, and refuse a bad flag with a
//! one-line error and exit 2, as `horde` does (issue 16, item 15).

#![allow(clippy::unwrap_used)] // Tests fail loudly on any error.

use std::process::Command;

const BENCHES: [(&str, &str); 7] = [
    ("oneshot-latency", env!("CARGO_BIN_EXE_oneshot-latency")),
    ("blob-throughput", env!("CARGO_BIN_EXE_blob-throughput")),
    ("blob-veth", env!("CARGO_BIN_EXE_blob-veth")),
    ("flow-latency", env!("CARGO_BIN_EXE_flow-latency")),
    ("discovery-scale", env!("CARGO_BIN_EXE_discovery-scale")),
    ("sdk-request-rtt", env!("CARGO_BIN_EXE_sdk-request-rtt")),
    ("flow-load", env!("CARGO_BIN_EXE_flow-load")),
];

#[test]
fn help_prints_usage_and_exits_zero() {
    for (name, program) in BENCHES {
        let output = Command::new(program).arg("--help").output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{name}: {:?}", output.status);
        assert!(
            stdout.contains(&format!("Usage: {name}")),
            "{name}: {stdout}"
        );
        assert!(!stdout.contains("backtrace"), "{name}: {stdout}");
    }
}

#[test]
fn a_bad_flag_is_a_short_error() {
    for (name, program) in BENCHES {
        let output = Command::new(program)
            .arg("--no-such-flag")
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.starts_with("error: "), "{name}: {stderr}");
        assert!(!stderr.contains("stack backtrace"), "{name}: {stderr}");
    }
}
