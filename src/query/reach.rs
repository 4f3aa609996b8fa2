//! Under differential privacy, what one partner person can move through a
//! `LEFT JOIN` that keeps the caller's rows.
//!
//! Removing a partner person turns the caller rows it matched into
//! unmatched ones. A partner person is linked over the partner's own rows,
//! so its rows can carry several emails (tied by a shared phone, say),
//! each matching a different person of the caller's: removing it would
//! then move every one of them, while the noise is calibrated for one
//! matched person and the one caller person it leaves unmatched (two
//! units). So each partner person is joined to **one caller person at
//! most**: the first, in the caller's own numbering (which depends on the
//! caller's rows alone), among those its rows match; its rows that would
//! match another caller person are left out of the join, and the caller
//! rows they would have matched stay unmatched. Whether a partner person
//! is joined, and to whom, then depends on its own rows and the caller's
//! alone, and removing it moves at most its own unit and one caller
//! person's.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, UInt32Type};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, JoinType, ScalarValue};
use datafusion::logical_expr::{Expr, Join, LogicalPlan, LogicalPlanBuilder, in_list, lit};
use datafusion::prelude::SessionContext;

use super::check::deny;
use super::release::{leaf_tables, private_failure};
use super::{OWN_PERSON_COLUMN, QueryError, ROW_COLUMN, Violation};
use crate::policy::Policy;

/// A `LEFT JOIN` whose kept-NULL side is the partner's dataset, and the
/// columns that say who is joined to whom.
#[derive(Debug, Clone)]
pub(super) struct Reach {
    join: Join,
    caller_person: Column,
    partner_person: Column,
    partner_row: Column,
}

/// The `LEFT JOIN` of `input` that reaches the partner's data, if any.
/// Refused: more than one, or a partner side that is not one dataset.
pub(super) fn find(
    policy: &Policy,
    org: &str,
    input: &LogicalPlan,
) -> Result<Option<Reach>, Violation> {
    let owner = |qualifier: &str, tables: &std::collections::BTreeMap<String, String>| {
        tables
            .get(qualifier)
            .and_then(|t| policy.dataset(t))
            .map(|d| d.owner().to_string())
    };
    let mut joins = Vec::new();
    let _ = input.apply(|node| {
        if let LogicalPlan::Join(j) = node
            && j.join_type == JoinType::Left
        {
            let right = leaf_tables(&j.right);
            if right
                .keys()
                .any(|q| owner(q, &right).is_some_and(|o| o != org))
            {
                joins.push(j.clone());
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    let join = match joins.len() {
        0 => return Ok(None),
        1 => joins.remove(0),
        _ => {
            return Err(deny(
                "query.join",
                "under differential privacy a query may hold one LEFT JOIN that reaches the partner's data: join its other datasets in a query of their own",
            ));
        }
    };
    let one_dataset = || {
        deny(
            "query.join",
            "under differential privacy the partner's side of a LEFT JOIN is one of its datasets, not a join of several",
        )
    };
    let right_tables = leaf_tables(&join.right);
    let right_scan = match join.right.as_ref() {
        LogicalPlan::SubqueryAlias(a) => matches!(a.input.as_ref(), LogicalPlan::TableScan(_)),
        LogicalPlan::TableScan(_) => true,
        _ => false,
    };
    if !right_scan {
        return Err(one_dataset());
    }
    let left_tables = leaf_tables(&join.left);
    // A party's column `name`, preferring one on every row (the caller's
    // own LEFT JOINs leave some of its tables' columns NULL).
    let column_of = |schema: &datafusion::common::DFSchema, name: &str, caller: bool, tables| {
        let mut found: Vec<(bool, Column)> = schema
            .iter()
            .filter_map(|(q, f)| {
                let q = q?;
                let theirs = owner(&q.to_string(), tables)?;
                (f.name() == name && (theirs == org) == caller)
                    .then(|| (f.is_nullable(), Column::new(Some(q.clone()), name)))
            })
            .collect();
        found.sort_by_key(|(nullable, _)| *nullable);
        found.into_iter().next().map(|(_, c)| c)
    };
    let caller_person = column_of(join.left.schema(), OWN_PERSON_COLUMN, true, &left_tables);
    let partner_person = column_of(join.right.schema(), OWN_PERSON_COLUMN, false, &right_tables);
    let partner_row = column_of(join.right.schema(), ROW_COLUMN, false, &right_tables);
    match (caller_person, partner_person, partner_row) {
        (Some(caller_person), Some(partner_person), Some(partner_row)) => Ok(Some(Reach {
            join,
            caller_person,
            partner_person,
            partner_row,
        })),
        _ => Err(one_dataset()),
    }
}

/// `plan` with the partner rows of `reach`'s join that would join a second
/// caller person left out of it (see the module's notes).
pub(super) async fn one_caller_person_each(
    ctx: &SessionContext,
    plan: LogicalPlan,
    reach: &Reach,
) -> Result<LogicalPlan, QueryError> {
    let j = &reach.join;
    // Who is joined to whom: the matched pairs of the join as planned.
    let matched = Join::try_new(
        Arc::clone(&j.left),
        Arc::clone(&j.right),
        j.on.clone(),
        j.filter.clone(),
        JoinType::Inner,
        j.join_constraint,
        j.null_equality,
        false,
    )
    .map_err(private_failure)?;
    let pairs = LogicalPlanBuilder::from(LogicalPlan::Join(matched))
        .project(vec![
            Expr::Column(reach.caller_person.clone()),
            Expr::Column(reach.partner_person.clone()),
            Expr::Column(reach.partner_row.clone()),
        ])
        .and_then(LogicalPlanBuilder::build)
        .map_err(private_failure)?;
    let batches = super::collect(ctx, pairs).await.map_err(private_failure)?;
    let columns = |b: &arrow::record_batch::RecordBatch, i: usize| {
        arrow::compute::cast(b.column(i), &DataType::UInt32)
            .map(|a| a.as_primitive::<UInt32Type>().clone())
    };
    let mut first: HashMap<u32, u32> = HashMap::new();
    let mut all = Vec::new();
    for b in &batches {
        let (caller, partner, row) = (
            columns(b, 0).map_err(|_| QueryError::Engine("reach: caller".into()))?,
            columns(b, 1).map_err(|_| QueryError::Engine("reach: partner".into()))?,
            columns(b, 2).map_err(|_| QueryError::Engine("reach: row".into()))?,
        );
        for i in 0..b.num_rows() {
            if caller.is_null(i) || partner.is_null(i) || row.is_null(i) {
                continue;
            }
            let (c, p, r) = (caller.value(i), partner.value(i), row.value(i));
            first.entry(p).and_modify(|m| *m = (*m).min(c)).or_insert(c);
            all.push((c, p, r));
        }
    }
    let mut left_out: Vec<u32> = all
        .into_iter()
        .filter(|(c, p, _)| first.get(p) != Some(c))
        .map(|(_, _, r)| r)
        .collect();
    if left_out.is_empty() {
        return Ok(plan);
    }
    left_out.sort_unstable();
    left_out.dedup();
    let list: Vec<Expr> = left_out
        .into_iter()
        .map(|r| lit(ScalarValue::UInt32(Some(r))))
        .collect();
    let right = LogicalPlanBuilder::from(j.right.as_ref().clone())
        .filter(in_list(Expr::Column(reach.partner_row.clone()), list, true))
        .and_then(LogicalPlanBuilder::build)
        .map_err(private_failure)?;
    let capped = LogicalPlan::Join(
        Join::try_new(
            Arc::clone(&j.left),
            Arc::new(right),
            j.on.clone(),
            j.filter.clone(),
            JoinType::Left,
            j.join_constraint,
            j.null_equality,
            j.null_aware,
        )
        .map_err(private_failure)?,
    );
    let original = LogicalPlan::Join(j.clone());
    plan.transform_up(|node| {
        Ok(match node == original {
            true => Transformed::yes(capped.clone()),
            false => Transformed::no(node),
        })
    })
    .map(|t| t.data)
    .map_err(private_failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coalition agreement (two datasets a party) with differential
    /// privacy, every dataset empty.
    fn private_coalition() -> (Policy, Vec<super::super::TableData>) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = root.join("tests/policies/retail-coalition-demo.toml");
        let text = std::fs::read_to_string(&path).unwrap()
            + "\n[privacy]\nepsilon_total = 10.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7\nrefresh = \"monthly\"\nmax_groups_per_person = 1\n";
        let policy = crate::policy::parse_text(&text, &path).unwrap();
        let empty = vec![Vec::new(); policy.datasets().len()];
        let tables = super::super::agreement_tables(&policy, empty);
        (policy, tables)
    }

    async fn reach_of(sql: &str) -> Result<Option<Reach>, Violation> {
        let (policy, tables) = private_coalition();
        let (_, plan, _) = super::super::plan_and_check(&policy, "acme", &tables, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let input = super::super::release::find_aggregate(&plan)
            .unwrap()
            .input
            .as_ref();
        find(&policy, "acme", input)
    }

    #[tokio::test]
    async fn the_caller_person_is_read_from_a_table_on_every_row() {
        // orders keeps its rows; customers may be NULL beside them.
        let reach = reach_of(
            "SELECT COUNT(*) FROM orders o LEFT JOIN customers c ON o.email = c.email LEFT JOIN audience a ON o.email = a.email",
        )
        .await
        .unwrap()
        .expect("a LEFT JOIN to the partner's data");
        assert_eq!(reach.caller_person.flat_name(), "o.__own_person");
        assert_eq!(reach.partner_person.flat_name(), "a.__own_person");
        assert_eq!(reach.partner_row.flat_name(), "a.__row");
        // No LEFT JOIN to the partner: nothing to cap.
        let none =
            reach_of("SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email")
                .await
                .unwrap();
        assert!(none.is_none());
        // Two LEFT JOINs that reach the partner's data, or a partner side
        // that is a join: refused by rule, by the checker or here.
        let (policy, tables) = private_coalition();
        for sql in [
            "SELECT COUNT(*) FROM customers c LEFT JOIN audience a ON c.email = a.email LEFT JOIN clicks k ON c.email = k.email",
            "SELECT COUNT(*) FROM customers c LEFT JOIN (audience a JOIN clicks k ON a.email = k.email) ON c.email = a.email",
        ] {
            let rule = match super::super::plan_and_check(&policy, "acme", &tables, sql).await {
                Err(QueryError::Refused(v)) => v.rule,
                Ok((_, plan, _)) => {
                    let input = super::super::release::find_aggregate(&plan)
                        .unwrap()
                        .input
                        .as_ref();
                    find(&policy, "acme", input).unwrap_err().rule
                }
                Err(e) => panic!("{sql}: {e:?}"),
            };
            assert_eq!(rule, "query.join", "{sql}");
        }
    }
}
