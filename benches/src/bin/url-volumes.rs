//! URL volumes (`url = "https://…"` in a job's volumes) and `put_url` uploads against curl on
//! the same nginx, in the same run, on loopback: the executor's own code
//! (`horde_node::server::executor::volumes::{materialize, upload}`, the HTTP client a node
//! uses, here trusting the bench's CA) beside `curl`, over HTTPS (TLS 1.3, an RSA-2048 CA and
//! server certificate made here with openssl) and plain HTTP, rows alternating in every round.
//!
//! `url-volumes [--size 256] [--rounds 5] [--json PATH]` (size in MiB). Needs nginx (with its
//! DAV module for PUT, as Debian builds it), curl, openssl and b3sum, which `.ci/bench-tools`
//! installs; without nginx the bench says so and measures nothing.
//!
//! A URL volume is complete when its file is fetched, checked against the declared size and
//! BLAKE3 and renamed into place (not fsynced: a volume lives only as long as its job, see
//! `materialize`); curl's download is timed to its exit, and again counting an `fsync` of its
//! file and a `b3sum` of it. An upload is complete when nginx
//! has answered the PUT; `upload` hashes what it sends (it reports the BLAKE3), curl does not.
//! The served file is read once before the rounds, so every row reads it from the page cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use horde_benches::{
    free_loopback_port, median, nginx_logs, nginx_program, run_tool as tool, spawn_nginx,
    write_random_file,
};
use horde_node::server::executor::volumes::{HttpClient, OutputBudget, materialize, upload};
use horde_protocol::{
    BlobHash, RelativePath, SecretKey, UploadSpec, UploadTarget, VolumeSource, VolumeSpec,
};
use horde_transport::{ALPN_JOB, EndpointConfig, HordeEndpoint};

/// URL volumes and `put_url` uploads beside curl on the same nginx.
#[derive(Debug, clap::Parser)]
#[command(name = "url-volumes")]
struct Args {
    /// MiB per transfer.
    #[arg(long, default_value_t = 256)]
    size: u64,
    /// Rounds (each row once per round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/url-volumes.json")]
    json: PathBuf,
}

/// The file nginx serves.
const FILE: &str = "data.bin";

/// An RSA-2048 CA and a server certificate for 127.0.0.1 it signed (a leaf, as a client that
/// checks certificates properly requires); returns the CA's file.
fn make_certificates(dir: &Path) -> anyhow::Result<PathBuf> {
    let file = |name: &str| dir.join(name);
    tool(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=horde-bench-ca", "-keyout"])
            .arg(file("ca.key"))
            .arg("-out")
            .arg(file("ca.pem")),
    )?;
    tool(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(file("server.key"))
            .arg("-out")
            .arg(file("server.csr")),
    )?;
    std::fs::write(
        file("server.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )?;
    tool(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(file("server.csr"))
            .arg("-CA")
            .arg(file("ca.pem"))
            .arg("-CAkey")
            .arg(file("ca.key"))
            .arg("-extfile")
            .arg(file("server.ext"))
            .arg("-out")
            .arg(file("server.pem")),
    )?;
    Ok(file("ca.pem"))
}

/// nginx serving `root` (GET, and PUT under `/up/`) over HTTPS and HTTP; killed when dropped.
struct Nginx {
    child: std::process::Child,
    https: u16,
    http: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nginx(program: &Path, dir: &Path, root: &Path) -> anyhow::Result<Nginx> {
    std::fs::create_dir_all(dir.join("temp"))?;
    let (https, http) = (free_loopback_port()?, free_loopback_port()?);
    let (d, r) = (dir.display(), root.display());
    let locations = format!(
        "    root {r};\n    location /up/ {{ dav_methods PUT; create_full_put_path on; }}\n"
    );
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
           client_max_body_size 0;\n  client_body_temp_path {d}/temp;\n\
           proxy_temp_path {d}/temp;\n  fastcgi_temp_path {d}/temp;\n\
           uwsgi_temp_path {d}/temp;\n  scgi_temp_path {d}/temp;\n\
           default_type application/octet-stream;\n\
           server {{\n    listen 127.0.0.1:{https} ssl;\n    ssl_protocols TLSv1.3;\n\
               ssl_certificate {d}/server.pem;\n    ssl_certificate_key {d}/server.key;\n\
               {locations}  }}\n\
           server {{\n    listen 127.0.0.1:{http};\n{locations}  }}\n}}\n"
    );
    let child = spawn_nginx(&mut Command::new(program), dir, &config)?;
    let mut nginx = Nginx { child, https, http };
    let started = Instant::now();
    while [https, http]
        .iter()
        .any(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_err())
    {
        if !matches!(nginx.child.try_wait(), Ok(None))
            || started.elapsed() > Duration::from_secs(20)
        {
            bail!("nginx did not start:\n{}", nginx_logs(dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(nginx)
}

/// One row's samples (seconds) and, for curl's downloads, the same counting fsync + b3sum.
#[derive(Default)]
struct Row {
    seconds: Vec<f64>,
    with_flush_and_hash: Vec<f64>,
}

/// The rows, in the order they run each round.
const ROWS: [&str; 8] = [
    "URL volume, HTTPS",
    "curl GET, HTTPS",
    "URL volume, HTTP",
    "curl GET, HTTP",
    "put_url, HTTPS",
    "curl PUT, HTTPS",
    "put_url, HTTP",
    "curl PUT, HTTP",
];

/// The setting of one run.
struct Bench {
    size: u64,
    hash: BlobHash,
    source: PathBuf,
    ca: PathBuf,
    root: PathBuf,
    nginx: Nginx,
    http: HttpClient,
    endpoint: HordeEndpoint,
}

impl Bench {
    fn url(&self, tls: bool, path: &str) -> String {
        if tls {
            format!("https://127.0.0.1:{}/{path}", self.nginx.https)
        } else {
            format!("http://127.0.0.1:{}/{path}", self.nginx.http)
        }
    }

    /// A URL volume fetched, checked and placed; seconds.
    async fn url_volume(&self, tls: bool) -> anyhow::Result<f64> {
        let job = tempfile::tempdir()?;
        let volume = VolumeSpec {
            path: RelativePath(FILE.to_owned()),
            source: VolumeSource::Url {
                url: self.url(tls, FILE),
                size: Some(self.size),
                blake3: Some(self.hash),
            },
        };
        let started = Instant::now();
        let placed = materialize(job.path(), &[volume], &self.endpoint, &self.http).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            placed.first().is_some_and(|p| p.size == self.size),
            "volume size"
        );
        Ok(seconds)
    }

    /// curl's download to its exit; and counting `fsync` and `b3sum` of its file. Seconds.
    fn curl_get(&self, tls: bool) -> anyhow::Result<(f64, f64)> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join(FILE);
        let started = Instant::now();
        tool(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(&self.ca)
                .arg("-o")
                .arg(&out)
                .arg(self.url(tls, FILE)),
        )?;
        let fetched = started.elapsed().as_secs_f64();
        std::fs::File::open(&out)?.sync_all()?;
        let sum = tool(Command::new("b3sum").arg("--no-names").arg(&out))?;
        let total = started.elapsed().as_secs_f64();
        let hex = String::from_utf8_lossy(&sum.stdout).trim().to_owned();
        anyhow::ensure!(hex == self.hash.to_string(), "curl's copy differs ({hex})");
        Ok((fetched, total))
    }

    /// An output uploaded with `upload` (hashed while it is sent); seconds.
    async fn put_url(&self, tls: bool, name: &str) -> anyhow::Result<f64> {
        let job = tempfile::tempdir()?;
        std::fs::create_dir_all(job.path().join("output"))?;
        std::fs::hard_link(&self.source, job.path().join("output").join(FILE))?;
        let spec = UploadSpec {
            path: RelativePath(FILE.to_owned()),
            target: UploadTarget::HttpPut {
                url: self.url(tls, &format!("up/{name}")),
                headers: Vec::new(),
            },
        };
        let started = Instant::now();
        // No output limit: the bench's file is what it measures.
        let budget = &mut OutputBudget::new(u64::MAX);
        let outputs = upload(job.path(), &[spec], &self.endpoint, &self.http, budget).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            outputs.first().is_some_and(|o| o.hash == self.hash),
            "upload hash"
        );
        self.check_uploaded(name)?;
        Ok(seconds)
    }

    /// curl's PUT of the same file; seconds.
    fn curl_put(&self, tls: bool, name: &str) -> anyhow::Result<f64> {
        let started = Instant::now();
        tool(
            Command::new("curl")
                .args(["-sS", "--fail", "--cacert"])
                .arg(&self.ca)
                .arg("-T")
                .arg(&self.source)
                .arg(self.url(tls, &format!("up/{name}"))),
        )?;
        let seconds = started.elapsed().as_secs_f64();
        self.check_uploaded(name)?;
        Ok(seconds)
    }

    /// The uploaded file has the full size; removed for the next round.
    fn check_uploaded(&self, name: &str) -> anyhow::Result<()> {
        let path = self.root.join("up").join(name);
        let size = std::fs::metadata(&path)?.len();
        std::fs::remove_file(&path)?;
        anyhow::ensure!(size == self.size, "uploaded {size} of {} bytes", self.size);
        Ok(())
    }
}

async fn one_round(bench: &Bench, rows: &mut [Row; 8]) -> anyhow::Result<()> {
    for (offset, tls) in [(0, true), (2, false)] {
        rows[offset].seconds.push(bench.url_volume(tls).await?);
        let (fetched, total) = bench.curl_get(tls)?;
        rows[offset + 1].seconds.push(fetched);
        rows[offset + 1].with_flush_and_hash.push(total);
    }
    for (offset, tls) in [(4, true), (6, false)] {
        rows[offset]
            .seconds
            .push(bench.put_url(tls, "horde.bin").await?);
        rows[offset + 1]
            .seconds
            .push(bench.curl_put(tls, "curl.bin")?);
    }
    Ok(())
}

fn report(args: &Args, rows: [Row; 8]) -> serde_json::Value {
    let gbit = |seconds: f64| (args.size << 20) as f64 * 8.0 / seconds / 1e9;
    let rates: Vec<f64> = rows
        .iter()
        .map(|row| gbit(median(row.seconds.clone())))
        .collect();
    println!(
        "== URL volumes and put_url against curl, same nginx, loopback, {} MiB, {} rounds \
         (median Gbit/s [min-max])",
        args.size, args.rounds
    );
    let mut json = serde_json::Map::new();
    for (index, row) in rows.iter().enumerate() {
        let min = row.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.seconds.iter().copied().fold(0.0, f64::max);
        let mut line = format!(
            "  {:<18} {:>6.2} Gbit/s [{:.2}-{:.2}]",
            ROWS[index],
            rates[index],
            gbit(max),
            gbit(min)
        );
        let mut value = serde_json::json!({"median_gbit": rates[index], "min_gbit": gbit(max),
                                           "max_gbit": gbit(min)});
        if !row.with_flush_and_hash.is_empty() {
            let counted = gbit(median(row.with_flush_and_hash.clone()));
            line += &format!("  {counted:.2} counting fsync + b3sum");
            value["with_fsync_b3sum_gbit"] = serde_json::json!(counted);
        }
        if index % 2 == 0 {
            let ratio = rates[index] / rates[index + 1];
            line += &format!("  ({ratio:.2}x curl)");
            value["ratio_to_curl"] = serde_json::json!(ratio);
            if index < 4 {
                let counted = gbit(median(rows[index + 1].with_flush_and_hash.clone()));
                line += &format!(
                    ", {:.2}x curl + fsync + b3sum; target >= 0.9x curl",
                    rates[index] / counted
                );
            }
        }
        println!("{line}");
        json.insert(ROWS[index].to_owned(), value);
    }
    serde_json::json!({"size_mib": args.size, "rounds": args.rounds, "rows": json})
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let Some(program) = nginx_program() else {
        println!("url-volumes: nothing measured: nginx is not installed (.ci/bench-tools)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("up"))?;
    let source = root.join(FILE);
    let size = args.size << 20;
    let hash = BlobHash(write_random_file(
        &source,
        size,
        b"horde url-volumes bench data",
    )?);
    let ca = make_certificates(dir.path())?;
    let nginx = start_nginx(&program, dir.path(), &root)?;
    let bench = Bench {
        size,
        hash,
        http: HttpClient::with_roots_pem(1, Duration::from_millis(100), &std::fs::read(&ca)?)?,
        source,
        ca,
        root,
        nginx,
        endpoint: HordeEndpoint::bind(
            &SecretKey::generate(),
            EndpointConfig::new(([127, 0, 0, 1], 0).into(), &[ALPN_JOB]),
        )?,
    };
    // Warm: the served file into the page cache, both servers' paths once.
    std::fs::read(&bench.source)?;
    bench.curl_get(true)?;
    let mut rows: [Row; 8] = Default::default();
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        one_round(&bench, &mut rows).await?;
    }
    let json = report(args, rows);
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", args.json.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(&args))
}
