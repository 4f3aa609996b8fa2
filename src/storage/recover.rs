//! What the store does when its own files are not as it left them.
//!
//! - A missing metadata database beside dataset files or an audit log is a
//!   refusal to start: the store never starts empty over data it can no
//!   longer explain, and never deletes that data.
//! - A metadata database redb cannot open (an error or a panic inside
//!   redb) is a refusal naming the file and the way out.
//! - Files no record names are moved to `quarantine/`, never removed.
//! - `cleanroom admin recover` is the way out when no backup exists: the
//!   old metadata and dataset files are set aside in `quarantine/`, a new
//!   metadata database is made, and every privacy budget the audit log
//!   shows as charged is charged again, so a recovery never hands a party
//!   its epsilon back. The parties upload again.

use std::path::{Path, PathBuf};

use redb::Database;

use super::{StorageError, Store, io_err, walk_files};
use crate::audit::{AuditLog, Event};
use crate::policy::PolicySet;

pub(super) const META_FILE: &str = "meta.redb";
const QUARANTINE: &str = "quarantine";

/// The way out that refusals name.
const RECOVERY: &str = "restore it from a backup of the whole data directory, or run `cleanroom admin recover --data-dir DIR` to set the data aside and start again with every budget kept";

/// Refuses to start a store whose metadata is gone while its data is not.
pub(super) fn check_metadata_present(root: &Path) -> Result<(), StorageError> {
    let meta = root.join(META_FILE);
    if meta.exists() {
        return Ok(());
    }
    let datasets = walk_files(&root.join("datasets"))?;
    let audit = root.join(crate::audit::LOG_FILE);
    let audited = std::fs::metadata(&audit)
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    if datasets.is_empty() && !audited {
        return Ok(());
    }
    Err(StorageError::Metadata {
        path: meta,
        problem: format!(
            "is missing, but the data directory holds {} dataset file(s){}",
            datasets.len(),
            if audited { " and an audit log" } else { "" }
        ),
        recovery: RECOVERY,
    })
}

/// Opens (or creates) the metadata database, turning redb's errors and
/// panics over a damaged file into a refusal that names it.
pub(super) fn open_metadata(
    path: &Path,
    create: bool,
    then: impl FnOnce(super::db::Opened) -> Result<Store, StorageError>,
) -> Result<Store, StorageError> {
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match super::db::open(path, create) {
            Ok(db) => then(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StorageError::InUse {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(StorageError::Db(e.to_string())),
        }
    }));
    let damaged = |problem: String| StorageError::Metadata {
        path: path.to_path_buf(),
        problem,
        recovery: RECOVERY,
    };
    match opened {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(StorageError::Db(detail))) => Err(damaged(format!("cannot be read ({detail})"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(damaged(
            "is damaged (the database engine stopped on it)".into(),
        )),
    }
}

/// A fresh folder under `ROOT/quarantine/`, named for `why` and the time.
fn quarantine_dir(root: &Path, why: &str) -> Result<PathBuf, StorageError> {
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let base = root.join(QUARANTINE);
    for n in 0.. {
        let dir = base.join(format!("{stamp}-{why}-{n}"));
        if !dir.exists() {
            super::create_private_dir(&dir)?;
            return Ok(dir);
        }
    }
    unreachable!("some name is free")
}

/// Moves `files` (under `root`) into one quarantine folder, keeping their
/// paths relative to `root`. Returns the folder.
pub(super) fn quarantine(
    root: &Path,
    why: &str,
    files: &[PathBuf],
) -> Result<PathBuf, StorageError> {
    let dir = quarantine_dir(root, why)?;
    for file in files {
        let relative = file.strip_prefix(root).unwrap_or(file);
        let target = dir.join(relative);
        if let Some(parent) = target.parent() {
            super::create_private_dir(parent)?;
        }
        std::fs::rename(file, &target).map_err(io_err(file))?;
    }
    Ok(dir)
}

/// What `cleanroom admin recover` did.
#[derive(Debug)]
pub struct Recovered {
    /// Where the old metadata and dataset files now are.
    pub quarantine: PathBuf,
    /// Files set aside.
    pub files: usize,
    /// Budget charges taken again from the audit log.
    pub charges: usize,
}

/// Sets a data directory's metadata and dataset files aside and starts it
/// again: a new metadata database holding every privacy budget charge the
/// audit log records (epsilon and delta, per organisation, agreement and
/// window), and an audit entry per agreement saying what happened. The
/// audit log must verify: a broken chain cannot be trusted for budgets.
/// The server must be stopped.
pub fn recover(
    root: &Path,
    master_key: Option<&Path>,
    policies: &PolicySet,
) -> Result<Recovered, StorageError> {
    let audit_err = |e: crate::audit::AuditError| StorageError::Db(format!("audit log: {e}"));
    crate::audit::verify(root).map_err(audit_err)?;
    let meta = root.join(META_FILE);
    if meta.exists() {
        // redb locks its file: a running server holds it.
        let held = std::panic::catch_unwind(|| {
            matches!(
                Database::open(&meta),
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
            )
        });
        if held.unwrap_or(false) {
            return Err(StorageError::Db(format!(
                "{}: in use by a running server; stop it first",
                meta.display()
            )));
        }
    }
    let mut files = walk_files(&root.join("datasets"))?;
    if meta.exists() {
        files.push(meta);
    }
    let count = files.len();
    let quarantine = quarantine(root, "recover", &files)?;

    // Charges as the log records them, before anything is appended to it.
    let mut charges = Vec::new();
    let mut agreements = std::collections::BTreeSet::new();
    crate::audit::each_entry(root, |e| {
        agreements.insert(e.agreement.clone());
        if e.epsilon.is_none() && e.delta.is_none() {
            return;
        }
        let when = time::OffsetDateTime::from_unix_timestamp(e.time)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        // Without its policy, the window is not known: charge both kinds.
        let refreshes = match policies.get(&e.agreement).and_then(|p| p.privacy()) {
            Some(p) => vec![p.refresh()],
            None => vec![
                crate::policy::Refresh::Never,
                crate::policy::Refresh::Monthly,
            ],
        };
        for refresh in refreshes {
            charges.push(super::ledger::Charge {
                query: format!("recovered-{}-{}", e.seq, charges.len()),
                agreement: e.agreement.clone(),
                org: e.org.clone(),
                window: crate::privacy::window::window(refresh, when).id,
                micros: e.epsilon.map(crate::privacy::to_micros).unwrap_or(0),
                delta_units: e.delta.map(super::delta_to_units).unwrap_or(0),
            });
        }
    })
    .map_err(audit_err)?;

    // A new, empty database first: the audit log stays, and a store
    // opened over it without one would refuse.
    drop(Database::create(root.join(META_FILE))?);
    let store = Store::open(root, master_key)?;
    let unlimited = super::ledger::Totals {
        micros: u64::MAX,
        delta_units: u64::MAX,
    };
    for c in &charges {
        if store.charge(c, unlimited)?.is_err() {
            return Err(StorageError::Db("a recovered charge did not fit".into()));
        }
        store.settle(&c.query)?;
    }
    drop(store);

    let log = AuditLog::open(root).map_err(audit_err)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for agreement in agreements {
        let event = Event {
            org: "operator".into(),
            policy_hash: policies
                .get(&agreement)
                .map(|p| p.hash().to_hex())
                .unwrap_or_default(),
            agreement,
            action: "recover",
            accepted: true,
            subject: Some(
                "metadata lost: datasets set aside, to be uploaded again; privacy budgets kept from this log"
                    .into(),
            ),
            ..Event::default()
        };
        log.append(event, now).map_err(audit_err)?;
    }
    Ok(Recovered {
        quarantine,
        files: count,
        charges: charges.len(),
    })
}
