//! Governed query cost: matching, then a join + group-by with and without
//! governance, on generated demo-shaped data held in memory.
//!
//! ```text
//! cargo bench --bench query                      # 1M x 1M rows
//! cargo bench --bench query -- --rows 10000000   # 10M x 10M
//! ```
//!
//! "Plain" runs the same SQL in the same restricted session without the
//! checker and the minimum-group-size rewrite. "Thresholds" is the demo
//! agreement without its `[privacy]` section; "private" is the demo as
//! shipped, with differential privacy (per-person aggregation, bounding,
//! noise, noisy threshold). Overheads are over plain time, best of five
//! runs each.

mod common;

use common::{arg, side};

use std::time::{Duration, Instant};

use cleanroom::policy::Policy;

const SQL: &str = "SELECT c.region, a.interest_segment, COUNT(*) AS people, AVG(c.lifetime_value) AS ltv, \
                   SUM(a.spend) AS spend FROM customers c JOIN audience a ON c.email = a.email \
                   GROUP BY c.region, a.interest_segment";

fn best(times: &[Duration]) -> Duration {
    *times.iter().min().expect("at least one run")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = arg("--rows", 1_000_000);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml");
    let text = std::fs::read_to_string(&path)?;
    let policy: Policy = cleanroom::agreements::parse_policy(&text, &path)?;
    let (without_privacy, _) = text
        .split_once("[privacy]")
        .ok_or("the demo agreement has a [privacy] section")?;
    let thresholds: Policy = cleanroom::agreements::parse_policy(without_privacy, &path)?;
    let shared = rows * 3 / 10;
    let t = Instant::now();
    let customers: Vec<u64> = (0..rows).collect();
    let audience: Vec<u64> = (0..shared).chain(rows..2 * rows - shared).collect();
    let batches = vec![side(&customers, true), side(&audience, false)];
    println!(
        "generated {rows} x {rows} rows in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let tables = cleanroom::query::agreement_tables(&policy, batches);
    let matching = t.elapsed();
    println!(
        "matching (people across both datasets)   {:>8.3} s",
        matching.as_secs_f64()
    );

    let mut governed = Vec::new();
    let mut private = Vec::new();
    let mut plain = Vec::new();
    let (mut groups, mut private_groups) = (0, 0);
    for _ in 0..5 {
        let t = Instant::now();
        let outcome = cleanroom::query::run(&thresholds, "acme", &tables, SQL).await?;
        governed.push(t.elapsed());
        groups = outcome.rows();

        let t = Instant::now();
        let outcome = cleanroom::query::run(&policy, "acme", &tables, SQL).await?;
        private.push(t.elapsed());
        private_groups = outcome.rows();

        let t = Instant::now();
        let ctx = cleanroom::query::session(&tables)?;
        let batches = ctx.sql(SQL).await?.collect().await?;
        plain.push(t.elapsed());
        assert!(!batches.is_empty());
    }
    let (g, d, p) = (best(&governed), best(&private), best(&plain));
    println!(
        "governed, thresholds ({groups} groups)         {:>8.3} s",
        g.as_secs_f64()
    );
    println!(
        "governed, differential privacy ({private_groups} groups) {:>8.3} s",
        d.as_secs_f64()
    );
    println!(
        "same plan without governance             {:>8.3} s",
        p.as_secs_f64()
    );
    println!(
        "thresholds overhead                      {:>8.1} %",
        (g.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "differential privacy overhead            {:>8.1} %",
        (d.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0
    );

    // Under thresholds, a condition inside an aggregate splits groups into
    // cells, and a LEFT JOIN counts its stand-in unmatched rows: each shape
    // against the same SQL without governance.
    for (name, sql) in [
        ("a share (cells, one pass)", SHARE_SQL),
        (
            "COUNT(DISTINCT) with a condition (cells, semi join)",
            DISTINCT_SQL,
        ),
        ("a LEFT JOIN lift (cells, stand-ins)", LIFT_SQL),
    ] {
        let (mut governed, mut plain) = (Vec::new(), Vec::new());
        let mut groups = 0;
        for _ in 0..5 {
            let t = Instant::now();
            groups = cleanroom::query::run(&thresholds, "acme", &tables, sql)
                .await?
                .rows();
            governed.push(t.elapsed());
            let t = Instant::now();
            let ctx = cleanroom::query::session(&tables)?;
            ctx.sql(sql).await?.collect().await?;
            plain.push(t.elapsed());
        }
        let (g, p) = (best(&governed), best(&plain));
        println!(
            "{name}: thresholds {:.3} s ({groups} groups), plain {:.3} s, overhead {:.1} %",
            g.as_secs_f64(),
            p.as_secs_f64(),
            (g.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0
        );
    }
    Ok(())
}

const SHARE_SQL: &str = "SELECT c.region, COUNT(*), AVG(CASE WHEN c.lifetime_value > 2500 THEN 1 ELSE 0 END) AS high, \
                         SUM(a.spend) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";
const DISTINCT_SQL: &str = "SELECT a.interest_segment, COUNT(DISTINCT c.email), SUM(CASE WHEN c.lifetime_value > 2500 THEN 1 ELSE 0 END) \
                            FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment";
const LIFT_SQL: &str = "SELECT c.region, CASE WHEN a.ad_exposures >= 10 THEN 'exposed' ELSE 'unexposed' END AS exposure, \
                        COUNT(*), AVG(c.lifetime_value) FROM customers c LEFT JOIN audience a ON c.email = a.email \
                        GROUP BY c.region, exposure";
