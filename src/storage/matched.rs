//! Matched tables: an agreement's datasets in the form queries read them
//! (identifiers as dense keys, the person number of every row), kept so
//! that a restart loads them instead of decrypting and matching the
//! versions again.
//!
//! One encrypted file per dataset, in the version file format, beside the
//! dataset's versions; one sealed record per agreement names the files and
//! exactly what they were built from (the current versions and the policy
//! hash). The record and its files go whenever one of those versions is
//! deleted (an erasure, a retention run, an expiry), in the same metadata
//! transaction; a newer record replaces an older one.

use std::path::PathBuf;

use arrow::record_batch::RecordBatch;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{StorageError, Store, VERSIONS, VersionInfo, file, io_err, key_name};

/// One dataset's matched table: its name and rows.
pub type MatchedTable = (String, Vec<RecordBatch>);

/// agreement -> sealed [`Record`].
pub(super) const MATCHED: TableDefinition<&str, &[u8]> = TableDefinition::new("matched_tables");

/// What a set of matched tables was built from, and where it lies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// Random name shared by the set's files.
    id: String,
    /// The caller's description of what was matched (the versions in the
    /// policy's dataset order and the policy hash); read back only on an
    /// exact match.
    built_from: Vec<String>,
    /// (dataset, version) of every version the tables hold rows of.
    versions: Vec<(String, String)>,
}

fn aad(agreement: &str) -> Vec<u8> {
    format!("cleanroom matched tables v1/{agreement}").into_bytes()
}

/// The "version" a matched file's chunks are bound to: no real version
/// name holds a '/', so a matched file never opens as a version, nor the
/// reverse.
fn chunk_label(id: &str) -> String {
    format!("matched/{id}")
}

impl Store {
    fn matched_path(&self, agreement: &str, dataset: &str, id: &str) -> PathBuf {
        self.inner
            .root
            .join("datasets")
            .join(agreement)
            .join(dataset)
            .join(format!("{id}.matched.cds"))
    }

    /// The agreement's record; None if there is none or its data key is
    /// gone (then nothing it names can be read anyway).
    fn matched_record(&self, agreement: &str) -> Result<Option<Record>, StorageError> {
        if self.existing_data_key(agreement)?.is_none() {
            return Ok(None);
        }
        let Some(plain) = self.open_sealed(MATCHED, agreement, agreement, &aad(agreement))? else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(&plain)?))
    }

    /// What the agreement's stored matched tables were built from, if any.
    pub fn matched_tables_built_from(
        &self,
        agreement: &str,
    ) -> Result<Option<Vec<String>>, StorageError> {
        Ok(self.matched_record(agreement)?.map(|r| r.built_from))
    }

    /// The agreement's matched tables, one (dataset, batches) per dataset
    /// with rows, if a set was stored from exactly `built_from`.
    pub fn matched_tables(
        &self,
        agreement: &str,
        built_from: &[String],
    ) -> Result<Option<Vec<MatchedTable>>, StorageError> {
        let Some(record) = self.matched_record(agreement)? else {
            return Ok(None);
        };
        if record.built_from != built_from {
            return Ok(None);
        }
        let key = self.data_key(agreement)?;
        let mut out = Vec::with_capacity(record.versions.len());
        for (dataset, _) in &record.versions {
            let path = self.matched_path(agreement, dataset, &record.id);
            // Kept as decoded: the chunks hold the tables and nothing else.
            let label = chunk_label(&record.id);
            let batches =
                file::read_version::<StorageError>(&path, &key, [agreement, dataset, &label], Ok)?;
            out.push((dataset.clone(), batches));
        }
        Ok(Some(out))
    }

    /// Stores the agreement's matched tables, built from `built_from` and
    /// holding rows of `versions` only, replacing any earlier set. Stores
    /// nothing (and is not an error) if one of `versions` was deleted
    /// meanwhile: its rows must not outlive it here.
    pub fn put_matched_tables(
        &self,
        built_from: &[String],
        versions: &[&VersionInfo],
        tables: &[(&str, &[RecordBatch])],
    ) -> Result<bool, StorageError> {
        let Some(agreement) = versions.first().map(|v| v.agreement.as_str()) else {
            return Ok(false);
        };
        let id = hex::encode(super::crypto::random_bytes::<16>()?);
        let key = self.data_key(agreement)?;
        // Written and synced in full before the record names them.
        let mut written = Vec::new();
        let mut write = || -> Result<(), StorageError> {
            for (dataset, batches) in tables {
                let staged = self
                    .staging_dir()
                    .join(format!("{agreement}.{dataset}.{id}.matched"));
                // Matched tables stay under the agreement's key: they go
                // with the versions they were made from.
                let mut out = file::StagedVersion::create(
                    staged,
                    self.data_key(agreement)?,
                    Vec::new(),
                    agreement,
                    dataset,
                    &chunk_label(&id),
                )?;
                for batch in *batches {
                    let ipc = crate::upload::encode_batch(batch)
                        .map_err(|e| StorageError::Arrow(e.to_string()))?;
                    out.append(&ipc, batch.num_rows() as u64)?;
                }
                let target = self.matched_path(agreement, dataset, &id);
                out.finish_into(&target)?;
                written.push(target);
            }
            Ok(())
        };
        if let Err(e) = write() {
            remove_files(&written)?;
            return Err(e);
        }
        let record = Record {
            id,
            built_from: built_from.to_vec(),
            versions: versions
                .iter()
                .map(|v| (v.dataset.clone(), v.version.clone()))
                .collect(),
        };
        let sealed = key.seal(&serde_json::to_vec(&record)?, &aad(agreement))?;
        let tx = self.inner.db.begin_write()?;
        let all_there = {
            let known = tx.open_table(VERSIONS)?;
            let mut all = true;
            for v in versions {
                all &= known
                    .get(key_name(&[&v.agreement, &v.dataset, &v.version]).as_str())?
                    .is_some();
            }
            all
        };
        if !all_there {
            tx.abort()?;
            remove_files(&written)?;
            return Ok(false);
        }
        let previous = tx
            .open_table(MATCHED)?
            .insert(agreement, sealed.as_slice())?
            .map(|v| v.value().to_vec());
        tx.commit()?;
        if let Some(old) = previous {
            let old: Record = serde_json::from_slice(&key.open(&old, &aad(agreement))?)?;
            remove_files(&self.record_files(agreement, &old))?;
        }
        Ok(true)
    }

    /// Removes the agreement's matched tables (a set that could not be read
    /// back, say), record first.
    pub fn drop_matched_tables(&self, agreement: &str) -> Result<(), StorageError> {
        // A record that does not open names no file we could find.
        let files = match self.matched_record(agreement) {
            Ok(Some(record)) => self.record_files(agreement, &record),
            _ => Vec::new(),
        };
        let tx = self.inner.db.begin_write()?;
        tx.open_table(MATCHED)?.remove(agreement)?;
        tx.commit()?;
        remove_files(&files)
    }

    fn record_files(&self, agreement: &str, record: &Record) -> Vec<PathBuf> {
        record
            .versions
            .iter()
            .map(|(d, _)| self.matched_path(agreement, d, &record.id))
            .collect()
    }

    /// Every matched file the metadata names, for the start-up clean-up.
    pub(super) fn known_matched_files(&self) -> Result<Vec<PathBuf>, StorageError> {
        let agreements: Vec<String> = {
            let tx = self.inner.db.begin_read()?;
            let table = tx.open_table(MATCHED)?;
            table
                .iter()?
                .filter_map(Result::ok)
                .map(|(k, _)| k.value().to_string())
                .collect()
        };
        let mut out = Vec::new();
        for a in agreements {
            match self.matched_record(&a) {
                Ok(Some(record)) => out.extend(self.record_files(&a, &record)),
                Ok(None) => {}
                // An unreadable record must not stop the store from
                // opening: its files go as unnamed, and the record is
                // dropped when a query finds it unusable.
                Err(e) => tracing::warn!(error = %e, "a matched-tables record does not open"),
            }
        }
        Ok(out)
    }
}

/// Removes, inside `tx`, the record of `version`'s agreement if its tables
/// hold rows of that version; returns the files to delete once `tx` commits.
pub(super) fn forget_in(
    store: &Store,
    tx: &redb::WriteTransaction,
    version: &VersionInfo,
) -> Result<Vec<PathBuf>, StorageError> {
    let agreement = version.agreement.as_str();
    let mut table = tx.open_table(MATCHED)?;
    let Some(sealed) = table.get(agreement)?.map(|v| v.value().to_vec()) else {
        return Ok(Vec::new());
    };
    // Inside a write transaction: the key is only looked up, never made.
    let opened = store
        .existing_data_key(agreement)?
        .and_then(|key| key.open(&sealed, &aad(agreement)).ok())
        .and_then(|plain| serde_json::from_slice::<Record>(&plain).ok());
    let Some(record) = opened else {
        // Unreadable: nothing can use it, and it must not outlive its rows.
        table.remove(agreement)?;
        return Ok(Vec::new());
    };
    let names_it = record
        .versions
        .iter()
        .any(|(d, v)| *d == version.dataset && *v == version.version);
    if !names_it {
        return Ok(Vec::new());
    }
    table.remove(agreement)?;
    Ok(store.record_files(agreement, &record))
}

/// Deletes `paths`; one already gone is not an error.
pub(super) fn remove_files(paths: &[PathBuf]) -> Result<(), StorageError> {
    for p in paths {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(p)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::put;
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn rows(n: i64) -> Vec<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        vec![
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))])
                .unwrap(),
        ]
    }

    fn built(v: &VersionInfo) -> Vec<String> {
        vec![v.version.clone(), "policy".into()]
    }

    /// A store with one version and a set of matched tables built from it.
    fn one_stored_set() -> (tempfile::TempDir, Store, VersionInfo) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 5);
        assert!(
            store
                .put_matched_tables(&built(&v1), &[&v1], &[("d", &rows(6))])
                .unwrap()
        );
        (dir, store, v1)
    }

    #[test]
    fn tables_round_trip_only_for_what_they_were_built_from() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 5);
        assert!(store.matched_tables("a", &built(&v1)).unwrap().is_none());
        let tables = rows(9);
        assert!(
            store
                .put_matched_tables(&built(&v1), &[&v1], &[("d", &tables)])
                .unwrap()
        );
        let back = store.matched_tables("a", &built(&v1)).unwrap().unwrap();
        assert_eq!(back, vec![("d".to_string(), tables.clone())]);
        // Another policy or version: not these tables.
        let other = vec![v1.version.clone(), "other policy".into()];
        assert!(store.matched_tables("a", &other).unwrap().is_none());
        // A newer set replaces the older, files included.
        let first = store.known_matched_files().unwrap();
        assert!(
            store
                .put_matched_tables(&other, &[&v1], &[("d", &rows(3))])
                .unwrap()
        );
        let second = store.known_matched_files().unwrap();
        assert_eq!(second.len(), 1);
        assert!(!first[0].exists() && second[0].exists());
        // A matched file never opens as a version file, nor the reverse:
        // its chunks are bound to another label.
        let key = store.data_key("a").unwrap();
        let read = |path: &std::path::Path, label: &str| {
            file::read_version::<StorageError>(path, &key, ["a", "d", label], Ok)
        };
        assert!(read(&second[0], &v1.version).is_err());
        let version_file = store.version_path("a", "d", &v1.version);
        assert!(read(&version_file, &chunk_label("x")).is_err());
    }

    #[test]
    fn deleting_a_version_deletes_the_tables_holding_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 5);
        let v2 = put(&store, "u2", 6);
        // Tables of v2 stay when v1 goes; they go with v2.
        assert!(
            store
                .put_matched_tables(&built(&v2), &[&v2], &[("d", &rows(6))])
                .unwrap()
        );
        let files = store.known_matched_files().unwrap();
        store.delete_versions(std::slice::from_ref(&v1)).unwrap();
        assert!(store.matched_tables("a", &built(&v2)).unwrap().is_some());
        store.delete_versions(std::slice::from_ref(&v2)).unwrap();
        assert!(store.matched_tables("a", &built(&v2)).unwrap().is_none());
        assert!(store.known_matched_files().unwrap().is_empty());
        assert!(!files[0].exists());
        // Tables of a version deleted before they are recorded are not kept.
        assert!(
            !store
                .put_matched_tables(&built(&v2), &[&v2], &[("d", &rows(6))])
                .unwrap()
        );
        assert!(store.known_matched_files().unwrap().is_empty());
        let left: Vec<_> = super::super::walk_files(&dir.path().join("datasets")).unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A record whose data key is gone neither blocks deleting versions
    /// (no key is made inside the deletion's transaction) nor opening.
    #[test]
    fn a_record_without_its_key_blocks_nothing() {
        let (dir, store, v1) = one_stored_set();
        assert!(store.shred_data_key("a").unwrap());
        store.delete_versions(std::slice::from_ref(&v1)).unwrap();
        assert!(!store.has_data_key("a").unwrap(), "no key was made");
        drop(store);
        let store = Store::open(dir.path(), None).unwrap();
        assert!(store.known_matched_files().unwrap().is_empty());
        let left = super::super::walk_files(&dir.path().join("datasets")).unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn unnamed_or_unusable_files_go() {
        let (dir, store, v1) = one_stored_set();
        let named = store.known_matched_files().unwrap();
        // A file left by a matching interrupted before its record.
        let stray = named[0].with_file_name("0123.matched.cds");
        std::fs::copy(&named[0], &stray).unwrap();
        drop(store);
        let store = Store::open(dir.path(), None).unwrap();
        assert!(!stray.exists() && named[0].exists());
        // A damaged file is an error, and the set can be dropped.
        let mut bytes = std::fs::read(&named[0]).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&named[0], bytes).unwrap();
        assert!(store.matched_tables("a", &built(&v1)).is_err());
        store.drop_matched_tables("a").unwrap();
        assert!(!named[0].exists());
        assert!(store.matched_tables("a", &built(&v1)).unwrap().is_none());
    }
}
