//! The policy folder: agreement files read and checked in full (their
//! templates' SQL by the query checker, so this sits above both the policy
//! vocabulary and the queries), and re-read while the server runs.

pub mod reload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::policy::{Policy, PolicyError, PolicySet};

/// Parses and checks one policy from its text: every rule of the policy
/// format, and every template's SQL with sample parameters. `path` is used
/// in messages and its stem must equal the agreement id.
pub fn parse_policy(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let policy = crate::policy::parse_text(text, path)?;
    let problems = crate::query::template_problems(&policy);
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyError {
            file: path.to_path_buf(),
            problems,
        })
    }
}

pub(crate) fn read_policy_file(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PolicyError::single(path, "(file)", format!("cannot be read: {e}")))?;
    parse_policy(&text, path)
}

/// Policy files named by `paths`: files as given, folders by their `*.toml`
/// entries in name order.
pub(crate) fn policy_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| {
                PolicyError::single(path, "(folder)", format!("cannot be read: {e}"))
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Loads every policy under `paths`, reporting all broken files, not only
/// the first. Two files declaring the same agreement id are an error.
pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, Vec<PolicyError>> {
    let files = policy_files(paths).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let mut policies: BTreeMap<String, Arc<Policy>> = BTreeMap::new();
    let mut origin: BTreeMap<String, PathBuf> = BTreeMap::new();
    for file in files {
        match read_policy_file(&file) {
            Ok(policy) => {
                let id = policy.id().to_string();
                if let Some(first) = origin.get(&id) {
                    errors.push(PolicyError::single(
                        &file,
                        "agreement.id",
                        format!("{id:?} is already declared by {}", first.display()),
                    ));
                } else {
                    origin.insert(id.clone(), file);
                    policies.insert(id, Arc::new(policy));
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(PolicySet {
            policies,
            suspended: BTreeSet::new(),
        })
    } else {
        Err(errors)
    }
}

/// Loads every `*.toml` policy in a folder.
pub fn load_dir(dir: &Path) -> Result<PolicySet, Vec<PolicyError>> {
    if !dir.is_dir() {
        return Err(vec![PolicyError::single(
            dir,
            "(folder)",
            "is not a folder of policy files",
        )]);
    }
    load_paths(&[dir.to_path_buf()])
}
