//! The query checker: walks the logical plan DataFusion made of the
//! analyst's SQL, before anything runs, and accepts only the one shape a
//! governed aggregate has. Everything is allow-listed: a plan node,
//! expression or function the checker does not know is refused with the
//! name of the rule.
//!
//! ```text
//! [Limit] [Sort] Projection [Filter: HAVING]     above the release boundary
//! Aggregate(derived dimensions; aggregates)      exactly one
//! [Filter: WHERE over derived dimensions]
//! Join (inner, or left preserving the caller's   across parties' datasets
//!       own datasets; equi on identifiers of one kind)
//!   [SubqueryAlias] TableScan ...
//! ```
//!
//! Everything from the aggregate down runs on the parties' rows before the
//! minimum group size, so it is built of total expressions only ([`row`]):
//! no cast that can fail or narrow, no division by anything but a non-zero
//! literal, no function that can raise, dates kept within the years every
//! date function represents. Whatever is above the aggregate runs over the
//! released table only ([`super::release`]).
//!
//! Every column reference is resolved as the engine resolves it, by its
//! position in the input schema, to the dataset and column it reads; never
//! through names an alias could shadow.

use datafusion::common::{Column, DFSchema, JoinType};
use datafusion::logical_expr::{Expr, LogicalPlan, Operator};

mod expr;
mod row;
mod violation;

use expr::{
    conjuncts, constant, expression_refusal, join_rule, output_expr, total_cast, total_casts,
    unknown_column,
};
pub use violation::Violation;
pub(crate) use violation::deny;

use row::Place;

use super::{OWN_PERSON_COLUMN, PERSON_COLUMN, ROW_COLUMN};
use crate::policy::{Aggregate, ColumnRole, Policy};

/// What the checker learned about an accepted plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Datasets scanned, in plan order.
    pub datasets: Vec<String>,
    /// The aggregation's functions, in its order.
    pub aggregates: Vec<AggregateUse>,
}

/// One aggregate function of an accepted query.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateUse {
    pub kind: Aggregate,
    /// The role of its column; None for COUNT(*).
    pub role: Option<ColumnRole>,
}

/// Where one field of a plan node's output comes from: a dataset's column.
/// `None` for fields no dataset declares (the hidden person column).
type Sources = Vec<Option<Source>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    dataset: String,
    column: String,
}

/// The fields an expression may name: a node's input schema, and the
/// source of each of its fields, in the schema's order.
struct Scope<'s> {
    schema: &'s DFSchema,
    sources: &'s [Option<Source>],
}

struct Checker<'a> {
    policy: &'a Policy,
    /// The organisation asking: a LEFT JOIN may preserve its datasets only.
    org: &'a str,
    /// Datasets scanned, in plan order.
    scans: Vec<String>,
    /// The name each scanned input goes by in the query (alias or table).
    qualifiers: Vec<String>,
    aggregates: Vec<AggregateUse>,
}

/// Checks `plan`, asked by `org`, against the agreement. The plan comes
/// from the SQL planner and DataFusion's analyzer (types coerced, so every
/// implicit cast is visible), not optimised.
pub fn check(plan: &LogicalPlan, policy: &Policy, org: &str) -> Result<Checked, Violation> {
    let mut c = Checker {
        policy,
        org,
        scans: Vec::new(),
        qualifiers: Vec::new(),
        aggregates: Vec::new(),
    };
    c.above(plan)?;
    Ok(Checked {
        datasets: c.scans,
        aggregates: c.aggregates,
    })
}

fn statement_kind(plan: &LogicalPlan) -> Option<&'static str> {
    Some(match plan {
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => "EXPLAIN",
        LogicalPlan::Dml(_) => "data modification",
        LogicalPlan::Ddl(_) => "DDL",
        LogicalPlan::Statement(_) => "SET, PREPARE and transaction statements",
        LogicalPlan::Copy(_) => "COPY",
        LogicalPlan::DescribeTable(_) => "DESCRIBE",
        _ => return None,
    })
}

/// A refusal for a plan node out of place, named for the analyst.
fn node_refusal(plan: &LogicalPlan, place: &str) -> Violation {
    if let Some(kind) = statement_kind(plan) {
        return deny(
            "query.statement",
            format!("{kind} is not allowed; only SELECT queries run"),
        );
    }
    match plan {
        LogicalPlan::Union(_) => deny(
            "query.union",
            "UNION and other set operations are not allowed",
        ),
        LogicalPlan::Window(_) => deny("query.window", "window functions are not allowed"),
        LogicalPlan::Distinct(_) => deny(
            "query.distinct",
            "SELECT DISTINCT lists rows; use COUNT(DISTINCT ...) inside the aggregate",
        ),
        LogicalPlan::Subquery(_) | LogicalPlan::RecursiveQuery(_) => deny(
            "query.subquery",
            "subqueries and recursive queries are not allowed",
        ),
        // `customers c` is an alias of a table, not a subquery: what is
        // missing above it is the aggregate.
        LogicalPlan::SubqueryAlias(a) if matches!(a.input.as_ref(), LogicalPlan::TableScan(_)) => {
            deny(
                "query.aggregate",
                "every query aggregates: a GROUP BY query or aggregates without GROUP BY, over all its tables",
            )
        }
        LogicalPlan::SubqueryAlias(_) => deny(
            "query.subquery",
            "subqueries and common table expressions are not allowed",
        ),
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => deny(
            "query.tables",
            "queries read the agreement's datasets only, not literal rows",
        ),
        LogicalPlan::Unnest(_) | LogicalPlan::Extension(_) | LogicalPlan::Repartition(_) => deny(
            "query.shape",
            format!("this construct is not allowed {place}"),
        ),
        LogicalPlan::Aggregate(_) => deny("query.aggregate", "a query has exactly one aggregation"),
        LogicalPlan::Limit(_) | LogicalPlan::Sort(_) => deny(
            "query.order",
            "ORDER BY and LIMIT are allowed only on the aggregated result",
        ),
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::Join(_)
        | LogicalPlan::TableScan(_) => deny(
            "query.aggregate",
            "every query aggregates: a GROUP BY query or aggregates without GROUP BY, over all its tables",
        ),
        _ => deny(
            "query.shape",
            format!("this construct is not allowed {place}"),
        ),
    }
}

impl Checker<'_> {
    /// Nodes above the aggregate, down to it. They run over the released
    /// table only (see `release`), so any expression over its columns may
    /// appear; the checker still refuses what is not an expression over
    /// them (subqueries, window functions, aggregates of aggregates).
    fn above(&mut self, plan: &LogicalPlan) -> Result<(), Violation> {
        match plan {
            LogicalPlan::Limit(limit) => {
                for e in [&limit.skip, &limit.fetch].into_iter().flatten() {
                    output_expr(e)?;
                }
                self.above(&limit.input)
            }
            LogicalPlan::Sort(sort) => {
                for s in &sort.expr {
                    output_expr(&s.expr)?;
                }
                self.above(&sort.input)
            }
            LogicalPlan::Projection(p) => {
                for e in &p.expr {
                    output_expr(e)?;
                }
                self.above(&p.input)
            }
            LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)) => {
                output_expr(&f.predicate)?;
                self.above(&f.input)
            }
            LogicalPlan::Aggregate(agg) => {
                if agg.group_expr.is_empty() && agg.aggr_expr.is_empty() {
                    return Err(node_refusal(plan, "here"));
                }
                let sources = self.below(&agg.input)?;
                let scope = Scope {
                    schema: agg.input.schema(),
                    sources: &sources,
                };
                for g in &agg.group_expr {
                    self.row_expr(g, &scope, Place::GroupBy)?;
                }
                for a in &agg.aggr_expr {
                    let used = self.aggregate_expr(a, &scope)?;
                    self.aggregates.push(used);
                }
                self.parties()
            }
            other => Err(node_refusal(other, "above the aggregate")),
        }
    }

    /// Nodes beneath the aggregate: WHERE filters over one join tree.
    fn below(&mut self, plan: &LogicalPlan) -> Result<Sources, Violation> {
        match plan {
            LogicalPlan::Filter(f) => {
                let sources = self.below(&f.input)?;
                let scope = Scope {
                    schema: f.input.schema(),
                    sources: &sources,
                };
                self.row_expr(&f.predicate, &scope, Place::Where)?;
                Ok(sources)
            }
            LogicalPlan::Join(_) => self.join_tree(plan),
            LogicalPlan::TableScan(_) | LogicalPlan::SubqueryAlias(_) => {
                self.scan(plan)?;
                Err(deny(
                    "query.join",
                    "a query joins the datasets of at least two parties on an identifier",
                ))
            }
            other => Err(node_refusal(other, "beneath the aggregate")),
        }
    }

    fn join_tree(&mut self, plan: &LogicalPlan) -> Result<Sources, Violation> {
        match plan {
            LogicalPlan::Join(join) => {
                let first = self.scans.len();
                let left = self.join_tree(&join.left)?;
                let preserved = self.scans[first..].to_vec();
                let right = self.join_tree(&join.right)?;
                match join.join_type {
                    JoinType::Inner => {}
                    JoinType::Left => self.preserves_own(&preserved)?,
                    JoinType::Right => {
                        return Err(deny(
                            "query.join",
                            "RIGHT joins are not allowed; write a LEFT JOIN with your own dataset first",
                        ));
                    }
                    other => {
                        return Err(deny(
                            "query.join",
                            format!(
                                "{other} joins are not allowed; only inner joins and LEFT joins that keep your own rows"
                            ),
                        ));
                    }
                }
                let mut sources = left.clone();
                sources.extend(right.iter().cloned());
                if join.schema.fields().len() != sources.len() {
                    return Err(node_refusal(plan, "in a join"));
                }
                let (left_scope, right_scope, joined) = (
                    Scope {
                        schema: join.left.schema(),
                        sources: &left,
                    },
                    Scope {
                        schema: join.right.schema(),
                        sources: &right,
                    },
                    Scope {
                        schema: &join.schema,
                        sources: &sources,
                    },
                );
                let mut pairs: Vec<(&Expr, &Expr, &Scope<'_>, &Scope<'_>)> = Vec::new();
                for (l, r) in &join.on {
                    pairs.push((l, r, &left_scope, &right_scope));
                }
                if let Some(filter) = &join.filter {
                    for conjunct in conjuncts(filter) {
                        let Expr::BinaryExpr(b) = conjunct else {
                            return Err(join_rule());
                        };
                        if b.op != Operator::Eq {
                            return Err(join_rule());
                        }
                        pairs.push((&b.left, &b.right, &joined, &joined));
                    }
                }
                if pairs.is_empty() {
                    return Err(deny(
                        "query.join",
                        "cross joins are not allowed; join with ON on identifier columns",
                    ));
                }
                for (l, r, ls, rs) in pairs {
                    let (l, r) = (self.join_key(l, ls)?, self.join_key(r, rs)?);
                    let (lk, rk) = (self.identifier_kind(&l)?, self.identifier_kind(&r)?);
                    if lk != rk {
                        return Err(deny(
                            "query.join",
                            format!(
                                "{} ({lk}) and {} ({rk}) are identifiers of different kinds",
                                l.column, r.column
                            ),
                        ));
                    }
                    if l.dataset == r.dataset {
                        return Err(deny("query.join", "a dataset is joined with itself"));
                    }
                }
                Ok(sources)
            }
            LogicalPlan::TableScan(_) | LogicalPlan::SubqueryAlias(_) => self.scan(plan),
            other => Err(node_refusal(other, "in a join")),
        }
    }

    /// A LEFT JOIN keeps every row of its left side: only the caller's own
    /// datasets may be kept so, never another party's unmatched rows.
    fn preserves_own(&self, preserved: &[String]) -> Result<(), Violation> {
        for name in preserved {
            let owner = self.policy.dataset(name).map(|d| d.owner());
            if owner != Some(self.org) {
                return Err(deny(
                    "query.join",
                    format!(
                        "a LEFT JOIN keeps the unmatched rows of its left side, and {name} is not a dataset of {}; put your own dataset first",
                        self.org
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One side of a join condition: a column, under casts that cannot fail.
    fn join_key(&self, e: &Expr, scope: &Scope<'_>) -> Result<Source, Violation> {
        match e {
            Expr::Column(c) => self.resolve(c, scope).cloned(),
            Expr::Cast(c) => {
                total_cast(&c.expr, c.field.data_type(), scope)?;
                self.join_key(&c.expr, scope)
            }
            Expr::TryCast(c) => {
                total_cast(&c.expr, c.field.data_type(), scope)?;
                self.join_key(&c.expr, scope)
            }
            _ => Err(join_rule()),
        }
    }

    fn identifier_kind(&self, s: &Source) -> Result<String, Violation> {
        match self.role_of(s)? {
            ColumnRole::Identifier { kind } => Ok(kind.clone()),
            other => Err(deny(
                "query.join",
                format!(
                    "{} is a {} column; joins use identifier columns only",
                    s.column,
                    other.name()
                ),
            )),
        }
    }

    /// A table scan, possibly under an alias: every field's source.
    fn scan(&mut self, plan: &LogicalPlan) -> Result<Sources, Violation> {
        let (alias, inner) = match plan {
            LogicalPlan::SubqueryAlias(a) => (Some(a.alias.table().to_string()), a.input.as_ref()),
            other => (None, other),
        };
        let LogicalPlan::TableScan(scan) = inner else {
            return Err(node_refusal(plan, "in a join"));
        };
        if !scan.filters.is_empty() || scan.fetch.is_some() {
            return Err(node_refusal(plan, "in a join"));
        }
        let table = scan.table_name.table().to_string();
        if self.policy.dataset(&table).is_none() {
            return Err(deny(
                "query.tables",
                format!("{table} is not a dataset of this agreement"),
            ));
        }
        if self.scans.contains(&table) {
            return Err(deny(
                "query.join",
                format!("{table} appears twice; a dataset is joined with itself"),
            ));
        }
        let qualifier = alias.unwrap_or_else(|| table.clone());
        if self.qualifiers.contains(&qualifier) {
            return Err(deny(
                "query.alias",
                format!("{qualifier} names two inputs; give each dataset its own alias"),
            ));
        }
        self.qualifiers.push(qualifier);
        self.scans.push(table.clone());
        let sources =
            scan.projected_schema
                .fields()
                .iter()
                .map(|f| {
                    (![PERSON_COLUMN, OWN_PERSON_COLUMN, ROW_COLUMN].contains(&f.name().as_str()))
                        .then(|| Source {
                            dataset: table.clone(),
                            column: f.name().clone(),
                        })
                })
                .collect::<Vec<_>>();
        if plan.schema().fields().len() != sources.len() {
            return Err(node_refusal(plan, "in a join"));
        }
        Ok(sources)
    }

    /// The scanned datasets must belong to at least two parties.
    fn parties(&self) -> Result<(), Violation> {
        let mut owners: Vec<&str> = self
            .scans
            .iter()
            .filter_map(|d| self.policy.dataset(d).map(|d| d.owner()))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        if owners.len() < 2 {
            return Err(deny(
                "query.join",
                "a query joins the datasets of at least two parties on an identifier",
            ));
        }
        Ok(())
    }

    /// The dataset column a reference reads, found as the engine finds it:
    /// by its position in the input schema. A reference that more than one
    /// field answers to is refused.
    fn resolve<'s>(&self, c: &Column, scope: &Scope<'s>) -> Result<&'s Source, Violation> {
        let mut matches = scope
            .schema
            .iter()
            .enumerate()
            .filter(|(_, (q, f))| {
                f.name() == &c.name
                    && match (&c.relation, q) {
                        (Some(want), Some(have)) => want.resolved_eq(have),
                        (Some(_), None) => false,
                        (None, _) => true,
                    }
            })
            .map(|(i, _)| i);
        let (Some(i), None) = (matches.next(), matches.next()) else {
            return Err(unknown_column(&c.name));
        };
        scope
            .sources
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| unknown_column(&c.name))
    }

    fn role_of(&self, s: &Source) -> Result<&ColumnRole, Violation> {
        let column = self
            .policy
            .dataset(&s.dataset)
            .and_then(|d| d.column(&s.column))
            .ok_or_else(|| unknown_column(&s.column))?;
        if matches!(column.role(), ColumnRole::Sensitive) {
            return Err(deny(
                "column.sensitive",
                format!(
                    "{} is a sensitive attribute, barred from analysis",
                    s.column
                ),
            ));
        }
        Ok(column.role())
    }

    fn role(&self, c: &Column, scope: &Scope<'_>) -> Result<&ColumnRole, Violation> {
        let source = self.resolve(c, scope)?;
        self.role_of(source)
    }

    /// WHERE and GROUP BY: a derived dimension, built of total expressions
    /// ([`row`]) over dimensions and comparable metrics, never identifiers.
    /// Returns the columns it reads.
    fn row_expr(
        &self,
        e: &Expr,
        scope: &Scope<'_>,
        place: Place,
    ) -> Result<Vec<Source>, Violation> {
        row::RowCheck {
            checker: self,
            scope,
            place,
        }
        .expr(e)
    }

    /// One aggregate: an allowed function over a plain column of the right
    /// role, under casts that cannot fail.
    fn aggregate_expr(&self, e: &Expr, scope: &Scope<'_>) -> Result<AggregateUse, Violation> {
        let e = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        };
        let Expr::AggregateFunction(af) = e else {
            return Err(expression_refusal(e, "in the aggregation"));
        };
        let name = af.func.name().to_ascii_lowercase();
        let p = &af.params;
        let kind = match (name.as_str(), p.distinct) {
            ("count", false) => Aggregate::Count,
            ("count", true) => Aggregate::CountDistinct,
            ("sum", false) => Aggregate::Sum,
            ("avg", false) => Aggregate::Avg,
            ("sum" | "avg", true) => {
                return Err(deny(
                    "query.aggregates",
                    format!("{name}(DISTINCT ...) is not allowed"),
                ));
            }
            _ => return Err(self.function_not_allowed(&name)),
        };
        if !self.policy.query().aggregates().contains(&kind) {
            return Err(self.function_not_allowed(kind.as_str()));
        }
        if p.filter.is_some() || !p.order_by.is_empty() {
            return Err(deny(
                "query.aggregate_argument",
                format!("{name} takes a plain column: no FILTER or ORDER BY inside"),
            ));
        }
        let counted = AggregateUse { kind, role: None };
        match p.args.as_slice() {
            [] => Ok(counted),
            [Expr::Literal(..)] if kind == Aggregate::Count => Ok(counted),
            [arg] if matches!(total_casts(arg, scope)?, Expr::Case(_)) => {
                let case = total_casts(arg, scope)?;
                self.row_expr(case, scope, Place::Aggregate)?;
                Ok(AggregateUse {
                    kind,
                    role: Some(row::case_bounds(case)?),
                })
            }
            [arg] => {
                let Expr::Column(c) = total_casts(arg, scope)? else {
                    return Err(match expression_refusal(arg, "inside an aggregate") {
                        v if v.rule == "query.functions" => v,
                        _ => deny(
                            "query.aggregate_argument",
                            format!(
                                "{name} takes a plain column, not an expression (CASE and arithmetic can isolate one person)"
                            ),
                        ),
                    });
                };
                let role = self.role(c, scope)?;
                let used = AggregateUse {
                    kind,
                    role: Some(role.clone()),
                };
                match (kind, role) {
                    (Aggregate::Sum | Aggregate::Avg, ColumnRole::Metric { value_type, .. })
                        if value_type.is_temporal() =>
                    {
                        Err(deny(
                            "query.aggregate_argument",
                            format!(
                                "{name} does not apply to {} {}; group by DATE_TRUNC of it, or count",
                                value_type.as_str(),
                                c.name
                            ),
                        ))
                    }
                    (Aggregate::Sum | Aggregate::Avg, ColumnRole::Metric { .. }) => Ok(used),
                    (Aggregate::Sum | Aggregate::Avg, other) => Err(deny(
                        "query.aggregate_argument",
                        format!(
                            "{name} applies to metric columns; {} is a {} column",
                            c.name,
                            other.name()
                        ),
                    )),
                    (Aggregate::Count, ColumnRole::Identifier { .. }) => Err(deny(
                        "query.aggregate_argument",
                        format!(
                            "identifier {} may appear only in COUNT(DISTINCT ...)",
                            c.name
                        ),
                    )),
                    _ => Ok(used),
                }
            }
            _ => Err(deny(
                "query.aggregate_argument",
                format!("{name} takes one column"),
            )),
        }
    }

    fn function_not_allowed(&self, name: &str) -> Violation {
        deny(
            "query.aggregates",
            format!("{name} is not allowed in agreement {}", self.policy.id()),
        )
    }
}

#[cfg(test)]
mod tests;
