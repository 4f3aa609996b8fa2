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
    keys_lock: std::sync::Mutex<()>,
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
                keys_lock: std::sync::Mutex::new(()),
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

    /// The version recorded for an upload id, if that upload was committed.
    pub fn find_upload(
        &self,
        agreement: &str,
        dataset: &str,
        upload_id: &str,
    ) -> Result<Option<VersionInfo>, StorageError> {
        self.follow(
            UPLOADS,
            &key_name(&[agreement, dataset, upload_id]),
            agreement,
            dataset,
        )
    }

    /// The current version of a dataset.
    pub fn current(
        &self,
        agreement: &str,
        dataset: &str,
    ) -> Result<Option<VersionInfo>, StorageError> {
        self.follow(
            CURRENT,
            &key_name(&[agreement, dataset]),
            agreement,
            dataset,
        )
    }

    /// Looks up a version name in `table` under `key`, then its record.
    fn follow(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
        agreement: &str,
        dataset: &str,
    ) -> Result<Option<VersionInfo>, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let Some(version) = tx.open_table(table)?.get(key)? else {
            return Ok(None);
        };
        let versions = tx.open_table(VERSIONS)?;
        let info = versions
            .get(key_name(&[agreement, dataset, version.value()]).as_str())?
            .map(|v| serde_json::from_slice(v.value()))
            .transpose()?;
        Ok(info)
    }

    /// Every committed version of a dataset, oldest first.
    pub fn versions(
        &self,
        agreement: &str,
        dataset: &str,
    ) -> Result<Vec<VersionInfo>, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let versions = tx.open_table(VERSIONS)?;
        let prefix = format!("{agreement}/{dataset}/");
        let mut out = Vec::new();
        for entry in versions.range(prefix.as_str()..)? {
            let (k, v) = entry?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            out.push(serde_json::from_slice::<VersionInfo>(v.value())?);
        }
        out.sort_by(|a, b| {
            a.committed_at
                .cmp(&b.committed_at)
                .then(a.version.cmp(&b.version))
        });
        Ok(out)
    }

    /// Starts writing a new version; nothing is visible until [`Store::commit`].
    pub fn stage(&self, agreement: &str, dataset: &str) -> Result<StagedVersion, StorageError> {
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second].[subsecond digits:6]Z"
            ))
            .map_err(|e| StorageError::Db(format!("formatting a version stamp: {e}")))?;
        let suffix = hex::encode(crypto::random_bytes::<4>()?);
        let version = format!("v{stamp}-{suffix}");
        let _guard = self
            .inner
            .keys_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (key, sealed_key) = self.new_version_key(agreement, dataset, &version)?;
        let path = self
            .staging_dir()
            .join(format!("{agreement}.{dataset}.{version}.part"));
        StagedVersion::create(path, key, sealed_key, agreement, dataset, &version)
    }

    /// Makes a staged version durable and current, atomically: file synced
    /// and renamed first, then one metadata transaction records the version,
    /// the upload id and the new current pointer.
    /// Refused, storing nothing, if `meta.base` is no longer current.
    pub fn commit(
        &self,
        staged: StagedVersion,
        meta: Commit<'_>,
    ) -> Result<VersionInfo, StorageError> {
        let Commit {
            base,
            upload_id,
            uploaded_by,
            policy_hash,
            form,
            committed_at,
            owner_key,
        } = meta;
        let (agreement, dataset, version) = (
            staged.agreement().to_string(),
            staged.dataset().to_string(),
            staged.version().to_string(),
        );
        let staged_key = staged.sealed_key().to_vec();
        let target = self.version_path(&agreement, &dataset, &version);
        let (rows, bytes) = staged.finish_into(&target)?;
        crate::crash::point("commit.renamed");
        let info = VersionInfo {
            agreement: agreement.clone(),
            dataset: dataset.clone(),
            version: version.clone(),
            upload_id: upload_id.to_string(),
            uploaded_by: uploaded_by.to_string(),
            rows,
            bytes,
            committed_at,
            policy_hash: policy_hash.to_string(),
            form: form.to_string(),
        };
        let owner_entry = owner_key
            .map(|id| self.sealed_key_id(&info, blinding::KeyRole::Owner, id))
            .transpose()?;
        let tx = self.inner.db.begin_write()?;
        let upload_key = key_name(&[&agreement, &dataset, upload_id]);
        let raced = tx.open_table(UPLOADS)?.get(upload_key.as_str())?.is_some();
        if raced {
            // A concurrent upload with the same id committed first: keep it.
            tx.abort()?;
            std::fs::remove_file(&target).map_err(io_err(&target))?;
            return self
                .find_upload(&agreement, &dataset, upload_id)?
                .ok_or_else(|| {
                    StorageError::Db("an upload id points at a missing version".into())
                });
        }
        let current_key = key_name(&[&agreement, &dataset]);
        let now_current = tx
            .open_table(CURRENT)?
            .get(current_key.as_str())?
            .map(|v| v.value().to_string());
        if now_current.as_deref() != base {
            tx.abort()?;
            std::fs::remove_file(&target).map_err(io_err(&target))?;
            return Err(StorageError::Superseded { dataset });
        }
        {
            let mut uploads = tx.open_table(UPLOADS)?;
            uploads.insert(upload_key.as_str(), version.as_str())?;
            let mut versions = tx.open_table(VERSIONS)?;
            let json = serde_json::to_vec(&info)?;
            versions.insert(
                key_name(&[&agreement, &dataset, &version]).as_str(),
                json.as_slice(),
            )?;
            let mut current = tx.open_table(CURRENT)?;
            current.insert(key_name(&[&agreement, &dataset]).as_str(), version.as_str())?;
        }
        tx.open_table(version_keys::VERSION_DATA_KEYS)?
            .insert(version_keys::entry(&info).as_str(), staged_key.as_slice())?;
        if let Some((entry, sealed)) = &owner_entry {
            tx.open_table(blinding::VERSION_KEYS)?
                .insert(entry.as_str(), sealed.as_slice())?;
        }
        tx.commit()?;
        crate::crash::point("commit.recorded");
        Ok(info)
    }

    /// The value under `key` in `table`, opened with the agreement's data
    /// key under `aad`; None if absent. A data directory from before the
    /// table existed reads as holding nothing.
    pub(super) fn open_sealed(
        &self,
        table: TableDefinition<&str, &[u8]>,
        agreement: &str,
        key: &str,
        aad: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let sealed = {
            let tx = self.inner.db.begin_read()?;
            let table = match tx.open_table(table) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            match table.get(key)? {
                Some(v) => v.value().to_vec(),
                None => return Ok(None),
            }
        };
        self.data_key(agreement)?
            .open(&sealed, aad)
            .map(Some)
            .map_err(|_| StorageError::Db(format!("{key} did not open")))
    }

    /// Decrypts a committed version into record batches.
    pub fn read(&self, info: &VersionInfo) -> Result<Vec<RecordBatch>, StorageError> {
        self.read_with(info, Ok)
    }

    /// Decrypts a committed version, keeping what `keep` makes of each
    /// batch. A `keep` that returns a batch of its own buffers (a copy of
    /// the columns it needs) lets the version be read through one chunk's
    /// memory instead of the whole file's.
    ///
    /// A version found damaged is recorded so ([`Store::is_damaged`]) and
    /// reported as [`StorageError::VersionDamaged`].
    pub fn read_with<E: From<StorageError>>(
        &self,
        info: &VersionInfo,
        mut keep: impl FnMut(RecordBatch) -> Result<RecordBatch, E>,
    ) -> Result<Vec<RecordBatch>, E> {
        let key = self.version_key(info)?;
        let path = self.version_path(&info.agreement, &info.dataset, &info.version);
        let mut kept_error: Option<E> = None;
        let read = file::read_version(
            &path,
            &key,
            [&info.agreement, &info.dataset, &info.version],
            |batch| {
                keep(batch).map_err(|e| {
                    kept_error = Some(e);
                    StorageError::Db(String::new())
                })
            },
        );
        match read {
            Ok(batches) => Ok(batches),
            Err(_) if kept_error.is_some() => Err(kept_error.expect("checked")),
            Err(StorageError::Damaged { path }) => {
                tracing::error!(path = %path.display(), "a dataset version does not read back as written; its owner must upload again");
                self.mark_damaged(info, "a sealed chunk did not open")?;
                Err(StorageError::VersionDamaged {
                    dataset: info.dataset.clone(),
                    path,
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
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
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    pub(super) fn commit<'a>(base: Option<&'a str>, upload_id: &'a str) -> Commit<'a> {
        Commit {
            base,
            upload_id,
            uploaded_by: "acme",
            policy_hash: "h",
            form: "",
            committed_at: 1,
            owner_key: None,
        }
    }

    pub(super) fn put(store: &Store, upload_id: &str, n: i64) -> VersionInfo {
        let mut staged = store.stage("a", "d").unwrap();
        let b = batch(n);
        staged
            .append(&crate::upload::encode_batch(&b).unwrap(), n as u64)
            .unwrap();
        let base = store.current("a", "d").unwrap().map(|v| v.version);
        store
            .commit(staged, commit(base.as_deref(), upload_id))
            .unwrap()
    }

    #[test]
    fn a_store_open_elsewhere_is_in_use_not_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let err = Store::open(dir.path(), None).unwrap_err();
        assert!(matches!(err, StorageError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("already running"), "{err}");
        drop(store);
        assert!(Store::open(dir.path(), None).is_ok());
    }

    #[test]
    fn a_commit_from_a_version_no_longer_current_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 5);
        let staged = store.stage("a", "d").unwrap();
        let v2 = put(&store, "u2", 7);
        let err = store
            .commit(staged, commit(Some(&v1.version), "u3"))
            .unwrap_err();
        assert!(matches!(err, StorageError::Superseded { .. }), "{err}");
        assert_eq!(store.current("a", "d").unwrap().unwrap(), v2);
        assert!(store.find_upload("a", "d", "u3").unwrap().is_none());
        assert_eq!(walk_files(&dir.path().join("datasets")).unwrap().len(), 2);
        // From nothing, when a version exists: refused too.
        let staged = store.stage("a", "d").unwrap();
        assert!(store.commit(staged, commit(None, "u4")).is_err());
    }

    #[test]
    fn versions_round_trip_and_orphans_are_set_aside_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 5);
        let v2 = put(&store, "u2", 7);
        assert_eq!(store.current("a", "d").unwrap().unwrap(), v2);
        assert_eq!(store.find_upload("a", "d", "u1").unwrap().unwrap(), v1);
        assert_eq!(store.read(&v2).unwrap()[0].num_rows(), 7);
        // An abandoned staged version leaves nothing.
        drop(store.stage("a", "d").unwrap());
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
        drop(store);

        // A file renamed into place whose metadata commit never happened.
        let orphan = dir.path().join("datasets/a/d/v9-orphan.cds");
        std::fs::write(&orphan, b"CRDS\x01partial").unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        assert!(!orphan.exists());
        let kept = walk_files(&dir.path().join("quarantine")).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].ends_with("datasets/a/d/v9-orphan.cds"), "{kept:?}");
        assert_eq!(store.current("a", "d").unwrap().unwrap(), v2);
        assert_eq!(store.versions("a", "d").unwrap().len(), 2);
    }

    #[test]
    fn a_deleted_versions_file_put_back_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 5);
        let path = store.version_path("a", "d", &v1.version);
        let copy = std::fs::read(&path).unwrap();
        let v2 = put(&store, "u2", 4);
        store.delete_versions(std::slice::from_ref(&v1)).unwrap();
        // A backup of the file alone, put back: its key went with it.
        std::fs::write(&path, &copy).unwrap();
        assert!(store.read(&v1).is_err());
        // The agreement's key still opens what it should.
        assert_eq!(store.read(&v2).unwrap()[0].num_rows(), 4);
    }

    #[test]
    fn tampered_or_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v = put(&store, "u1", 5);
        let path = store.version_path("a", "d", &v.version);
        let original = std::fs::read(&path).unwrap();
        let mut flipped = original.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x01;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            store.read(&v),
            Err(StorageError::VersionDamaged { .. })
        ));
        std::fs::write(&path, &original[..original.len() - 40]).unwrap();
        assert!(matches!(
            store.read(&v),
            Err(StorageError::VersionDamaged { .. })
        ));
        // Cut exactly after a whole data chunk: the end marker (4-byte
        // length, 12-byte nonce, 16-byte tag) is missing.
        std::fs::write(&path, &original[..original.len() - 32]).unwrap();
        assert!(matches!(
            store.read(&v),
            Err(StorageError::VersionDamaged { .. })
        ));
        // Anything after the end marker, even a copy of it.
        let mut longer = original.clone();
        longer.extend_from_slice(&original[original.len() - 32..]);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(
            store.read(&v),
            Err(StorageError::VersionDamaged { .. })
        ));
        assert!(store.is_damaged(&v).unwrap());
        std::fs::write(&path, &original).unwrap();
        assert_eq!(store.read(&v).unwrap()[0].num_rows(), 5);
        // Put back whole: the next check clears the mark.
        assert!(store.clear_if_whole(&v).unwrap());
        assert!(!store.is_damaged(&v).unwrap());
    }

    /// A reader that copies each batch gets every chunk's rows intact while
    /// the chunk buffer is used again (chunks larger and smaller than the
    /// one before); one that keeps the decoded batch gets the same rows; a
    /// refusal from `keep` ends the read with it; damage is still found.
    #[test]
    fn reading_through_one_chunk_buffer_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let sizes = [300i64, 5_000, 20, 7_000, 1, 4_096];
        let mut staged = store.stage("a", "d").unwrap();
        for (i, n) in sizes.iter().enumerate() {
            let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
            let values = Int64Array::from_iter_values((0..*n).map(|v| v * 10 + i as i64));
            let b = RecordBatch::try_new(schema, vec![Arc::new(values)]).unwrap();
            staged
                .append(&crate::upload::encode_batch(&b).unwrap(), *n as u64)
                .unwrap();
        }
        let v = store
            .commit(staged, super::tests::commit(None, "u1"))
            .unwrap();
        let copy = |b: RecordBatch| -> Result<RecordBatch, StorageError> {
            let columns = b.columns().iter().map(crate::query::owned).collect();
            Ok(RecordBatch::try_new(b.schema(), columns).unwrap())
        };
        let copied = store.read_with(&v, copy).unwrap();
        let kept = store.read(&v).unwrap();
        assert_eq!(copied, kept);
        assert_eq!(copied.len(), sizes.len());
        for (i, (b, n)) in copied.iter().zip(sizes).enumerate() {
            let x = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            let expected: Vec<i64> = (0..n).map(|v| v * 10 + i as i64).collect();
            assert_eq!(x.values().as_ref(), expected.as_slice(), "chunk {i}");
        }
        let mut seen = 0;
        let refused = store.read_with(&v, |b| {
            seen += 1;
            if seen == 3 {
                Err(StorageError::Arrow("refused".into()))
            } else {
                copy(b)
            }
        });
        assert!(matches!(refused, Err(StorageError::Arrow(m)) if m == "refused"));
        assert_eq!(seen, 3);
        let path = store.version_path("a", "d", &v.version);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            store.read_with(&v, copy),
            Err(StorageError::VersionDamaged { .. })
        ));
    }

    #[test]
    fn a_wrong_master_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        put(&store, "u1", 3);
        drop(store);
        let other = dir.path().join("other.key");
        std::fs::write(&other, hex::encode([9u8; 32])).unwrap();
        assert!(matches!(
            Store::open(dir.path(), Some(&other)),
            Err(StorageError::WrongMasterKey(_))
        ));
        let key_mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.path().join("master.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(key_mode, 0o600);
    }
}
