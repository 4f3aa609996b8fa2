//! Any text as a query against the demo agreement with empty datasets:
//! answered or refused, never a panic and never an engine failure beneath
//! the release boundary.
#![no_main]

use std::sync::OnceLock;

use cleanroom::policy::Policy;
use cleanroom::query::{QueryError, TableData};
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (tokio::runtime::Runtime, Policy, Vec<TableData>) {
    static S: OnceLock<(tokio::runtime::Runtime, Policy, Vec<TableData>)> = OnceLock::new();
    S.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies/retail-media-demo.toml");
        let policy =
            cleanroom::agreements::parse_policy(&std::fs::read_to_string(&path).unwrap(), &path)
                .unwrap();
        let tables = cleanroom::query::agreement_tables(&policy, vec![Vec::new(); 2]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        (rt, policy, tables)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let (rt, policy, tables) = setup();
    if let Err(QueryError::Engine(e)) = rt.block_on(cleanroom::query::run(policy, "acme", tables, sql)) {
        panic!("engine failure: {e}");
    }
});
