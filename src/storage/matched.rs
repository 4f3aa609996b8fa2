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

    fn matched_record(&self, agreement: &str) -> Result<Option<Record>, StorageError> {
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
    ) -> Result<Option<Vec<(String, Vec<RecordBatch>)>>, StorageError> {
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
            match file::read_version(&path, &key, agreement, dataset, &chunk_label(&record.id)) {
                Ok(batches) => out.push((dataset.clone(), batches)),
                // Deleted by an erasure since the record was read, or
                // damaged: the caller matches the versions again instead.
                Err(e) => {
                    tracing::warn!(error = %e, "matched tables could not be read; matching again");
                    return Ok(None);
                }
            }
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
                let staged = self.staging_dir().join(format!("{agreement}.{dataset}.{id}.matched"));
                let mut out = file::StagedVersion::create(
                    staged,
                    self.data_key(agreement)?,
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
        let remove = |paths: &[PathBuf]| -> Result<(), StorageError> {
            for p in paths {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(p)(e)),
                }
            }
            Ok(())
        };
        if let Err(e) = write() {
            remove(&written)?;
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
            remove(&written)?;
            return Ok(false);
        }
        let previous = {
            let mut table = tx.open_table(MATCHED)?;
            let old = table
                .insert(agreement, sealed.as_slice())?
                .map(|v| v.value().to_vec());
            old
        };
        tx.commit()?;
        if let Some(old) = previous {
            let old: Record = serde_json::from_slice(&key.open(&old, &aad(agreement))?)?;
            remove(&self.record_files(agreement, &old))?;
        }
        Ok(true)
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
            if let Some(record) = self.matched_record(&a)? {
                out.extend(self.record_files(&a, &record));
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
    let record: Record = match store.data_key(agreement)?.open(&sealed, &aad(agreement)) {
        Ok(plain) => serde_json::from_slice(&plain)?,
        // Unreadable: nothing can use it, and it must not outlive its rows.
        Err(_) => {
            table.remove(agreement)?;
            return Ok(Vec::new());
        }
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

