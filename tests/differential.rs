//! Differential testing of governed queries against an independent
//! reference computation (tests/common/differential.rs). A failure prints
//! its seed and query; `cargo bench --bench differential` runs thousands.

mod common;

use common::differential::{neighbours, neighbours_private, suite, suite_private};
use common::people::demo_policy;

#[tokio::test]
async fn random_queries_equal_the_reference_without_small_groups() {
    let policy = demo_policy(None, 10);
    let seed = std::env::var("CLEANROOM_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_125);
    let tally = match suite(&policy, seed, 300).await {
        Ok(t) => t,
        Err(failure) => panic!("{failure}\n(rerun with CLEANROOM_DIFF_SEED={seed})"),
    };
    eprintln!("differential: {tally:?}");
    assert_eq!(tally.queries, 300);
    assert!(tally.accepted > 150, "{tally:?}");
    assert!(tally.refused > 10, "{tally:?}");
    assert!(tally.output_errors > 0, "{tally:?}");
    assert!(tally.rows_compared > 300, "{tally:?}");
    assert!(tally.groups_held_back > 10, "{tally:?}");
}

#[tokio::test]
async fn random_private_queries_release_only_groups_of_enough_people() {
    let policy = demo_policy(
        Some(
            "epsilon_total = 1e9\nepsilon_per_query_max = 1.0\ndelta = 1e-5\nmax_groups_per_person = 2",
        ),
        10,
    );
    let seed = 7_261_125;
    let tally = match suite_private(&policy, seed, 150).await {
        Ok(t) => t,
        Err(failure) => panic!("{failure}"),
    };
    eprintln!("differential, private: {tally:?}");
    assert!(tally.accepted > 100, "{tally:?}");
    // Noise decides how many groups pass the threshold: about 50 here,
    // and rarely fewer than 35.
    assert!(tally.rows_compared > 25, "{tally:?}");
}

#[tokio::test]
async fn a_victim_under_the_minimum_changes_no_answer() {
    let policy = demo_policy(None, 10);
    let seed = std::env::var("CLEANROOM_NEIGHBOUR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_207);
    let tally = match neighbours(&policy, seed, 300).await {
        Ok(t) => t,
        Err(failure) => panic!("{failure}\n(rerun with CLEANROOM_NEIGHBOUR_SEED={seed})"),
    };
    eprintln!("neighbours: {tally:?}");
    assert_eq!(tally.cases, 300);
    assert!(tally.hidden_present > 30, "{tally:?}");
    assert!(tally.in_large_cell > 30, "{tally:?}");
}

#[tokio::test]
async fn a_victim_moves_private_values_by_at_most_the_sensitivity() {
    let policy = demo_policy(
        Some(
            "epsilon_total = 1e12\nepsilon_per_query_max = 1e8\ndelta = 1e-7\nmax_groups_per_person = 10\nmax_rows_per_person = 1",
        ),
        10,
    );
    let tally = match neighbours_private(&policy, 20_261_208, 200).await {
        Ok(t) => t,
        Err(failure) => panic!("{failure}"),
    };
    eprintln!("neighbours, private: {tally:?}");
    assert!(tally.compared > 60, "{tally:?}");
}
