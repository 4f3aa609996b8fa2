//! Matched overlaps, kept so that an overlap request costs the threshold
//! and the noise only: the exact number of people two datasets' current
//! versions share, under the policy it was matched under. Sealed under the
//! agreement's data key; removed with either version.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{StorageError, Store, VersionInfo, key_name};

/// "agreement/dataset_a/dataset_b" (names in sorted order) -> sealed record.
pub(super) const OVERLAPS: TableDefinition<&str, &[u8]> = TableDefinition::new("overlaps");

/// What one matching found, and exactly what it was computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchedOverlap {
    /// The two versions, in the key's dataset order.
    pub versions: [String; 2],
    /// Hex BLAKE3 of the policy whose identifier columns were matched.
    pub policy_hash: String,
    /// People in both.
    pub people: u64,
}

/// The record's key: the pair in sorted order, so (a, b) and (b, a) share it.
fn entry(agreement: &str, datasets: [&str; 2]) -> (String, bool) {
    let swapped = datasets[0] > datasets[1];
    let [x, y] = if swapped {
        [datasets[1], datasets[0]]
    } else {
        datasets
    };
    (key_name(&[agreement, x, y]), swapped)
}

fn aad(key: &str) -> Vec<u8> {
    format!("cleanroom overlap v1/{key}").into_bytes()
}

impl Store {
    /// The overlap of `versions` matched under `policy_hash`, if recorded.
    pub fn matched_overlap(
        &self,
        versions: [&VersionInfo; 2],
        policy_hash: &str,
    ) -> Result<Option<u64>, StorageError> {
        let agreement = &versions[0].agreement;
        let (key, swapped) = entry(agreement, [&versions[0].dataset, &versions[1].dataset]);
        let Some(plain) = self.open_sealed(OVERLAPS, agreement, &key, &aad(&key))? else {
            return Ok(None);
        };
        let record: MatchedOverlap = serde_json::from_slice(&plain)?;
        let mut wanted = [versions[0].version.clone(), versions[1].version.clone()];
        if swapped {
            wanted.swap(0, 1);
        }
        Ok(
            (record.versions == wanted && record.policy_hash == policy_hash)
                .then_some(record.people),
        )
    }

    /// Records the overlap of `versions`, replacing any record of the pair.
    pub fn put_matched_overlap(
        &self,
        versions: [&VersionInfo; 2],
        policy_hash: &str,
        people: u64,
    ) -> Result<(), StorageError> {
        let agreement = &versions[0].agreement;
        let (key, swapped) = entry(agreement, [&versions[0].dataset, &versions[1].dataset]);
        let mut ordered = [versions[0].version.clone(), versions[1].version.clone()];
        if swapped {
            ordered.swap(0, 1);
        }
        let record = MatchedOverlap {
            versions: ordered,
            policy_hash: policy_hash.to_string(),
            people,
        };
        let sealed = self
            .data_key(agreement)?
            .seal(&serde_json::to_vec(&record)?, &aad(&key))?;
        let tx = self.inner.db.begin_write()?;
        tx.open_table(OVERLAPS)?
            .insert(key.as_str(), sealed.as_slice())?;
        tx.commit()?;
        Ok(())
    }
}

/// Removes, inside `tx`, every overlap record that involves `version`'s
/// dataset in its agreement (they name that dataset's versions).
pub(super) fn forget_in(
    tx: &redb::WriteTransaction,
    version: &VersionInfo,
) -> Result<(), StorageError> {
    let mut table = tx.open_table(OVERLAPS)?;
    let prefix = format!("{}/", version.agreement);
    let stale: Vec<String> = table
        .range(prefix.as_str()..)?
        .filter_map(Result::ok)
        .map(|(k, _)| k.value().to_string())
        .take_while(|k| k.starts_with(&prefix))
        .filter(|k| k[prefix.len()..].split('/').any(|d| d == version.dataset))
        .collect();
    for k in stale {
        table.remove(k.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::put;
    use super::*;

    #[test]
    fn overlaps_match_their_versions_and_policy_and_go_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let v1 = put(&store, "u1", 3);
        let mut other = v1.clone();
        other.dataset = "e".into();
        other.version = "v9".into();
        assert_eq!(store.matched_overlap([&v1, &other], "h").unwrap(), None);
        store.put_matched_overlap([&other, &v1], "h", 1234).unwrap();
        assert_eq!(
            store.matched_overlap([&v1, &other], "h").unwrap(),
            Some(1234)
        );
        assert_eq!(
            store.matched_overlap([&other, &v1], "h").unwrap(),
            Some(1234)
        );
        assert_eq!(store.matched_overlap([&v1, &other], "h2").unwrap(), None);
        let v2 = put(&store, "u2", 3);
        assert_eq!(store.matched_overlap([&v2, &other], "h").unwrap(), None);
        let db = std::fs::read(dir.path().join("meta.redb")).unwrap();
        assert!(
            !db.windows(4).any(|w| w == b"1234"),
            "the count is sealed at rest"
        );
        store.delete_versions(std::slice::from_ref(&v1)).unwrap();
        assert_eq!(store.matched_overlap([&v1, &other], "h").unwrap(), None);
    }
}
