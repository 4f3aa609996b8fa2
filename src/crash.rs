//! Crash points for the fault tests: when the environment variable
//! `CLEANROOM_CRASH_AT` names a point, the process aborts there, as a
//! power cut or `kill -9` would stop it (no destructor runs, nothing more
//! is written). Unset, a point costs one comparison. The points sit
//! between the writes whose order the store's recovery relies on; see
//! `tests/crash.rs` and docs/faults.md.

use std::sync::OnceLock;

/// Every point, in the order a request meets them.
pub const POINTS: &[&str] = &[
    "upload.staged",
    "commit.renamed",
    "commit.recorded",
    "erase.committed",
    "delete.recorded",
    "ledger.charged",
    "audit.written",
];

/// Stops the process at once if `CLEANROOM_CRASH_AT` is `point`.
pub fn point(point: &'static str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("CLEANROOM_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        debug_assert!(POINTS.contains(&point));
        std::process::abort();
    }
}
