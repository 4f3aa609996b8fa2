//! Date functions and intervals beneath the release boundary are total:
//! with dates at the very ends of the years any policy admits (1900 and
//! 2200), every construct the checker accepts answers, and none fails
//! beneath the boundary (which would be an error channel about rows no one
//! may see).

mod common;

use cleanroom::query::QueryError;
use common::people::{Row, days_from_civil, tables};

/// The demo agreement (thresholds, minimum 2) with its date columns
/// allowed over every year a policy may declare.
fn widest_dates() -> cleanroom::policy::Policy {
    let path = common::policies_dir().join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    let text = head
        .replace("min = 2020-01-01", "min = 1900-01-01")
        .replace("max = 2027-12-31\ncompare", "max = 2200-12-31\ncompare")
        .replace("min_group_size = 50", "min_group_size = 2");
    cleanroom::policy::parse_policy(&text, &path).unwrap()
}

#[tokio::test]
async fn date_functions_answer_at_the_ends_of_the_admitted_years() {
    let policy = widest_dates();
    let (first, last) = (days_from_civil(1900, 1, 1), days_from_civil(2200, 12, 31));
    let rows: Vec<Row> = (0..8)
        .map(|i| Row {
            last_purchase: Some(if i % 2 == 0 { first } else { last }),
            first_exposure: Some(if i % 3 == 0 { last } else { first }),
            ..Row::new(i)
        })
        .collect();
    let data = tables(&policy, &rows, &rows);
    let from = "FROM customers c JOIN audience a ON c.email = a.email";
    let probes = [
        format!("SELECT date_trunc('week', c.last_purchase) AS w, COUNT(*) {from} GROUP BY w"),
        format!(
            "SELECT date_trunc('year', c.last_purchase + INTERVAL '50 years') AS y, COUNT(*) {from} GROUP BY y"
        ),
        format!(
            "SELECT date_trunc('minute', c.last_purchase - INTERVAL '50 years') AS y, COUNT(*) {from} GROUP BY y"
        ),
        format!(
            "SELECT date_part('doy', a.first_exposure + INTERVAL '600 months') AS d, COUNT(*) {from} GROUP BY d"
        ),
        format!("SELECT EXTRACT(DOW FROM c.last_purchase) AS d, COUNT(*) {from} GROUP BY d"),
        format!(
            "SELECT date_part('hour', c.last_purchase) AS h, date_part('minute', c.last_purchase) AS m, date_part('week', c.last_purchase) AS w, date_part('quarter', c.last_purchase) AS q, COUNT(*) {from} GROUP BY h, m, w, q"
        ),
        format!(
            "SELECT date_trunc('quarter', c.last_purchase) AS q, date_trunc('hour', a.first_exposure) AS h, COUNT(*) {from} GROUP BY q, h"
        ),
        format!(
            "SELECT COUNT(*) {from} WHERE c.last_purchase BETWEEN a.first_exposure - INTERVAL '50 years' AND a.first_exposure + INTERVAL '50 years'"
        ),
        format!(
            "SELECT COUNT(*) {from} WHERE c.last_purchase + INTERVAL '18300 days' > TIMESTAMP '2262-01-01 00:00:00'"
        ),
        format!("SELECT COUNT(*) {from} WHERE c.last_purchase < TIMESTAMP '1678-01-01 00:00:00'"),
        format!(
            "SELECT AVG(CASE WHEN c.last_purchase - INTERVAL '50 years' < DATE '1900-01-01' THEN 1 ELSE 0 END) {from}"
        ),
    ];
    for sql in &probes {
        match cleanroom::query::run(&policy, "acme", &data, sql).await {
            Ok(_) => {}
            Err(e @ (QueryError::Engine(_) | QueryError::Output | QueryError::Limit { .. })) => {
                panic!("{sql}: failed beneath the boundary: {e:?}")
            }
            Err(QueryError::Refused(v)) => panic!("{sql}: refused: {v}"),
        }
    }
    // One step beyond the bound the checker sets is refused before running.
    let beyond = format!(
        "SELECT COUNT(*) {from} WHERE c.last_purchase + INTERVAL '51 years' > a.first_exposure"
    );
    match cleanroom::query::run(&policy, "acme", &data, &beyond).await {
        Err(QueryError::Refused(v)) => assert_eq!(v.rule, "query.expression"),
        other => panic!("{beyond}: {other:?}"),
    }
}
