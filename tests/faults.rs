//! Faults are inputs too: stalled streams, concurrent commits, a damaged or
//! missing metadata database, clocks that jump, policy edits that change
//! how identifiers were made. Each case states what must hold and checks
//! it against a real server.

mod common;

use std::time::Duration;

use cleanroom::proto;
use common::people::{Row, customers, demo_policy, fingerprint};
use common::{Setup, TestServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const AGREEMENT: &str = "retail-media-demo";

async fn current_rows(server: &TestServer) -> u64 {
    server
        .client("acme")
        .await
        .list_datasets(AGREEMENT)
        .await
        .unwrap()
        .iter()
        .find(|d| d.dataset == "customers")
        .map(|d| d.rows)
        .unwrap_or(0)
}

fn erase_request(hash: &str, person: u64) -> proto::EraseRequest {
    proto::EraseRequest {
        agreement_id: AGREEMENT.into(),
        dataset: "customers".into(),
        policy_hash: hash.into(),
        key_id: Vec::new(),
        sets: vec![proto::FingerprintSet {
            kind: "email".into(),
            fingerprints: fingerprint(person, 0).to_vec(),
        }],
    }
}

/// An upload stream whose messages the test sends one by one.
struct Stalled {
    tx: tokio::sync::mpsc::Sender<proto::UploadRequest>,
    call: tokio::task::JoinHandle<Result<proto::UploadResponse, tonic::Status>>,
}

impl Stalled {
    async fn open(server: &TestServer, hash: &str, id: &str, rows: &[Row]) -> Stalled {
        let batch = customers(&demo_policy(None, 50), rows);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(common::header(hash, "customers", id))
            .await
            .unwrap();
        tx.send(common::batch_msg(&batch)).await.unwrap();
        let client = server.client("acme").await;
        let call = tokio::spawn(async move {
            proto::datasets_client::DatasetsClient::new(client.channel())
                .upload(ReceiverStream::new(rx))
                .await
                .map(tonic::Response::into_inner)
        });
        // Let the server take the header and the batch.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Stalled { tx, call }
    }
}

#[tokio::test]
async fn an_upload_that_stalled_never_commits_over_later_work() {
    let dir = common::demo_policies(None);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let acme = server.client("acme").await;
    let hash = common::policy_hash(&server).await;
    let policy = demo_policy(None, 50);
    let rows = |n: u64| -> Vec<Row> { (0..n).map(Row::new).collect() };
    let first = customers(&policy, &rows(100));
    common::raw_upload(
        &acme,
        vec![
            common::header(&hash, "customers", "first"),
            common::batch_msg(&first),
            common::commit(100, 1),
        ],
    )
    .await
    .unwrap();

    // The stalled upload holds person 5; meanwhile a newer upload commits
    // and person 5 is erased.
    let stalled = Stalled::open(&server, &hash, "stalled", &rows(100)).await;
    let newer = customers(&policy, &rows(120));
    common::raw_upload(
        &acme,
        vec![
            common::header(&hash, "customers", "newer"),
            common::batch_msg(&newer),
            common::commit(120, 1),
        ],
    )
    .await
    .unwrap();
    let erased = proto::datasets_client::DatasetsClient::new(acme.channel())
        .erase(erase_request(&hash, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.rows_removed, 1);
    assert_eq!(current_rows(&server).await, 119);

    // The stalled upload resumes and asks to commit: refused, and the
    // erasure holds.
    stalled.tx.send(common::commit(100, 1)).await.unwrap();
    drop(stalled.tx);
    let status = stalled.call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("dataset.changed"), "{status:?}");
    assert_eq!(current_rows(&server).await, 119);
    let again = proto::datasets_client::DatasetsClient::new(acme.channel())
        .erase(erase_request(&hash, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.rows_removed, 0, "the erased person came back");

    // The refusal is audited under its rule.
    let entries = server
        .client("acme")
        .await
        .audit_entries(AGREEMENT)
        .await
        .unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.action == "upload" && e.rule.as_deref() == Some("dataset.changed")),
        "no audit entry for the refused commit"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_stream_that_goes_quiet_is_ended_and_stores_nothing() {
    let dir = common::demo_policies(None);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        limits: cleanroom::upload::Limits {
            idle_timeout: Duration::from_secs(1),
            ..cleanroom::upload::Limits::default()
        },
        ..Setup::default()
    })
    .await;
    let hash = common::policy_hash(&server).await;
    let rows: Vec<Row> = (0..60).map(Row::new).collect();
    let stalled = Stalled::open(&server, &hash, "quiet", &rows).await;
    // Nothing more is sent, and the sender is kept open.
    let status = tokio::time::timeout(Duration::from_secs(20), stalled.call)
        .await
        .expect("the server never ended the quiet stream")
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("upload.idle"), "{status:?}");
    assert_eq!(current_rows(&server).await, 0);
    let staging = server.data_dir.path().join("data").join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging files left behind: {left:?}");
    drop(stalled.tx);
    server.stop().await.unwrap();
}
