//! Property tests on stable for the three parsers a caller or an operator
//! can feed: policy files, query text, and upload streams. Whatever the
//! input, the answer is a value or a refusal: never a panic, never an
//! abort. The same entry points are fuzz targets in `fuzz/` for
//! `cargo fuzz` where a nightly toolchain exists.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use cleanroom::query::{QueryError, TableData};
use cleanroom::upload::{Limits, Validator, decode_batches};
use common::people::{Row, audience, customers, demo_policy, tables};
use proptest::prelude::*;

fn demo_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap()
    })
}

/// `text` with a few bytes replaced, removed or inserted.
fn mutate(text: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut out = text.to_vec();
    for &(at, kind, byte) in edits {
        if out.is_empty() {
            out.push(byte);
            continue;
        }
        let at = at % out.len();
        match kind % 3 {
            0 => out[at] = byte,
            1 => {
                out.remove(at);
            }
            _ => out.insert(at, byte),
        }
    }
    out
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn policy_files_parse_or_are_refused(edits in edits(), noise in ".{0,64}") {
        let path = Path::new("policies/retail-media-demo.toml");
        let mutated = mutate(demo_text().as_bytes(), &edits);
        for text in [String::from_utf8_lossy(&mutated).into_owned(), noise] {
            if let Err(e) = cleanroom::agreements::parse_policy(&text, path) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}

/// Words query text is made of: the demo's tables and columns, keywords,
/// operators, literals.
const VOCABULARY: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "HAVING",
    "ORDER",
    "LIMIT",
    "JOIN",
    "ON",
    "AND",
    "OR",
    "NOT",
    "IN",
    "BETWEEN",
    "IS",
    "NULL",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "CAST",
    "AS",
    "TRY_CAST",
    "INT",
    "TINYINT",
    "VARCHAR",
    "DOUBLE",
    "COUNT",
    "SUM",
    "AVG",
    "DISTINCT",
    "LEFT",
    "UNION",
    "EXPLAIN",
    "WITH",
    "customers",
    "audience",
    "c",
    "a",
    "c.email",
    "a.email",
    "c.phone",
    "a.phone",
    "c.region",
    "c.age_band",
    "c.lifetime_value",
    "a.interest_segment",
    "a.ad_exposures",
    "a.spend",
    "a.health_interest",
    "__person",
    "(",
    ")",
    ",",
    "*",
    "+",
    "-",
    "/",
    "%",
    "<<",
    "=",
    "<>",
    "<",
    ">=",
    "'north'",
    "'x'",
    "0",
    "1",
    "3",
    "9223372036854775807",
    "1e308",
    ";",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn demo_tables() -> &'static (cleanroom::policy::Policy, Vec<TableData>) {
    static T: OnceLock<(cleanroom::policy::Policy, Vec<TableData>)> = OnceLock::new();
    T.get_or_init(|| {
        let policy = demo_policy(None, 5);
        let rows: Vec<Row> = (0..30).map(Row::new).collect();
        let t = tables(&policy, &rows, &rows);
        (policy, t)
    })
}

/// Plans, checks and, if accepted, runs `sql`: a refusal or an answer,
/// never a panic (which the planning thread would report as an engine
/// failure) and never an engine failure beneath the release boundary.
fn query_outcome(sql: &str) -> Result<(), String> {
    let (policy, tables) = demo_tables();
    match runtime().block_on(cleanroom::query::run(policy, "acme", tables, sql)) {
        Ok(_) | Err(QueryError::Refused(_) | QueryError::Output | QueryError::Limit { .. }) => {
            Ok(())
        }
        Err(e @ QueryError::Engine(_)) => Err(format!("{sql}: {e:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn query_text_is_answered_or_refused(words in proptest::collection::vec(0..VOCABULARY.len(), 0..40)) {
        let sql: Vec<&str> = words.iter().map(|i| VOCABULARY[*i]).collect();
        prop_assert_eq!(query_outcome(&sql.join(" ")), Ok(()));
    }

    #[test]
    fn edited_queries_are_answered_or_refused(edits in edits(), base in 0..3usize) {
        let bases = [
            "SELECT c.region, COUNT(*) AS n, SUM(a.spend) FROM customers c JOIN audience a ON c.email = a.email WHERE c.age_band IN ('18-24', '25-34') GROUP BY c.region HAVING COUNT(*) > 3 ORDER BY n LIMIT 2",
            "SELECT a.interest_segment, AVG(c.lifetime_value), COUNT(DISTINCT c.email) FROM customers c JOIN audience a ON c.phone = a.phone GROUP BY a.interest_segment",
            "SELECT COUNT(*) FROM customers JOIN audience USING (email) WHERE NOT region = 'north' OR region IS NULL",
        ];
        let sql = String::from_utf8_lossy(&mutate(bases[base].as_bytes(), &edits)).into_owned();
        prop_assert_eq!(query_outcome(&sql), Ok(()));
    }
}

/// A valid upload message for each demo dataset.
fn valid_messages() -> &'static [Vec<u8>; 2] {
    static M: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    M.get_or_init(|| {
        let policy = demo_policy(None, 5);
        let rows: Vec<Row> = (0..8).map(Row::new).collect();
        [
            cleanroom::upload::encode_batch(&customers(&policy, &rows)).unwrap(),
            cleanroom::upload::encode_batch(&audience(&policy, &rows)).unwrap(),
        ]
    })
}

/// Decodes, validates and restates `bytes` as the server does for dataset
/// `which`: never a panic.
fn upload_outcome(bytes: &[u8], which: usize) {
    let policy = demo_policy(None, 5);
    let dataset = &policy.datasets()[which];
    let mut validator = Validator::new(dataset, Limits::default());
    if let Ok(batches) = decode_batches(bytes) {
        for b in &batches {
            if validator.check(b, bytes.len()).is_ok() {
                let _ = validator.restate(b);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn upload_streams_are_decoded_or_refused(edits in edits(), which in 0..2usize, noise in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mutated = mutate(&valid_messages()[which], &edits);
        upload_outcome(&mutated, which);
        upload_outcome(&noise, which);
    }
}
