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
    cleanroom::agreements::parse_policy(&text, &path).unwrap()
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
            "SELECT COUNT(*) {from} WHERE c.last_purchase + INTERVAL '18300 days' > TIMESTAMP '2200-12-31 23:59:59'"
        ),
        format!("SELECT COUNT(*) {from} WHERE c.last_purchase < TIMESTAMP '1900-01-01 00:00:00'"),
        format!(
            "SELECT AVG(CASE WHEN c.last_purchase - INTERVAL '50 years' < DATE '1900-01-01' THEN 1 ELSE 0 END) {from}"
        ),
    ];
    for sql in &probes {
        match common::workers::run(&policy, "acme", &data, sql).await {
            Ok(_) => {}
            Err(e @ (QueryError::Engine(_) | QueryError::Output | QueryError::Limit { .. })) => {
                panic!("{sql}: failed beneath the boundary: {e:?}")
            }
            Err(QueryError::Refused(v)) => panic!("{sql}: refused: {v}"),
        }
    }
    // One step beyond the bounds the checker sets is refused before
    // running: a longer interval, a second move (even through DATE_TRUNC),
    // a literal outside the admitted years.
    for beyond in [
        format!(
            "SELECT COUNT(*) {from} WHERE c.last_purchase + INTERVAL '51 years' > a.first_exposure"
        ),
        format!(
            "SELECT date_trunc('year', c.last_purchase + INTERVAL '50 years') + INTERVAL '50 years' AS y, COUNT(*) {from} GROUP BY y"
        ),
        format!("SELECT COUNT(*) {from} WHERE c.last_purchase < DATE '9999-12-31'"),
        format!("SELECT COUNT(*) {from} WHERE c.last_purchase > TIMESTAMP '1800-01-01 00:00:00'"),
        format!("SELECT date_trunc('year', DATE '2262-04-12') AS y, COUNT(*) {from} GROUP BY y"),
    ] {
        match common::workers::run(&policy, "acme", &data, &beyond).await {
            Err(QueryError::Refused(v)) => assert!(
                ["query.expression", "query.cast"].contains(&v.rule),
                "{beyond}: {v}"
            ),
            other => panic!("{beyond}: {other:?}"),
        }
    }
    // One step beyond the bound the checker sets is refused before running.
    let beyond = format!(
        "SELECT COUNT(*) {from} WHERE c.last_purchase + INTERVAL '51 years' > a.first_exposure"
    );
    match common::workers::run(&policy, "acme", &data, &beyond).await {
        Err(QueryError::Refused(v)) => assert_eq!(v.rule, "query.expression"),
        other => panic!("{beyond}: {other:?}"),
    }
}

#[derive(Clone, Copy)]
enum Ty {
    Num,
    Date,
    Text,
    Bool,
}

const NUM_COLUMNS: &[&str] = &[
    "c.lifetime_value",
    "c.lead_score",
    "c.purchases",
    "a.ad_exposures",
    "a.spend",
];
const DATE_COLUMNS: &[&str] = &["c.last_purchase", "a.first_exposure"];
const TEXT_COLUMNS: &[&str] = &["c.region", "c.age_band", "a.interest_segment"];

/// A random well-typed derived expression from the grammar the checker
/// admits, with the literals most likely to break totality: integer
/// extremes, huge floats, zero and negative divisors, dates at the
/// admitted ends, the longest intervals, NULL.
fn expression(rng: &mut rand::rngs::StdRng, ty: Ty, depth: u32) -> String {
    use rand::Rng;
    let pick =
        |rng: &mut rand::rngs::StdRng, xs: &[&str]| xs[rng.random_range(0..xs.len())].to_string();
    let num_literal = [
        "0",
        "-1",
        "1",
        "7",
        "2.5",
        "9223372036854775807",
        "-9223372036854775807",
        "1e308",
        "NULL",
    ];
    let leaf = |rng: &mut rand::rngs::StdRng| match ty {
        Ty::Num if rng.random_bool(0.6) => pick(rng, NUM_COLUMNS),
        Ty::Num => pick(rng, &num_literal),
        Ty::Date if rng.random_bool(0.7) => pick(rng, DATE_COLUMNS),
        Ty::Date => pick(rng, &["DATE '1900-01-01'", "DATE '2200-12-31'", "NULL"]),
        Ty::Text if rng.random_bool(0.7) => pick(rng, TEXT_COLUMNS),
        Ty::Text => pick(rng, &["'north'", "'x'", "NULL"]),
        Ty::Bool => format!("{} IS NULL", pick(rng, NUM_COLUMNS)),
    };
    if depth == 0 {
        return leaf(rng);
    }
    let d = depth - 1;
    let e = |rng: &mut rand::rngs::StdRng, t: Ty| expression(rng, t, d);
    match ty {
        Ty::Num => match rng.random_range(0..9) {
            0 => format!("({} + {})", e(rng, Ty::Num), e(rng, Ty::Num)),
            1 => format!("({} - {})", e(rng, Ty::Num), e(rng, Ty::Num)),
            2 => format!("({} * {})", e(rng, Ty::Num), e(rng, Ty::Num)),
            3 => format!("({} / {})", e(rng, Ty::Num), pick(rng, &num_literal)),
            4 => format!("({} % {})", e(rng, Ty::Num), pick(rng, &num_literal)),
            5 => format!("floor({})", e(rng, Ty::Num)),
            6 => format!(
                "date_part('{}', {})",
                pick(rng, &["year", "month", "dow", "doy", "quarter", "week"]),
                e(rng, Ty::Date)
            ),
            7 => format!(
                "CASE WHEN {} THEN {} ELSE {} END",
                e(rng, Ty::Bool),
                pick(rng, &num_literal),
                pick(rng, &num_literal)
            ),
            _ => format!("COALESCE({}, {})", e(rng, Ty::Num), e(rng, Ty::Num)),
        },
        Ty::Date => match rng.random_range(0..4) {
            0 => format!(
                "({} {} INTERVAL '{}')",
                e(rng, Ty::Date),
                pick(rng, &["+", "-"]),
                pick(rng, &["50 years", "18600 days", "1 month", "14 days"])
            ),
            1 => format!(
                "date_trunc('{}', {})",
                pick(rng, &["year", "quarter", "month", "week", "day", "hour"]),
                e(rng, Ty::Date)
            ),
            2 => format!("COALESCE({}, {})", e(rng, Ty::Date), e(rng, Ty::Date)),
            _ => leaf(rng),
        },
        Ty::Text => match rng.random_range(0..3) {
            0 => format!("COALESCE({}, {})", e(rng, Ty::Text), e(rng, Ty::Text)),
            1 => format!("CASE WHEN {} THEN 'a' ELSE 'b' END", e(rng, Ty::Bool)),
            _ => format!("CAST({} AS VARCHAR)", e(rng, Ty::Num)),
        },
        Ty::Bool => {
            let t = [Ty::Num, Ty::Date, Ty::Text][rng.random_range(0..3)];
            match rng.random_range(0..6) {
                0 => format!(
                    "({} {} {})",
                    e(rng, t),
                    pick(rng, &["=", "<>", "<", ">="]),
                    e(rng, t)
                ),
                1 => format!("({} BETWEEN {} AND {})", e(rng, t), e(rng, t), e(rng, t)),
                2 => format!("({} IN ({}, {}))", e(rng, t), e(rng, t), e(rng, t)),
                3 => format!("({} AND {})", e(rng, Ty::Bool), e(rng, Ty::Bool)),
                4 => format!("NOT ({})", e(rng, Ty::Bool)),
                _ => format!("({} IS NULL OR {})", e(rng, t), e(rng, Ty::Bool)),
            }
        }
    }
}

/// `query.column_pairs` naming every pair of the demo's comparable
/// columns, so random expressions may combine any two.
fn all_pairs() -> String {
    let names: Vec<String> = NUM_COLUMNS
        .iter()
        .chain(DATE_COLUMNS)
        .chain(TEXT_COLUMNS)
        .map(|c| {
            let (alias, column) = c.split_once('.').unwrap();
            let dataset = if alias == "c" {
                "customers"
            } else {
                "audience"
            };
            format!("\"{dataset}.{column}\"")
        })
        .collect();
    let mut pairs = Vec::new();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            pairs.push(format!("[{a}, {b}]"));
        }
    }
    format!("column_pairs = [{}]", pairs.join(", "))
}

/// Thousands of random derived dimensions, filters and shares over rows at
/// the ends of every admitted range: each is answered or refused before
/// running, and none fails beneath the release boundary.
#[tokio::test]
async fn random_derived_expressions_never_fail_beneath_the_boundary() {
    use rand::Rng;
    use rand::SeedableRng;
    // Under privacy every non-identifier column may be compared.
    let path = common::policies_dir().join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (_, privacy) = text.split_once("[privacy]").unwrap();
    let shipped = cleanroom::agreements::parse_policy(&text, &path).unwrap();
    let widest = widest_dates();
    let policy_text = std::fs::read_to_string(&path)
        .unwrap()
        .split_once("[privacy]")
        .unwrap()
        .0
        .replace("min = 2020-01-01", "min = 1900-01-01")
        .replace("max = 2027-12-31\ncompare", "max = 2200-12-31\ncompare")
        .replace(
            "column_pairs = [[\"customers.last_purchase\", \"audience.first_exposure\"]]",
            &all_pairs(),
        )
        + "[privacy]"
        + privacy;
    let policy = cleanroom::agreements::parse_policy(&policy_text, &path).unwrap();
    assert!(policy.privacy().is_some() && shipped.privacy().is_some());
    assert_eq!(policy.datasets(), widest.datasets());
    assert_eq!(policy.query().column_pairs().len(), 45);
    let (first, last) = (days_from_civil(1900, 1, 1), days_from_civil(2200, 12, 31));
    let rows: Vec<Row> = (0..12)
        .map(|i| Row {
            ltv: [Some(0.0), Some(5000.0), None][i as usize % 3],
            lead_score: [Some(0), Some(100), None][i as usize % 3],
            purchases: [Some(0), Some(20), None][(i as usize / 3) % 3],
            last_purchase: [Some(first), Some(last), None][i as usize % 3],
            first_exposure: [Some(last), Some(first), None][(i as usize / 2) % 3],
            exposures: [Some(0), Some(100), None][(i as usize / 4) % 3],
            spend: [Some(0.0), Some(2000.0), None][i as usize % 3],
            ..Row::new(i)
        })
        .collect();
    let data = tables(&policy, &rows, &rows);
    let seed = std::env::var("CLEANROOM_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_125);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut answered, mut refused) = (0, 0);
    let mut rules = std::collections::BTreeMap::new();
    for _ in 0..1500 {
        let ty = [Ty::Num, Ty::Date, Ty::Text, Ty::Bool][rng.random_range(0..4)];
        let (g, w, s) = (
            expression(&mut rng, ty, 3),
            expression(&mut rng, Ty::Bool, 3),
            expression(&mut rng, Ty::Bool, 2),
        );
        let sql = format!(
            "SELECT {g} AS k, COUNT(*), AVG(CASE WHEN {s} THEN 1 ELSE 0 END) FROM customers c JOIN audience a ON c.email = a.email WHERE {w} GROUP BY k"
        );
        match common::workers::run(&policy, "acme", &data, &sql).await {
            Ok(_) => answered += 1,
            Err(QueryError::Refused(v)) => {
                refused += 1;
                *rules.entry(v.rule).or_insert(0u32) += 1;
            }
            Err(e) => panic!("seed {seed}: {sql}: failed beneath the boundary: {e:?}"),
        }
    }
    eprintln!("random derived expressions: {answered} answered, {refused} refused: {rules:?}");
    assert!(answered > 100, "{answered} answered, {refused} refused");
}
