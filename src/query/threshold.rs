//! The minimum group size under thresholds only: whom a released value
//! stands for, counted per party and per cell.
//!
//! A released value is a function of every party's data it reads, so it
//! may only depend on rows that stand for at least `min_group_size` people
//! of **each party** whose dataset the query scans. Not only a group as a
//! whole: the aggregates of a row read subsets of its group's rows (a
//! branch of a `CASE` inside an aggregate, the rows where the aggregated
//! column is not NULL), and two such subsets can differ by one person,
//! whose values the difference of two released values then describes. So
//! the unit is the **cell**: the rows of a group that agree on the truth
//! of every condition the query's aggregates read (for conditions `x` and
//! `y`: `x AND y`, `x AND NOT y`, `NOT x AND y`, `NOT x AND NOT y`). Every
//! released value, and every difference of two of them, is a sum over
//! whole cells.
//!
//! **A cell under the minimum is left out**, as a group under the minimum
//! is: its rows reach no aggregate of the row, and a group left with no
//! row is not released. Holding back the whole row instead would tell a
//! cell of one person from an empty one (the row shown or not); leaving the
//! cell out gives the same answer with and without that person.
//!
//! Who counts for a party:
//!
//! - its people with rows in the cell (`A`), and
//! - under a `LEFT JOIN` that keeps the caller's rows, for the party on
//!   the join's other side: its people *matched* to caller rows that would
//!   fall in the cell were they unmatched (`B`). Which caller rows go
//!   unmatched is the partner's data too: a group of unmatched rows is a
//!   function of who is missing from it. `B` is counted on "phantom"
//!   copies of the matched rows with the other side's columns set to NULL,
//!   flowing through the same WHERE, GROUP BY and conditions as the real
//!   rows. Phantom rows never reach an aggregate the analyst wrote.
//! - for the caller, whose rows the `LEFT JOIN` keeps: its people with
//!   rows in the cell, stand-ins included (below). Which cells keep their
//!   matched rows is decided first, the caller's people counted on every
//!   phantom of the cell as well: a row that matched into a cell left out
//!   and a row that never matched then weigh alike ([`kept_cells`]).
//!
//! A party's count is the larger of `A` and `B` (each `B` when several
//! LEFT JOINs bring its data): never more than the people the cell depends
//! on. The caller's own padding rows never match, so they count for the
//! caller only.
//!
//! With no condition and no `LEFT JOIN` a cell is a group, and one
//! aggregation does it all:
//!
//! ```text
//! Projection: G, aggs
//!   Filter: __rows > 0 AND for every party p: A(p) >= min
//!     Aggregate: groupBy=[G],
//!                aggr=[aggs, count(*) AS __rows, count(DISTINCT person_p) AS A(p)]
//!       [Filter: WHERE] ...
//!         the joined rows
//! ```
//!
//! With conditions, and always under a `LEFT JOIN` (whose phantom rows
//! are a union beneath the aggregation), the cells that stand for enough
//! people are found first and the aggregation reads their rows only
//! ([`kept_cells`], or [`by_cells`] in one pass when every aggregate is a
//! sum of parts and no `LEFT JOIN` is there).
//!
//! Inner joins alone need no phantom rows, and every row's person columns
//! are then equal (rows joined on equal fingerprints are one person), so a
//! single count serves every party.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::common::{Column, JoinType, NullEquality};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::expr::{AggregateFunction, Case};
use datafusion::logical_expr::{
    Aggregate, Expr, ExprSchemable, Filter, LogicalPlan, LogicalPlanBuilder, Operator, binary_expr,
    cast, lit,
};
use datafusion::prelude::SessionContext;

use super::release::{PeopleCount, leaf_tables, private_failure};
use super::unmatched::{Phantom, left_joins, materialised, only_real_rows, with_phantoms};
use super::{OWN_PERSON_COLUMN, QueryError, Violation};

mod people;

use people::People;

/// Who owns a dataset, by its name.
pub(super) type Owners<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The private stage under thresholds only: the analyst's aggregation over
/// the rows of the cells that stand for at least `min` people of every
/// party. What was left out is not counted: it is not released.
pub(super) async fn threshold_stage(
    ctx: &SessionContext,
    agg: &Aggregate,
    owners: Owners<'_>,
    min: u32,
    counting: PeopleCount,
) -> Result<Vec<RecordBatch>, QueryError> {
    if left_joins(&agg.input) > 1 {
        return Err(QueryError::Refused(Violation::deny(
            "query.join",
            "under thresholds alone a query may hold one LEFT JOIN: which of two partners' rows would leave a cell under the minimum cannot be told apart; join the second partner's dataset in another query",
        )));
    }
    let mut phantoms = Vec::new();
    let input =
        with_phantoms(agg.input.as_ref().clone(), &mut phantoms).map_err(private_failure)?;
    // The joined rows with their phantoms are read four times below (the
    // cells, their rows, the rows left out, the stand-ins): made once.
    let input = match phantoms.is_empty() {
        true => input,
        false => materialised(ctx, input).await.map_err(private_failure)?,
    };
    let plan = plan(agg, input, &phantoms, owners, min, counting).map_err(private_failure)?;
    let plan = match super::engine::distributed(ctx) {
        true => minimum_on_server(ctx, plan)
            .await
            .map_err(private_failure)?,
        false => plan,
    };
    super::collect(ctx, plan).await.map_err(private_failure)
}

/// Under the distributed engine, the minimum is applied here, on the
/// server: every aggregation whose people counts a minimum reads runs on
/// the workers and its exact counts come back, and the filter, and all
/// that builds on it, runs over them. Nothing a worker returns is released
/// unless the server kept it.
fn minimum_on_server(
    ctx: &SessionContext,
    plan: LogicalPlan,
) -> futures::future::BoxFuture<'_, Result<LogicalPlan>> {
    Box::pin(async move {
        if !has_minimum(&plan) {
            return Ok(plan);
        }
        if let LogicalPlan::Filter(f) = &plan
            && reads_people(&f.predicate)
            && matches!(f.input.as_ref(), LogicalPlan::Aggregate(_))
        {
            let counted = materialised(ctx, f.input.as_ref().clone()).await?;
            MINIMUMS_ON_SERVER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(LogicalPlan::Filter(Filter::try_new(
                f.predicate.clone(),
                Arc::new(counted),
            )?));
        }
        let mut inputs = Vec::new();
        for input in plan.inputs().into_iter().cloned() {
            inputs.push(minimum_on_server(ctx, input).await?);
        }
        plan.with_new_exprs(plan.expressions(), inputs)
    })
}

/// Minimum filters applied on the server over counts the workers returned,
/// since the process started.
static MINIMUMS_ON_SERVER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many minimum filters ran on the server over the workers' counts.
pub fn minimums_on_server() -> u64 {
    MINIMUMS_ON_SERVER.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether a predicate reads the people counts of [`People::counts`].
fn reads_people(predicate: &Expr) -> bool {
    predicate
        .column_refs()
        .iter()
        .any(|c| c.name.starts_with("__people_"))
}

/// Whether a plan holds a minimum's filter.
fn has_minimum(plan: &LogicalPlan) -> bool {
    datafusion::common::tree_node::TreeNode::exists(plan, |node| {
        Ok(matches!(node, LogicalPlan::Filter(f) if reads_people(&f.predicate)))
    })
    .unwrap_or(true)
}

/// The conditions a query's aggregates read, each once. Depends on the
/// plan only, never on data.
fn conditions_of(agg: &Aggregate) -> Result<Vec<Expr>> {
    let schema = agg.input.schema();
    let mut conditions: Vec<Expr> = Vec::new();
    for a in &agg.aggr_expr {
        for c in aggregate_conditions(a, schema)? {
            if !conditions.contains(&c) {
                conditions.push(c);
            }
        }
    }
    Ok(conditions)
}

/// Names of the columns the plan adds; none can clash with a dataset's
/// (those never start with two underscores).
const ROWS: &str = "__rows";

fn plan(
    agg: &Aggregate,
    input: LogicalPlan,
    phantoms: &[Phantom],
    owners: Owners<'_>,
    min: u32,
    counting: PeopleCount,
) -> Result<LogicalPlan> {
    let conditions = conditions_of(agg)?;
    let people = People::of(&input, phantoms, &agg.input, owners, counting)?;
    let real = people.real.clone();
    let mut aggr: Vec<Expr> = match &real {
        None => agg.aggr_expr.clone(),
        Some(real) => agg
            .aggr_expr
            .iter()
            .map(|a| only_real_rows(a, real))
            .collect::<Result<_>>()?,
    };
    let rows = count_rows(real.clone()).alias(ROWS);
    aggr.push(rows);
    let some_real_row = Expr::Column(Column::from_name(ROWS)).gt(lit(0i64));

    let (kept, predicate) = if conditions.is_empty() && phantoms.is_empty() {
        // One cell per group: its counts sit beside the analyst's aggregates.
        let (counts, enough) = people.counts(min, false)?;
        aggr.extend(counts);
        (input, some_real_row.and(enough))
    } else if let (true, Some(parts)) = (phantoms.is_empty(), Partials::of(agg)) {
        return by_cells(input, agg, &conditions, &people, min, parts);
    } else {
        let kept = kept_cells(input, agg, &conditions, &people, phantoms.first(), min)?;
        (kept, some_real_row)
    };
    let counted = Aggregate::try_new(Arc::new(kept), agg.group_expr.clone(), aggr)?;
    let output: Vec<Expr> = counted
        .schema
        .iter()
        .take(agg.schema.fields().len())
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    let filter = Filter::try_new(predicate, Arc::new(LogicalPlan::Aggregate(counted)))?;
    in_group_order(
        LogicalPlanBuilder::from(LogicalPlan::Filter(filter)).project(output)?,
        agg,
    )
}

/// `released` sorted by its group columns (its first), so that the order
/// of the rows says nothing about the rows left out.
fn in_group_order(released: LogicalPlanBuilder, agg: &Aggregate) -> Result<LogicalPlan> {
    let order: Vec<_> = released
        .schema()
        .iter()
        .take(agg.group_expr.len())
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())).sort(true, true))
        .collect();
    if order.is_empty() {
        released.build()
    } else {
        released.sort(order)?.build()
    }
}

/// The analyst's aggregates as sums of per-cell parts, when each is
/// (`COUNT`, `SUM`, `AVG`; not `COUNT(DISTINCT ...)`).
struct Partials {
    /// The per-cell aggregates, aliased `__part_k`.
    parts: Vec<Expr>,
    /// Per analyst aggregate: the part it sums, or the two (sum, count)
    /// an average divides.
    finals: Vec<(usize, Option<usize>)>,
}

impl Partials {
    fn of(agg: &Aggregate) -> Option<Partials> {
        use datafusion::functions_aggregate::expr_fn::{count, sum};
        let mut parts = Vec::new();
        let mut finals = Vec::new();
        let mut part = |e: Expr| {
            parts.push(e.alias(format!("__part_{}", parts.len())));
            parts.len() - 1
        };
        for e in &agg.aggr_expr {
            let e = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            };
            let Expr::AggregateFunction(af) = e else {
                return None;
            };
            let p = &af.params;
            if p.distinct || p.filter.is_some() || !p.order_by.is_empty() {
                return None;
            }
            match (af.func.name(), p.args.as_slice()) {
                ("count" | "sum", _) => finals.push((part(e.clone()), None)),
                ("avg", [arg]) => {
                    let s = part(sum(arg.clone()));
                    let c = part(count(arg.clone()));
                    finals.push((s, Some(c)));
                }
                _ => return None,
            }
        }
        Some(Partials { parts, finals })
    }
}

/// The private stage in one pass over the rows, for aggregates that are
/// sums of parts ([`Partials`]) and no LEFT JOIN:
///
/// ```text
/// Sort: G                                                  (in_group_order)
///   Projection: G, each aggregate from its summed parts, as its own type
///     Filter: __rows > 0
///       Aggregate: groupBy=[G], aggr=[sum(parts), sum(rows)]
///         Filter: for every party p: A(p) >= min
///           Aggregate: groupBy=[G, conditions], aggr=[parts, rows, A(p)]
/// ```
fn by_cells(
    input: LogicalPlan,
    agg: &Aggregate,
    conditions: &[Expr],
    people: &People,
    min: u32,
    partials: Partials,
) -> Result<LogicalPlan> {
    use datafusion::functions::core::expr_fn::nullif;
    use datafusion::functions_aggregate::expr_fn::sum;
    let keys: Vec<Expr> = cell_keys(agg, conditions)
        .into_iter()
        .map(|(name, e)| e.alias(name))
        .collect();
    let (counts, enough) = people.counts(min, false)?;
    let mut first = partials.parts.clone();
    first.push(count_rows(None).alias(ROWS));
    first.extend(counts);
    let part = |k: usize| Expr::Column(Column::from_name(format!("__part_{k}")));
    let mut second: Vec<Expr> = (0..partials.parts.len())
        .map(|k| sum(part(k)).alias(format!("__part_{k}")))
        .collect();
    second.push(sum(Expr::Column(Column::from_name(ROWS))).alias(ROWS));
    let groups: Vec<Expr> = (0..agg.group_expr.len())
        .map(|i| Expr::Column(Column::from_name(format!("__g{i}"))))
        .collect();
    let mut output: Vec<Expr> = groups.clone();
    for ((k, average), (_, field)) in partials
        .finals
        .iter()
        .zip(agg.schema.iter().skip(agg.group_expr.len()))
    {
        let value = match average {
            None => part(*k),
            Some(c) => {
                cast(part(*k), DataType::Float64)
                    / cast(nullif(part(*c), lit(0i64)), DataType::Float64)
            }
        };
        output.push(cast(value, field.data_type().clone()).alias(field.name()));
    }
    let released = LogicalPlanBuilder::from(input)
        .aggregate(keys, first)?
        .filter(enough)?
        .aggregate(groups, second)?
        .filter(Expr::Column(Column::from_name(ROWS)).gt(lit(0i64)))?
        .project(output)?;
    in_group_order(released, agg)
}

/// What tells a row's cell: each group expression (`__g<i>`), then each
/// condition (`__c<j>`), by name.
fn cell_keys(agg: &Aggregate, conditions: &[Expr]) -> Vec<(String, Expr)> {
    let groups = agg
        .group_expr
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("__g{i}"), g.clone()));
    let conditions = conditions
        .iter()
        .enumerate()
        .map(|(j, c)| (format!("__c{j}"), c.clone()));
    groups.chain(conditions).collect()
}

/// `count(*)` as the engine plans it, of the rows `filter` keeps.
fn count_rows(filter: Option<Expr>) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        count_udaf(),
        vec![lit(1i64)],
        false,
        filter.map(Box::new),
        vec![],
        None,
    ))
}

/// The rows of `input` the aggregation may read: those whose cell (group
/// and the truth of each condition) stands for enough people of every
/// party, and under a LEFT JOIN, in place of a matched row whose cell does
/// not, its phantom (the caller's row as if unmatched). The answer is then
/// the one the partner's data would give without the people of the cells
/// left out: the caller cannot tell them from people the partner does not
/// hold, by its own rows or otherwise.
///
/// Under a LEFT JOIN, in two rounds, so that no cell's fate feeds back
/// into another's:
///
/// 1. Which cells keep their matched rows: the counts of [`People`], the
///    caller's people counted on the cell's phantoms too (every caller row
///    that would fall in the cell were it unmatched, matched or not).
///    That count is the same whether a row matched into a cell left out
///    or went unmatched, so this round's verdicts cannot tell the two.
/// 2. The rows that remain (the real rows, less the matched rows of the
///    cells round 1 left out, plus those rows' phantoms as stand-ins) are
///    counted again, the caller's people on them alone: a cell is
///    released if the people whose rows it now holds are enough.
///
/// ```text
/// keyed:   Projection: input, __g_i := group expression i, __c_j := condition j
/// cells:   Projection: keys AS __k*
///            Filter: for every party p: A(p) >= min OR B(p) >= min
///              Aggregate: groupBy=[keys], aggr=[A(p), B(p)]
/// round 1: cells over keyed, the caller counted on phantoms too
/// out:     (matched real rows) ANTI JOIN round 1                  on keys, NULL = NULL
/// held:    Union: (real rows) ANTI JOIN out                       on row numbers
///                 (phantom rows) SEMI JOIN out, marked real       on row numbers
/// round 2: cells over held and the phantom rows
/// kept:    held SEMI JOIN round 2                                 on keys, NULL = NULL
/// ```
fn kept_cells(
    input: LogicalPlan,
    agg: &Aggregate,
    conditions: &[Expr],
    people: &People,
    phantom: Option<&Phantom>,
    min: u32,
) -> Result<LogicalPlan> {
    let mut keyed: Vec<Expr> = input
        .schema()
        .iter()
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    let mut keys = Vec::new();
    for (name, e) in cell_keys(agg, conditions) {
        keyed.push(e.alias(&name));
        keys.push(name);
    }
    if keys.is_empty() {
        // One cell, the whole input: a key joins need.
        keys.push("__all".into());
        keyed.push(lit(true).alias("__all"));
    }
    let keyed = LogicalPlanBuilder::from(input).project(keyed)?.build()?;
    let key_columns: Vec<Expr> = keys
        .iter()
        .map(|k| Expr::Column(Column::from_name(k)))
        .collect();
    let cells = |rows: LogicalPlan, wide: bool| -> Result<LogicalPlan> {
        let (counts, enough) = people.counts(min, wide)?;
        LogicalPlanBuilder::from(rows)
            .aggregate(key_columns.clone(), counts)?
            .filter(enough)?
            .project(
                key_columns
                    .iter()
                    .zip(&keys)
                    .map(|(c, k)| c.clone().alias(format!("__k{k}"))),
            )?
            .build()
    };
    let of_cells = |rows: LogicalPlanBuilder, cells: LogicalPlan, join: JoinType| {
        rows.join_detailed(
            cells,
            join,
            (
                keys.iter().map(Column::from_name).collect::<Vec<_>>(),
                keys.iter()
                    .map(|k| Column::from_name(format!("__k{k}")))
                    .collect::<Vec<_>>(),
            ),
            None,
            NullEquality::NullEqualsNull,
        )
    };
    let Some(phantom) = phantom else {
        let kept = cells(keyed.clone(), false)?;
        return of_cells(LogicalPlanBuilder::from(keyed), kept, JoinType::LeftSemi)?.build();
    };
    let flag = Expr::Column(Column::from_name(&phantom.flag));
    let real = LogicalPlanBuilder::from(keyed.clone()).filter(flag.clone())?;
    let phantoms = LogicalPlanBuilder::from(keyed.clone()).filter(!flag)?;
    let matched = phantom
        .persons
        .iter()
        .map(|c| Expr::Column(c.clone()).is_not_null())
        .reduce(Expr::or)
        .ok_or_else(|| internal("a LEFT JOIN with no person on its right"))?;
    let twin: Vec<Column> = (0..phantom.row.len())
        .map(|i| Column::from_name(format!("__left_out_{i}")))
        .collect();
    let out = of_cells(
        real.clone().filter(matched)?,
        cells(keyed.clone(), true)?,
        JoinType::LeftAnti,
    )?
    .project(
        phantom
            .row
            .iter()
            .zip(&twin)
            .map(|(r, t)| Expr::Column(r.clone()).alias(t.name())),
    )?
    .build()?;
    let by_row = |rows: LogicalPlanBuilder, join: JoinType| {
        rows.join_detailed(
            out.clone(),
            join,
            (phantom.row.clone(), twin.clone()),
            None,
            NullEquality::NullEqualsNothing,
        )
    };
    // A union keeps no qualifiers: both sides by position, then named back.
    let positional = |real: Option<bool>| -> Vec<Expr> {
        keyed
            .schema()
            .iter()
            .enumerate()
            .map(|(i, (q, f))| {
                let e = match real {
                    Some(real) if *f.name() == phantom.flag => lit(real),
                    _ => Expr::Column(Column::new(q.cloned(), f.name())),
                };
                e.alias(format!("__f{i}"))
            })
            .collect()
    };
    let named: Vec<Expr> = keyed
        .schema()
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            Expr::Column(Column::from_name(format!("__f{i}"))).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    let held = by_row(real, JoinType::LeftAnti)?
        .project(positional(None))?
        .union(
            by_row(phantoms.clone(), JoinType::LeftSemi)?
                .project(positional(Some(true)))?
                .build()?,
        )?
        .project(named.clone())?
        .build()?;
    let counted = LogicalPlanBuilder::from(held.clone())
        .project(positional(None))?
        .union(phantoms.project(positional(None))?.build()?)?
        .project(named)?
        .build()?;
    of_cells(
        LogicalPlanBuilder::from(held),
        cells(counted, false)?,
        JoinType::LeftSemi,
    )?
    .build()
}

/// The conditions one aggregate reads, each a boolean that is never NULL:
/// every `WHEN` of a `CASE` argument (`x IS TRUE`), or `x IS NOT NULL` for
/// an argument that can be NULL. `COUNT(*)` and a literal read none.
fn aggregate_conditions(e: &Expr, schema: &datafusion::common::DFSchema) -> Result<Vec<Expr>> {
    let e = match e {
        Expr::Alias(a) => a.expr.as_ref(),
        other => other,
    };
    let Expr::AggregateFunction(af) = e else {
        return Err(internal("an aggregation that is not an aggregate function"));
    };
    let [arg] = af.params.args.as_slice() else {
        return Ok(Vec::new());
    };
    match under_casts(arg) {
        Expr::Literal(..) => Ok(Vec::new()),
        Expr::Case(case) => Ok(case_conditions(case)),
        other if other.nullable(schema)? => Ok(vec![other.clone().is_not_null()]),
        _ => Ok(Vec::new()),
    }
}

/// The conditions of a CASE: whether each `WHEN` holds. Which branch a row
/// takes is a function of them, so their atoms split every branch.
fn case_conditions(case: &Case) -> Vec<Expr> {
    case.when_then_expr
        .iter()
        .map(|(when, _)| {
            is_true(match &case.expr {
                Some(base) => base.as_ref().clone().eq(when.as_ref().clone()),
                None => when.as_ref().clone(),
            })
        })
        .collect()
}

/// `x IS TRUE`, written as the engine runs it: planned as `IS TRUE`, its
/// nullability is worked out differently before and after physical
/// planning, and the engine refuses the plan.
fn is_true(x: Expr) -> Expr {
    binary_expr(x, Operator::IsNotDistinctFrom, lit(true))
}

fn under_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => under_casts(&c.expr),
        Expr::TryCast(c) => under_casts(&c.expr),
        other => other,
    }
}

fn internal(what: &str) -> DataFusionError {
    DataFusionError::Internal(what.into())
}
