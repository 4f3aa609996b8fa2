//! Overlap between the demo partners' datasets.

mod common;

use common::{Setup, TestServer, audit_holds, synth, upload_demo};
use tonic::Code;

async fn upload_both(server: &TestServer, rows: u64, overlap: f64) -> cleanroom::synth::SynthTruth {
    let (files, truth) = synth(rows, overlap);
    upload_demo(server, "acme", files.path()).await;
    upload_demo(server, "globex", files.path()).await;
    truth
}

/// The demo agreement without differential privacy: exact overlaps.
fn thresholds_only() -> (tempfile::TempDir, Setup) {
    let dir = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    std::fs::write(dir.path().join("retail-media-demo.toml"), head).unwrap();
    let setup = Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    };
    (dir, setup)
}

#[tokio::test]
async fn overlap_equals_the_known_truth_and_is_audited() {
    let (_policies, setup) = thresholds_only();
    let server = TestServer::start_with(setup).await;
    let mut acme = server.client("acme").await;
    let err = acme.overlap("retail-media-demo", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");

    let truth = upload_both(&server, 4_000, 0.35).await;
    let r = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert_eq!(r.overlap, Some(truth.overlap));
    assert_eq!(truth.overlap, 1_400);
    assert!(!r.suppressed);
    assert_eq!(r.datasets, ["customers", "audience"]);
    assert_eq!(r.matched_on, ["email", "phone"]);

    let mut globex = server.client("globex").await;
    let named = globex
        .overlap(
            "retail-media-demo",
            &["audience".into(), "customers".into()],
        )
        .await
        .unwrap();
    assert_eq!(named.overlap, Some(truth.overlap));
    let err = globex
        .overlap("retail-media-demo", &["audience".into(), "audience".into()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));

    let mut initech = server.client("initech").await;
    let err = initech.overlap("retail-media-demo", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let overlaps: Vec<_> = entries
        .iter()
        .filter(|e| e.action().word() == "overlap")
        .collect();
    assert_eq!(
        overlaps.len(),
        4,
        "every overlap request of a party, granted or refused, is audited; an outsider's is logged for the operator only"
    );
    assert!(overlaps.iter().all(|e| e.organisation != "initech"));
    assert_eq!(overlaps[0].decision().word(), "rejected");
    assert_eq!(overlaps[0].rule.as_deref(), Some("dataset.uploaded"));
    assert_eq!(overlaps[1].decision().word(), "accepted");
    let overlaps: Vec<_> = overlaps.into_iter().cloned().collect();
    assert!(
        !audit_holds(&overlaps, truth.overlap),
        "the count is not in the audit log"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_small_overlap_is_suppressed() {
    let (_policies, setup) = thresholds_only();
    let server = TestServer::start_with(setup).await;
    let truth = upload_both(&server, 100, 0.3).await;
    assert!(truth.overlap < 50);
    let mut acme = server.client("acme").await;
    let r = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert!(r.suppressed);
    assert_eq!(r.overlap, None);
    assert_eq!(r.min_group_size, 50);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn under_differential_privacy_the_overlap_is_noised_and_charged() {
    // The demo agreement as shipped, with differential privacy.
    let server = TestServer::start().await;
    let truth = upload_both(&server, 4_000, 0.35).await;
    let mut acme = server.client("acme").await;
    let mut globex = server.client("globex").await;
    let mut shown = Vec::new();
    for _ in 0..20 {
        let r = acme
            .overlap_with_epsilon("retail-media-demo", &[], Some(0.25))
            .await
            .unwrap();
        let p = r.privacy.expect("the noise is reported");
        assert_eq!(p.epsilon, 0.25);
        assert_eq!(p.columns[0].aggregate, "overlap");
        // Half the epsilon for the count: scale 8.
        assert!(
            (p.columns[0].scale - 8.0).abs() < 1e-3,
            "{}",
            p.columns[0].scale
        );
        shown.push(r.overlap.unwrap() as i64);
    }
    let truth = truth.overlap as i64;
    assert!(
        shown.iter().all(|n| (n - truth).abs() < 8 * 12),
        "{shown:?}"
    );
    assert!(
        shown.iter().any(|n| *n != truth),
        "the count is noised: {shown:?}"
    );
    let mean = shown.iter().sum::<i64>() as f64 / shown.len() as f64;
    assert!((mean - truth as f64).abs() < 15.0, "{mean} vs {truth}");

    // Each organisation's own budget pays for its overlaps.
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!((b.epsilon_spent, b.queries), (5.0, 20));
    globex.overlap("retail-media-demo", &[]).await.unwrap();
    let b = globex.budget("retail-media-demo").await.unwrap();
    assert_eq!((b.epsilon_spent, b.queries), (1.0, 1));

    // A small overlap stays hidden: the noisy threshold sits above the minimum.
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let charged: f64 = entries
        .iter()
        .filter(|e| e.action().word() == "overlap")
        .filter_map(|e| e.epsilon)
        .sum();
    assert!((charged - 6.0).abs() < 1e-9);
    server.stop().await.unwrap();

    let server = TestServer::start().await;
    let small = upload_both(&server, 200, 0.3).await;
    assert!(
        small.overlap >= 50 && small.overlap < 100,
        "{}",
        small.overlap
    );
    let mut acme = server.client("acme").await;
    let r = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert!(r.suppressed && r.overlap.is_none());
    let text = cleanroom::cli::render_overlap(&r);
    assert!(text.starts_with("too few people"), "{text}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_party_without_the_overlap_right_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml"))
        .unwrap()
        .replace(
            r#"rights = ["upload", "see_overlap"]"#,
            r#"rights = ["upload"]"#,
        );
    std::fs::write(dir.path().join("retail-media-demo.toml"), text).unwrap();
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let mut globex = server.client("globex").await;
    let err = globex.overlap("retail-media-demo", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains("see_overlap"), "{err}");
    server.stop().await.unwrap();
}
