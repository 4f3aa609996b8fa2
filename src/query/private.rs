//! Differentially private execution of a checked plan.
//!
//! ```text
//! analyst's plan:   Limit? Sort? Projection Filter(HAVING)?  Aggregate(G; aggs)  input
//! 1. DataFusion:    Aggregate(G, person; rows, per aggregate: sum, count)  input
//! 2. privacy::Plan: bound per person, sum per group, noise, threshold
//! 3. DataFusion:    Limit? Sort? Projection Filter(HAVING)?  [released noisy groups]
//! ```
//!
//! Steps 1 and 2 are the private stage; their output is the released
//! table, and the analyst's HAVING, ORDER BY and LIMIT run on it alone
//! ([`super::release`]).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, Rows, SortField};

use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, cast, lit};
use datafusion::prelude::SessionContext;

use super::check::{AggregateUse, deny};
use super::release::{find_aggregate, private_failure, public_stage};
use super::{Checked, QueryError, QueryOutcome, Violation};
use crate::policy::{Aggregate as Kind, ColumnRole, Policy, ValueType};
use crate::privacy::mechanism::{Contributions, Released, Value};
use crate::privacy::{Bounds, Measure, NoiseSource, Plan, Settings};

/// The privacy measure of each aggregate, or the rule that refuses it.
pub fn measures(checked: &Checked) -> Result<Vec<Measure>, Violation> {
    checked.aggregates.iter().map(measure).collect()
}

fn measure(used: &AggregateUse) -> Result<Measure, Violation> {
    let bounds = |role: &Option<ColumnRole>| match role {
        Some(ColumnRole::Metric {
            value_type,
            min,
            max,
            ..
        }) if !value_type.is_temporal() => Ok(Bounds {
            lo: *min,
            hi: *max,
            integer: *value_type == ValueType::Integer,
        }),
        _ => Err(deny(
            "query.aggregate_argument",
            "SUM and AVG apply to metric columns",
        )),
    };
    match (used.kind, &used.role) {
        (Kind::Count, None) => Ok(Measure::Rows),
        (Kind::Count, Some(_)) => Ok(Measure::NonNull),
        (Kind::CountDistinct, Some(ColumnRole::Identifier { .. })) => Ok(Measure::People),
        (Kind::CountDistinct, _) => Err(deny(
            "privacy.count_distinct",
            "with differential privacy COUNT(DISTINCT ...) counts people: give it an identifier column",
        )),
        (Kind::Sum, role) => bounds(role).map(Measure::Sum),
        (Kind::Avg, role) => bounds(role).map(Measure::Avg),
    }
}

/// The noise plan of a checked query at `epsilon`, before anything runs.
pub fn plan(policy: &Policy, checked: &Checked, epsilon: f64) -> Result<Plan, Violation> {
    let privacy = policy.privacy().ok_or_else(|| {
        deny(
            "privacy.disabled",
            "this agreement has no differential privacy section",
        )
    })?;
    let settings = Settings {
        epsilon,
        delta: privacy.delta(),
        max_groups_per_person: privacy.max_groups_per_person(),
        max_rows_per_person: privacy.max_rows_per_person(),
        min_group_size: policy.query().min_group_size(),
    };
    Plan::new(settings, &measures(checked)?).map_err(|e| deny(e.rule, e.detail))
}

fn internal(what: &str) -> QueryError {
    QueryError::Engine(format!("private aggregation: {what}"))
}

/// Caller rows a protected party's data does not reach are bounded per
/// caller person, numbered from here up.
const CALLER_UNITS: i64 = 1 << 32;

/// What contributions are bounded per, on each row the aggregation reads:
/// the person of the one party the query protects (every party but the
/// caller), numbered over that party's rows alone
/// ([`super::with_own_people`]), so that rows the caller uploads can
/// neither merge two of its people into one nor split one into two; on a
/// row that party's data does not reach (the caller's unmatched row under
/// a LEFT JOIN), the caller's own person, in a range of its own.
pub fn bounding_unit(
    policy: &Policy,
    org: &str,
    plan: &LogicalPlan,
) -> Result<Bounding, Violation> {
    let input = find_aggregate(plan)
        .map(|a| a.input.as_ref())
        .ok_or_else(|| deny("query.aggregate", "exactly one aggregation"))?;
    Ok(Bounding {
        unit: unit_expr(policy, org, input)?,
        reach: super::reach::find(policy, org, input)?,
    })
}

/// How a query's contributions are bounded: per unit (a person of the
/// protected party; under a `LEFT JOIN`, a caller person for its unmatched
/// rows), and under a `LEFT JOIN` that reaches the partner's data with
/// each partner person joined to one caller person at most
/// ([`super::reach`]).
#[derive(Debug, Clone)]
pub struct Bounding {
    unit: Expr,
    reach: Option<super::reach::Reach>,
}

/// The unit of [`Bounding`] over the aggregation's `input`.
fn unit_expr(policy: &Policy, org: &str, input: &LogicalPlan) -> Result<Expr, Violation> {
    let tables = super::release::leaf_tables(input);
    let mut protected: Vec<(String, Expr)> = Vec::new();
    let mut callers: Vec<Expr> = Vec::new();
    for (q, f) in input.schema().iter() {
        if f.name() != super::OWN_PERSON_COLUMN {
            continue;
        }
        let column = Expr::Column(datafusion::common::Column::new(q.cloned(), f.name()));
        let column = match f.is_nullable() {
            // Beneath an inner join only: every row has the protected
            // party's person, and its number serves as it is.
            false => column,
            true => cast(column, DataType::Int64),
        };
        let owner = q
            .and_then(|q| tables.get(&q.to_string()))
            .and_then(|t| policy.dataset(t))
            .map(|d| d.owner().to_string());
        match owner {
            Some(o) if o == org => callers.push(column),
            Some(o) => protected.push((o, column)),
            None => {}
        }
    }
    let mut parties: Vec<&str> = protected.iter().map(|(o, _)| o.as_str()).collect();
    parties.sort_unstable();
    parties.dedup();
    if parties.len() != 1 {
        return Err(deny(
            "privacy.parties",
            "under differential privacy a query reads the data of exactly one party besides yours: ask about each partner in a query of its own",
        ));
    }
    let mut units: Vec<Expr> = protected.into_iter().map(|(_, c)| c).collect();
    if let Some(first) = units.iter().find(|c| !matches!(c, Expr::Cast(_))) {
        // A protected person on every row.
        return Ok(first.clone());
    }
    units.extend(
        callers
            .into_iter()
            .map(|c| cast(c, DataType::Int64) + lit(CALLER_UNITS)),
    );
    Ok(match units.len() {
        1 => units.remove(0),
        _ => datafusion::functions::core::expr_fn::coalesce(units),
    })
}

/// The private stage's first step: the partial aggregates per group and
/// bounding unit (step 1 above), exact, before any bounding or noise. What
/// the engine returns, wherever it ran; public so that tests can compare
/// engines on it.
#[derive(Debug)]
pub struct Partials {
    /// The analyst's plan (under a `LEFT JOIN`, rewritten so that each
    /// partner person joins one caller person at most).
    plan: LogicalPlan,
    agg: Aggregate,
    groups_width: usize,
    /// Per measure: (sum column, count column) in the batches.
    columns: Vec<(Option<usize>, Option<usize>)>,
    /// Columns: the groups, the unit, the rows, then the measures' sums
    /// and counts.
    pub batches: Vec<RecordBatch>,
}

/// Computes [`Partials`] of a checked plan under `noise_plan`.
pub async fn partials(
    ctx: &SessionContext,
    plan: LogicalPlan,
    noise_plan: &Plan,
    bounding: &Bounding,
    one_row_per_person: bool,
) -> Result<Partials, QueryError> {
    let plan = match &bounding.reach {
        Some(reach) => super::reach::one_caller_person_each(ctx, plan, reach).await?,
        None => plan,
    };
    let unit = bounding.unit.clone();
    let measures = noise_plan.measures();
    let agg = find_aggregate(&plan)
        .cloned()
        .ok_or_else(|| internal("no aggregation"))?;
    // Every failure from here on comes after data was read.

    // 1. Partial aggregates per group and bounding unit.
    let person = unit.alias("__unit");
    let mut group = agg.group_expr.clone();
    let groups_width = group.len();
    group.push(person);
    // When every table holds at most one row per person, each joined row
    // is one person's only row: a projection gives the partials without
    // grouping.
    let per_row = one_row_per_person;
    let rows_expr = if per_row { lit(1i64) } else { count(lit(1i64)) };
    let mut partials = vec![rows_expr.alias("__rows")];
    let mut columns: Vec<(Option<usize>, Option<usize>)> = Vec::new();
    let mut next = groups_width + 2;
    for (i, (m, e)) in measures.iter().zip(&agg.aggr_expr).enumerate() {
        let arg = || -> Result<Expr, QueryError> {
            let e = match e {
                Expr::Alias(a) => a.expr.as_ref(),
                other => other,
            };
            match e {
                Expr::AggregateFunction(af) => af
                    .params
                    .args
                    .first()
                    .cloned()
                    .ok_or_else(|| internal("aggregate without argument")),
                _ => Err(internal("not an aggregate")),
            }
        };
        match m {
            Measure::Rows => columns.push((None, None)),
            Measure::NonNull | Measure::People => {
                partials.push(non_null(arg()?, per_row).alias(format!("__n{i}")));
                columns.push((None, Some(next)));
                next += 1;
            }
            Measure::Sum(_) | Measure::Avg(_) => {
                let value = cast(arg()?, DataType::Float64);
                let total = if per_row { value } else { sum(value) };
                partials.push(total.alias(format!("__s{i}")));
                partials.push(non_null(arg()?, per_row).alias(format!("__n{i}")));
                columns.push((Some(next), Some(next + 1)));
                next += 2;
            }
        }
    }
    let partial = if per_row {
        group.extend(partials);
        LogicalPlanBuilder::from(Arc::clone(&agg.input))
            .project(group)
            .and_then(LogicalPlanBuilder::build)
            .map_err(private_failure)?
    } else {
        LogicalPlan::Aggregate(
            Aggregate::try_new(Arc::clone(&agg.input), group, partials).map_err(private_failure)?,
        )
    };
    let batches = super::collect(ctx, partial)
        .await
        .map_err(private_failure)?;
    Ok(Partials {
        plan,
        agg,
        groups_width,
        columns,
        batches,
    })
}

/// Runs a checked plan under `noise_plan`, bounding contributions as
/// `bounding` says ([`bounding_unit`]).
pub async fn execute(
    ctx: SessionContext,
    plan: LogicalPlan,
    checked: Checked,
    noise_plan: &Plan,
    bounding: Bounding,
    one_row_per_person: bool,
    mut rng: NoiseSource,
) -> Result<QueryOutcome, QueryError> {
    let Partials {
        plan,
        agg,
        groups_width,
        columns,
        batches,
    } = partials(&ctx, plan, noise_plan, &bounding, one_row_per_person).await?;
    let measures = noise_plan.measures();

    // 2. Group numbers, contributions, then the mechanism.
    let group_fields: Vec<SortField> = agg
        .schema
        .fields()
        .iter()
        .take(groups_width)
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let converter = if groups_width > 0 {
        Some(RowConverter::new(group_fields).map_err(|e| private_failure(e.into()))?)
    } else {
        None
    };
    let mut keys: Vec<Rows> = Vec::with_capacity(batches.len());
    if let Some(conv) = &converter {
        for b in &batches {
            keys.push(
                conv.convert_columns(&b.columns()[..groups_width])
                    .map_err(|e| private_failure(e.into()))?,
            );
        }
    }
    // Group keys come from the data: hashed with a secret seed, so no
    // upload can make them collide on purpose.
    let mut ids: HashMap<&[u8], u32, crate::psi::Seeded> =
        HashMap::with_hasher(crate::psi::Seeded::random());
    let mut representatives: Vec<(usize, usize)> = Vec::new();
    let n: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut c = Contributions {
        group: Vec::with_capacity(n),
        person: Vec::with_capacity(n),
        rows: Vec::with_capacity(n),
        sums: vec![Vec::new(); measures.len()],
        counts: vec![Vec::new(); measures.len()],
    };
    // Units numbered densely, in the order first seen.
    let mut unit_ids: HashMap<i64, u32, crate::psi::Seeded> =
        HashMap::with_hasher(crate::psi::Seeded::random());
    for (bi, b) in batches.iter().enumerate() {
        let column = b.column(groups_width);
        let direct = column.as_any().downcast_ref::<UInt32Array>();
        let mapped = column.as_any().downcast_ref::<Int64Array>();
        if direct.is_none() && mapped.is_none() {
            return Err(internal("bounding units"));
        }
        let rows = int64(b.column(groups_width + 1))?;
        for r in 0..b.num_rows() {
            let g = match keys.get(bi) {
                Some(k) => {
                    let key: &[u8] = k.row(r).data();
                    let fresh = ids.len() as u32;
                    *ids.entry(key).or_insert_with(|| {
                        representatives.push((bi, r));
                        fresh
                    })
                }
                None => {
                    if representatives.is_empty() {
                        representatives.push((bi, r));
                    }
                    0
                }
            };
            c.group.push(g);
            c.person.push(match (direct, mapped) {
                (Some(d), _) => d.value(r),
                (None, Some(m)) => {
                    let fresh = unit_ids.len() as u32;
                    *unit_ids.entry(m.value(r)).or_insert(fresh)
                }
                (None, None) => return Err(internal("bounding units")),
            });
            c.rows.push(rows.value(r).max(0) as u64);
        }
        for (i, (s, n)) in columns.iter().enumerate() {
            if let Some(s) = s {
                let s = b
                    .column(*s)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .ok_or_else(|| internal("partial sums"))?;
                c.sums[i].extend((0..s.len()).map(|r| if s.is_null(r) { 0.0 } else { s.value(r) }));
            }
            if let Some(n) = n {
                let n = int64(b.column(*n))?;
                c.counts[i].extend(n.values().iter().map(|v| (*v).max(0) as u64));
            }
        }
    }
    let bounded = noise_plan
        .bound(&c, representatives.len(), &mut rng)
        .map_err(|e| internal(e.rule))?;
    let released = noise_plan.release(&bounded, &mut rng);

    // 3. The released groups replace the aggregation in the analyst's plan.
    let noisy = released_batch(
        &agg,
        &converter,
        &keys,
        &representatives,
        &released,
        &measures,
    )?;
    let mut report = noise_plan.report();
    let names = output_names(&plan);
    for (c, f) in report
        .columns
        .iter_mut()
        .zip(agg.schema.fields().iter().skip(groups_width))
    {
        c.aggregate = names
            .get(f.name().as_str())
            .cloned()
            .unwrap_or_else(|| readable_aggregate(f.name()));
    }
    let (schema, batches) = public_stage(&ctx, plan, &agg, vec![noisy]).await?;
    Ok(QueryOutcome {
        schema,
        batches,
        checked,
        privacy: Some(report),
    })
}

/// The query's own output name of each aggregate the outermost projection
/// shows as a column of its own (`COUNT(*) AS customers`), by the
/// aggregation's field name. An aggregate used only inside an expression
/// has none.
fn output_names(plan: &LogicalPlan) -> HashMap<String, String> {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Limit(l) => node = &l.input,
            LogicalPlan::Sort(s) => node = &s.input,
            LogicalPlan::Projection(p) => {
                let mut names = HashMap::new();
                for (e, field) in p.expr.iter().zip(p.schema.fields()) {
                    let mut inner = e;
                    while let Expr::Alias(a) = inner {
                        inner = a.expr.as_ref();
                    }
                    if let Expr::Column(c) = inner {
                        names
                            .entry(c.name.clone())
                            .or_insert_with(|| field.name().clone());
                    }
                }
                return names;
            }
            _ => return HashMap::new(),
        }
    }
}

/// An aggregate as the analyst would write it: `COUNT(*)` for DataFusion's
/// `count(Int64(1))`, function names in capitals.
fn readable_aggregate(name: &str) -> String {
    if name == "count(Int64(1))" || name == "count(*)" {
        return "COUNT(*)".into();
    }
    match name.split_once('(') {
        Some((f, rest)) => format!("{}({rest}", f.to_ascii_uppercase()),
        None => name.to_string(),
    }
}

/// Non-null values of `e`: per row 1 or 0, or their count per group.
fn non_null(e: Expr, per_row: bool) -> Expr {
    if per_row {
        cast(e.is_not_null(), DataType::Int64)
    } else {
        count(e)
    }
}

fn int64(a: &ArrayRef) -> Result<&Int64Array, QueryError> {
    a.as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| internal("partial counts"))
}

/// The released groups as one batch shaped like the aggregation's output,
/// with positional column names.
fn released_batch(
    agg: &Aggregate,
    converter: &Option<RowConverter>,
    keys: &[Rows],
    representatives: &[(usize, usize)],
    released: &[Released],
    measures: &[Measure],
) -> Result<RecordBatch, QueryError> {
    let fields: Vec<Field> = agg
        .schema
        .fields()
        .iter()
        .enumerate()
        .map(|(j, f)| Field::new(format!("__dp_{j}"), f.data_type().clone(), true))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    if let Some(conv) = converter {
        let rows = released.iter().map(|g| {
            let (b, r) = representatives[g.group as usize];
            keys[b].row(r)
        });
        columns.extend(
            conv.convert_rows(rows)
                .map_err(|e| private_failure(e.into()))?,
        );
    }
    // Rows give dictionaries back as their values; the plan above the
    // release reads the aggregation's own types.
    for (c, f) in columns.iter_mut().zip(schema.fields()) {
        if c.data_type() != f.data_type() {
            *c = arrow::compute::cast(c, f.data_type()).map_err(|e| private_failure(e.into()))?;
        }
    }
    let width = columns.len();
    for (i, _) in measures.iter().enumerate() {
        let values = released.iter().map(|g| g.values[i]);
        let array: ArrayRef = match released.first().map(|g| g.values[i]) {
            Some(Value::Float(_)) => {
                Arc::new(Float64Array::from_iter_values(values.map(|v| match v {
                    Value::Float(f) => f,
                    Value::Int(i) => i as f64,
                })))
            }
            _ => Arc::new(Int64Array::from_iter_values(values.map(|v| match v {
                Value::Int(i) => i,
                Value::Float(f) => f as i64,
            }))),
        };
        let target = schema.field(width + i).data_type();
        columns.push(arrow::compute::cast(&array, target).map_err(|e| private_failure(e.into()))?);
    }
    RecordBatch::try_new(schema, columns).map_err(|e| private_failure(e.into()))
}
