//! Approved query templates: SQL written by the agreement's admins, with
//! typed parameters an analyst fills in. A template runs under exactly the
//! rules of any query (the checker, the release boundary, the minimum group
//! size, privacy); what it adds is that an agreement can admit only these
//! questions (`query.mode = "templates"`).
//!
//! Parameters are bound as literals the product writes itself, from values
//! checked against the parameter's declared domain: a dimension's declared
//! values, or an integer or date range. No text an analyst sends is ever
//! spliced into the SQL.

use std::collections::BTreeMap;

use time::Date;

/// One approved template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub(super) name: String,
    pub(super) description: String,
    pub(super) sql: String,
    pub(super) params: Vec<Param>,
    pub(super) parties: Vec<String>,
}

impl Template {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    /// The SQL, with `:name` where each parameter goes.
    pub fn sql(&self) -> &str {
        &self.sql
    }
    pub fn params(&self) -> &[Param] {
        &self.params
    }
    /// Organisations that may run it.
    pub fn parties(&self) -> &[String] {
        &self.parties
    }
    pub fn runnable_by(&self, org: &str) -> bool {
        self.parties.iter().any(|p| p == org)
    }

    /// The SQL with every parameter bound to a checked value. `given` maps
    /// parameter names to the text an analyst typed; every parameter must
    /// be given, and nothing else.
    pub fn bind(&self, given: &BTreeMap<String, String>) -> Result<Bound, ParamError> {
        if let Some(extra) = given
            .keys()
            .find(|k| !self.params.iter().any(|p| &p.name == *k))
        {
            return Err(ParamError {
                param: bounded(extra),
                rule: "template.param",
                detail: format!("template {} has no such parameter", self.name),
            });
        }
        let mut literals = BTreeMap::new();
        for p in &self.params {
            let text = given.get(&p.name).ok_or_else(|| ParamError {
                param: p.name.clone(),
                rule: "template.param",
                detail: "is required".into(),
            })?;
            literals.insert(p.name.as_str(), p.kind.literal(&p.name, text)?);
        }
        let sql = substitute(&self.sql, |name| literals.get(name).cloned())
            .expect("every placeholder names a declared parameter");
        // Canonical text of the values: one `name=value` line per
        // parameter, in name order, values as bound.
        let canonical: String = literals.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        Ok(Bound {
            sql,
            params_hash: blake3::hash(canonical.as_bytes()).to_hex().to_string(),
        })
    }

    /// Values that satisfy every parameter: its first declared value (as
    /// many values as a list may take), or the low end of its range. The
    /// policy check plans the template with them.
    pub fn sample_params(&self) -> BTreeMap<String, String> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.kind.sample()))
            .collect()
    }
}

/// A template's SQL with its parameters bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub sql: String,
    /// BLAKE3 (hex) of the bound values, for results and audit entries.
    pub params_hash: String,
}

/// A parameter value refused: which parameter, by which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: String,
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rule {}: parameter {}: {}",
            self.rule, self.param, self.detail
        )
    }
}

/// A parameter name as typed, cut short for messages (it is the analyst's
/// own text, never a data value).
fn bounded(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

/// One typed parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub(super) name: String,
    pub(super) kind: ParamKind,
}

impl Param {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn kind(&self) -> &ParamKind {
        &self.kind
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamKind {
    /// One of a dimension column's declared values.
    Value {
        column: String,
        values: Vec<String>,
        integer: bool,
    },
    /// A comma-separated list of distinct declared values, bound as
    /// `'a', 'b'` for use in `IN (:name)`.
    Values {
        column: String,
        values: Vec<String>,
        integer: bool,
        max_items: usize,
    },
    /// An integer within inclusive bounds.
    Integer { min: i64, max: i64 },
    /// A date (`2026-03-01`) within inclusive bounds.
    Date { min: Date, max: Date },
}

const DATE_FORMAT: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

impl ParamKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamKind::Value { .. } => "value",
            ParamKind::Values { .. } => "values",
            ParamKind::Integer { .. } => "integer",
            ParamKind::Date { .. } => "date",
        }
    }

    /// The domain, described for listings and refusals.
    pub fn domain(&self) -> String {
        match self {
            ParamKind::Value { column, values, .. } => {
                format!("one of {column}: {}", values.join(", "))
            }
            ParamKind::Values {
                column,
                values,
                max_items,
                ..
            } => format!(
                "up to {max_items} distinct values of {column}, comma-separated: {}",
                values.join(", ")
            ),
            ParamKind::Integer { min, max } => format!("an integer from {min} to {max}"),
            ParamKind::Date { min, max } => format!(
                "a date (YYYY-MM-DD) from {} to {}",
                format_date(*min),
                format_date(*max)
            ),
        }
    }

    fn sample(&self) -> String {
        match self {
            ParamKind::Value { values, .. } => values.first().cloned().unwrap_or_default(),
            // As many items as it may take, so a template that uses a list
            // where one value fits is caught.
            ParamKind::Values {
                values, max_items, ..
            } => values
                .iter()
                .take(*max_items)
                .cloned()
                .collect::<Vec<_>>()
                .join(","),
            ParamKind::Integer { min, .. } => min.to_string(),
            ParamKind::Date { min, .. } => format_date(*min),
        }
    }

    /// The SQL literal for `text`, or why it is outside the domain. The
    /// refusal never repeats the text.
    fn literal(&self, name: &str, text: &str) -> Result<String, ParamError> {
        let refuse = |detail: String| ParamError {
            param: name.to_string(),
            rule: "template.param",
            detail,
        };
        let outside = || refuse(format!("must be {}", self.domain()));
        let value_literal = |v: &str, integer: bool| {
            if integer {
                v.to_string()
            } else {
                format!("'{}'", v.replace('\'', "''"))
            }
        };
        match self {
            ParamKind::Value {
                values, integer, ..
            } => values
                .iter()
                .find(|v| v.as_str() == text.trim())
                .map(|v| value_literal(v, *integer))
                .ok_or_else(outside),
            ParamKind::Values {
                values,
                integer,
                max_items,
                ..
            } => {
                let mut chosen: Vec<&String> = Vec::new();
                for item in text.split(',') {
                    let v = values
                        .iter()
                        .find(|v| v.as_str() == item.trim())
                        .ok_or_else(outside)?;
                    if chosen.contains(&v) {
                        return Err(refuse("lists a value twice".into()));
                    }
                    chosen.push(v);
                }
                if chosen.len() > *max_items {
                    return Err(outside());
                }
                Ok(chosen
                    .iter()
                    .map(|v| value_literal(v, *integer))
                    .collect::<Vec<_>>()
                    .join(", "))
            }
            ParamKind::Integer { min, max } => match text.trim().parse::<i64>() {
                Ok(n) if (*min..=*max).contains(&n) => Ok(n.to_string()),
                _ => Err(outside()),
            },
            ParamKind::Date { min, max } => match Date::parse(text.trim(), DATE_FORMAT) {
                Ok(d) if (*min..=*max).contains(&d) => Ok(format!("DATE '{}'", format_date(d))),
                _ => Err(outside()),
            },
        }
    }
}

/// A date as YYYY-MM-DD.
pub fn format_date(d: Date) -> String {
    d.format(DATE_FORMAT).unwrap_or_default()
}

/// Replaces every `:name` placeholder in `sql` by `bind(name)`, leaving
/// string literals, quoted identifiers, comments and `::` casts alone.
/// None if a placeholder has no binding.
pub(crate) fn substitute(sql: &str, bind: impl Fn(&str) -> Option<String>) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut failed = false;
    scan(sql, |piece| match piece {
        Piece::Text(t) => out.push_str(t),
        Piece::Placeholder(name) => match bind(name) {
            Some(v) => out.push_str(&v),
            None => failed = true,
        },
    });
    (!failed).then_some(out)
}

/// The placeholder names in `sql`, in order of appearance.
pub(crate) fn placeholders(sql: &str) -> Vec<String> {
    let mut names = Vec::new();
    scan(sql, |piece| {
        if let Piece::Placeholder(n) = piece {
            names.push(n.to_string());
        }
    });
    names
}

enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

fn scan<'a>(sql: &'a str, mut visit: impl FnMut(Piece<'a>)) {
    let bytes = sql.as_bytes();
    let (mut i, mut start) = (0, 0);
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += 1;
                }
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < bytes.len() && !(bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
            b':' if bytes
                .get(i + 1)
                .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_') =>
            {
                visit(Piece::Text(&sql[start..i]));
                let name_start = i + 1;
                i = name_start;
                while i < bytes.len() && is_name(bytes[i]) {
                    i += 1;
                }
                visit(Piece::Placeholder(&sql[name_start..i]));
                start = i;
            }
            _ => i += 1,
        }
    }
    visit(Piece::Text(&sql[start.min(sql.len())..]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_skip_strings_comments_and_casts() {
        let sql = "SELECT ':not' , x::BIGINT -- :nor\n FROM t WHERE a = :region /* :no */ AND b IN (:list)";
        assert_eq!(placeholders(sql), vec!["region", "list"]);
        let bound = substitute(sql, |n| Some(format!("<{n}>"))).unwrap();
        assert!(bound.contains("a = <region>"), "{bound}");
        assert!(bound.contains("IN (<list>)"), "{bound}");
        assert!(
            bound.contains("':not'") && bound.contains("x::BIGINT"),
            "{bound}"
        );
        assert!(substitute(sql, |_| None).is_none());
    }

    #[test]
    fn values_are_bound_from_their_domain_only() {
        let t = Template {
            name: "t".into(),
            description: String::new(),
            sql: "SELECT :r, :n, :d, :l".into(),
            params: vec![
                Param {
                    name: "r".into(),
                    kind: ParamKind::Value {
                        column: "c.region".into(),
                        values: vec!["north".into(), "o'hare".into()],
                        integer: false,
                    },
                },
                Param {
                    name: "n".into(),
                    kind: ParamKind::Integer { min: 0, max: 10 },
                },
                Param {
                    name: "d".into(),
                    kind: ParamKind::Date {
                        min: Date::from_calendar_date(2026, time::Month::January, 1).unwrap(),
                        max: Date::from_calendar_date(2026, time::Month::December, 31).unwrap(),
                    },
                },
                Param {
                    name: "l".into(),
                    kind: ParamKind::Values {
                        column: "c.region".into(),
                        values: vec!["north".into(), "o'hare".into()],
                        integer: false,
                        max_items: 2,
                    },
                },
            ],
            parties: vec!["acme".into()],
        };
        let given = |r: &str, n: &str, d: &str, l: &str| {
            [("r", r), ("n", n), ("d", d), ("l", l)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let ok = t
            .bind(&given("o'hare", "3", "2026-02-01", "north, o'hare"))
            .unwrap();
        assert_eq!(
            ok.sql,
            "SELECT 'o''hare', 3, DATE '2026-02-01', 'north', 'o''hare'"
        );
        let same = t
            .bind(&given(" o'hare", "3", "2026-02-01", "north,o'hare"))
            .unwrap();
        assert_eq!(ok.params_hash, same.params_hash);
        for (bad, param) in [
            (given("south", "3", "2026-02-01", "north"), "r"),
            (given("north'--", "3", "2026-02-01", "north"), "r"),
            (given("north", "11", "2026-02-01", "north"), "n"),
            (given("north", "1; DROP", "2026-02-01", "north"), "n"),
            (given("north", "1", "2027-01-01", "north"), "d"),
            (given("north", "1", "2026-02-30", "north"), "d"),
            (given("north", "1", "2026-02-01", "north,north"), "l"),
            (given("north", "1", "2026-02-01", "north,west"), "l"),
        ] {
            let e = t.bind(&bad).unwrap_err();
            assert_eq!((e.param.as_str(), e.rule), (param, "template.param"));
            assert!(!e.to_string().contains("DROP") && !e.to_string().contains("west"));
        }
        let mut extra = given("north", "1", "2026-02-01", "north");
        extra.insert("other".into(), "1".into());
        assert_eq!(t.bind(&extra).unwrap_err().param, "other");
        let mut missing = given("north", "1", "2026-02-01", "north");
        missing.remove("n");
        assert_eq!(t.bind(&missing).unwrap_err().param, "n");
    }
}
