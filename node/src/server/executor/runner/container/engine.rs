//! The connection to the container engine: where it is (`DOCKER_HOST`, else the standard
//! socket), which engine answers (Docker Engine or Podman's compatible service), and how its
//! errors become [`RunnerError`]s.

use std::time::Duration;

use bollard::Docker;

use crate::server::executor::runner::RunnerError;

/// The standard Docker Engine socket, used when `DOCKER_HOST` is not set.
pub const DEFAULT_ENGINE: &str = "unix:///var/run/docker.sock";

/// Requests that should answer at once (inspect, create, start, remove) give up after this:
/// an engine that takes longer is stuck, and every caller is inside a staged deadline anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Long-lived requests (waiting for a container, pulling or loading an image) have no timeout
/// of their own beyond this day: the executor's staged deadlines bound them.
const STREAM_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Which engine answers on the socket: they differ in how GPUs are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Docker Engine: GPUs through device requests with the `gpu` capability.
    Docker,
    /// Podman's Docker-compatible service: ignores device requests; GPUs are CDI device names.
    Podman,
}

/// A connected engine: one client for requests that answer at once and one for long streams.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The engine's address, `unix:///…`.
    pub address: String,
    /// Which engine it is.
    pub kind: EngineKind,
    /// For requests that answer at once.
    pub(crate) docker: Docker,
    /// For waits, pulls and loads.
    pub(crate) streams: Docker,
}

/// The engine's address: `explicit`, else `DOCKER_HOST`, else [`DEFAULT_ENGINE`]. Only unix
/// sockets: the engine's API is root on the host, never reached over a network.
pub fn engine_address(explicit: Option<&str>) -> Result<String, RunnerError> {
    let address = match explicit {
        Some(address) => address.to_owned(),
        None => match std::env::var("DOCKER_HOST") {
            Ok(address) if !address.is_empty() => address,
            _ => DEFAULT_ENGINE.to_owned(),
        },
    };
    if address.starts_with("unix://") {
        Ok(address)
    } else if address.starts_with('/') {
        Ok(format!("unix://{address}"))
    } else {
        Err(RunnerError::EngineUnavailable {
            engine: address,
            reason: "only unix:// engine sockets are supported".into(),
        })
    }
}

impl Engine {
    /// Connects to the engine at `address` (see [`engine_address`]), agrees on an API
    /// version and finds out which engine it is.
    pub async fn connect(address: &str) -> Result<Self, RunnerError> {
        let unavailable = |reason: String| RunnerError::EngineUnavailable {
            engine: address.to_owned(),
            reason,
        };
        let client = |timeout: Duration| {
            Docker::connect_with_unix(address, timeout.as_secs(), bollard::API_DEFAULT_VERSION)
                .map_err(|error| unavailable(error.to_string()))
        };
        // Ask the engine which API version it speaks (Docker 20.10 speaks 1.41, older than this
        // client's default) and use that.
        let docker = client(REQUEST_TIMEOUT)?
            .negotiate_version()
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        let version = docker.client_version();
        let mut streams = client(STREAM_TIMEOUT)?;
        streams = streams
            .negotiate_version()
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        let about = docker
            .version()
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        let kind = engine_kind(&about);
        tracing::debug!(%address, ?kind, %version, "container engine");
        Ok(Self {
            address: address.to_owned(),
            kind,
            docker,
            streams,
        })
    }
}

/// Docker or Podman, from the version endpoint's platform name and components.
pub(crate) fn engine_kind(about: &bollard::models::SystemVersion) -> EngineKind {
    let platform = about
        .platform
        .as_ref()
        .is_some_and(|platform| platform.name.to_ascii_lowercase().contains("podman"));
    let component = about
        .components
        .iter()
        .flatten()
        .any(|component| component.name.to_ascii_lowercase().contains("podman"));
    if platform || component {
        EngineKind::Podman
    } else {
        EngineKind::Docker
    }
}

/// Whether `error` is the engine's "no such object" answer.
pub(crate) fn is_not_found(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Whether `error` says the engine could not be reached at all (as opposed to an answer).
pub(crate) fn is_unreachable(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::HyperResponseError { .. }
            | bollard::errors::Error::HyperLegacyError { .. }
            | bollard::errors::Error::IOError { .. }
            | bollard::errors::Error::SocketNotFoundError(_)
            | bollard::errors::Error::RequestTimeoutError
    )
}

/// `error` from a request about `what`, as a [`RunnerError`].
pub(crate) fn engine_error(
    engine: &Engine,
    what: &str,
    error: bollard::errors::Error,
) -> RunnerError {
    if is_unreachable(&error) {
        RunnerError::EngineUnavailable {
            engine: engine.address.clone(),
            reason: format!("{what}: {error}"),
        }
    } else {
        RunnerError::Engine(format!("{what}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::{SystemVersion, SystemVersionComponents, SystemVersionPlatform};

    use super::*;

    #[test]
    fn podman_is_told_from_docker_by_its_version_answer() {
        let docker = SystemVersion {
            platform: Some(SystemVersionPlatform {
                name: "Docker Engine - Community".into(),
            }),
            components: Some(vec![SystemVersionComponents {
                name: "Engine".into(),
                version: "20.10.24".into(),
                details: None,
            }]),
            ..SystemVersion::default()
        };
        assert_eq!(engine_kind(&docker), EngineKind::Docker);
        let podman = SystemVersion {
            platform: Some(SystemVersionPlatform {
                name: String::new(),
            }),
            components: Some(vec![SystemVersionComponents {
                name: "Podman Engine".into(),
                version: "4.3.1".into(),
                details: None,
            }]),
            ..SystemVersion::default()
        };
        assert_eq!(engine_kind(&podman), EngineKind::Podman);
    }

    #[test]
    fn only_unix_sockets_are_engines() {
        assert_eq!(
            engine_address(Some("unix:///run/podman.sock"))
                .ok()
                .as_deref(),
            Some("unix:///run/podman.sock")
        );
        assert_eq!(
            engine_address(Some("/run/x.sock")).ok().as_deref(),
            Some("unix:///run/x.sock")
        );
        assert!(matches!(
            engine_address(Some("tcp://10.0.0.1:2375")),
            Err(RunnerError::EngineUnavailable { .. })
        ));
    }
}
