//! Data lifecycle: policy hot reload, retention and expiry, erasure,
//! access reports and the admin view.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cleanroom::client::Client;
use cleanroom::proto;
use common::{Setup, TestServer, upload_demo};
use tonic::Code;

const ID: &str = "retail-media-demo";

fn demo_text() -> String {
    std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap()
}

/// The demo agreement without differential privacy, in a folder of its own.
fn policy_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &thresholds_only(&demo_text()));
    dir
}

fn thresholds_only(text: &str) -> String {
    text.split_once("[privacy]").unwrap().0.to_string()
}

fn write_policy(dir: &Path, text: &str) {
    // Write then rename, as editors and config tools do.
    let tmp = dir.join(".retail-media-demo.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("retail-media-demo.toml")).unwrap();
}

async fn min_group_size(client: &mut Client) -> u32 {
    client
        .get_agreement(ID)
        .await
        .unwrap()
        .query
        .unwrap()
        .min_group_size
}

/// Polls `check` for up to 5 seconds.
async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

const SQL: &str = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edits_apply_broken_edits_are_refused_and_removal_suspends() {
    let policies = policy_folder();
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (files, _) = common::synth(2_000, 0.5);
    upload_demo(&server, "acme", files.path()).await;
    upload_demo(&server, "globex", files.path()).await;
    let mut acme = server.client("acme").await;
    assert_eq!(min_group_size(&mut acme).await, 50);
    let old_hash = acme
        .get_agreement(ID)
        .await
        .unwrap()
        .summary
        .unwrap()
        .policy_hash;

    // A valid edit takes effect without a restart.
    let started = Instant::now();
    write_policy(
        policies.path(),
        &thresholds_only(&demo_text()).replace("min_group_size = 50", "min_group_size = 80"),
    );
    let applied = eventually(|| {
        let mut c = acme.clone();
        async move { min_group_size(&mut c).await == 80 }
    })
    .await;
    assert!(applied, "the edit was not applied");
    eprintln!("valid edit applied after {:?}", started.elapsed());
    let new_hash = acme
        .get_agreement(ID)
        .await
        .unwrap()
        .summary
        .unwrap()
        .policy_hash;
    assert_ne!(old_hash, new_hash);
    let answer = acme.query(ID, SQL).await.unwrap();
    assert_eq!(
        answer.header.policy_hash, new_hash,
        "results carry the policy they ran under"
    );
    let entries = acme.audit_entries(ID).await.unwrap();
    let reload = entries
        .iter()
        .find(|e| e.action == "policy_reload" && e.decision == "accepted")
        .expect("the reload is audited");
    assert_eq!(
        reload.subject.as_deref(),
        Some(format!("updated {old_hash} -> {new_hash}").as_str())
    );
    assert_eq!(reload.organisation, "(operator)");
    let query = entries.iter().rev().find(|e| e.action == "query").unwrap();
    assert_eq!(query.policy_hash, new_hash);

    // A broken edit is refused; the last good policy keeps working.
    write_policy(
        policies.path(),
        &thresholds_only(&demo_text()).replace("min_group_size = 50", "min_group_size = 1"),
    );
    let refused =
        eventually(|| {
            let mut c = acme.clone();
            async move {
                c.audit_entries(ID).await.unwrap().iter().any(|e| {
                    e.action == "policy_reload" && e.rule.as_deref() == Some("policy.invalid")
                })
            }
        })
        .await;
    assert!(refused, "the broken edit was not reported");
    assert_eq!(min_group_size(&mut acme).await, 80);
    acme.query(ID, SQL).await.unwrap();

    // Removing the file suspends the agreement; data stays.
    std::fs::remove_file(policies.path().join("retail-media-demo.toml")).unwrap();
    let suspended = eventually(|| {
        let mut c = acme.clone();
        async move {
            c.list_agreements().await.unwrap()[0].state == proto::AgreementState::Suspended as i32
        }
    })
    .await;
    assert!(suspended);
    let err = acme.query(ID, SQL).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("suspended"), "{err}");
    let kept = acme.list_datasets(ID).await.unwrap();
    assert_eq!(kept.len(), 1, "data is kept");

    // Back again: resumed.
    write_policy(policies.path(), &thresholds_only(&demo_text()));
    let resumed = eventually(|| {
        let mut c = acme.clone();
        async move {
            c.list_agreements().await.unwrap()[0].state == proto::AgreementState::Active as i32
        }
    })
    .await;
    assert!(resumed);
    acme.query(ID, SQL).await.unwrap();
    server.stop().await.unwrap();
}
