//! Arrow Flight SQL on a real server, from a client no one here wrote: the
//! Python ADBC driver (`tests/python/flight_sql_client.py`) with mutual
//! TLS. It lists the caller's agreements and tables, runs a governed query
//! into pandas, gets a refused query's rule in its error, and is turned
//! away without a client certificate. The same query through the `Query`
//! RPC returns the same released rows, and both are audited.

mod common;

use std::path::PathBuf;
use std::process::Command;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use common::{Setup, TestServer, demo_policies, synth, upload_demo};

const SQL: &str = "SELECT c.region, COUNT(*) AS customers, AVG(c.lifetime_value) AS avg_value FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region";
const REFUSED: &str = "SELECT c.region, MAX(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

/// A Python with the pinned client packages: `CLEANROOM_PYTHON` (set by
/// `.ci/run`), or a virtual environment under ~/.cache made on first use.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CLEANROOM_PYTHON") {
        return p.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let venv = PathBuf::from(home).join(".cache/cleanroom-venv");
    let py = venv.join("bin/python");
    let ready = Command::new(&py)
        .args(["-c", "import adbc_driver_flightsql, pyarrow, pandas"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(made.success(), "python3 -m venv failed");
        let requirements =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/requirements.txt");
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "-r"])
            .arg(requirements)
            .status()
            .expect("pip runs");
        assert!(installed.success(), "installing the Python clients failed");
    }
    py
}

/// A server under the demo agreement (`privacy` replacing its section)
/// with both partners' synthetic uploads; the folders live as long as the
/// returned guard.
async fn server_with_data(privacy: Option<&str>) -> (TestServer, [tempfile::TempDir; 2]) {
    let policies = demo_policies(privacy);
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (data, _) = synth(4_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    (server, [policies, data])
}

/// The answer of the `Query` RPC as (region, customers, avg_value) rows.
fn rpc_rows(answer: &cleanroom::client::QueryAnswer) -> Vec<(String, f64, f64)> {
    let mut rows = Vec::new();
    for b in &answer.batches {
        let region = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
        let n = arrow::compute::cast(b.column(1), &DataType::Float64).unwrap();
        let avg = arrow::compute::cast(b.column(2), &DataType::Float64).unwrap();
        for r in 0..b.num_rows() {
            assert!(!region.is_null(r));
            rows.push((
                region.as_string::<i32>().value(r).to_string(),
                n.as_primitive::<Float64Type>().value(r),
                avg.as_primitive::<Float64Type>().value(r),
            ));
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_adbc_runs_governed_queries_over_flight_sql() {
    let (server, _folders) = server_with_data(None).await;
    let mut acme = server.client("acme").await;
    let rpc = rpc_rows(&acme.query("retail-media-demo", SQL).await.unwrap());
    assert_eq!(rpc.len(), 4);

    let pki = server.pki.path().to_path_buf();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/flight_sql_client.py");
    let python = python();
    let uri = format!("grpc+tls://127.0.0.1:{}", server.addr.port());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("CLEANROOM_URI", uri)
            .env("CLEANROOM_CA", pki.join("ca.pem"))
            .env("CLEANROOM_CERT", pki.join("acme.pem"))
            .env("CLEANROOM_KEY", pki.join("acme-key.pem"))
            .env("CLEANROOM_SQL", SQL)
            .env("CLEANROOM_REFUSED_SQL", REFUSED)
            .output()
            .expect("the Python client runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    eprintln!("the Python client saw: {seen}");

    // What the caller may see, and nothing else.
    assert_eq!(seen["catalogs"], serde_json::json!(["retail-media-demo"]));
    let tables = &seen["tables"]["retail-media-demo"];
    assert_eq!(
        tables["customers"],
        serde_json::json!([
            "email",
            "phone",
            "age_band",
            "region",
            "lifetime_value",
            "purchases",
            "last_purchase",
            "lead_score"
        ])
    );
    assert!(
        !tables["audience"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("health_interest")),
        "a sensitive column is listed: {tables}"
    );

    // The same released rows as the Query RPC.
    assert_eq!(
        seen["columns"],
        serde_json::json!(["region", "customers", "avg_value"])
    );
    let flight: Vec<(String, f64, f64)> = seen["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["region"].as_str().unwrap().to_string(),
                r["customers"].as_f64().unwrap(),
                r["avg_value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(flight, rpc);
    assert_eq!(
        seen["metadata"]["cleanroom.min_group_size"],
        serde_json::json!("50")
    );

    // A refusal names its rule; no certificate, no answer.
    let refused = seen["refused"].as_str().expect("the refused query failed");
    assert!(refused.contains("rule query.aggregates"), "{refused}");
    let without = seen["without_certificate"]
        .as_str()
        .expect("the call without a certificate failed");
    assert!(
        without.contains("UNAUTHENTICATED") && without.contains("a client certificate is required"),
        "{without}"
    );

    // Both queries audited alike, and the refusal too.
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let accepted: Vec<_> = entries
        .iter()
        .filter(|e| e.action().word() == "query" && e.decision().word() == "accepted")
        .collect();
    assert_eq!(accepted.len(), 2, "{entries:?}");
    assert_eq!(accepted[0].sql_hash, accepted[1].sql_hash);
    assert_eq!(accepted[0].rows, accepted[1].rows);
    assert!(entries.iter().any(|e| e.action().word() == "query"
        && e.decision().word() == "rejected"
        && e.rule.as_deref() == Some("query.aggregates")));
}

/// Under differential privacy the statement spends the epsilon its header
/// names, its schema carries the noise, and everything but a SELECT is
/// refused with a text that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_charges_the_budget_and_refuses_what_is_not_a_query() {
    use arrow_flight::sql::client::FlightSqlServiceClient;
    use futures::TryStreamExt;

    let privacy = "epsilon_total = 10.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7\nmax_groups_per_person = 1";
    let (server, _folders) = server_with_data(Some(privacy)).await;
    let mut acme = server.client("acme").await;

    let mut flight = FlightSqlServiceClient::new(acme.channel());
    flight.set_header("x-cleanroom-agreement", "retail-media-demo");
    flight.set_header("x-cleanroom-epsilon", "0.25");
    let info = flight.execute(SQL.to_string(), None).await.unwrap();
    let described = info.clone().try_decode_schema().unwrap();
    let noise: serde_json::Value =
        serde_json::from_str(&described.metadata()["cleanroom.privacy"]).unwrap();
    assert_eq!(noise["epsilon"], serde_json::json!(0.25));
    // Described, not run: nothing is charged yet.
    assert_eq!(acme.budget("retail-media-demo").await.unwrap().queries, 0);
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let stream = flight.do_get(ticket).await.unwrap();
    let batches: Vec<_> = stream.try_collect().await.unwrap();
    assert!(batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
    assert_eq!(batches[0].schema().fields(), described.fields());
    let budget = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!((budget.queries, budget.epsilon_spent), (1, 0.25));

    // A bad epsilon, and statements that are not queries.
    flight.set_header("x-cleanroom-epsilon", "lots");
    let e = flight.execute(SQL.to_string(), None).await.unwrap_err();
    assert!(e.to_string().contains("x-cleanroom-epsilon"), "{e}");
    flight.set_header("x-cleanroom-epsilon", "0.25");
    let e = flight
        .execute_update("DELETE FROM customers".to_string(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("rule query.statement"), "{e}");
    let e = flight.prepare(SQL.to_string(), None).await.unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    let e = flight.begin_transaction().await.unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");

    // Metadata filter patterns: 255 `%`s before a character no name holds
    // answer at once (an exponential matcher never finished); a longer
    // pattern is refused by field, without echoing it.
    let tables = |pattern: String| {
        let mut flight = flight.clone();
        async move {
            let info = flight
                .get_tables(arrow_flight::sql::CommandGetTables {
                    table_name_filter_pattern: Some(pattern),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
            let stream = flight.do_get(ticket).await.map_err(|e| e.to_string())?;
            let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
            Ok::<usize, String>(batches.iter().map(|b| b.num_rows()).sum())
        }
    };
    assert_eq!(tables(format!("{}#", "%".repeat(255))).await.unwrap(), 0);
    assert_eq!(tables("%".repeat(256)).await.unwrap(), 2);
    let e = tables("x".repeat(300)).await.unwrap_err();
    assert!(e.contains("table_name_filter_pattern"), "{e}");
    assert!(!e.contains("xxxx"), "{e}");
    // The schema filter too.
    let info = flight
        .get_db_schemas(arrow_flight::sql::CommandGetDbSchemas {
            db_schema_filter_pattern: Some("y".repeat(300)),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = flight
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("db_schema_filter_pattern"), "{e}");
    assert!(!e.contains("yyyy"), "{e}");

    // An organisation party to nothing sees no catalog.
    let initech = server.client("initech").await;
    let mut outsider = FlightSqlServiceClient::new(initech.channel());
    let info = outsider.get_catalogs().await.unwrap();
    let batches: Vec<_> = outsider
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    let e = outsider.execute(SQL.to_string(), None).await.unwrap_err();
    assert!(e.to_string().contains("x-cleanroom-agreement"), "{e}");
}
