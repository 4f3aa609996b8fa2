//! Data lifecycle: policy hot reload, retention and expiry, erasure,
//! access reports and the admin view.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cleanroom::client::Client;
use cleanroom::proto;
use common::{Setup, TestServer, eventually, reaches_state, upload_demo};
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
        .find(|e| e.action().word() == "policy_reload" && e.decision().word() == "accepted")
        .expect("the reload is audited");
    assert_eq!(
        reload.subject.as_deref(),
        Some(format!("updated {old_hash} -> {new_hash}").as_str())
    );
    assert_eq!(reload.organisation, "(operator)");
    let query = entries
        .iter()
        .rev()
        .find(|e| e.action().word() == "query")
        .unwrap();
    assert_eq!(query.policy_hash, new_hash);

    // A broken edit is refused; the last good policy keeps working.
    write_policy(
        policies.path(),
        &thresholds_only(&demo_text()).replace("min_group_size = 50", "min_group_size = 1"),
    );
    let refused = eventually(|| {
        let mut c = acme.clone();
        async move {
            c.audit_entries(ID).await.unwrap().iter().any(|e| {
                e.action().word() == "policy_reload" && e.rule.as_deref() == Some("policy.invalid")
            })
        }
    })
    .await;
    assert!(refused, "the broken edit was not reported");
    assert_eq!(min_group_size(&mut acme).await, 80);
    acme.query(ID, SQL).await.unwrap();

    // Removing the file suspends the agreement; data stays.
    std::fs::remove_file(policies.path().join("retail-media-demo.toml")).unwrap();
    let suspended = reaches_state(&acme, proto::AgreementState::Suspended).await;
    assert!(suspended);
    let err = acme.query(ID, SQL).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("suspended"), "{err}");
    let kept = acme.list_datasets(ID).await.unwrap();
    assert_eq!(kept.len(), 1, "data is kept");

    // Back again: resumed.
    write_policy(policies.path(), &thresholds_only(&demo_text()));
    let resumed = reaches_state(&acme, proto::AgreementState::Active).await;
    assert!(resumed);
    acme.query(ID, SQL).await.unwrap();
    server.stop().await.unwrap();
}

fn dataset_files(data_dir: &Path) -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("datasets"), &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_expiry_delete_the_data_and_destroy_the_key() {
    use time::macros::datetime;
    let policies = policy_folder();
    let clock = cleanroom::clock::ManualClock::new(datetime!(2026-11-20 12:00 UTC));
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        clock: std::sync::Arc::new(clock.clone()),
        ..Setup::default()
    })
    .await;
    let data_dir = server.data_dir.path().join("data");
    let (files, _) = common::synth(2_000, 0.5);
    upload_demo(&server, "acme", files.path()).await;
    upload_demo(&server, "globex", files.path()).await;
    let mut acme = server.client("acme").await;
    acme.query(ID, SQL).await.unwrap();
    // Two versions, and the matched tables stored from them (one file per
    // dataset), which must go with them.
    let files_by_kind = |d: &Path| {
        let files = dataset_files(d);
        let matched = files
            .iter()
            .filter(|f| f.to_string_lossy().ends_with(".matched.cds"))
            .count();
        (files.len() - matched, matched)
    };
    let stored = eventually(|| {
        let d = data_dir.clone();
        async move { files_by_kind(&d) == (2, 2) }
    })
    .await;
    assert!(stored, "{:?}", dataset_files(&data_dir));

    // 179 days after the uploads (stamped by the server's clock) the data
    // is still there.
    let uploaded = datetime!(2026-11-20 12:00 UTC);
    clock.set(uploaded + time::Duration::days(179));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(dataset_files(&data_dir).len(), 4);

    // Past 180 days: both datasets go, the key with them.
    clock.set(uploaded + time::Duration::days(181));
    let gone = eventually(|| {
        let d = data_dir.clone();
        async move { dataset_files(&d).is_empty() }
    })
    .await;
    assert!(gone, "{:?}", dataset_files(&data_dir));
    let entries = acme.audit_entries(ID).await.unwrap();
    let retention: Vec<_> = entries
        .iter()
        .filter(|e| e.action().word() == "retention")
        .collect();
    assert!(
        retention.iter().any(|e| e.subject.as_deref()
            == Some("customers: 1 version(s) deleted, older than 180 days")),
        "{retention:?}"
    );
    let key_gone = eventually(|| {
        let mut c = acme.clone();
        async move {
            c.audit_entries(ID).await.unwrap().iter().any(|e| {
                e.subject
                    .as_deref()
                    .is_some_and(|s| s.starts_with("data key destroyed"))
            })
        }
    })
    .await;
    assert!(key_gone);
    let err = acme.query(ID, SQL).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(acme.list_datasets(ID).await.unwrap().is_empty());

    // A new upload gets a new key; past the agreement's expiry it all goes,
    // and queries say the agreement expired.
    clock.set(datetime!(2027-12-30 12:00 UTC));
    upload_demo(&server, "acme", files.path()).await;
    assert_eq!(dataset_files(&data_dir).len(), 1);
    clock.set(datetime!(2028-01-01 00:00 UTC));
    let gone = eventually(|| {
        let d = data_dir.clone();
        async move { dataset_files(&d).is_empty() }
    })
    .await;
    assert!(gone);
    let err = acme.query(ID, SQL).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("expired"), "{err}");
    let entries = acme.audit_entries(ID).await.unwrap();
    assert!(entries.iter().any(|e| e.action().word() == "retention"
        && e.subject.as_deref() == Some("customers: 1 version(s) deleted, the agreement expired")));
    let kept = server.stop_keeping_data().await;
    // With the server stopped, the store confirms the key is gone.
    let data = kept.path().join("data");
    assert!(data.join("meta.redb").exists());
    let store = cleanroom::storage::Store::open(&data, None).unwrap();
    assert!(!store.has_data_key(ID).unwrap());
    assert!(store.versions(ID, "customers").unwrap().is_empty());
}

/// The CSV `text` cut to its header and first `rows` data rows.
fn first_rows(text: &str, rows: usize) -> String {
    text.lines().take(rows + 1).collect::<Vec<_>>().join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_removes_exactly_those_people_and_survives_a_restart() {
    let policies = policy_folder();
    let setup = || Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    };
    let server = TestServer::start_with(setup()).await;
    let (files, truth) = common::synth(4_000, 0.5);
    upload_demo(&server, "acme", files.path()).await;
    upload_demo(&server, "globex", files.path()).await;
    let count_sql = "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email";
    let count = |answer: &cleanroom::client::QueryAnswer| {
        answer.batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0)
    };
    let mut acme = server.client("acme").await;
    assert_eq!(
        acme.overlap(ID, &[]).await.unwrap().overlap,
        Some(truth.overlap)
    );
    assert_eq!(
        count(&acme.query(ID, count_sql).await.unwrap()) as u64,
        truth.overlap
    );

    // acme's first 300 customers are shared people (ids below the overlap)
    // and withdraw consent. The erase file holds their raw rows, which are
    // fingerprinted on acme's machine; only fingerprints travel.
    let text = std::fs::read_to_string(files.path().join(cleanroom::synth::ACME_FILE)).unwrap();
    let erase_file = files.path().join("withdrawn.csv");
    std::fs::write(&erase_file, first_rows(&text, 300)).unwrap();
    let options = cleanroom::prepare::EraseOptions {
        agreement: ID.into(),
        dataset: "customers".into(),
        input: erase_file.clone(),
        format: None,
        csv: cleanroom::prepare::CsvOptions::default(),
        mapping: Default::default(),
    };
    let client = server.client("acme").await;
    let report = cleanroom::prepare::erase(&client, &common::secret(), &options)
        .await
        .unwrap();
    assert_eq!(report.rows_removed, 300);
    assert_eq!(report.versions_deleted, 1);
    let expected = truth.overlap - 300;
    assert_eq!(acme.overlap(ID, &[]).await.unwrap().overlap, Some(expected));
    assert_eq!(
        count(&acme.query(ID, count_sql).await.unwrap()) as u64,
        expected
    );
    let entries = acme.audit_entries(ID).await.unwrap();
    let erased = entries
        .iter()
        .find(|e| e.action().word() == "erase")
        .unwrap();
    assert_eq!(
        (erased.decision().word(), erased.rows),
        ("accepted", Some(300))
    );

    // Again: nothing left to remove.
    let again = cleanroom::prepare::erase(&client, &common::secret(), &options)
        .await
        .unwrap();
    assert_eq!(again.rows_removed, 0);

    // Only the dataset's owner may erase from it: globex's client refuses
    // locally, and the server refuses a hand-made request.
    let globex = server.client("globex").await;
    let err = cleanroom::prepare::erase(&globex, &common::secret(), &options)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not one of your datasets"),
        "{err}"
    );
    let hash = acme
        .get_agreement(ID)
        .await
        .unwrap()
        .summary
        .unwrap()
        .policy_hash;
    let request = |kind: &str, fingerprints: Vec<u8>| proto::EraseRequest {
        agreement_id: ID.into(),
        dataset: "customers".into(),
        policy_hash: hash.clone(),
        key_id: Vec::new(),
        sets: vec![proto::FingerprintSet {
            kind: kind.into(),
            fingerprints,
        }],
    };
    let mut raw = proto::datasets_service_client::DatasetsServiceClient::new(globex.channel());
    let status = raw.erase(request("email", vec![7; 32])).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("rule party.rights:"),
        "{}",
        status.message()
    );
    let mut raw = proto::datasets_service_client::DatasetsServiceClient::new(client.channel());
    let status = raw
        .erase(request("passport", vec![7; 32]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = raw.erase(request("email", vec![7; 31])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // A restart keeps the erasure.
    let server = server.restart(setup()).await;
    let mut acme = server.client("acme").await;
    assert_eq!(acme.overlap(ID, &[]).await.unwrap().overlap, Some(expected));
    assert_eq!(
        count(&acme.query(ID, count_sql).await.unwrap()) as u64,
        expected
    );
    let listed = acme.list_datasets(ID).await.unwrap();
    assert_eq!(
        listed[0].versions, 1,
        "older versions holding the people are gone"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_reports_and_the_admin_view_match_what_happened() {
    let policies = tempfile::tempdir().unwrap();
    let with_admin = thresholds_only(&demo_text()).replace(
        r#"rights = ["upload", "see_overlap"]"#,
        r#"rights = ["upload", "see_overlap", "admin"]"#,
    );
    write_policy(policies.path(), &with_admin);
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (files, _) = common::synth(2_000, 0.5);
    let acme_upload = upload_demo(&server, "acme", files.path()).await;
    let globex_upload = upload_demo(&server, "globex", files.path()).await;
    let mut acme = server.client("acme").await;
    acme.query(ID, SQL).await.unwrap();
    acme.query(ID, "SELECT c.email FROM customers c")
        .await
        .unwrap_err();
    acme.overlap(ID, &[]).await.unwrap();

    let report = acme.access_report(ID).await.unwrap();
    assert_eq!(
        (report.organisation.as_str(), report.state().word()),
        ("acme", "active")
    );
    assert_eq!(report.datasets.len(), 1, "only acme's own data");
    let held = &report.datasets[0];
    assert_eq!(held.dataset, "customers");
    assert_eq!(
        held.columns,
        [
            "email (identifier)",
            "phone (identifier)",
            "age_band (dimension)",
            "region (dimension)",
            "lifetime_value (metric)",
            "purchases (metric)",
            "last_purchase (metric)",
            "lead_score (metric)"
        ]
    );
    assert_eq!(held.versions.len(), 1);
    let v = &held.versions[0];
    assert!(v.current);
    assert_eq!(v.rows, acme_upload.response.rows);
    assert_eq!(v.version, acme_upload.response.version);
    assert_eq!(
        v.delete_by.map(|t| t.seconds),
        v.uploaded_at.map(|t| t.seconds + 180 * 86_400)
    );
    let count = |org: &str, action: &str| {
        report
            .access
            .iter()
            .find(|a| a.organisation == org && a.action().word() == action)
            .map(|a| (a.accepted, a.rejected))
    };
    assert_eq!(count("acme", "upload"), Some((1, 0)));
    assert_eq!(count("globex", "upload"), Some((1, 0)));
    assert_eq!(count("acme", "query"), Some((1, 1)));
    assert_eq!(count("acme", "overlap"), Some((1, 0)));
    assert_eq!(count("globex", "query"), None);
    assert!(
        report.budget.is_none(),
        "no differential privacy in this agreement"
    );
    let text = cleanroom::cli::render_report(&report);
    assert!(text.contains("acme query: 1 accepted, 1 refused"), "{text}");

    let mut globex = server.client("globex").await;
    let report = globex.access_report(ID).await.unwrap();
    assert_eq!(report.datasets[0].dataset, "audience");
    assert_eq!(
        report.datasets[0].versions[0].rows,
        globex_upload.response.rows
    );
    let mut initech = server.client("initech").await;
    assert_eq!(
        initech.access_report(ID).await.unwrap_err().code(),
        Some(Code::NotFound)
    );

    // The admin view: globex administers the agreement, acme does not.
    let err = acme.admin_status().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    let status = globex.admin_status().await.unwrap();
    let a = &status.agreements[0];
    assert_eq!(
        (a.agreement_id.as_str(), a.state().word(), a.data_key),
        (ID, "active", true)
    );
    // globex's own rows; acme's count is acme's data.
    let rows: Vec<Option<u64>> = a.datasets.iter().map(|d| d.rows).collect();
    assert_eq!(rows, [None, Some(globex_upload.response.rows)]);
    assert_eq!(status.reload.as_ref().unwrap().failures, 0);

    // A refused policy edit shows up for the admin, with its message.
    write_policy(
        policies.path(),
        &with_admin.replace("min_group_size = 50", "min_group_size = 1"),
    );
    let seen = eventually(|| {
        let mut g = globex.clone();
        async move { g.admin_status().await.unwrap().reload.unwrap().failures == 1 }
    })
    .await;
    assert!(seen);
    let status = globex.admin_status().await.unwrap();
    let errors = &status.reload.as_ref().unwrap().last_errors;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("query.min_group_size: must be at least 2")),
        "{errors:?}"
    );
    let text = cleanroom::cli::render_status(&status);
    assert!(text.contains("policy files refused"), "{text}");

    // Locally, on the stopped server's data directory.
    write_policy(policies.path(), &with_admin);
    let kept = server.stop_keeping_data().await;
    let data = kept.path().join("data");
    // The master key kept apart from the data, as an operator would.
    let key = kept.path().join("operator-master.key");
    std::fs::rename(data.join("master.key"), &key).unwrap();
    let listing = |dir: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = listing(&data);
    let status = |key: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"));
        cmd.args(["admin", "status", "--data-dir"])
            .arg(&data)
            .arg("--policies")
            .arg(policies.path());
        if let Some(k) = key {
            cmd.arg("--master-key").arg(k);
        }
        cmd.output().unwrap()
    };
    let refused = status(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--master-key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        listing(&data),
        before,
        "a read-only command creates nothing"
    );
    let out = status(Some(&key));
    assert_eq!(
        listing(&data),
        before,
        "a read-only command creates nothing"
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("agreement retail-media-demo: active"),
        "{printed}"
    );
    assert!(
        printed.contains("dataset customers (owner acme):"),
        "{printed}"
    );
    assert!(printed.contains("policies: all files valid"), "{printed}");
}
