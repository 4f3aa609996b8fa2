//! Prometheus metrics, for operators: a text endpoint on its own listen
//! address (`--metrics-listen`, off by default), plain HTTP, meant for a
//! private interface.
//!
//! Every label value comes from a fixed set: service and method names from
//! the server's own services (anything else is `unknown`), gRPC codes, the
//! rule names in the code, and agreement ids from the policy files. No SQL,
//! no dataset contents, no organisation's data ever becomes a label.
//! Epsilon is counted per agreement, never per person.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Services and methods the server answers: the only values the call
/// labels take.
const METHODS: &[(&str, &[&str])] = &[
    (
        "cleanroom.v1.Agreements",
        &["WhoAmI", "ListAgreements", "GetAgreement"],
    ),
    ("cleanroom.v1.Audit", &["ListEntries"]),
    (
        "cleanroom.v1.Datasets",
        &["Upload", "ListDatasets", "Erase"],
    ),
    ("cleanroom.v1.Governance", &["AccessReport", "AdminStatus"]),
    (
        "cleanroom.v1.Matching",
        &["Overlap", "BlindingWork", "SubmitBlinding"],
    ),
    ("cleanroom.v1.Queries", &["Query", "Budget"]),
    (
        "arrow.flight.protocol.FlightService",
        &[
            "Handshake",
            "ListFlights",
            "GetFlightInfo",
            "PollFlightInfo",
            "GetSchema",
            "DoGet",
            "DoPut",
            "DoExchange",
            "DoAction",
            "ListActions",
        ],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
];

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
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabels {
    agreement: String,
}

/// The server's metrics. Recording is always on and cheap; only the
/// endpoint is optional.
pub struct Metrics {
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
    fn record_call(&self, path: &str, code: tonic::Code, took: Duration) {
        let (service, method) = known_method(path);
        self.calls
            .get_or_create(&CallLabels {
                service,
                method,
                code: crate::client::code_name(code),
            })
            .inc();
        let operation = match (service, method) {
            ("cleanroom.v1.Datasets", "Upload") => "upload",
            ("cleanroom.v1.Matching", "Overlap") => "overlap",
            ("cleanroom.v1.Queries", "Query")
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
    pub(crate) fn refused(&self, rule: String) {
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
    /// `cached` is (agreements, rows) in memory.
    pub(crate) fn render(
        &self,
        reload_failures: u64,
        data_dir: &Path,
        cached: (usize, u64),
    ) -> String {
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

fn known_method(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    METHODS
        .iter()
        .find(|(s, _)| *s == service)
        .and_then(|(s, methods)| methods.iter().find(|m| **m == method).map(|m| (*s, *m)))
        .unwrap_or(("unknown", "unknown"))
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

/// Counts every call by service, method and status, and times uploads,
/// overlaps and queries. The status is the response's `grpc-status`
/// header (every refusal here is sent before any response message), OK
/// when it has none.
#[derive(Clone, Debug)]
pub(crate) struct CallsLayer(pub(crate) Arc<Metrics>);

impl<S> tower::Layer<S> for CallsLayer {
    type Service = Calls<S>;
    fn layer(&self, inner: S) -> Calls<S> {
        Calls {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Calls<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Calls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let started = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await;
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.record_call(&path, code, started.elapsed());
            response
        })
    }
}

/// Serves the text exposition at `/metrics` on `listener` until `stop`.
pub(crate) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: super::AppState,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || {
                    state.metrics().render(
                        state.reload_status().failures,
                        state.store().root(),
                        (state.query_tables().len(), state.query_tables().rows()),
                    )
                })
                .await
                .unwrap_or_default();
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    text,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "the metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC of the public contract, read from the .proto files, has
    /// its own label: a new RPC cannot be counted as "unknown" unnoticed.
    #[test]
    fn every_rpc_of_the_contract_is_a_known_method() {
        let files = [
            include_str!("../../proto/cleanroom/v1/agreements.proto"),
            include_str!("../../proto/cleanroom/v1/datasets.proto"),
            include_str!("../../proto/cleanroom/v1/audit.proto"),
            include_str!("../../proto/cleanroom/v1/matching.proto"),
            include_str!("../../proto/cleanroom/v1/queries.proto"),
            include_str!("../../proto/cleanroom/v1/governance.proto"),
            include_str!("../../proto/arrow/flight/protocol/flight.proto"),
        ];
        let mut rpcs = 0;
        for text in files {
            let (mut package, mut service) = (None, None);
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("package ") {
                    package = Some(rest.trim_end_matches(';').to_string());
                }
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().map(String::from);
                }
                if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap().trim();
                    let service = service.as_deref().expect("an rpc inside a service");
                    let package = package.as_deref().expect("a package");
                    let path = format!("/{package}.{service}/{method}");
                    assert_ne!(known_method(&path), ("unknown", "unknown"), "{path}");
                    rpcs += 1;
                }
            }
        }
        // And no label for an RPC the contract does not have.
        let labelled: usize = METHODS
            .iter()
            .filter(|(s, _)| !s.starts_with("grpc."))
            .map(|(_, m)| m.len())
            .sum();
        assert_eq!(rpcs, labelled);
    }

    #[test]
    fn call_labels_come_from_a_fixed_set() {
        assert_eq!(
            known_method("/cleanroom.v1.Queries/Query"),
            ("cleanroom.v1.Queries", "Query")
        );
        assert_eq!(
            known_method("/cleanroom.v1.Queries/SELECT email FROM customers"),
            ("unknown", "unknown")
        );
        assert_eq!(known_method("/x/y"), ("unknown", "unknown"));
        let m = Metrics::default();
        m.record_call(
            "/cleanroom.v1.Queries/Query",
            tonic::Code::PermissionDenied,
            Duration::from_millis(3),
        );
        m.record_call("/evil/jane@example.com", tonic::Code::Ok, Duration::ZERO);
        let text = m.render(0, Path::new("/nonexistent"), (0, 0));
        assert!(text.contains(
            r#"cleanroom_rpc_calls_total{service="cleanroom.v1.Queries",method="Query",code="PERMISSION_DENIED"} 1"#
        ), "{text}");
        assert!(!text.contains("jane"), "{text}");
        assert!(
            text.contains(r#"cleanroom_operation_duration_seconds_count{operation="query"} 1"#),
            "{text}"
        );
    }
}
