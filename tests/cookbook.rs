//! The cookbook (docs/cookbook.md) on a real server: each analysis runs on
//! the synthetic partners' uploads, under thresholds and under differential
//! privacy, and is compared with an independent computation from the
//! generator's own files (the CSVs and the people truth), never with the
//! product's matching or SQL.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use cleanroom::client::QueryAnswer;
use common::people::{civil, days_from_civil};
use common::{Setup, TestServer, demo_policies, upload_demo};

/// Released rows as (key texts, numbers).
type Rows = BTreeMap<Vec<String>, Vec<f64>>;

/// The product's rows: the first `keys` columns as text (timestamps as
/// their day), the rest as numbers.
fn product_rows(answer: &QueryAnswer, keys: usize) -> Rows {
    let mut out = Rows::new();
    for b in &answer.batches {
        let texts: Vec<_> = (0..keys)
            .map(|i| {
                let col = b.column(i);
                let col = match col.data_type() {
                    DataType::Timestamp(..) => {
                        arrow::compute::cast(col, &DataType::Date32).unwrap()
                    }
                    _ => std::sync::Arc::clone(col),
                };
                arrow::compute::cast(&col, &DataType::Utf8).unwrap()
            })
            .collect();
        let numbers: Vec<_> = (keys..b.num_columns())
            .map(|i| arrow::compute::cast(b.column(i), &DataType::Float64).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            let key = texts
                .iter()
                .map(|t| t.as_string::<i32>().value(r).to_string())
                .collect();
            let values = numbers
                .iter()
                .map(|n| n.as_primitive::<Float64Type>().value(r))
                .collect();
            out.insert(key, values);
        }
    }
    out
}

/// One acme customer the upload keeps, and its globex user if any.
#[derive(Debug, Clone)]
struct Customer {
    region: String,
    value: f64,
    purchases: f64,
    last_purchase: i32,
    lead_score: i64,
    user: Option<User>,
}

#[derive(Debug, Clone)]
struct User {
    segment: String,
    exposures: i64,
    first_exposure: Option<i32>,
}

fn day(text: &str) -> i32 {
    let mut parts = text.split('-').map(|p| p.parse::<i64>().unwrap());
    let (y, m, d) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    days_from_civil(y, m as u32, d as u32)
}

fn day_text(days: i32) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The synthetic truth, read from the generator's files.
fn truth(dir: &Path) -> Vec<Customer> {
    let read = |name: &str| {
        let mut r = csv::Reader::from_path(dir.join(name)).unwrap();
        let headers = r.headers().unwrap().clone();
        r.records()
            .map(|rec| {
                let rec = rec.unwrap();
                headers
                    .iter()
                    .zip(rec.iter())
                    .map(|(h, v)| (h.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            })
            .collect::<Vec<_>>()
    };
    let users: BTreeMap<String, User> = read(cleanroom::synth::GLOBEX_FILE)
        .into_iter()
        .map(|u| {
            let first = u["first_exposure"].clone();
            (
                u["user_id"].clone(),
                User {
                    segment: u["interest_segment"].clone(),
                    exposures: u["ad_exposures"].parse().unwrap(),
                    first_exposure: (!first.is_empty()).then(|| day(&first)),
                },
            )
        })
        .collect();
    let customers: BTreeMap<String, BTreeMap<String, String>> = read(cleanroom::synth::ACME_FILE)
        .into_iter()
        .map(|c| (c["customer_id"].clone(), c))
        .collect();
    read(cleanroom::synth::PEOPLE_FILE)
        .into_iter()
        .map(|p| {
            let c = &customers[&p["customer_id"]];
            Customer {
                region: c["region"].clone(),
                value: c["lifetime_value"].parse().unwrap(),
                purchases: c["purchases"].parse().unwrap(),
                last_purchase: day(&c["last_purchase"]),
                lead_score: c["lead_score"].parse().unwrap(),
                user: users.get(&p["user_id"]).cloned(),
            }
        })
        .collect()
}

/// Accumulates groups: people and per-column values.
#[derive(Default)]
struct Groups(BTreeMap<Vec<String>, Vec<Vec<f64>>>);

impl Groups {
    fn add(&mut self, key: Vec<String>, values: Vec<f64>) {
        let g = self.0.entry(key).or_default();
        if g.is_empty() {
            *g = vec![Vec::new(); values.len()];
        }
        for (col, v) in g.iter_mut().zip(values) {
            col.push(v);
        }
    }

    /// Groups of at least `min` people (one row per person here), each
    /// column as `how` says: "count", "avg" or "sum".
    fn released(&self, min: usize, how: &[&str]) -> Rows {
        self.0
            .iter()
            .filter(|(_, cols)| cols.first().map_or(0, Vec::len) >= min)
            .map(|(k, cols)| {
                let values = cols
                    .iter()
                    .zip(how)
                    .map(|(vs, how)| match *how {
                        "count" => vs.len() as f64,
                        "sum" => vs.iter().sum(),
                        _ => vs.iter().sum::<f64>() / vs.len() as f64,
                    })
                    .collect();
                (k.clone(), values)
            })
            .collect()
    }
}

const AS_OF: &str = "2026-06-30";

/// One cookbook analysis: how to ask it, and its answer from the truth.
struct Analysis {
    name: &'static str,
    template: Option<(&'static str, Vec<(&'static str, &'static str)>)>,
    sql: &'static str,
    keys: usize,
    /// Per output column after the keys: "count", "avg".
    how: Vec<&'static str>,
    reference: fn(&[Customer]) -> Groups,
}

const VALUE_DISTRIBUTION: &str = "SELECT floor(c.lifetime_value / 1000) * 1000 AS value_from, a.interest_segment, COUNT(*) AS customers FROM customers c JOIN audience a ON c.email = a.email GROUP BY value_from, a.interest_segment ORDER BY value_from, a.interest_segment";
const LEAD_SCORES: &str = "SELECT floor(c.lead_score / 20) * 20 AS score_from, a.interest_segment, COUNT(*) AS customers FROM customers c JOIN audience a ON c.email = a.email GROUP BY score_from, a.interest_segment ORDER BY score_from, a.interest_segment";

/// Matched customers counted by (bucket, segment).
fn matched_by_bucket(cs: &[Customer], bucket: fn(&Customer) -> f64) -> Groups {
    let mut g = Groups::default();
    for c in cs {
        if let Some(u) = &c.user {
            g.add(
                vec![format!("{:?}", bucket(c)), u.segment.clone()],
                vec![1.0],
            );
        }
    }
    g
}

fn analyses() -> Vec<Analysis> {
    vec![
        Analysis {
            name: "overlap by segment",
            template: Some(("overlap_by_segment", vec![("regions", "north,east")])),
            sql: "",
            keys: 1,
            how: vec!["count"],
            reference: |cs| {
                let mut g = Groups::default();
                for c in cs {
                    if let Some(u) = &c.user
                        && (c.region == "north" || c.region == "east")
                    {
                        g.add(vec![u.segment.clone()], vec![1.0]);
                    }
                }
                g
            },
        },
        Analysis {
            name: "lift by region",
            template: Some(("lift_by_region", vec![("min_exposures", "1")])),
            sql: "",
            keys: 2,
            how: vec!["count", "avg", "avg"],
            reference: |cs| {
                let mut g = Groups::default();
                for c in cs {
                    let exposed = c.user.as_ref().is_some_and(|u| u.exposures >= 1);
                    let label = if exposed { "exposed" } else { "unexposed" };
                    g.add(
                        vec![c.region.clone(), label.into()],
                        vec![1.0, c.value, c.purchases],
                    );
                }
                g
            },
        },
        Analysis {
            name: "lifetime value distribution by segment",
            template: None,
            sql: VALUE_DISTRIBUTION,
            keys: 2,
            how: vec!["count"],
            reference: |cs| matched_by_bucket(cs, |c| (c.value / 1000.0).floor() * 1000.0),
        },
        Analysis {
            name: "churn risk by segment",
            template: Some(("churn_risk", vec![("as_of", AS_OF)])),
            sql: "",
            keys: 1,
            how: vec!["count", "avg"],
            reference: |cs| {
                let cutoff = day(AS_OF) - 90;
                let mut g = Groups::default();
                for c in cs {
                    if let Some(u) = &c.user {
                        let lapsed = f64::from(u8::from(c.last_purchase < cutoff));
                        g.add(vec![u.segment.clone()], vec![1.0, lapsed]);
                    }
                }
                g
            },
        },
        Analysis {
            name: "lead score distribution by segment",
            template: None,
            sql: LEAD_SCORES,
            keys: 2,
            how: vec!["count"],
            reference: |cs| matched_by_bucket(cs, |c| (c.lead_score / 20 * 20) as f64),
        },
        Analysis {
            name: "attribution by week",
            template: Some(("attribution_by_week", vec![])),
            sql: "",
            keys: 1,
            how: vec!["count"],
            reference: |cs| {
                let mut g = Groups::default();
                for c in cs {
                    let Some(first) = c.user.as_ref().and_then(|u| u.first_exposure) else {
                        continue;
                    };
                    let p = c.last_purchase;
                    if first <= p && p <= first + 14 {
                        // Weeks start on Monday; 1970-01-01 was a Thursday.
                        let monday = p - (p + 3).rem_euclid(7);
                        g.add(vec![day_text(monday)], vec![1.0]);
                    }
                }
                g
            },
        },
    ]
}

async fn ask(
    client: &mut cleanroom::client::Client,
    a: &Analysis,
    epsilon: Option<f64>,
) -> QueryAnswer {
    match &a.template {
        Some((name, params)) => {
            let params = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            client
                .run_template("retail-media-demo", name, &params, epsilon)
                .await
        }
        None => {
            client
                .query_with_epsilon("retail-media-demo", a.sql, epsilon)
                .await
        }
    }
    .unwrap_or_else(|e| panic!("{}: {e}", a.name))
}

/// A server with the synthetic partners' uploads; the folders it uses
/// live as long as the returned guard.
async fn server_with_synth(
    privacy: Option<&str>,
) -> (TestServer, [tempfile::TempDir; 2], Vec<Customer>) {
    let policies = demo_policies(privacy);
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (dir, _) = common::synth(12_000, 0.5);
    upload_demo(&server, "acme", dir.path()).await;
    upload_demo(&server, "globex", dir.path()).await;
    let people = truth(dir.path());
    (server, [policies, dir], people)
}

#[test]
fn calendar_round_trips() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(day("2026-03-01"), common::people::MARCH_2026);
    for days in [-1000, 0, 59, 60, 20_000, 20_513, 30_000] {
        let (y, m, d) = civil(days);
        assert_eq!(days_from_civil(y, m, d), days);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookbook_answers_equal_the_synthetic_truth_under_thresholds() {
    let (server, _folders, people) = server_with_synth(None).await;
    let mut acme = server.client("acme").await;
    for a in analyses() {
        let answer = ask(&mut acme, &a, None).await;
        // The answers docs/cookbook.md shows (run with --nocapture).
        eprintln!(
            "{}:\n{}",
            a.name,
            cleanroom::cli::render_answer(&answer, cleanroom::cli::OutputFormat::Table).unwrap()
        );
        let got = product_rows(&answer, a.keys);
        let want = (a.reference)(&people).released(50, &a.how);
        assert!(!want.is_empty(), "{}: the truth has no group of 50", a.name);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{}",
            a.name
        );
        for (key, w) in &want {
            let g = &got[key];
            for (x, y) in g.iter().zip(w) {
                assert!(
                    (x - y).abs() <= 1e-9 * y.abs().max(1.0),
                    "{} {key:?}: {g:?} against {w:?}",
                    a.name
                );
            }
        }
        if let Some((name, _)) = &a.template {
            assert_eq!(&answer.summary.template, name);
            assert_eq!(answer.summary.params_hash.len(), 64);
        }
    }
    // The lift is there to be found: exposed customers are worth more.
    let lift = product_rows(&ask(&mut acme, &analyses()[1], None).await, 2);
    for region in ["north", "south", "east", "west"] {
        let exposed = lift[&vec![region.to_string(), "exposed".to_string()]][1];
        let unexposed = lift[&vec![region.to_string(), "unexposed".to_string()]][1];
        assert!(
            exposed > unexposed * 1.1,
            "{region}: {exposed} vs {unexposed}"
        );
    }
}

/// Under privacy each released value lies within the answer's reported
/// 95% interval around the truth in at least 90% of repeated runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookbook_answers_lie_within_their_reported_intervals_under_privacy() {
    let privacy = "epsilon_total = 1000.0\nepsilon_per_query_max = 5.0\ndelta = 1e-7\nmax_groups_per_person = 1";
    let (server, _folders, people) = server_with_synth(Some(privacy)).await;
    let mut acme = server.client("acme").await;
    let (mut inside, mut cells) = (0u64, 0u64);
    for a in analyses() {
        let want = (a.reference)(&people).released(1, &a.how);
        let mut released_somewhere = false;
        for _ in 0..8 {
            let answer = ask(&mut acme, &a, Some(2.0)).await;
            let report = answer.header.privacy.clone().expect("a privacy report");
            for (key, values) in product_rows(&answer, a.keys) {
                released_somewhere = true;
                let truth = want
                    .get(&key)
                    .unwrap_or_else(|| panic!("{}: released {key:?} has no people", a.name));
                let n = truth[0];
                for ((got, exact), noise) in values.iter().zip(truth).zip(&report.columns) {
                    let half = match noise.count_scale {
                        // AVG: the noise on the sum over the noisy count.
                        Some(count_scale) => {
                            let count_half = count_scale * 20f64.ln();
                            (noise.half_width_95 + exact.abs() * count_half)
                                / (n - count_half).max(1.0)
                        }
                        None => noise.half_width_95,
                    };
                    cells += 1;
                    inside += u64::from((got - exact).abs() <= half + 1e-9);
                }
            }
        }
        assert!(released_somewhere, "{}: nothing released", a.name);
    }
    let share = inside as f64 / cells as f64;
    eprintln!(
        "privacy: {inside} of {cells} released values within their 95% interval ({share:.3})"
    );
    assert!(cells > 100, "{cells} values");
    assert!(
        share >= 0.9,
        "{inside} of {cells} within the reported interval"
    );
}
