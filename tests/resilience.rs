//! One hostile party against the service: inputs of any size and shape get
//! a clear refusal, and the server keeps answering everyone else.

mod common;

use std::time::Duration;

use cleanroom::query::QueryLimits;
use common::{Setup, TestServer, upload_demo};
use tonic::Code;

const BASE: &str =
    "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email";

/// Queries that once overflowed a worker's stack while parsed or planned.
fn deep_queries() -> Vec<String> {
    let chain = vec!["1"; 4_000].join(" + ");
    let nested = format!("{}1{}", "(".repeat(3_000), ")".repeat(3_000));
    let ands = vec!["c.region = 'north'"; 2_000].join(" AND ");
    let nots = format!("{}c.region = 'north'", "NOT ".repeat(3_000));
    vec![
        format!("{BASE} GROUP BY c.region HAVING COUNT(*) > {chain}"),
        format!("{BASE} GROUP BY c.region HAVING COUNT(*) > {nested}"),
        format!("{BASE} WHERE {ands} GROUP BY c.region"),
        format!("{BASE} WHERE {nots} GROUP BY c.region"),
        format!("EXPLAIN {BASE} WHERE {ands} GROUP BY c.region"),
        format!(
            "{BASE} WHERE c.region IN ({}) GROUP BY c.region",
            vec!["'x'"; 10_000].join(",")
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_query_is_refused_and_the_server_answers_the_next() {
    let server = TestServer::start().await;
    let (data, _) = common::synth(2_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    let mut acme = server.client("acme").await;
    for sql in deep_queries() {
        assert!(sql.len() < 64 * 1024, "{}", sql.len());
        let err = acme.query("retail-media-demo", &sql).await.unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with("rule sql.limits:"),
            "{}",
            status.message()
        );
        let answer = acme
            .query("retail-media-demo", &format!("{BASE} GROUP BY c.region"))
            .await
            .unwrap();
        assert_eq!(answer.summary.rows, 4);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_cannot_grow_an_agreements_audit_log() {
    use cleanroom::proto;
    let server = TestServer::start().await;
    let mut acme = server.client("acme").await;
    let before = acme.audit_entries("retail-media-demo").await.unwrap();
    let log = server
        .data_dir
        .path()
        .join("data")
        .join(cleanroom::audit::LOG_FILE);
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let bytes_before = size(&log);

    // initech is party to nothing; it names the agreement with huge fields.
    let initech = server.client("initech").await;
    let huge = "d".repeat(3 << 20);
    for _ in 0..2 {
        let err = common::raw_upload(
            &initech,
            vec![common::header("x", &huge, "id-1"), common::commit(0, 0)],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());
        let err = proto::datasets_service_client::DatasetsServiceClient::new(initech.channel())
            .erase(proto::EraseRequest {
                agreement_id: "retail-media-demo".into(),
                dataset: huge.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    // A huge agreement id is refused by length, without echoing it.
    let err = proto::datasets_service_client::DatasetsServiceClient::new(initech.channel())
        .erase(proto::EraseRequest {
            agreement_id: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 200, "{}", err.message().len());

    // A party's own huge dataset name is refused by length and not kept.
    let err = common::raw_upload(
        &server.client("acme").await,
        vec![common::header("x", &huge, "id-2"), common::commit(0, 0)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let after = acme.audit_entries("retail-media-demo").await.unwrap();
    assert_eq!(after.len(), before.len() + 1, "only acme's own refusal");
    assert!(
        size(&log) - bytes_before < 2_000,
        "{}",
        size(&log) - bytes_before
    );
    assert_eq!(after.last().unwrap().subject, None);

    // Pages: at most the page size, and the client follows them.
    for _ in 0..5 {
        let _ = acme.query("retail-media-demo", "SELEC 1").await;
    }
    let page = acme.audit_page("retail-media-demo", 2, "").await.unwrap();
    assert_eq!(page.entries.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let all = acme.audit_entries("retail-media-demo").await.unwrap();
    assert_eq!(all.len(), after.len() + 5);
    let err = acme
        .audit_page("retail-media-demo", 5_000, "")
        .await
        .unwrap_err();
    assert_eq!(err.status().unwrap().code(), Code::InvalidArgument);
    server.stop().await.unwrap();
}

/// The demo's by-region query is refused with `code` and a text that
/// starts with `prefix`.
async fn assert_refused(acme: &mut cleanroom::client::Client, code: Code, prefix: &str) {
    let err = acme
        .query("retail-media-demo", &format!("{BASE} GROUP BY c.region"))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().starts_with(prefix), "{}", status.message());
}

async fn loaded_server(
    privacy: Option<&str>,
    query_limits: QueryLimits,
) -> (TestServer, tempfile::TempDir) {
    let dir = common::demo_policies(privacy);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        query_limits,
        ..Setup::default()
    })
    .await;
    let (data, _) = common::synth(4_000, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    upload_demo(&server, "globex", data.path()).await;
    (server, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_memory_is_refused_and_charged_when_private() {
    let limits = QueryLimits {
        memory_bytes: 32 << 10,
        ..QueryLimits::default()
    };
    for privacy in [
        None,
        Some("epsilon_total = 10.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7"),
    ] {
        let (server, _dir) = loaded_server(privacy, limits).await;
        let mut acme = server.client("acme").await;
        assert_refused(&mut acme, Code::ResourceExhausted, "rule query.memory:").await;
        if privacy.is_some() {
            let b = acme.budget("retail-media-demo").await.unwrap();
            assert_eq!(b.epsilon_spent, 1.0, "the data was read: charged");
        }
        server.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_time_is_refused() {
    let limits = QueryLimits {
        timeout: Duration::from_millis(1),
        ..QueryLimits::default()
    };
    let (server, _dir) = loaded_server(None, limits).await;
    let mut acme = server.client("acme").await;
    assert_refused(
        &mut acme,
        Code::ResourceExhausted,
        "rule query.timeout: the query ran longer than",
    )
    .await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_repeated_past_the_cap_is_refused_at_upload() {
    let dir = common::demo_policies(None);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        limits: cleanroom::upload::Limits {
            max_rows_per_identifier: 5,
            ..cleanroom::upload::Limits::default()
        },
        ..Setup::default()
    })
    .await;
    let policy = common::people::demo_policy(None, 50);
    let hash = common::policy_hash(&server).await;
    let acme = server.client("acme").await;
    let rows = |copies: usize| -> Vec<common::people::Row> {
        let mut rows: Vec<_> = (0..100).map(common::people::Row::new).collect();
        rows.extend(std::iter::repeat_n(common::people::Row::new(7), copies));
        rows
    };
    for (copies, accepted) in [(4, true), (5, false)] {
        let batch = common::people::customers(&policy, &rows(copies));
        let result = common::raw_upload(
            &acme,
            vec![
                common::header(&hash, "customers", &format!("u{copies}")),
                common::batch_msg(&batch),
                common::commit(batch.num_rows() as u64, 1),
            ],
        )
        .await;
        match (result, accepted) {
            (Ok(_), true) => {}
            (Err(e), false) => {
                assert_eq!(e.code(), Code::InvalidArgument);
                assert!(
                    e.message().contains("rule identifier.repeats"),
                    "{}",
                    e.message()
                );
            }
            (other, _) => panic!("{copies} copies: {other:?}"),
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_and_upload_of_one_dataset_never_lose_each_others_work() {
    use cleanroom::proto;
    use common::people::{Row, customers, demo_policy, fingerprint};
    let dir = common::demo_policies(None);
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let policy = demo_policy(None, 50);
    let acme = server.client("acme").await;
    let hash = common::policy_hash(&server).await;
    let upload = |rows: Vec<Row>, id: String| {
        let (client, hash, policy) = (acme.clone(), hash.clone(), policy.clone());
        async move {
            let batch = customers(&policy, &rows);
            common::raw_upload(
                &client,
                vec![
                    common::header(&hash, "customers", &id),
                    common::batch_msg(&batch),
                    common::commit(batch.num_rows() as u64, 1),
                ],
            )
            .await
        }
    };
    upload((0..100).map(Row::new).collect(), "base".into())
        .await
        .unwrap();
    let (mut previous, mut aborted) = (100u64, 0);
    for i in 0..30u64 {
        let rows: Vec<Row> = (0..100).chain(200..201 + i).map(Row::new).collect();
        let n = rows.len() as u64;
        let erase = {
            let (client, hash) = (acme.clone(), hash.clone());
            async move {
                proto::datasets_service_client::DatasetsServiceClient::new(client.channel())
                    .erase(proto::EraseRequest {
                        agreement_id: "retail-media-demo".into(),
                        dataset: "customers".into(),
                        policy_hash: hash,
                        key_id: Vec::new(),
                        sets: vec![proto::FingerprintSet {
                            kind: "email".into(),
                            fingerprints: fingerprint(5, 0).to_vec(),
                        }],
                    })
                    .await
            }
        };
        let (uploaded, erased) = tokio::join!(upload(rows, format!("u{i}")), erase);
        erased.unwrap();
        let current = server
            .client("acme")
            .await
            .list_datasets("retail-media-demo")
            .await
            .unwrap()[0]
            .rows;
        match uploaded {
            // The upload committed before the erasure, or started after it.
            Ok(_) => assert!(
                current == n || current == n - 1,
                "round {i}: {current} rows, expected the upload's {n} (erased after it: {})",
                n - 1
            ),
            // The erasure committed while the upload ran: the upload is
            // refused and the erasure's version stays.
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "round {i}: {status:?}");
                assert!(
                    current == previous || current + 1 == previous,
                    "round {i}: {current} rows after an aborted upload, {previous} before"
                );
                aborted += 1;
            }
        }
        previous = current;
    }
    eprintln!("30 rounds: {aborted} uploads aborted by the erasure that committed first");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_policy_listing_identifier_columns_in_another_order_matches_alike() {
    use common::people::{Row, audience, customers, demo_policy};
    let policy = demo_policy(None, 5);
    // Stored under the shipped order (email, phone) ...
    let rows: Vec<Row> = (0..40)
        .map(|i| Row {
            phone: i % 2 == 0,
            ..Row::new(i)
        })
        .collect();
    let stored = vec![
        vec![customers(&policy, &rows)],
        vec![audience(&policy, &rows[..30])],
    ];
    // ... read under a policy edited to list phone first.
    let path = common::policies_dir().join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    let email = "[[dataset.column]]\nname = \"email\"\nrole = \"identifier\"\nkind = \"email\"\n\n";
    let phone = "[[dataset.column]]\nname = \"phone\"\nrole = \"identifier\"\nkind = \"phone\"\n\n";
    let swapped = head
        .replace("min_group_size = 50", "min_group_size = 5")
        .replace(&format!("{email}{phone}"), &format!("{phone}{email}"));
    assert_ne!(swapped, head);
    let reordered = cleanroom::agreements::parse_policy(&swapped, &path).unwrap();
    let sql = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.phone = a.phone GROUP BY c.region";
    let shipped = cleanroom::query::agreement_tables(&policy, stored.clone());
    let edited = cleanroom::query::agreement_tables(&reordered, stored);
    let a = cleanroom::query::run(&policy, "acme", &shipped, sql)
        .await
        .unwrap();
    let b = cleanroom::query::run(&reordered, "acme", &edited, sql)
        .await
        .unwrap();
    assert_eq!(a.batches, b.batches);
    assert_eq!(a.rows(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upload_messages_are_refused() {
    use cleanroom::proto;
    let server = TestServer::start().await;
    let acme = server.client("acme").await;
    let hash = common::policy_hash(&server).await;
    let mut huge_length = vec![0xFF, 0xFF, 0xFF, 0xFF, 0xF0, 0xFF, 0xFF, 0x7F];
    huge_length.extend_from_slice(&[0u8; 64]);
    for bytes in [huge_length, vec![1, 2, 3], Vec::new()] {
        let err = common::raw_upload(
            &acme,
            vec![
                common::header(&hash, "customers", "bad"),
                proto::UploadRequest {
                    part: Some(proto::upload_request::Part::Batch(bytes)),
                },
                common::commit(1, 1),
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
    // The server still takes a good upload.
    let (data, _) = common::synth(500, 0.5);
    upload_demo(&server, "acme", data.path()).await;
    server.stop().await.unwrap();
}
