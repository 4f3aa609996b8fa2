//! Prometheus metrics, for operators: a text endpoint on its own listen
//! address (`--metrics-listen`, off by default), plain HTTP, meant for a
//! private interface. The room counts; this layer names each call by the
//! services this port serves (anything else is `unknown`) and serves the
//! text.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::room::Room;
use crate::room::metrics::Metrics;

/// Services and methods the server answers: the only values the call
/// labels take.
const METHODS: &[(&str, &[&str])] = &[
    (
        "cleanroom.v1.AgreementsService",
        &["WhoAmI", "ListAgreements", "GetAgreement"],
    ),
    ("cleanroom.v1.AuditService", &["ListAuditEntries"]),
    (
        "cleanroom.v1.DatasetsService",
        &["Upload", "ListDatasets", "Erase"],
    ),
    (
        "cleanroom.v1.GovernanceService",
        &["AccessReport", "AdminStatus"],
    ),
    (
        "cleanroom.v1.MatchingService",
        &["Overlap", "BlindingWork", "SubmitBlinding"],
    ),
    ("cleanroom.v1.QueriesService", &["Query", "Budget"]),
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

fn known_method(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    METHODS
        .iter()
        .find(|(s, _)| *s == service)
        .and_then(|(s, methods)| methods.iter().find(|m| **m == method).map(|m| (*s, *m)))
        .unwrap_or(("unknown", "unknown"))
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
            metrics.record_call(
                known_method(&path),
                crate::proto::code_name(code),
                started.elapsed(),
            );
            response
        })
    }
}

/// Serves the text exposition at `/metrics` on `listener` until `stop`.
pub(crate) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    room: Room,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let room = room.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || room.metrics_text())
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
            known_method("/cleanroom.v1.QueriesService/Query"),
            ("cleanroom.v1.QueriesService", "Query")
        );
        assert_eq!(
            known_method("/cleanroom.v1.QueriesService/SELECT email FROM customers"),
            ("unknown", "unknown")
        );
        assert_eq!(known_method("/x/y"), ("unknown", "unknown"));
        let m = Metrics::default();
        m.record_call(
            known_method("/cleanroom.v1.QueriesService/Query"),
            "PERMISSION_DENIED",
            std::time::Duration::from_millis(3),
        );
        m.record_call(
            known_method("/evil/jane@example.com"),
            "OK",
            std::time::Duration::ZERO,
        );
        let text = m.render(0, std::path::Path::new("/nonexistent"), (0, 0), None);
        assert!(text.contains(
            r#"cleanroom_rpc_calls_total{service="cleanroom.v1.QueriesService",method="Query",code="PERMISSION_DENIED"} 1"#
        ), "{text}");
        assert!(!text.contains("jane"), "{text}");
        assert!(
            text.contains(r#"cleanroom_operation_duration_seconds_count{operation="query"} 1"#),
            "{text}"
        );
    }
}
