//! Governed queries over gRPC with mutual TLS, end to end.

mod common;

use common::{TestServer, synth, upload_demo};
use tonic::Code;

#[tokio::test]
async fn queries_over_grpc_are_governed_audited_and_never_echo_data() {
    let server = TestServer::start().await;
    let mut acme = server.client("acme").await;

    // Before the audience is uploaded, a query naming it says so.
    let (files, truth) = synth(4_000, 0.4);
    upload_demo(&server, "acme", files.path()).await;
    let sql = "SELECT c.region, COUNT(*) AS people, AVG(c.lifetime_value) AS ltv FROM customers c \
               JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region";
    let err = acme.query("retail-media-demo", sql).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");

    upload_demo(&server, "globex", files.path()).await;
    let globex = server.client("globex").await;

    let answer = acme.query("retail-media-demo", sql).await.unwrap();
    let names: Vec<&str> = answer
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, ["region", "people", "ltv"]);
    assert_eq!(answer.header.min_group_size, 50);
    assert_eq!(answer.header.datasets, ["customers", "audience"]);
    let total: i64 = answer
        .batches
        .iter()
        .map(|b| {
            arrow::compute::sum(
                b.column(1)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap(),
            )
            .unwrap_or(0)
        })
        .sum();
    // Every shared person has one row on each side and a valid email; four
    // regions of several hundred people each: all are shown. The demo
    // agreement has differential privacy, so each count carries noise.
    let privacy = answer.header.privacy.as_ref().expect("the demo is private");
    assert_eq!(privacy.epsilon, 1.0);
    // The report names each value as the query does.
    let named: Vec<&str> = privacy
        .columns
        .iter()
        .map(|c| c.aggregate.as_str())
        .collect();
    assert_eq!(named, ["people", "ltv"]);
    let noise = privacy.columns[0].half_width_95;
    assert!(noise > 0.0 && noise < 20.0, "{noise}");
    assert!(
        (total - truth.overlap as i64).abs() as f64 <= 4.0 * 3.0 * noise,
        "{total} vs {}",
        truth.overlap
    );
    assert_eq!(answer.summary.rows, 4);

    let csv = cleanroom::cli::render_answer(&answer, cleanroom::cli::OutputFormat::Csv).unwrap();
    assert!(csv.starts_with("region,people,ltv\n"), "{csv}");

    // A refused query: the rule, never the engine's words or the data.
    let err = acme
        .query("retail-media-demo", "SELECT c.region, MAX(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert_eq!(
        err.to_string(),
        "PERMISSION_DENIED: rule query.aggregates: max is not allowed in agreement retail-media-demo (at line 1, column 18)"
    );
    let err = acme
        .query("retail-media-demo", "SELEC 1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));

    // globex may not query.
    let mut globex = globex;
    let err = globex.query("retail-media-demo", sql).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains("party.rights"), "{err}");

    // Every query is audited with the hash of its SQL and its decision.
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let queries: Vec<_> = entries
        .iter()
        .filter(|e| e.action().word() == "query")
        .collect();
    assert_eq!(queries.len(), 5);
    let accepted = queries
        .iter()
        .find(|e| e.decision().word() == "accepted")
        .unwrap();
    assert_eq!(
        accepted.sql_hash.as_deref(),
        Some(blake3::hash(sql.as_bytes()).to_hex().as_str())
    );
    assert_eq!(accepted.rows, Some(4));
    assert_eq!(accepted.epsilon, Some(1.0));
    assert!(
        queries
            .iter()
            .any(|e| e.rule.as_deref() == Some("query.aggregates"))
    );
    server.stop().await.unwrap();
}
