//! `horde-testnet`: start a local horde network (`up`), run the demo job through one (`demo`), or
//! stop one started in a directory (`down`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use horde_testnet::{Runtime, Testnet, TestnetConfig};

/// Local horde networks of `horde node` processes on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(name = "horde-testnet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a network and keep it running until ctrl-c; prints a table of nodes.
    Up(Shape),
    /// Start a network, run a streaming job end to end through it, print each step, stop.
    Demo {
        #[command(flatten)]
        shape: Shape,
        /// The runner of the miners' executors: `process` (bubblewrap sandbox) or `container`
        /// (the demo job as an image built from local files, through the Docker Engine API).
        #[arg(long, default_value = "process", value_parser = demo_runtime)]
        runtime: Runtime,
    },
    /// Stop a network started with `up --dir DIR` in another terminal.
    Down {
        /// The network's directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct Shape {
    /// Validators (at least 1: a job needs one).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    validators: usize,
    /// Miners (at least 1: a job needs one).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    miners: usize,
    /// Executors per miner (at least 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    executors_per_miner: u32,
    /// Storage nodes.
    #[arg(long, default_value_t = 1)]
    storage: usize,
    /// Directory for keys, configs, logs and state (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A count of at least one: a network with no validator or no miner runs no job, so `0` is
/// refused rather than silently raised.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(count) if count >= 1 => Ok(count),
        _ => Err(format!("{text:?}: expected a whole number of at least 1")),
    }
}

/// `process` or `container`.
fn demo_runtime(text: &str) -> Result<Runtime, String> {
    match text {
        "process" => Ok(Runtime::Process),
        "container" => Ok(Runtime::Container),
        _ => Err(format!("{text:?}: expected process or container")),
    }
}

impl Shape {
    fn config(&self) -> TestnetConfig {
        TestnetConfig {
            validators: self.validators,
            miners: self.miners,
            executors_per_miner: self.executors_per_miner,
            prewarm: self.executors_per_miner,
            storage: self.storage,
            dir: self.dir.clone(),
            log_filter: "info".to_owned(),
            ..TestnetConfig::default()
        }
    }
}

fn print_table(testnet: &Testnet) {
    println!(
        "{:<14} {:<12} {:<50} {:<22} discovery address",
        "node", "role", "hotkey (ss58)", "quic address"
    );
    for node in testnet.nodes() {
        println!(
            "{:<14} {:<12} {:<50} {:<22} {}",
            node.name,
            node.role.to_string(),
            node.hotkey.to_string(),
            node.addr.to_string(),
            node.p2p.map_or_else(|| "-".to_owned(), |a| a.to_string())
        );
    }
    println!("directory: {}", testnet.dir().display());
    println!("facilitator: {}", testnet.facilitator());
    if let Some(converged) = testnet.converged_in() {
        println!(
            "discovery converged {} ms after the nodes were started",
            converged.as_millis()
        );
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Up(shape) => {
            let started = std::time::Instant::now();
            let mut testnet = Testnet::start(shape.config())?;
            println!("network up in {} ms", started.elapsed().as_millis());
            print_table(&testnet);
            let pids: Vec<String> = testnet
                .node_processes()
                .iter()
                .map(|(pid, _)| pid.to_string())
                .collect();
            std::fs::write(testnet.dir().join("pids"), pids.join("\n"))?;
            println!(
                "ctrl-c stops it (or `horde-testnet down --dir {}`)",
                testnet.dir().display()
            );
            let names: Vec<String> = testnet.nodes().iter().map(|n| n.name.clone()).collect();
            runtime.block_on(async {
                let ctrl_c = tokio::signal::ctrl_c();
                tokio::pin!(ctrl_c);
                let mut check = tokio::time::interval(std::time::Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = &mut ctrl_c => break,
                        _ = check.tick() => {
                            // `down` from another terminal (or anything else) stopped every
                            // node: nothing is left to keep up.
                            if names.iter().all(|n| !testnet.is_running(n).unwrap_or(false)) {
                                println!("every node has stopped");
                                break;
                            }
                        }
                    }
                }
            });
            testnet.shutdown();
            Ok(())
        }
        Command::Demo {
            shape,
            runtime: runner,
        } => {
            if shape.storage == 0 {
                anyhow::bail!("the demo uploads outputs and logs: it needs --storage 1 or more");
            }
            // The image first: a missing engine is said before any node starts.
            let started = std::time::Instant::now();
            let program = runtime.block_on(horde_testnet::demo::demo_program(runner))?;
            if let horde_protocol::Program::Image { reference } = &program {
                println!(
                    "image {reference} ready in {} ms",
                    started.elapsed().as_millis()
                );
            }
            let started = std::time::Instant::now();
            let testnet = Testnet::start(TestnetConfig {
                runtime: runner,
                ..shape.config()
            })?;
            println!("network up in {} ms", started.elapsed().as_millis());
            print_table(&testnet);
            let report = runtime.block_on(horde_testnet::demo::run_demo_with(
                &testnet,
                program,
                &mut std::io::stdout(),
            ));
            testnet.shutdown();
            let report = report?;
            println!(
                "demo passed: endpoint verified {} ms after submission, whole job {} ms",
                report.endpoint_ms, report.total_ms
            );
            Ok(())
        }
        Command::Down { dir } => {
            let pids = std::fs::read_to_string(dir.join("pids"))
                .with_context(|| format!("no network recorded in {}", dir.display()))?;
            // Only a pid that still runs `horde` with this directory on its command line: after
            // pid reuse, a recorded number may name a stranger.
            let dir_text = dir.display().to_string();
            let mut stopped = 0;
            for pid in pids.lines().filter(|l| !l.is_empty()) {
                let proc_dir = std::path::Path::new("/proc").join(pid);
                let is_node = std::fs::read_link(proc_dir.join("exe"))
                    .is_ok_and(|exe| exe.file_name().is_some_and(|name| name == "horde"))
                    && std::fs::read(proc_dir.join("cmdline"))
                        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&dir_text));
                if is_node {
                    let _ = std::process::Command::new("kill")
                        .args(["-INT", pid])
                        .status();
                    stopped += 1;
                }
            }
            println!("stopped {stopped} processes");
            Ok(())
        }
    }
}
