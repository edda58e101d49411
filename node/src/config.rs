//! Node configuration: one TOML file per node, `deny_unknown_fields`, validated at load time.
//!
//! The commented example lives in `node/horde.example.toml`; every field has a default that works
//! for a single machine, so the smallest valid file names only the role.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use horde_protocol::Role;
use serde::Deserialize;

/// Default QUIC listen address: loopback with an OS-chosen port, safe for a single machine.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// Default cap on concurrent QUIC connections per node. A validator talks to every miner it
/// drives and a facilitator to every client; 1024 keeps worst-case window memory bounded.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown fields.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the line and field).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    role: Option<String>,
    key_file: Option<PathBuf>,
    listen: Option<String>,
    max_connections: Option<usize>,
    data_dir: Option<PathBuf>,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The role this node plays.
    pub role: Role,
    /// The hotkey file (JSON, mode 0600). Relative paths are relative to the config file.
    pub key_file: PathBuf,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Cap on concurrent QUIC connections.
    pub max_connections: usize,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--role`.
    pub role: Option<Role>,
    /// `--key`.
    pub key_file: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

impl NodeConfig {
    /// Reads and validates a config file, then applies command-line overrides.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &shown, base, overrides)
    }

    /// Validates config text; relative paths are taken relative to `base`.
    pub fn parse(
        text: &str,
        shown: &str,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: shown.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: shown.to_owned(),
            message,
        };
        let role = match (&overrides.role, &file.role) {
            (Some(role), _) => *role,
            (None, Some(text)) => text.parse().map_err(invalid)?,
            (None, None) => {
                return Err(invalid(
                    "no role: set `role = \"…\"` or pass --role".to_owned(),
                ));
            }
        };
        let listen = match (&overrides.listen, &file.listen) {
            (Some(addr), _) => *addr,
            (None, text) => text
                .as_deref()
                .unwrap_or(DEFAULT_LISTEN)
                .parse()
                .map_err(|e| invalid(format!("listen: {e}")))?,
        };
        let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(invalid("max_connections must be at least 1".to_owned()));
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let key_file = overrides
            .key_file
            .clone()
            .or(file.key_file.map(resolve))
            .unwrap_or_else(|| base.join("hotkey.json"));
        let data_dir = overrides
            .data_dir
            .clone()
            .or(file.data_dir.map(resolve))
            .unwrap_or_else(|| base.join(format!("{role}-data")));
        Ok(Self {
            role,
            key_file,
            listen,
            max_connections,
            data_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(
            text,
            "test.toml",
            Path::new("/etc/horde"),
            &Overrides::default(),
        )
    }

    #[test]
    fn minimal_file_gets_working_defaults() {
        let config = parse("role = \"validator\"").unwrap();
        assert_eq!(config.role, Role::Validator);
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.key_file, Path::new("/etc/horde/hotkey.json"));
        assert_eq!(config.data_dir, Path::new("/etc/horde/validator-data"));
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../horde.example.toml");
        let config = parse(text).unwrap();
        assert_eq!(config.role, Role::Validator);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse("role = \"miner\"\nlisen = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        for (text, needle) in [
            ("role = \"wizard\"", "unknown role"),
            ("", "no role"),
            ("role = \"client\"", "unknown role"),
            ("role = \"miner\"\nlisten = \"nowhere\"", "listen"),
            ("role = \"miner\"\nmax_connections = 0", "max_connections"),
            ("role = 3", "role"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn overrides_win() {
        let overrides = Overrides {
            role: Some(Role::Miner),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            key_file: Some("/k.json".into()),
            data_dir: None,
        };
        let config = NodeConfig::parse(
            "role = \"validator\"\nlisten = \"127.0.0.1:1\"",
            "t",
            Path::new("/x"),
            &overrides,
        )
        .unwrap();
        assert_eq!(config.role, Role::Miner);
        assert_eq!(config.listen.port(), 7000);
        assert_eq!(config.key_file, Path::new("/k.json"));
    }
}
