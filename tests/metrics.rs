//! The Prometheus endpoint: scraped over plain HTTP on its own address, its
//! series move as calls are made, and no label carries SQL, a value or a
//! caller's text.

mod common;

use std::io::{Read, Write};

use common::{Setup, TestServer, demo_policies, synth, upload_demo};

/// GET /metrics, the body. The endpoint may take a moment to come up with
/// the server.
fn scrape(addr: std::net::SocketAddr) -> String {
    let mut tries = 0;
    let mut stream = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("no metrics endpoint at {addr}: {e}"),
        }
    };
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap()
}

/// The value of the series `name` (with its labels, as exposed), or 0.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// An address on loopback that nothing listens on yet.
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The values of `names` in one scrape of the endpoint at `port`.
async fn read_series<const N: usize>(
    port: std::net::SocketAddr,
    names: [&'static str; N],
) -> [f64; N] {
    let text = tokio::task::spawn_blocking(move || scrape(port))
        .await
        .unwrap();
    names.map(|n| value(&text, n))
}

/// A server on the demo agreement without privacy, with metrics on a fresh
/// port, and that port.
async fn metrics_server(
    policies: &tempfile::TempDir,
    limits: cleanroom::query::QueryLimits,
) -> (TestServer, std::net::SocketAddr) {
    let port = free_port();
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        metrics_listen: Some(port),
        query_limits: limits,
        ..Setup::default()
    })
    .await;
    (server, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_calls_are_made() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let privacy = "epsilon_total = 10.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7\nmax_groups_per_person = 1";
    let policies = demo_policies(Some(privacy));
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        metrics_listen: Some(port),
        ..Setup::default()
    })
    .await;
    let before = tokio::task::spawn_blocking(move || scrape(port))
        .await
        .unwrap();
    assert_eq!(value(&before, "cleanroom_upload_rows_total"), 0.0);
    assert_eq!(value(&before, "cleanroom_queries_in_flight"), 0.0);

    let (data, truth) = synth(2_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    let mut acme = server.client("acme").await;
    let sql = "SELECT c.region, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";
    acme.query_with_epsilon("retail-media-demo", sql, Some(0.5))
        .await
        .unwrap();
    let secret_looking = "SELECT c.email FROM customers c WHERE c.region = 'jane@example.com'";
    acme.query("retail-media-demo", secret_looking)
        .await
        .unwrap_err();
    acme.query("no-such-agreement", sql).await.unwrap_err();

    let after = tokio::task::spawn_blocking(move || scrape(port))
        .await
        .unwrap();
    let uploaded = truth.acme_rows + truth.globex_rows
        - truth.acme_rows_without_valid_identifier
        - truth.globex_rows_without_valid_identifier;
    assert_eq!(
        value(&after, "cleanroom_upload_rows_total"),
        uploaded as f64
    );
    assert!(value(&after, "cleanroom_upload_bytes_total") > 0.0);
    assert_eq!(
        value(
            &after,
            r#"cleanroom_rpc_calls_total{service="cleanroom.v1.QueriesService",method="Query",code="OK"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_rpc_calls_total{service="cleanroom.v1.QueriesService",method="Query",code="PERMISSION_DENIED"}"#
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_rpc_calls_total{service="cleanroom.v1.QueriesService",method="Query",code="NOT_FOUND"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_rpc_calls_total{service="cleanroom.v1.DatasetsService",method="Upload",code="OK"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_operation_duration_seconds_count{operation="query"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_operation_duration_seconds_count{operation="upload"}"#
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_epsilon_spent_total{agreement="retail-media-demo"}"#
        ),
        0.5
    );
    assert_eq!(
        value(
            &after,
            r#"cleanroom_queries_refused_total{rule="query.aggregate"}"#
        ),
        1.0,
        "{after}"
    );
    assert_eq!(value(&after, "cleanroom_queries_in_flight"), 0.0);
    assert!(value(&after, "cleanroom_store_bytes") > 0.0);
    assert_eq!(value(&after, "cleanroom_policy_reload_failures"), 0.0);
    for leak in ["jane", "SELECT", "email", "no-such-agreement"] {
        assert!(!after.contains(leak), "{leak} in the metrics:\n{after}");
    }
}

/// Decrypted tables leave memory as soon as what they hold is stale: after
/// an erasure (the withdrawn people's rows must not stay in memory), after
/// a new version, and after a policy reload. The server loads an
/// agreement's tables in the background after a commit, so right after one
/// either nothing is cached or a new load has happened; a stale entry
/// would show as one agreement cached with no new load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasures_and_new_versions_drop_tables_from_memory_at_once() {
    let policies = demo_policies(None);
    let (server, port) = metrics_server(&policies, Default::default()).await;
    // [agreements cached, rows cached, loads so far]
    let cache = || {
        read_series(
            port,
            [
                "cleanroom_cached_agreements",
                "cleanroom_cached_rows",
                "cleanroom_table_loads_total",
            ],
        )
    };
    let (data, _) = synth(2_000, 0.5);
    let a = upload_demo(&server, "acme", data.path()).await;
    let g = upload_demo(&server, "globex", data.path()).await;
    let total = (a.response.rows + g.response.rows) as f64;
    assert!(
        common::eventually(|| async { cache().await[1] == total }).await,
        "the commit that completes the agreement loads its tables: {:?}",
        cache().await
    );
    let mut acme = server.client("acme").await;
    let sql = "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email";
    let loads = cache().await[2];
    acme.query("retail-media-demo", sql).await.unwrap();
    assert_eq!(cache().await[2], loads, "the query found the tables loaded");

    // Ten customers withdraw.
    let erased = common::erase_first_customers(
        &acme,
        &common::secret(),
        "retail-media-demo",
        data.path(),
        10,
    )
    .await;
    assert!(erased.rows_removed >= 10);
    let [cached, rows, now] = cache().await;
    assert!(
        cached == 0.0 || (now > loads && rows == total - erased.rows_removed as f64),
        "the erased rows stayed in memory: {cached} agreement(s), {rows} rows, {now} loads"
    );
    let after_erasure = total - erased.rows_removed as f64;
    assert!(common::eventually(|| async { cache().await[1] == after_erasure }).await);

    // A new version of globex's dataset.
    let loads = cache().await[2];
    upload_demo(&server, "globex", data.path()).await;
    let [cached, _, now] = cache().await;
    assert!(
        cached == 0.0 || now > loads,
        "a new version left stale tables: {cached} agreement(s), {now} loads"
    );
    assert!(common::eventually(|| async { cache().await[2] > loads }).await);

    // A policy reload.
    acme.query("retail-media-demo", sql).await.unwrap();
    assert_eq!(cache().await[0], 1.0);
    let file = policies.path().join("retail-media-demo.toml");
    let edited = std::fs::read_to_string(&file)
        .unwrap()
        .replace("min_group_size = 50", "min_group_size = 60");
    std::fs::write(&file, edited).unwrap();
    assert!(
        common::eventually(|| async { cache().await[0] == 0.0 }).await,
        "a policy reload left tables of the old policy"
    );
}

/// An overlap is matched once per pair of versions and policy: in the
/// background after the commit that completes the pair, or at the first
/// overlap. Later overlaps, and overlaps after a restart, reuse the sealed
/// count; a new version, an erasure or a policy change match again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlaps_are_matched_once_per_pair_of_versions() {
    let policies = demo_policies(None);
    let (server, mut port) = metrics_server(&policies, Default::default()).await;
    let matchings = |port| async move {
        let [n] = read_series(port, ["cleanroom_overlap_matchings_total"]).await;
        n
    };
    let (data, truth) = synth(2_000, 0.3);
    upload_demo(&server, "acme", data.path()).await;
    assert_eq!(
        matchings(port).await,
        0.0,
        "one dataset alone is not matched"
    );
    upload_demo(&server, "globex", data.path()).await;
    assert!(
        common::eventually(|| async { matchings(port).await == 1.0 }).await,
        "the commit that completes the pair is matched in the background"
    );
    let mut acme = server.client("acme").await;
    for _ in 0..3 {
        let r = acme.overlap("retail-media-demo", &[]).await.unwrap();
        assert_eq!(r.overlap, Some(truth.overlap));
    }
    assert_eq!(
        matchings(port).await,
        1.0,
        "overlaps reuse the recorded count"
    );

    // After a restart the count is read back, not matched again.
    port = free_port();
    let server = server
        .restart(Setup {
            policies: policies.path().to_path_buf(),
            metrics_listen: Some(port),
            ..Setup::default()
        })
        .await;
    let mut acme = server.client("acme").await;
    let r = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert_eq!(r.overlap, Some(truth.overlap));
    assert_eq!(matchings(port).await, 0.0, "a restart matched again");

    // An erasure makes a new version: matched again, and the count moves.
    common::erase_first_customers(
        &acme,
        &common::secret(),
        "retail-media-demo",
        data.path(),
        200,
    )
    .await;
    let after_erasure = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert!(after_erasure.overlap.unwrap() < truth.overlap);
    assert_eq!(matchings(port).await, 1.0);

    // A policy change (the same identifiers) is matched again under it.
    let mut acme2 = acme.clone();
    raise_the_minimum(&policies, &acme2).await;
    let r = acme2.overlap("retail-media-demo", &[]).await.unwrap();
    assert_eq!(r.overlap, after_erasure.overlap);
    assert_eq!(matchings(port).await, 2.0);
    server.stop().await.unwrap();
}

/// Edits the demo agreement's minimum group size from 50 to 60 and waits
/// until the server answers under the edited policy.
async fn raise_the_minimum(policies: &tempfile::TempDir, client: &cleanroom::client::Client) {
    let file = policies.path().join("retail-media-demo.toml");
    let edited = std::fs::read_to_string(&file)
        .unwrap()
        .replace("min_group_size = 50", "min_group_size = 60");
    std::fs::write(&file, edited).unwrap();
    let reloaded = common::eventually(|| {
        let mut c = client.clone();
        async move {
            c.overlap("retail-media-demo", &[])
                .await
                .unwrap()
                .min_group_size
                == 60
        }
    })
    .await;
    assert!(reloaded, "the edited policy was not applied");
}

/// The tables kept between queries stay within their memory budget: with a
/// budget smaller than one agreement's tables nothing is kept, and every
/// query loads them afresh and still answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_cache_keeps_within_its_budget() {
    let policies = demo_policies(None);
    let limits = cleanroom::query::QueryLimits {
        table_cache_bytes: 64 << 10,
        ..Default::default()
    };
    let (server, port) = metrics_server(&policies, limits).await;
    let scrape_now = || async {
        let [cached, loads, reads] = read_series(
            port,
            [
                "cleanroom_cached_agreements",
                "cleanroom_table_loads_total",
                "cleanroom_matched_table_reads_total",
            ],
        )
        .await;
        [cached, loads + reads]
    };
    let (data, _) = synth(3_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    let mut acme = server.client("acme").await;
    let sql = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region";
    let first = acme.query("retail-media-demo", sql).await.unwrap();
    // The background matcher's last step, once no query runs: storing the
    // tables. After it, nothing but the queries below loads them.
    let stored = common::eventually(|| async {
        read_series(port, ["cleanroom_matched_table_saves_total"]).await == [1.0]
    })
    .await;
    assert!(stored, "the matched tables were not stored");
    let loads = scrape_now().await[1];
    for _ in 0..3 {
        let again = acme.query("retail-media-demo", sql).await.unwrap();
        assert_eq!(
            arrow::util::pretty::pretty_format_batches(&again.batches)
                .unwrap()
                .to_string(),
            arrow::util::pretty::pretty_format_batches(&first.batches)
                .unwrap()
                .to_string()
        );
    }
    let [cached, now] = scrape_now().await;
    assert_eq!(cached, 0.0, "tables over the budget were kept");
    assert_eq!(
        now,
        loads + 3.0,
        "each query loaded the tables again (matched, or read from the store)"
    );
    server.stop().await.unwrap();
}

/// The matched tables' files under the data directory.
fn matched_files(server: &TestServer) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![server.data_dir.path().join("data").join("datasets")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".matched.cds") {
                out.insert(p);
            }
        }
    }
    out
}

/// The versions of a queried two-dataset agreement are matched once after
/// the commit that completes them: that one matching gives the overlap and
/// the query tables, which are stored and read back after a restart
/// instead of matching again. An erasure removes the stored tables with
/// the version they hold rows of; a policy change, a damaged file or a
/// file that went missing match again, with the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matched_tables_are_stored_once_and_read_back_after_a_restart() {
    let policies = demo_policies(None);
    let (server, mut port) = metrics_server(&policies, Default::default()).await;
    let series = |port| {
        read_series(
            port,
            [
                "cleanroom_table_loads_total",
                "cleanroom_overlap_matchings_total",
                "cleanroom_matched_table_saves_total",
                "cleanroom_matched_table_reads_total",
            ],
        )
    };
    let (data, truth) = synth(3_000, 0.4);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    assert!(
        common::eventually(|| async { series(port).await == [1.0, 1.0, 1.0, 0.0] }).await,
        "one matching for the overlap and the tables, stored once: {:?}",
        series(port).await
    );
    let stored = matched_files(&server);
    assert_eq!(stored.len(), 2, "one file per dataset: {stored:?}");
    let sql = "SELECT c.region, COUNT(*) AS n, SUM(a.ad_exposures) AS exposures, SUM(c.lifetime_value) AS ltv FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region";
    let text = |r: &cleanroom::client::QueryAnswer| {
        arrow::util::pretty::pretty_format_batches(&r.batches)
            .unwrap()
            .to_string()
    };
    let mut acme = server.client("acme").await;
    let before = text(&acme.query("retail-media-demo", sql).await.unwrap());
    let overlap = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert_eq!(overlap.overlap, Some(truth.overlap));
    assert_eq!(series(port).await, [1.0, 1.0, 1.0, 0.0]);

    let restart = |server: TestServer, port| {
        let policies = policies.path().to_path_buf();
        async move {
            server
                .restart(Setup {
                    policies,
                    metrics_listen: Some(port),
                    ..Setup::default()
                })
                .await
        }
    };
    // A restart reads the tables back: the same answers, nothing matched.
    port = free_port();
    let server = restart(server, port).await;
    let mut acme = server.client("acme").await;
    assert_eq!(
        text(&acme.query("retail-media-demo", sql).await.unwrap()),
        before
    );
    let again = acme.overlap("retail-media-demo", &[]).await.unwrap();
    assert_eq!(again.overlap, overlap.overlap);
    assert_eq!(series(port).await, [0.0, 0.0, 0.0, 1.0]);

    // A damaged file is matched again, with the same answer, and stored
    // afresh.
    let victim = stored.iter().next().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    port = free_port();
    let server = restart(server, port).await;
    let mut acme = server.client("acme").await;
    assert_eq!(
        text(&acme.query("retail-media-demo", sql).await.unwrap()),
        before
    );
    assert!(
        common::eventually(|| async { series(port).await == [1.0, 0.0, 1.0, 0.0] }).await,
        "{:?}",
        series(port).await
    );
    let stored = matched_files(&server);
    assert!(!stored.contains(&victim), "the damaged file is replaced");

    // An erasure makes a new version and deletes the old one: the tables
    // holding its rows leave the disk with it.
    common::erase_first_customers(
        &acme,
        &common::secret(),
        "retail-media-demo",
        data.path(),
        300,
    )
    .await;
    assert!(
        matched_files(&server).is_disjoint(&stored),
        "tables with erased rows are still on disk"
    );
    let erased = text(&acme.query("retail-media-demo", sql).await.unwrap());
    assert_ne!(erased, before);
    assert!(
        common::eventually(|| async { series(port).await[2] == 2.0 }).await,
        "the new versions' tables are stored"
    );
    // Read back after a restart, they answer as the matching did.
    port = free_port();
    let server = restart(server, port).await;
    let mut acme = server.client("acme").await;
    assert_eq!(
        text(&acme.query("retail-media-demo", sql).await.unwrap()),
        erased
    );
    assert_eq!(series(port).await, [0.0, 0.0, 0.0, 1.0]);

    // A policy change matches again under the new policy.
    raise_the_minimum(&policies, &acme).await;
    acme.query("retail-media-demo", sql).await.unwrap();
    assert!(
        common::eventually(|| async { series(port).await[..3] == [1.0, 1.0, 1.0] }).await,
        "{:?}",
        series(port).await
    );
    assert_eq!(
        matched_files(&server).len(),
        2,
        "the old tables are replaced"
    );
    server.stop().await.unwrap();
}
