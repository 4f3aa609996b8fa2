//! The differential query suite at scale: thousands of random queries over
//! several generated data sets, each answer compared with the independent
//! reference computation of tests/common/differential.rs.
//!
//! ```text
//! cargo bench --bench differential                          # 10 seeds x 500 queries
//! cargo bench --bench differential -- --seeds 40 --queries 250 --min 5
//! (then the neighbouring-datasets suite: the same queries with and
//! without one victim, beside crafted rows)
//! ```

mod common;
#[path = "../tests/common/mod.rs"]
mod suite_support;

use std::time::Instant;

use common::arg;
use suite_support::differential::{
    Neighbours, Tally, neighbours, neighbours_private, suite, suite_private,
};
use suite_support::people::demo_policy;

#[tokio::main]
async fn main() {
    let seeds = arg("--seeds", 10);
    let queries = arg("--queries", 500);
    let min = u32::try_from(arg("--min", 10)).expect("--min fits in 32 bits");
    let policy = demo_policy(None, min);
    let started = Instant::now();
    let mut total = Tally::default();
    for seed in 0..seeds {
        match suite(&policy, 1_000 + seed, queries).await {
            Ok(t) => total.add(&t),
            Err(failure) => {
                eprintln!("FAILED: {failure}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "differential suite, min_group_size {min}: {} queries over {seeds} data sets in {:.1} s",
        total.queries,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  accepted {} (each run on two data sets), refused {} (refusal identical on both), \
         failed above the boundary as the reference predicted {}",
        total.accepted, total.refused, total.output_errors
    );
    println!(
        "  released rows compared with the reference: {}; finest groups held back by the minimum: {}",
        total.rows_compared, total.groups_held_back
    );

    // The same generator under differential privacy: every released row
    // must be a group of at least the minimum of people.
    let private = demo_policy(
        Some(
            "epsilon_total = 1e9\nepsilon_per_query_max = 1.0\ndelta = 1e-5\nmax_groups_per_person = 2",
        ),
        min,
    );
    let started = Instant::now();
    let mut total = Tally::default();
    for seed in 0..seeds {
        match suite_private(&private, 5_000 + seed, queries / 2).await {
            Ok(t) => total.add(&t),
            Err(failure) => {
                eprintln!("FAILED (private): {failure}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "under differential privacy: {} queries in {:.1} s; accepted {}, refused {} (identical on both data sets); \
         released rows checked to stand for at least {min} people: {}",
        total.queries,
        started.elapsed().as_secs_f64(),
        total.accepted,
        total.refused,
        total.rows_compared
    );

    // Neighbouring data sets: with and without one victim of globex's,
    // beside crafted padding and the victim's own customer.
    let started = Instant::now();
    let mut total = Neighbours::default();
    for seed in 0..seeds {
        match neighbours(&policy, 9_000 + seed, queries).await {
            Ok(t) => total.add(&t),
            Err(failure) => {
                eprintln!("FAILED (neighbours): {failure}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "neighbouring data sets: {} queries in {:.1} s; refused {} (identical with and without the victim);\n  \
         the victim's every cell under the minimum in {} ({} with the victim in the joined rows), answers identical;\n  \
         the victim in a cell of enough people in {}",
        total.cases,
        started.elapsed().as_secs_f64(),
        total.refused,
        total.hidden,
        total.hidden_present,
        total.in_large_cell
    );

    // The same under differential privacy with negligible noise: a victim
    // moves each count and sum by at most the sensitivity.
    let private = demo_policy(
        Some(
            "epsilon_total = 1e12\nepsilon_per_query_max = 1e8\ndelta = 1e-7\nmax_groups_per_person = 10\nmax_rows_per_person = 1",
        ),
        min,
    );
    let started = Instant::now();
    let mut total = Neighbours::default();
    for seed in 0..seeds {
        match neighbours_private(&private, 13_000 + seed, queries).await {
            Ok(t) => total.add(&t),
            Err(failure) => {
                eprintln!("FAILED (neighbours, private): {failure}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "neighbouring data sets under differential privacy: {} queries in {:.1} s; refused {}; \
         answers whose counts and sums moved within the sensitivity with and without the victim: {}",
        total.cases,
        started.elapsed().as_secs_f64(),
        total.refused,
        total.compared
    );
}
