//! The minimum group size under thresholds only: whom a released row
//! stands for, counted per party and per cell.
//!
//! A released row is a function of every party's data it reads, so it is
//! kept only when, for **each party** whose dataset the query scans, at
//! least `min_group_size` of that party's people stand behind it; and not
//! only behind the row as a whole but behind every **cell** of it. The
//! aggregates of a row read subsets of its group's rows (a branch of a
//! `CASE` inside an aggregate, the rows where the aggregated column is not
//! NULL); two such subsets can differ by one person, and the difference of
//! two released values then describes that person. So the cells are the
//! *atoms* of every condition the row's aggregates read: the rows that
//! agree on the truth of each one (for conditions `x` and `y`: `x AND y`,
//! `x AND NOT y`, `NOT x AND y`, `NOT x AND NOT y`). Every released value
//! is a sum over whole atoms, and so is every difference of two of them.
//! An atom no row falls in adds nothing to any value; every other atom
//! must stand for `min_group_size` people of each party, or the row is
//! held back. At most [`MAX_CONDITIONS`] conditions (32 atoms) per query.
//!
//! Who counts for a party:
//!
//! - its people with rows in the atom (`A`), and
//! - under a `LEFT JOIN` that keeps the caller's rows, for the party on
//!   the join's other side: its people *matched* to caller rows that would
//!   fall in the atom were they unmatched (`B`). Which caller rows go
//!   unmatched is the partner's data too: a group of unmatched rows is a
//!   function of who is missing from it. `B` is counted on "phantom"
//!   copies of the matched rows with the other side's columns set to NULL,
//!   flowing through the same WHERE, GROUP BY and conditions as the real
//!   rows. Phantom rows never reach an aggregate the analyst wrote.
//!
//! A party's count is the larger of `A` and `B` (each `B` when several
//! LEFT JOINs bring its data): never more than the people the atom depends
//! on. The caller's own padding rows never match, so they count for the
//! caller only.
//!
//! ```text
//! Projection: G, aggs
//!   Filter: some atom holds a real row, and for every atom t holding one,
//!           every party p: A(p, t) >= min OR B(p, t) >= min
//!     Aggregate: groupBy=[G],
//!                aggr=[aggs FILTER (real rows),
//!                      count(*) FILTER (real rows AND t)                     rows of t
//!                      count(DISTINCT person_p) FILTER (real rows AND t)     A(p, t)
//!                      count(DISTINCT person_p) FILTER (NOT real_k AND t)]   B(p, t)
//!       [Filter: WHERE] ...
//!         Projection: original names, real_k               one per LEFT JOIN k
//!           Union: [join, real_k = true]
//!                  [join with its other side NULL (persons kept), real_k = false]
//!                     for the matched rows only
//! ```
//!
//! Inner joins alone need no phantom rows, and every row's person columns
//! are then equal (rows joined on equal fingerprints are one person), so a
//! single count per atom serves every party.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, JoinType, ScalarValue};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::expr::{AggregateFunction, Case};
use datafusion::logical_expr::{
    Aggregate, Expr, ExprSchemable, Filter, LogicalPlan, LogicalPlanBuilder, Operator, binary_expr,
    lit,
};
use datafusion::prelude::SessionContext;

use super::release::{PeopleCount, private_failure};
use super::{PERSON_COLUMN, QueryError, Violation};

/// Most distinct conditions the aggregates of one query may read under
/// thresholds: each doubles the atoms every group is checked on.
pub(super) const MAX_CONDITIONS: usize = 5;

/// Who owns a dataset, by its name.
pub(super) type Owners<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The private stage under thresholds only: the analyst's aggregation,
/// keeping the groups whose every atom stands for at least `min` people of
/// every party. How many were held back is not counted: it is not
/// released.
pub(super) async fn threshold_stage(
    ctx: &SessionContext,
    agg: &Aggregate,
    owners: Owners<'_>,
    min: u32,
    counting: PeopleCount,
) -> Result<Vec<RecordBatch>, QueryError> {
    let plan = threshold_plan(agg, owners, min, counting)?;
    ctx.execute_logical_plan(plan)
        .await
        .map_err(private_failure)?
        .collect()
        .await
        .map_err(private_failure)
}

/// One LEFT JOIN's phantom rows: the flag that tells real rows from them,
/// and the person columns of the side they set to NULL, by party.
struct Phantom {
    flag: String,
    persons: Vec<Column>,
}

/// The conditions of a query's aggregates, refused past
/// [`MAX_CONDITIONS`]. Depends on the plan only, never on data.
fn conditions_of(agg: &Aggregate) -> Result<Vec<Expr>, QueryError> {
    let schema = agg.input.schema();
    let mut conditions: Vec<Expr> = Vec::new();
    for a in &agg.aggr_expr {
        for c in aggregate_conditions(a, schema).map_err(private_failure)? {
            if !conditions.contains(&c) {
                conditions.push(c);
            }
        }
    }
    if conditions.len() > MAX_CONDITIONS {
        return Err(QueryError::Refused(Violation {
            policy: true,
            rule: "query.aggregate_argument",
            detail: format!(
                "under thresholds the aggregates of one query may read at most {MAX_CONDITIONS} conditions (CASE conditions and columns that can be NULL); split the query"
            ),
        }));
    }
    Ok(conditions)
}

/// The atoms of `conditions`: one conjunction per combination of their
/// truth values (`TRUE` alone for none).
fn atoms(conditions: &[Expr]) -> Vec<Expr> {
    let mut out = vec![lit(true)];
    for c in conditions {
        out = out
            .into_iter()
            .flat_map(|a| [a.clone().and(c.clone()), a.and(!c.clone())])
            .collect();
    }
    out
}

pub(super) fn threshold_plan(
    agg: &Aggregate,
    owners: Owners<'_>,
    min: u32,
    counting: PeopleCount,
) -> Result<LogicalPlan, QueryError> {
    let atoms = atoms(&conditions_of(agg)?);
    build(agg, owners, min, counting, &atoms).map_err(private_failure)
}

fn build(
    agg: &Aggregate,
    owners: Owners<'_>,
    min: u32,
    counting: PeopleCount,
    atoms: &[Expr],
) -> Result<LogicalPlan> {
    let tables = leaf_tables(&agg.input);
    let owner_of = |c: &Column| -> Result<String> {
        let table = c
            .relation
            .as_ref()
            .and_then(|q| tables.get(&q.to_string()))
            .ok_or_else(|| internal("a person column of no scanned table"))?;
        owners(table).ok_or_else(|| internal("a scanned table no party owns"))
    };
    let mut phantoms = Vec::new();
    let input = with_phantoms(agg.input.as_ref().clone(), &mut phantoms)?;
    let schema = Arc::clone(input.schema());

    // Each party's person, from whichever of its tables a row holds (they
    // agree where several do).
    let mut persons: BTreeMap<String, Vec<Expr>> = BTreeMap::new();
    for (q, f) in schema.iter() {
        if f.name() == PERSON_COLUMN {
            let c = Column::new(q.cloned(), PERSON_COLUMN);
            persons
                .entry(owner_of(&c)?)
                .or_default()
                .push(Expr::Column(c));
        }
    }
    let person_of = |columns: &[Expr]| match columns {
        [one] => one.clone(),
        many => coalesce(many.to_vec()),
    };
    let real = phantoms
        .iter()
        .map(|p| Expr::Column(Column::from_name(&p.flag)))
        .reduce(Expr::and);
    let real_and = |atom: &Expr| match &real {
        Some(r) => r.clone().and(atom.clone()),
        None => atom.clone(),
    };

    let distinct = counting == PeopleCount::Distinct;
    let count = |arg: Expr, distinct: bool, filter: Expr| {
        Expr::AggregateFunction(AggregateFunction::new_udf(
            count_udaf(),
            vec![arg],
            distinct,
            Some(Box::new(filter)),
            vec![],
            None,
        ))
    };
    let mut counts: Vec<Expr> = Vec::new();
    let mut named = |e: Expr| {
        let name = format!("__people_{}", counts.len());
        counts.push(e.alias(&name));
        Expr::Column(Column::from_name(name))
    };
    let at_least = |e: Expr| e.gt_eq(lit(i64::from(min)));
    // Without phantom rows every person column of a row is the same person.
    let parties: Vec<(&String, &Vec<Expr>)> = if phantoms.is_empty() {
        persons.iter().take(1).collect()
    } else {
        persons.iter().collect()
    };
    let mut held: Vec<Expr> = Vec::new();
    let mut present: Vec<Expr> = Vec::new();
    for atom in atoms {
        let rows = named(count(lit(1i64), false, real_and(atom)));
        present.push(rows.clone().gt(lit(0i64)));
        let mut enough: Vec<Expr> = Vec::new();
        for (party, columns) in &parties {
            let mut party_enough =
                at_least(named(count(person_of(columns), distinct, real_and(atom))));
            for phantom in &phantoms {
                let mut theirs: Vec<Expr> = Vec::new();
                for c in &phantom.persons {
                    if owner_of(c)? == **party {
                        theirs.push(Expr::Column(c.clone()));
                    }
                }
                if theirs.is_empty() {
                    continue;
                }
                let unmatched = !Expr::Column(Column::from_name(&phantom.flag));
                party_enough = party_enough.or(at_least(named(count(
                    person_of(&theirs),
                    distinct,
                    unmatched.and(atom.clone()),
                ))));
            }
            enough.push(party_enough);
        }
        let enough = enough
            .into_iter()
            .reduce(Expr::and)
            .ok_or_else(|| internal("no party in the query"))?;
        held.push(rows.eq(lit(0i64)).or(enough));
    }

    let mut aggr: Vec<Expr> = match &real {
        None => agg.aggr_expr.clone(),
        Some(real) => agg
            .aggr_expr
            .iter()
            .map(|a| only_real_rows(a, real))
            .collect::<Result<_>>()?,
    };
    aggr.extend(counts);
    let counted = Aggregate::try_new(Arc::new(input), agg.group_expr.clone(), aggr)?;
    let output: Vec<Expr> = counted
        .schema
        .iter()
        .take(agg.schema.fields().len())
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    let some_real_row = present
        .into_iter()
        .reduce(Expr::or)
        .ok_or_else(|| internal("no atom"))?;
    let predicate = held.into_iter().fold(some_real_row, Expr::and);
    let filter = Filter::try_new(predicate, Arc::new(LogicalPlan::Aggregate(counted)))?;
    LogicalPlanBuilder::from(LogicalPlan::Filter(filter))
        .project(output)?
        .build()
}

/// The dataset each input of the join tree reads, by the name the query
/// gives it (alias or table).
fn leaf_tables(plan: &LogicalPlan) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let _ = plan.apply(|node| {
        match node {
            LogicalPlan::SubqueryAlias(a) => {
                if let LogicalPlan::TableScan(scan) = a.input.as_ref() {
                    out.insert(a.alias.to_string(), scan.table_name.table().to_string());
                }
            }
            LogicalPlan::TableScan(scan) => {
                out.entry(scan.table_name.to_string())
                    .or_insert_with(|| scan.table_name.table().to_string());
            }
            _ => {}
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    out
}

/// The join tree with every LEFT JOIN followed by its phantom rows: a copy
/// of each matched row with the kept-NULL side's columns set to NULL
/// (person columns and lower joins' flags kept), told apart by a flag
/// column. Phantom rows are made from real rows only, so a row has at most
/// one false flag.
fn with_phantoms(plan: LogicalPlan, phantoms: &mut Vec<Phantom>) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::Join(join) if join.join_type == JoinType::Left => {
                let left_width = join.left.schema().fields().len();
                let flag = format!("__real_{}", phantoms.len());
                let node = LogicalPlan::Join(join);
                let schema = Arc::clone(node.schema());
                let is_flag = |name: &str| name.starts_with("__real_");
                let mut real = Vec::new();
                let mut phantom = Vec::new();
                let mut persons = Vec::new();
                let mut matched: Vec<Expr> = Vec::new();
                for (i, (q, f)) in schema.iter().enumerate() {
                    let column = Column::new(q.cloned(), f.name());
                    let position = format!("__f{i}");
                    real.push(Expr::Column(column.clone()).alias(&position));
                    let nulled = i >= left_width && f.name() != PERSON_COLUMN && !is_flag(f.name());
                    if nulled {
                        let null = ScalarValue::try_from(f.data_type())?;
                        phantom.push(Expr::Literal(null, None).alias(&position));
                    } else {
                        phantom.push(Expr::Column(column.clone()).alias(&position));
                    }
                    if i >= left_width && f.name() == PERSON_COLUMN {
                        matched.push(Expr::Column(column.clone()).is_not_null());
                        persons.push(column);
                    } else if is_flag(f.name()) {
                        // Phantoms of real rows only.
                        matched.push(Expr::Column(column));
                    }
                }
                real.push(lit(true).alias(&flag));
                phantom.push(lit(false).alias(&flag));
                let only_matched = matched
                    .into_iter()
                    .reduce(Expr::and)
                    .ok_or_else(|| internal("a LEFT JOIN with nothing on its right"))?;
                let real_rows = LogicalPlanBuilder::from(node.clone())
                    .project(real)?
                    .build()?;
                let phantom_rows = LogicalPlanBuilder::from(node)
                    .filter(only_matched)?
                    .project(phantom)?
                    .build()?;
                let mut named: Vec<Expr> = schema
                    .iter()
                    .enumerate()
                    .map(|(i, (q, f))| {
                        Expr::Column(Column::from_name(format!("__f{i}")))
                            .alias_qualified(q.cloned(), f.name())
                    })
                    .collect();
                named.push(Expr::Column(Column::from_name(&flag)));
                phantoms.push(Phantom { flag, persons });
                let rows = LogicalPlanBuilder::from(real_rows)
                    .union(phantom_rows)?
                    .project(named)?
                    .build()?;
                Ok(Transformed::yes(rows))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data)
}

/// An aggregate of the analyst's, over real rows only.
fn only_real_rows(e: &Expr, real: &Expr) -> Result<Expr> {
    match e {
        Expr::Alias(a) => {
            Ok(only_real_rows(&a.expr, real)?.alias_qualified(a.relation.clone(), &a.name))
        }
        Expr::AggregateFunction(af) => {
            let mut af = af.clone();
            af.params.filter = Some(Box::new(real.clone()));
            Ok(Expr::AggregateFunction(af))
        }
        _ => Err(internal("an aggregation that is not an aggregate function")),
    }
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
