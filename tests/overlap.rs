//! Overlap between the demo partners' datasets.

mod common;

use common::{Setup, TestServer, synth, upload_demo};
use tonic::Code;

async fn upload_both(server: &TestServer, rows: u64, overlap: f64) -> cleanroom::synth::SynthTruth {
    let (files, truth) = synth(rows, overlap);
    upload_demo(server, "acme", files.path()).await;
    upload_demo(server, "globex", files.path()).await;
    truth
}

#[tokio::test]
async fn overlap_equals_the_known_truth_and_is_audited() {
    let server = TestServer::start().await;
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
    let overlaps: Vec<_> = entries.iter().filter(|e| e.action == "overlap").collect();
    assert_eq!(
        overlaps.len(),
        5,
        "every overlap request, granted or refused, is audited"
    );
    assert_eq!(overlaps[4].organisation, "initech");
    assert_eq!(overlaps[4].rule.as_deref(), Some("agreement.party"));
    assert_eq!(overlaps[0].decision, "rejected");
    assert_eq!(overlaps[0].rule.as_deref(), Some("dataset.uploaded"));
    assert_eq!(overlaps[1].decision, "accepted");
    let dump = format!("{overlaps:?}");
    assert!(
        !dump.contains(&truth.overlap.to_string()),
        "the count is not in the audit log"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_small_overlap_is_suppressed() {
    let server = TestServer::start().await;
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
