//! Removing a directory a job wrote in, whatever the job did to it.
//!
//! Under the unprivileged process runner a job runs as the executor's own uid (mapped in its
//! user namespace), so it can take the permissions off its directories: `chmod 000 out/d`
//! leaves a tree that `std::fs::remove_dir_all` cannot open, and the job's output would stay on
//! the host for good. [`remove_tree`] gives each directory back its owner's `rwx` before it
//! reads it, never follows a symbolic link, and walks with one directory open at a time (going
//! back up through `..`), so a tree deeper than `PATH_MAX` or than the open-file limit is
//! removed all the same. It is meant for trees whose writers are gone: a process still writing
//! may leave the last `rmdir` with `ENOTEMPTY` (callers retry).

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
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

/// One directory on the way down: its name in its parent (none for the top) and the
/// subdirectories still to visit.
struct Level {
    name: Option<CString>,
    pending: Vec<CString>,
}

/// Removes `path` and everything under it; a missing `path` is not an error, a file or link
/// at `path` is unlinked.
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
    let pending = empty_files(&dir)?;
    let mut stack = vec![Level {
        name: None,
        pending,
    }];
    while let Some(level) = stack.last_mut() {
        if let Some(name) = level.pending.pop() {
            match rustix::fs::openat(&dir, name.as_c_str(), OPEN_DIR, Mode::empty()) {
                Ok(child) => {
                    let pending = empty_files(&child)?;
                    dir = child;
                    stack.push(Level {
                        name: Some(name),
                        pending,
                    });
                }
                Err(rustix::io::Errno::NOENT) => {}
                Err(error) => return Err(error.into()),
            }
            continue;
        }
        let Some(Level {
            name: Some(name), ..
        }) = stack.pop()
        else {
            break;
        };
        dir = rustix::fs::openat(&dir, c"..", OPEN_DIR, Mode::empty())?;
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

/// Adds the owner's `rwx` to directory `name` in `dir` when it lacks any of them. (`chmodat`
/// follows a link; `name` was seen as a directory, and nothing writes the tree any more.)
fn give_owner_rwx<P: rustix::path::Arg + Copy>(
    dir: impl std::os::fd::AsFd,
    name: P,
) -> io::Result<()> {
    let stat = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory
        || stat.st_mode & OWNER_RWX == OWNER_RWX
    {
        return Ok(());
    }
    let mode = Mode::from_raw_mode((stat.st_mode & 0o7777) | OWNER_RWX);
    match rustix::fs::chmodat(&dir, name, mode, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(error) => Err(error.into()),
    }
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
}
