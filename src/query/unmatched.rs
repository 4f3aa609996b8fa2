//! The unmatched side of a LEFT JOIN under thresholds: phantom rows (a
//! matched row as if unmatched), which count the partner people behind
//! the caller's unmatched rows and stand in for matched rows of cells
//! left out ([`super::threshold`]).

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, JoinType, ScalarValue};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, lit};
use datafusion::prelude::SessionContext;

use super::{OWN_PERSON_COLUMN, PERSON_COLUMN, ROW_COLUMN};

/// `input` run once and held as a table, under the same qualified names.
pub(super) async fn materialised(ctx: &SessionContext, input: LogicalPlan) -> Result<LogicalPlan> {
    let names: Vec<(Option<datafusion::common::TableReference>, String)> = input
        .schema()
        .iter()
        .map(|(q, f)| (q.cloned(), f.name().clone()))
        .collect();
    let positional = Arc::new(arrow::datatypes::Schema::new(
        input
            .schema()
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                arrow::datatypes::Field::new(format!("__m{i}"), f.data_type().clone(), true)
            })
            .collect::<Vec<_>>(),
    ));
    let batches = super::collect(ctx, input).await?;
    let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(), Vec::new()];
    for (i, b) in batches.into_iter().enumerate() {
        partitions[i % 2].push(RecordBatch::try_new(
            Arc::clone(&positional),
            b.columns().to_vec(),
        )?);
    }
    let table = datafusion::datasource::MemTable::try_new(positional, partitions)?;
    let named: Vec<Expr> = names
        .into_iter()
        .enumerate()
        .map(|(i, (q, name))| {
            Expr::Column(Column::from_name(format!("__m{i}"))).alias_qualified(q, name)
        })
        .collect();
    LogicalPlanBuilder::scan(
        "__cleanroom_joined",
        datafusion::catalog::default_table_source::provider_as_source(Arc::new(table)),
        None,
    )?
    .project(named)?
    .build()
}

/// One LEFT JOIN's phantom rows: the flag that tells real rows from them,
/// and the person columns of the side they set to NULL, by party.
pub(super) struct Phantom {
    pub(super) flag: String,
    /// The row numbers of the tables joined, the same on a real row and
    /// its phantom.
    pub(super) row: Vec<Column>,
    /// The person columns of the side set to NULL.
    pub(super) persons: Vec<Column>,
    /// The person columns of the kept side, which a phantom keeps.
    pub(super) kept: Vec<Column>,
}

/// How many LEFT JOINs a plan holds.
pub(super) fn left_joins(plan: &LogicalPlan) -> usize {
    let mut n = 0;
    let _ = plan.apply(|node| {
        if matches!(node, LogicalPlan::Join(j) if j.join_type == JoinType::Left) {
            n += 1;
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    n
}

/// The join tree with every LEFT JOIN followed by its phantom rows: a copy
/// of each matched row with the kept-NULL side's columns set to NULL
/// (person columns and lower joins' flags kept), told apart by a flag
/// column. Phantom rows are made from real rows only, so a row has at most
/// one false flag.
pub(super) fn with_phantoms(plan: LogicalPlan, phantoms: &mut Vec<Phantom>) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::Join(join) if join.join_type == JoinType::Left => {
                let left_width = join.left.schema().fields().len();
                let flag = format!("__real_{}", phantoms.len());
                let node = LogicalPlan::Join(join);
                let schema = Arc::clone(node.schema());
                let is_flag = |name: &str| name.starts_with("__real_");
                // The row numbers of the tables joined name a joined row, and
                // a phantom keeps them: so it knows its twin.
                let row: Vec<Column> = schema
                    .iter()
                    .filter(|(_, f)| f.name() == ROW_COLUMN)
                    .map(|(q, f)| Column::new(q.cloned(), f.name()))
                    .collect();
                let mut real = Vec::new();
                let mut phantom = Vec::new();
                let mut persons = Vec::new();
                let mut kept = Vec::new();
                let mut matched: Vec<Expr> = Vec::new();
                for (i, (q, f)) in schema.iter().enumerate() {
                    let column = Column::new(q.cloned(), f.name());
                    let position = format!("__f{i}");
                    real.push(Expr::Column(column.clone()).alias(&position));
                    let person =
                        [PERSON_COLUMN, OWN_PERSON_COLUMN, ROW_COLUMN].contains(&f.name().as_str());
                    let nulled = i >= left_width && !person && !is_flag(f.name());
                    if nulled {
                        let null = ScalarValue::try_from(f.data_type())?;
                        phantom.push(Expr::Literal(null, None).alias(&position));
                    } else {
                        phantom.push(Expr::Column(column.clone()).alias(&position));
                    }
                    if i >= left_width && f.name() == OWN_PERSON_COLUMN {
                        matched.push(Expr::Column(column.clone()).is_not_null());
                        persons.push(column);
                    } else if f.name() == OWN_PERSON_COLUMN {
                        kept.push(column);
                    } else if f.name().starts_with("__real_") {
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
                phantoms.push(Phantom {
                    flag,
                    row,
                    persons,
                    kept,
                });
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
pub(super) fn only_real_rows(e: &Expr, real: &Expr) -> Result<Expr> {
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

fn internal(what: &str) -> DataFusionError {
    DataFusionError::Internal(what.into())
}
