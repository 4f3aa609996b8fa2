//! What the room counts for the operator: calls, refusals by rule, epsilon
//! spent per agreement, uploads, matchings and the table cache. The
//! transport serves them as Prometheus text (`server/metrics.rs`).
//!
//! Every label value comes from a fixed set: service and method names the
//! transport knows, status names, the rule names in the code, and agreement
//! ids from the policy files. No SQL, no dataset contents, no
//! organisation's data ever becomes a label. Epsilon is counted per
//! agreement, never per person.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabels {
    agreement: String,
}

/// The server's metrics. Recording is always on and cheap; only the
/// endpoint is optional.
pub(crate) struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<OperationLabels, Histogram>,
    upload_rows: Counter,
    upload_bytes: Counter,
    refused: Family<RuleLabels, Counter>,
    epsilon: Family<AgreementLabels, Counter<f64, AtomicU64>>,
    in_flight: Gauge,
    reload_failures: Gauge,
    store_bytes: Gauge,
    cached_agreements: Gauge,
    workers_live: Gauge,
    worker_placed_bytes: Gauge,
    stage_reruns: Gauge,
    cached_rows: Gauge,
    table_loads: Counter,
    matched_reads: Counter,
    matched_saves: Counter,
    matchings: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cleanroom");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "rpc_calls",
            "Calls by service, method and gRPC status code",
            calls.clone(),
        );
        let latency = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        registry.register(
            "operation_duration_seconds",
            "Time to answer uploads, overlaps and queries (Query RPC and Flight SQL DoGet)",
            latency.clone(),
        );
        let upload_rows = Counter::default();
        registry.register(
            "upload_rows",
            "Rows stored by committed uploads",
            upload_rows.clone(),
        );
        let upload_bytes = Counter::default();
        registry.register(
            "upload_bytes",
            "Bytes stored by committed uploads",
            upload_bytes.clone(),
        );
        let refused = Family::<RuleLabels, Counter>::default();
        registry.register(
            "queries_refused",
            "Queries refused, by the rule that refused them",
            refused.clone(),
        );
        let epsilon = Family::<AgreementLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "epsilon_spent",
            "Privacy budget spent by queries and overlaps, per agreement",
            epsilon.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "queries_in_flight",
            "Queries running now",
            in_flight.clone(),
        );
        let reload_failures = Gauge::default();
        registry.register(
            "policy_reload_failures",
            "Re-reads of the policy folder that refused at least one file, since start",
            reload_failures.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "store_bytes",
            "Bytes in the data directory",
            store_bytes.clone(),
        );
        let cached_agreements = Gauge::default();
        registry.register(
            "cached_agreements",
            "Agreements whose decrypted, matched tables are held in memory",
            cached_agreements.clone(),
        );
        let workers_live = Gauge::default();
        registry.register(
            "workers_live",
            "Workers of the distributed engine that answered their last health check",
            workers_live.clone(),
        );
        let worker_placed_bytes = Gauge::default();
        registry.register(
            "worker_placed_bytes",
            "Bytes of matched tables streamed to workers by placements, since start",
            worker_placed_bytes.clone(),
        );
        let stage_reruns = Gauge::default();
        registry.register(
            "stage_reruns",
            "Stages of queries that failed on the workers and ran again on the server, since start",
            stage_reruns.clone(),
        );
        let cached_rows = Gauge::default();
        registry.register(
            "cached_rows",
            "Rows in the decrypted, matched tables held in memory",
            cached_rows.clone(),
        );
        let table_loads = Counter::default();
        registry.register(
            "table_loads",
            "Agreements' tables decrypted, matched and keyed for queries (once per set of current versions and policy while they fit the cache)",
            table_loads.clone(),
        );
        let matched_reads = Counter::default();
        registry.register(
            "matched_table_reads",
            "Agreements' matched tables read back from the store instead of matching again (after a restart, or when the cache had let them go)",
            matched_reads.clone(),
        );
        let matched_saves = Counter::default();
        registry.register(
            "matched_table_saves",
            "Agreements' matched tables written to the store, once per set of current versions and policy",
            matched_saves.clone(),
        );
        let matchings = Counter::default();
        registry.register(
            "overlap_matchings",
            "Pairs of dataset versions matched for an overlap (each pair once; recorded counts are reused, across restarts too)",
            matchings.clone(),
        );
        Metrics {
            registry,
            cached_agreements,
            workers_live,
            worker_placed_bytes,
            stage_reruns,
            cached_rows,
            table_loads,
            matched_reads,
            matched_saves,
            matchings,
            calls,
            latency,
            upload_rows,
            upload_bytes,
            refused,
            epsilon,
            in_flight,
            reload_failures,
            store_bytes,
        }
    }
}

impl Metrics {
    /// One call of `service`/`method` answered with status `code`; all
    /// three from the transport's fixed lists.
    pub(crate) fn record_call(
        &self,
        (service, method): (&'static str, &'static str),
        code: &'static str,
        took: Duration,
    ) {
        self.calls
            .get_or_create(&CallLabels {
                service,
                method,
                code,
            })
            .inc();
        let operation = match (service, method) {
            ("cleanroom.v1.DatasetsService", "Upload") => "upload",
            ("cleanroom.v1.MatchingService", "Overlap") => "overlap",
            ("cleanroom.v1.QueriesService", "Query")
            | ("arrow.flight.protocol.FlightService", "DoGet") => "query",
            _ => return,
        };
        self.latency
            .get_or_create(&OperationLabels { operation })
            .observe(took.as_secs_f64());
    }

    /// An agreement's query tables loaded.
    pub(crate) fn tables_loaded(&self) {
        self.table_loads.inc();
    }

    /// An agreement's matched tables read back from the store.
    pub(crate) fn matched_tables_read(&self) {
        self.matched_reads.inc();
    }

    /// An agreement's matched tables written to the store.
    pub(crate) fn matched_tables_saved(&self) {
        self.matched_saves.inc();
    }

    /// A pair of versions matched for an overlap.
    pub(crate) fn matched(&self) {
        self.matchings.inc();
    }

    pub(crate) fn uploaded(&self, rows: u64, bytes: u64) {
        self.upload_rows.inc_by(rows);
        self.upload_bytes.inc_by(bytes);
    }

    /// A query refused by `rule` (a rule name of the code's, never text a
    /// caller chose).
    pub(crate) fn refused(&self, rule: &'static str) {
        self.refused.get_or_create(&RuleLabels { rule }).inc();
    }

    pub(crate) fn spent(&self, agreement: &str, epsilon: f64) {
        self.epsilon
            .get_or_create(&AgreementLabels {
                agreement: agreement.to_string(),
            })
            .inc_by(epsilon);
    }

    /// Counts a query as running until the guard is dropped.
    pub(crate) fn query_running(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(Arc::clone(self))
    }

    /// The text exposition, after reading the values kept elsewhere;
    /// `cached` is (agreements, rows) in memory, `cluster` what the
    /// workers did, if there are workers.
    pub(crate) fn render(
        &self,
        reload_failures: u64,
        data_dir: &Path,
        cached: (usize, u64),
        cluster: Option<crate::cluster::ClusterFigures>,
    ) -> String {
        if let Some(c) = cluster {
            self.workers_live
                .set(i64::try_from(c.live_workers).unwrap_or(i64::MAX));
            self.worker_placed_bytes
                .set(i64::try_from(c.placed_bytes).unwrap_or(i64::MAX));
        }
        self.stage_reruns
            .set(i64::try_from(crate::query::reruns_on_server()).unwrap_or(i64::MAX));
        self.cached_agreements
            .set(i64::try_from(cached.0).unwrap_or(i64::MAX));
        self.cached_rows
            .set(i64::try_from(cached.1).unwrap_or(i64::MAX));
        self.reload_failures
            .set(i64::try_from(reload_failures).unwrap_or(i64::MAX));
        self.store_bytes
            .set(i64::try_from(dir_size(data_dir)).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Decrements the in-flight gauge when a query ends, however it ends.
pub(crate) struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
