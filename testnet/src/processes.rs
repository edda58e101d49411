//! What runs under a testnet: its node, job and sandbox processes, found in `/proc` by the
//! testnet's directory in their command lines.

use super::*;

impl Testnet {
    /// Processes whose command line mentions this testnet's directory (nodes and the executors
    /// miners spawned), as `(pid, command line)`.
    pub fn processes(&self) -> Vec<(u32, String)> {
        self.scan_processes(|process| process.cmdline.contains(self.dir_text().as_str()))
    }

    /// This testnet's `horde` processes (nodes, the executors they started): processes running
    /// the testnet's `horde` binary whose command line names the testnet's directory. Another
    /// program that merely names the directory (this harness's own command, a terminal
    /// multiplexer, an editor) is not one of them.
    pub fn node_processes(&self) -> Vec<(u32, String)> {
        let own = std::process::id();
        let binary = std::fs::canonicalize(&self.horde_bin).unwrap_or(self.horde_bin.clone());
        self.processes()
            .into_iter()
            .filter(|(pid, _)| {
                *pid != own
                    && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == binary)
            })
            .collect()
    }

    /// Job processes of this testnet's executors, as `(pid, command line)`: the job and what it
    /// started, without its sandbox's own machinery (bubblewrap and the sandbox init).
    pub fn job_processes(&self) -> Vec<(u32, String)> {
        self.sandbox_processes()
            .into_iter()
            .filter(|(_, cmdline)| {
                let program = cmdline.split(' ').next().unwrap_or_default();
                !program.ends_with("bwrap") && program != "/horde/init"
            })
            .collect()
    }

    /// Every process of this testnet's jobs, sandbox machinery included: processes whose mount
    /// table binds a job output directory under the testnet's directory (a sandboxed job), or
    /// whose environment names one (an unisolated job). A sandbox an executor made ahead for
    /// its next job, no job in it yet, binds its output from a slot directory
    /// (`jobs/.sandbox-*`) instead and is not a job's; once a job has it, its output directory
    /// is the job's (and stays so, deleted or not).
    pub fn sandbox_processes(&self) -> Vec<(u32, String)> {
        let dir = format!("{}/", self.dir_text());
        let env_dir = format!("HORDE_OUTPUT_DIR={dir}");
        self.scan_processes(|process| {
            process
                .environ
                .split('\0')
                .any(|variable| variable.starts_with(&env_dir))
                || std::fs::read_to_string(process.path.join("mountinfo")).is_ok_and(|mounts| {
                    mounts.lines().any(|mount| {
                        let mut fields = mount.split(' ').skip(3);
                        let (root, point) = (fields.next(), fields.next());
                        point == Some("/horde/output")
                            && root.is_some_and(|root| {
                                root.contains(dir.as_str()) && !root.contains("/jobs/.sandbox-")
                            })
                    })
                })
        })
    }

    fn dir_text(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }

    /// Live processes (zombies left out) for which `keep` holds, as `(pid, command line)`.
    fn scan_processes(&self, keep: impl Fn(&ProcessInfo) -> bool) -> Vec<(u32, String)> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                if state == 'Z' {
                    return None;
                }
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                let environ = String::from_utf8_lossy(&environ).into_owned();
                let process = ProcessInfo {
                    path: entry.path(),
                    cmdline,
                    environ,
                };
                keep(&process).then_some((pid, process.cmdline))
            })
            .collect()
    }
}
