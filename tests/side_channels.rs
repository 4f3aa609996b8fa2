//! The side channels an untrusted partner tries, each with nothing but the
//! `query` right and its own uploads. The invariant: the released table is
//! the only thing that depends on other parties' rows. Every test runs the
//! same probe on two sets of data that differ only in rows that must stay
//! hidden, and expects the same observable result.

mod common;

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array};
use arrow::datatypes::{Float64Type, Schema};
use arrow::record_batch::RecordBatch;
use cleanroom::query::{QueryError, QueryOutcome, TableData};
use cleanroom::storage::Store;
use common::people::{Row, audience, customers, demo_policy, tables};
use common::{Setup, TestServer, batch_msg, commit, header, observed, raw_upload, upload_people};
use tonic::Code;

/// A governed query asked by acme, the demo's querying party.
async fn run(
    policy: &cleanroom::policy::Policy,
    tables: &[TableData],
    sql: &str,
) -> Result<QueryOutcome, QueryError> {
    common::workers::run(policy, "acme", tables, sql).await
}

/// 60 matched people in the north, plus `extra` rows on both sides.
fn data_with(extra: &[Row]) -> (Vec<Row>, Vec<Row>) {
    let mut rows: Vec<Row> = (0..60).map(Row::new).collect();
    rows.extend(extra.iter().cloned());
    (rows.clone(), rows)
}

#[tokio::test]
async fn error_probes_answer_alike_whatever_one_persons_values() {
    let policy = demo_policy(None, 50);
    // Person 1000 is alone in the south; their value is what a probe wants.
    let target = |ltv: f64| Row {
        region: Some("south"),
        ltv: Some(ltv),
        ..Row::new(1000)
    };
    let probes = [
        // A narrowing cast that fails on values above 127.
        "SELECT COUNT(*), SUM(CAST(c.lifetime_value AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 'south'",
        "SELECT COUNT(*), SUM(TRY_CAST(c.lifetime_value AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email",
        "SELECT COUNT(*), SUM(CAST(c.lifetime_value AS INT)) FROM customers c JOIN audience a ON c.email = a.email",
        // Implicit casts of text to numbers.
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 7",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region IN (1, 2)",
        // Casts of fingerprints to text.
        "SELECT COUNT(*) FROM customers c JOIN audience a ON CAST(c.email AS VARCHAR) = CAST(a.email AS VARCHAR)",
        // Arithmetic that can fail, beneath the aggregate.
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 'south' AND 1 / 0 = 1",
    ];
    for probe in probes {
        let (c, a) = data_with(&[target(100.0)]);
        let low = run(&policy, &tables(&policy, &c, &a), probe).await;
        let (c, a) = data_with(&[target(4000.0)]);
        let high = run(&policy, &tables(&policy, &c, &a), probe).await;
        assert_eq!(observed(&low), observed(&high), "{probe}");
        assert!(
            matches!(low, Err(QueryError::Refused(_))),
            "{probe}: refused before running, got {}",
            observed(&low)
        );
    }
}

/// A derived dimension can single one person out (a value range, one day,
/// the one unmatched customer); the group they form is under the minimum,
/// so the answer is the same as if they had not been uploaded at all.
#[tokio::test]
async fn derived_dimensions_isolating_one_person_release_nothing_of_them() {
    use common::people::MARCH_2026;
    let policy = demo_policy(None, 50);
    let target = Row {
        ltv: Some(4999.0),
        lead_score: Some(100),
        last_purchase: Some(MARCH_2026 - 30),
        ..Row::new(1000)
    };
    let probes = [
        "SELECT CASE WHEN c.lifetime_value > 4990 THEN 'top' ELSE 'rest' END AS b, COUNT(*), AVG(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email GROUP BY b",
        "SELECT floor(c.lead_score / 10) AS band, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY band",
        "SELECT COUNT(*), SUM(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email WHERE c.last_purchase = DATE '2026-01-30'",
        "SELECT date_trunc('day', c.last_purchase) AS d, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY d",
        "SELECT c.region, AVG(CASE WHEN c.lifetime_value > 4990 THEN 1 ELSE 0 END) FROM customers c JOIN audience a ON c.email = a.email WHERE c.last_purchase BETWEEN DATE '2026-01-30' AND DATE '2026-01-30' GROUP BY c.region",
    ];
    for probe in probes {
        let (c, a) = data_with(std::slice::from_ref(&target));
        let present = run(&policy, &tables(&policy, &c, &a), probe).await;
        let (c, a) = data_with(&[]);
        let absent = run(&policy, &tables(&policy, &c, &a), probe).await;
        assert!(present.is_ok(), "{probe}: {}", observed(&present));
        assert_eq!(observed(&present), observed(&absent), "{probe}");
    }
    // The one customer the partner does not know, kept by a LEFT JOIN.
    let probe = "SELECT COALESCE(a.interest_segment, 'unmatched') AS s, COUNT(*), AVG(c.lifetime_value) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY s";
    let (mut c, a) = data_with(&[]);
    let absent = run(&policy, &tables(&policy, &c, &a), probe).await;
    c.push(target.clone());
    let present = run(&policy, &tables(&policy, &c, &a), probe).await;
    assert_eq!(observed(&present), observed(&absent), "{probe}");
    assert!(!observed(&present).contains("unmatched"));
}

#[tokio::test]
async fn having_never_sees_a_suppressed_group() {
    let policy = demo_policy(None, 50);
    // A group of 3 people (suppressed) or 4, in the food segment.
    let food = |n: u64| -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                segment: Some("food"),
                ltv: Some(4000.0),
                ..Row::new(2000 + i)
            })
            .collect()
    };
    let probes = [
        // Fails exactly when some group has 3 rows.
        "SELECT a.interest_segment, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment HAVING 1 / (COUNT(*) - 3) >= 0",
        // Fails exactly when some group's total is 12000 (3 x 4000).
        "SELECT a.interest_segment, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment HAVING CAST(1 / (SUM(c.lifetime_value) - 12000) AS BIGINT) >= 0",
        "SELECT a.interest_segment, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment HAVING 10 % (COUNT(*) - 3) >= 0 ORDER BY n LIMIT 1",
    ];
    for probe in probes {
        let (c, a) = data_with(&food(3));
        let three = run(&policy, &tables(&policy, &c, &a), probe).await;
        let (c, a) = data_with(&food(4));
        let four = run(&policy, &tables(&policy, &c, &a), probe).await;
        assert_eq!(observed(&three), observed(&four), "{probe}");
        let rows = three.unwrap().rows();
        assert_eq!(rows, 1, "{probe}: only the sports group is released");
    }
    // The same expression over a released group does fail: the error
    // depends on released values only.
    let (c, a) = data_with(&[]);
    let err = run(
        &policy,
        &tables(&policy, &c, &a),
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email HAVING 1 / (COUNT(*) - 60) > 0",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, QueryError::Output), "{err}");
    assert!(err.to_string().starts_with("rule query.output:"), "{err}");
}

/// Everything acme sees of one query: the rows, the summary, and its own
/// audit entry without time, chain or ids.
async fn acme_sees(server: &TestServer, sql: &str) -> String {
    let mut acme = server.client("acme").await;
    let answer = acme.query("retail-media-demo", sql).await.unwrap();
    let rows = cleanroom::cli::render_answer(&answer, cleanroom::cli::OutputFormat::Csv).unwrap();
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let e = entries
        .iter()
        .rev()
        .find(|e| e.action().word() == "query")
        .unwrap();
    assert_eq!(
        e.suppressed, None,
        "the audit entry holds no suppressed count"
    );
    format!(
        "{rows}\nsummary rows {}\naudit {} {:?} {:?} {:?} {:?}",
        answer.summary.rows, e.decision, e.rule, e.rows, e.subject, e.suppressed
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_person_upload_learns_nothing_from_what_was_held_back() {
    let dir = common::demo_policies(None);
    let sql = "SELECT a.interest_segment, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment";
    let mut seen = Vec::new();
    // globex uploads padding plus one person in the food segment, or not.
    for with_target in [false, true] {
        let server = TestServer::start_with(Setup {
            policies: dir.path().to_path_buf(),
            ..Setup::default()
        })
        .await;
        let policy = demo_policy(None, 50);
        let mut acme_rows: Vec<Row> = (0..60).map(Row::new).collect();
        acme_rows.push(Row::new(5000));
        let mut globex_rows: Vec<Row> = (0..60).map(Row::new).collect();
        if with_target {
            globex_rows.push(Row {
                segment: Some("food"),
                ..Row::new(5000)
            });
        }
        upload_people(&server, "acme", &customers(&policy, &acme_rows), "c1").await;
        upload_people(&server, "globex", &audience(&policy, &globex_rows), "a1").await;
        seen.push(acme_sees(&server, sql).await);
        server.stop().await.unwrap();
    }
    assert_eq!(seen[0], seen[1]);
    assert!(
        seen[0].starts_with("interest_segment,n\nsports,60\n"),
        "{}",
        seen[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_probes_are_charged_and_epsilon_is_charged_rounded_up() {
    // A floor of one millionth, so that the rounding can be seen.
    let dir = common::demo_policies(Some(
        "epsilon_total = 10.0\nepsilon_per_query_max = 1.0\nepsilon_per_query_min = 0.000001\ndelta = 1e-7",
    ));
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let (data, _) = common::synth(2_000, 0.5);
    common::upload_demo(&server, "acme", data.path()).await;
    common::upload_demo(&server, "globex", data.path()).await;
    let mut acme = server.client("acme").await;

    // Probes that fail after the data was read each cost their epsilon.
    let probe = "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email \
                 HAVING 1 / (COUNT(*) - COUNT(*)) > 0";
    let n = 4;
    for _ in 0..n {
        let err = acme
            .query_with_epsilon("retail-media-demo", probe, Some(0.5))
            .await
            .unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let b = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!(b.queries, n);
    // Each charged probe spent the agreement's delta too.
    assert!(
        (b.delta_spent - 1e-7 * n as f64).abs() < 1e-15,
        "{}",
        b.delta_spent
    );
    assert!(
        (b.epsilon_spent - 0.5 * n as f64).abs() < 1e-9,
        "{}",
        b.epsilon_spent
    );

    // Refusals before any data is read cost nothing.
    for refused in [
        "SELECT SUM(CAST(c.lifetime_value AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email",
        "SELECT c.region, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.phone IS NULL GROUP BY c.region",
    ] {
        let err = acme
            .query_with_epsilon("retail-media-demo", refused, Some(0.1))
            .await
            .unwrap_err();
        assert_eq!(err.status().unwrap().code(), Code::PermissionDenied);
    }
    let after = acme.budget("retail-media-demo").await.unwrap();
    assert_eq!(after.epsilon_spent, b.epsilon_spent);

    // 1.4 millionths asked for is 2 charged, and the noise is drawn for 2.
    let sql = "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email";
    let answer = acme
        .query_with_epsilon("retail-media-demo", sql, Some(1.4e-6))
        .await
        .unwrap();
    assert_eq!(answer.header.privacy.unwrap().epsilon, 2e-6);
    let after = acme.budget("retail-media-demo").await.unwrap();
    assert!(
        (after.epsilon_spent - b.epsilon_spent - 2e-6).abs() < 1e-12,
        "{} then {}",
        b.epsilon_spent,
        after.epsilon_spent
    );
    // The audit log records what the ledger holds.
    let entries = acme.audit_entries("retail-media-demo").await.unwrap();
    let audited: f64 = entries.iter().filter_map(|e| e.epsilon).sum();
    assert!((audited - after.epsilon_spent).abs() < 1e-9);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_data_is_what_was_validated() {
    let dir = common::demo_policies(None);
    let mut server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let policy = demo_policy(None, 50);
    let hash = common::policy_hash(&server).await;
    let acme = server.client("acme").await;
    let secret_text = "jane.doe@example.com";

    // Schema and field metadata carrying an identifier, and a value hidden
    // under a null slot of the metric column.
    let clean = customers(&policy, &(0..3).map(Row::new).collect::<Vec<_>>());
    let mut fields: Vec<arrow::datatypes::Field> = clean
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[3] = fields[3].clone().with_metadata(
        [("note".to_string(), secret_text.to_string())]
            .into_iter()
            .collect(),
    );
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        [("who".to_string(), secret_text.to_string())]
            .into_iter()
            .collect(),
    ));
    let hidden = Float64Array::new(
        vec![100.0, 4242.4242, 100.0].into(),
        Some(vec![true, false, true].into()),
    );
    let mut columns = clean.columns().to_vec();
    columns[4] = Arc::new(hidden);
    let smuggling = RecordBatch::try_new(schema, columns).unwrap();
    raw_upload(
        &acme,
        vec![
            header(&hash, "customers", "smuggle"),
            batch_msg(&smuggling),
            commit(3, 1),
        ],
    )
    .await
    .unwrap();

    // A stream with a foreign schema and no batches is refused, and so is
    // an upload without rows.
    let foreign = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
        "anything",
        arrow::datatypes::DataType::Utf8,
        true,
    )]));
    let mut bytes = Vec::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &foreign).unwrap();
        w.finish().unwrap();
    }
    let err = raw_upload(
        &acme,
        vec![
            header(&hash, "customers", "empty-stream"),
            cleanroom::proto::UploadRequest {
                part: Some(cleanroom::proto::upload_request::Part::Batch(bytes)),
            },
            commit(0, 1),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("rule upload.batch"),
        "{}",
        err.message()
    );
    let err = raw_upload(
        &acme,
        vec![header(&hash, "customers", "no-rows"), commit(0, 0)],
    )
    .await
    .unwrap_err();
    assert!(
        err.message().contains("rule upload.empty"),
        "{}",
        err.message()
    );

    let kept = std::mem::replace(&mut server.data_dir, tempfile::tempdir().unwrap());
    server.stop().await.unwrap();
    let store = Store::open(&kept.path().join("data"), None).unwrap();
    let current = store
        .current("retail-media-demo", "customers")
        .unwrap()
        .unwrap();
    assert_eq!(current.rows, 3);
    let batches = store.read(&current).unwrap();
    for b in &batches {
        assert!(b.schema().metadata().is_empty());
        assert!(b.schema().fields().iter().all(|f| f.metadata().is_empty()));
        let ltv = b.column(4).as_primitive::<Float64Type>();
        assert!(ltv.is_null(1));
        assert_eq!(ltv.values()[1], 0.0, "nothing is kept under a null slot");
        let ipc = cleanroom::upload::encode_batch(b).unwrap();
        assert!(
            !ipc.windows(secret_text.len())
                .any(|w| w == secret_text.as_bytes())
        );
        assert!(!ipc.windows(8).any(|w| w == 4242.4242f64.to_le_bytes()));
    }
}
