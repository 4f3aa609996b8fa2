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
