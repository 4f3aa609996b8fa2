//! The release boundary: a query runs in two stages, and only the first
//! touches the parties' rows.
//!
//! ```text
//! analyst's plan:  [Limit] [Sort] Projection [Filter: HAVING]  Aggregate(G; aggs)  rows
//!
//! private stage:   Aggregate(G; aggs, people)  rows               total expressions only
//!                  -> cells of at least min_group_size people     (thresholds, [`super::threshold`]), or
//!                  -> bounding, noise, noisy threshold            (privacy::Plan)
//!                  = the released table
//! public stage:    [Limit] [Sort] Projection [Filter: HAVING]  scan(released table)
//! ```
//!
//! The aggregate node of the analyst's plan is replaced by a scan of the
//! released table, so HAVING, ORDER BY, LIMIT and arithmetic over
//! aggregates never see a group that was not released: not its values,
//! not its failures. A failure of the private stage is our bug (the checker
//! admits only total expressions there); a failure of the public stage
//! depends on released values alone.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;

use super::{QueryError, engine_failure};

const RELEASED_TABLE: &str = "__cleanroom_released";

/// How the people behind a group are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PeopleCount {
    /// `COUNT(DISTINCT person)`: always right.
    Distinct,
    /// `COUNT(*)`: equal to the distinct count, and far cheaper, when every
    /// joined table holds at most one row per person. Rows joined on equal
    /// fingerprints belong to one person, so each person then yields at
    /// most one joined row.
    Rows,
}

/// The analyst's aggregation: the one node the checker admits between the
/// public and the private stage.
pub(super) fn find_aggregate(plan: &LogicalPlan) -> Option<&Aggregate> {
    match plan {
        LogicalPlan::Aggregate(a) => Some(a),
        other => other.inputs().first().and_then(|p| find_aggregate(p)),
    }
}

/// A failure beneath the boundary: past the memory limit, or our bug,
/// reported by kind only.
pub(super) fn private_failure(e: DataFusionError) -> QueryError {
    memory_limit(&e).unwrap_or_else(|| QueryError::Engine(engine_failure(&e)))
}

/// The engine ran out of the memory a query may use.
fn memory_limit(e: &DataFusionError) -> Option<QueryError> {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)).then(|| QueryError::Limit {
        rule: "query.memory",
        detail:
            "the query needed more memory than the server allows one query (max_query_memory_bytes)"
                .into(),
    })
}

/// The public stage: the analyst's plan with its aggregation replaced by a
/// scan of `released`, whose columns are the aggregation's, in its order
/// and of its types.
pub(super) async fn public_stage(
    ctx: &SessionContext,
    plan: LogicalPlan,
    agg: &Aggregate,
    released: Vec<RecordBatch>,
) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
    let rest = above_released(plan, agg, released).map_err(private_failure)?;
    // Over released rows alone: on the server.
    let df = super::on_this_machine(ctx)
        .execute_logical_plan(rest)
        .await
        .map_err(public_failure)?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(public_failure)?;
    super::for_caller(&schema, batches).map_err(|e| private_failure(e.into()))
}

/// A failure above the boundary: it depends on released values only
/// (a division by zero in HAVING, say), so the analyst may learn of it.
fn public_failure(e: DataFusionError) -> QueryError {
    if let Some(limit) = memory_limit(&e) {
        return limit;
    }
    tracing::info!(kind = %engine_failure(&e), "an expression over released rows failed");
    QueryError::Output
}

fn above_released(
    plan: LogicalPlan,
    agg: &Aggregate,
    released: Vec<RecordBatch>,
) -> Result<LogicalPlan> {
    // Positional names: the aggregation's own names may repeat or clash.
    let schema: SchemaRef = Arc::new(Schema::new(
        agg.schema
            .fields()
            .iter()
            .enumerate()
            .map(|(j, f)| Field::new(format!("__released_{j}"), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batches = released
        .into_iter()
        .map(|b| RecordBatch::try_new(Arc::clone(&schema), b.columns().to_vec()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let provider = MemTable::try_new(Arc::clone(&schema), vec![batches])?;
    let projection: Vec<Expr> = agg
        .schema
        .iter()
        .enumerate()
        .map(|(j, (q, f))| {
            Expr::Column(Column::new(
                Some(TableReference::bare(RELEASED_TABLE)),
                format!("__released_{j}"),
            ))
            .alias_qualified(q.cloned(), f.name())
        })
        .collect();
    let replacement =
        LogicalPlanBuilder::scan(RELEASED_TABLE, provider_as_source(Arc::new(provider)), None)?
            .project(projection)?
            .build()?;
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::Aggregate(_) => Ok(Transformed::yes(replacement.clone())),
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data)
}

/// The dataset each input of the join tree reads, by the name the query
/// gives it (alias or table).
pub(super) fn leaf_tables(plan: &LogicalPlan) -> BTreeMap<String, String> {
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
