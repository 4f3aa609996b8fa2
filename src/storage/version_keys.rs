//! One data key per version, sealed under the agreement's key. Deleting a
//! version (by erasure, replacement, retention or expiry) removes its key
//! in the same metadata transaction, so a copy of its file, in a backup or
//! left on a disk, no longer opens with this store's keys. Versions
//! written before keys were per version have none and use the agreement's.

use redb::TableDefinition;
use zeroize::Zeroizing;

use super::crypto::{self, KEY_LEN, Key};
use super::{StorageError, Store, VersionInfo, key_name};

/// "agreement/dataset/version" to the version's key sealed under the
/// agreement's data key.
pub(super) const VERSION_DATA_KEYS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("version_data_keys");

fn aad(agreement: &str, dataset: &str, version: &str) -> Vec<u8> {
    format!("cleanroom version key v1/{agreement}/{dataset}/{version}").into_bytes()
}

impl Store {
    /// A fresh key for a version being staged, and that key sealed for
    /// [`VERSION_DATA_KEYS`].
    pub(super) fn new_version_key(
        &self,
        agreement: &str,
        dataset: &str,
        version: &str,
    ) -> Result<(Key, Vec<u8>), StorageError> {
        let bytes = Zeroizing::new(crypto::random_bytes::<KEY_LEN>()?);
        let sealed = self
            .data_key(agreement)?
            .seal(bytes.as_ref(), &aad(agreement, dataset, version))?;
        Ok((Key::from_bytes(&bytes), sealed))
    }

    /// The key `v`'s file was written with.
    pub(super) fn version_key(&self, v: &VersionInfo) -> Result<Key, StorageError> {
        let agreement_key = self.data_key(&v.agreement)?;
        let sealed = {
            let tx = self.inner.db.begin_read()?;
            let table = match tx.open_table(VERSION_DATA_KEYS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(agreement_key),
                Err(e) => return Err(e.into()),
            };
            match table.get(entry(v).as_str())? {
                Some(s) => s.value().to_vec(),
                None => return Ok(agreement_key),
            }
        };
        let bytes = Zeroizing::new(
            agreement_key
                .open(&sealed, &aad(&v.agreement, &v.dataset, &v.version))
                .map_err(|_| StorageError::Db("a version key did not open".into()))?,
        );
        let bytes: &[u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StorageError::Db("a version key is malformed".into()))?;
        Ok(Key::from_bytes(bytes))
    }
}

pub(super) fn entry(v: &VersionInfo) -> String {
    key_name(&[&v.agreement, &v.dataset, &v.version])
}
