//! Refusals as a product, from a real server: every refusal carries a
//! `google.rpc.ErrorInfo` naming its rule, a refusal about the analyst's
//! SQL points at the line and column and names the nearest allowed name,
//! and no refusal echoes a data value.

mod common;

use std::collections::{BTreeMap, HashMap};

use cleanroom::client::{Client, ClientError};
use common::{TestServer, synth, upload_demo};
use tonic::Code;
use tonic_types::StatusExt;

/// The status a refused call returned, and its details.
struct Refusal {
    code: Code,
    message: String,
    reason: String,
    domain: String,
    metadata: HashMap<String, String>,
    /// (field, description) of each BadRequest field violation.
    violations: Vec<(String, String)>,
}

fn refusal(err: ClientError) -> Refusal {
    let status = err.status().expect("a status from the server").clone();
    let details = status.check_error_details().expect("details decode");
    let info = details
        .error_info()
        .expect("every refusal carries an ErrorInfo");
    Refusal {
        code: status.code(),
        message: status.message().to_string(),
        reason: info.reason.clone(),
        domain: info.domain.clone(),
        metadata: info.metadata.clone(),
        violations: details
            .bad_request()
            .map(|b| {
                b.field_violations
                    .iter()
                    .map(|v| (v.field.clone(), v.description.clone()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

async fn refused(acme: &mut Client, sql: &str) -> Refusal {
    refusal(acme.query("retail-media-demo", sql).await.unwrap_err())
}

#[tokio::test]
async fn refusals_name_their_rule_and_point_into_the_analysts_sql() {
    let server = TestServer::start().await;
    let (files, _) = synth(1_500, 0.5);
    upload_demo(&server, "acme", files.path()).await;
    upload_demo(&server, "globex", files.path()).await;
    let mut acme = server.client("acme").await;

    // A misspelt column: where it is, and the column meant.
    let r = refused(
        &mut acme,
        "SELECT c.region,\n       AVG(c.lifetime_vlaue) AS ltv\nFROM customers c JOIN audience a ON c.email = a.email\nGROUP BY c.region",
    )
    .await;
    assert_eq!(
        (r.code, r.reason.as_str(), r.domain.as_str()),
        (Code::InvalidArgument, "sql.columns", "cleanroom")
    );
    assert_eq!(
        r.message,
        "rule sql.columns: column c.lifetime_vlaue does not exist in the query's tables; did you mean c.lifetime_value? (at line 2, column 12)"
    );
    assert_eq!(r.metadata["name"], "c.lifetime_vlaue");
    assert_eq!(r.metadata["suggestion"], "c.lifetime_value");
    assert_eq!(
        (r.metadata["line"].as_str(), r.metadata["column"].as_str()),
        ("2", "12")
    );
    assert_eq!(r.violations.len(), 1);
    assert_eq!(r.violations[0].0, "sql");
    assert!(
        r.violations[0].1.starts_with("line 2, column 12: "),
        "{:?}",
        r.violations
    );

    // A misspelt table, unqualified columns, a misspelt function.
    let r = refused(
        &mut acme,
        "SELECT COUNT(*) FROM custmers c JOIN audience a ON c.email = a.email",
    )
    .await;
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::PermissionDenied, "query.tables")
    );
    assert_eq!(r.metadata["suggestion"], "customers");
    assert_eq!(
        (r.metadata["line"].as_str(), r.metadata["column"].as_str()),
        ("1", "22")
    );
    let r = refused(
        &mut acme,
        "SELECT regoin, COUNT(*) FROM customers JOIN audience USING (email) GROUP BY regoin",
    )
    .await;
    assert_eq!(r.reason, "sql.columns");
    assert_eq!(r.metadata["suggestion"], "region");
    assert_eq!(r.metadata["column"], "8");
    let r = refused(
        &mut acme,
        "SELECT c.region, COUNT(*), floorr(AVG(c.lifetime_value)) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region",
    )
    .await;
    assert_eq!(r.reason, "query.functions");
    assert_eq!(r.metadata["suggestion"], "floor");

    // A syntax error: its place and what was expected, not what was found.
    let r = refused(&mut acme, "SELECT c.region, COUNT(*)\nFROM customers c JOIN audience a ON c.email = a.email\nGROUP c.region").await;
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::InvalidArgument, "sql.syntax")
    );
    assert_eq!(r.metadata["line"], "3", "{}", r.message);
    assert!(r.message.contains("(at line 3, column "), "{}", r.message);

    // The alias of a table is not a subquery: the rule is the aggregate one.
    let r = refused(&mut acme, "SELECT c.email FROM customers c").await;
    assert_eq!(r.reason, "query.aggregate", "{}", r.message);

    // A policy refusal names its rule too.
    let r = refused(
        &mut acme,
        "SELECT c.region, MAX(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region",
    )
    .await;
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::PermissionDenied, "query.aggregates")
    );
    assert_eq!(r.metadata["column"], "18");

    // Values are never echoed: not a literal the analyst typed, not a
    // quoted name that is not a plain name.
    for sql in [
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 'jane@example.com' AND c.\"jane@example.com\" = 1",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 'jane@example.com' GROUP 'jane@example.com'",
        "SELECT COUNT(*) FROM \"jane@example.com\" c",
    ] {
        let r = refused(&mut acme, sql).await;
        let everything = format!("{} {:?} {:?}", r.message, r.metadata, r.violations);
        assert!(!everything.contains("jane"), "{sql}: {everything}");
        assert!(!r.reason.is_empty());
    }

    // Templates: a misspelt name and a misspelt parameter, each with the
    // nearest one it may run.
    let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let r = refusal(
        acme.run_template("retail-media-demo", "lift_by_regoin", &params(&[]), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::PermissionDenied, "template.unknown")
    );
    assert_eq!(r.metadata["suggestion"], "lift_by_region");
    let r = refusal(
        acme.run_template(
            "retail-media-demo",
            "lift_by_region",
            &params(&[("min_exposure", "1")]),
            None,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::InvalidArgument, "template.param")
    );
    assert_eq!(r.metadata["suggestion"], "min_exposures");
    // A template globex may not run is not suggested to it.
    let mut globex = server.client("globex").await;
    let r = refusal(
        globex
            .run_template("retail-media-demo", "lift_by_regoin", &params(&[]), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(r.reason, "template.unknown");
    assert!(!r.metadata.contains_key("suggestion"), "{:?}", r.metadata);

    // Refusals outside SQL carry their rule and fields as well.
    let r = refusal(
        acme.query("no-such-agreement", "SELECT 1")
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::NotFound, "agreement.party")
    );
    assert_eq!(r.metadata["agreement"], "no-such-agreement");
    let long = "x".repeat(1_000);
    let r = refusal(acme.query(&long, "SELECT 1").await.unwrap_err());
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::InvalidArgument, "request.agreement_id")
    );
    assert_eq!(r.violations[0].0, "agreement_id");
    let r = refusal(
        acme.query_with_epsilon(
            "retail-media-demo",
            "SELECT c.region, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region",
            Some(1000.0),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (r.code, r.reason.as_str()),
        (Code::InvalidArgument, "request.epsilon")
    );
    // Every rule a server sends has advice for the caller.
    for reason in [
        "sql.columns",
        "query.tables",
        "template.unknown",
        "agreement.party",
        &r.reason,
    ] {
        assert!(cleanroom::rules::advice(reason).is_some(), "{reason}");
    }
    server.stop().await.unwrap();
}
