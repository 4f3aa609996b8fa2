//! A server killed in the middle of an upload loses nothing committed and
//! shows nothing partial after a restart.

mod common;

use std::time::{Duration, Instant};

use cleanroom::client::Client;
use cleanroom::prepare::upload;
use common::{RealServer, secret, synth, upload_options};

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_upload_keeps_the_previous_version() {
    let pki = common::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let secret = secret();
    let (small, _) = synth(500, 0.3);
    let (large, _) = synth(300_000, 0.3);

    let mut server = RealServer::spawn(&pki, &data_dir, "0.1");
    let client = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    let first = upload(
        &client,
        &secret,
        &upload_options("customers", &small.path().join("acme-customers.csv")),
    )
    .await
    .unwrap();

    // Start a large upload and kill the server once its staging file grows.
    let big = upload_options("customers", &large.path().join("acme-customers.csv"));
    let (c, s) = (client.clone(), secret.clone());
    let pending = tokio::spawn(async move { upload(&c, &s, &big).await });
    let staging = data_dir.join("staging");
    let started = Instant::now();
    loop {
        let growing = files_under(&staging).iter().any(|f| {
            std::fs::metadata(f)
                .map(|m| m.len() > 100_000)
                .unwrap_or(false)
        });
        if growing {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the large upload never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.signal(libc::SIGKILL);
    let _ = server.child.wait();
    let outcome = pending.await.unwrap();
    assert!(
        outcome.is_err(),
        "the interrupted upload must not report success"
    );

    // Restart on the same data directory.
    let server = RealServer::spawn(&pki, &data_dir, "0.1");
    let mut client = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    let listed = client.list_datasets("retail-media-demo").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, first.response.version);
    assert_eq!(listed[0].rows, first.response.rows);
    assert_eq!(listed[0].versions, 1, "no partial version is recorded");
    assert!(
        files_under(&staging).is_empty(),
        "staging is cleared at start"
    );
    let stored = files_under(&data_dir.join("datasets"));
    assert_eq!(
        stored.len(),
        1,
        "only the committed version's file remains: {stored:?}"
    );
    server.signal(libc::SIGTERM);
}

/// What one crash point leaves behind, checked after a restart.
async fn crash_at(point: &str) -> String {
    use cleanroom::prepare::{CsvOptions, EraseOptions, erase};
    let pki = common::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let policies = common::policies_dir();
    let secret = secret();
    let (files, _) = synth(400, 0.5);
    let acme_file = files.path().join("acme-customers.csv");
    let query = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

    // Before: both datasets, one private query.
    let mut server = RealServer::spawn(&pki, &data_dir, "0.1");
    let acme = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    let globex = Client::connect(&server.config(&pki, "globex"))
        .await
        .unwrap();
    let first = upload(&acme, &secret, &upload_options("customers", &acme_file))
        .await
        .unwrap();
    upload(
        &globex,
        &secret,
        &upload_options("audience", &files.path().join("globex-audience.csv")),
    )
    .await
    .unwrap();
    let a = acme.clone();
    assert!(
        common::eventually(|| {
            let mut a = a.clone();
            async move {
                a.query_with_epsilon("retail-media-demo", query, Some(0.5))
                    .await
                    .is_ok()
            }
        })
        .await
    );
    server.signal(libc::SIGTERM);
    let _ = server.child.wait();
    drop((acme, globex));

    // The crash.
    let mut server = RealServer::spawn_env(
        &pki,
        &data_dir,
        "0.1",
        &policies,
        &[("CLEANROOM_CRASH_AT", point)],
    );
    let acme = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    let withdrawn = files.path().join("withdrawn.csv");
    let text = std::fs::read_to_string(&acme_file).unwrap();
    std::fs::write(
        &withdrawn,
        text.lines().take(6).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    let failed = match point {
        "erase.committed" | "delete.recorded" => erase(
            &acme,
            &secret,
            &EraseOptions {
                agreement: "retail-media-demo".into(),
                dataset: "customers".into(),
                input: withdrawn,
                format: None,
                csv: CsvOptions::default(),
                mapping: Default::default(),
            },
        )
        .await
        .is_err(),
        "ledger.charged" => {
            let mut a = acme.clone();
            a.query_with_epsilon("retail-media-demo", query, Some(0.5))
                .await
                .is_err()
        }
        _ => upload(&acme, &secret, &upload_options("customers", &acme_file))
            .await
            .is_err(),
    };
    assert!(failed, "{point}: the call survived its crash point");
    let started = Instant::now();
    while server.child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{point}: still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(acme);

    // After: the server starts, every dataset reads, queries answer, the
    // budget spent is what the audit log says, and the chain verifies.
    let mut server = RealServer::spawn(&pki, &data_dir, "0.1");
    let mut acme = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    let listed = acme.list_datasets("retail-media-demo").await.unwrap();
    assert_eq!(listed.len(), 1, "{point}");
    let rows = listed[0].rows;
    assert!(
        rows == first.response.rows || rows + 5 == first.response.rows,
        "{point}: {rows} rows, neither the old nor the new version"
    );
    assert_eq!(
        listed[0].state,
        cleanroom::proto::DatasetState::Matched as i32,
        "{point}: {listed:?}"
    );
    if point.starts_with("erase") || point.starts_with("delete") {
        // The erasure's last step is finished: no older version keeps the
        // erased people.
        let finished = common::eventually(|| {
            let mut a = acme.clone();
            async move { a.list_datasets("retail-media-demo").await.unwrap()[0].versions == 1 }
        })
        .await;
        assert!(finished, "{point}: older versions kept");
    }
    let answered = common::eventually(|| {
        let mut a = acme.clone();
        async move {
            a.query_with_epsilon("retail-media-demo", query, Some(0.5))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(answered, "{point}: no answer after the restart");
    let spent = acme
        .budget("retail-media-demo")
        .await
        .unwrap()
        .epsilon_spent;
    let audited: f64 = acme
        .audit_entries("retail-media-demo")
        .await
        .unwrap()
        .iter()
        .filter(|e| e.organisation == "acme")
        .filter_map(|e| e.epsilon)
        .sum();
    assert!(
        (spent - audited).abs() < 1e-9,
        "{point}: ledger {spent} but the audit log {audited}"
    );
    server.signal(libc::SIGTERM);
    let _ = server.child.wait();
    let verified = cleanroom::audit::verify(&data_dir).unwrap();
    let quarantined = files_under(&data_dir.join("quarantine")).len();
    format!(
        "{point}: restarted, {rows} rows, budget {spent} = audit, chain {} entries, {quarantined} file(s) quarantined",
        verified.entries
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_leaves_a_store_that_starts_whole() {
    for point in cleanroom::crash::POINTS {
        eprintln!("{}", crash_at(point).await);
    }
}
