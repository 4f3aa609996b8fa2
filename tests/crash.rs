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
