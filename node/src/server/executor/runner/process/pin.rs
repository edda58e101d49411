//! The sandbox init's binary, kept as it was when the executor started.
//!
//! Every sandbox binds the `horde` binary read-only as its init. Bound through `/proc/PID/exe`,
//! a binary replaced on disk while the node runs (a package upgrade renames the new file over
//! it; `cargo build` links a new one) made every later sandbox fail: `bwrap` resolves a bind's
//! source with realpath(3), and the running binary's path then ends in " (deleted)" ("bwrap:
//! Can't find source path /proc/PID/exe"; `--ro-bind-fd` resolves its descriptor the same
//! way). So the executor gives the binary a name of its own at start — a hard link in its data
//! directory, or a copy where no link can be made (another filesystem; `fs.protected_hardlinks`
//! for a binary the node's user does not own) — and binds that: jobs keep the init that matches
//! this executor until the node is restarted on the new binary. The name is removed when the
//! runner is dropped; an executor that is killed (a stopping miner kills its executors) leaves
//! it, and the next executor started in that directory removes it (a hard link costs no space
//! while the installed binary is the same file; a copy, one binary's size per executor slot).

use std::path::{Path, PathBuf};

/// Pinned binaries' names start with this (then the executor's pid).
const PIN_PREFIX: &str = ".horde-init-";

/// The executor's own name for the init binary; removed on drop.
#[derive(Debug)]
pub(crate) struct PinnedInit {
    path: PathBuf,
}

impl PinnedInit {
    /// Links (or copies) `binary` into `dir` as this executor's init, after removing those
    /// earlier executors left there.
    pub(crate) fn new(binary: &Path, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let own = format!("{PIN_PREFIX}{}", std::process::id());
        for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PIN_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let path = dir.join(&own);
        // `binary` may be `/proc/PID/exe`: followed, it links the running binary's file.
        let linked = rustix::fs::linkat(
            rustix::fs::CWD,
            binary,
            rustix::fs::CWD,
            &path,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        );
        if linked.is_err() {
            // A copy that does not fit (a data directory on a small or full filesystem) is
            // removed: left, its part would fill the filesystem the jobs write their logs to.
            let partial = dir.join(format!("{own}.partial"));
            let copied =
                std::fs::copy(binary, &partial).and_then(|_| std::fs::rename(&partial, &path));
            if let Err(error) = copied {
                let _ = std::fs::remove_file(&partial);
                return Err(error);
            }
        }
        Ok(Self { path })
    }

    /// Where the init binary is, for `bwrap` to bind.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinnedInit {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use horde_transport::test_utils::SmallDisk;

    use super::*;

    /// A copy that does not fit fails and leaves nothing behind (found from outside 2026-12-08:
    /// the part left filled the miner's data directory, and every job then died writing its
    /// stdout). Needs root (a small tmpfs); said and skipped otherwise.
    #[test]
    fn a_copy_that_does_not_fit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let Some(disk) = SmallDisk::mount_over(dir.path(), 1 << 20) else {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        };
        let error = PinnedInit::new(Path::new("/proc/self/exe"), disk.path()).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(28), "{error}");
        let left: Vec<_> = std::fs::read_dir(disk.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// The running binary, pinned through `/proc/self/exe`: on the same filesystem a link to
    /// the very file (same inode), on another a copy of its bytes; an earlier executor's name is
    /// removed at start, and this one's on drop.
    #[test]
    fn the_running_binary_is_linked_or_copied_and_removed_on_drop() {
        let exe = std::env::current_exe().unwrap();
        let beside = exe
            .parent()
            .unwrap()
            .join(format!("pin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&beside);
        std::fs::create_dir_all(&beside).unwrap();
        let stale = beside.join(".horde-init-1");
        std::fs::write(&stale, b"left by a killed executor").unwrap();
        let pinned = PinnedInit::new(Path::new("/proc/self/exe"), &beside).unwrap();
        assert!(!stale.exists());
        let (ours, original) = (
            std::fs::metadata(pinned.path()).unwrap(),
            std::fs::metadata(&exe).unwrap(),
        );
        assert_eq!((ours.dev(), ours.ino()), (original.dev(), original.ino()));
        let path = pinned.path().to_path_buf();
        drop(pinned);
        assert!(!path.exists());
        std::fs::remove_dir_all(&beside).unwrap();
        // Another filesystem, where one is at hand: a copy with the same bytes and mode.
        let shm = Path::new("/dev/shm");
        if std::fs::metadata(shm).is_ok_and(|m| m.dev() != original.dev()) {
            let dir = tempfile::tempdir_in(shm).unwrap();
            let pinned = PinnedInit::new(Path::new("/proc/self/exe"), dir.path()).unwrap();
            let copied = std::fs::metadata(pinned.path()).unwrap();
            assert_ne!(copied.ino(), original.ino());
            assert_eq!(copied.mode(), original.mode());
            assert_eq!(
                std::fs::read(pinned.path()).unwrap(),
                std::fs::read(&exe).unwrap()
            );
        }
    }
}
