//! The private stage on three `cleanroom worker` processes on 127.0.0.1,
//! under mutual TLS: the same answers as one machine, the release on the
//! server, placements dropped with the tables, workers closed to partners,
//! and a worker killed mid-query never giving a partial answer.
//! (`CLEANROOM_TEST_WORKERS=3` runs the other suites through workers too.)

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use cleanroom::cluster::wire::partition_service_client::PartitionServiceClient;
use cleanroom::cluster::wire::{DescribeWorkerRequest, DescribeWorkerResponse};
use cleanroom::cluster::{Channels, Cluster, WorkerTls};
use cleanroom::query::{QueryError, QueryOutcome};
use common::differential::{data, query};
use common::people::demo_policy;
use common::workers::{Workers, placed_run};
use common::{Pki, Setup, TestServer, demo_policies, synth, upload_demo};
use rand::SeedableRng;
use rand::rngs::StdRng;
use url::Url;

/// The tests here count reruns on the server, a figure of the whole
/// process: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One row: its columns other than floating point as sortable bytes, and
/// its floating-point values.
type Row = (Vec<u8>, Vec<Option<f64>>);

/// A batch list's rows, in order. Floating-point values are apart: a sum
/// of floats depends on the order of its additions, which differs with
/// the partitions (on one machine too, between its two partitions), so
/// they are compared to a few units in the last place, the rest exactly.
fn rows(batches: &[RecordBatch]) -> Vec<Row> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Float64Type};
    let Some(first) = batches.first() else {
        return Vec::new();
    };
    let schema = first.schema();
    let exact: Vec<usize> = (0..schema.fields().len())
        .filter(|i| schema.field(*i).data_type() != &DataType::Float64)
        .collect();
    let converter = RowConverter::new(
        exact
            .iter()
            .map(|i| SortField::new(schema.field(*i).data_type().clone()))
            .collect(),
    )
    .unwrap();
    let mut out = Vec::new();
    for b in batches {
        let columns: Vec<_> = exact.iter().map(|i| Arc::clone(b.column(*i))).collect();
        let keys = converter.convert_columns(&columns).unwrap();
        for r in 0..b.num_rows() {
            let floats = (0..schema.fields().len())
                .filter(|i| !exact.contains(i))
                .map(|i| {
                    let c = b.column(i).as_primitive::<Float64Type>();
                    (!c.is_null(r)).then(|| c.value(r))
                })
                .collect();
            let key = match exact.is_empty() {
                true => Vec::new(),
                false => keys.row(r).as_ref().to_vec(),
            };
            out.push((key, floats));
        }
    }
    out
}

/// Rows in a fixed order: by their exact parts, then their floats.
fn order(a: &Row, b: &Row) -> std::cmp::Ordering {
    let floats = |r: &Row| -> Vec<f64> { r.1.iter().map(|v| v.unwrap_or(f64::NAN)).collect() };
    a.0.cmp(&b.0).then_with(|| {
        floats(a)
            .iter()
            .zip(floats(b).iter())
            .map(|(x, y)| x.total_cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// Equal rows: the exact parts byte for byte, the floats within 1e-12.
fn equal_rows(x: &[Row], y: &[Row]) -> bool {
    x.len() == y.len()
        && x.iter().zip(y).all(|(a, b)| {
            a.0 == b.0
                && a.1.len() == b.1.len()
                && a.1.iter().zip(&b.1).all(|(p, q)| match (p, q) {
                    (Some(p), Some(q)) => (p - q).abs() <= 1e-12 * p.abs().max(q.abs()).max(1.0),
                    (None, None) => true,
                    _ => false,
                })
        })
}

/// The same outcome: the same rows in the same order (or, without an
/// ORDER BY, the same rows), or the same refusal or failure.
fn same(
    local: &Result<QueryOutcome, QueryError>,
    placed: &Result<QueryOutcome, QueryError>,
    ordered: bool,
) -> Result<(), String> {
    match (local, placed) {
        (Ok(a), Ok(b)) => {
            if a.schema != b.schema {
                return Err(format!("schemas differ: {:?} vs {:?}", a.schema, b.schema));
            }
            let (mut x, mut y) = (rows(&a.batches), rows(&b.batches));
            if !ordered {
                x.sort_by(order);
                y.sort_by(order);
            }
            match equal_rows(&x, &y) {
                true => Ok(()),
                false => Err(format!(
                    "{} rows vs {} rows, or other values",
                    x.len(),
                    y.len()
                )),
            }
        }
        (Err(a), Err(b)) if a.to_string() == b.to_string() => Ok(()),
        (a, b) => Err(format!(
            "one machine {:?}, workers {:?}",
            a.as_ref().map(|o| o.rows()).map_err(|e| e.to_string()),
            b.as_ref().map(|o| o.rows()).map_err(|e| e.to_string())
        )),
    }
}

/// What a worker says of itself, asked with the server's certificate.
async fn describe(certs: &std::path::Path, url: &Url) -> DescribeWorkerResponse {
    let channels = Channels::new(&WorkerTls::in_dir(certs, "server")).unwrap();
    PartitionServiceClient::new(channels.channel(url).unwrap())
        .describe_worker(DescribeWorkerRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn reads(workers: &Workers) -> Vec<u64> {
    let mut out = Vec::new();
    for u in &workers.urls {
        out.push(describe(&workers.certs, u).await.partitions_read);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_queries_answer_alike_on_three_workers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let workers = Workers::spawn(pki.path(), 3);
    let cluster = Cluster::start(workers.config()).await.unwrap();
    assert_eq!(cluster.figures().live_workers, 3);
    let policy = demo_policy(None, 10);
    let d = data(&policy, 20_261_207, 400);
    let mut rng = StdRng::seed_from_u64(20_261_208);
    let reruns = cleanroom::query::reruns_on_server();
    let minimums = cleanroom::query::minimums_on_server();
    let before = reads(&workers).await;
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..120 {
        let q = query(&mut rng);
        let sql = q.sql();
        let local = cleanroom::query::run(&policy, "acme", &d.tables, &sql).await;
        let placed = placed_run(&cluster, &policy, "acme", &d.tables, &sql).await;
        let ordered = sql.contains("ORDER BY");
        if let Err(e) = same(&local, &placed, ordered) {
            panic!("query {i}: {sql}\n{e}");
        }
        match local {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    let after = reads(&workers).await;
    let reran = cleanroom::query::reruns_on_server() - reruns;
    // Each accepted query's minimum ran here, over counts from the
    // workers (one local run of each query does not count: it is not
    // distributed).
    let on_server = cleanroom::query::minimums_on_server() - minimums;
    eprintln!("minimum filters applied on the server: {on_server}");
    assert!(on_server >= accepted, "{on_server} < {accepted}");
    eprintln!(
        "accepted {accepted}, refused or failed {refused}, partitions read per worker {:?}, stages rerun on the server {reran}",
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>()
    );
    assert!(accepted > 60, "{accepted}");
    for (a, b) in after.iter().zip(&before) {
        assert!(a > b, "a worker read no partition: {before:?} -> {after:?}");
    }
    // Every stage ran where its partitions are; none fell back.
    assert_eq!(reran, 0, "stages ran again on the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_stage_partials_are_exactly_those_of_one_machine() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let workers = Workers::spawn(pki.path(), 3);
    let cluster = Cluster::start(workers.config()).await.unwrap();
    let policy = demo_policy(
        Some(
            "epsilon_total = 1e9\nepsilon_per_query_max = 1.0\ndelta = 1e-5\nmax_groups_per_person = 2",
        ),
        10,
    );
    let d = data(&policy, 7_261_207, 400);
    let mut rng = StdRng::seed_from_u64(7_261_208);
    let placement = cluster
        .place("partials", &["partials".to_string()], &d.tables)
        .await
        .unwrap();
    let limits = cleanroom::query::QueryLimits::default();
    let mut compared = 0;
    for _ in 0..60 {
        let sql = query(&mut rng).sql();
        let mut outputs = Vec::new();
        for placed in [
            None,
            Some(placement.as_ref() as &dyn cleanroom::query::Placement),
        ] {
            let Ok((ctx, plan, checked)) = cleanroom::query::plan_and_check_with(
                &policy, "acme", &d.tables, &sql, &limits, placed,
            )
            .await
            else {
                continue;
            };
            let Ok(noise) = cleanroom::query::private::plan(&policy, &checked, 1.0) else {
                continue;
            };
            let unit = cleanroom::query::private::bounding_unit(&policy, "acme", &plan).unwrap();
            let one = cleanroom::query::one_row_per_person(&d.tables, &checked);
            let p = cleanroom::query::private::partials(&ctx, plan, &noise, &unit, one).await;
            outputs.push(p.map(|p| {
                let mut r = rows(&p.batches);
                r.sort_by(order);
                r
            }));
        }
        if let [a, b] = &outputs[..] {
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    if !equal_rows(a, b) {
                        let diff: Vec<_> =
                            a.iter().zip(b).filter(|(x, y)| x != y).take(3).collect();
                        panic!(
                            "{sql}\n{} vs {} rows; first differences {diff:?}",
                            a.len(),
                            b.len()
                        );
                    }
                    compared += a.len();
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{sql}"),
                _ => panic!("{sql}: one engine failed"),
            }
        }
    }
    eprintln!("partial rows compared: {compared}");
    assert!(compared > 1000, "{compared}");
}

/// Two servers with the same uploads, one on three workers.
async fn two_servers(workers: &Workers) -> (TestServer, TestServer, tempfile::TempDir) {
    let policies = demo_policies(None);
    let one = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        cluster: None,
        ..Setup::default()
    })
    .await;
    let placed = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        cluster: Some(workers.config()),
        ..Setup::default()
    })
    .await;
    let (dir, _) = synth(3_000, 0.4);
    for s in [&one, &placed] {
        upload_demo(s, "acme", dir.path()).await;
        upload_demo(s, "globex", dir.path()).await;
    }
    std::mem::forget(policies);
    (one, placed, dir)
}

const AGREEMENT: &str = "retail-media-demo";

/// A template with its parameters, or free SQL.
type Analysis = (
    Option<(&'static str, Vec<(&'static str, &'static str)>)>,
    &'static str,
);

/// The analyses compared on both servers: the demo's templates and free
/// SQL of every join kind the demo allows.
fn analyses() -> Vec<Analysis> {
    vec![
        (
            Some(("overlap_by_segment", vec![("regions", "north,east")])),
            "",
        ),
        (Some(("lift_by_region", vec![("min_exposures", "1")])), ""),
        (
            None,
            "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region",
        ),
        (
            None,
            "SELECT a.interest_segment, SUM(c.lifetime_value) AS v, AVG(c.purchases) AS p FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment ORDER BY a.interest_segment",
        ),
        (
            None,
            "SELECT c.region, COUNT(a.interest_segment) AS reached FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region",
        ),
        (None, "SELECT COUNT(*) AS n FROM customers c"),
        (
            None,
            "SELECT floor(c.lifetime_value / 1000) AS band, COUNT(*) AS n, SUM(a.ad_exposures) AS e FROM customers c JOIN audience a ON c.email = a.email AND c.phone = a.phone GROUP BY floor(c.lifetime_value / 1000) ORDER BY band",
        ),
        (None, "SELECT c.email FROM customers c"),
    ]
}

async fn ask(server: &TestServer, what: &Analysis) -> Result<Vec<RecordBatch>, String> {
    let mut acme = server.client("acme").await;
    let answer = match &what.0 {
        Some((name, params)) => {
            let params: BTreeMap<String, String> = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            acme.run_template(AGREEMENT, name, &params, None).await
        }
        None => acme.query(AGREEMENT, what.1).await,
    };
    answer.map(|a| a.batches).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_workers_answers_as_one_machine_and_drops_placements_with_the_tables() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let workers = Workers::spawn(pki.path(), 3);
    let (one, placed, dir) = two_servers(&workers).await;
    let reruns = cleanroom::query::reruns_on_server();
    let compare = async || {
        let mut answered = 0;
        for a in analyses() {
            let (x, y) = (ask(&one, &a).await, ask(&placed, &a).await);
            match (&x, &y) {
                (Ok(x), Ok(y)) => {
                    assert!(equal_rows(&rows(x), &rows(y)), "{a:?}");
                    eprintln!("{a:?}: {} rows alike", rows(x).len());
                    answered += 1;
                }
                (Err(x), Err(y)) => {
                    assert_eq!(x, y, "{a:?}");
                    eprintln!("{a:?}: refused alike: {x}");
                }
                _ => panic!("{a:?}: {x:?} vs {y:?}"),
            }
        }
        answered
    };
    assert!(compare().await >= 6);
    let held: Vec<_> = {
        let mut h = Vec::new();
        for u in &workers.urls {
            h.push(describe(&workers.certs, u).await.placements);
        }
        h
    };
    for h in &held {
        assert_eq!(h.len(), 1, "each worker holds the agreement's placement");
        assert_eq!(h[0].agreement, AGREEMENT);
        assert_eq!(h[0].partitions, 4, "two partitions of each of two tables");
    }
    let first = held[0][0].placement.clone();
    // An erasure on both servers: the workers drop the old placement, and
    // the answers stay equal.
    for s in [&one, &placed] {
        let client = s.client("acme").await;
        common::erase_first_customers(&client, &common::secret(), AGREEMENT, dir.path(), 200).await;
    }
    let dropped = common::eventually(|| async {
        for u in &workers.urls {
            let p = describe(&workers.certs, u).await.placements;
            if p.iter().any(|p| p.placement == first) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        dropped,
        "a worker still holds the placement made before the erasure"
    );
    assert!(compare().await >= 6);
    let second = describe(&workers.certs, &workers.urls[0]).await.placements;
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].placement, first);
    let second = second[0].placement.clone();
    // A new version: the same again.
    for s in [&one, &placed] {
        upload_demo(s, "globex", dir.path()).await;
    }
    assert!(compare().await >= 6);
    for u in &workers.urls {
        let p = describe(&workers.certs, u).await.placements;
        assert_eq!(
            p.len(),
            1,
            "only the placement of the current versions is held"
        );
        assert!(p[0].placement != first && p[0].placement != second);
    }
    assert_eq!(
        cleanroom::query::reruns_on_server(),
        reruns,
        "no stage fell back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_only_the_worker_role() {
    let pki = Pki::new();
    let workers = Workers::spawn(pki.path(), 1);
    let url = &workers.urls[0];
    // A partner's certificate from the same CA: refused by role.
    let partner = Channels::new(&WorkerTls {
        ca: pki.path().join("ca.pem"),
        cert: pki.path().join("acme.pem"),
        key: pki.path().join("acme-key.pem"),
    });
    assert!(
        partner.is_err(),
        "the client side refuses to present a partner certificate"
    );
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(pki.path().join("ca.pem")).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(pki.path().join("acme.pem")).unwrap(),
            std::fs::read(pki.path().join("acme-key.pem")).unwrap(),
        ));
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = PartitionServiceClient::new(channel)
        .describe_worker(DescribeWorkerRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("worker.role"),
        "{}",
        refused.message()
    );
    // No client certificate: no session at all.
    let bare = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(pki.path().join("ca.pem")).unwrap()),
    );
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(bare)
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = channel {
        assert!(
            PartitionServiceClient::new(channel)
                .describe_worker(DescribeWorkerRequest {})
                .await
                .is_err()
        );
    }
    // The worker's certificate on the server's partner-facing port: no
    // organisation, so nothing.
    let server = TestServer::start_with(Setup {
        cluster: None,
        ..Setup::default()
    })
    .await;
    let files = cleanroom::certs::issue_worker(server.pki.path(), "intruder", &[], false).unwrap();
    let config =
        cleanroom::client::ClientConfig::new(server.url(), server.pki.path().join("ca.pem"))
            .with_identity(files.cert, files.key);
    let mut client = cleanroom::client::Client::connect(&config).await.unwrap();
    let err = client
        .query(AGREEMENT, "SELECT COUNT(*) FROM customers c")
        .await;
    assert!(err.is_err());
    assert_eq!(
        cleanroom::certs::organisation_of(&pem_der(&server, "worker-intruder.pem")),
        None
    );
}

fn pem_der(server: &TestServer, file: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(server.pki.path().join(file)).unwrap();
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_query_gives_whole_answers_only() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let mut workers = Workers::spawn(pki.path(), 3);
    let cluster = Cluster::start(workers.config()).await.unwrap();
    let policy = demo_policy(None, 10);
    let d = data(&policy, 11_261_207, 400);
    let sql = "SELECT c.region, COUNT(*) AS n, SUM(c.lifetime_value) AS v FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";
    let want = cleanroom::query::run(&policy, "acme", &d.tables, sql).await;
    assert!(want.is_ok());
    let placement = cluster
        .place("kill", &["kill".to_string()], &d.tables)
        .await
        .unwrap();
    let reruns = cleanroom::query::reruns_on_server();
    let tables = Arc::new(d.tables.clone());
    let (policy2, tables2, placement2) =
        (policy.clone(), Arc::clone(&tables), Arc::clone(&placement));
    let asking = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for _ in 0..30 {
            outcomes.push(
                cleanroom::query::run_with(
                    &policy2,
                    "acme",
                    &tables2,
                    sql,
                    Some(placement2.as_ref()),
                )
                .await,
            );
        }
        outcomes
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    workers.kill(1);
    let outcomes = asking.await.unwrap();
    for o in &outcomes {
        if let Err(e) = same(&want, o, false) {
            panic!("a query while a worker died: {e}");
        }
    }
    let reran = cleanroom::query::reruns_on_server() - reruns;
    eprintln!("stages rerun on the server after the kill: {reran}");
    assert!(
        reran > 0,
        "the killed worker's stages ran again on the server"
    );
    // The health check drops it, and the next placement leaves it out.
    let dropped = common::eventually(|| async {
        cluster.check_health().await;
        cluster.figures().live_workers == 2
    })
    .await;
    assert!(dropped);
    let fresh = placed_run(&cluster, &policy, "acme", &d.tables, sql).await;
    let before = cleanroom::query::reruns_on_server();
    same(&want, &fresh, false).unwrap();
    let again = placed_run(&cluster, &policy, "acme", &d.tables, sql).await;
    same(&want, &again, false).unwrap();
    assert_eq!(
        cleanroom::query::reruns_on_server(),
        before,
        "two workers serve again"
    );
}
