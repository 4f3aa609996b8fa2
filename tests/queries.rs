//! Governed queries: the policy cases in tests/query_cases.toml, and results
//! checked against an independent computation.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, FixedSizeBinaryBuilder, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
use arrow::record_batch::RecordBatch;
use cleanroom::policy::Policy;
use cleanroom::psi::{Side, match_people};
use cleanroom::query::{QueryError, TableData, run};
use serde::Deserialize;

fn demo() -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml");
    cleanroom::policy::parse_policy(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

fn fp(person: u64, kind: u8) -> [u8; 32] {
    let mut input = [0u8; 9];
    input[..8].copy_from_slice(&person.to_le_bytes());
    input[8] = kind;
    *blake3::hash(&input).as_bytes()
}

const REGIONS: [&str; 4] = ["north", "south", "east", "west"];
const AGES: [&str; 6] = ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"];
const SEGMENTS: [&str; 6] = ["sports", "travel", "home", "tech", "fashion", "food"];

/// Attribute values of person `p`, a pure function so tests can recompute them.
fn region(p: u64) -> &'static str {
    REGIONS[(p * 7 % 4) as usize]
}
fn segment(p: u64) -> &'static str {
    // "food" is rare: few people, so its groups fall under the threshold.
    if p.is_multiple_of(97) {
        "food"
    } else {
        SEGMENTS[(p * 13 % 5) as usize]
    }
}
fn ltv(p: u64) -> f64 {
    (p * 37 % 5000) as f64
}
fn spend(p: u64) -> f64 {
    (p * 11 % 2000) as f64 / 2.0
}

/// customers: people 0..n; audience: people 0..shared and n..; email on all
/// rows, phone on even people.
fn tables(n: u64, shared: u64) -> Vec<TableData> {
    tables_of((0..n).collect(), shared)
}

/// As [`tables`], with the customers' people given (repeats allowed).
fn tables_of(customers_ids: Vec<u64>, shared: u64) -> Vec<TableData> {
    let policy = demo();
    let n = customers_ids.iter().max().map_or(0, |m| m + 1);
    let audience_ids: Vec<u64> = (0..shared).chain(n..n + (n - shared)).collect();
    let ids = |people: &[u64]| {
        let mut email = FixedSizeBinaryBuilder::new(32);
        let mut phone = FixedSizeBinaryBuilder::new(32);
        for p in people {
            email.append_value(fp(*p, 0)).unwrap();
            if p.is_multiple_of(2) {
                phone.append_value(fp(*p, 1)).unwrap();
            } else {
                phone.append_null();
            }
        }
        (email.finish(), phone.finish())
    };
    let (ce, cp) = ids(&customers_ids);
    let customers = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("email", DataType::FixedSizeBinary(32), true),
            Field::new("phone", DataType::FixedSizeBinary(32), true),
            Field::new("age_band", DataType::Utf8, true),
            Field::new("region", DataType::Utf8, true),
            Field::new("lifetime_value", DataType::Float64, true),
        ])),
        vec![
            Arc::new(ce),
            Arc::new(cp),
            Arc::new(StringArray::from_iter_values(
                customers_ids.iter().map(|p| AGES[(p % 6) as usize]),
            )),
            Arc::new(StringArray::from_iter_values(
                customers_ids.iter().map(|p| region(*p)),
            )),
            Arc::new(Float64Array::from_iter_values(
                customers_ids.iter().map(|p| ltv(*p)),
            )),
        ],
    )
    .unwrap();
    let (ae, ap) = ids(&audience_ids);
    let audience = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("email", DataType::FixedSizeBinary(32), true),
            Field::new("phone", DataType::FixedSizeBinary(32), true),
            Field::new("interest_segment", DataType::Utf8, true),
            Field::new("ad_exposures", DataType::Int64, true),
            Field::new("spend", DataType::Float64, true),
        ])),
        vec![
            Arc::new(ae),
            Arc::new(ap),
            Arc::new(StringArray::from_iter_values(
                audience_ids.iter().map(|p| segment(*p)),
            )),
            Arc::new(Int64Array::from_iter_values(
                audience_ids.iter().map(|p| (p % 20) as i64),
            )),
            Arc::new(Float64Array::from_iter_values(
                audience_ids.iter().map(|p| spend(*p)),
            )),
        ],
    )
    .unwrap();
    let (c, a) = (vec![customers], vec![audience]);
    let ids: &[(usize, &str)] = &[(0, "email"), (1, "phone")];
    let m = match_people(
        Side {
            batches: &c,
            identifiers: ids,
        },
        Side {
            batches: &a,
            identifiers: ids,
        },
    );
    let split = customers_ids.len();
    vec![
        TableData::new(
            policy.dataset("customers").unwrap().clone(),
            c,
            m.person_of_row[..split].to_vec(),
        ),
        TableData::new(
            policy.dataset("audience").unwrap().clone(),
            a,
            m.person_of_row[split..].to_vec(),
        ),
    ]
}

#[derive(Debug, Deserialize)]
struct Cases {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    sql: String,
    decision: String,
    rule: Option<String>,
}

#[tokio::test]
async fn query_policy_cases() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/query_cases.toml"),
    )
    .unwrap();
    let cases: Cases = toml::from_str(&text).unwrap();
    assert!(cases.case.len() >= 50, "{} cases", cases.case.len());
    let policy = demo();
    let data = tables(2_000, 800);
    let mut failures = Vec::new();
    for case in &cases.case {
        let outcome = run(&policy, &data, &case.sql).await;
        let got = match &outcome {
            Ok(_) => ("allow".to_string(), None),
            Err(QueryError::Refused(v)) => (
                if v.policy { "deny" } else { "invalid" }.to_string(),
                Some(v.rule.to_string()),
            ),
            Err(QueryError::Engine(e)) => ("engine error".to_string(), Some(e.clone())),
        };
        let expected = (case.decision.clone(), case.rule.clone());
        if got != expected {
            failures.push(format!("{}: expected {expected:?}, got {got:?}", case.name));
        }
        if let Err(QueryError::Refused(v)) = &outcome {
            let text = v.to_string();
            assert!(
                !text.contains("north")
                    && !text.contains("passwd")
                    && !text.contains(&case.sql[..case.sql.len().min(30)]),
                "{}: message echoes the query: {text}",
                case.name
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.case.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn governed_results_equal_the_plain_computation_without_small_groups() {
    let policy = demo();
    let (n, shared) = (6_000u64, 2_500u64);
    let data = tables(n, shared);
    let sql = "SELECT c.region, a.interest_segment, COUNT(*) AS n, SUM(a.spend) AS spend, AVG(c.lifetime_value) AS ltv \
               FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region, a.interest_segment";
    let outcome = run(&policy, &data, sql).await.unwrap();

    // Independently: matched people are 0..shared, one row each side.
    let mut plain: BTreeMap<(String, String), (u64, f64, f64)> = BTreeMap::new();
    for p in 0..shared {
        let e = plain
            .entry((region(p).to_string(), segment(p).to_string()))
            .or_default();
        e.0 += 1;
        e.1 += spend(p);
        e.2 += ltv(p);
    }
    let min = u64::from(policy.query().min_group_size());
    let expected: BTreeMap<_, _> = plain.iter().filter(|(_, v)| v.0 >= min).collect();
    let small = plain.len() - expected.len();
    assert!(small > 0, "the data must have groups under the threshold");
    assert_eq!(outcome.suppressed, small as u64);

    let mut got: HashMap<(String, String), (u64, f64, f64)> = HashMap::new();
    for b in &outcome.batches {
        let r = b.column(0).as_string::<i32>();
        let s = b.column(1).as_string::<i32>();
        let count = b.column(2).as_primitive::<Int64Type>();
        let sum = b.column(3).as_primitive::<Float64Type>();
        let avg = b.column(4).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            got.insert(
                (r.value(i).into(), s.value(i).into()),
                (count.value(i) as u64, sum.value(i), avg.value(i)),
            );
        }
    }
    assert_eq!(got.len(), expected.len());
    for ((r, s), (count, sum, ltv_sum)) in expected {
        let (gc, gs, ga) = got[&(r.clone(), s.clone())];
        assert_eq!(gc, *count, "{r}/{s}");
        assert!((gs - sum).abs() < 1e-6, "{r}/{s}");
        assert!((ga - ltv_sum / *count as f64).abs() < 1e-6, "{r}/{s}");
    }

    // A query without GROUP BY over a tiny matched set is suppressed whole.
    let tiny = tables(300, 20);
    let outcome = run(
        &policy,
        &tiny,
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email",
    )
    .await
    .unwrap();
    assert_eq!(outcome.rows(), 0);
    assert_eq!(outcome.suppressed, 1);
}

#[tokio::test]
async fn people_are_counted_not_rows() {
    let policy = demo();
    // 30 matched people, each with two customer rows: 60 joined rows but 30 people.
    let ids: Vec<u64> = (0..200).flat_map(|p| [p, p]).collect();
    let data = tables_of(ids, 30);
    assert!(!data[0].one_row_per_person);
    let outcome = run(
        &policy,
        &data,
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email",
    )
    .await
    .unwrap();
    assert_eq!(
        outcome.rows(),
        0,
        "30 people are under the minimum of 50, whatever the row count"
    );
    assert_eq!(outcome.suppressed, 1);

    // 60 matched people with two rows each pass.
    let ids: Vec<u64> = (0..200).flat_map(|p| [p, p]).collect();
    let data = tables_of(ids, 60);
    let outcome = run(
        &policy,
        &data,
        "SELECT COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email",
    )
    .await
    .unwrap();
    assert_eq!(outcome.rows(), 1);
    let n = outcome.batches[0]
        .column(0)
        .as_primitive::<Int64Type>()
        .value(0);
    assert_eq!(n, 120, "COUNT(*) still counts joined rows");
}
