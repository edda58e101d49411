//! Finding the workspace's binaries (`horde`, the demo job) for tests, the testnet command and
//! the benches: from an environment variable, else built by cargo next to the running program.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Whether the running program is a test binary (cargo puts those in `target/<profile>/deps`).
fn in_test_binary() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.ends_with("deps")))
        .unwrap_or(false)
}

/// The directory holding the running program's sibling binaries (`target/<profile>/`).
fn binary_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live in target/<profile>/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Finds a workspace binary: `$<ENV>` if set; otherwise, when running under cargo (tests,
/// `cargo run`), asks cargo to build it in the running program's profile (a no-op when it is
/// fresh, so a test never runs a stale binary), then takes it from next to the running program.
pub fn workspace_binary(name: &str, package: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let dir = binary_dir().context("locating the running program")?;
    let path = dir.join(name);
    if let Some(cargo) = std::env::var_os("CARGO") {
        static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        if !built.iter().any(|b| b == name) {
            let release = dir.file_name().is_some_and(|n| n == "release");
            let mut command = Command::new(cargo);
            if in_test_binary() {
                // Build exactly what `cargo test --workspace` builds: the same feature set (dev
                // dependencies enable some), so this is a no-op after the test build itself.
                command.args(["test", "--workspace", "--no-run", "--quiet"]);
            } else {
                command.args(["build", "--quiet", "-p", package, "--bin", name]);
                // Resolve features as the `cargo run` that started us did: with the running
                // package selected too, shared dependencies keep one feature set, so the outer
                // and this nested build do not rebuild each other's artifacts on every run.
                if let Ok(running) = std::env::var("CARGO_PKG_NAME")
                    && running != package
                {
                    command.args(["-p", &running]);
                }
            }
            if release {
                command.arg("--release");
            }
            // `cargo run` hands its package's variables (CARGO_MANIFEST_DIR, CARGO_PKG_*, …) to
            // us. Build scripts such as ring's track some of them, so passing them on would make
            // the nested build redo half the graph on every run.
            for (key, _) in std::env::vars_os() {
                if let Some(key) = key.to_str()
                    && is_package_variable(key)
                {
                    command.env_remove(key);
                }
            }
            let status = command
                .status()
                .with_context(|| format!("building {name}"))?;
            if !status.success() {
                bail!("could not build {name} (cargo build -p {package} --bin {name})");
            }
            built.push(name.to_owned());
        }
    }
    if !path.is_file() {
        bail!(
            "{} not found; build it with `cargo build -p {package} --bin {name}` or set {env}",
            path.display()
        );
    }
    Ok(path)
}

/// Variables cargo sets for the package it runs, as opposed to cargo's own configuration.
fn is_package_variable(key: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_TARGET_TMPDIR",
    ];
    key == "CARGO_PRIMARY_PACKAGE" || PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The `horde` binary.
pub fn horde_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("horde", "horde-node", "HORDE_BIN")
}

/// The demo job binary.
pub fn demo_job_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("horde-demo-job", "horde-testnet", "HORDE_DEMO_JOB_BIN")
}

#[cfg(test)]
mod tests {
    use super::is_package_variable;

    #[test]
    fn nested_builds_drop_the_running_package_variables_only() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ] {
            assert!(is_package_variable(key), "{key} should be dropped");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "CARGO_NET_OFFLINE",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "RUSTFLAGS",
        ] {
            assert!(!is_package_variable(key), "{key} should be kept");
        }
    }
}
