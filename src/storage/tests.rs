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
