use super::expr::cast_is_total;
use super::*;
use arrow::datatypes::DataType;

/// Two datasets of two parties whose columns share no name, so the
/// engine itself would let one alias name both.
fn disjoint() -> Policy {
    crate::policy::unit_policy(
        r#"
[[dataset]]
name = "left_set"
owner = "acme"

[[dataset.column]]
name = "mail"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "tier"
role = "dimension"
values = ["a", "b"]

[[dataset]]
name = "right_set"
owner = "globex"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "score"
role = "metric"
type = "integer"
min = 0
max = 10

[query]
aggregates = ["count", "sum"]
min_group_size = 5
"#,
    )
}

async fn checked(policy: &Policy, sql: &str) -> Result<Checked, Violation> {
    let tables = crate::query::agreement_tables(policy, vec![Vec::new(); policy.datasets().len()]);
    crate::query::plan_and_check(policy, "acme", &tables, sql)
        .await
        .map(|(_, _, c)| c)
        .map_err(|e| match e {
            crate::query::QueryError::Refused(v) => v,
            other => panic!("{other}"),
        })
}

#[tokio::test]
async fn one_name_for_two_inputs_is_refused() {
    use datafusion::catalog::default_table_source::provider_as_source;
    use datafusion::datasource::MemTable;
    use datafusion::functions_aggregate::expr_fn::count;
    use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};

    let policy = disjoint();
    let ok = "SELECT l.tier, SUM(r.score) FROM left_set l JOIN right_set r ON l.mail = r.email GROUP BY l.tier";
    assert!(checked(&policy, ok).await.is_ok());
    // From SQL the engine refuses it first (every table also holds
    // the hidden person column, so the names collide).
    let twice = "SELECT x.tier, SUM(x.score) FROM left_set x JOIN right_set x ON x.mail = x.email GROUP BY x.tier";
    assert!(checked(&policy, twice).await.is_err());
    // A plan the engine accepts, with one alias on two inputs.
    let scan = |name: &str| {
        let schema = crate::upload::upload_schema(policy.dataset(name).unwrap());
        let table = MemTable::try_new(schema, vec![vec![]]).unwrap();
        LogicalPlanBuilder::scan(name, provider_as_source(std::sync::Arc::new(table)), None)
            .unwrap()
            .alias("x")
            .unwrap()
            .build()
            .unwrap()
    };
    let plan = LogicalPlanBuilder::from(scan("left_set"))
        .join_on(
            scan("right_set"),
            JoinType::Inner,
            vec![col("x.mail").eq(col("x.email"))],
        )
        .unwrap()
        .aggregate(vec![col("x.tier")], vec![count(lit(1i64))])
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(
        check(&plan, &policy, "acme").unwrap_err().rule,
        "query.alias"
    );
}

#[test]
fn total_casts_are_the_listed_ones() {
    use DataType::*;
    for (from, to) in [
        (Int64, Float64),
        (Int32, Int64),
        (UInt32, Int64),
        (Utf8, Utf8View),
        (Int64, Utf8),
        (FixedSizeBinary(32), Binary),
        (Null, Int8),
        (Float64, Float64),
    ] {
        assert!(cast_is_total(&from, &to), "{from} -> {to}");
    }
    for (from, to) in [
        (Float64, Int64),
        (Int64, Int32),
        (Int64, UInt64),
        (Utf8, Int64),
        (Utf8View, Utf8),
        (FixedSizeBinary(32), Utf8),
        (Binary, Utf8),
        (Float64, Utf8),
        (Float64, Float32),
        (Utf8, Date32),
    ] {
        assert!(!cast_is_total(&from, &to), "{from} -> {to}");
    }
}
