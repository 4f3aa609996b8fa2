//! What a failed write says about the disk under it.

use std::io::{Error, ErrorKind};

/// Whether a write failed for want of room or because the file system is
/// read-only: a condition that passes, after which the same call succeeds.
pub fn is_out_of_space(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::StorageFull
            | ErrorKind::QuotaExceeded
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::FileTooLarge
    )
}

#[cfg(test)]
pub(crate) use small::SmallDisk;

#[cfg(test)]
mod small {
    use std::fs::File;
    use std::io::Write;
    use std::path::{Path, PathBuf};

    /// A tmpfs of `bytes` at a fresh directory, unmounted on drop; None,
    /// with the reason printed, where this process may not mount one.
    pub(crate) struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        pub(crate) fn mount(bytes: u64) -> Option<SmallDisk> {
            let dir = tempfile::tempdir().ok()?;
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(dir.path())
                .output();
            match out {
                Ok(o) if o.status.success() => Some(SmallDisk(dir)),
                Ok(o) => {
                    eprintln!(
                        "skipped: cannot mount a small tmpfs here ({})",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    None
                }
                Err(e) => {
                    eprintln!("skipped: cannot run mount ({e})");
                    None
                }
            }
        }

        pub(crate) fn path(&self) -> &Path {
            self.0.path()
        }

        /// Writes a file until the disk is full.
        pub(crate) fn fill(&self) -> PathBuf {
            let path = self.path().join("filler");
            let mut f = File::create(&path).unwrap();
            let block = vec![7u8; 4096];
            while f.write_all(&block).is_ok() {}
            let _ = f.sync_all();
            path
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }
}
