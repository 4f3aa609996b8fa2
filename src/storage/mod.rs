//! The embedded store: a data directory with a metadata database (redb) and
//! dataset versions encrypted at rest.
//!
//! ```text
//! DATA_DIR/master.key                      hex AES-256 key, mode 0600 (or a file given to serve)
//! DATA_DIR/meta.redb                       metadata: wrapped data keys, versions, uploads, current pointers,
//!                                          sealed doubly blinded points and key ids (matching = "ecdh"),
//!                                          sealed matched overlaps
//! DATA_DIR/datasets/AGREEMENT/DATASET/V.cds  one encrypted file per committed version
//! DATA_DIR/staging/                        uploads in progress; cleared at start
//! ```
//!
//! A version becomes visible only through the metadata commit that follows
//! the fsync and rename of its file; a crash before that leaves an orphan
//! file, deleted at the next start, and the previous version current.

mod blinding;
mod crypto;
mod db;
mod file;
mod ledger;
mod lifecycle;
mod matched;
mod overlaps;
mod recover;
mod scrub;
mod version_keys;
mod versions;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub use blinding::{Blinding, KeyId};
use crypto::{KEY_LEN, Key};
pub use file::StagedVersion;
pub use ledger::{Charge, DELTA_UNITS, Spent, Totals, delta_from_units, delta_to_units};
pub use matched::MatchedTable;
pub use overlaps::MatchedOverlap;

/// agreement -> data key sealed by the master key.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("data_keys");
/// "agreement/dataset/version" -> VersionInfo (JSON).
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");
/// "agreement/dataset/upload id" -> version.
const UPLOADS: TableDefinition<&str, &str> = TableDefinition::new("uploads");
/// "agreement/dataset" -> current version.
const CURRENT: TableDefinition<&str, &str> = TableDefinition::new("current");

/// What went wrong in the store. Messages hold paths and causes, never data.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metadata store: {0}")]
    Db(String),
    #[error("{0}: the master key does not open this data directory's keys")]
    WrongMasterKey(String),
    #[error("{path}: the master key file must hold 64 hex digits")]
    BadMasterKey { path: PathBuf },
    #[error("{path}: dataset file is damaged or was tampered with")]
    Damaged { path: PathBuf },
    /// A committed version of `dataset` is damaged (now recorded so).
    #[error("{path}: version of dataset {dataset} is damaged or was tampered with")]
    VersionDamaged { dataset: String, path: PathBuf },
    #[error("the system random source failed")]
    Random,
    /// The metadata database is missing or damaged; the message names the
    /// way out.
    #[error("{}: the metadata database {problem}; {recovery}", path.display())]
    Metadata {
        path: PathBuf,
        problem: String,
        recovery: &'static str,
    },
    /// Another process (a running server) holds the metadata database.
    #[error("{}: in use by another process; is a server already running on this data directory?", path.display())]
    InUse { path: PathBuf },
    /// The version a commit was to replace is no longer current.
    #[error("{dataset}: another version was committed since this one was started")]
    Superseded { dataset: String },
    #[error("{0}")]
    Arrow(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

impl From<crypto::CryptoError> for StorageError {
    fn from(e: crypto::CryptoError) -> Self {
        match e {
            crypto::CryptoError::Random => StorageError::Random,
            crypto::CryptoError::Open => StorageError::Db("a sealed value did not open".into()),
        }
    }
}

impl StorageError {
    /// The store could not take a write (full, over quota, read-only).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => crate::disk::is_out_of_space(source),
            StorageError::Db(text) => {
                // redb reports I/O failures as text.
                let t = text.to_ascii_lowercase();
                t.contains("no space left")
                    || t.contains("read-only file system")
                    || t.contains("quota exceeded")
                    // redb after a failed write, until it is opened again
                    // (done at the next transaction).
                    || t.contains("previous i/o error")
            }
            _ => false,
        }
    }

    /// Stored data that does not read back as written.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StorageError::Damaged { .. } | StorageError::VersionDamaged { .. }
        )
    }
}

pub use recover::{Recovered, recover};

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One committed dataset version, as recorded in the metadata store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub agreement: String,
    pub dataset: String,
    pub version: String,
    pub upload_id: String,
    pub uploaded_by: String,
    pub rows: u64,
    /// Size of the encrypted file.
    pub bytes: u64,
    /// Unix seconds.
    pub committed_at: i64,
    /// Hex BLAKE3 of the policy the upload was validated against.
    pub policy_hash: String,
    /// How its identifiers were made and its columns typed
    /// ([`crate::policy::Policy::data_form`]); empty for versions stored
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub form: String,
}

/// Upload ids of the versions erasures write start with this.
pub const ERASURE_ID_PREFIX: &str = "erase-";

/// What a commit records besides the rows.
#[derive(Debug, Clone, Copy)]
pub struct Commit<'a> {
    /// The version the new one replaces (None: the dataset had none). If
    /// another version became current since, nothing is committed
    /// ([`StorageError::Superseded`]): an upload or erasure that started
    /// from a version never overwrites one made after it.
    pub base: Option<&'a str>,
    pub upload_id: &'a str,
    pub uploaded_by: &'a str,
    pub policy_hash: &'a str,
    /// [`VersionInfo::form`].
    pub form: &'a str,
    /// Unix seconds.
    pub committed_at: i64,
    /// Under ecdh, the id of the owner's blinding key.
    pub owner_key: Option<&'a KeyId>,
}

/// The embedded store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    db: db::Db,
    master: Key,
    /// Held while a data key is created for staging or destroyed.
    keys_lock: parking_lot::Mutex<()>,
}

fn key_name(parts: &[&str]) -> String {
    parts.join("/")
}

impl Store {
    /// Opens (creating if needed) the store in `root`. The master key is read
    /// from `master_key`, or from `root/master.key`, created on first start.
    pub fn open(root: &Path, master_key: Option<&Path>) -> Result<Self, StorageError> {
        create_private_dir(root)?;
        let key_path = Store::master_key_path(root, master_key);
        let master = load_or_create_master(&key_path, master_key.is_none())?;
        recover::check_metadata_present(root)?;
        let db_path = root.join(recover::META_FILE);
        recover::open_metadata(&db_path, true, |db| {
            let tx = db.0.begin_write()?;
            {
                tx.open_table(KEYS)?;
                tx.open_table(VERSIONS)?;
                tx.open_table(UPLOADS)?;
                tx.open_table(CURRENT)?;
                tx.open_table(ledger::BUDGET)?;
                tx.open_table(ledger::BUDGET_DELTA)?;
                tx.open_table(ledger::PENDING)?;
                tx.open_table(blinding::BLINDINGS)?;
                tx.open_table(blinding::VERSION_KEYS)?;
                tx.open_table(overlaps::OVERLAPS)?;
                tx.open_table(matched::MATCHED)?;
                tx.open_table(lifecycle::CLOCK)?;
                tx.open_table(scrub::DAMAGED)?;
                tx.open_table(version_keys::VERSION_DATA_KEYS)?;
            }
            tx.commit()?;
            let store = Store::checked(root, db, master)?;
            store.recover()?;
            store.mark_missing_or_cut()?;
            Ok(store)
        })
    }

    /// A store over `db`, once `master` is shown to open its data keys.
    fn checked(root: &Path, db: db::Opened, master: Key) -> Result<Self, StorageError> {
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                db: db::Db::new(root.join(recover::META_FILE), db),
                master,
                keys_lock: parking_lot::Mutex::new(()),
            }),
        };
        store.check_master_key()?;
        Ok(store)
    }

    /// The master key file: the one given, or `ROOT/master.key`.
    fn master_key_path(root: &Path, master_key: Option<&Path>) -> PathBuf {
        master_key
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join("master.key"))
    }

    /// Opens an existing store to read it, for commands on a stopped
    /// server's data directory: creates nothing (no folder, no master key,
    /// no tables) and cleans nothing up.
    pub fn open_existing(root: &Path, master_key: Option<&Path>) -> Result<Self, StorageError> {
        let db_path = root.join(recover::META_FILE);
        if !db_path.exists() {
            return Err(StorageError::Db(format!(
                "{}: not a cleanroom data directory (no meta.redb)",
                root.display()
            )));
        }
        let master = load_or_create_master(&Store::master_key_path(root, master_key), false)?;
        recover::open_metadata(&db_path, false, |db| Store::checked(root, db, master))
    }

    /// How many handles share this store (this one included).
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn staging_dir(&self) -> PathBuf {
        self.inner.root.join("staging")
    }

    fn version_path(&self, agreement: &str, dataset: &str, version: &str) -> PathBuf {
        self.inner
            .root
            .join("datasets")
            .join(agreement)
            .join(dataset)
            .join(format!("{version}.cds"))
    }

    /// Fails early if the master key cannot open an existing data key.
    fn check_master_key(&self) -> Result<(), StorageError> {
        let tx = self.inner.db.begin_read()?;
        let keys = tx.open_table(KEYS)?;
        if let Some(entry) = keys.iter()?.next() {
            let (agreement, sealed) = entry?;
            self.inner
                .master
                .open(sealed.value(), &data_key_aad(agreement.value()))
                .map_err(|_| StorageError::WrongMasterKey(agreement.value().to_string()))?;
        }
        Ok(())
    }

    /// Clears staging and sets aside version files the metadata does not
    /// know (the remains of uploads interrupted before their commit) in
    /// `quarantine/`: a file the store cannot explain is never deleted.
    fn recover(&self) -> Result<(), StorageError> {
        let staging = self.staging_dir();
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
        }
        create_private_dir(&staging)?;
        let mut known: BTreeSet<PathBuf> = {
            let tx = self.inner.db.begin_read()?;
            let versions = tx.open_table(VERSIONS)?;
            let mut known = BTreeSet::new();
            for entry in versions.iter()? {
                let (_, value) = entry?;
                let info: VersionInfo = serde_json::from_slice(value.value())?;
                known.insert(self.version_path(&info.agreement, &info.dataset, &info.version));
            }
            known
        };
        known.extend(self.known_matched_files()?);
        let datasets = self.inner.root.join("datasets");
        let unknown: Vec<PathBuf> = walk_files(&datasets)?
            .into_iter()
            .filter(|f| !known.contains(f))
            .collect();
        if !unknown.is_empty() {
            let dir = recover::quarantine(&self.inner.root, "unrecorded", &unknown)?;
            tracing::warn!(
                files = unknown.len(),
                to = %dir.display(),
                "set aside dataset files no record names (left by an upload or matching interrupted before its commit)"
            );
        }
        Ok(())
    }

    /// The agreement's data key if it has one; never creates one (so it
    /// is safe inside another write transaction).
    fn existing_data_key(&self, agreement: &str) -> Result<Option<Key>, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let keys = tx.open_table(KEYS)?;
        match keys.get(agreement)? {
            Some(sealed) => self
                .open_data_key(agreement, sealed.value(), &data_key_aad(agreement))
                .map(Some),
            None => Ok(None),
        }
    }

    /// The agreement's data key, created and sealed on first use.
    fn data_key(&self, agreement: &str) -> Result<Key, StorageError> {
        if let Some(key) = self.existing_data_key(agreement)? {
            return Ok(key);
        }
        let aad = data_key_aad(agreement);
        let tx = self.inner.db.begin_write()?;
        let key = {
            let mut keys = tx.open_table(KEYS)?;
            let existing = keys.get(agreement)?.map(|s| s.value().to_vec());
            match existing {
                Some(sealed) => self.open_data_key(agreement, &sealed, &aad)?,
                None => {
                    let bytes = zeroize::Zeroizing::new(crypto::random_bytes::<KEY_LEN>()?);
                    let sealed = self.inner.master.seal(bytes.as_ref(), &aad)?;
                    keys.insert(agreement, sealed.as_slice())?;
                    Key::from_bytes(&bytes)
                }
            }
        };
        tx.commit()?;
        Ok(key)
    }

    fn open_data_key(
        &self,
        agreement: &str,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Key, StorageError> {
        let bytes = zeroize::Zeroizing::new(
            self.inner
                .master
                .open(sealed, aad)
                .map_err(|_| StorageError::WrongMasterKey(agreement.to_string()))?,
        );
        let bytes: &[u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StorageError::WrongMasterKey(agreement.to_string()))?;
        Ok(Key::from_bytes(bytes))
    }
}

fn data_key_aad(agreement: &str) -> Vec<u8> {
    format!("cleanroom data key v1/{agreement}").into_bytes()
}

fn create_private_dir(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

fn load_or_create_master(path: &Path, create: bool) -> Result<Key, StorageError> {
    if !path.exists() && create {
        let bytes = zeroize::Zeroizing::new(crypto::random_bytes::<KEY_LEN>()?);
        let text = zeroize::Zeroizing::new(format!("{}\n", hex::encode(bytes.as_ref())));
        crate::certs::write_file(path, text.as_bytes(), true, false)
            .map_err(|e| StorageError::Db(e.to_string()))?;
        tracing::info!(path = %path.display(), "created a new master key");
        return Ok(Key::from_bytes(&bytes));
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path))?);
    let decoded = zeroize::Zeroizing::new(hex::decode(text.trim()).unwrap_or_default());
    let bytes: &[u8; KEY_LEN] =
        decoded
            .as_slice()
            .try_into()
            .map_err(|_| StorageError::BadMasterKey {
                path: path.to_path_buf(),
            })?;
    Ok(Key::from_bytes(bytes))
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let path = entry.map_err(io_err(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
