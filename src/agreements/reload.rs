//! Re-reading the policy folder while the server runs.
//!
//! Agreement ids equal their file names, so every file speaks for exactly
//! one agreement, and a broken file can keep that agreement's last good
//! policy in force while the other files' edits apply:
//!
//! | file now            | agreement afterwards                          |
//! |---------------------|-----------------------------------------------|
//! | valid, new          | added                                         |
//! | valid, changed      | updated to the new policy                     |
//! | invalid             | last good policy stays; the error is reported |
//! | gone                | suspended: no uploads or queries, data kept   |
//! | back after removal  | resumed                                       |

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use super::{policy_files, read_policy_file};
use crate::policy::{PolicyError, PolicySet};

/// What happened to one agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Updated,
    Suspended,
    Resumed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Updated => "updated",
            ChangeKind::Suspended => "suspended",
            ChangeKind::Resumed => "resumed",
        }
    }
}

/// One agreement's change, with its policy hashes before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub id: String,
    pub kind: ChangeKind,
    pub old_hash: Option<String>,
    pub new_hash: Option<String>,
}

/// The outcome of re-reading the folder.
#[derive(Debug, Clone)]
pub struct Reload {
    /// The policies to enforce from now on.
    pub set: PolicySet,
    pub changes: Vec<Change>,
    /// Files refused, with the messages `cleanroom policy check` prints.
    pub errors: Vec<PolicyError>,
}

/// Re-reads `dir` against the policies in force.
pub fn reload(dir: &Path, current: &PolicySet) -> Reload {
    let files = match policy_files(&[dir.to_path_buf()]) {
        Ok(files) if dir.is_dir() => files,
        Ok(_) => {
            return Reload {
                set: current.clone(),
                changes: Vec::new(),
                errors: vec![PolicyError::single(
                    dir,
                    "(folder)",
                    "is not a folder of policy files",
                )],
            };
        }
        Err(e) => {
            return Reload {
                set: current.clone(),
                changes: Vec::new(),
                errors: vec![e],
            };
        }
    };
    let mut next = PolicySet::default();
    let mut errors = Vec::new();
    // Ids whose file is present but broken: their last good policy stays.
    let mut kept: BTreeSet<String> = BTreeSet::new();
    for file in &files {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        match read_policy_file(file) {
            Ok(policy) => {
                let id = policy.id().to_string();
                match next.policies.entry(id) {
                    std::collections::btree_map::Entry::Occupied(e) => {
                        errors.push(PolicyError::single(
                            file,
                            "agreement.id",
                            format!("{:?} is already declared by another file", e.key()),
                        ));
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(Arc::new(policy));
                    }
                }
            }
            Err(e) => {
                errors.push(e);
                kept.insert(stem);
            }
        }
    }
    let mut changes = Vec::new();
    for id in kept {
        if let (Some(p), false) = (current.get(&id), next.policies.contains_key(&id)) {
            next.policies.insert(id.clone(), Arc::clone(p));
            if current.suspended.contains(&id) {
                next.suspended.insert(id);
            }
        }
    }
    for (id, old) in &current.policies {
        if !next.policies.contains_key(id) {
            next.policies.insert(id.clone(), Arc::clone(old));
            next.suspended.insert(id.clone());
            if !current.suspended.contains(id) {
                changes.push(Change {
                    id: id.clone(),
                    kind: ChangeKind::Suspended,
                    old_hash: Some(old.hash().to_hex()),
                    new_hash: None,
                });
            }
        }
    }
    for (id, new) in &next.policies {
        if next.suspended.contains(id) {
            continue;
        }
        let new_hash = new.hash().to_hex();
        match current.get(id) {
            None => changes.push(Change {
                id: id.clone(),
                kind: ChangeKind::Added,
                old_hash: None,
                new_hash: Some(new_hash),
            }),
            Some(old) => {
                let old_hash = old.hash().to_hex();
                let kind = if current.suspended.contains(id) {
                    Some(ChangeKind::Resumed)
                } else if old_hash != new_hash {
                    Some(ChangeKind::Updated)
                } else {
                    None
                };
                if let Some(kind) = kind {
                    changes.push(Change {
                        id: id.clone(),
                        kind,
                        old_hash: Some(old_hash),
                        new_hash: Some(new_hash),
                    });
                }
            }
        }
    }
    changes.sort_by(|a, b| a.id.cmp(&b.id));
    Reload {
        set: next,
        changes,
        errors,
    }
}

/// A digest of the folder's policy files (names and contents), to notice
/// edits cheaply. None if the folder cannot be read.
pub fn folder_digest(dir: &Path) -> Option<[u8; 32]> {
    let files = policy_files(&[dir.to_path_buf()]).ok()?;
    let mut h = blake3::Hasher::new();
    for f in files {
        let name = f.file_name()?.to_string_lossy().into_owned();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        match std::fs::read(&f) {
            Ok(bytes) => {
                h.update(&(bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(_) => {
                h.update(b"unreadable");
            }
        }
    }
    Some(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_text() -> String {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml"),
        )
        .unwrap()
    }

    #[test]
    fn edits_apply_broken_files_keep_the_last_good_policy_and_removal_suspends() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("retail-media-demo.toml");
        std::fs::write(&file, demo_text()).unwrap();
        let first = reload(dir.path(), &PolicySet::default());
        assert!(first.errors.is_empty());
        assert_eq!(first.changes[0].kind, ChangeKind::Added);
        let set = first.set;
        let old_hash = set.get("retail-media-demo").unwrap().hash().to_hex();

        // Unchanged: nothing to report.
        let same = reload(dir.path(), &set);
        assert!(same.changes.is_empty() && same.errors.is_empty());

        // A valid edit.
        std::fs::write(
            &file,
            demo_text().replace("min_group_size = 50", "min_group_size = 80"),
        )
        .unwrap();
        let edited = reload(dir.path(), &set);
        assert_eq!(edited.changes.len(), 1);
        let c = &edited.changes[0];
        assert_eq!(
            (c.kind, c.old_hash.as_deref()),
            (ChangeKind::Updated, Some(old_hash.as_str()))
        );
        let set = edited.set;
        assert_eq!(
            set.get("retail-media-demo")
                .unwrap()
                .query()
                .min_group_size(),
            80
        );

        // A broken edit: refused, the last good policy stays.
        std::fs::write(
            &file,
            demo_text().replace("min_group_size = 50", "min_group_size = 1"),
        )
        .unwrap();
        let broken = reload(dir.path(), &set);
        assert!(broken.changes.is_empty());
        assert!(
            broken.errors[0].to_string().starts_with(&format!(
                "{}: query.min_group_size: must be at least 2",
                file.display()
            )),
            "{}",
            broken.errors[0]
        );
        assert_eq!(
            broken
                .set
                .get("retail-media-demo")
                .unwrap()
                .query()
                .min_group_size(),
            80
        );

        // Removed: suspended, still known.
        std::fs::remove_file(&file).unwrap();
        let removed = reload(dir.path(), &broken.set);
        assert_eq!(removed.changes[0].kind, ChangeKind::Suspended);
        let today = time::macros::date!(2026 - 11 - 24);
        let p = removed.set.get("retail-media-demo").unwrap();
        assert_eq!(
            removed.set.state_of(p, today),
            crate::policy::AgreementState::Suspended
        );

        // Back: resumed.
        std::fs::write(&file, demo_text()).unwrap();
        let back = reload(dir.path(), &removed.set);
        assert_eq!(back.changes[0].kind, ChangeKind::Resumed);
        let p = back.set.get("retail-media-demo").unwrap();
        assert_eq!(
            back.set.state_of(p, today),
            crate::policy::AgreementState::Active
        );
    }
}
