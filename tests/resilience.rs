//! One hostile party against the service: inputs of any size and shape get
//! a clear refusal, and the server keeps answering everyone else.

mod common;

use common::{TestServer, upload_demo};
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
