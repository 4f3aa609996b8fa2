//! Raw policy -> validated [`Policy`]. Every rule is checked and every
//! problem is reported with the field path it concerns, so one run of
//! `cleanroom policy check` lists all mistakes at once.

use std::collections::{BTreeMap, BTreeSet};

use time::{Date, Month};

use super::Problem;
use super::raw::{RawColumn, RawDataset, RawIdentity, RawParam, RawParty, RawPolicy, RawPrivacy};
use super::template::{Param, ParamKind, Template, placeholders};
use super::types::{
    Aggregate, Column, ColumnPair, ColumnRole, Dataset, Domain, IdentityKind, Matching, Party,
    Policy, PolicyHash, Privacy, QueryMode, QueryRules, Refresh, Right, Salt, ValueType,
};
use crate::identity::{PHONE_METADATA, country};
use crate::identity::{Profile, Standard};

mod datasets;
mod identities;
mod rules;

use datasets::validate_datasets;
use identities::{validate_identities, validate_parties};
use rules::{validate_privacy, validate_query, validate_templates};

/// The most distinct values a dimension may declare: beyond that a
/// "dimension" starts to single people out.
pub(super) const MAX_DIMENSION_CARDINALITY: i64 = 10_000;
const MAX_RETENTION_DAYS: i64 = 3_650;
const MAX_MIN_GROUP_SIZE: i64 = 1_000_000;
const MAX_GROUPS_PER_PERSON: i64 = 1_000;
/// The default floor on one query's epsilon (`privacy.epsilon_per_query_min`).
const DEFAULT_EPSILON_FLOOR: f64 = 0.01;
/// The most a default `privacy.delta_total` allows.
const DEFAULT_DELTA_TOTAL_CAP: f64 = 0.1;
const MAX_ROWS_PER_PERSON: i64 = 1_000;
/// Dates and timestamps lie in these years, so that every date function
/// and interval the checker admits stays within what the engine represents.
pub const FIRST_YEAR: i32 = 1900;
pub const LAST_YEAR: i32 = 2200;
const MAX_TEMPLATE_ITEMS: i64 = 1_000;

/// `x` rounded to 12 significant digits, so that a product such as
/// 1e-7 x 1000 reads as the decimal an admin would write (1e-4).
fn decimal(x: f64) -> f64 {
    if !(x.is_finite() && x > 0.0) {
        return x;
    }
    let scale = 10f64.powi(12 - x.log10().ceil() as i32);
    (x * scale).round() / scale
}

/// Days from 1970-01-01 to `d`.
pub fn epoch_days(d: Date) -> i64 {
    (d - Date::from_calendar_date(1970, Month::January, 1).expect("valid date")).whole_days()
}

/// The days (since 1970-01-01) dates and timestamps may take: the years
/// [`FIRST_YEAR`] to [`LAST_YEAR`].
pub fn admitted_days() -> std::ops::RangeInclusive<i64> {
    let day = |y, m, d| epoch_days(Date::from_calendar_date(y, m, d).expect("valid date"));
    day(FIRST_YEAR, Month::January, 1)..=day(LAST_YEAR, Month::December, 31)
}

#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, rule: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            rule: rule.into(),
        });
    }
}

/// Lower-case slug for agreement ids and organisation names.
pub fn is_slug(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A name usable unquoted in SQL: datasets, columns, identity kinds.
fn is_sql_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

const SLUG_RULE: &str =
    "must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit";
const SQL_NAME_RULE: &str = "must be 1-63 characters of a-z, 0-9 and '_', starting with a letter";

fn known_list<T: Copy>(all: &[T], name: impl Fn(T) -> &'static str) -> String {
    all.iter().map(|t| name(*t)).collect::<Vec<_>>().join(", ")
}

fn date_of(field: &str, value: &toml::value::Datetime, problems: &mut Problems) -> Option<Date> {
    let (Some(d), None, None) = (value.date, value.time, value.offset) else {
        problems.push(field, "must be a date like 2027-12-31, without a time");
        return None;
    };
    let month = Month::try_from(d.month).ok()?;
    match Date::from_calendar_date(i32::from(d.year), month, d.day) {
        Ok(date) => Some(date),
        Err(_) => {
            problems.push(field, "is not a valid calendar date");
            None
        }
    }
}

pub(super) fn validate(
    raw: RawPolicy,
    file_stem: Option<&str>,
    hash: PolicyHash,
) -> Result<Policy, Vec<Problem>> {
    let mut p = Problems::default();
    let a = &raw.agreement;

    if !is_slug(&a.id) {
        p.push("agreement.id", SLUG_RULE);
    } else if let Some(stem) = file_stem
        && stem != a.id
    {
        p.push(
            "agreement.id",
            format!(
                "must match the file name: the file is {stem}.toml but the id is {:?}",
                a.id
            ),
        );
    }
    if a.purpose.trim().is_empty() {
        p.push(
            "agreement.purpose",
            "must describe the purpose of the agreement",
        );
    }
    let starts_on = a
        .starts
        .as_ref()
        .and_then(|s| date_of("agreement.starts", s, &mut p));
    let expires_on = date_of("agreement.expires", &a.expires, &mut p);
    if let (Some(s), Some(e)) = (starts_on, expires_on)
        && e <= s
    {
        p.push("agreement.expires", "must be later than agreement.starts");
    }
    if !(1..=MAX_RETENTION_DAYS).contains(&a.retention_days) {
        p.push(
            "agreement.retention_days",
            format!("must be between 1 and {MAX_RETENTION_DAYS}"),
        );
    }
    let salt = match hex::decode(&a.salt) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut s = [0u8; 32];
            s.copy_from_slice(&bytes);
            if s.iter().all(|b| *b == s[0]) {
                p.push(
                    "agreement.salt",
                    "must be random (`cleanroom policy salt` makes one)",
                );
            }
            Some(Salt(s))
        }
        _ => {
            p.push(
                "agreement.salt",
                "must be 64 hex digits (32 random bytes; `cleanroom policy salt` makes one)",
            );
            None
        }
    };

    let identities = validate_identities(&raw.identity, &raw.party, &mut p);
    let parties = validate_parties(&raw, &mut p);
    let matching = match a.matching.as_deref() {
        None | Some("keyed") => Matching::Keyed,
        Some("ecdh") => {
            if raw.party.len() != 2 {
                p.push(
                    "agreement.matching",
                    "\"ecdh\" needs exactly two parties: each blinds the other's identifiers",
                );
            }
            Matching::Ecdh
        }
        Some(_) => {
            p.push("agreement.matching", "must be \"keyed\" or \"ecdh\"");
            Matching::Keyed
        }
    };
    let datasets = validate_datasets(&raw.dataset, &parties, &identities, &mut p);
    let query = validate_query(&raw, &datasets, &mut p);
    let privacy = raw.privacy.as_ref().map(|r| validate_privacy(r, &mut p));
    let templates = validate_templates(&raw, &datasets, &parties, &mut p);
    if query
        .as_ref()
        .is_some_and(|q| q.mode == QueryMode::Templates)
        && templates.is_empty()
    {
        p.push(
            "query.mode",
            "\"templates\" admits only templates, but the policy declares none",
        );
    }

    if !p.0.is_empty() {
        return Err(p.0);
    }
    // Every `None` above pushed a problem, so these all hold values here.
    let (Some(expires_on), Some(salt), Some(query)) = (expires_on, salt, query) else {
        unreachable!("a missing value always comes with a problem");
    };
    Ok(Policy {
        id: a.id.clone(),
        purpose: a.purpose.trim().to_string(),
        starts_on,
        expires_on,
        retention_days: u32::try_from(a.retention_days).unwrap_or(u32::MAX),
        salt,
        matching,
        identities,
        parties,
        datasets,
        query,
        privacy: privacy.flatten(),
        templates,
        hash,
    })
}
