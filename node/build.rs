//! Builds the container runner's start gate (`gate/start-gate.c`), a small statically linked
//! program that holds a job's container until its executor is ready for it (see
//! `src/server/executor/runner/container/gate.rs`). Static, so that it runs in any image.
//! Only the `server` feature runs containers; the client-only build skips it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "gate/start-gate.c";
    println!("cargo::rerun-if-changed={source}");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_SERVER").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let gate = out.join("start-gate");
    let compiler = cc::Build::new()
        .opt_level_str("s")
        .debug(false)
        .cargo_metadata(false)
        .get_compiler();
    let mut command: Command = compiler.to_command();
    command
        .args(["-static", "-Wall", "-o"])
        .arg(&gate)
        .arg(source);
    let status = command
        .status()
        .unwrap_or_else(|error| panic!("running the C compiler {command:?}: {error}"));
    assert!(
        status.success(),
        "building {source} (a static C program: needs a C compiler and the static libc, \
         Debian's libc6-dev): {command:?} failed with {status}"
    );
}
