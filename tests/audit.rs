//! Uploads are audited; parties read their agreements' entries; tampering
//! with the log on disk is detected.

mod common;

use common::{TestServer, audit_holds, secret, synth, upload_options, with_cells};
use tonic::Code;

#[tokio::test]
async fn uploads_are_audited_and_the_chain_detects_tampering() {
    let mut server = TestServer::start().await;
    let (files, _) = synth(500, 0.3);
    let acme = server.client("acme").await;
    let ok = cleanroom::prepare::upload(
        &acme,
        &secret(),
        &upload_options("customers", &files.path().join("acme-customers.csv")),
    )
    .await
    .unwrap();
    // A refused upload: a value out of bounds.
    let bad_path = files.path().join("bad.csv");
    let text = std::fs::read_to_string(files.path().join("acme-customers.csv")).unwrap();
    std::fs::write(&bad_path, with_cells(&text, 1..=1, 5, "77777.77")).unwrap();
    assert!(
        cleanroom::prepare::upload(&acme, &secret(), &upload_options("customers", &bad_path))
            .await
            .is_err()
    );

    // Both parties read the same entries; an outsider cannot.
    let mut acme = acme;
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].organisation, "acme");
    assert_eq!(entries[0].action().word(), "upload");
    assert_eq!(entries[0].decision().word(), "accepted");
    assert_eq!(entries[0].rows, Some(ok.response.rows));
    assert_eq!(
        entries[0].subject.as_deref(),
        Some(format!("customers {}", ok.response.version).as_str())
    );
    assert_eq!(entries[1].decision().word(), "rejected");
    assert_eq!(entries[1].rule.as_deref(), Some("metric.bounds"));
    assert_eq!(entries[1].prev, entries[0].hash);
    assert!(!audit_holds(&entries, 77777), "an entry holds a data value");
    // The partner reads them without acme's row count, and without the
    // hash that would give the count back.
    let mut globex = server.client("globex").await;
    let seen = globex.audit_entries("retail-media-demo").await.unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].action().word(), "upload");
    assert_eq!(seen[0].rows, None);
    assert_eq!((seen[0].hash.as_str(), seen[1].prev.as_str()), ("", ""));
    assert_eq!(seen[1].hash, entries[1].hash);
    let mut initech = server.client("initech").await;
    let err = initech
        .audit_entries("retail-media-demo")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    let kept = std::mem::replace(&mut server.data_dir, tempfile::tempdir().unwrap());
    server.stop().await.unwrap();
    let data_dir = kept.path().join("data");
    assert_eq!(cleanroom::audit::verify(&data_dir).unwrap().entries, 2);
    let verify_cli = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(["audit", "verify", "--data-dir"])
            .arg(&data_dir)
            .output()
            .unwrap()
    };
    assert!(verify_cli().status.success());
    // A path with no audit log is a failure, not an intact chain of nothing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["audit", "verify", "--data-dir", "/no/such/dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "a local path that is wrong");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no audit log here"), "{stderr}");

    // Edit the first entry's row count on disk.
    let log = data_dir.join(cleanroom::audit::LOG_FILE);
    let original = std::fs::read_to_string(&log).unwrap();
    let edited = original.replacen(
        &format!("\"rows\":{}", ok.response.rows),
        &format!("\"rows\":{}", ok.response.rows + 1),
        1,
    );
    assert_ne!(edited, original);
    std::fs::write(&log, &edited).unwrap();
    let out = verify_cli();
    assert_eq!(out.status.code(), Some(8), "damaged stored data");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken at line 1 (entry 1)"), "{stderr}");

    // Delete the last entry.
    let first_line_only = original.lines().next().unwrap().to_string() + "\n";
    std::fs::write(&log, first_line_only).unwrap();
    assert!(!verify_cli().status.success());
}
