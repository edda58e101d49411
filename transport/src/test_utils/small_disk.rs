//! A small filesystem of its own for tests of full disks: a tmpfs of a given size mounted over a
//! directory (root only), lazily unmounted when dropped.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A tmpfs of a fixed size mounted over a directory; unmounted (lazily, so open files do not
/// keep it) when dropped, which shows the directory's own files again.
#[derive(Debug)]
pub struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` over `dir` (created if missing) with `dir`'s files copied in,
    /// so a node's data directory can be moved onto it between runs. `None` where this process
    /// is not root, or the mount is refused; panics when a copy fails (the test is wrong).
    pub fn mount_over(dir: &Path, bytes: u64) -> Option<Self> {
        static COPIES: AtomicU32 = AtomicU32::new(0);
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        std::fs::create_dir_all(dir).expect("creating the directory to mount over");
        // A sibling of its own (a fresh name, never an existing directory) keeps the files
        // while the tmpfs is mounted.
        let mut name = dir.file_name().expect("a directory with a name").to_owned();
        name.push(format!(
            ".before-tmpfs-{}-{}",
            std::process::id(),
            COPIES.fetch_add(1, Ordering::Relaxed)
        ));
        let saved = dir.with_file_name(name);
        std::fs::create_dir(&saved).expect("creating the copy's directory");
        copy_contents(dir, &saved);
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|status| status.success());
        // Made before the copy back: a copy that does not fit still unmounts on the way out.
        let disk = mounted.then(|| Self {
            dir: dir.to_owned(),
        });
        if disk.is_some() {
            copy_contents(&saved, dir);
        }
        let _ = std::fs::remove_dir_all(&saved);
        disk
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes a file named `name` until the disk has no byte left (64 KiB writes, then 512-byte
    /// ones for the tail) and returns its path; removing it makes room again.
    pub fn fill(&self, name: &str) -> PathBuf {
        let path = self.dir.join(name);
        let mut file = std::fs::File::create(&path).expect("creating the filler");
        while file.write_all(&[0u8; 64 * 1024]).is_ok() {}
        while file.write_all(&[0u8; 512]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// `cp -a from/. to`: every file of `from`, modes and times kept.
fn copy_contents(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("running cp");
    assert!(
        status.success(),
        "cp -a {}/. {}",
        from.display(),
        to.display()
    );
}
