//! Deleting data: versions past their retention, everything of an expired
//! agreement, and the versions an erasure supersedes.

use redb::{ReadableTable, TableDefinition};

use super::{CURRENT, KEYS, StorageError, Store, UPLOADS, VERSIONS, VersionInfo, io_err, key_name};

/// The latest time the store has taken as true, in Unix seconds, under
/// the key [`SEEN`].
pub(super) const CLOCK: TableDefinition<&str, i64> = TableDefinition::new("clock");
const SEEN: &str = "seen";

impl Store {
    /// The latest time deletion was allowed to act on, if any.
    pub fn time_seen(&self) -> Result<Option<i64>, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let table = match tx.open_table(CLOCK) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(SEEN)?.map(|v| v.value()))
    }

    /// Records `now` as the latest time seen: only forwards, unless
    /// `confirmed` (an operator's word that the clock is right).
    pub fn see_time(&self, now: i64, confirmed: bool) -> Result<(), StorageError> {
        let tx = self.inner.db.begin_write()?;
        {
            let mut table = tx.open_table(CLOCK)?;
            let seen = table.get(SEEN)?.map(|v| v.value());
            if confirmed || seen.is_none_or(|s| now > s) {
                table.insert(SEEN, now)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes versions: one metadata transaction forgets them (and any
    /// current pointer or upload id naming them), then their files are
    /// removed. A crash in between leaves files nothing names, which the
    /// next start deletes.
    pub fn delete_versions(&self, versions: &[VersionInfo]) -> Result<(), StorageError> {
        if versions.is_empty() {
            return Ok(());
        }
        let tx = self.inner.db.begin_write()?;
        {
            let mut table = tx.open_table(VERSIONS)?;
            let mut current = tx.open_table(CURRENT)?;
            let mut uploads = tx.open_table(UPLOADS)?;
            let mut blindings = tx.open_table(super::blinding::BLINDINGS)?;
            let mut keys = tx.open_table(super::blinding::VERSION_KEYS)?;
            let mut version_keys = tx.open_table(super::version_keys::VERSION_DATA_KEYS)?;
            for v in versions {
                Store::forget_damage_in(&tx, v)?;
                version_keys.remove(super::version_keys::entry(v).as_str())?;
                table.remove(key_name(&[&v.agreement, &v.dataset, &v.version]).as_str())?;
                blindings.remove(key_name(&[&v.agreement, &v.dataset, &v.version]).as_str())?;
                for role in [
                    super::blinding::KeyRole::Owner,
                    super::blinding::KeyRole::Blinder,
                ] {
                    keys.remove(super::blinding::key_entry(v, role).as_str())?;
                }
                let pointer = key_name(&[&v.agreement, &v.dataset]);
                let is_current = current
                    .get(pointer.as_str())?
                    .is_some_and(|c| c.value() == v.version);
                if is_current {
                    current.remove(pointer.as_str())?;
                }
                let prefix = format!("{}/{}/", v.agreement, v.dataset);
                let stale: Vec<String> = uploads
                    .range(prefix.as_str()..)?
                    .filter_map(Result::ok)
                    .take_while(|(k, _)| k.value().starts_with(&prefix))
                    .filter(|(_, val)| val.value() == v.version)
                    .map(|(k, _)| k.value().to_string())
                    .collect();
                for k in stale {
                    uploads.remove(k.as_str())?;
                }
            }
        }
        // Matched tables holding rows of a deleted version go with it.
        let mut doomed = Vec::new();
        for v in versions {
            super::overlaps::forget_in(&tx, v)?;
            doomed.extend(super::matched::forget_in(self, &tx, v)?);
        }
        tx.commit()?;
        crate::crash::point("delete.recorded");
        doomed.extend(
            versions
                .iter()
                .map(|v| self.version_path(&v.agreement, &v.dataset, &v.version)),
        );
        super::matched::remove_files(&doomed)
    }

    /// Destroys the agreement's data key. Anything of the agreement still
    /// on disk can no longer be decrypted; a later upload gets a new key.
    /// False if there was none.
    pub fn shred_data_key(&self, agreement: &str) -> Result<bool, StorageError> {
        let tx = self.inner.db.begin_write()?;
        let removed = tx.open_table(KEYS)?.remove(agreement)?.is_some();
        tx.commit()?;
        Ok(removed)
    }

    /// Destroys the agreement's data key if nothing uses it: no version in
    /// the metadata, no file under its folder, no upload being staged.
    /// Staging takes the same lock, so an upload cannot start in between.
    pub fn shred_data_key_if_unused(&self, agreement: &str) -> Result<bool, StorageError> {
        let _guard = self.inner.keys_lock.lock();
        let prefix = format!("{agreement}/");
        let in_metadata = {
            let tx = self.inner.db.begin_read()?;
            let versions = tx.open_table(VERSIONS)?;
            let mut range = versions.range(prefix.as_str()..)?;
            range
                .next()
                .transpose()?
                .is_some_and(|(k, _)| k.value().starts_with(&prefix))
        };
        let folder = self.inner.root.join("datasets").join(agreement);
        let on_disk = !super::walk_files(&folder)?.is_empty();
        let staging = self.staging_dir();
        let staged = std::fs::read_dir(&staging)
            .map_err(io_err(&staging))?
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{agreement}."))
            });
        if in_metadata || on_disk || staged {
            return Ok(false);
        }
        self.shred_data_key(agreement)
    }

    /// Whether the agreement has a data key.
    pub fn has_data_key(&self, agreement: &str) -> Result<bool, StorageError> {
        let tx = self.inner.db.begin_read()?;
        Ok(tx.open_table(KEYS)?.get(agreement)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::put;
    use super::*;

    #[test]
    fn deleted_versions_leave_no_file_pointer_or_upload_id_and_keys_shred() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let old = put(&store, "u1", 3);
        let new = put(&store, "u2", 4);
        store.delete_versions(std::slice::from_ref(&old)).unwrap();
        assert_eq!(store.versions("a", "d").unwrap(), vec![new.clone()]);
        assert!(store.find_upload("a", "d", "u1").unwrap().is_none());
        assert_eq!(store.current("a", "d").unwrap(), Some(new.clone()));
        store.delete_versions(std::slice::from_ref(&new)).unwrap();
        assert!(store.current("a", "d").unwrap().is_none());
        let files = super::super::walk_files(&dir.path().join("datasets")).unwrap();
        assert!(files.is_empty(), "{files:?}");
        assert!(store.has_data_key("a").unwrap());
        // An upload being staged keeps the key.
        let staged = store.stage("a", "d").unwrap();
        assert!(!store.shred_data_key_if_unused("a").unwrap());
        drop(staged);
        assert!(store.shred_data_key_if_unused("a").unwrap());
        assert!(!store.has_data_key("a").unwrap());
        put(&store, "u3", 1);
        assert!(
            store.has_data_key("a").unwrap(),
            "a new upload gets a new key"
        );
        assert!(
            !store.shred_data_key_if_unused("a").unwrap(),
            "data uses it"
        );
        assert!(store.shred_data_key("a").unwrap());
        assert!(!store.has_data_key("a").unwrap());
        assert!(!store.shred_data_key("a").unwrap());
    }
}
