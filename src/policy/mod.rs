//! Data-sharing agreements as policy files.
//!
//! A policy file is TOML (`docs/policy.md` documents every field). It is read
//! into [`raw::RawPolicy`], a plain image of the file, and then validated into
//! a [`Policy`] whose invariants hold by construction: code that holds a
//! `Policy` never re-checks that a party exists or that a metric has bounds.

mod load;
mod raw;
pub mod reload;
mod template;
mod types;
mod validate;

pub use load::{PolicyError, PolicySet, Problem, load_dir, load_paths, parse_policy};
pub use template::{Bound, Param, ParamError, ParamKind, Template, format_date};
pub use types::{
    Aggregate, AgreementState, Column, ColumnPair, ColumnRole, Dataset, Domain, IdentityKind,
    Party, Policy, PolicyHash, Privacy, Profile, QueryMode, QueryRules, Refresh, Right, Salt,
    ValueType,
};
pub use validate::{FIRST_YEAR, LAST_YEAR, epoch_days, is_slug};
