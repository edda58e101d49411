//! Removing a directory a job wrote in, whatever the job did to it.
//!
//! Under the unprivileged process runner a job runs as the executor's own uid (mapped in its
//! user namespace), so it can take the permissions off its directories: `chmod 000 out/d`
//! leaves a tree that `std::fs::remove_dir_all` cannot open, and the job's output would stay on
//! the host for good. [`remove_tree`] gives each directory back its owner's `rwx` before it
//! reads it, never follows a symbolic link, and walks with one directory open at a time (going
//! back up through `..`, checked to be the directory it came from), so a tree deeper than
//! `PATH_MAX` or than the open-file limit is removed all the same. A writer still at work (a
//! job's processes dying with their executor) can make it stop with an error, never make it act
//! outside the tree: [`remove_left_behind`] tries again.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags};

/// How a directory of the tree is opened: for reading its entries, never through a link.
const OPEN_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// What a directory's owner needs to list and empty it.
const OWNER_RWX: u32 = 0o700;

/// Attempts of [`remove_left_behind`], and the pause between two.
const ATTEMPTS: u32 = 5;
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// [`remove_tree`] on a blocking thread, tried again a few times while what wrote the tree may
/// still be ending (a job's processes dying with their executor); the last error.
pub async fn remove_left_behind(path: PathBuf) -> io::Result<()> {
    let mut attempt = 0;
    loop {
        let removing = path.clone();
        let removed = tokio::task::spawn_blocking(move || remove_tree(&removing))
            .await
            .unwrap_or_else(|error| Err(io::Error::other(error)));
        attempt += 1;
        if removed.is_ok() || attempt == ATTEMPTS {
            return removed;
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// One directory on the way down: its name in its parent (none for the top), its identity
/// (device, inode), and the subdirectories still to visit.
struct Level {
    name: Option<CString>,
    identity: (u64, u64),
    pending: Vec<CString>,
}

/// Removes `path` and everything under it; a missing `path` is not an error, a file or link
/// at `path` is unlinked. Stops with an error, leaving the rest, where the tree changes under
/// the walk (a directory moved, replaced by a link) or holds a mount point: it never goes
/// outside the tree.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.is_dir() {
        return std::fs::remove_file(path);
    }
    give_owner_rwx(CWD, path)?;
    let mut dir = rustix::fs::openat(CWD, path, OPEN_DIR, Mode::empty())?;
    let top = identity(&dir)?;
    let pending = empty_files(&dir)?;
    let mut stack = vec![Level {
        name: None,
        identity: top,
        pending,
    }];
    while let Some(level) = stack.last_mut() {
        if let Some(name) = level.pending.pop() {
            let child = match rustix::fs::openat(&dir, name.as_c_str(), OPEN_DIR, Mode::empty()) {
                Ok(child) => child,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(error) => return Err(error.into()),
            };
            let child_identity = identity(&child)?;
            if child_identity.0 != top.0 {
                return Err(changed(path, "holds a mount point"));
            }
            let pending = empty_files(&child)?;
            dir = child;
            stack.push(Level {
                name: Some(name),
                identity: child_identity,
                pending,
            });
            continue;
        }
        let Some(Level {
            name: Some(name), ..
        }) = stack.pop()
        else {
            break;
        };
        dir = rustix::fs::openat(&dir, c"..", OPEN_DIR, Mode::empty())?;
        let parent = stack.last().map(|level| level.identity);
        if Some(identity(&dir)?) != parent {
            return Err(changed(path, "changed while it was removed"));
        }
        match rustix::fs::unlinkat(&dir, name.as_c_str(), AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(error) => return Err(error.into()),
        }
    }
    drop(dir);
    match std::fs::remove_dir(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// The device and inode of an open directory.
fn identity(dir: &OwnedFd) -> io::Result<(u64, u64)> {
    let stat = rustix::fs::fstat(dir)?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Ok((u64::from(stat.st_dev), u64::from(stat.st_ino)))
}

fn changed(path: &Path, what: &str) -> io::Error {
    io::Error::other(format!("{} {what}", path.display()))
}

/// Unlinks everything in `dir` but its subdirectories, gives each subdirectory its owner's
/// `rwx`, and returns their names.
fn empty_files(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut subdirs = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => FileType::from_raw_mode(stat.st_mode) == FileType::Directory,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(error) => return Err(error.into()),
            },
            _ => false,
        };
        if is_dir {
            give_owner_rwx(dir, name)?;
            subdirs.push(name.to_owned());
        } else {
            match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(subdirs)
}

/// Adds the owner's `rwx` to directory `name` in `dir` when it lacks any of them (the other
/// bits kept, set-id and sticky bits dropped). Through a descriptor of the directory itself
/// (`O_PATH`, never a link: a writer swapping in a link cannot have its target changed) and
/// its `/proc/self/fd` entry, since `fchmod` refuses an `O_PATH` descriptor and `chmodat`
/// cannot be told not to follow a link on every kernel.
fn give_owner_rwx<P: rustix::path::Arg>(dir: impl AsFd, name: P) -> io::Result<()> {
    let flags = OFlags::PATH
        .union(OFlags::DIRECTORY)
        .union(OFlags::NOFOLLOW)
        .union(OFlags::CLOEXEC);
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    let stat = rustix::fs::fstat(&fd)?;
    if stat.st_mode & OWNER_RWX == OWNER_RWX {
        return Ok(());
    }
    let mode = Mode::from_raw_mode((stat.st_mode & 0o777) | OWNER_RWX);
    rustix::fs::chmod(format!("/proc/self/fd/{}", fd.as_raw_fd()), mode)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt as _, symlink};
    use std::os::unix::process::CommandExt as _;

    use super::*;

    /// Set in the child the test starts as `nobody` when it runs as root: the base directory.
    const CHILD_ENV: &str = "HORDE_CLEANUP_TEST_BASE";
    /// Deeper than `PATH_MAX` (4,096) can name, and than the default open-file limit.
    const DEPTH: usize = 2_500;

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// What a hostile job leaves, built and removed in `base` by the calling uid: directories
    /// without permissions (000, write-only, read-only), files, a FIFO, links to a directory and
    /// a file outside the tree, a chain of directories deeper than a path can name with the
    /// deepest locked; only the outside survives, untouched.
    fn build_and_remove(base: &Path) {
        let (root, outside) = (base.join("job"), base.join("outside"));
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir_all(root.join("w/r")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("kept"), b"kept").unwrap();
        std::fs::write(root.join("a/b/c/f"), b"x").unwrap();
        std::fs::write(root.join("a/f"), b"x").unwrap();
        std::fs::write(root.join("w/r/f"), b"x").unwrap();
        symlink(&outside, root.join("a/b/outside")).unwrap();
        symlink(outside.join("kept"), root.join("a/kept")).unwrap();
        rustix::fs::mknodat(
            CWD,
            root.join("a/fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let mut level = rustix::fs::openat(CWD, &root, OPEN_DIR, Mode::empty()).unwrap();
        for _ in 0..DEPTH {
            rustix::fs::mkdirat(&level, c"dd", Mode::from_raw_mode(0o700)).unwrap();
            level = rustix::fs::openat(&level, c"dd", OPEN_DIR, Mode::empty()).unwrap();
        }
        rustix::fs::mkdirat(&level, c"locked", Mode::from_raw_mode(0o000)).unwrap();
        drop(level);
        let outside_mode = std::fs::metadata(&outside).unwrap().permissions().mode();
        for (dir, bits) in [
            ("a/b/c", 0o000),
            ("a/b", 0o000),
            ("a", 0o100),
            ("w/r", 0o400),
        ] {
            mode(&root.join(dir), bits);
        }
        mode(&root.join("w"), 0o200);
        if !rustix::process::geteuid().is_root() {
            assert!(std::fs::read_dir(root.join("a")).is_err());
            assert!(
                std::fs::remove_dir_all(&root).is_err(),
                "the tree must be locked"
            );
        }

        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert_eq!(std::fs::read(outside.join("kept")).unwrap(), b"kept");
        assert_eq!(
            std::fs::metadata(&outside).unwrap().permissions().mode(),
            outside_mode
        );
        remove_tree(&root).unwrap();
    }

    #[test]
    fn a_tree_a_job_locked_is_removed_without_following_its_links() {
        if let Some(base) = std::env::var_os(CHILD_ENV) {
            build_and_remove(Path::new(&base));
            return;
        }
        let base = tempfile::tempdir().unwrap();
        if !rustix::process::geteuid().is_root() {
            build_and_remove(base.path());
            return;
        }
        // Root ignores permissions: the tree is built and removed by `nobody`, as a job of an
        // unprivileged executor does to that executor's own files.
        build_and_remove(&base.path().join("as-root"));
        let nobody = base.path().join("nobody");
        std::fs::create_dir(&nobody).unwrap();
        rustix::fs::chown(
            &nobody,
            Some(rustix::fs::Uid::from_raw(65_534)),
            Some(rustix::fs::Gid::from_raw(65_534)),
        )
        .unwrap();
        mode(base.path(), 0o755);
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "server::cleanup::tests::a_tree_a_job_locked_is_removed_without_following_its_links",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &nobody)
            .uid(65_534)
            .gid(65_534)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{said}");
        assert!(said.contains("1 passed"), "{said}");
        assert!(!nobody.join("job").exists());
    }

    #[test]
    fn a_missing_path_is_removed_and_a_file_unlinked() {
        let base = tempfile::tempdir().unwrap();
        remove_tree(&base.path().join("missing")).unwrap();
        let file = base.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        remove_tree(&file).unwrap();
        assert!(!file.exists());
        let link: PathBuf = base.path().join("link");
        symlink(base.path(), &link).unwrap();
        remove_tree(&link).unwrap();
        assert!(!link.exists() && base.path().exists());
    }

    /// A directory's permissions are changed through the directory itself: a link in its place
    /// (a writer swapping one in) is refused, its target untouched; set-id bits are dropped.
    #[test]
    fn permissions_are_given_back_to_the_directory_never_through_a_link() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("target");
        std::fs::create_dir(&target).unwrap();
        mode(&target, 0o2500);
        let link = base.path().join("link");
        symlink(&target, &link).unwrap();
        assert!(give_owner_rwx(CWD, link.as_path()).is_err());
        let target_mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(target_mode & 0o7777, 0o2500);
        give_owner_rwx(CWD, target.as_path()).unwrap();
        let target_mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(target_mode & 0o7777, 0o700);
    }
}
