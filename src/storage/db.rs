//! The metadata database, reopened after an I/O failure. redb refuses
//! every transaction after a write of its own failed (`PreviousIo`), until
//! the database is opened again; a full disk would otherwise leave the
//! server answering "internal error" until it was restarted. Here the
//! next transaction after such a failure reopens the file, and goes on.
//! The errors are redb's own, as its callers return them.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;
use std::sync::RwLock;

use redb::{Database, ReadTransaction, StorageError, TransactionError, WriteTransaction};

#[derive(Debug)]
pub(super) struct Db {
    path: PathBuf,
    /// How many times the file was opened, and the handle (None between a
    /// failed reopening and the next try).
    db: RwLock<(u64, Option<Database>)>,
}

fn failed_io() -> TransactionError {
    TransactionError::Storage(StorageError::PreviousIo)
}

impl Db {
    pub(super) fn new(path: PathBuf, db: Database) -> Self {
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
            let db = self.db.read().unwrap_or_else(|e| e.into_inner());
            match db.1.as_ref().map(&begin) {
                Some(Err(TransactionError::Storage(StorageError::PreviousIo))) | None => db.0,
                Some(other) => return other,
            }
        };
        self.reopen(opened);
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        db.1.as_ref()
            .map(&begin)
            .unwrap_or_else(|| Err(failed_io()))
    }

    /// Opens the file again in place of the failed handle `failed`. redb
    /// locks its file, so the old handle goes first; if the file cannot be
    /// opened (the disk still full, a transaction still holding the old
    /// handle), no handle is left and every call fails, as UNAVAILABLE,
    /// until a later try succeeds.
    fn reopen(&self, failed: u64) {
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        if db.0 != failed && db.1.is_some() {
            // Another caller reopened it meanwhile.
            return;
        }
        drop(db.1.take());
        match Database::open(&self.path) {
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
