//! Approved templates on a real server: listing, running with checked
//! parameters, refusals that name the parameter and rule, templates-only
//! agreements, and the template and parameter hash in answers and audit
//! entries.

mod common;

use std::collections::BTreeMap;

use cleanroom::proto;
use common::{Setup, TestServer, synth, upload_demo};
use tonic::Code;

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The demo policies without privacy, `edit` applied to the text.
fn policies_with(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = common::demo_policies(None);
    let path = dir.path().join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    dir
}

async fn started(policies: &tempfile::TempDir) -> (TestServer, tempfile::TempDir) {
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (dir, _) = synth(3_000, 0.6);
    upload_demo(&server, "acme", dir.path()).await;
    upload_demo(&server, "globex", dir.path()).await;
    (server, dir)
}

fn rule_of(e: &cleanroom::client::ClientError) -> (Code, String) {
    let status = e.status().expect("a status");
    (status.code(), status.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_listed_run_and_audited() {
    let policies = policies_with(|t| t);
    let (server, _data) = started(&policies).await;
    let mut acme = server.client("acme").await;

    // Listed with their parameters, for the parties that may run them.
    let view = acme.get_agreement("retail-media-demo").await.unwrap();
    let names: Vec<&str> = view.templates.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lift_by_region",
            "overlap_by_segment",
            "churn_risk",
            "attribution_by_week"
        ]
    );
    let listing = cleanroom::cli::render_templates(&view);
    assert!(
        listing.contains("--param min_exposures=...   an integer from 1 to 100"),
        "{listing}"
    );
    assert!(
        listing.contains("--param as_of=...   a date (YYYY-MM-DD) from 2026-01-01 to 2027-12-31"),
        "{listing}"
    );
    let mut globex = server.client("globex").await;
    let theirs = globex.get_agreement("retail-media-demo").await.unwrap();
    assert!(theirs.templates.is_empty(), "globex may run none");

    // Runs, and says which template with which values.
    let a = acme
        .run_template(
            "retail-media-demo",
            "churn_risk",
            &params(&[("as_of", "2026-06-30")]),
            None,
        )
        .await
        .unwrap();
    assert!(a.batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
    assert_eq!(a.summary.template, "churn_risk");
    let again = acme
        .run_template(
            "retail-media-demo",
            "churn_risk",
            &params(&[("as_of", " 2026-06-30 ")]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(again.summary.params_hash, a.summary.params_hash);
    let other = acme
        .run_template(
            "retail-media-demo",
            "churn_risk",
            &params(&[("as_of", "2026-05-31")]),
            None,
        )
        .await
        .unwrap();
    assert_ne!(other.summary.params_hash, a.summary.params_hash);

    // Bad parameters: refused naming the parameter and the rule, never
    // repeating the value.
    for (name, given, param) in [
        ("churn_risk", vec![("as_of", "2025-12-31")], "as_of"),
        ("churn_risk", vec![("as_of", "yesterday'; DROP")], "as_of"),
        ("churn_risk", vec![], "as_of"),
        (
            "churn_risk",
            vec![("as_of", "2026-06-30"), ("extra", "1")],
            "extra",
        ),
        (
            "lift_by_region",
            vec![("min_exposures", "0")],
            "min_exposures",
        ),
        (
            "lift_by_region",
            vec![("min_exposures", "1 OR 1=1")],
            "min_exposures",
        ),
        (
            "overlap_by_segment",
            vec![("regions", "north,mars")],
            "regions",
        ),
        (
            "overlap_by_segment",
            vec![("regions", "north,north")],
            "regions",
        ),
    ] {
        let e = acme
            .run_template("retail-media-demo", name, &params(&given), None)
            .await
            .unwrap_err();
        let (code, message) = rule_of(&e);
        assert_eq!(code, Code::InvalidArgument, "{name} {given:?}: {message}");
        assert!(message.contains("rule template.param"), "{message}");
        assert!(message.contains(&format!("parameter {param}")), "{message}");
        for (_, v) in &given {
            if v.len() > 4 && !["2026-06-30", "north,north"].contains(v) {
                assert!(!message.contains(v), "{message}");
            }
        }
    }
    let e = acme
        .run_template("retail-media-demo", "no_such", &params(&[]), None)
        .await
        .unwrap_err();
    assert_eq!(rule_of(&e).0, Code::PermissionDenied);
    assert!(rule_of(&e).1.contains("rule template.unknown"));
    // SQL and a template in one request: refused.
    let e = proto::queries_service_client::QueriesServiceClient::new(acme.channel())
        .query(proto::QueryRequest {
            agreement_id: "retail-media-demo".into(),
            sql: "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email".into(),
            template: "churn_risk".into(),
            params: [("as_of".to_string(), "2026-06-30".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Audit entries carry the template and the values' hash.
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let ran: Vec<_> = entries
        .iter()
        .filter(|e| {
            e.template.as_deref() == Some("churn_risk") && e.decision().word() == "accepted"
        })
        .collect();
    assert_eq!(ran.len(), 3);
    assert_eq!(
        ran[0].params_hash.as_deref(),
        Some(a.summary.params_hash.as_str())
    );
    assert_eq!(
        ran[0].sql_hash.as_deref(),
        Some(a.summary.sql_hash.as_str())
    );
    let refused = entries
        .iter()
        .filter(|e| e.action().word() == "query" && e.decision().word() == "rejected")
        .count();
    assert!(refused >= 9, "{refused} refusals audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templates_only_agreement_refuses_other_sql() {
    let policies = policies_with(|t| {
        t.replacen(
            "min_group_size = 50\n",
            "min_group_size = 50\nmode = \"templates\"\n",
            1,
        )
    });
    let (server, _data) = started(&policies).await;
    let mut acme = server.client("acme").await;
    let e = acme
        .query(
            "retail-media-demo",
            "SELECT c.region, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region",
        )
        .await
        .unwrap_err();
    let (code, message) = rule_of(&e);
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("rule query.mode"), "{message}");
    let ok = acme
        .run_template(
            "retail-media-demo",
            "overlap_by_segment",
            &params(&[("regions", "north,south,east,west")]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(ok.summary.template, "overlap_by_segment");
}
