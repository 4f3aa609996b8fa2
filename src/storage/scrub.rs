//! Finding damaged versions before they block anyone: a quick look at
//! every current version when the store opens (its file is there, at the
//! size recorded), a full check of every sealed chunk in the background,
//! and a record of what was found damaged, so that the dataset is shown to
//! its owner and admins as needing a new upload while the agreement's
//! other datasets keep answering.

use redb::{ReadableTable, TableDefinition};

use super::{CURRENT, StorageError, Store, VersionInfo, key_name};

/// Damaged versions: "agreement/dataset/version" to what was found.
pub(super) const DAMAGED: TableDefinition<&str, &str> = TableDefinition::new("damaged");

fn entry(v: &VersionInfo) -> String {
    key_name(&[&v.agreement, &v.dataset, &v.version])
}

impl Store {
    /// Records `v` as damaged; `what` says how (no path, no content).
    pub fn mark_damaged(&self, v: &VersionInfo, what: &str) -> Result<(), StorageError> {
        let tx = self.inner.db.begin_write()?;
        tx.open_table(DAMAGED)?.insert(entry(v).as_str(), what)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether `v` was found damaged.
    pub fn is_damaged(&self, v: &VersionInfo) -> Result<bool, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let table = match tx.open_table(DAMAGED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(entry(v).as_str())?.is_some())
    }

    /// Forgets the marks of deleted versions.
    pub(super) fn forget_damage_in(
        tx: &redb::WriteTransaction,
        v: &VersionInfo,
    ) -> Result<(), StorageError> {
        tx.open_table(DAMAGED)?.remove(entry(v).as_str())?;
        Ok(())
    }

    /// Clears `v`'s damage mark if it now reads back whole (an operator
    /// put its file back); true if it does.
    pub fn clear_if_whole(&self, v: &VersionInfo) -> Result<bool, StorageError> {
        if !self.looks_whole(v) {
            return Ok(false);
        }
        match self.verify_version(v) {
            Ok(()) => {
                let tx = self.inner.db.begin_write()?;
                tx.open_table(DAMAGED)?.remove(entry(v).as_str())?;
                tx.commit()?;
                Ok(true)
            }
            Err(StorageError::VersionDamaged { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every current version.
    pub fn current_versions(&self) -> Result<Vec<VersionInfo>, StorageError> {
        let pointers: Vec<(String, String)> = {
            let tx = self.inner.db.begin_read()?;
            let current = tx.open_table(CURRENT)?;
            current
                .iter()?
                .map(|e| e.map(|(k, v)| (k.value().to_string(), v.value().to_string())))
                .collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (pointer, _) in pointers {
            let Some((agreement, dataset)) = pointer.split_once('/') else {
                continue;
            };
            if let Some(v) = self.current(agreement, dataset)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// A quick look at `v`: its file is there at the size recorded.
    pub fn looks_whole(&self, v: &VersionInfo) -> bool {
        let path = self.version_path(&v.agreement, &v.dataset, &v.version);
        std::fs::metadata(path).is_ok_and(|m| m.len() == v.bytes)
    }

    /// Opens every sealed chunk of `v`, keeping nothing. Err(Damaged) if
    /// any does not open; other errors (a read failing) are returned as
    /// they are.
    pub fn verify_version(&self, v: &VersionInfo) -> Result<(), StorageError> {
        self.read_with(v, |b| Ok::<_, StorageError>(b.slice(0, 0)))
            .map(|_| ())
    }

    /// Marks every current version that does not look whole; returns how
    /// many. Run when the store opens.
    pub fn mark_missing_or_cut(&self) -> Result<usize, StorageError> {
        let mut found = 0;
        for v in self.current_versions()? {
            if !self.looks_whole(&v) && !self.is_damaged(&v)? {
                tracing::error!(
                    path = %self.version_path(&v.agreement, &v.dataset, &v.version).display(),
                    "a dataset version's file is missing or not the size recorded; its owner must upload again"
                );
                self.mark_damaged(&v, "file missing or cut")?;
                found += 1;
            }
        }
        Ok(found)
    }
}
