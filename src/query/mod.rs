//! Governed aggregate queries with DataFusion.
//!
//! 1. Plan the analyst's SQL in a session that knows only the agreement's
//!    datasets and the aggregates the product allows (no DataFusion
//!    defaults: no min, max, array_agg, string_agg, generate_series, ...).
//! 2. Analyse it (types coerced, so every implicit cast is in the plan) and
//!    check it by allow-list ([`check`]), before any data is read.
//! 3. Execute in two stages ([`release`]): the private stage computes the
//!    aggregation and keeps only groups of at least the agreement's minimum
//!    of distinct matched people (under differential privacy: bounding,
//!    noise and a noisy threshold, [`private`]); that is the released
//!    table. The analyst's HAVING, ORDER BY, LIMIT and arithmetic then run
//!    over the released table alone.
//! 4. Engine errors become fixed texts; their details stay in the server log.

mod check;
mod engine;
mod limits;
mod own_people;
pub mod private;
mod reach;
mod release;
mod tables;
mod threshold;
mod unmatched;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

pub use check::{AggregateUse, Checked, Violation, check};
pub use engine::{Placement, reruns_on_server, session, session_with, with_functions};
pub(crate) use engine::{collect, on_this_machine};
pub use limits::{MAX_DEPTH, MAX_TOKENS};
pub use own_people::with_own_people;
pub(crate) use tables::table_batches;
pub(crate) use tables::{KeysByPlace, for_caller, owned, table_form, tables_with_people};
pub use tables::{
    OWN_PERSON_COLUMN, ROW_COLUMN, TableData, agreement_tables, caller_type, matched_batches,
    tables_from_matched,
};
pub use threshold::minimums_on_server;

use crate::policy::Policy;

/// The hidden column holding each row's person number; never visible to
/// analysts (the checker refuses any column the policy does not declare).
pub const PERSON_COLUMN: &str = "__person";

/// What a governed query returned.
#[derive(Debug, Clone)]
pub struct QueryOutcome {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub checked: Checked,
    /// The noise applied, under differential privacy.
    pub privacy: Option<crate::privacy::Report>,
}

impl QueryOutcome {
    pub fn rows(&self) -> u64 {
        self.batches.iter().map(|b| b.num_rows() as u64).sum()
    }
}

/// Why a query gave no result.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Refused before any data was read.
    #[error("{0}")]
    Refused(Violation),
    /// The engine failed beneath the release boundary on an accepted plan:
    /// our bug, since only total expressions run there. The detail names
    /// the kind of failure only: engine messages can quote data values,
    /// which must not reach a log either.
    #[error("the query could not be executed")]
    Engine(String),
    /// An expression above the release boundary failed (a division by zero
    /// in HAVING, say). It ran over released rows only.
    #[error("{}", output_violation())]
    Output,
    /// The query passed a limit of the server's while it ran.
    #[error("rule {rule}: {detail}")]
    Limit { rule: &'static str, detail: String },
}

impl QueryError {
    /// Whether the query failed before reading any data: under
    /// differential privacy only such failures are refunded.
    pub fn before_data(&self) -> bool {
        matches!(self, QueryError::Refused(_))
    }
}

/// The refusal an analyst sees when an expression over released rows fails.
pub fn output_violation() -> Violation {
    Violation::invalid(
        "query.output",
        "an expression over the released aggregates failed on their values (a division by zero or an overflow, for example)",
    )
}

/// Limits on the work of one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Wall-clock time from planning to the last released row.
    pub timeout: std::time::Duration,
    /// Memory the engine's operators may hold (hash tables of joins and
    /// aggregations, sorts); the datasets themselves are shared and not
    /// counted.
    pub memory_bytes: usize,
    /// Queries running at once, in all.
    pub max_concurrent: usize,
    /// Queries running at once for one organisation.
    pub max_concurrent_per_org: usize,
    /// Memory the decrypted, matched tables kept between queries may hold,
    /// in all agreements; the least recently used leave first.
    pub table_cache_bytes: u64,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: std::time::Duration::from_secs(300),
            memory_bytes: 4 << 30,
            max_concurrent: 8,
            max_concurrent_per_org: 4,
            table_cache_bytes: 8 << 30,
        }
    }
}

/// A query planned and checked, ready to run.
pub type Planned = (
    SessionContext,
    datafusion::logical_expr::LogicalPlan,
    Checked,
);

/// Plans and checks `sql`, asked by `org`, without running it.
pub async fn plan_and_check(
    policy: &Policy,
    org: &str,
    tables: &[TableData],
    sql: &str,
) -> Result<Planned, QueryError> {
    plan_and_check_with(policy, org, tables, sql, &QueryLimits::default(), None).await
}

/// As [`plan_and_check`], the session under `limits`, the tables read
/// where `placement` put them (this process's memory if `None`).
pub async fn plan_and_check_with(
    policy: &Policy,
    org: &str,
    tables: &[TableData],
    sql: &str,
    limits: &QueryLimits,
    placement: Option<&dyn Placement>,
) -> Result<Planned, QueryError> {
    limits::check_size(sql).map_err(QueryError::Refused)?;
    let ctx = session_with(tables, limits.memory_bytes, placement)
        .map_err(|e| QueryError::Engine(engine_failure(&e)))?;
    let (state, policy, sql, org) = (
        ctx.state(),
        policy.clone(),
        sql.to_string(),
        org.to_string(),
    );
    let (plan, checked) = on_planning_thread(move || {
        only_a_select(&sql).map_err(QueryError::Refused)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|_| QueryError::Engine("planning runtime".into()))?;
        let plan = runtime
            .block_on(state.create_logical_plan(&sql))
            .and_then(|plan| {
                state
                    .analyzer()
                    .execute_and_check(plan, state.config_options(), |_, _| {})
            })
            .map_err(|e| QueryError::Refused(planning_refusal(&e, &policy, &sql)))?;
        let checked =
            check(&plan, &policy, &org).map_err(|v| QueryError::Refused(pointed(v, &sql)))?;
        Ok((plan, checked))
    })
    .await?;
    Ok((ctx, plan, checked))
}

/// Stack of the thread that parses, plans and checks a query: far more
/// than the limits of [`limits`] let a query need.
const PLANNING_STACK: usize = 64 << 20;

/// Runs `work` on a thread of its own with a large stack, so that no input
/// within the limits can exhaust a runtime worker's stack; a panic there
/// is reported as our fault, and the server goes on.
async fn on_planning_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, QueryError> + Send + 'static,
) -> Result<T, QueryError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cleanroom-planner".into())
        .stack_size(PLANNING_STACK)
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .unwrap_or_else(|_| Err(QueryError::Engine("planning panicked".into())));
            let _ = tx.send(result);
        })
        .map_err(|_| QueryError::Engine("no planning thread".into()))?;
    rx.await
        .unwrap_or_else(|_| Err(QueryError::Engine("planning thread ended".into())))
}

/// Runs a governed query: under the minimum group size, and with
/// differential privacy at the agreement's largest per-query epsilon when
/// it has a privacy section. No budget is charged here; the server does
/// that around [`private::execute`].
pub async fn run(
    policy: &Policy,
    org: &str,
    tables: &[TableData],
    sql: &str,
) -> Result<QueryOutcome, QueryError> {
    run_with(policy, org, tables, sql, None).await
}

/// As [`run`], the tables read where `placement` put them.
pub async fn run_with(
    policy: &Policy,
    org: &str,
    tables: &[TableData],
    sql: &str,
    placement: Option<&dyn Placement>,
) -> Result<QueryOutcome, QueryError> {
    let (ctx, plan, checked) =
        plan_and_check_with(policy, org, tables, sql, &QueryLimits::default(), placement).await?;
    if let Some(privacy) = policy.privacy() {
        let noise_plan = private::plan(policy, &checked, privacy.epsilon_per_query_max())
            .map_err(QueryError::Refused)?;
        let rng = crate::privacy::NoiseSource::from_os()
            .map_err(|_| QueryError::Engine("the system random source failed".into()))?;
        let single = one_row_per_person(tables, &checked);
        let unit = private::bounding_unit(policy, org, &plan).map_err(QueryError::Refused)?;
        return private::execute(ctx, plan, checked, &noise_plan, unit, single, rng).await;
    }
    let single = one_row_per_person(tables, &checked);
    execute(policy, ctx, plan, checked, single).await
}

/// Whether every table the query reads has at most one row per person.
pub fn one_row_per_person(tables: &[TableData], checked: &Checked) -> bool {
    tables
        .iter()
        .filter(|t| checked.datasets.iter().any(|d| d == t.dataset.name()))
        .all(|t| t.one_row_per_person)
}

/// Runs a plan [`plan_and_check`] accepted, under the minimum group size.
pub async fn execute(
    policy: &Policy,
    ctx: SessionContext,
    plan: datafusion::logical_expr::LogicalPlan,
    checked: Checked,
    one_row_per_person: bool,
) -> Result<QueryOutcome, QueryError> {
    let counting = if one_row_per_person {
        release::PeopleCount::Rows
    } else {
        release::PeopleCount::Distinct
    };
    let agg = release::find_aggregate(&plan)
        .cloned()
        .ok_or_else(|| QueryError::Engine("no aggregation in a checked plan".into()))?;
    let owners = |dataset: &str| policy.dataset(dataset).map(|d| d.owner().to_string());
    let released = threshold::threshold_stage(
        &ctx,
        &agg,
        &owners,
        policy.query().min_group_size(),
        counting,
    )
    .await?;
    let (schema, batches) = release::public_stage(&ctx, plan, &agg, released).await?;
    Ok(QueryOutcome {
        schema,
        batches,
        checked,
        privacy: None,
    })
}

/// Problems with a policy's templates: each is bound to sample values (its
/// parameters' first values, or the low ends of their ranges) and planned
/// and checked as its first party would ask it. A template the checker
/// refuses would refuse every analyst, so the policy is refused instead.
pub fn template_problems(policy: &Policy) -> Vec<crate::policy::Problem> {
    if policy.templates().is_empty() {
        return Vec::new();
    }
    let policy = policy.clone();
    // Its own thread and runtime: policies are also loaded from within the
    // server's runtime.
    let worker = std::thread::spawn(move || {
        let problem = |i: usize, rule: String| crate::policy::Problem {
            field: format!("template[{i}].sql"),
            rule,
        };
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else {
            return vec![problem(0, "the templates could not be checked".into())];
        };
        let tables = agreement_tables(&policy, vec![Vec::new(); policy.datasets().len()]);
        let mut problems = Vec::new();
        for (i, t) in policy.templates().iter().enumerate() {
            let bound = match t.bind(&t.sample_params()) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(problem(i, e.to_string()));
                    continue;
                }
            };
            let org = t.parties().first().map(String::as_str).unwrap_or_default();
            match runtime.block_on(plan_and_check(&policy, org, &tables, &bound.sql)) {
                Ok(_) => {}
                Err(QueryError::Refused(v)) => {
                    // Positions point into the template's own text: by
                    // the name they are about, as parameters change widths.
                    let at = match (&v.name, bound.sql == t.sql()) {
                        (_, true) => v.at,
                        (Some(name), false) => crate::names::locate(t.sql(), name),
                        (None, false) => None,
                    };
                    problems.push(problem(
                        i,
                        format!(
                            "with sample parameter values the query is refused: {}",
                            v.at(at)
                        ),
                    ))
                }
                Err(e) => problems.push(problem(
                    i,
                    format!("with sample parameter values the query fails: {e}"),
                )),
            }
        }
        problems
    });
    worker.join().unwrap_or_else(|_| {
        vec![crate::policy::Problem {
            field: "template".into(),
            rule: "checking the templates failed".into(),
        }]
    })
}

/// Exactly one statement, and a query (SELECT), before anything is planned.
fn only_a_select(sql: &str) -> Result<(), Violation> {
    use datafusion::sql::parser::{DFParser, Statement};
    use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
    let statements = DFParser::parse_sql(sql).map_err(|e| syntax_error(&e.to_string()))?;
    match statements.len() {
        1 => {}
        0 => {
            return Err(Violation::invalid("sql.syntax", "no statement"));
        }
        _ => {
            return Err(Violation::invalid("sql.syntax", "one statement at a time"));
        }
    }
    match &statements[0] {
        Statement::Statement(s) if matches!(s.as_ref(), SqlStatement::Query(_)) => Ok(()),
        Statement::Explain(_) => Err(check::deny(
            "query.statement",
            "EXPLAIN is not allowed; only SELECT queries run",
        )),
        _ => Err(check::deny(
            "query.statement",
            "only SELECT queries run: no DDL, DML, SET, COPY or other statements",
        )),
    }
}

/// The kind of an engine failure, without its message.
pub(crate) fn engine_failure(e: &DataFusionError) -> String {
    let kind = match e.find_root() {
        DataFusionError::ArrowError(..) => "arrow",
        DataFusionError::Plan(_) => "planning",
        DataFusionError::SchemaError(..) => "schema",
        DataFusionError::Execution(_) | DataFusionError::ExecutionJoin(_) => "execution",
        DataFusionError::ResourcesExhausted(_) => "resources exhausted",
        DataFusionError::Internal(_) => "internal",
        DataFusionError::NotImplemented(_) => "not implemented",
        DataFusionError::IoError(_) => "i/o",
        _ => "other",
    };
    format!("DataFusion {kind} error")
}

/// The scalar functions a session registers (see [`session_with`]).
const SCALAR_FUNCTIONS: [&str; 5] = ["floor", "ceil", "coalesce", "date_trunc", "date_part"];

/// A parser's or tokenizer's refusal: its position, and what it expected
/// when that is grammar (never the text it found, which may be a value).
pub(crate) fn syntax_error(message: &str) -> Violation {
    let expected = message
        .split_once("Expected: ")
        .and_then(|(_, rest)| rest.split_once(", found"))
        .map(|(expected, _)| expected)
        .filter(|e| {
            e.len() <= 40
                && e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _(),;".contains(c))
        });
    let detail = match expected {
        Some(e) => format!("the SQL could not be parsed: expected {e}"),
        None => "the SQL could not be parsed".to_string(),
    };
    Violation::invalid("sql.syntax", detail).at(crate::names::position_in_message(message))
}

/// `v`, pointing at the place in `sql` of the name it is about.
fn pointed(v: Violation, sql: &str) -> Violation {
    match (&v.at, &v.name) {
        (None, Some(name)) => {
            let at = crate::names::locate(sql, name);
            v.at(at)
        }
        _ => v,
    }
}

/// A column the engine could not find: the analyst's name, where it is,
/// and the nearest column of the same input (qualified as it was asked).
fn unknown_column(
    column: &datafusion::common::Column,
    valid: &[datafusion::common::Column],
    sql: &str,
) -> Violation {
    let asked = column.flat_name();
    let visible = |c: &&datafusion::common::Column| !c.name.starts_with("__");
    let candidates: Vec<String> = match &column.relation {
        Some(relation) => valid
            .iter()
            .filter(visible)
            .filter(|c| c.relation.as_ref() == Some(relation))
            .map(|c| c.flat_name())
            .collect(),
        None => valid
            .iter()
            .filter(visible)
            .map(|c| c.name.clone())
            .collect(),
    };
    let suggestion = crate::names::nearest(&asked, candidates.iter().map(String::as_str));
    if !crate::names::is_plain_path(&asked) {
        return Violation::invalid(
            "sql.columns",
            "a column in the query does not exist in its tables",
        );
    }
    Violation::invalid(
        "sql.columns",
        format!(
            "column {asked} does not exist in the query's tables{}",
            crate::names::did_you_mean(suggestion.as_deref())
        ),
    )
    .about(&asked, suggestion)
    .at(crate::names::locate(sql, &asked))
}

/// Aggregates some agreements allow and this one may not.
const KNOWN_AGGREGATES: [&str; 14] = [
    "min",
    "max",
    "array_agg",
    "string_agg",
    "first_value",
    "last_value",
    "median",
    "stddev",
    "var",
    "approx_distinct",
    "bit_and",
    "bit_or",
    "bool_and",
    "bool_or",
];

/// A planning failure as a fixed text naming the rule. DataFusion's own
/// message is never returned: it can quote the query or values. Names the
/// analyst wrote (columns, tables, functions) are echoed when they are
/// plain names, with where they are in `sql` and the nearest allowed name.
fn planning_refusal(e: &DataFusionError, policy: &Policy, sql: &str) -> Violation {
    let root = e.find_root();
    let message = root.to_string();
    let quoted = |prefix: &str| -> Option<String> {
        let start = message.find(prefix)? + prefix.len();
        let rest = &message[start..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty() && name.len() <= 64).then(|| name.to_ascii_lowercase())
    };
    match root {
        DataFusionError::SQL(parser, _) => syntax_error(&parser.to_string()),
        DataFusionError::SchemaError(schema, _) => match schema.as_ref() {
            datafusion::common::SchemaError::FieldNotFound {
                field,
                valid_fields,
            } => unknown_column(field, valid_fields, sql),
            _ => Violation::invalid(
                "sql.columns",
                "a column in the query does not exist in its tables",
            ),
        },
        _ if message.contains("Invalid function") => match quoted("Invalid function '") {
            Some(name) if KNOWN_AGGREGATES.contains(&name.as_str()) => check::deny(
                "query.aggregates",
                format!("{name} is not allowed in agreement {}", policy.id()),
            )
            .about(&name, None)
            .at(crate::names::locate(sql, &name)),
            Some(name) => {
                let allowed = SCALAR_FUNCTIONS
                    .iter()
                    .copied()
                    .chain(["count", "sum", "avg"]);
                let suggestion = crate::names::nearest(&name, allowed);
                check::deny(
                    "query.functions",
                    format!(
                        "function {name} is not allowed{}",
                        crate::names::did_you_mean(suggestion.as_deref())
                    ),
                )
                .about(&name, suggestion)
                .at(crate::names::locate(sql, &name))
            }
            None => check::deny("query.functions", "a function in the query is not allowed"),
        },
        _ if SCALAR_FUNCTIONS
            .iter()
            .any(|f| message.contains(&format!("{f}("))) =>
        {
            check::deny(
                "query.functions",
                "a function was given arguments of types it does not accept (date functions take a date or timestamp, floor and ceil a number)",
            )
        }
        _ if message.contains("coercion")
            || message.contains("argument types")
            || message.contains("does not support") =>
        {
            check::deny(
                "query.aggregate_argument",
                "an aggregate was given a column of a type it does not accept",
            )
        }
        _ if message.contains("table function") => {
            check::deny("query.tables", "table functions are not allowed")
        }
        _ if message.contains("table '") && message.contains("not found") => {
            let asked = message
                .split("table '")
                .nth(1)
                .and_then(|rest| rest.split('\'').next())
                .and_then(|path| path.rsplit('.').next())
                .filter(|name| crate::names::is_plain_name(name))
                .map(str::to_ascii_lowercase);
            let Some(asked) = asked else {
                return check::deny("query.tables", "queries read the agreement's datasets only");
            };
            let suggestion =
                crate::names::nearest(&asked, policy.datasets().iter().map(|d| d.name()));
            check::deny(
                "query.tables",
                format!(
                    "{asked} is not a dataset of agreement {}; queries read the agreement's datasets only{}",
                    policy.id(),
                    crate::names::did_you_mean(suggestion.as_deref())
                ),
            )
            .about(&asked, suggestion)
            .at(crate::names::locate(sql, &asked))
        }
        _ if message.contains("No field named") => Violation::invalid(
            "sql.columns",
            "a column in the query does not exist in its tables",
        ),
        DataFusionError::NotImplemented(_) => {
            check::deny("query.shape", "this SQL construct is not supported")
        }
        _ => Violation::invalid("sql.plan", "the query could not be planned"),
    }
}

#[cfg(test)]
mod tests;
