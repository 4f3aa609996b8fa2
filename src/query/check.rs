//! The query checker: walks the logical plan DataFusion made of the
//! analyst's SQL, before anything runs, and accepts only the one shape a
//! governed aggregate has. Everything is allow-listed: a plan node,
//! expression or function the checker does not know is refused with the
//! name of the rule.
//!
//! ```text
//! [Limit] [Sort] Projection [Filter: HAVING]     only above the aggregate
//! Aggregate                                      exactly one
//! [Filter: WHERE on dimensions]
//! Join (inner, equi on identifiers of one kind)  across parties' datasets
//!   [SubqueryAlias] TableScan ...
//! ```

use std::collections::HashMap;

use datafusion::common::{Column, JoinType};
use datafusion::logical_expr::{Expr, LogicalPlan, Operator};

use crate::policy::{Aggregate, ColumnRole, Policy};

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// True for a policy refusal (PERMISSION_DENIED), false for malformed
    /// SQL (INVALID_ARGUMENT).
    pub policy: bool,
    pub rule: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rule {}: {}", self.rule, self.detail)
    }
}

pub(crate) fn deny(rule: &'static str, detail: impl Into<String>) -> Violation {
    Violation {
        policy: true,
        rule,
        detail: detail.into(),
    }
}

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

struct Checker<'a> {
    policy: &'a Policy,
    /// Qualifier in the plan (alias or table name) -> dataset name.
    tables: HashMap<String, String>,
    scans: Vec<String>,
    aggregates: Vec<AggregateUse>,
}

/// Checks `plan` against the agreement. The plan must come straight from the
/// SQL planner (not analysed or optimised).
pub fn check(plan: &LogicalPlan, policy: &Policy) -> Result<Checked, Violation> {
    let mut c = Checker {
        policy,
        tables: HashMap::new(),
        scans: Vec::new(),
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
    /// Nodes above the aggregate, down to it.
    fn above(&mut self, plan: &LogicalPlan) -> Result<(), Violation> {
        match plan {
            LogicalPlan::Limit(limit) => {
                for e in [&limit.skip, &limit.fetch].into_iter().flatten() {
                    self.output_expr(e)?;
                }
                self.above(&limit.input)
            }
            LogicalPlan::Sort(sort) => {
                for s in &sort.expr {
                    self.output_expr(&s.expr)?;
                }
                self.above(&sort.input)
            }
            LogicalPlan::Projection(p) => {
                for e in &p.expr {
                    self.output_expr(e)?;
                }
                self.above(&p.input)
            }
            LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)) => {
                self.output_expr(&f.predicate)?;
                self.above(&f.input)
            }
            LogicalPlan::Aggregate(agg) => {
                if agg.group_expr.is_empty() && agg.aggr_expr.is_empty() {
                    return Err(node_refusal(plan, "here"));
                }
                self.below(&agg.input)?;
                for g in &agg.group_expr {
                    self.group_expr(g)?;
                }
                for a in &agg.aggr_expr {
                    let used = self.aggregate_expr(a)?;
                    self.aggregates.push(used);
                }
                self.parties()
            }
            other => Err(node_refusal(other, "above the aggregate")),
        }
    }

    /// Nodes beneath the aggregate: WHERE filters over one join tree.
    fn below(&mut self, plan: &LogicalPlan) -> Result<(), Violation> {
        match plan {
            LogicalPlan::Filter(f) => {
                self.below(&f.input)?;
                self.filter_expr(&f.predicate)
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

    fn join_tree(&mut self, plan: &LogicalPlan) -> Result<(), Violation> {
        match plan {
            LogicalPlan::Join(join) => {
                self.join_tree(&join.left)?;
                self.join_tree(&join.right)?;
                if join.join_type != JoinType::Inner {
                    return Err(deny(
                        "query.join",
                        format!("{} joins are not allowed; only inner joins", join.join_type),
                    ));
                }
                let mut pairs: Vec<(Column, Column)> = Vec::new();
                for (l, r) in &join.on {
                    pairs.push(self.join_pair(l, r)?);
                }
                if let Some(filter) = &join.filter {
                    for conjunct in conjuncts(filter) {
                        let Expr::BinaryExpr(b) = conjunct else {
                            return Err(join_rule());
                        };
                        if b.op != Operator::Eq {
                            return Err(join_rule());
                        }
                        pairs.push(self.join_pair(&b.left, &b.right)?);
                    }
                }
                if pairs.is_empty() {
                    return Err(deny(
                        "query.join",
                        "cross joins are not allowed; join with ON on identifier columns",
                    ));
                }
                for (l, r) in &pairs {
                    let (lk, rk) = (self.identifier_kind(l)?, self.identifier_kind(r)?);
                    if lk != rk {
                        return Err(deny(
                            "query.join",
                            format!(
                                "{} ({lk}) and {} ({rk}) are identifiers of different kinds",
                                l.name, r.name
                            ),
                        ));
                    }
                    if self.dataset_of(l)? == self.dataset_of(r)? {
                        return Err(deny("query.join", "a dataset is joined with itself"));
                    }
                }
                Ok(())
            }
            LogicalPlan::TableScan(_) | LogicalPlan::SubqueryAlias(_) => self.scan(plan),
            other => Err(node_refusal(other, "in a join")),
        }
    }

    fn join_pair(&self, l: &Expr, r: &Expr) -> Result<(Column, Column), Violation> {
        match (strip_cast(l), strip_cast(r)) {
            (Expr::Column(a), Expr::Column(b)) => Ok((a.clone(), b.clone())),
            _ => Err(join_rule()),
        }
    }

    fn identifier_kind(&self, c: &Column) -> Result<String, Violation> {
        match self.role(c)? {
            ColumnRole::Identifier { kind } => Ok(kind.clone()),
            other => Err(deny(
                "query.join",
                format!(
                    "{} is a {} column; joins use identifier columns only",
                    c.name,
                    other.name()
                ),
            )),
        }
    }

    /// A table scan, possibly under an alias.
    fn scan(&mut self, plan: &LogicalPlan) -> Result<(), Violation> {
        let (alias, inner) = match plan {
            LogicalPlan::SubqueryAlias(a) => (Some(a.alias.table().to_string()), a.input.as_ref()),
            other => (None, other),
        };
        let LogicalPlan::TableScan(scan) = inner else {
            return Err(node_refusal(plan, "in a join"));
        };
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
        self.tables.insert(table.clone(), table.clone());
        if let Some(alias) = alias {
            self.tables.insert(alias, table.clone());
        }
        self.scans.push(table);
        Ok(())
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

    fn dataset_of(&self, c: &Column) -> Result<String, Violation> {
        if let Some(q) = &c.relation {
            return self
                .tables
                .get(q.table())
                .cloned()
                .ok_or_else(|| unknown_column(&c.name));
        }
        let mut found = self.scans.iter().filter(|d| {
            self.policy
                .dataset(d)
                .is_some_and(|ds| ds.column(&c.name).is_some())
        });
        match (found.next(), found.next()) {
            (Some(d), None) => Ok(d.clone()),
            _ => Err(unknown_column(&c.name)),
        }
    }

    fn role(&self, c: &Column) -> Result<&ColumnRole, Violation> {
        let dataset = self.dataset_of(c)?;
        let column = self
            .policy
            .dataset(&dataset)
            .and_then(|d| d.column(&c.name))
            .ok_or_else(|| unknown_column(&c.name))?;
        if matches!(column.role(), ColumnRole::Sensitive) {
            return Err(deny(
                "column.sensitive",
                format!("{} is a sensitive attribute, barred from analysis", c.name),
            ));
        }
        Ok(column.role())
    }

    /// WHERE: dimension columns, literals, comparisons and logic.
    fn filter_expr(&self, e: &Expr) -> Result<(), Violation> {
        match e {
            Expr::Column(c) => match self.role(c)? {
                ColumnRole::Dimension { .. } => Ok(()),
                other => Err(deny(
                    "query.filter",
                    format!(
                        "{} is a {} column; filters use dimension columns only",
                        c.name,
                        other.name()
                    ),
                )),
            },
            Expr::Literal(..) => Ok(()),
            Expr::BinaryExpr(b) if is_comparison_or_logic(b.op) => {
                self.filter_expr(&b.left)?;
                self.filter_expr(&b.right)
            }
            Expr::Not(x) | Expr::IsNull(x) | Expr::IsNotNull(x) => self.filter_expr(x),
            Expr::Cast(c) => self.filter_expr(&c.expr),
            Expr::TryCast(c) => self.filter_expr(&c.expr),
            Expr::InList(l) => {
                self.filter_expr(&l.expr)?;
                l.list.iter().try_for_each(|x| self.filter_expr(x))
            }
            Expr::Between(b) => {
                self.filter_expr(&b.expr)?;
                self.filter_expr(&b.low)?;
                self.filter_expr(&b.high)
            }
            other => Err(expression_refusal(other, "in WHERE")),
        }
    }

    /// GROUP BY: plain dimension columns.
    fn group_expr(&self, e: &Expr) -> Result<(), Violation> {
        match e {
            Expr::Column(c) => match self.role(c)? {
                ColumnRole::Dimension { .. } => Ok(()),
                other => Err(deny(
                    "query.group_by",
                    format!(
                        "{} is a {} column; GROUP BY uses dimension columns only",
                        c.name,
                        other.name()
                    ),
                )),
            },
            other => Err(match expression_refusal(other, "in GROUP BY") {
                v if v.rule == "query.functions" => v,
                _ => deny(
                    "query.group_by",
                    "GROUP BY lists dimension columns only, not expressions",
                ),
            }),
        }
    }

    /// One aggregate: an allowed function over a plain column of the right role.
    fn aggregate_expr(&self, e: &Expr) -> Result<AggregateUse, Violation> {
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
            [arg] => {
                let Expr::Column(c) = strip_cast(arg) else {
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
                let role = self.role(c)?;
                let used = AggregateUse {
                    kind,
                    role: Some(role.clone()),
                };
                match (kind, role) {
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

    /// Above the aggregate: its output columns, literals, arithmetic,
    /// comparisons.
    fn output_expr(&self, e: &Expr) -> Result<(), Violation> {
        match e {
            Expr::Column(_) | Expr::Literal(..) => Ok(()),
            Expr::Alias(a) => self.output_expr(&a.expr),
            Expr::BinaryExpr(b) => {
                self.output_expr(&b.left)?;
                self.output_expr(&b.right)
            }
            Expr::Not(x) | Expr::IsNull(x) | Expr::IsNotNull(x) | Expr::Negative(x) => {
                self.output_expr(x)
            }
            Expr::Cast(c) => self.output_expr(&c.expr),
            Expr::TryCast(c) => self.output_expr(&c.expr),
            Expr::AggregateFunction(_) => self.aggregate_expr(e).map(|_| ()),
            other => Err(expression_refusal(other, "in the output")),
        }
    }
}

fn join_rule() -> Violation {
    deny(
        "query.join",
        "joins are inner equi-joins on identifier columns: ON a.email = b.email",
    )
}

fn unknown_column(name: &str) -> Violation {
    Violation {
        policy: false,
        rule: "sql.columns",
        detail: format!("{name} is not a column of the datasets in this query"),
    }
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        other => other,
    }
}

fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            let mut out = conjuncts(&b.left);
            out.extend(conjuncts(&b.right));
            out
        }
        other => vec![other],
    }
}

fn is_comparison_or_logic(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::And
            | Operator::Or
    )
}

fn expression_refusal(e: &Expr, place: &str) -> Violation {
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
        Expr::Placeholder(_) => Violation {
            policy: false,
            rule: "sql.placeholder",
            detail: "parameters are not supported".into(),
        },
        _ => deny(
            "query.expression",
            format!("this expression is not allowed {place}"),
        ),
    }
}
