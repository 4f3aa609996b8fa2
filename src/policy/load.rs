//! Reading a policy from its text, with errors that name the file, the
//! field and the rule; and the set of agreements in force.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::raw::RawPolicy;
use super::types::{Policy, PolicyHash};
use super::validate::validate;

/// One broken rule: the field path (`party[1].rights`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub rule: String,
}

/// Everything wrong with one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.file.display(), p.field, p.rule)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    pub(crate) fn single(file: &Path, field: impl Into<String>, rule: impl Into<String>) -> Self {
        PolicyError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                field: field.into(),
                rule: rule.into(),
            }],
        }
    }
}

/// Parses and validates one policy from its text, every rule but one: its
/// templates' SQL is checked by the query checker when the policy folder
/// is read (`crate::agreements::parse_policy`). `path` is used in messages
/// and its stem must equal the agreement id.
pub fn parse_text(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let hash = PolicyHash::of(text.as_bytes());
    let deserializer = toml::Deserializer::parse(text).map_err(|e| syntax_error(path, text, &e))?;
    let raw: RawPolicy = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let field = if field == "." {
            "(file)".to_string()
        } else {
            field
        };
        PolicyError::single(path, field, inner.message().to_string())
    })?;
    let stem = path.file_stem().and_then(|s| s.to_str());
    validate(raw, stem, hash).map_err(|problems| PolicyError {
        file: path.to_path_buf(),
        problems,
    })
}

/// A TOML syntax error, located by line and column. The message is toml's
/// own description of the syntax, without the quoted source line.
fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> PolicyError {
    let location = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}")
        })
        .unwrap_or_else(|| "(file)".to_string());
    PolicyError::single(path, location, format!("TOML syntax: {}", e.message()))
}

/// The agreements a server enforces, by id.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub(crate) policies: BTreeMap<String, Arc<Policy>>,
    /// Agreements whose file was removed while the server ran.
    pub(crate) suspended: BTreeSet<String>,
}

impl PolicySet {
    /// Where agreement `policy` stands on `today`, suspension included.
    pub fn state_of(&self, policy: &Policy, today: time::Date) -> super::AgreementState {
        if self.suspended.contains(policy.id()) {
            super::AgreementState::Suspended
        } else {
            policy.state_on(today)
        }
    }
    pub fn get(&self, id: &str) -> Option<&Arc<Policy>> {
        self.policies.get(id)
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.values()
    }
    pub fn len(&self) -> usize {
        self.policies.len()
    }
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
    /// Agreements `org` is a party to.
    pub fn for_org<'a>(&'a self, org: &'a str) -> impl Iterator<Item = &'a Arc<Policy>> + 'a {
        self.iter().filter(move |p| p.party(org).is_some())
    }
}
