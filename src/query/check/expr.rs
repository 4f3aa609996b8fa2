//! Expressions the checker reads: casts that cannot fail, constants,
//! conjuncts, and the refusals of expressions and joins.

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, ExprSchemable, Operator};

use super::{Scope, Violation, deny};

/// Above the aggregate: expressions over the released table's columns.
/// They never see an unreleased row, so arithmetic that can fail is
/// allowed here (its failure depends on released values only).
pub(super) fn output_expr(e: &Expr) -> Result<(), Violation> {
    match e {
        Expr::Column(_) | Expr::Literal(..) => Ok(()),
        Expr::Alias(a) => output_expr(&a.expr),
        Expr::BinaryExpr(b) => {
            output_expr(&b.left)?;
            output_expr(&b.right)
        }
        Expr::Not(x) | Expr::IsNull(x) | Expr::IsNotNull(x) | Expr::Negative(x) => output_expr(x),
        Expr::Cast(c) => output_expr(&c.expr),
        Expr::TryCast(c) => output_expr(&c.expr),
        other => Err(expression_refusal(other, "in the output")),
    }
}

/// `e` under any casts, each checked to be total.
pub(super) fn total_casts<'e>(e: &'e Expr, scope: &Scope<'_>) -> Result<&'e Expr, Violation> {
    match e {
        Expr::Cast(c) => {
            total_cast(&c.expr, c.field.data_type(), scope)?;
            total_casts(&c.expr, scope)
        }
        Expr::TryCast(c) => {
            total_cast(&c.expr, c.field.data_type(), scope)?;
            total_casts(&c.expr, scope)
        }
        other => Ok(other),
    }
}

/// Refuses a cast of `inner` to `to` that could fail, or lose what makes
/// values differ, on some value: beneath the aggregate it would run on
/// rows no one may see, and its failure would tell about them. A cast of a
/// literal is tried now, so its failure depends on the query text alone.
pub(super) fn total_cast(inner: &Expr, to: &DataType, scope: &Scope<'_>) -> Result<(), Violation> {
    if let Some(value) = constant(inner) {
        return match value.and_then(|v| v.cast_to(to).ok()) {
            Some(_) => Ok(()),
            None => Err(deny(
                "query.cast",
                format!("a literal in the query cannot be converted to {to}"),
            )),
        };
    }
    let from = inner
        .get_type(scope.schema)
        .map_err(|_| unknown_column("an expression"))?;
    if cast_is_total(&from, to) && arrow::compute::can_cast_types(&from, to) {
        Ok(())
    } else {
        Err(deny(
            "query.cast",
            format!(
                "a conversion from {from} to {to} can fail or narrow on a value, and beneath the aggregate it would run on rows no one may see; use the column's own type"
            ),
        ))
    }
}

/// The value of a literal under casts, or None if `e` reads a column.
/// `Some(None)` when a cast of the literal fails.
pub(super) fn constant(e: &Expr) -> Option<Option<ScalarValue>> {
    match e {
        Expr::Literal(v, _) => Some(Some(v.clone())),
        Expr::Cast(c) => {
            constant(&c.expr).map(|v| v.and_then(|v| v.cast_to(c.field.data_type()).ok()))
        }
        Expr::TryCast(c) => constant(&c.expr).map(|v| {
            v.map(|v| {
                v.cast_to(c.field.data_type())
                    .unwrap_or_else(|_| ScalarValue::Null)
            })
        }),
        _ => None,
    }
}

/// Conversions that succeed on every value and keep distinct values
/// distinct or, for integers to floating point, merely round them. Everything
/// else (narrowing, parsing text, binary to text, float to integer) is
/// refused beneath the aggregate.
pub(super) fn cast_is_total(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to {
        return true;
    }
    let integer = |t: &DataType| {
        matches!(
            t,
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64
        )
    };
    match (from, to) {
        (Null, _) => true,
        (Dictionary(_, values), to) => cast_is_total(values, to),
        (f, Float64) if integer(f) || matches!(f, Float16 | Float32) => true,
        (Float16, Float32) => true,
        (Int8, Int16 | Int32 | Int64)
        | (Int16, Int32 | Int64)
        | (Int32, Int64)
        | (UInt8, UInt16 | UInt32 | UInt64 | Int16 | Int32 | Int64)
        | (UInt16, UInt32 | UInt64 | Int32 | Int64)
        | (UInt32, UInt64 | Int64) => true,
        (Utf8, LargeUtf8 | Utf8View) => true,
        // Stored dates and timestamps lie in the years 1900 to 2200 under
        // every policy (checked at upload), which every timestamp unit
        // down to nanoseconds represents.
        (Date32, Timestamp(..)) | (Timestamp(TimeUnit::Microsecond, _), Timestamp(..) | Date32) => {
            true
        }
        (FixedSizeBinary(_), Binary | LargeBinary | BinaryView)
        | (Binary, LargeBinary | BinaryView) => true,
        (f, Utf8 | LargeUtf8 | Utf8View) => integer(f) || matches!(f, Boolean),
        _ => false,
    }
}

pub(super) fn join_rule() -> Violation {
    deny(
        "query.join",
        "joins are inner equi-joins on identifier columns: ON a.email = b.email",
    )
}

pub(super) fn unknown_column(name: &str) -> Violation {
    Violation::invalid(
        "sql.columns",
        format!("{name} is not a column of the datasets in this query"),
    )
}

pub(super) fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            let mut out = conjuncts(&b.left);
            out.extend(conjuncts(&b.right));
            out
        }
        other => vec![other],
    }
}

pub(super) fn expression_refusal(e: &Expr, place: &str) -> Violation {
    match e {
        Expr::ScalarFunction(f) => deny(
            "query.functions",
            format!("function {} is not allowed", f.func.name()),
        ),
        Expr::AggregateFunction(_) => deny(
            "query.aggregate",
            format!("aggregates are not allowed {place}"),
        ),
        Expr::WindowFunction(_) => deny("query.window", "window functions are not allowed"),
        Expr::ScalarSubquery(_)
        | Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::SetComparison(_) => deny("query.subquery", "subqueries are not allowed"),
        Expr::Case(_) => deny("query.expression", format!("CASE is not allowed {place}")),
        Expr::Placeholder(_) => {
            Violation::invalid("sql.placeholder", "parameters are not supported")
        }
        _ => deny(
            "query.expression",
            format!("this expression is not allowed {place}"),
        ),
    }
}
