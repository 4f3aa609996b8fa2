//! Datasets and their columns: roles, types, bounds and domains.

use super::*;

pub(super) fn validate_datasets(
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

pub(super) fn validate_column(
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

pub(super) fn validate_values(
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
