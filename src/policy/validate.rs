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
    Policy, PolicyHash, Privacy, Profile, QueryMode, QueryRules, Refresh, Right, Salt, Standard,
    ValueType,
};
use crate::identity::{PHONE_METADATA, country};

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

fn validate_identities(
    raw: &BTreeMap<String, RawIdentity>,
    parties: &[RawParty],
    p: &mut Problems,
) -> BTreeMap<String, IdentityKind> {
    if raw.is_empty() {
        p.push(
            "identity",
            "at least one identity kind must be declared (for example [identity.email])",
        );
    }
    for (i, party) in parties.iter().enumerate() {
        for kind in party.standards.keys() {
            if !raw.contains_key(kind) {
                p.push(
                    format!("party[{i}].standards.{kind}"),
                    "names an identity kind the agreement does not declare in [identity]",
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    for (name, r) in raw {
        let field = format!("identity.{name}");
        if !is_sql_name(name) {
            p.push(&field, format!("the kind name {SQL_NAME_RULE}"));
            continue;
        }
        let standard = standard_of(name, r, parties, p);
        let profile = match r.profile.as_str() {
            "email" => Some(Profile::Email {
                gmail_canonical: r.gmail_canonical.unwrap_or(false),
                standard,
            }),
            "phone" => match &r.default_country {
                Some(c) if country(c).is_some() => Some(Profile::Phone {
                    default_country: c.clone(),
                    standard,
                }),
                Some(_) => {
                    p.push(
                        format!("{field}.default_country"),
                        "is not an ISO 3166 alpha-2 country code libphonenumber has metadata for (upper case, for example \"US\")",
                    );
                    None
                }
                None => {
                    p.push(
                        format!("{field}.default_country"),
                        "is required for the phone profile (country of national numbers)",
                    );
                    None
                }
            },
            "text" => Some(Profile::Text),
            other => {
                p.push(
                    format!("{field}.profile"),
                    format!("{other:?} is not a known profile (known: email, phone, text)"),
                );
                None
            }
        };
        if r.gmail_canonical.is_some() && r.profile != "email" {
            p.push(
                format!("{field}.gmail_canonical"),
                "only applies to the email profile",
            );
        } else if r.gmail_canonical.is_some() && standard != Standard::Cleanroom {
            p.push(
                format!("{field}.gmail_canonical"),
                format!(
                    "only applies under the cleanroom standard; {} has its own gmail rule",
                    standard.as_str()
                ),
            );
        }
        if r.default_country.is_some() && r.profile != "phone" {
            p.push(
                format!("{field}.default_country"),
                "only applies to the phone profile",
            );
        }
        match (&r.metadata, r.profile.as_str()) {
            (None, "phone") => p.push(
                format!("{field}.metadata"),
                format!(
                    "is required for the phone profile: the libphonenumber metadata version both parties read numbers by (this build has {PHONE_METADATA:?})"
                ),
            ),
            (Some(m), "phone") if m != PHONE_METADATA => p.push(
                format!("{field}.metadata"),
                format!(
                    "{m:?} is not the libphonenumber metadata of this build ({PHONE_METADATA:?}): both parties must read numbers alike; amend the agreement, or use the cleanroom release with that metadata"
                ),
            ),
            (Some(_), "phone") | (None, _) => {}
            (Some(_), _) => p.push(
                format!("{field}.metadata"),
                "only applies to the phone profile",
            ),
        }
        if r.profile == "text" && standard != Standard::Cleanroom {
            p.push(
                format!("{field}.standard"),
                "only applies to the email and phone profiles",
            );
        }
        if let Some(profile) = profile {
            out.insert(
                name.clone(),
                IdentityKind {
                    name: name.clone(),
                    profile,
                },
            );
        }
    }
    out
}

/// The standard an identity kind follows: the one `[identity.<kind>]`
/// names, or the one the parties that declare one for it agree on, or
/// ours. Two parties (or a party and the kind) on different standards
/// would fingerprint one person two ways: refused, naming both.
fn standard_of(name: &str, r: &RawIdentity, parties: &[RawParty], p: &mut Problems) -> Standard {
    let parse = |text: &str, field: String, p: &mut Problems| {
        let s = Standard::parse(text);
        if s.is_none() {
            p.push(
                field,
                format!(
                    "{text:?} is not a known standard (known: {})",
                    known_list(&Standard::ALL, |s| s.as_str())
                ),
            );
        }
        s
    };
    let mut chosen: Option<(Standard, String)> = r.standard.as_deref().and_then(|text| {
        parse(text, format!("identity.{name}.standard"), p)
            .map(|s| (s, format!("[identity.{name}]")))
    });
    for (i, party) in parties.iter().enumerate() {
        let Some(text) = party.standards.get(name) else {
            continue;
        };
        let field = format!("party[{i}].standards.{name}");
        let Some(s) = parse(text, field.clone(), p) else {
            continue;
        };
        match &chosen {
            Some((c, by)) if *c != s => p.push(
                field,
                format!(
                    "{} declares the {} standard for {name} but {by} the {}: one identity kind has one profile, or the same person gets two fingerprints; agree on one",
                    party.org,
                    s.as_str(),
                    c.as_str()
                ),
            ),
            Some(_) => {}
            None => chosen = Some((s, party.org.clone())),
        }
    }
    chosen.map_or(Standard::Cleanroom, |(s, _)| s)
}

fn validate_parties(raw: &RawPolicy, p: &mut Problems) -> Vec<Party> {
    if raw.party.len() < 2 {
        p.push("party", "an agreement needs at least two parties");
    }
    let mut parties: Vec<Party> = Vec::new();
    for (i, rp) in raw.party.iter().enumerate() {
        let field = format!("party[{i}]");
        if !is_slug(&rp.org) {
            p.push(format!("{field}.org"), SLUG_RULE);
        } else if parties.iter().any(|q| q.org == rp.org) {
            p.push(
                format!("{field}.org"),
                format!(
                    "{:?} is already a party; each organisation appears once",
                    rp.org
                ),
            );
        }
        let mut rights = BTreeSet::new();
        for (j, r) in rp.rights.iter().enumerate() {
            match Right::parse(r) {
                Some(right) => {
                    if !rights.insert(right) {
                        p.push(
                            format!("{field}.rights[{j}]"),
                            format!("{r:?} is listed twice"),
                        );
                    }
                }
                None => p.push(
                    format!("{field}.rights"),
                    format!(
                        "{r:?} is not a known right (known: {})",
                        known_list(&Right::ALL, Right::as_str)
                    ),
                ),
            }
        }
        if rp.rights.is_empty() {
            p.push(
                format!("{field}.rights"),
                "a party needs at least one right",
            );
        }
        if rights.contains(&Right::Query) && !rights.contains(&Right::ReceiveResults) {
            p.push(
                format!("{field}.rights"),
                "\"query\" needs \"receive_results\": a querying party receives its own results",
            );
        }
        parties.push(Party {
            org: rp.org.clone(),
            rights,
        });
    }
    if !raw.party.is_empty() && !parties.iter().any(|q| q.has(Right::Query)) {
        p.push(
            "party",
            "no party has the \"query\" right, so the agreement has no use",
        );
    }
    parties
}

fn validate_datasets(
    raw: &[RawDataset],
    parties: &[Party],
    identities: &BTreeMap<String, IdentityKind>,
    p: &mut Problems,
) -> Vec<Dataset> {
    if raw.is_empty() {
        p.push("dataset", "at least one dataset must be declared");
    }
    let mut datasets: Vec<Dataset> = Vec::new();
    for (i, rd) in raw.iter().enumerate() {
        let field = format!("dataset[{i}]");
        if !is_sql_name(&rd.name) {
            p.push(format!("{field}.name"), SQL_NAME_RULE);
        } else if datasets.iter().any(|d| d.name == rd.name) {
            p.push(
                format!("{field}.name"),
                format!("{:?} is declared twice; dataset names are unique", rd.name),
            );
        }
        match parties.iter().find(|q| q.org == rd.owner) {
            None => p.push(
                format!("{field}.owner"),
                format!("{:?} is not a declared party", rd.owner),
            ),
            Some(q) if !q.has(Right::Upload) => p.push(
                format!("{field}.owner"),
                format!(
                    "{:?} owns a dataset but lacks the \"upload\" right",
                    rd.owner
                ),
            ),
            Some(_) => {}
        }
        let mut columns: Vec<Column> = Vec::new();
        for (j, rc) in rd.column.iter().enumerate() {
            let cfield = format!("{field}.column[{j}]");
            if !is_sql_name(&rc.name) {
                p.push(format!("{cfield}.name"), SQL_NAME_RULE);
                continue;
            }
            if columns.iter().any(|c| c.name == rc.name) {
                p.push(
                    format!("{cfield}.name"),
                    format!(
                        "{:?} is declared twice; a column has exactly one role",
                        rc.name
                    ),
                );
                continue;
            }
            if let Some(role) = validate_column(rc, &cfield, identities, p) {
                columns.push(Column {
                    name: rc.name.clone(),
                    role,
                });
            }
        }
        if !columns
            .iter()
            .any(|c| matches!(c.role, ColumnRole::Identifier { .. }))
            && !rd.column.iter().any(|c| c.role == "identifier")
        {
            p.push(
                format!("{field}.column"),
                "a dataset needs at least one identifier column to be matched",
            );
        }
        datasets.push(Dataset {
            name: rd.name.clone(),
            owner: rd.owner.clone(),
            columns,
        });
    }
    let shared = identities.keys().any(|kind| {
        let owners: BTreeSet<&str> = datasets
            .iter()
            .filter(|d| {
                d.columns
                    .iter()
                    .any(|c| matches!(&c.role, ColumnRole::Identifier { kind: k } if k == kind))
            })
            .map(|d| d.owner.as_str())
            .collect();
        owners.len() >= 2
    });
    if !datasets.is_empty() && !identities.is_empty() && !shared {
        p.push(
            "dataset",
            "no identity kind appears in datasets of two different parties, so nothing can be matched",
        );
    }
    datasets
}

fn validate_column(
    rc: &RawColumn,
    field: &str,
    identities: &BTreeMap<String, IdentityKind>,
    p: &mut Problems,
) -> Option<ColumnRole> {
    let forbid = |present: bool, key: &str, role: &str, p: &mut Problems| {
        if present {
            p.push(
                format!("{field}.{key}"),
                format!("does not apply to a {role} column"),
            );
        }
    };
    match rc.role.as_str() {
        "identifier" => {
            forbid(rc.value_type.is_some(), "type", "identifier", p);
            forbid(rc.values.is_some(), "values", "identifier", p);
            forbid(
                rc.max_cardinality.is_some(),
                "max_cardinality",
                "identifier",
                p,
            );
            forbid(rc.min.is_some(), "min", "identifier", p);
            forbid(rc.max.is_some(), "max", "identifier", p);
            forbid(rc.compare.is_some(), "compare", "identifier", p);
            match &rc.kind {
                None => {
                    p.push(
                        format!("{field}.kind"),
                        "an identifier column needs the identity kind it carries",
                    );
                    None
                }
                Some(k) if !identities.contains_key(k) => {
                    p.push(
                        format!("{field}.kind"),
                        format!("{k:?} is not declared under [identity]"),
                    );
                    None
                }
                Some(k) => Some(ColumnRole::Identifier { kind: k.clone() }),
            }
        }
        "dimension" => {
            forbid(rc.kind.is_some(), "kind", "dimension", p);
            forbid(rc.min.is_some(), "min", "dimension", p);
            forbid(rc.max.is_some(), "max", "dimension", p);
            forbid(rc.compare.is_some(), "compare", "dimension", p);
            let value_type = match rc.value_type.as_deref().unwrap_or("string") {
                "string" => ValueType::String,
                "integer" => ValueType::Integer,
                other => {
                    p.push(
                        format!("{field}.type"),
                        format!("{other:?} is not a dimension type (known: string, integer)"),
                    );
                    return None;
                }
            };
            let domain = match (&rc.values, rc.max_cardinality) {
                (Some(_), Some(_)) | (None, None) => {
                    p.push(
                        field,
                        "a dimension declares exactly one of `values` or `max_cardinality`",
                    );
                    return None;
                }
                (Some(values), None) => {
                    validate_values(values, value_type, field, p)?;
                    Domain::Values(values.clone())
                }
                (None, Some(n)) => {
                    if !(1..=MAX_DIMENSION_CARDINALITY).contains(&n) {
                        p.push(
                            format!("{field}.max_cardinality"),
                            format!("must be between 1 and {MAX_DIMENSION_CARDINALITY}"),
                        );
                        return None;
                    }
                    Domain::MaxCardinality(u32::try_from(n).ok()?)
                }
            };
            Some(ColumnRole::Dimension { value_type, domain })
        }
        "metric" => {
            forbid(rc.kind.is_some(), "kind", "metric", p);
            forbid(rc.values.is_some(), "values", "metric", p);
            forbid(rc.max_cardinality.is_some(), "max_cardinality", "metric", p);
            let value_type = match rc.value_type.as_deref().unwrap_or("float") {
                "integer" => ValueType::Integer,
                "float" => ValueType::Float,
                "date" => ValueType::Date,
                "timestamp" => ValueType::Timestamp,
                other => {
                    p.push(
                        format!("{field}.type"),
                        format!(
                            "{other:?} is not a metric type (known: integer, float, date, timestamp)"
                        ),
                    );
                    return None;
                }
            };
            let (Some(min), Some(max)) = (&rc.min, &rc.max) else {
                p.push(
                    field,
                    "a metric column needs both `min` and `max` bounds (they bound each person's contribution)",
                );
                return None;
            };
            let min = bound_of(&format!("{field}.min"), min, value_type, p)?;
            let max = bound_of(&format!("{field}.max"), max, value_type, p)?;
            if !min.is_finite() || !max.is_finite() || min >= max {
                p.push(
                    format!("{field}.max"),
                    "bounds must be finite numbers with min < max",
                );
                return None;
            }
            Some(ColumnRole::Metric {
                value_type,
                min,
                max,
                compare: rc.compare.unwrap_or(false),
            })
        }
        "sensitive" => {
            forbid(rc.kind.is_some(), "kind", "sensitive", p);
            forbid(rc.value_type.is_some(), "type", "sensitive", p);
            forbid(rc.values.is_some(), "values", "sensitive", p);
            forbid(
                rc.max_cardinality.is_some(),
                "max_cardinality",
                "sensitive",
                p,
            );
            forbid(rc.min.is_some(), "min", "sensitive", p);
            forbid(rc.max.is_some(), "max", "sensitive", p);
            forbid(rc.compare.is_some(), "compare", "sensitive", p);
            Some(ColumnRole::Sensitive)
        }
        other => {
            p.push(
                format!("{field}.role"),
                format!(
                    "{other:?} is not a known role (known: identifier, dimension, metric, sensitive)"
                ),
            );
            None
        }
    }
}

/// A metric bound as stored: the number itself, days since 1970-01-01 for
/// a date, microseconds since 1970-01-01 UTC for a timestamp.
fn bound_of(field: &str, v: &toml::Value, t: ValueType, p: &mut Problems) -> Option<f64> {
    match (t, v) {
        (ValueType::Integer, toml::Value::Integer(n)) => Some(*n as f64),
        (ValueType::Float, toml::Value::Integer(n)) => Some(*n as f64),
        (ValueType::Float, toml::Value::Float(x)) => Some(*x),
        (ValueType::Date | ValueType::Timestamp, toml::Value::Datetime(dt)) => {
            let Some(d) = dt.date else {
                p.push(field, "must be a date like 2026-01-31 (or a date-time)");
                return None;
            };
            if t == ValueType::Date && (dt.time.is_some() || dt.offset.is_some()) {
                p.push(field, "a date column's bound is a date, without a time");
                return None;
            }
            let date = Month::try_from(d.month)
                .ok()
                .and_then(|m| Date::from_calendar_date(i32::from(d.year), m, d.day).ok());
            let Some(date) = date.filter(|d| admitted_days().contains(&epoch_days(*d))) else {
                p.push(
                    field,
                    format!("must be a valid date in the years {FIRST_YEAR} to {LAST_YEAR}"),
                );
                return None;
            };
            let days = epoch_days(date);
            if t == ValueType::Date {
                return Some(days as f64);
            }
            let (h, m, s, ns) = dt.time.map_or((0, 0, 0, 0), |t| {
                (
                    i64::from(t.hour),
                    i64::from(t.minute),
                    i64::from(t.second),
                    i64::from(t.nanosecond),
                )
            });
            let offset_minutes = match dt.offset {
                Some(toml::value::Offset::Custom { minutes }) => i64::from(minutes),
                _ => 0,
            };
            let seconds = days * 86_400 + h * 3_600 + m * 60 + s - offset_minutes * 60;
            Some((seconds * 1_000_000 + ns / 1_000) as f64)
        }
        (ValueType::Integer | ValueType::Float, _) => {
            p.push(field, "must be a number");
            None
        }
        _ => {
            p.push(field, "must be a date like 2026-01-31 (or a date-time)");
            None
        }
    }
}

fn validate_values(
    values: &[String],
    value_type: ValueType,
    field: &str,
    p: &mut Problems,
) -> Option<()> {
    let before = p.0.len();
    if values.is_empty() {
        p.push(format!("{field}.values"), "must list at least one value");
    }
    if values.len() as i64 > MAX_DIMENSION_CARDINALITY {
        p.push(
            format!("{field}.values"),
            format!("lists more than {MAX_DIMENSION_CARDINALITY} values"),
        );
    }
    let mut seen = BTreeSet::new();
    for (k, v) in values.iter().enumerate() {
        if !seen.insert(v.as_str()) {
            p.push(format!("{field}.values[{k}]"), "is listed twice");
        }
        if value_type == ValueType::Integer && v.parse::<i64>().is_err() {
            p.push(
                format!("{field}.values[{k}]"),
                "is not an integer, but the column's type is integer",
            );
        }
    }
    (p.0.len() == before).then_some(())
}

fn validate_query(raw: &RawPolicy, datasets: &[Dataset], p: &mut Problems) -> Option<QueryRules> {
    let q = &raw.query;
    let mut column_pairs = Vec::new();
    for (i, pair) in q.column_pairs.iter().enumerate() {
        let field = format!("query.column_pairs[{i}]");
        let [a, b] = pair.as_slice() else {
            p.push(
                field,
                "a pair names exactly two columns, as \"dataset.column\"",
            );
            continue;
        };
        let resolve = |name: &str, p: &mut Problems| -> Option<(String, String)> {
            let found = name.split_once('.').and_then(|(d, c)| {
                let column = datasets.iter().find(|x| x.name == d)?.column(c)?;
                Some((d.to_string(), c.to_string(), column.role.clone()))
            });
            match found {
                Some((d, c, ColumnRole::Dimension { .. } | ColumnRole::Metric { .. })) => {
                    Some((d, c))
                }
                Some(_) => {
                    p.push(
                        &field,
                        format!("{name:?} is not a dimension or metric column; identifiers and sensitive columns are never compared"),
                    );
                    None
                }
                None => {
                    p.push(
                        &field,
                        format!("{name:?} is not a declared column (write \"dataset.column\")"),
                    );
                    None
                }
            }
        };
        if let (Some(a), Some(b)) = (resolve(a, p), resolve(b, p)) {
            if a == b {
                p.push(field, "names one column twice");
            } else {
                column_pairs.push(ColumnPair { a, b });
            }
        }
    }
    let mode = match q.mode.as_deref().unwrap_or("any") {
        "any" => QueryMode::Any,
        "templates" => QueryMode::Templates,
        other => {
            p.push(
                "query.mode",
                format!("{other:?} is not a query mode (known: any, templates)"),
            );
            QueryMode::Any
        }
    };
    let mut aggregates = BTreeSet::new();
    for (i, name) in q.aggregates.iter().enumerate() {
        match Aggregate::parse(name) {
            Some(a) => {
                if !aggregates.insert(a) {
                    p.push(
                        format!("query.aggregates[{i}]"),
                        format!("{name:?} is listed twice"),
                    );
                }
            }
            None => p.push(
                "query.aggregates",
                format!(
                    "{name:?} is not an aggregate an agreement can allow (known: {})",
                    known_list(&Aggregate::ALL, Aggregate::as_str)
                ),
            ),
        }
    }
    if q.aggregates.is_empty() {
        p.push("query.aggregates", "must allow at least one aggregate");
    }
    if !(2..=MAX_MIN_GROUP_SIZE).contains(&q.min_group_size) {
        p.push(
            "query.min_group_size",
            format!(
                "must be at least 2 (and at most {MAX_MIN_GROUP_SIZE}): an output row must never describe one person"
            ),
        );
        return None;
    }
    Some(QueryRules {
        aggregates,
        min_group_size: u32::try_from(q.min_group_size).ok()?,
        column_pairs,
        mode,
    })
}

fn validate_templates(
    raw: &RawPolicy,
    datasets: &[Dataset],
    parties: &[Party],
    p: &mut Problems,
) -> Vec<Template> {
    let mut templates: Vec<Template> = Vec::new();
    for (i, rt) in raw.template.iter().enumerate() {
        let field = format!("template[{i}]");
        let before = p.0.len();
        if !is_sql_name(&rt.name) {
            p.push(format!("{field}.name"), SQL_NAME_RULE);
        } else if templates.iter().any(|t| t.name == rt.name) {
            p.push(
                format!("{field}.name"),
                format!("{:?} is declared twice; template names are unique", rt.name),
            );
        }
        if rt.description.trim().is_empty() {
            p.push(
                format!("{field}.description"),
                "must say what the template answers",
            );
        }
        if rt.parties.is_empty() {
            p.push(
                format!("{field}.parties"),
                "must name at least one party that may run it",
            );
        }
        for (j, org) in rt.parties.iter().enumerate() {
            match parties.iter().find(|q| &q.org == org) {
                Some(q) if q.has(Right::Query) => {}
                Some(_) => p.push(
                    format!("{field}.parties[{j}]"),
                    format!("{org:?} lacks the \"query\" right"),
                ),
                None => p.push(
                    format!("{field}.parties[{j}]"),
                    format!("{org:?} is not a declared party"),
                ),
            }
        }
        let mut params: Vec<Param> = Vec::new();
        for (j, rp) in rt.param.iter().enumerate() {
            let pfield = format!("{field}.param[{j}]");
            if !is_sql_name(&rp.name) {
                p.push(format!("{pfield}.name"), SQL_NAME_RULE);
                continue;
            }
            if params.iter().any(|x| x.name == rp.name) {
                p.push(
                    format!("{pfield}.name"),
                    format!("{:?} is declared twice", rp.name),
                );
                continue;
            }
            if let Some(kind) = validate_param(rp, &pfield, datasets, p) {
                params.push(Param {
                    name: rp.name.clone(),
                    kind,
                });
            }
        }
        let used = placeholders(&rt.sql);
        for name in &used {
            if !rt.param.iter().any(|x| &x.name == name) {
                p.push(
                    format!("{field}.sql"),
                    format!(":{name} is not a declared parameter"),
                );
            }
        }
        for rp in &rt.param {
            if !used.contains(&rp.name) {
                p.push(
                    format!("{field}.param"),
                    format!("{:?} is declared but the SQL never uses it", rp.name),
                );
            }
        }
        if p.0.len() == before {
            templates.push(Template {
                name: rt.name.clone(),
                description: rt.description.trim().to_string(),
                sql: rt.sql.clone(),
                params,
                parties: rt.parties.clone(),
            });
        }
    }
    templates
}

fn validate_param(
    rp: &RawParam,
    field: &str,
    datasets: &[Dataset],
    p: &mut Problems,
) -> Option<ParamKind> {
    let integer_of = |v: &Option<toml::Value>, key: &str, p: &mut Problems| match v {
        Some(toml::Value::Integer(n)) => Some(*n),
        _ => {
            p.push(format!("{field}.{key}"), "must be an integer");
            None
        }
    };
    let date_of_value = |v: &Option<toml::Value>, key: &str, p: &mut Problems| match v {
        Some(toml::Value::Datetime(dt)) => date_of(&format!("{field}.{key}"), dt, p),
        _ => {
            p.push(format!("{field}.{key}"), "must be a date like 2026-01-31");
            None
        }
    };
    let forbid = |present: bool, key: &str, p: &mut Problems| {
        if present {
            p.push(
                format!("{field}.{key}"),
                format!("does not apply to a {:?} parameter", rp.param_type),
            );
        }
    };
    match rp.param_type.as_str() {
        "value" | "values" => {
            forbid(rp.min.is_some(), "min", p);
            forbid(rp.max.is_some(), "max", p);
            if rp.param_type == "value" {
                forbid(rp.max_items.is_some(), "max_items", p);
            }
            let Some(name) = &rp.column else {
                p.push(
                    format!("{field}.column"),
                    "names the dimension (\"dataset.column\") whose values it takes",
                );
                return None;
            };
            let role = name.split_once('.').and_then(|(d, c)| {
                Some(
                    datasets
                        .iter()
                        .find(|x| x.name == d)?
                        .column(c)?
                        .role
                        .clone(),
                )
            });
            let Some(ColumnRole::Dimension {
                value_type,
                domain: Domain::Values(values),
            }) = role
            else {
                p.push(
                    format!("{field}.column"),
                    format!("{name:?} is not a dimension column with declared `values`"),
                );
                return None;
            };
            let integer = value_type == ValueType::Integer;
            if rp.param_type == "value" {
                return Some(ParamKind::Value {
                    column: name.clone(),
                    values,
                    integer,
                });
            }
            let max_items = rp.max_items.unwrap_or(values.len() as i64);
            if !(1..=MAX_TEMPLATE_ITEMS).contains(&max_items) {
                p.push(
                    format!("{field}.max_items"),
                    format!("must be between 1 and {MAX_TEMPLATE_ITEMS}"),
                );
                return None;
            }
            Some(ParamKind::Values {
                column: name.clone(),
                values,
                integer,
                max_items: max_items as usize,
            })
        }
        "integer" => {
            forbid(rp.column.is_some(), "column", p);
            forbid(rp.max_items.is_some(), "max_items", p);
            let (min, max) = (
                integer_of(&rp.min, "min", p)?,
                integer_of(&rp.max, "max", p)?,
            );
            if min > max {
                p.push(format!("{field}.max"), "must not be less than min");
                return None;
            }
            Some(ParamKind::Integer { min, max })
        }
        "date" => {
            forbid(rp.column.is_some(), "column", p);
            forbid(rp.max_items.is_some(), "max_items", p);
            let min = date_of_value(&rp.min, "min", p)?;
            let max = date_of_value(&rp.max, "max", p)?;
            if min > max || min.year() < FIRST_YEAR || max.year() > LAST_YEAR {
                p.push(
                    format!("{field}.max"),
                    format!("min <= max, both in the years {FIRST_YEAR} to {LAST_YEAR}"),
                );
                return None;
            }
            Some(ParamKind::Date { min, max })
        }
        other => {
            p.push(
                format!("{field}.type"),
                format!("{other:?} is not a parameter type (known: value, values, integer, date)"),
            );
            None
        }
    }
}

fn validate_privacy(r: &RawPrivacy, p: &mut Problems) -> Option<Privacy> {
    let before = p.0.len();
    if !(r.epsilon_total.is_finite() && r.epsilon_total > 0.0) {
        p.push("privacy.epsilon_total", "must be a positive number");
    }
    if !(r.epsilon_per_query_max.is_finite() && r.epsilon_per_query_max > 0.0) {
        p.push("privacy.epsilon_per_query_max", "must be a positive number");
    } else if r.epsilon_per_query_max > r.epsilon_total {
        p.push(
            "privacy.epsilon_per_query_max",
            "must not exceed privacy.epsilon_total",
        );
    }
    match r.delta {
        Some(d) if d > 0.0 && d < 1e-3 => {}
        Some(_) => p.push(
            "privacy.delta",
            "must be greater than 0 and less than 0.001",
        ),
        None => p.push(
            "privacy.delta",
            "is required: the threshold that keeps group keys private spends it",
        ),
    }
    // The floor defaults to 0.01 (or the per-query maximum, if lower).
    let floor = r
        .epsilon_per_query_min
        .unwrap_or(DEFAULT_EPSILON_FLOOR.min(r.epsilon_per_query_max));
    if !(floor.is_finite() && floor > 0.0) {
        p.push("privacy.epsilon_per_query_min", "must be a positive number");
    } else if floor > r.epsilon_per_query_max {
        p.push(
            "privacy.epsilon_per_query_min",
            "must not exceed privacy.epsilon_per_query_max",
        );
    }
    let delta = r.delta.unwrap_or_default();
    // By default the delta of as many queries as the epsilon budget holds
    // at the floor (the floor alone then bounds it), and at most
    // DEFAULT_DELTA_TOTAL_CAP.
    let delta_total = r.delta_total.unwrap_or_else(|| {
        // 10 / 0.01 is 999.99...98 in binary floating point: 1,000 queries.
        let queries = (r.epsilon_total / floor * (1.0 + 1e-12)).floor().max(1.0);
        decimal(delta * queries).min(DEFAULT_DELTA_TOTAL_CAP.max(delta))
    });
    if !(delta_total.is_finite() && delta_total > 0.0 && delta_total < 1.0) {
        p.push(
            "privacy.delta_total",
            "must be greater than 0 and less than 1",
        );
    } else if delta_total < delta {
        p.push(
            "privacy.delta_total",
            "must be at least privacy.delta: every query spends delta",
        );
    }
    let refresh = match r.refresh.as_deref().unwrap_or("none") {
        "none" => Refresh::Never,
        "monthly" => Refresh::Monthly,
        other => {
            p.push(
                "privacy.refresh",
                format!("{other:?} is not a known refresh window (known: none, monthly)"),
            );
            Refresh::Never
        }
    };
    let groups = r.max_groups_per_person.unwrap_or(1);
    if !(1..=MAX_GROUPS_PER_PERSON).contains(&groups) {
        p.push(
            "privacy.max_groups_per_person",
            format!("must be between 1 and {MAX_GROUPS_PER_PERSON}"),
        );
    }
    let rows = r.max_rows_per_person.unwrap_or(1);
    if !(1..=MAX_ROWS_PER_PERSON).contains(&rows) {
        p.push(
            "privacy.max_rows_per_person",
            format!("must be between 1 and {MAX_ROWS_PER_PERSON}"),
        );
    }
    (p.0.len() == before).then(|| Privacy {
        epsilon_total: r.epsilon_total,
        epsilon_per_query_max: r.epsilon_per_query_max,
        epsilon_per_query_min: floor,
        delta,
        delta_total,
        refresh,
        max_groups_per_person: u32::try_from(groups).unwrap_or(1),
        max_rows_per_person: u32::try_from(rows).unwrap_or(1),
    })
}
