//! A dataset's versions: staged, committed atomically (upload ids kept so
//! a retry stores nothing twice), listed, and read back decrypted.

use super::*;

impl Store {
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
        let _guard = self.inner.keys_lock.lock();
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
