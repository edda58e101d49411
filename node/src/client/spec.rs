//! Job-spec and volume-list files (TOML), the form a person writes a job in: parsed into a
//! [`JobRequest`] or a volume list, every field checked, errors naming the field.
//!
//! ```toml
//! executor_class = "cpu-small"
//! program = "/usr/bin/my-job"          # or: image = "name@sha256:…"
//! args = ["--port-from-env"]
//! readiness_http = "/health"
//! [deadlines]
//! execution_ms = 60000
//! [[volumes]]
//! path = "input.txt"
//! inline = "hello"
//! [[uploads]]
//! path = "result.bin"
//! storage = "HOTKEY@127.0.0.1:7003"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use horde_protocol::{
    BlobHash, Deadlines, Program, ReadinessProbe, RelativePath, UploadSpec, UploadTarget,
    VolumeSource, VolumeSpec,
};
use serde::Deserialize;

use crate::client::JobRequest;

/// A spec or volume-list file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A field has a value that cannot be used.
    #[error("{field}: {reason}")]
    Field {
        /// The field (for entries: the entry's path).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn field_error(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A volume entry of a spec or volume-list file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeEntry {
    path: String,
    inline: Option<String>,
    url: Option<String>,
    blake3: Option<String>,
    size: Option<u64>,
    blob: Option<String>,
    storage: Option<String>,
}

/// An upload entry of a spec or volume-list file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadEntry {
    path: String,
    storage: Option<String>,
    put_url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeadlinesFile {
    reservation_ms: Option<u64>,
    executor_startup_ms: Option<u64>,
    volume_download_ms: Option<u64>,
    readiness_ms: Option<u64>,
    execution_ms: Option<u64>,
    upload_ms: Option<u64>,
}

/// The job spec file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    executor_class: String,
    program: Option<String>,
    image: Option<String>,
    image_blob: Option<ImageBlobEntry>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    readiness_http: Option<String>,
    readiness_tcp: Option<bool>,
    #[serde(default)]
    deadlines: DeadlinesFile,
    #[serde(default)]
    volumes: Vec<VolumeEntry>,
    #[serde(default)]
    uploads: Vec<UploadEntry>,
    logs_storage: Option<String>,
    #[serde(default)]
    on_trusted_miner: bool,
    expires_in_secs: Option<u64>,
}

/// `image_blob = { hash, size, storage }`: an image archive on a storage node (the line
/// `horde blob put-image` prints).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageBlobEntry {
    hash: String,
    size: u64,
    storage: String,
}

/// The volume list file of `horde job volumes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumesFile {
    volume_msg_id: u64,
    #[serde(default)]
    fetch: Vec<VolumeEntry>,
    #[serde(default)]
    upload: Vec<UploadEntry>,
}

/// A volume list read from a file: what to fetch and what to upload, under one id.
#[derive(Debug, Clone)]
pub struct VolumeListFile {
    /// The list's id (reported back in `VolumesFetched`).
    pub volume_msg_id: u64,
    /// Volumes to fetch.
    pub fetch: Vec<VolumeSpec>,
    /// Uploads to declare.
    pub upload: Vec<UploadSpec>,
}

fn parse_hash(value: &str, field: &str) -> Result<BlobHash, SpecError> {
    value
        .parse()
        .map_err(|_| field_error(field, "must be 64 hex digits"))
}

fn volume(entry: VolumeEntry) -> Result<VolumeSpec, SpecError> {
    let field = format!("volume {}", entry.path);
    let source = match (entry.inline, entry.url, entry.blob) {
        (Some(text), None, None) => VolumeSource::Inline {
            bytes: text.into_bytes(),
        },
        (None, Some(url), None) => VolumeSource::Url {
            url,
            size: entry.size,
            blake3: entry
                .blake3
                .map(|h| parse_hash(&h, &format!("{field}: blake3")))
                .transpose()?,
        },
        (None, None, Some(hash)) => VolumeSource::Blob {
            hash: parse_hash(&hash, &format!("{field}: blob"))?,
            size: entry
                .size
                .ok_or_else(|| field_error(&field, "blob volumes need size"))?,
            storage: entry
                .storage
                .ok_or_else(|| field_error(&field, "blob volumes need storage"))?
                .parse()
                .map_err(|error| field_error(format!("{field}: storage"), format!("{error}")))?,
        },
        _ => {
            return Err(field_error(
                field,
                "give exactly one of inline, url or blob",
            ));
        }
    };
    Ok(VolumeSpec {
        path: RelativePath(entry.path),
        source,
    })
}

fn upload(entry: UploadEntry) -> Result<UploadSpec, SpecError> {
    let field = format!("upload {}", entry.path);
    let target = match (entry.storage, entry.put_url) {
        (Some(storage), None) => UploadTarget::Blob {
            storage: storage
                .parse()
                .map_err(|error| field_error(format!("{field}: storage"), format!("{error}")))?,
        },
        (None, Some(url)) => UploadTarget::HttpPut {
            url,
            headers: entry.headers.into_iter().collect(),
        },
        _ => return Err(field_error(field, "give exactly one of storage or put_url")),
    };
    Ok(UploadSpec {
        path: RelativePath(entry.path),
        target,
    })
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| SpecError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Parses TOML text; errors name it as `label`.
fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, label: &str) -> Result<T, SpecError> {
    toml::from_str(text).map_err(|source| SpecError::Parse {
        path: PathBuf::from(label),
        source,
    })
}

impl JobRequest {
    /// Reads a job spec file (TOML; see the module docs).
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        Self::from_spec_file(read_toml(path)?)
    }

    /// Parses a job spec from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        Self::from_spec_file(parse_toml(text, "<text>")?)
    }

    fn from_spec_file(file: SpecFile) -> Result<Self, SpecError> {
        let program = match (file.program, file.image, file.image_blob) {
            (Some(program), None, None) => Program::Command { program },
            (None, Some(reference), None) => Program::Image { reference },
            (None, None, Some(blob)) => Program::ImageBlob {
                hash: parse_hash(&blob.hash, "image_blob.hash")?,
                size: blob.size,
                storage: blob
                    .storage
                    .parse()
                    .map_err(|error| field_error("image_blob.storage", format!("{error}")))?,
            },
            _ => {
                return Err(field_error(
                    "program",
                    "give exactly one of program, image or image_blob",
                ));
            }
        };
        let defaults = Deadlines::default();
        let d = file.deadlines;
        let mut request = JobRequest::command(&file.executor_class, "");
        request.program = program;
        request.args = file.args;
        request.env = file.env.into_iter().collect();
        request.deadlines = Deadlines {
            reservation_ms: d.reservation_ms.unwrap_or(defaults.reservation_ms),
            executor_startup_ms: d
                .executor_startup_ms
                .unwrap_or(defaults.executor_startup_ms),
            volume_download_ms: d.volume_download_ms.unwrap_or(defaults.volume_download_ms),
            readiness_ms: d.readiness_ms.unwrap_or(defaults.readiness_ms),
            execution_ms: d.execution_ms.unwrap_or(defaults.execution_ms),
            upload_ms: d.upload_ms.unwrap_or(defaults.upload_ms),
        };
        request.readiness = match (file.readiness_http, file.readiness_tcp) {
            (Some(path), _) => ReadinessProbe::Http { path },
            (None, Some(true)) => ReadinessProbe::Tcp,
            _ => ReadinessProbe::default(),
        };
        request.volumes = file
            .volumes
            .into_iter()
            .map(volume)
            .collect::<Result<_, _>>()?;
        request.uploads = file
            .uploads
            .into_iter()
            .map(upload)
            .collect::<Result<_, _>>()?;
        request.logs = file
            .logs_storage
            .map(|s| {
                s.parse()
                    .map(|storage| UploadTarget::Blob { storage })
                    .map_err(|error| field_error("logs_storage", format!("{error}")))
            })
            .transpose()?;
        request.on_trusted_miner = file.on_trusted_miner;
        if let Some(secs) = file.expires_in_secs {
            request.lifetime = std::time::Duration::from_secs(secs);
        }
        Ok(request)
    }
}

impl VolumeListFile {
    /// Reads a volume-list file (`volume_msg_id`, `[[fetch]]`, `[[upload]]`).
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        Self::from_volumes_file(read_toml(path)?)
    }

    /// Parses a volume list from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        Self::from_volumes_file(parse_toml(text, "<volume list>")?)
    }

    fn from_volumes_file(file: VolumesFile) -> Result<Self, SpecError> {
        Ok(Self {
            volume_msg_id: file.volume_msg_id,
            fetch: file
                .fetch
                .into_iter()
                .map(volume)
                .collect::<Result<_, _>>()?,
            upload: file
                .upload
                .into_iter()
                .map(upload)
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_spec_parses() {
        let request = JobRequest::from_toml(
            r#"
executor_class = "cpu-small"
program = "/bin/job"
args = ["a"]
readiness_tcp = true
[deadlines]
execution_ms = 5000
[[volumes]]
path = "in.txt"
inline = "hi"
"#,
        )
        .unwrap();
        assert_eq!(request.executor_class.0, "cpu-small");
        assert_eq!(request.deadlines.execution_ms, 5000);
        assert_eq!(request.readiness, ReadinessProbe::Tcp);
        assert_eq!(request.volumes.len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let both =
            JobRequest::from_toml("executor_class = \"c\"\nprogram = \"/a\"\nimage = \"b\"\n")
                .unwrap_err();
        assert!(both.to_string().starts_with("program: "), "{both}");
        let volume = JobRequest::from_toml(
            "executor_class = \"c\"\nprogram = \"/a\"\n[[volumes]]\npath = \"x\"\nblob = \"zz\"\n",
        )
        .unwrap_err();
        assert_eq!(volume.to_string(), "volume x: blob: must be 64 hex digits");
        let logs = JobRequest::from_toml(
            "executor_class = \"c\"\nprogram = \"/a\"\nlogs_storage = \"nonsense\"\n",
        )
        .unwrap_err();
        assert!(logs.to_string().starts_with("logs_storage: "), "{logs}");
    }

    #[test]
    fn spec_files_name_an_image_or_an_image_blob() {
        let dir = tempfile::tempdir().unwrap();
        let storage = format!(
            "{}@127.0.0.1:4000",
            horde_protocol::SecretKey::from_seed(&[1; 32]).hotkey()
        );
        let hash = "ab".repeat(32);
        let read = |text: &str| {
            let path = dir.path().join("job.toml");
            std::fs::write(&path, text).unwrap();
            JobRequest::from_file(&path).map(|request| request.program)
        };
        let image = read("executor_class = \"c\"\nimage = \"demo@sha256:00\"\n").unwrap();
        assert_eq!(
            image,
            Program::Image {
                reference: "demo@sha256:00".into()
            }
        );
        let blob = read(&format!(
            "executor_class = \"c\"\nimage_blob = {{ hash = \"{hash}\", size = 12, storage = \"{storage}\" }}\n"
        ))
        .unwrap();
        assert_eq!(
            blob,
            Program::ImageBlob {
                hash: hash.parse().unwrap(),
                size: 12,
                storage: storage.parse().unwrap(),
            }
        );
        let both = format!(
            "executor_class = \"c\"\nimage = \"x\"\nimage_blob = {{ hash = \"{hash}\", size = 1, storage = \"{storage}\" }}\n"
        );
        assert!(read(&both).is_err());
        assert!(read(&format!(
            "executor_class = \"c\"\nimage_blob = {{ hash = \"zz\", size = 1, storage = \"{storage}\" }}\n"
        ))
        .is_err());
    }
}
