//! Byte damage swept across every kind of file the store writes, far more
//! finely than the suite does: the metadata database, a version file and
//! the audit log, each damaged at evenly spaced offsets (one flipped byte,
//! and a zeroed 4 KiB page), then opened or read again. It prints, per
//! file and kind of damage, how often the damage was refused by name, was
//! harmless (everything read back as before) or went wrong (a panic, or
//! data other than what was stored); anything in the last column is a bug.
//!
//! ```text
//! cargo bench --bench faults                    # 400 offsets per file and kind
//! cargo bench --bench faults -- --offsets 2000
//! ```

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use cleanroom::storage::{Commit, StorageError, Store, VersionInfo};
use common::arg;

#[derive(Debug, Default)]
struct Tally {
    refused: u64,
    harmless: u64,
    wrong: u64,
}

fn batch(from: i64, n: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
    RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from_iter_values(from..from + n))],
    )
    .unwrap()
}

/// A store holding two datasets of a few chunks each, and its audit log.
fn stored(root: &Path) -> Vec<VersionInfo> {
    let store = Store::open(root, None).unwrap();
    let mut out = Vec::new();
    for (dataset, rows) in [("d", 200_000i64), ("e", 50_000)] {
        let mut staged = store.stage("a", dataset).unwrap();
        for chunk in 0..4 {
            let b = batch(chunk * rows, rows);
            staged
                .append(&cleanroom::upload::encode_batch(&b).unwrap(), rows as u64)
                .unwrap();
        }
        let info = store
            .commit(
                staged,
                Commit {
                    base: None,
                    upload_id: dataset,
                    uploaded_by: "acme",
                    policy_hash: "h",
                    form: "",
                    committed_at: 1,
                    owner_key: None,
                },
            )
            .unwrap();
        out.push(info);
    }
    let log = cleanroom::audit::AuditLog::open(root).unwrap();
    for i in 0..200u64 {
        log.append(
            cleanroom::audit::Event {
                org: "acme".into(),
                agreement: "a".into(),
                action: "upload",
                accepted: true,
                rows: Some(i),
                ..Default::default()
            },
            1_700_000_000,
        )
        .unwrap();
    }
    out
}

fn sums(store: &Store, versions: &[VersionInfo]) -> Result<Vec<i64>, StorageError> {
    let mut out = Vec::new();
    for v in versions {
        let current = store.current(&v.agreement, &v.dataset)?;
        if current.as_ref() != Some(v) {
            return Ok(Vec::new());
        }
        let mut total = 0i64;
        for b in store.read(v)? {
            let x = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            total += x.values().iter().sum::<i64>();
        }
        out.push(total);
    }
    Ok(out)
}

/// Damages `file` at `offsets` spread evenly, one kind at a time, and
/// classifies what `check` makes of each.
fn sweep(
    file: &Path,
    offsets: u64,
    check: &dyn Fn() -> Result<bool, String>,
) -> [(&'static str, Tally); 2] {
    let original = std::fs::read(file).unwrap();
    let len = original.len();
    let mut out = [
        ("flipped byte", Tally::default()),
        ("zeroed page", Tally::default()),
    ];
    for (kind, tally) in out.iter_mut() {
        for i in 0..offsets {
            let at = (i as usize * len) / offsets as usize;
            let mut damaged = original.clone();
            match *kind {
                "flipped byte" => damaged[at] ^= 0x20,
                _ => damaged[at..(at + 4096).min(len)].fill(0),
            }
            if damaged == original {
                continue;
            }
            std::fs::write(file, &damaged).unwrap();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
                Ok(Ok(true)) => tally.harmless += 1,
                Ok(Ok(false)) => tally.wrong += 1,
                Ok(Err(_)) => tally.refused += 1,
                Err(_) => tally.wrong += 1,
            }
        }
    }
    std::fs::write(file, &original).unwrap();
    out
}

fn main() {
    let offsets = arg("--offsets", 400);
    // redb's panics are caught and counted; their messages are noise here.
    std::panic::set_hook(Box::new(|_| {}));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let versions = stored(root);
    let expected = sums(&Store::open(root, None).unwrap(), &versions).unwrap();

    let meta = root.join("meta.redb");
    let open_and_read = || -> Result<bool, String> {
        let store = Store::open(root, None).map_err(|e| e.to_string())?;
        match sums(&store, &versions) {
            Ok(seen) => Ok(seen == expected),
            Err(e) => Err(e.to_string()),
        }
    };
    let version_file = cleanroom_version_file(root, &versions[0]);
    let read_version = || -> Result<bool, String> {
        let store = Store::open(root, None).map_err(|e| e.to_string())?;
        let result = sums(&store, &versions).map_err(|e| e.to_string());
        // A damage mark from this round must not carry into the next.
        drop(store);
        result.map(|seen| seen == expected)
    };
    let audit = root.join(cleanroom::audit::LOG_FILE);
    let verify = || -> Result<bool, String> {
        cleanroom::audit::verify(root)
            .map(|_| false)
            .map_err(|e| e.to_string())
    };

    println!("{offsets} offsets per file and kind of damage\n");
    println!(
        "{:<12} {:>10} {:<13} {:>8} {:>9} {:>6}",
        "file", "bytes", "damage", "refused", "harmless", "WRONG"
    );
    for (name, file, check) in [
        (
            "meta.redb",
            &meta,
            &open_and_read as &dyn Fn() -> Result<bool, String>,
        ),
        ("version", &version_file, &read_version),
        ("audit.log", &audit, &verify),
    ] {
        let bytes = std::fs::metadata(file).unwrap().len();
        for (kind, t) in sweep(file, offsets, check) {
            println!(
                "{name:<12} {bytes:>10} {kind:<13} {:>8} {:>9} {:>6}",
                t.refused, t.harmless, t.wrong
            );
        }
        // Marks left by the version sweep are cleared by reading whole.
        let store = Store::open(root, None).unwrap();
        for v in &versions {
            let _ = store.clear_if_whole(v);
        }
    }
}

/// Where the store keeps `v`'s file.
fn cleanroom_version_file(root: &Path, v: &VersionInfo) -> std::path::PathBuf {
    root.join("datasets")
        .join(&v.agreement)
        .join(&v.dataset)
        .join(format!("{}.cds", v.version))
}
