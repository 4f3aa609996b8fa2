//! The metadata database, reopened after an I/O failure. redb refuses
//! every transaction after a write of its own failed (`PreviousIo`), until
//! the database is opened again; a full disk would otherwise leave the
//! server answering "internal error" until it was restarted. Here the
//! next transaction after such a failure reopens the file, and goes on.
//! (redb lets read transactions begin on a failed handle and refuses what
//! is done inside them, so the file is watched for failed writes.)
//! The errors are redb's own, as its callers return them.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

use redb::backends::FileBackend;
use redb::{
    Database, DatabaseError, ReadTransaction, StorageBackend, StorageError, TransactionError,
    WriteTransaction,
};

/// An open database and its failed-write flag.
pub(super) type Opened = (Database, Arc<AtomicBool>);

/// The database file, with a flag raised by any write to it that fails:
/// after one, redb refuses the reads and writes inside new transactions,
/// though read transactions still begin, so the flag is what tells that
/// the handle must be opened again.
#[derive(Debug)]
struct Watched {
    file: FileBackend,
    failed: Arc<AtomicBool>,
}

impl Watched {
    fn note<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }
}

impl StorageBackend for Watched {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.file.read(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.note(self.file.set_len(len))
    }
    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        self.note(self.file.sync_data(eventual))
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.note(self.file.write(offset, data))
    }
}

/// Opens (or with `create`, creates) the database at `path` with its
/// failed-write flag. Like `Database::open`, an existing file is needed
/// without `create`, and a file another process holds is refused
/// (`DatabaseAlreadyOpen`).
pub(super) fn open(
    path: &Path,
    create: bool,
) -> Result<(Database, Arc<AtomicBool>), DatabaseError> {
    let io = |e: std::io::Error| DatabaseError::Storage(StorageError::Io(e));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    if !create && file.metadata().map_err(io)?.len() == 0 {
        return Err(DatabaseError::Storage(StorageError::Corrupted(
            "the file is empty".into(),
        )));
    }
    let failed = Arc::new(AtomicBool::new(false));
    let backend = Watched {
        file: FileBackend::new(file)?,
        failed: Arc::clone(&failed),
    };
    let db = redb::Builder::new().create_with_backend(backend)?;
    Ok((db, failed))
}

#[derive(Debug)]
pub(super) struct Db {
    path: PathBuf,
    /// How many times the file was opened, and the handle with its
    /// failed-write flag (None between a failed reopening and the next
    /// try).
    db: RwLock<(u64, Option<Opened>)>,
}

fn failed_io() -> TransactionError {
    TransactionError::Storage(StorageError::PreviousIo)
}

impl Db {
    pub(super) fn new(path: PathBuf, db: Opened) -> Self {
        Db {
            path,
            db: RwLock::new((0, Some(db))),
        }
    }

    pub(super) fn begin_write(&self) -> Result<WriteTransaction, TransactionError> {
        self.with(Database::begin_write)
    }

    pub(super) fn begin_read(&self) -> Result<ReadTransaction, TransactionError> {
        self.with(Database::begin_read)
    }

    /// Runs `begin` on the database; after a failed write, on the database
    /// opened again.
    fn with<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> Result<T, TransactionError> {
        let opened = {
            let db = self.db.read();
            let working =
                db.1.as_ref()
                    .filter(|(_, failed)| !failed.load(Ordering::Acquire));
            match working.map(|(d, _)| begin(d)) {
                Some(Err(TransactionError::Storage(StorageError::PreviousIo))) | None => db.0,
                Some(other) => return other,
            }
        };
        self.reopen(opened);
        let db = self.db.read();
        db.1.as_ref()
            .map(|(d, _)| begin(d))
            .unwrap_or_else(|| Err(failed_io()))
    }

    /// Opens the file again in place of the failed handle `failed`. redb
    /// locks its file, so the old handle goes first; if the file cannot be
    /// opened (the disk still full, a transaction still holding the old
    /// handle), no handle is left and every call fails, as UNAVAILABLE,
    /// until a later try succeeds.
    fn reopen(&self, failed: u64) {
        let mut db = self.db.write();
        if db.0 != failed && db.1.is_some() {
            // Another caller reopened it meanwhile.
            return;
        }
        drop(db.1.take());
        match open(&self.path, false) {
            Ok(fresh) => {
                tracing::warn!(path = %self.path.display(), "metadata database reopened after a failed write");
                *db = (db.0 + 1, Some(fresh));
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "metadata database could not be reopened after a failed write; trying again at the next call");
            }
        }
    }
}
