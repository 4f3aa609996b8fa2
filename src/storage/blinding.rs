//! Doubly blinded points of a version (`matching = "ecdh"`): for each
//! distinct singly blinded point the version's rows carry, the point both
//! parties have blinded, and the ids of the two keys involved (the owner's,
//! recorded at commit; the partner's, recorded with the points). Sealed
//! under the agreement's data key in the metadata store, beside the version
//! they belong to, and deleted with it.

use redb::TableDefinition;

use super::{StorageError, Store, VersionInfo, key_name};

/// "agreement/dataset/version" -> sealed pairs.
pub(super) const BLINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("blindings");

/// "agreement/dataset/version/owner" and ".../blinder" -> a sealed key id.
pub(super) const VERSION_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("version_keys");

const POINT: usize = 32;

/// The id of a party's blinding key: the compressed point `a*B` of its
/// scalar `a`, public.
pub type KeyId = [u8; POINT];

/// Which key of a version a `VERSION_KEYS` entry records.
#[derive(Debug, Clone, Copy)]
pub(super) enum KeyRole {
    /// The key the owner blinded the version's points with.
    Owner,
    /// The key the partner blinded them with again.
    Blinder,
}

pub(super) fn key_entry(info: &VersionInfo, role: KeyRole) -> String {
    let role = match role {
        KeyRole::Owner => "owner",
        KeyRole::Blinder => "blinder",
    };
    key_name(&[&info.agreement, &info.dataset, &info.version, role])
}

fn key_aad(entry: &str) -> Vec<u8> {
    format!("cleanroom key id v1/{entry}").into_bytes()
}

/// A version's pairs (singly blinded, doubly blinded), sorted by the first,
/// and the id of the partner's key that made the second from the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blinding {
    blinder: KeyId,
    pairs: Vec<([u8; POINT], [u8; POINT])>,
}

impl Blinding {
    /// From pairs in any order; a repeated single point keeps one pair.
    pub fn new(blinder: KeyId, mut pairs: Vec<([u8; POINT], [u8; POINT])>) -> Self {
        pairs.sort_unstable_by_key(|p| p.0);
        pairs.dedup_by(|a, b| a.0 == b.0);
        Blinding { blinder, pairs }
    }

    /// The id of the key the partner blinded with.
    pub fn blinder(&self) -> &KeyId {
        &self.blinder
    }

    /// A hash index from single to double point, for looking up a whole
    /// version's rows (a binary search per row costs several cache misses).
    /// std's hasher is keyed at random per map, so points a party crafted
    /// to collide cannot slow it down.
    pub fn index(&self) -> std::collections::HashMap<&[u8; POINT], &[u8; POINT]> {
        self.pairs.iter().map(|(s, d)| (s, d)).collect()
    }

    /// Only the pairs whose single point `keep` admits.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8; POINT]) -> bool) {
        self.pairs.retain(|(s, _)| keep(s));
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pairs.len() * 2 * POINT);
        for (s, d) in &self.pairs {
            out.extend_from_slice(s);
            out.extend_from_slice(d);
        }
        out
    }

    fn from_bytes(blinder: KeyId, bytes: &[u8]) -> Option<Self> {
        if !bytes.len().is_multiple_of(2 * POINT) {
            return None;
        }
        let pairs = bytes
            .chunks_exact(2 * POINT)
            .map(|c| {
                let (s, d) = c.split_at(POINT);
                (
                    s.try_into().expect("32 bytes"),
                    d.try_into().expect("32 bytes"),
                )
            })
            .collect();
        Some(Blinding { blinder, pairs })
    }
}

fn aad(key: &str) -> Vec<u8> {
    format!("cleanroom blinding v1/{key}").into_bytes()
}

impl Store {
    /// Records a version's doubly blinded points and the partner's key id,
    /// replacing any before, in one transaction.
    pub fn put_blinding(
        &self,
        info: &VersionInfo,
        blinding: &Blinding,
    ) -> Result<(), StorageError> {
        let key = key_name(&[&info.agreement, &info.dataset, &info.version]);
        let data_key = self.data_key(&info.agreement)?;
        let sealed = data_key.seal(&blinding.to_bytes(), &aad(&key))?;
        let entry = key_entry(info, KeyRole::Blinder);
        let sealed_id = data_key.seal(&blinding.blinder, &key_aad(&entry))?;
        let tx = self.inner.db.begin_write()?;
        tx.open_table(BLINDINGS)?
            .insert(key.as_str(), sealed.as_slice())?;
        tx.open_table(VERSION_KEYS)?
            .insert(entry.as_str(), sealed_id.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// A version's doubly blinded points, if its partner has blinded them.
    pub fn blinding(&self, info: &VersionInfo) -> Result<Option<Blinding>, StorageError> {
        let key = key_name(&[&info.agreement, &info.dataset, &info.version]);
        let Some(plain) = self.open_sealed(BLINDINGS, &info.agreement, &key, &aad(&key))? else {
            return Ok(None);
        };
        let Some(blinder) = self.key_id(info, KeyRole::Blinder)? else {
            return Err(StorageError::Db(format!(
                "the blinding of {key} has no key id"
            )));
        };
        Blinding::from_bytes(blinder, &plain)
            .map(Some)
            .ok_or_else(|| StorageError::Db(format!("the blinding of {key} is damaged")))
    }

    /// The id of the key the owner blinded a version's points with (None
    /// under `keyed` matching).
    pub fn owner_key(&self, info: &VersionInfo) -> Result<Option<KeyId>, StorageError> {
        self.key_id(info, KeyRole::Owner)
    }

    /// The id of the key the partner blinded a version's points with, if
    /// it has; cheaper than opening the whole blinding.
    pub fn blinder_key(&self, info: &VersionInfo) -> Result<Option<KeyId>, StorageError> {
        self.key_id(info, KeyRole::Blinder)
    }

    /// The `VERSION_KEYS` entry recording `id` as a key of `info`, sealed,
    /// for the caller to insert in its own transaction.
    pub(super) fn sealed_key_id(
        &self,
        info: &VersionInfo,
        role: KeyRole,
        id: &KeyId,
    ) -> Result<(String, Vec<u8>), StorageError> {
        let entry = key_entry(info, role);
        let sealed = self.data_key(&info.agreement)?.seal(id, &key_aad(&entry))?;
        Ok((entry, sealed))
    }

    fn key_id(&self, info: &VersionInfo, role: KeyRole) -> Result<Option<KeyId>, StorageError> {
        let entry = key_entry(info, role);
        let Some(plain) =
            self.open_sealed(VERSION_KEYS, &info.agreement, &entry, &key_aad(&entry))?
        else {
            return Ok(None);
        };
        KeyId::try_from(plain.as_slice())
            .map(Some)
            .map_err(|_| StorageError::Db(format!("the key id {entry} is damaged")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::put;
    use super::*;

    #[test]
    fn blindings_are_sealed_looked_up_and_deleted_with_their_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v = put(&store, "u1", 3);
        assert!(store.blinding(&v).unwrap().is_none());
        let b = Blinding::new(
            [5; 32],
            vec![
                ([2; 32], [20; 32]),
                ([1; 32], [10; 32]),
                ([2; 32], [20; 32]),
            ],
        );
        assert_eq!(b.len(), 2);
        store.put_blinding(&v, &b).unwrap();
        let back = store.blinding(&v).unwrap().unwrap();
        assert_eq!(back, b);
        assert_eq!(back.index().get(&[1; 32]), Some(&&[10; 32]));
        assert_eq!(back.index().get(&[3; 32]), None);
        assert_eq!(back.index().get(&[2; 32]), Some(&&[20; 32]));
        assert_eq!(back.index().len(), 2);
        assert_eq!(back.blinder(), &[5; 32]);
        assert_eq!(store.blinder_key(&v).unwrap(), Some([5; 32]));
        let db = std::fs::read(dir.path().join("meta.redb")).unwrap();
        assert!(
            !db.windows(32)
                .any(|w| w == [10; 32] || w == [20; 32] || w == [5; 32]),
            "doubly blinded points are sealed at rest"
        );
        store.delete_versions(std::slice::from_ref(&v)).unwrap();
        assert!(store.blinding(&v).unwrap().is_none());
        assert_eq!(store.blinder_key(&v).unwrap(), None);
    }
}
