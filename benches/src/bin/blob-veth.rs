//! Blob transfer over a veth pair between two network namespaces, against what a user would
//! pick instead (curl ← nginx over HTTPS and HTTP), measured from outside in the same run.
//!
//! `blob-veth [--size 1GiB] [--rounds 5] [--mtu 1500,9000] [--no-loopback] [--json PATH]`
//! (root: it creates the namespaces `hbench-srv-PID` and `hbench-cli-PID` joined by a veth pair,
//! 198.18.0.1/24 and 198.18.0.2/24, and removes them at the end). Each MTU is one set of rounds
//! over the veth pair; then one set on loopback: the same clients run in the server namespace,
//! where the server's address is reached through `lo`. Needs `target/release/horde` beside it
//! (or `--horde`), GNU time, and for the nginx rows nginx, curl, openssl and b3sum, which
//! `.ci/bench-tools` installs; sendme's row runs when `sendme` is on PATH (`.ci/bench-tools
//! --sendme` builds it). The bench installs nothing and skips a row whose tool is missing,
//! saying so.
//!
//! Server side: one `horde node --role storage` holding a random blob, and one nginx process
//! (`master_process off`, `sendfile on`, TLS 1.3 with a self-signed RSA-2048 certificate made
//! here) serving the same file. Client side, rows alternating in every round: `get_to_file`
//! (what the CLI calls) from a runtime whose threads live in the client namespace, the
//! `horde blob get` command, `curl` over HTTPS, and over HTTP; curl's file is checked and
//! charged with a `b3sum` (horde verifies BLAKE3 while receiving), and its rate is also given
//! counting the `fsync` of what it left in the page cache (horde fsyncs before it finishes);
//! `sendme receive` ← `sendme send` of the same file (iroh-blobs verifies BLAKE3 itself; its
//! file's flush is counted as curl's is).
//! Every row: median Gbit/s and min–max, CPU s per GiB of each end, peak resident sets, the
//! rate counting the flush, and ratios to HTTPS. The server's file is read once before the
//! rounds, so every row reads it from the page cache.
//!
//! Layout: `horde_benches::netns` (namespaces, veth pair, entering them), `blob-veth/servers.rs`
//! (storage node, nginx, process counters), `blob-veth/rows.rs` (one transfer of each row).

#[path = "blob-veth/rows.rs"]
mod rows;
#[path = "blob-veth/servers.rs"]
mod servers;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use horde_benches::{load_average, median};
use horde_protocol::BlobHash;

use crate::rows::{GNU_TIME, Measurement, Route, Row, Setup};
use horde_benches::netns::{self, VethPair};

/// Random bytes are generated and written in pieces of this size.
const PIECE: usize = 1 << 20;

/// Blob transfer over a veth pair: horde beside curl ← nginx, alternating rounds.
#[derive(Debug, clap::Parser)]
#[command(name = "blob-veth")]
struct Args {
    /// Bytes per transfer (`1GiB`, `256MiB`, …).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Measured rounds per MTU (each row once per round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The veth pair's MTUs, measured one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1500,9000")]
    mtu: Vec<u32>,
    /// Leave out the loopback rounds (measured after the veth MTUs: the clients run in the
    /// server namespace and reach the same servers through its `lo`).
    #[arg(long)]
    no_loopback: bool,
    /// The `horde` binary (default: the one beside this bench).
    #[arg(long)]
    horde: Option<PathBuf>,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/blob-veth.json")]
    json: PathBuf,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    match number * factor {
        size if size >= PIECE as u64 => Ok(size / PIECE as u64 * PIECE as u64),
        _ => Err("the size must be at least 1 MiB".to_owned()),
    }
}

/// Which rows can run here; prints why each missing one is skipped.
fn available_rows(nginx: bool) -> Vec<Row> {
    // `openssl` answers `version`, the others `--version`.
    let have = |program: &str| {
        let flag = if program == "openssl" {
            "version"
        } else {
            "--version"
        };
        std::process::Command::new(program)
            .arg(flag)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    let mut rows = vec![Row::InProcess, Row::Cli];
    let missing: Vec<&str> = [
        ("nginx", nginx),
        ("curl", have("curl")),
        ("b3sum", have("b3sum")),
        ("openssl", have("openssl")),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        rows.extend([Row::Https, Row::Http]);
    } else {
        eprintln!(
            "skipping the curl ← nginx rows: {} not installed (run .ci/bench-tools)",
            missing.join(", ")
        );
    }
    if have("sendme") {
        rows.push(Row::Sendme);
    } else {
        eprintln!(
            "skipping sendme: not on PATH (`.ci/bench-tools --sendme` builds it with cargo install)"
        );
    }
    rows
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if let Some(reason) = netns::unavailable() {
        bail!("blob-veth {reason}");
    }
    if !Path::new(GNU_TIME).exists() {
        bail!("blob-veth needs GNU time at {GNU_TIME} (Debian `time`; .ci/bench-tools)");
    }
    let horde = match &args.horde {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("horde"),
    };
    if !horde.exists() {
        bail!(
            "no horde binary at {} (build it: cargo build --release -p horde-node)",
            horde.display()
        );
    }
    let nginx = horde_benches::nginx_program();
    let rows = available_rows(nginx.is_some());
    let Some(&first_mtu) = args.mtu.first() else {
        bail!("no MTU given");
    };

    let parent = args.json.parent().filter(|p| !p.as_os_str().is_empty());
    let base = parent.unwrap_or(Path::new("."));
    std::fs::create_dir_all(base)?;
    let work = tempfile::Builder::new()
        .prefix("blob-veth")
        .tempdir_in(base)?;
    // Absolute: sendme's rows run in a directory of their own.
    let work_dir = std::fs::canonicalize(work.path())?;
    let www = work_dir.join("www");
    std::fs::create_dir_all(&www)?;
    let source = www.join(servers::BLOB_FILE);
    eprintln!("writing {} random bytes to {}", args.size, source.display());
    let hash = BlobHash(horde_benches::write_random_file(
        &source,
        args.size,
        b"horde blob-veth bench data",
    )?);

    let pair = VethPair::create(first_mtu)?;
    let (storage_server, storage) =
        servers::start_storage(&pair, &horde, &work_dir.join("storage"))?;
    let put = std::process::Command::new("ip")
        .args(["netns", "exec", &pair.client])
        .arg(&horde)
        .args(["blob", "put"])
        .arg(&source)
        .args(["--storage", &storage.to_string()])
        .output()
        .context("horde blob put")?;
    let put_hash = String::from_utf8_lossy(&put.stdout).trim().to_owned();
    if !put.status.success() || put_hash != hash.to_string() {
        bail!(
            "horde blob put: {} {put_hash:?} (expected {hash})\n{}",
            put.status,
            String::from_utf8_lossy(&put.stderr)
        );
    }
    let nginx_server = match (&nginx, rows.contains(&Row::Https)) {
        (Some(nginx), true) => Some(servers::start_nginx(
            &pair,
            nginx,
            &work_dir.join("nginx"),
            &www,
        )?),
        _ => None,
    };
    let sendme_server = if rows.contains(&Row::Sendme) {
        eprintln!("sendme send: importing the file");
        Some(servers::start_sendme(
            &pair,
            &work_dir.join("sendme-send"),
            &source,
        )?)
    } else {
        None
    };
    // Every row reads the server's file from the page cache.
    std::io::copy(&mut std::fs::File::open(&source)?, &mut std::io::sink())?;

    let setup = Setup {
        client_runtime: netns::runtime_in(&pair.client)?,
        server_runtime: netns::runtime_in(&pair.server)?,
        pair,
        horde,
        work: work_dir,
        size: args.size,
        hash,
        storage,
        storage_pid: storage_server.pid(),
        nginx: nginx_server
            .as_ref()
            .map(|(server, cert)| (server.pid(), cert.clone())),
        sendme: sendme_server
            .as_ref()
            .map(|(server, ticket)| (server.pid(), ticket.clone())),
    };
    let routes: Vec<Route> = args
        .mtu
        .iter()
        .map(|&mtu| Route::Veth(mtu))
        .chain((!args.no_loopback).then_some(Route::Loopback))
        .collect();
    let mut report = Vec::new();
    for &route in &routes {
        if let Route::Veth(mtu) = route {
            setup.pair.set_mtu(mtu)?;
        }
        let load_before = load_average();
        let mut results: Vec<(Row, Vec<Measurement>)> =
            rows.iter().map(|&row| (row, Vec::new())).collect();
        for round in 0..args.rounds {
            for (row, measured) in &mut results {
                let measurement = rows::measure(&setup, route, *row)?;
                eprintln!(
                    "{}, round {}, {}: {:.2} Gbit/s ({:.2} counting the flush), \
                     {:.2} CPU s/GiB",
                    route.name(),
                    round + 1,
                    row.name(),
                    measurement.gbits(),
                    measurement.flushed_gbits(),
                    measurement.cpu_per_gib()
                );
                measured.push(measurement);
            }
        }
        let load = format!("{load_before} before, {} after", load_average());
        print_table(route, args.size, args.rounds, &load, &results);
        report.push(table_json(route, &load, &results));
    }
    drop(sendme_server);
    drop(nginx_server);
    drop(storage_server);
    let json = serde_json::json!({
        "size_bytes": args.size,
        "rounds": args.rounds,
        "paths": report,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

fn median_of(measured: &[Measurement], value: fn(&Measurement) -> f64) -> f64 {
    median(measured.iter().map(value).collect())
}

fn range_of(measured: &[Measurement], value: fn(&Measurement) -> f64) -> (f64, f64) {
    let values = measured.iter().map(value);
    let min = values.clone().fold(f64::INFINITY, f64::min);
    (min, values.fold(f64::NEG_INFINITY, f64::max))
}

/// HTTPS's median of `value`, for the ratios.
fn https_median(results: &[(Row, Vec<Measurement>)], value: fn(&Measurement) -> f64) -> f64 {
    results
        .iter()
        .find(|(row, _)| *row == Row::Https)
        .map_or(f64::NAN, |(_, measured)| median_of(measured, value))
}

fn ratio(value: f64, https: f64) -> String {
    if https.is_finite() {
        format!("{:.2}×", value / https)
    } else {
        "—".to_owned()
    }
}

fn print_table(
    route: Route,
    size: u64,
    rounds: usize,
    load: &str,
    results: &[(Row, Vec<Measurement>)],
) {
    let https_rate = https_median(results, Measurement::gbits);
    let https_flushed = https_median(results, Measurement::flushed_gbits);
    let https_cpu = https_median(results, Measurement::cpu_per_gib);
    println!();
    let path = match route {
        Route::Veth(mtu) => format!("veth pair, MTU {mtu}"),
        Route::Loopback => "loopback (clients in the server namespace)".to_owned(),
    };
    println!(
        "{path}, {} MiB file → file, median of {rounds} rounds (load average {load})",
        size >> 20
    );
    println!(
        "| row | Gbit/s | min–max | CPU s/GiB client | server | both | peak RSS client / server \
         MiB | Gbit/s counting the flush | rate vs HTTPS | flushed vs HTTPS | CPU vs HTTPS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (row, measured) in results {
        let rate = median_of(measured, Measurement::gbits);
        let (min, max) = range_of(measured, Measurement::gbits);
        let flushed = median_of(measured, Measurement::flushed_gbits);
        let cpu = median_of(measured, Measurement::cpu_per_gib);
        println!(
            "| {} | {rate:.2} | {min:.2}–{max:.2} | {:.2} | {:.2} | {cpu:.2} | {:.0} / {:.0} | \
             {flushed:.2} | {} | {} | {} |",
            row.name(),
            median_of(measured, Measurement::client_cpu_per_gib),
            median_of(measured, Measurement::server_cpu_per_gib),
            median_of(measured, |m| m.client_rss_kib) / 1024.0,
            median_of(measured, |m| m.server_rss_kib) / 1024.0,
            ratio(rate, https_rate),
            ratio(flushed, https_flushed),
            ratio(cpu, https_cpu),
        );
    }
}

fn table_json(route: Route, load: &str, results: &[(Row, Vec<Measurement>)]) -> serde_json::Value {
    serde_json::json!({
        "path": route.name(),
        "mtu": match route {
            Route::Veth(mtu) => Some(mtu),
            Route::Loopback => None,
        },
        "load_average": load,
        "rows": results.iter().map(|(row, measured)| serde_json::json!({
            "name": row.name(),
            "median_gbit_per_s": median_of(measured, Measurement::gbits),
            "median_gbit_per_s_counting_flush": median_of(measured, Measurement::flushed_gbits),
            "median_cpu_s_per_gib_client": median_of(measured, Measurement::client_cpu_per_gib),
            "median_cpu_s_per_gib_server": median_of(measured, Measurement::server_cpu_per_gib),
            "rounds": measured.iter().map(|m| serde_json::json!({
                "seconds": m.seconds,
                "flushed_seconds": m.flushed_seconds,
                "client_cpu_s": m.client_cpu,
                "server_cpu_s": m.server_cpu,
                "client_peak_rss_kib": m.client_rss_kib,
                "server_peak_rss_kib": m.server_rss_kib,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
