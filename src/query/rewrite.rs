//! The minimum-group-size rewrite, applied to a checked plan.
//!
//! ```text
//! before:  Projection ... Aggregate: groupBy=[c.region], aggr=[avg(c.lifetime_value)]
//! after:   Projection ... Filter: __cleanroom_min_group(__people)
//!                           Aggregate: groupBy=[c.region],
//!                                      aggr=[avg(c.lifetime_value), count(DISTINCT c.__person) AS __people]
//! ```
//!
//! The filter sits directly on the aggregation, beneath HAVING, ORDER BY
//! and LIMIT, so the analyst's clauses only ever see groups that stand for
//! enough people. A query without GROUP BY has one group, filtered alike.
//! The filter function counts the groups it drops.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{Array, BooleanArray, Int64Array};
use arrow::datatypes::DataType;
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, Filter, LogicalPlan, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility, col, lit,
};

use super::PERSON_COLUMN;

const PEOPLE: &str = "__people";

/// Keeps groups of at least `min` people and counts the others.
#[derive(Debug)]
struct MinGroup {
    min: i64,
    dropped: Arc<AtomicU64>,
    signature: Signature,
}

impl PartialEq for MinGroup {
    fn eq(&self, other: &Self) -> bool {
        self.min == other.min && Arc::ptr_eq(&self.dropped, &other.dropped)
    }
}

impl Eq for MinGroup {}

impl Hash for MinGroup {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.min.hash(state);
        (Arc::as_ptr(&self.dropped) as usize).hash(state);
    }
}

impl ScalarUDFImpl for MinGroup {
    fn name(&self) -> &str {
        "__cleanroom_min_group"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [people] = args.args.as_slice() else {
            return Err(DataFusionError::Internal(
                "min group filter takes one argument".into(),
            ));
        };
        let people = people.to_array(args.number_rows)?;
        let people = people
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| DataFusionError::Internal("people count is not an Int64".into()))?;
        let keep: BooleanArray = people
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= self.min)))
            .collect();
        let dropped = keep.len() - keep.true_count();
        self.dropped.fetch_add(dropped as u64, Ordering::SeqCst);
        Ok(ColumnarValue::Array(Arc::new(keep)))
    }
}

/// The person column of the first table under the aggregation.
pub(super) fn person_column(input: &LogicalPlan) -> Result<Column> {
    input
        .schema()
        .iter()
        .find(|(_, f)| f.name() == PERSON_COLUMN)
        .map(|(q, _)| Column::new(q.cloned(), PERSON_COLUMN))
        .ok_or_else(|| DataFusionError::Internal("no person column under the aggregate".into()))
}

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

/// Adds the people count to the aggregation and drops groups under `min`
/// people; `dropped` counts them.
pub(super) fn enforce_min_group_size(
    plan: LogicalPlan,
    min: u32,
    dropped: Arc<AtomicU64>,
    counting: PeopleCount,
) -> Result<LogicalPlan> {
    let keep = Arc::new(ScalarUDF::new_from_impl(MinGroup {
        min: i64::from(min),
        dropped,
        signature: Signature::exact(vec![DataType::Int64], Volatility::Volatile),
    }));
    plan.transform_up(|node| match node {
        LogicalPlan::Aggregate(agg) => {
            let (args, distinct) = match counting {
                PeopleCount::Distinct => (vec![Expr::Column(person_column(&agg.input)?)], true),
                PeopleCount::Rows => (vec![lit(1i64)], false),
            };
            let people = Expr::AggregateFunction(AggregateFunction::new_udf(
                count_udaf(),
                args,
                distinct,
                None,
                vec![],
                None,
            ))
            .alias(PEOPLE);
            let mut aggr = agg.aggr_expr.clone();
            aggr.push(people);
            let counted = Aggregate::try_new(Arc::clone(&agg.input), agg.group_expr.clone(), aggr)?;
            let filter = Filter::try_new(
                keep.call(vec![col(PEOPLE)]),
                Arc::new(LogicalPlan::Aggregate(counted)),
            )?;
            Ok(Transformed::yes(LogicalPlan::Filter(filter)))
        }
        other => Ok(Transformed::yes(other.recompute_schema()?)),
    })
    .map(|t| t.data)
}
