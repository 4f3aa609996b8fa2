//! An empirical privacy audit of the released values, through the real
//! server: two servers hold neighbouring data (globex's audience with and
//! without one victim), and the same query runs on each many times. For
//! events over the answers ("the count is at least t", "the group is
//! shown") the rates on the two sides bound the epsilon the mechanism can
//! have from below: epsilon >= ln((P[S | with] - delta) / P[S | without]),
//! and the same the other way round, with 95% Clopper-Pearson intervals
//! taken in the direction that makes the bound smaller. Half the runs
//! choose the event, the other half measure it, so the choice does not
//! inflate the figure. A lower bound above the declared epsilon is a bug;
//! one far below it only says the audit's events are weak.
//!
//! ```text
//! cargo bench --bench privacy_audit                 # 2,000 runs per side and mechanism
//! cargo bench --bench privacy_audit -- --runs 500
//! ```

mod common;
#[path = "../tests/common/mod.rs"]
mod suite_support;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Float64Type};
use common::arg;
use suite_support::people::{Row, audience, customers, demo_policy};
use suite_support::{Setup, TestServer, demo_policies, upload_people};

const PRIVACY: &str = "epsilon_total = 1e7\nepsilon_per_query_max = 1.0\ndelta = 1e-6\nmax_groups_per_person = 1\nmax_rows_per_person = 1";
const EPSILON: f64 = 1.0;
const DELTA: f64 = 1e-6;

/// One mechanism under audit: the query, and the people on both sides.
struct Case {
    name: String,
    sql: &'static str,
    /// People both parties hold, besides the victim.
    shared: u64,
}

const COUNT: &str = "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email";

/// The noisy threshold a group of `COUNT` must pass at [`EPSILON`], as the
/// answer's report gives it.
async fn threshold() -> u64 {
    let policy = demo_policy(Some(PRIVACY), 50);
    let rows: Vec<Row> = (0..1_000).map(Row::new).collect();
    let tables = suite_support::people::tables(&policy, &rows, &rows);
    let outcome = cleanroom::query::run(&policy, "acme", &tables, COUNT)
        .await
        .expect("the count runs");
    outcome.privacy.expect("a privacy report").threshold
}

async fn cases() -> Vec<Case> {
    let t = threshold().await;
    vec![
        Case {
            name: "COUNT(*) of a group of 200".into(),
            sql: COUNT,
            shared: 200,
        },
        Case {
            name: "SUM(a.spend) of a group of 200, the victim at the bound".into(),
            sql: "SELECT SUM(a.spend) FROM customers c JOIN audience a ON c.email = a.email",
            shared: 200,
        },
        Case {
            name: format!(
                "the noisy threshold: a group of {} people without the victim, {t} with (threshold {t})",
                t - 1
            ),
            sql: COUNT,
            shared: t - 1,
        },
    ]
}

/// The victim: globex's, at the top of every bound.
fn victim() -> Row {
    Row {
        spend: Some(2000.0),
        exposures: Some(100),
        ..Row::new(1_000_000)
    }
}

/// One answer: the released value, or None when the group was not shown.
async fn answers(case: &Case, with_victim: bool, runs: u64) -> Vec<Option<f64>> {
    let policies = demo_policies(Some(PRIVACY));
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let policy = demo_policy(Some(PRIVACY), 50);
    let shared: Vec<Row> = (0..case.shared)
        .map(|id| Row {
            spend: Some((id % 100) as f64),
            ..Row::new(id)
        })
        .collect();
    let mut acme = shared.clone();
    acme.push(Row::new(victim().id));
    let mut globex = shared;
    if with_victim {
        globex.push(victim());
    }
    upload_people(&server, "acme", &customers(&policy, &acme), "c1").await;
    upload_people(&server, "globex", &audience(&policy, &globex), "a1").await;
    let mut client = server.client("acme").await;
    let mut out = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let answer = client
            .query_with_epsilon("retail-media-demo", case.sql, Some(EPSILON))
            .await
            .expect("the audited query runs");
        let value = answer.batches.iter().find(|b| b.num_rows() > 0).map(|b| {
            let c = arrow::compute::cast(b.column(0), &DataType::Float64).unwrap();
            c.as_primitive::<Float64Type>().value(0)
        });
        out.push(value);
    }
    server.stop().await.unwrap();
    out
}

/// ln of the binomial probability of `k` in `n` at `p`.
fn ln_pmf(n: u64, k: u64, p: f64) -> f64 {
    let ln_choose =
        ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0);
    let a = if k == 0 { 0.0 } else { k as f64 * p.ln() };
    let b = if k == n {
        0.0
    } else {
        (n - k) as f64 * (1.0 - p).ln()
    };
    ln_choose + a + b
}

/// Lanczos approximation of ln Γ(x), x > 0.
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI.ln()
            - (std::f64::consts::PI * x).sin().ln()
            - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// P[X <= k] for X ~ Binomial(n, p).
fn cdf(n: u64, k: u64, p: f64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    (0..=k).map(|i| ln_pmf(n, i, p).exp()).sum::<f64>().min(1.0)
}

/// The p where `f(p)` (falling in p) crosses `target`, by bisection.
fn solve(f: impl Fn(f64) -> f64, target: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if f(mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// The 95% Clopper-Pearson interval of `k` successes in `n`.
fn interval(n: u64, k: u64) -> (f64, f64) {
    let lower = if k == 0 {
        0.0
    } else {
        // P[X >= k | p] = 0.025, i.e. P[X <= k-1 | p] = 0.975.
        solve(|p| cdf(n, k - 1, p), 0.975)
    };
    let upper = if k == n {
        1.0
    } else {
        solve(|p| cdf(n, k, p), 0.025)
    };
    (lower, upper)
}

/// The lower bound on epsilon an event gives: from `k1` of `n` with and
/// `k2` of `n` without the victim, both directions.
fn bound(n: u64, k1: u64, k2: u64) -> f64 {
    let one_way = |a: u64, b: u64| {
        let (a_lo, _) = interval(n, a);
        let (_, b_hi) = interval(n, b);
        if a_lo - DELTA <= 0.0 || b_hi <= 0.0 {
            0.0
        } else {
            ((a_lo - DELTA) / b_hi).ln().max(0.0)
        }
    };
    one_way(k1, k2).max(one_way(k2, k1))
}

/// Events over answers: "shown", and "shown with a value of at least t".
fn events(answers: &[Option<f64>]) -> Vec<Option<f64>> {
    let mut values: Vec<f64> = answers.iter().flatten().copied().collect();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let mut out = vec![None];
    out.extend(values.into_iter().map(Some));
    out
}

fn holds(event: Option<f64>, answer: Option<f64>) -> bool {
    match (event, answer) {
        (None, a) => a.is_some(),
        (Some(t), Some(v)) => v >= t,
        (Some(_), None) => false,
    }
}

#[tokio::main]
async fn main() {
    let runs = arg("--runs", 2_000);
    println!(
        "empirical privacy audit: {runs} runs per side, epsilon {EPSILON} per query, delta {DELTA}"
    );
    for case in &cases().await {
        let started = std::time::Instant::now();
        let with = answers(case, true, runs).await;
        let without = answers(case, false, runs).await;
        let half = (runs / 2) as usize;
        // Choose the event on the first half...
        let count =
            |a: &[Option<f64>], e: Option<f64>| a.iter().filter(|x| holds(e, **x)).count() as u64;
        let mut best = (0.0f64, None);
        for e in events(&with[..half])
            .into_iter()
            .chain(events(&without[..half]))
        {
            let b = bound(
                half as u64,
                count(&with[..half], e),
                count(&without[..half], e),
            );
            if b > best.0 {
                best = (b, e);
            }
        }
        // ...and measure it on the second.
        let n = (runs as usize - half) as u64;
        let (k1, k2) = (
            count(&with[half..], best.1),
            count(&without[half..], best.1),
        );
        let measured = bound(n, k1, k2);
        let shown = |a: &[Option<f64>]| a.iter().filter(|x| x.is_some()).count();
        let mean = |a: &[Option<f64>]| {
            let v: Vec<f64> = a.iter().flatten().copied().collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let event = match best.1 {
            None => "the group is shown".to_string(),
            Some(t) => format!("the value is at least {t}"),
        };
        println!(
            "{}\n  shown {}/{} with the victim, {}/{} without; mean {:.2} against {:.2}\n  event: {event}: {k1}/{n} against {k2}/{n}\n  empirical epsilon >= {measured:.3} (95%), declared {EPSILON} for the whole query ({:.1} s)",
            case.name,
            shown(&with),
            runs,
            shown(&without),
            runs,
            mean(&with),
            mean(&without),
            started.elapsed().as_secs_f64(),
        );
        assert!(
            measured <= EPSILON,
            "{}: the empirical lower bound {measured} passes the declared epsilon",
            case.name
        );
    }
}
