//! The privacy budget over gRPC: charged before each query, never
//! overspent by concurrent queries, refreshed by window, reported in
//! answers and audit entries, and consistent after a crash.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cleanroom::client::Client;
use cleanroom::clock::ManualClock;
use common::{Pki, RealServer, Setup, TestServer, upload_demo};
use time::macros::datetime;
use tonic::Code;

const SQL: &str = "SELECT c.region, COUNT(*) AS n, AVG(c.lifetime_value) AS ltv \
                   FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

/// A policies folder holding the demo agreement with this privacy section.
fn policies_with(privacy: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    std::fs::write(
        dir.path().join("retail-media-demo.toml"),
        format!("{head}[privacy]\n{privacy}\n"),
    )
    .unwrap();
    dir
}

async fn server_with_data(privacy: &str, clock: ManualClock) -> (TestServer, tempfile::TempDir) {
    let policies = policies_with(privacy);
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        clock: Arc::new(clock),
        // The budget, not the query gate, is what these tests race.
        query_limits: cleanroom::query::QueryLimits {
            max_concurrent: 64,
            max_concurrent_per_org: 64,
            ..cleanroom::query::QueryLimits::default()
        },
        ..Setup::default()
    })
    .await;
    let (data, _) = common::synth(4_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    (server, policies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_spend_exactly_the_budget_and_windows_refresh() {
    let clock = ManualClock::new(datetime!(2026-11-20 12:00 UTC));
    let (server, _policies) = server_with_data(
        "epsilon_total = 2.0\nepsilon_per_query_max = 0.5\ndelta = 1e-7\nrefresh = \"monthly\"",
        clock.clone(),
    )
    .await;
    let acme = server.client("acme").await;

    // 24 queries at 0.25 race for a budget of 2: exactly 8 run.
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let mut c = acme.clone();
            tokio::spawn(async move {
                c.query_with_epsilon("retail-media-demo", SQL, Some(0.25))
                    .await
            })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(answer) => {
                ok += 1;
                let p = answer.header.privacy.expect("private answers say how");
                assert_eq!(p.epsilon, 0.25);
                assert_eq!(p.columns.len(), 2);
                assert!(
                    p.columns
                        .iter()
                        .all(|c| c.scale > 0.0 && c.half_width_95 > 0.0)
                );
                assert_eq!(
                    cleanroom::proto::when(p.next_refresh.as_ref(), "never"),
                    "2026-12-01T00:00:00Z"
                );
            }
            Err(e) => {
                let status = e.status().expect("a gRPC status");
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let m = status.message();
                assert!(m.starts_with("rule privacy.budget:"), "{m}");
                assert!(m.contains("refreshes at 2026-12-01T00:00:00Z"), "{m}");
                exhausted += 1;
            }
        }
    }
    assert_eq!((ok, exhausted), (8, 16));

    let mut a = acme.clone();
    let b = a.budget("retail-media-demo").await.unwrap();
    assert!(b.enabled);
    assert_eq!(
        (b.epsilon_spent, b.epsilon_remaining, b.queries),
        (2.0, 0.0, 8)
    );
    assert_eq!(b.window, "2026-11");

    // Every charge is in the audit log, refusals spent nothing.
    let entries = a.audit_entries("retail-media-demo").await.unwrap();
    let queries: Vec<_> = entries
        .iter()
        .filter(|e| e.action().word() == "query")
        .collect();
    let spent: f64 = queries.iter().filter_map(|e| e.epsilon).sum();
    assert!((spent - 2.0).abs() < 1e-9);
    let refused = queries
        .iter()
        .filter(|e| e.rule.as_deref() == Some("privacy.budget"))
        .count();
    assert_eq!(refused, 16);
    assert!(
        queries
            .iter()
            .all(|e| e.decision().word() != "accepted" || e.query_id.is_some())
    );

    // Too much epsilon for one query, or none at all, is refused by field.
    for bad in [0.75, 0.0, -1.0, f64::NAN] {
        let err = a
            .query_with_epsilon("retail-media-demo", SQL, Some(bad))
            .await
            .unwrap_err();
        assert_eq!(err.status().unwrap().code(), Code::InvalidArgument);
    }

    // The next month starts afresh.
    clock.set(datetime!(2026-12-01 00:00 UTC));

    // A query that fails after reading data (here above the release
    // boundary, on released values) keeps its charge: a refund would make
    // failing probes free. It is audited with its epsilon.
    let failing = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email \
                   GROUP BY c.region HAVING COUNT(*) / 0 > 1";
    let err = a
        .query_with_epsilon("retail-media-demo", failing, Some(0.5))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), Code::InvalidArgument, "{err}");
    assert!(
        err.status()
            .unwrap()
            .message()
            .starts_with("rule query.output:")
    );
    let b = a.budget("retail-media-demo").await.unwrap();
    assert_eq!((b.epsilon_spent, b.queries), (0.5, 1), "charged");
    let last = a.audit_entries("retail-media-demo").await.unwrap();
    let last = last.last().unwrap();
    assert_eq!(
        (last.decision().word(), last.epsilon, last.rule.as_deref()),
        ("rejected", Some(0.5), Some("query.output"))
    );
    assert!(last.query_id.is_some());

    // A query refused before reading anything costs nothing.
    let refused = "SELECT SUM(CAST(c.lifetime_value AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email";
    let err = a
        .query_with_epsilon("retail-media-demo", refused, Some(0.5))
        .await
        .unwrap_err();
    assert_eq!(
        err.status().unwrap().code(),
        Code::PermissionDenied,
        "{err}"
    );
    let b = a.budget("retail-media-demo").await.unwrap();
    assert_eq!((b.epsilon_spent, b.queries), (0.5, 1), "not charged");

    let answer = a
        .query_with_epsilon("retail-media-demo", SQL, Some(0.5))
        .await
        .unwrap();
    assert_eq!(answer.header.privacy.unwrap().epsilon_remaining, 1.0);
    let b = a.budget("retail-media-demo").await.unwrap();
    assert_eq!((b.window.as_str(), b.epsilon_spent), ("2026-12", 1.0));

    // Budgets are per organisation: globex has no query right, and its
    // budget view shows nothing spent.
    let mut globex = server.client("globex").await;
    let b = globex.budget("retail-media-demo").await.unwrap();
    assert_eq!(b.epsilon_spent, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_never_refreshes_and_agreements_without_privacy() {
    let clock = ManualClock::new(datetime!(2026-11-20 12:00 UTC));
    let (server, _policies) = server_with_data(
        "epsilon_total = 1.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7",
        clock.clone(),
    )
    .await;
    let mut acme = server.client("acme").await;
    acme.query("retail-media-demo", SQL).await.unwrap();
    clock.set(datetime!(2027-06-01 00:00 UTC));
    let err = acme.query("retail-media-demo", SQL).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().ends_with("the budget refreshes never"),
        "{}",
        status.message()
    );
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!(
        (
            b.window.as_str(),
            cleanroom::proto::when(b.next_refresh.as_ref(), "never").as_str()
        ),
        ("all", "never")
    );
    server.stop().await.unwrap();

    // Thresholds only: no budget, and epsilon is refused.
    let policies = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    std::fs::write(policies.path().join("retail-media-demo.toml"), head).unwrap();
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let mut acme = server.client("acme").await;
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert!(!b.enabled);
    let (data, _) = common::synth(2_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    let answer = acme.query("retail-media-demo", SQL).await.unwrap();
    assert!(answer.header.privacy.is_none());
    let err = acme
        .query_with_epsilon("retail-media-demo", SQL, Some(0.5))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), Code::InvalidArgument);
}

/// Sum of the epsilon the audit log records, and the ledger's total.
async fn audited_and_ledger(client: &mut Client) -> (f64, f64, usize) {
    let entries = client.audit_entries("retail-media-demo").await.unwrap();
    let audited: f64 = entries.iter().filter_map(|e| e.epsilon).sum();
    let interrupted = entries
        .iter()
        .filter(|e| e.decision().word() == "interrupted")
        .count();
    let b = client.budget("retail-media-demo").await.unwrap();
    (audited, b.epsilon_spent, interrupted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_query_leaves_a_consistent_ledger() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (files, _) = common::synth(20_000, 0.5);
    let mut interrupted_total = 0;
    // Several kills at different moments of a stream of queries.
    for round in 0..3u64 {
        let server = RealServer::spawn(&pki, &data_dir, "0.1");
        if round == 0 {
            for (org, dataset, file) in [
                ("acme", "customers", cleanroom::synth::ACME_FILE),
                ("globex", "audience", cleanroom::synth::GLOBEX_FILE),
            ] {
                let c = Client::connect(&server.config(&pki, org)).await.unwrap();
                cleanroom::prepare::upload(
                    &c,
                    &common::secret(),
                    &common::upload_options(dataset, &files.path().join(file)),
                )
                .await
                .unwrap();
            }
        }
        let mut acme = Client::connect(&server.config(&pki, "acme")).await.unwrap();
        let (audited, spent, interrupted) = audited_and_ledger(&mut acme).await;
        assert!(
            (audited - spent).abs() < 1e-9,
            "round {round}: audit log {audited} vs ledger {spent}"
        );
        interrupted_total = interrupted;
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let mut c = acme.clone();
                tokio::spawn(async move {
                    while c
                        .query_with_epsilon("retail-media-demo", SQL, Some(0.01))
                        .await
                        .is_ok()
                    {}
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700 + 400 * round)).await;
        server.signal(libc::SIGKILL);
        for w in workers {
            w.await.unwrap();
        }
        drop(server);
    }
    let server = RealServer::spawn(&pki, &data_dir, "0.1");
    let mut acme = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    let (audited, spent, interrupted) = audited_and_ledger(&mut acme).await;
    assert!(spent > 0.0);
    assert!(
        (audited - spent).abs() < 1e-9,
        "audit log {audited} vs ledger {spent}"
    );
    assert!(interrupted >= interrupted_total);
    eprintln!("ledger {spent}, audited {audited}, interrupted queries {interrupted}");
    // The log's chain is intact after all the kills.
    drop(server);
    cleanroom::audit::verify(&data_dir).unwrap();
}

/// The delta attack: a query at a tiny epsilon still spends a whole delta,
/// so a window of millions of them would release a group one person pushes
/// to the minimum with near certainty. The floor refuses such epsilons, and
/// the ledger charges delta per query and refuses past its total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_is_charged_and_tiny_epsilons_are_refused() {
    let clock = ManualClock::new(datetime!(2026-11-20 12:00 UTC));
    // Epsilon 1 at the default floor of 0.01: at most 100 queries.
    let (server, _policies) = server_with_data(
        "epsilon_total = 1.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7",
        clock.clone(),
    )
    .await;
    let mut acme = server.client("acme").await;
    let err = acme
        .query_with_epsilon("retail-media-demo", SQL, Some(1e-6))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("privacy.epsilon_per_query_min"),
        "{}",
        status.message()
    );
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!((b.queries, b.delta_spent), (0, 0.0));
    assert_eq!(b.epsilon_per_query_min, 0.01);
    assert!((b.delta_total - 1e-5).abs() < 1e-18, "{}", b.delta_total);

    let mut answered = 0u64;
    let refusal = loop {
        match acme
            .query_with_epsilon("retail-media-demo", SQL, Some(0.01))
            .await
        {
            Ok(_) => answered += 1,
            Err(e) => break e.status().unwrap().clone(),
        }
        assert!(
            answered <= 100,
            "the budget let more than 100 queries through"
        );
    };
    assert_eq!(answered, 100);
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!(b.queries, 100);
    assert!((b.delta_spent - 1e-5).abs() < 1e-15, "{}", b.delta_spent);
    assert!(b.delta_remaining.abs() < 1e-15, "{}", b.delta_remaining);
    // The audit log accounts for the ledger's delta as for its epsilon.
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let audited: f64 = entries.iter().filter_map(|e| e.delta).sum();
    assert!((audited - b.delta_spent).abs() < 1e-15, "{audited}");
    // What the window allows the attack: 100 queries, each showing a group
    // one person pushes to the minimum with probability at most 1e-7, so at
    // most 1e-5 in all, where 200,000 queries at epsilon 1e-6 showed it 182
    // times.
    assert!(b.delta_spent <= 1e-5 + 1e-15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_total_refuses_before_epsilon_runs_out() {
    let clock = ManualClock::new(datetime!(2026-11-20 12:00 UTC));
    let (server, _policies) = server_with_data(
        "epsilon_total = 10.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7\ndelta_total = 3e-7",
        clock.clone(),
    )
    .await;
    let mut acme = server.client("acme").await;
    for _ in 0..3 {
        acme.query_with_epsilon("retail-media-demo", SQL, Some(0.01))
            .await
            .unwrap();
    }
    let err = acme
        .query_with_epsilon("retail-media-demo", SQL, Some(0.01))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("rule privacy.budget")
            && status
                .message()
                .contains("needs delta 0.0000001 but 0 of 0.0000003"),
        "{}",
        status.message()
    );
    // The overlap spends delta too: refused the same way.
    let err = acme
        .overlap_with_epsilon("retail-media-demo", &[], Some(0.01))
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), Code::ResourceExhausted);
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert!((b.epsilon_spent - 0.03).abs() < 1e-9);
    server.stop().await.unwrap();
}
