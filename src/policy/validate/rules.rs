//! What may be asked: the query rules, the approved templates and their
//! parameters, and differential privacy.

use super::*;

pub(super) fn validate_query(
    raw: &RawPolicy,
    datasets: &[Dataset],
    p: &mut Problems,
) -> Option<QueryRules> {
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

pub(super) fn validate_templates(
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

pub(super) fn validate_param(
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

pub(super) fn validate_privacy(r: &RawPrivacy, p: &mut Problems) -> Option<Privacy> {
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
