//! Derived dimensions: the expressions WHERE and GROUP BY may hold.
//!
//! They run on every joined row before the minimum group size, so each is
//! total: it returns a value (or NULL) for every row the datasets can hold
//! and never raises. The grammar, allow-listed:
//!
//! ```text
//! e := column                      a dimension; a metric if comparable
//!    | literal
//!    | e AND e | e OR e | NOT e | e IS [NOT] NULL | e IS [NOT] TRUE/FALSE
//!    | e (= <> < <= > >=) e | e [NOT] BETWEEN e AND e | e [NOT] IN (e, ...)
//!    | CASE [e] WHEN e THEN literal ... [ELSE literal] END
//!    | COALESCE(e, ...) | FLOOR(e) | CEIL(e)
//!    | e (+ - *) e                 numbers: integers wrap, floats never fail
//!    | e / literal | e % literal   a non-zero literal (positive for integers)
//!    | date ± interval literal     at most 50 years, once per date
//!    | DATE_TRUNC('unit', date) | DATE_PART('part', date) | EXTRACT(part FROM date)
//!    | CAST(e AS t)                a conversion that cannot fail or narrow
//! ```
//!
//! Two distinct columns meet in one comparison, arithmetic or COALESCE
//! only if the policy lists the pair (`query.column_pairs`). Dates and
//! timestamps lie in the years 1900 to 2200 (policy bounds, checked at
//! upload), so one interval of at most 50 years keeps them within what the
//! engine's nanosecond timestamps represent (1677 to 2262).

use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, ExprSchemable, Operator};

use super::{
    Checker, Scope, Source, constant, deny, expression_refusal, total_cast, unknown_column,
};
use crate::policy::{ColumnRole, ValueType};
use crate::query::Violation;

/// Where a derived dimension appears, for the rule a refusal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    Where,
    GroupBy,
    /// A CASE inside an aggregate: `AVG(CASE WHEN ... THEN 1 ELSE 0 END)`.
    Aggregate,
}

impl Place {
    fn rule(self) -> &'static str {
        match self {
            Place::Where => "query.filter",
            Place::GroupBy => "query.group_by",
            Place::Aggregate => "query.aggregate_argument",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Place::Where => "WHERE",
            Place::GroupBy => "GROUP BY",
            Place::Aggregate => "an aggregate",
        }
    }
}

/// Units `DATE_TRUNC` may take.
const TRUNC_UNITS: &[&str] = &["year", "quarter", "month", "week", "day", "hour", "minute"];
/// Parts `DATE_PART` and `EXTRACT` may take.
const DATE_PARTS: &[&str] = &[
    "year", "quarter", "month", "week", "day", "dow", "doy", "hour", "minute",
];
/// The longest interval a date may be moved by: 50 years, counted as 600
/// months of 31 days (18,600 days). From 1900 and 2200 that stays within
/// 1849 and 2251.
const MAX_INTERVAL_DAYS: i64 = 600 * 31;

pub(super) struct RowCheck<'c, 'a, 's> {
    pub(super) checker: &'c Checker<'a>,
    pub(super) scope: &'c Scope<'s>,
    pub(super) place: Place,
}

impl RowCheck<'_, '_, '_> {
    /// Checks `e`; returns the columns it reads.
    pub(super) fn expr(&self, e: &Expr) -> Result<Vec<Source>, Violation> {
        match e {
            Expr::Alias(a) => self.expr(&a.expr),
            Expr::Column(c) => {
                let source = self.checker.resolve(c, self.scope)?;
                self.readable(source)?;
                Ok(vec![source.clone()])
            }
            Expr::Literal(..) => {
                temporal_literal_in_range(e)?;
                Ok(Vec::new())
            }
            Expr::BinaryExpr(b) => match b.op {
                Operator::And | Operator::Or => {
                    let mut reads = self.expr(&b.left)?;
                    reads.extend(self.expr(&b.right)?);
                    Ok(reads)
                }
                Operator::Eq
                | Operator::NotEq
                | Operator::Lt
                | Operator::LtEq
                | Operator::Gt
                | Operator::GtEq
                | Operator::IsDistinctFrom
                | Operator::IsNotDistinctFrom => self.combined(&[&b.left, &b.right]),
                Operator::Plus | Operator::Minus | Operator::Multiply => {
                    self.arithmetic(&b.left, b.op, &b.right)?;
                    self.combined(&[&b.left, &b.right])
                }
                Operator::Divide | Operator::Modulo => {
                    self.divisor(&b.left, &b.right)?;
                    self.expr(&b.left)
                }
                _ => Err(deny(
                    "query.expression",
                    format!("operator {} is not allowed in {}", b.op, self.place.name()),
                )),
            },
            Expr::Not(x)
            | Expr::IsNull(x)
            | Expr::IsNotNull(x)
            | Expr::IsTrue(x)
            | Expr::IsFalse(x)
            | Expr::IsNotTrue(x)
            | Expr::IsNotFalse(x)
            | Expr::IsUnknown(x)
            | Expr::IsNotUnknown(x) => self.expr(x),
            Expr::Negative(x) => {
                if !self.type_of(x)?.is_floating() {
                    return Err(deny(
                        "query.expression",
                        "negation applies to floating-point values here (an integer's can overflow)",
                    ));
                }
                self.expr(x)
            }
            Expr::Cast(c) => {
                total_cast(&c.expr, c.field.data_type(), self.scope)?;
                temporal_literal_in_range(e)?;
                self.expr(&c.expr)
            }
            Expr::TryCast(c) => {
                total_cast(&c.expr, c.field.data_type(), self.scope)?;
                temporal_literal_in_range(e)?;
                self.expr(&c.expr)
            }
            Expr::InList(l) => {
                let mut operands: Vec<&Expr> = vec![&l.expr];
                operands.extend(l.list.iter());
                self.combined(&operands)
            }
            Expr::Between(b) => {
                let mut reads = self.combined(&[&b.expr, &b.low])?;
                reads.extend(self.combined(&[&b.expr, &b.high])?);
                Ok(reads)
            }
            Expr::Case(case) => {
                let mut reads = Vec::new();
                for (when, then) in &case.when_then_expr {
                    reads.extend(match &case.expr {
                        Some(operand) => self.combined(&[operand, when])?,
                        None => self.expr(when)?,
                    });
                    self.case_result(then)?;
                }
                if let Some(e) = &case.else_expr {
                    self.case_result(e)?;
                }
                Ok(reads)
            }
            Expr::ScalarFunction(f) => {
                let name = f.func.name().to_ascii_lowercase();
                match (name.as_str(), f.args.as_slice()) {
                    ("coalesce", args) if !args.is_empty() => {
                        self.combined(&args.iter().collect::<Vec<_>>())
                    }
                    ("floor" | "ceil", [x]) => {
                        if !is_number(&self.type_of(x)?) {
                            return Err(deny(
                                "query.functions",
                                format!("{name} applies to numbers"),
                            ));
                        }
                        self.expr(x)
                    }
                    ("date_trunc", [unit, x]) => {
                        self.keyword(unit, TRUNC_UNITS, &name)?;
                        self.temporal(x, &name)?;
                        self.expr(x)
                    }
                    ("date_part", [part, x]) => {
                        self.keyword(part, DATE_PARTS, &name)?;
                        self.temporal(x, &name)?;
                        self.expr(x)
                    }
                    _ => Err(deny(
                        "query.functions",
                        format!(
                            "function {name} is not allowed in {} (allowed: coalesce, floor, ceil, date_trunc, date_part, extract)",
                            self.place.name()
                        ),
                    )),
                }
            }
            other => Err(expression_refusal(
                other,
                &format!("in {}", self.place.name()),
            )),
        }
    }

    /// A column may be read here: a dimension always; a metric if the
    /// policy marks it comparable or the agreement has differential
    /// privacy; never an identifier.
    fn readable(&self, source: &Source) -> Result<(), Violation> {
        match self.checker.role_of(source)? {
            ColumnRole::Dimension { .. } => Ok(()),
            ColumnRole::Metric { compare, .. }
                if *compare || self.checker.policy.privacy().is_some() =>
            {
                Ok(())
            }
            ColumnRole::Metric { .. } => Err(deny(
                self.place.rule(),
                format!(
                    "metric {} may be compared or grouped on only if the policy marks it `compare = true` (or under [privacy]); aggregate it instead",
                    source.column
                ),
            )),
            ColumnRole::Identifier { .. } => Err(deny(
                self.place.rule(),
                format!(
                    "{} is an identifier; identifiers appear only in join conditions and COUNT(DISTINCT ...)",
                    source.column
                ),
            )),
            ColumnRole::Sensitive => Err(unknown_column(&source.column)),
        }
    }

    /// Operands that meet in one comparison or COALESCE: each checked, and
    /// two distinct columns from different operands only as a listed pair.
    fn combined(&self, operands: &[&Expr]) -> Result<Vec<Source>, Violation> {
        let reads = operands
            .iter()
            .map(|e| self.expr(e))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in reads.iter().enumerate() {
            for b in &reads[i + 1..] {
                for x in a {
                    for y in b {
                        self.pair(x, y)?;
                    }
                }
            }
        }
        Ok(reads.into_iter().flatten().collect())
    }

    fn pair(&self, x: &Source, y: &Source) -> Result<(), Violation> {
        let allowed = x == y
            || self.checker.policy.query().column_pairs().iter().any(|p| {
                p.joins(
                    (x.dataset.as_str(), x.column.as_str()),
                    (y.dataset.as_str(), y.column.as_str()),
                )
            });
        if allowed {
            Ok(())
        } else {
            Err(deny(
                "query.compare",
                format!(
                    "{}.{} and {}.{} are not a column pair the policy lets one expression combine (query.column_pairs)",
                    x.dataset, x.column, y.dataset, y.column
                ),
            ))
        }
    }

    /// `+`, `-`, `*`: numbers (integers wrap, floats never fail), or a
    /// date or timestamp moved once by a bounded interval literal.
    fn arithmetic(&self, left: &Expr, op: Operator, right: &Expr) -> Result<(), Violation> {
        let (lt, rt) = (self.type_of(left)?, self.type_of(right)?);
        let interval = |t: &DataType| matches!(t, DataType::Interval(_));
        let moved = match (interval(&lt), interval(&rt)) {
            (false, true) => Some((left, right, &lt)),
            (true, false) if op == Operator::Plus => Some((right, left, &rt)),
            (true, true) => {
                return Err(deny(
                    "query.expression",
                    "intervals are added to a date, not to each other",
                ));
            }
            _ => None,
        };
        if let Some((date, interval_expr, date_type)) = moved {
            if op == Operator::Multiply || !is_temporal(date_type) {
                return Err(deny(
                    "query.expression",
                    "an interval is added to or subtracted from a date or timestamp",
                ));
            }
            if moves_a_date(date) {
                return Err(deny(
                    "query.expression",
                    "a date is moved by one interval at most",
                ));
            }
            return bounded_interval(interval_expr);
        }
        if is_number(&lt) && is_number(&rt) {
            Ok(())
        } else {
            Err(deny(
                "query.expression",
                format!(
                    "arithmetic in {} applies to numbers, and to a date with an interval",
                    self.place.name()
                ),
            ))
        }
    }

    /// `x / d` and `x % d`: `d` a non-zero literal, positive for integers
    /// (the one integer quotient that overflows is MIN / -1).
    fn divisor(&self, left: &Expr, right: &Expr) -> Result<(), Violation> {
        let lt = self.type_of(left)?;
        let refuse = || {
            deny(
                "query.expression",
                "a division (or remainder) divides by a positive literal: on rows no one may see, a division by a column could fail",
            )
        };
        let value = constant(right).flatten().ok_or_else(refuse)?;
        if !is_number(&lt) {
            return Err(refuse());
        }
        let positive = value
            .cast_to(&DataType::Float64)
            .ok()
            .and_then(|v| match v {
                ScalarValue::Float64(Some(x)) => Some(x > 0.0 && x.is_finite()),
                _ => None,
            })
            .unwrap_or(false);
        if positive { Ok(()) } else { Err(refuse()) }
    }

    /// A CASE result: a literal, so a CASE only names buckets.
    fn case_result(&self, e: &Expr) -> Result<(), Violation> {
        match constant(e) {
            Some(Some(_)) => Ok(()),
            _ => Err(deny(
                match self.place {
                    Place::Aggregate => "query.aggregate_argument",
                    _ => "query.expression",
                },
                "CASE ... THEN and ELSE give literals only (a CASE names buckets)",
            )),
        }
    }

    /// The literal first argument of a date function, from `allowed`.
    fn keyword(&self, e: &Expr, allowed: &[&str], function: &str) -> Result<(), Violation> {
        let word = match constant(e).flatten() {
            Some(ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s))) => {
                s.to_ascii_lowercase()
            }
            _ => String::new(),
        };
        if allowed.contains(&word.as_str()) {
            Ok(())
        } else {
            Err(deny(
                "query.functions",
                format!(
                    "{function} takes one of {} as its first argument",
                    allowed.join(", ")
                ),
            ))
        }
    }

    fn temporal(&self, e: &Expr, function: &str) -> Result<(), Violation> {
        if is_temporal(&self.type_of(e)?) {
            Ok(())
        } else {
            Err(deny(
                "query.functions",
                format!("{function} applies to date and timestamp columns"),
            ))
        }
    }

    fn type_of(&self, e: &Expr) -> Result<DataType, Violation> {
        e.get_type(self.scope.schema)
            .map_err(|_| unknown_column("an expression"))
    }
}

/// A CASE with numeric literal results, aggregated (the share of people
/// in a group meeting a condition, say): a metric bounded by its results.
pub(super) fn case_bounds(case: &Expr) -> Result<ColumnRole, Violation> {
    let refuse = || {
        deny(
            "query.aggregate_argument",
            "a CASE inside an aggregate gives number literals only: AVG(CASE WHEN ... THEN 1 ELSE 0 END)",
        )
    };
    let Expr::Case(c) = case else {
        return Err(refuse());
    };
    let results = c
        .when_then_expr
        .iter()
        .map(|(_, then)| then.as_ref())
        .chain(c.else_expr.as_deref());
    let (mut lo, mut hi, mut integer) = (f64::INFINITY, f64::NEG_INFINITY, true);
    for e in results {
        let value = constant(e).flatten().ok_or_else(refuse)?;
        if value.is_null() {
            continue;
        }
        let t = value.data_type();
        if !is_number(&t) {
            return Err(refuse());
        }
        integer &= t.is_integer();
        let x = match value.cast_to(&DataType::Float64) {
            Ok(ScalarValue::Float64(Some(x))) if x.is_finite() => x,
            _ => return Err(refuse()),
        };
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return Err(refuse());
    }
    Ok(ColumnRole::Metric {
        value_type: if integer {
            ValueType::Integer
        } else {
            ValueType::Float
        },
        min: lo,
        // Bounds of one value still need a width for the noise.
        max: if hi > lo { hi } else { lo + 1.0 },
        compare: false,
    })
}

/// Integers and floating point; decimal arithmetic can fail on overflow.
fn is_number(t: &DataType) -> bool {
    t.is_integer() || t.is_floating()
}

fn is_temporal(t: &DataType) -> bool {
    matches!(t, DataType::Date32 | DataType::Timestamp(..))
}

/// Whether `e` already moves a date by an interval anywhere inside it
/// (under casts, `DATE_TRUNC`, `COALESCE`, ...): two moves could take a
/// date past what the engine represents.
fn moves_a_date(e: &Expr) -> bool {
    use datafusion::common::tree_node::TreeNode;
    e.exists(|x| {
        Ok(matches!(x, Expr::BinaryExpr(b) if matches!(b.op, Operator::Plus | Operator::Minus)))
    })
    .unwrap_or(true)
}

/// A date or timestamp literal outside the years every policy admits would
/// reach past the engine's range through the functions above.
fn temporal_literal_in_range(e: &Expr) -> Result<(), Violation> {
    let Some(Some(value)) = constant(e) else {
        return Ok(());
    };
    let days = match value {
        ScalarValue::Date32(Some(d)) => Some(i64::from(d)),
        ScalarValue::Date64(Some(ms)) => Some(ms.div_euclid(86_400_000)),
        ScalarValue::TimestampSecond(Some(t), _) => Some(t.div_euclid(86_400)),
        ScalarValue::TimestampMillisecond(Some(t), _) => Some(t.div_euclid(86_400_000)),
        ScalarValue::TimestampMicrosecond(Some(t), _) => Some(t.div_euclid(86_400_000_000)),
        ScalarValue::TimestampNanosecond(Some(t), _) => Some(t.div_euclid(86_400_000_000_000)),
        _ => None,
    };
    match days {
        Some(d) if !crate::policy::admitted_days().contains(&d) => Err(deny(
            "query.expression",
            format!(
                "date and timestamp literals lie in the years {} to {}",
                crate::policy::FIRST_YEAR,
                crate::policy::LAST_YEAR
            ),
        )),
        _ => Ok(()),
    }
}

/// An interval literal of at most 50 years.
fn bounded_interval(e: &Expr) -> Result<(), Violation> {
    let refuse = || {
        deny(
            "query.expression",
            "a date moves by an interval literal of at most 50 years",
        )
    };
    let days = match constant(e).flatten().ok_or_else(refuse)? {
        ScalarValue::IntervalMonthDayNano(Some(v)) => {
            i64::from(v.months).abs() * 31
                + i64::from(v.days).abs()
                + (v.nanoseconds / 86_400_000_000_000).abs()
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            i64::from(v.days).abs() + i64::from(v.milliseconds / 86_400_000).abs()
        }
        ScalarValue::IntervalYearMonth(Some(m)) => i64::from(m).abs() * 31,
        _ => return Err(refuse()),
    };
    if days <= MAX_INTERVAL_DAYS {
        Ok(())
    } else {
        Err(refuse())
    }
}
