//! Data-sharing agreements as policy files.
//!
//! A policy file is TOML (`docs/policy.md` documents every field). It is read
//! into [`raw::RawPolicy`], a plain image of the file, and then validated into
//! a [`Policy`] whose invariants hold by construction: code that holds a
//! `Policy` never re-checks that a party exists or that a metric has bounds.

mod load;
mod raw;
mod template;
mod types;
mod validate;

/// How an identity kind is normalised: the identifiers' own vocabulary,
/// which an agreement names per kind.
pub use crate::identity::{Profile, Standard};
pub use load::{PolicyError, PolicySet, Problem, parse_text};
pub use template::{Bound, Param, ParamError, ParamKind, Template, format_date};
pub use types::{
    Aggregate, AgreementState, Column, ColumnPair, ColumnRole, Dataset, Domain, IdentityKind,
    Matching, Party, Policy, PolicyHash, Privacy, QueryMode, QueryRules, Refresh, Right, Salt,
    ValueType,
};
pub use validate::{FIRST_YEAR, LAST_YEAR, admitted_days, epoch_days, is_slug};

/// A policy for unit tests: an agreement, the email identity kind, acme
/// (who may query) and globex, then `datasets_and_rules` (datasets,
/// `[query]`).
#[cfg(test)]
pub(crate) fn unit_policy(datasets_and_rules: &str) -> Policy {
    let head = r#"[agreement]
id = "unit"
purpose = "test"
expires = 2099-12-31
retention_days = 30
salt = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

[identity.email]
profile = "email"

[[party]]
org = "acme"
rights = ["upload", "query", "receive_results"]

[[party]]
org = "globex"
rights = ["upload"]
"#;
    parse_text(
        &format!("{head}\n{datasets_and_rules}"),
        std::path::Path::new("unit.toml"),
    )
    .expect("a valid unit-test policy")
}
