//! Checks on a job spec that need no executor: relative paths, readiness path, deadline and
//! lifetime bounds, addresses. The client runs them before it submits and the facilitator again at
//! admission, so a spec that can only fail later (an absolute upload path that fails in Upload
//! after the whole run, a readiness path without `/` that 404s until its deadline) is refused at
//! once, with the field named.

use std::collections::HashSet;

use crate::job::{
    Deadlines, JobSpec, NodeAddr, ReadinessProbe, RelativePath, UploadTarget, VolumeSource,
};

/// Longest path component: 255 bytes, the `NAME_MAX` of Linux file systems.
pub const MAX_COMPONENT_LEN: usize = 255;

/// Longest relative path: 4096 bytes, Linux's `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;

/// Longest readiness request path (a request line, not a document).
pub const MAX_READINESS_PATH_LEN: usize = 1024;

/// Upper bounds of the staged deadlines, in milliseconds. Generous for real work, finite so that
/// a typo (or `i64::MAX`) cannot park an executor for ever:
/// reservation 5 min (a miner answers in milliseconds or spins an executor up in seconds),
/// executor start-up 30 min (room for a large image pull), volume download and upload 24 h
/// each (hundreds of GB at modest rates), readiness 1 h (model loading), execution 7 days.
pub const MAX_DEADLINES: Deadlines = Deadlines {
    reservation_ms: 5 * 60 * 1000,
    executor_startup_ms: 30 * 60 * 1000,
    volume_download_ms: 24 * 3600 * 1000,
    readiness_ms: 3600 * 1000,
    execution_ms: 7 * 24 * 3600 * 1000,
    upload_ms: 24 * 3600 * 1000,
};

/// Longest spec lifetime (`expires_at - issued_at`): 1 day. A spec is only admitted while
/// current; a long-lived one is a replay risk for no benefit.
pub const MAX_SPEC_LIFETIME_MS: u64 = 24 * 3600 * 1000;

/// A relative path that is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum PathError {
    /// The empty string.
    #[error("empty path")]
    Empty,
    /// Starts with `/`.
    #[error("absolute path")]
    Absolute,
    /// A `..` component.
    #[error("`..` component")]
    ParentDir,
    /// A `.` component.
    #[error("`.` component")]
    CurrentDir,
    /// An empty component (`a//b`, trailing `/`).
    #[error("empty component")]
    EmptyComponent,
    /// A NUL byte.
    #[error("NUL byte")]
    Nul,
    /// A backslash (a separator on other systems).
    #[error("backslash")]
    Backslash,
    /// A component longer than [`MAX_COMPONENT_LEN`].
    #[error("component of {0} bytes (max {MAX_COMPONENT_LEN})")]
    ComponentTooLong(usize),
    /// A path longer than [`MAX_PATH_LEN`].
    #[error("path of {0} bytes (max {MAX_PATH_LEN})")]
    TooLong(usize),
    /// The same path twice in one job.
    #[error("duplicate path")]
    Duplicate,
    /// A file that is also a directory on another path (`a` and `a/b`).
    #[error("`{0}` is both a file and a parent directory")]
    FileIsParent(String),
    /// A directory on the way, or the file itself, is a symlink.
    #[error("`{0}` is a symlink")]
    Symlink(String),
    /// A directory on the way is not a directory.
    #[error("`{0}` is not a directory")]
    NotADirectory(String),
    /// The target already exists.
    #[error("`{0}` already exists")]
    Exists(String),
}

impl RelativePath {
    /// Checks the path and returns its normal components: not empty, relative, no `.` or `..`
    /// or empty components, no NUL or backslash, within [`MAX_PATH_LEN`] and
    /// [`MAX_COMPONENT_LEN`].
    pub fn components(&self) -> Result<Vec<&str>, PathError> {
        let text = self.0.as_str();
        if text.is_empty() {
            return Err(PathError::Empty);
        }
        if text.contains('\0') {
            return Err(PathError::Nul);
        }
        if text.contains('\\') {
            return Err(PathError::Backslash);
        }
        if text.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(text.len()));
        }
        if text.starts_with('/') {
            return Err(PathError::Absolute);
        }
        text.split('/')
            .map(|component| match component {
                "" => Err(PathError::EmptyComponent),
                "." => Err(PathError::CurrentDir),
                ".." => Err(PathError::ParentDir),
                name if name.len() > MAX_COMPONENT_LEN => {
                    Err(PathError::ComponentTooLong(name.len()))
                }
                name => Ok(name),
            })
            .collect()
    }
}

/// Checks a set of paths that land in one directory: each valid, no duplicates, no file that is
/// another's parent. Returns each path's components, in order.
pub fn check_paths<'a>(
    paths: impl IntoIterator<Item = &'a RelativePath>,
) -> Result<Vec<Vec<&'a str>>, (&'a RelativePath, PathError)> {
    let mut files: HashSet<Vec<&str>> = HashSet::new();
    let mut parents: HashSet<Vec<&str>> = HashSet::new();
    let mut result = Vec::new();
    for path in paths {
        let components = path.components().map_err(|error| (path, error))?;
        if files.contains(&components) {
            return Err((path, PathError::Duplicate));
        }
        if parents.contains(&components) {
            return Err((path, PathError::FileIsParent(path.0.clone())));
        }
        for end in 1..components.len() {
            let ancestor = components[..end].to_vec();
            if files.contains(&ancestor) {
                return Err((path, PathError::FileIsParent(ancestor.join("/"))));
            }
            parents.insert(ancestor);
        }
        files.insert(components.clone());
        result.push(components);
    }
    Ok(result)
}

/// A spec field that is refused, named as in a job-spec file.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("{field}: {reason}")]
pub struct SpecFieldError {
    /// The field, e.g. `uploads[0].path ("/etc/passwd")` or `deadlines.execution_ms`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> SpecFieldError {
    SpecFieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_addr(field: &str, addr: &NodeAddr) -> Result<(), SpecFieldError> {
    if addr.addrs.is_empty() {
        return Err(refuse(field, "names no address"));
    }
    if let Some(bad) = addr
        .addrs
        .iter()
        .find(|a| a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast())
    {
        return Err(refuse(field, format!("{bad} is not an address to dial")));
    }
    Ok(())
}

fn check_url(field: &str, url: &str) -> Result<(), SpecFieldError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(refuse(field, "must be an http:// or https:// URL"))
    }
}

fn check_target(field: &str, target: &UploadTarget) -> Result<(), SpecFieldError> {
    match target {
        UploadTarget::Blob { storage } => check_addr(&format!("{field}.storage"), storage),
        UploadTarget::HttpPut { url, .. } => check_url(&format!("{field}.put_url"), url),
    }
}

fn check_deadlines(deadlines: &Deadlines) -> Result<(), SpecFieldError> {
    let stages = [
        (
            "reservation_ms",
            deadlines.reservation_ms,
            MAX_DEADLINES.reservation_ms,
        ),
        (
            "executor_startup_ms",
            deadlines.executor_startup_ms,
            MAX_DEADLINES.executor_startup_ms,
        ),
        (
            "volume_download_ms",
            deadlines.volume_download_ms,
            MAX_DEADLINES.volume_download_ms,
        ),
        (
            "readiness_ms",
            deadlines.readiness_ms,
            MAX_DEADLINES.readiness_ms,
        ),
        (
            "execution_ms",
            deadlines.execution_ms,
            MAX_DEADLINES.execution_ms,
        ),
        ("upload_ms", deadlines.upload_ms, MAX_DEADLINES.upload_ms),
    ];
    for (name, value, max) in stages {
        if value == 0 || value > max {
            return Err(refuse(
                format!("deadlines.{name}"),
                format!("{value} is outside 1..={max}"),
            ));
        }
    }
    Ok(())
}

fn check_readiness(readiness: &ReadinessProbe) -> Result<(), SpecFieldError> {
    let (field, path) = match readiness {
        ReadinessProbe::Http { path } => ("readiness_http", path),
        ReadinessProbe::WebSocket { path } => ("readiness_websocket", path),
        ReadinessProbe::Tcp => return Ok(()),
    };
    if !path.starts_with('/') {
        return Err(refuse(
            field,
            format!("{path:?} must start with `/` (e.g. \"/{path}\")"),
        ));
    }
    if path.len() > MAX_READINESS_PATH_LEN {
        return Err(refuse(
            field,
            format!("{} bytes (max {MAX_READINESS_PATH_LEN})", path.len()),
        ));
    }
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(refuse(field, "contains a space or a control character"));
    }
    Ok(())
}

impl JobSpec {
    /// Every check that needs no executor (see the module docs). The first refused field is
    /// returned, named as in a job-spec file.
    pub fn check(&self) -> Result<(), SpecFieldError> {
        if self.executor_class.0.is_empty() {
            return Err(refuse("executor_class", "empty"));
        }
        check_deadlines(&self.deadlines)?;
        check_readiness(&self.readiness)?;
        let lifetime = self.expires_at.0.saturating_sub(self.issued_at.0);
        if self.expires_at < self.issued_at || lifetime > MAX_SPEC_LIFETIME_MS {
            return Err(refuse(
                "expires_in_secs",
                format!(
                    "the spec must expire within {} s of signing",
                    MAX_SPEC_LIFETIME_MS / 1000
                ),
            ));
        }
        if let Err((path, error)) = check_paths(self.volumes.iter().map(|v| &v.path)) {
            let index = self.volumes.iter().position(|v| v.path == *path);
            return Err(refuse(
                format!("volumes[{}].path ({:?})", index.unwrap_or(0), path.0),
                error.to_string(),
            ));
        }
        if let Err((path, error)) = check_paths(self.uploads.iter().map(|u| &u.path)) {
            let index = self.uploads.iter().position(|u| u.path == *path);
            return Err(refuse(
                format!("uploads[{}].path ({:?})", index.unwrap_or(0), path.0),
                error.to_string(),
            ));
        }
        for (index, volume) in self.volumes.iter().enumerate() {
            let field = format!("volumes[{index}]");
            match &volume.source {
                VolumeSource::Blob { storage, .. } => {
                    check_addr(&format!("{field}.storage"), storage)?
                }
                VolumeSource::Url { url, .. } => check_url(&format!("{field}.url"), url)?,
                VolumeSource::Inline { .. } => {}
            }
        }
        for (index, upload) in self.uploads.iter().enumerate() {
            check_target(&format!("uploads[{index}]"), &upload.target)?;
        }
        if let Some(logs) = &self.logs {
            check_target("logs_storage", logs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{ExecutorClass, JobId, Program, UnixMillis, UploadSpec, VolumeSpec};
    use crate::keys::SecretKey;

    fn spec() -> JobSpec {
        JobSpec {
            job_id: JobId([1; 16]),
            executor_class: ExecutorClass("cpu".to_owned()),
            program: Program::Command {
                program: "/bin/true".to_owned(),
            },
            args: Vec::new(),
            env: Vec::new(),
            deadlines: Deadlines::default(),
            readiness: ReadinessProbe::default(),
            volumes: Vec::new(),
            uploads: Vec::new(),
            logs: None,
            client_key: SecretKey::from_seed(&[2; 32]).hotkey(),
            on_trusted_miner: false,
            nonce: [0; 16],
            issued_at: UnixMillis(1_000),
            expires_at: UnixMillis(601_000),
        }
    }

    fn storage() -> NodeAddr {
        NodeAddr::new(
            SecretKey::from_seed(&[3; 32]).hotkey(),
            ([127, 0, 0, 1], 7000).into(),
        )
    }

    #[test]
    fn a_default_spec_passes() {
        spec().check().unwrap();
    }

    #[test]
    fn paths_are_relative_normal_and_unique() {
        let cases = [
            ("", PathError::Empty),
            ("..", PathError::ParentDir),
            ("../etc/passwd", PathError::ParentDir),
            ("a/../../b", PathError::ParentDir),
            ("/etc/passwd", PathError::Absolute),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("./a", PathError::CurrentDir),
            ("a\0b", PathError::Nul),
            ("a\\b", PathError::Backslash),
        ];
        for (path, error) in cases {
            assert_eq!(
                RelativePath(path.to_owned()).components(),
                Err(error),
                "{path:?}"
            );
        }
        let long = "x".repeat(MAX_COMPONENT_LEN + 1);
        assert_eq!(
            RelativePath(long.clone()).components(),
            Err(PathError::ComponentTooLong(long.len()))
        );
        assert_eq!(
            RelativePath("a/b/c".to_owned()).components(),
            Ok(vec!["a", "b", "c"])
        );
        let paths = |list: &[&str]| -> Vec<RelativePath> {
            list.iter().map(|p| RelativePath((*p).to_owned())).collect()
        };
        let twice = paths(&["a", "a"]);
        assert_eq!(check_paths(&twice).unwrap_err().1, PathError::Duplicate);
        let parent = paths(&["a", "a/b"]);
        assert_eq!(
            check_paths(&parent).unwrap_err().1,
            PathError::FileIsParent("a".to_owned())
        );
        let parent_first = paths(&["a/b", "a"]);
        assert_eq!(
            check_paths(&parent_first).unwrap_err().1,
            PathError::FileIsParent("a".to_owned())
        );
    }

    /// Issue 16, items 6–8: refused at submit, the field named.
    #[test]
    fn late_failures_are_refused_up_front_naming_the_field() {
        let mut absolute_upload = spec();
        absolute_upload.uploads.push(UploadSpec {
            path: RelativePath("/etc/passwd".to_owned()),
            target: UploadTarget::Blob { storage: storage() },
        });
        assert_eq!(
            absolute_upload.check().unwrap_err().to_string(),
            "uploads[0].path (\"/etc/passwd\"): absolute path"
        );

        let mut no_slash = spec();
        no_slash.readiness = ReadinessProbe::Http {
            path: "health".to_owned(),
        };
        let error = no_slash.check().unwrap_err();
        assert_eq!(error.field, "readiness_http");
        assert!(error.reason.contains("must start with `/`"), "{error}");

        let mut endless = spec();
        endless.deadlines.execution_ms = i64::MAX as u64;
        assert_eq!(endless.check().unwrap_err().field, "deadlines.execution_ms");
        let mut zero = spec();
        zero.deadlines.reservation_ms = 0;
        assert_eq!(zero.check().unwrap_err().field, "deadlines.reservation_ms");
        let mut at_max = spec();
        at_max.deadlines = MAX_DEADLINES;
        at_max.check().unwrap();

        let mut forever = spec();
        forever.expires_at = UnixMillis(i64::MAX as u64);
        assert_eq!(forever.check().unwrap_err().field, "expires_in_secs");

        let mut nowhere = spec();
        nowhere.volumes.push(VolumeSpec {
            path: RelativePath("in".to_owned()),
            source: VolumeSource::Blob {
                hash: crate::job::BlobHash([0; 32]),
                size: 1,
                storage: NodeAddr {
                    hotkey: storage().hotkey,
                    addrs: Vec::new(),
                },
            },
        });
        assert_eq!(
            nowhere.check().unwrap_err().to_string(),
            "volumes[0].storage: names no address"
        );

        let mut ftp = spec();
        ftp.volumes.push(VolumeSpec {
            path: RelativePath("in".to_owned()),
            source: VolumeSource::Url {
                url: "ftp://x/y".to_owned(),
                size: None,
                blake3: None,
            },
        });
        assert_eq!(ftp.check().unwrap_err().field, "volumes[0].url");
    }
}
