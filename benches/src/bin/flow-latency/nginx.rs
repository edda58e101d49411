//! The reference system's path: nginx (Debian's) as a reverse proxy with mutual TLS in front of
//! the job — TLS 1.3, self-signed RSA-2048 certificates for server and client made here with
//! openssl, `ssl_verify_client on`, HTTP/1.1 to the job with upstream keep-alive, and the
//! `Upgrade`/`Connection` headers passed for WebSocket. Two listeners on one nginx process
//! (`master_process off`): default proxy buffering, and 256 KiB proxy buffers. The client side
//! is a blocking rustls client presenting the client certificate and pinning the server's
//! (`Dial`), and curl with the same files for one request per process.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

/// How long nginx may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running nginx in front of one job port, killed when dropped.
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Child,
    /// The listener with nginx's default proxy buffering.
    pub(crate) default_buffers: SocketAddr,
    /// The listener with 256 KiB proxy buffers.
    pub(crate) large_buffers: SocketAddr,
    /// The client side: rustls with the client certificate, pinning the server's.
    pub(crate) tls: Arc<ClientConfig>,
    /// The certificate files curl is given: server (to trust), client certificate and key.
    pub(crate) curl_files: [PathBuf; 3],
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx's configuration: two mutual-TLS listeners on `listen` proxying to `job`.
fn config(dir: &Path, job: SocketAddr, listen: IpAddr, ports: [u16; 2]) -> String {
    let dir = dir.display();
    let server = |port: u16, buffers: &str| {
        format!(
            "  server {{\n    listen {listen}:{port} ssl;\n    ssl_protocols TLSv1.3;\n\
                 ssl_certificate {dir}/server.pem;\n    ssl_certificate_key {dir}/server.key;\n\
                 ssl_client_certificate {dir}/client.pem;\n    ssl_verify_client on;\n\
                 location / {{\n      proxy_pass http://job;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header Upgrade $http_upgrade;\n\
                   proxy_set_header Connection $connection_upgrade;\n{buffers}    }}\n  }}\n"
        )
    };
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n\
           client_body_temp_path {dir}/temp;\n  proxy_temp_path {dir}/temp;\n\
           fastcgi_temp_path {dir}/temp;\n  uwsgi_temp_path {dir}/temp;\n\
           scgi_temp_path {dir}/temp;\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
           upstream job {{ server {job}; keepalive 32; }}\n{}{}}}\n",
        server(ports[0], ""),
        server(
            ports[1],
            "      proxy_buffer_size 256k;\n      proxy_buffers 4 256k;\n\
                   proxy_busy_buffers_size 256k;\n"
        ),
    )
}

/// Starts nginx in front of `job` in `dir`, listening on `listen`; `Ok(None)` with a message
/// when nginx or openssl is absent.
pub(crate) fn start(dir: &Path, listen: IpAddr, job: SocketAddr) -> anyhow::Result<Option<Nginx>> {
    let Some(nginx) = horde_benches::nginx_program() else {
        println!("  (nginx rows skipped: nginx is not installed; .ci/bench-tools installs it)");
        return Ok(None);
    };
    std::fs::create_dir_all(dir.join("temp"))?;
    let file = |name: &str| dir.join(name);
    let (server_cert, client_cert, client_key) =
        (file("server.pem"), file("client.pem"), file("client.key"));
    let server = horde_benches::self_signed_rsa(
        &server_cert,
        &file("server.key"),
        "horde-bench-server",
        &format!("IP:{listen}"),
    );
    if let Err(error) = server {
        println!("  (nginx rows skipped: {error:#})");
        return Ok(None);
    }
    horde_benches::self_signed_rsa(
        &client_cert,
        &client_key,
        "horde-bench-client",
        &format!("IP:{listen}"),
    )?;
    let free_port = || std::net::TcpListener::bind((listen, 0))?.local_addr();
    let ports = [free_port()?.port(), free_port()?.port()];
    let child = horde_benches::spawn_nginx(
        &mut Command::new(nginx),
        dir,
        &config(dir, job, listen, ports),
    )?;
    let addr = |port: u16| SocketAddr::from((listen, port));
    let mut nginx = Nginx {
        child,
        default_buffers: addr(ports[0]),
        large_buffers: addr(ports[1]),
        tls: client_config(&server_cert, &client_cert, &client_key)?,
        curl_files: [server_cert, client_cert, client_key],
    };
    let started = Instant::now();
    while ports
        .iter()
        .any(|port| TcpStream::connect(addr(*port)).is_err())
    {
        if !matches!(nginx.child.try_wait(), Ok(None)) || started.elapsed() > START_TIMEOUT {
            bail!("nginx did not start:\n{}", horde_benches::nginx_logs(dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(nginx))
}

/// Accepts exactly one server certificate (the bench's self-signed one), checking the
/// handshake's signatures as usual.
#[derive(Debug)]
struct PinnedServer {
    certificate: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS 1.3 only, the client certificate presented, no session resumption (every new connection
/// is a full handshake, as for a client that keeps no session cache).
fn client_config(
    server_cert: &Path,
    client_cert: &Path,
    client_key: &Path,
) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedServer {
        certificate: CertificateDer::from_pem_file(server_cert)?,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(client_cert)?],
            PrivateKeyDer::from_pem_file(client_key)?,
        )?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// How a blocking client reaches a path: plain TCP (direct, `horde job forward`) or TLS with
/// the client certificate (nginx).
#[derive(Debug, Clone)]
pub(crate) enum Dial {
    Tcp(SocketAddr),
    Tls(SocketAddr, Arc<ClientConfig>),
}

/// A connection made by [`Dial::connect`].
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Dial {
    /// Connects (the TLS handshake completes with the first write and read).
    pub(crate) fn connect(&self) -> anyhow::Result<Conn> {
        let (addr, tls) = match self {
            Self::Tcp(addr) => (addr, None),
            Self::Tls(addr, config) => (addr, Some(config)),
        };
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        Ok(match tls {
            None => Conn::Tcp(tcp),
            Some(config) => {
                let name = ServerName::IpAddress(addr.ip().into());
                let connection = ClientConnection::new(Arc::clone(config), name)?;
                Conn::Tls(Box::new(StreamOwned::new(connection, tcp)))
            }
        })
    }
}

impl Read for Conn {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(stream) => stream.read(buffer),
            Self::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(stream) => stream.write(buffer),
            Self::Tls(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(stream) => stream.flush(),
            Self::Tls(stream) => stream.flush(),
        }
    }
}

/// One `curl` process through nginx with the client certificate: `POST /echo` with `body`;
/// milliseconds, spawn to exit, the answer checked.
pub(crate) fn curl_echo(nginx: &Nginx, body: &str) -> anyhow::Result<f64> {
    let [server_cert, client_cert, client_key] = &nginx.curl_files;
    let started = Instant::now();
    let output = horde_benches::run_tool(
        Command::new("curl")
            .args(["-sS", "--fail", "--data", body])
            .arg("--cacert")
            .arg(server_cert)
            .arg("--cert")
            .arg(client_cert)
            .arg("--key")
            .arg(client_key)
            .arg(format!("https://{}/echo", nginx.default_buffers)),
    )?;
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        output.stdout == body.as_bytes(),
        "curl through nginx: wrong answer"
    );
    Ok(elapsed)
}

/// One `curl` process straight to the job (plain HTTP); milliseconds, spawn to exit.
pub(crate) fn curl_direct_echo(job: SocketAddr, body: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = horde_benches::run_tool(
        Command::new("curl")
            .args(["-sS", "--fail", "--data", body])
            .arg(format!("http://{job}/echo")),
    )?;
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        output.stdout == body.as_bytes(),
        "curl direct: wrong answer"
    );
    Ok(elapsed)
}
