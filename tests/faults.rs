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
            proto::datasets_service_client::DatasetsServiceClient::new(client.channel())
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
    let erased = proto::datasets_service_client::DatasetsServiceClient::new(acme.channel())
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
    let again = proto::datasets_service_client::DatasetsServiceClient::new(acme.channel())
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
            .any(|e| e.action().word() == "upload" && e.rule.as_deref() == Some("dataset.changed")),
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

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs the real binary with `args`; its exit status and stderr.
fn cleanroom(args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("cleanroom {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A server with both demo parties' data and some budget spent; stopped,
/// its certificates and data handed over with acme's spending.
async fn spent_server() -> (common::Pki, tempfile::TempDir, f64) {
    let server = TestServer::start().await;
    let (data, _) = common::synth(400, 0.5);
    common::upload_demo(&server, "acme", data.path()).await;
    common::upload_demo(&server, "globex", data.path()).await;
    let mut acme = server.client("acme").await;
    assert!(common::eventually(|| {
        let mut c = acme.clone();
        async move {
            c.query_with_epsilon(
                AGREEMENT,
                "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region",
                Some(0.5),
            )
            .await
            .is_ok()
        }
    })
    .await);
    let spent = acme.budget(AGREEMENT).await.unwrap().epsilon_spent;
    assert!(spent >= 0.5, "{spent}");
    let (pki, dir) = server.stop_keeping_all().await;
    (pki, dir, spent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_metadata_database_refuses_to_start_and_recovery_keeps_budgets() {
    let (pki, dir, spent) = spent_server().await;
    let data = dir.path().join("data");
    let datasets_before = files_under(&data.join("datasets"));
    assert!(!datasets_before.is_empty());
    std::fs::remove_file(data.join("meta.redb")).unwrap();

    // The server refuses to start and deletes nothing.
    let policies = common::policies_dir();
    let (status, _, stderr) = cleanroom(&[
        "serve".as_ref(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--policies".as_ref(),
        policies.as_os_str(),
        "--certs-dir".as_ref(),
        pki.path().as_os_str(),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("meta.redb") && stderr.contains("is missing"),
        "{stderr}"
    );
    assert!(stderr.contains("cleanroom admin recover"), "{stderr}");
    assert_eq!(files_under(&data.join("datasets")), datasets_before);
    assert!(
        !data.join("meta.redb").exists(),
        "an empty database was made"
    );

    // Recovery sets the files aside and keeps the budget.
    let (status, stdout, stderr) = cleanroom(&[
        "admin".as_ref(),
        "recover".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--policies".as_ref(),
        policies.as_os_str(),
    ]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("quarantine"), "{stdout}");
    let quarantined = files_under(&data.join("quarantine"));
    assert_eq!(quarantined.len(), datasets_before.len());
    let server = TestServer::start_in(pki, dir, Setup::default()).await;
    let mut acme = server.client("acme").await;
    let budget = acme.budget(AGREEMENT).await.unwrap();
    assert!(
        budget.epsilon_spent >= spent,
        "the budget came back: spent {} before, {} after",
        spent,
        budget.epsilon_spent
    );
    assert_eq!(current_rows(&server).await, 0);
    let entries = acme.audit_entries(AGREEMENT).await.unwrap();
    assert!(entries.iter().any(|e| e.action().word() == "recover"));
    let data = server.data_dir.path().join("data");
    cleanroom::audit::verify(&data).unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_damage_to_the_metadata_database_is_refused_or_harmless() {
    let (_pki, dir, _) = spent_server().await;
    let data = dir.path().join("data");
    let meta = data.join("meta.redb");
    let original = std::fs::read(&meta).unwrap();
    let versions = |store: &cleanroom::storage::Store| {
        ["customers", "audience"].map(|d| {
            store
                .current(AGREEMENT, d)
                .unwrap()
                .map(|v| (v.version, v.rows))
        })
    };
    let expected = versions(&cleanroom::storage::Store::open(&data, None).unwrap());
    let len = original.len();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for at in [0, 8, 64, 512, 4096, len / 3, len / 2, len - 4096, len - 1] {
        let mut zeroed = original.clone();
        let end = (at + 4096).min(len);
        zeroed[at..end].fill(0);
        cases.push((format!("a zeroed page at {at}"), zeroed));
        let mut flipped = original.clone();
        flipped[at] ^= 0x5a;
        cases.push((format!("a flipped byte at {at}"), flipped));
    }
    cases.push(("cut to half".into(), original[..len / 2].to_vec()));
    cases.push(("cut to 100 bytes".into(), original[..100].to_vec()));
    let (mut refused, mut harmless) = (0, 0);
    for (what, bytes) in cases {
        std::fs::write(&meta, &bytes).unwrap();
        let opened = std::panic::catch_unwind(|| cleanroom::storage::Store::open(&data, None));
        let opened = opened.unwrap_or_else(|_| panic!("{what}: opening panicked"));
        match opened {
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("meta.redb"), "{what}: {text}");
                assert!(text.contains("admin recover"), "{what}: {text}");
                refused += 1;
            }
            Ok(store) => {
                let seen =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| versions(&store)))
                        .unwrap_or_else(|_| panic!("{what}: reading panicked"));
                assert_eq!(seen, expected, "{what}: opened with other data");
                harmless += 1;
            }
        }
        assert!(
            !files_under(&data.join("datasets")).is_empty(),
            "{what}: files deleted"
        );
    }
    eprintln!("metadata damage: {refused} refused, {harmless} harmless");
}

/// Version files (not the matched tables made from them in the background).
fn version_files(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    files_under(&data.join("datasets"))
        .into_iter()
        .filter(|f| !f.to_string_lossy().ends_with(".matched.cds"))
        .collect()
}

fn retention_entries(entries: &[proto::AuditEntry]) -> Vec<(String, String)> {
    entries
        .iter()
        .filter(|e| e.action().word() == "retention")
        .map(|e| {
            (
                e.rule.clone().unwrap_or_default(),
                e.subject.clone().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_that_jumps_deletes_nothing_and_expiry_waits_its_grace() {
    use time::macros::datetime;
    let dir = common::demo_policies(None);
    let clock = cleanroom::clock::ManualClock::new(datetime!(2027-12-29 12:00 UTC));
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        clock: std::sync::Arc::new(clock.clone()),
        deletion: cleanroom::server::Deletion::default(),
        ..Setup::default()
    })
    .await;
    let data = server.data_dir.path().join("data");
    let (files, _) = common::synth(300, 0.5);
    common::upload_demo(&server, "acme", files.path()).await;
    common::upload_demo(&server, "globex", files.path()).await;
    let stored = version_files(&data);
    let mut acme = server.client("acme").await;
    let pass = || tokio::time::sleep(Duration::from_millis(500));
    pass().await;

    // Half a year ahead at once (past the expiry, past retention): nothing
    // is deleted, and the pause is audited once.
    clock.set(datetime!(2028-06-30 12:00 UTC));
    pass().await;
    pass().await;
    assert_eq!(version_files(&data), stored);
    let retention = retention_entries(&acme.audit_entries(AGREEMENT).await.unwrap());
    assert_eq!(retention.len(), 1, "{retention:?}");
    assert_eq!(retention[0].0, "clock.jump");

    // Back again: the agreement is whole.
    clock.set(datetime!(2027-12-29 12:05 UTC));
    pass().await;
    assert!(
        acme.query(
            AGREEMENT,
            "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region"
        )
        .await
        .is_ok()
    );

    // Time passing in believable steps: expired at midnight after the
    // 31st, kept through the grace day, deleted after it.
    for at in [
        datetime!(2027-12-30 08:00 UTC),
        datetime!(2027-12-31 04:00 UTC),
        datetime!(2027-12-31 23:00 UTC),
        datetime!(2028-01-01 18:00 UTC),
    ] {
        clock.set(at);
        pass().await;
        assert_eq!(version_files(&data), stored, "at {at}");
    }
    clock.set(datetime!(2028-01-02 00:00:01 UTC));
    let gone = common::eventually(|| {
        let d = data.clone();
        async move { version_files(&d).is_empty() }
    })
    .await;
    assert!(gone);
    let retention = retention_entries(&acme.audit_entries(AGREEMENT).await.unwrap());
    assert!(
        retention
            .iter()
            .any(|(_, s)| s == "customers: 1 version(s) deleted, the agreement expired"),
        "{retention:?}"
    );
    server.stop().await.unwrap();
}

#[test]
fn trust_clock_moves_the_latest_time_seen_to_now() {
    let dir = tempfile::tempdir().unwrap();
    let store = cleanroom::storage::Store::open(dir.path(), None).unwrap();
    // A store last run years ago: the server would pause deletion.
    store.see_time(1_600_000_000, true).unwrap();
    drop(store);
    cleanroom::audit::AuditLog::open(dir.path())
        .unwrap()
        .append(
            cleanroom::audit::Event {
                org: "acme".into(),
                agreement: AGREEMENT.into(),
                action: "upload",
                accepted: true,
                ..Default::default()
            },
            1_600_000_000,
        )
        .unwrap();
    let (status, stdout, stderr) = cleanroom(&[
        "admin".as_ref(),
        "trust-clock".as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("2020-09-13"), "{stdout}");
    let store = cleanroom::storage::Store::open(dir.path(), None).unwrap();
    let seen = store.time_seen().unwrap().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - seen).abs() < 60, "{seen} vs {now}");
    // The confirmation is audited for the agreement.
    let mut last = None;
    let n = cleanroom::audit::each_entry(dir.path(), |e| last = Some(e.clone())).unwrap();
    assert_eq!(n, 2);
    let last = last.unwrap();
    assert_eq!(last.agreement, AGREEMENT);
    assert!(
        last.subject
            .unwrap()
            .starts_with("operator confirmed the clock"),
    );
}

fn other_salt() -> String {
    blake3::hash(b"another salt").to_hex().to_string()
}

/// Rewrites the demo policy in `dir` with `salt`, as an editor would.
fn set_salt(dir: &std::path::Path, salt: &str) {
    let path = dir.join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: String = text
        .lines()
        .map(|l| match l.starts_with("salt = ") {
            true => format!("salt = \"{salt}\""),
            false => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = dir.join(".retail-media-demo.toml.tmp");
    std::fs::write(&tmp, text + "\n").unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_salt_change_refuses_answers_over_old_fingerprints_until_uploaded_again() {
    const SQL: &str = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";
    let dir = common::demo_policies(None);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (files, _) = common::synth(600, 0.5);
    common::upload_demo(&server, "acme", files.path()).await;
    common::upload_demo(&server, "globex", files.path()).await;
    let mut acme = server.client("acme").await;
    let before = acme.query(AGREEMENT, SQL).await.unwrap();
    let old_salt = acme
        .get_agreement(AGREEMENT)
        .await
        .unwrap()
        .summary
        .unwrap()
        .policy_hash;
    let salt_line = std::fs::read_to_string(dir.path().join("retail-media-demo.toml"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("salt = "))
        .unwrap()
        .trim_start_matches("salt = ")
        .trim_matches('"')
        .to_string();

    set_salt(dir.path(), &other_salt());
    assert!(
        common::eventually(|| {
            let mut c = acme.clone();
            let old = old_salt.clone();
            async move {
                c.get_agreement(AGREEMENT)
                    .await
                    .unwrap()
                    .summary
                    .unwrap()
                    .policy_hash
                    != old
            }
        })
        .await
    );
    let refused = |e: cleanroom::client::ClientError| {
        let status = e.status().cloned().unwrap();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("dataset.reupload"), "{status:?}");
    };
    refused(acme.query(AGREEMENT, SQL).await.unwrap_err());
    refused(
        acme.overlap(AGREEMENT, &["customers".into(), "audience".into()])
            .await
            .unwrap_err(),
    );
    let listed = acme.list_datasets(AGREEMENT).await.unwrap();
    assert_eq!(listed[0].state, proto::DatasetState::NeedsUpload as i32);
    let hash = common::policy_hash(&server).await;
    let erase = proto::datasets_service_client::DatasetsServiceClient::new(acme.channel())
        .erase(erase_request(&hash, 1))
        .await
        .unwrap_err();
    assert_eq!(erase.code(), Code::FailedPrecondition, "{erase:?}");
    assert!(erase.message().contains("dataset.reupload"));

    // The salt back: the same answer as before.
    set_salt(dir.path(), &salt_line);
    let back = common::eventually(|| {
        let mut c = acme.clone();
        async move { c.query(AGREEMENT, SQL).await.is_ok() }
    })
    .await;
    assert!(back);
    let again = acme.query(AGREEMENT, SQL).await.unwrap();
    assert_eq!(again.batches, before.batches);

    // A new salt and new uploads under it: answered again.
    set_salt(dir.path(), &other_salt());
    assert!(
        common::eventually(|| {
            let mut c = acme.clone();
            async move { c.query(AGREEMENT, SQL).await.is_err() }
        })
        .await
    );
    common::upload_demo(&server, "acme", files.path()).await;
    common::upload_demo(&server, "globex", files.path()).await;
    let uploaded_again = acme.query(AGREEMENT, SQL).await.unwrap();
    assert_eq!(uploaded_again.batches, before.batches);
    server.stop().await.unwrap();
}

const JOINED: &str = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

/// The version file of `dataset` (not a matched table).
fn version_file(data: &std::path::Path, dataset: &str) -> std::path::PathBuf {
    version_files(data)
        .into_iter()
        .find(|f| f.parent().is_some_and(|p| p.ends_with(dataset)))
        .unwrap()
}

fn assert_damaged(e: cleanroom::client::ClientError, dataset: &str) {
    let status = e.status().cloned().unwrap();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().starts_with("rule dataset.damaged"),
        "{status:?}"
    );
    assert!(status.message().contains(dataset), "{status:?}");
    assert!(!status.message().contains('/'), "a path in {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrub_finds_a_damaged_version_and_a_new_upload_mends_it() {
    let dir = common::demo_policies(None);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        scrub: cleanroom::server::Scrub {
            every: Duration::from_millis(200),
            bytes_per_second: 1 << 30,
        },
        ..Setup::default()
    })
    .await;
    let data = server.data_dir.path().join("data");
    let (files, _) = common::synth(500, 0.5);
    common::upload_demo(&server, "acme", files.path()).await;
    common::upload_demo(&server, "globex", files.path()).await;
    let mut acme = server.client("acme").await;
    let before = acme.query(AGREEMENT, JOINED).await.unwrap();

    // One byte changes in the middle of acme's file: same size, so only
    // opening its chunks finds it.
    let file = version_file(&data, "customers");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let found = common::eventually(|| {
        let mut c = acme.clone();
        async move {
            c.list_datasets(AGREEMENT).await.unwrap()[0].state
                == proto::DatasetState::Damaged as i32
        }
    })
    .await;
    assert!(found, "the scrub did not find the damage");
    assert_damaged(
        acme.query(AGREEMENT, JOINED).await.unwrap_err(),
        "customers",
    );
    let hash = common::policy_hash(&server).await;
    let erase = proto::datasets_service_client::DatasetsServiceClient::new(acme.channel())
        .erase(erase_request(&hash, 1))
        .await
        .unwrap_err();
    assert_eq!(erase.code(), Code::DataLoss, "{erase:?}");
    let entries = acme.audit_entries(AGREEMENT).await.unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.action().word() == "scrub" && e.rule.as_deref() == Some("dataset.damaged")),
        "the damage is not audited"
    );
    // globex learns its own datasets only; acme's state is acme's.
    let globex = server
        .client("globex")
        .await
        .list_datasets(AGREEMENT)
        .await
        .unwrap();
    assert_eq!(globex[0].state, proto::DatasetState::Matched as i32);

    common::upload_demo(&server, "acme", files.path()).await;
    let mended = acme.query(AGREEMENT, JOINED).await.unwrap();
    assert_eq!(mended.batches, before.batches);
    assert_eq!(
        acme.list_datasets(AGREEMENT).await.unwrap()[0].state,
        proto::DatasetState::Matched as i32
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_missing_version_file_is_found_at_start() {
    let server = TestServer::start().await;
    let (files, _) = common::synth(400, 0.5);
    common::upload_demo(&server, "acme", files.path()).await;
    common::upload_demo(&server, "globex", files.path()).await;
    let (pki, dir) = server.stop_keeping_all().await;
    let data = dir.path().join("data");
    let acme_file = version_file(&data, "customers");
    let len = std::fs::metadata(&acme_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&acme_file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(version_file(&data, "audience")).unwrap();
    // The matched tables made from them go too, so nothing hides the loss.
    for f in files_under(&data.join("datasets")) {
        if f.to_string_lossy().ends_with(".matched.cds") {
            std::fs::remove_file(f).unwrap();
        }
    }

    // The store is free once the server has stopped.
    drop(cleanroom::storage::Store::open(&data, None).unwrap());
    let server = TestServer::start_in(pki, dir, Setup::default()).await;
    let mut acme = server.client("acme").await;
    let mut globex = server.client("globex").await;
    for (client, dataset) in [(&mut acme, "customers"), (&mut globex, "audience")] {
        let listed = client.list_datasets(AGREEMENT).await.unwrap();
        assert_eq!(
            listed[0].state,
            proto::DatasetState::Damaged as i32,
            "{dataset}"
        );
    }
    let err = acme.query(AGREEMENT, JOINED).await.unwrap_err();
    assert_damaged(err, "customers");
    let err = acme
        .overlap(AGREEMENT, &["customers".into(), "audience".into()])
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), Code::DataLoss);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_at_its_drain_deadline_and_nothing_commits_after_it() {
    let dir = common::demo_policies(None);
    let mut server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        drain_timeout: Duration::from_secs(1),
        ..Setup::default()
    })
    .await;
    let hash = common::policy_hash(&server).await;
    let rows: Vec<Row> = (0..80).map(Row::new).collect();
    let stalled = Stalled::open(&server, &hash, "late", &rows).await;

    let asked = std::time::Instant::now();
    server.begin_shutdown();
    let task = server.task.take().unwrap();
    task.await.unwrap().unwrap();
    let took = asked.elapsed();
    // Grace (50 ms in tests) plus the drain, and a little for the rest.
    assert!(
        took < Duration::from_millis(2_500),
        "stopped after {took:?}"
    );

    // The stream that was still open asks to commit now: nothing is stored.
    let _ = stalled.tx.send(common::commit(80, 1)).await;
    drop(stalled.tx);
    let outcome = tokio::time::timeout(Duration::from_secs(10), stalled.call)
        .await
        .expect("the call never ended")
        .unwrap();
    assert!(outcome.is_err(), "committed after the drain: {outcome:?}");
    // The call's connection lets go of the store once it has ended.
    let data = server.data_dir.path().join("data");
    let started = std::time::Instant::now();
    let store = loop {
        match cleanroom::storage::Store::open(&data, None) {
            Ok(store) => break store,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(10), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(store.current(AGREEMENT, "customers").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_tls_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with(Setup {
        tls_handshake_timeout: Duration::from_secs(1),
        ..Setup::default()
    })
    .await;
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 4 == 0 {
            // The first bytes of a TLS record, then nothing.
            s.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        }
        idle.push(s);
    }
    // The server answers others meanwhile.
    let mut acme = server.client("acme").await;
    acme.list_agreements().await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = 0;
    for mut s in idle {
        let mut buf = [0u8; 64];
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            // An alert before the close is a close too.
            Ok(Ok(_)) => {
                if matches!(
                    tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                ) {
                    closed += 1;
                }
            }
            Err(_) => {}
        }
    }
    assert_eq!(closed, 200, "connections left open");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    server.stop().await.unwrap();
}

/// A tmpfs of `bytes` mounted at `dir`, unmounted on drop; None, with the
/// reason printed, where this process may not mount one.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk(dir.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a small tmpfs here ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount ({e})");
                None
            }
        }
    }

    /// Writes a file until the disk is full; its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![7u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_unavailable_and_everything_works_once_freed() {
    // The server's warnings (the metadata database failing to reopen, and
    // why) go with the test's output, shown when it fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("cleanroom=warn")
        .try_init();
    let pki = common::Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("data"), 32 << 20) else {
        return;
    };
    let policies = common::demo_policies(None);
    let setup = || Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    };
    let server = TestServer::start_in(pki, dir, setup()).await;
    let (files, _) = common::synth(2_000, 0.5);
    common::upload_demo(&server, "acme", files.path()).await;
    let data = server.data_dir.path().join("data");
    let entries_before = cleanroom::audit::verify(&data).unwrap().entries;
    let filler = disk.fill();
    // Long enough for background passes to fail writing the metadata
    // database too (redb refuses everything after that until reopened).
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // Uploads while the disk is full: UNAVAILABLE, nothing changed.
    let globex = server.client("globex").await;
    for _ in 0..3 {
        let err = cleanroom::prepare::upload(
            &globex,
            &common::secret(),
            &common::upload_options(
                "audience",
                &files.path().join(cleanroom::synth::GLOBEX_FILE),
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        let text = err.to_string();
        assert!(text.contains("full or read-only"), "{text}");
        assert!(!text.contains("/tmp"), "a path in {text}");
    }
    cleanroom::audit::verify(&data).unwrap();

    // Space again: nothing of the refused uploads was kept (reads may have
    // been UNAVAILABLE too while the metadata database could not be
    // opened again), the same upload goes through, the chain holds, and a
    // restart finds it all.
    std::fs::remove_file(filler).unwrap();
    // The metadata database opens again once nothing holds the failed
    // handle any more; until then calls stay UNAVAILABLE.
    // Reopening may wait for calls in flight (and redb's repair of a file
    // whose last write failed): up to 30 s on a loaded machine.
    let globex = server.client("globex").await;
    let start = std::time::Instant::now();
    let mut listed = false;
    while !listed && start.elapsed() < Duration::from_secs(30) {
        let mut g = globex.clone();
        listed = g.list_datasets(AGREEMENT).await.is_ok_and(|d| d.is_empty());
        if !listed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        listed,
        "the refused uploads left something, or the store never came back"
    );
    common::upload_demo(&server, "globex", files.path()).await;
    let acme = server.client("acme").await;
    assert!(
        common::eventually(|| {
            let mut a = acme.clone();
            async move { a.query(AGREEMENT, JOINED).await.is_ok() }
        })
        .await
    );
    assert!(cleanroom::audit::verify(&data).unwrap().entries > entries_before);
    let (pki, dir) = server.stop_keeping_all().await;
    let server = TestServer::start_in(pki, dir, setup()).await;
    server
        .client("acme")
        .await
        .query(AGREEMENT, JOINED)
        .await
        .unwrap();
    let (_, dir) = server.stop_keeping_all().await;
    drop(disk);
    drop(dir);
}
