//! The transport: gRPC and Flight SQL over mutual TLS, the organisation
//! from the client certificate, health, reflection and graceful shutdown.
//! Each service file decodes a call, asks the room (`crate::room`) and
//! encodes its answer; `status.rs` maps the room's errors to statuses.

mod agreements;
mod audit;
mod auth;
mod datasets;
pub mod flight;
mod governance;
mod matching;
mod metrics;
mod queries;
mod status;
mod tls;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::audit::{AuditError, AuditLog};
use crate::clock::Clock;
use crate::policy::PolicyError;
use crate::proto::agreements_service_server::AgreementsServiceServer;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::datasets_service_server::DatasetsServiceServer;
use crate::proto::governance_service_server::GovernanceServiceServer;
use crate::proto::matching_service_server::MatchingServiceServer;
use crate::proto::queries_service_server::QueriesServiceServer;
use crate::room::{Room, SettleError};

pub use crate::room::{Deletion, Scrub};
use crate::storage::{StorageError, Store};
use crate::upload::Limits;
pub use worker::{DEFAULT_WORKER_LISTEN, WorkerOptions, serve_worker, worker_url};

use agreements::Agreements;
use audit::Audit;
use datasets::Datasets;
use governance::Governance;
use matching::Matching;
use queries::Queries;

/// Certificate files the server presents and trusts.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA that signs client certificates.
    pub ca: PathBuf,
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `cleanroom certs init` writes into `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join(crate::certs::CA_CERT),
            cert: dir.join(crate::certs::SERVER_CERT),
            key: dir.join(crate::certs::SERVER_KEY),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<PolicyError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Settle(#[from] SettleError),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Everything needed to run a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub tls: TlsFiles,
    pub policies_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Master key file; `DATA_DIR/master.key` (created on first start) if unset.
    pub master_key: Option<PathBuf>,
    /// Size limits of one upload.
    pub limits: Limits,
    /// Limits on the work of queries.
    pub query_limits: crate::query::QueryLimits,
    /// How long health reports NOT_SERVING before the server stops taking
    /// new calls, so load balancers can move traffic away.
    pub shutdown_grace: Duration,
    /// Longest wait for in-flight calls once draining starts.
    pub drain_timeout: Duration,
    pub clock: Arc<dyn Clock>,
    /// How often the policy folder is checked for edits.
    pub policy_poll: Duration,
    /// How often retention and expiry deletion runs.
    pub maintenance_interval: Duration,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// When retention and expiry may delete.
    pub deletion: Deletion,
    /// How stored versions are checked for damage.
    pub scrub: Scrub,
    /// Longest a connection may take to finish its TLS handshake; one
    /// that has not by then is closed.
    pub tls_handshake_timeout: Duration,
    /// Workers of the distributed engine the private stage runs on; the
    /// server alone if `None`.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl ServerOptions {
    /// Embedded defaults: certificates from `certs_dir`, the system clock,
    /// default limits, a 2 s shutdown grace and a 30 s drain.
    pub fn new(certs_dir: &Path, policies_dir: &Path, data_dir: &Path) -> Self {
        ServerOptions {
            tls: TlsFiles::in_dir(certs_dir),
            policies_dir: policies_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            master_key: None,
            limits: Limits::default(),
            query_limits: crate::query::QueryLimits::default(),
            shutdown_grace: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            clock: Arc::new(crate::clock::SystemClock),
            policy_poll: Duration::from_secs(2),
            maintenance_interval: Duration::from_secs(60),
            metrics_listen: None,
            deletion: Deletion::default(),
            scrub: Scrub::default(),
            tls_handshake_timeout: Duration::from_secs(10),
            cluster: None,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The services this port routes, by their gRPC names; a test checks them
/// against the services of the contract, so none goes without health.
fn routed() -> [&'static str; 7] {
    use tonic::server::NamedService;
    [
        <AgreementsServiceServer<Agreements> as NamedService>::NAME,
        <DatasetsServiceServer<Datasets> as NamedService>::NAME,
        <MatchingServiceServer<Matching> as NamedService>::NAME,
        <QueriesServiceServer<Queries> as NamedService>::NAME,
        <AuditServiceServer<Audit> as NamedService>::NAME,
        <GovernanceServiceServer<Governance> as NamedService>::NAME,
        <arrow_flight::flight_service_server::FlightServiceServer<flight::FlightSqlEndpoint> as NamedService>::NAME,
    ]
}

/// Sets the health of the whole server ("") and of every service.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in std::iter::once("").chain(routed()) {
        reporter.set_service_status(service, status).await;
    }
}

/// Runs the server on `listener` until `shutdown` resolves. Then health
/// turns NOT_SERVING, and after the grace period the server stops accepting
/// calls and waits for in-flight ones to finish.
pub async fn serve(
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let policies =
        crate::agreements::load_dir(&options.policies_dir).map_err(ServerError::Policies)?;
    let tls = tls::server_config(&options.tls)?;
    let store = Store::open(&options.data_dir, options.master_key.as_deref())?;
    let local_addr: SocketAddr = listener.local_addr().map_err(|source| ServerError::Io {
        path: PathBuf::from("(listener)"),
        source,
    })?;
    let audit = AuditLog::open(&options.data_dir)?;
    crate::room::settle_interrupted(
        &store,
        &audit,
        &policies,
        options.clock.now().unix_timestamp(),
    )?;
    let held = store.clone();
    let state = Room::new(
        policies,
        Arc::clone(&options.clock),
        store,
        options.limits,
        audit,
    )
    .with_query_limits(options.query_limits)
    .with_deletion(options.deletion);
    let state = match options.cluster.clone() {
        Some(config) => {
            let cluster = crate::cluster::Cluster::start(config)
                .await
                .map_err(|e| ServerError::Tls(e.to_string()))?;
            tracing::info!(
                live = cluster.figures().live_workers,
                "the private stage of queries runs on workers"
            );
            state.with_cluster(cluster)
        }
        None => state,
    };

    let background = crate::room::spawn_background(
        &state,
        &crate::room::Every {
            maintenance: options.maintenance_interval,
            policy_poll: options.policy_poll,
            scrub: options.scrub,
        },
        &options.policies_dir,
    );
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut metrics_task = None;
    if let Some(addr) = options.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Io {
                path: PathBuf::from(format!("(metrics listener {addr})")),
                source,
            })?;
        tracing::info!(addr = %addr, "serving metrics at /metrics");
        metrics_task = Some(tokio::spawn(metrics::serve_metrics(
            listener,
            state.clone(),
            async move {
                let _ = metrics_stopped.await;
            },
        )));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::Serving).await;
    // Reflection in both versions clients ask for, listing every service
    // this port serves.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(crate::proto::FLIGHT_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = options.shutdown_grace;
    let reporter = health_reporter.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: health NOT_SERVING"
        );
        set_health(&reporter, ServingStatus::NotServing).await;
        tokio::time::sleep(grace).await;
        tracing::info!("draining in-flight calls");
        let _ = stop_tx.send(());
    });

    tracing::info!(
        addr = %local_addr,
        agreements = state.policies().len(),
        data_dir = %options.data_dir.display(),
        "listening"
    );
    let room = state.clone();
    let incoming = tls::accept(
        TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60))),
        tls,
        options.tls_handshake_timeout,
    );
    // Peers that vanish without closing are found by keepalive pings and
    // their connections closed.
    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(metrics::CallsLayer(Arc::clone(state.metrics())))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(AgreementsServiceServer::new(Agreements::new(state.clone())))
        .add_service(DatasetsServiceServer::new(Datasets::new(state.clone())))
        .add_service(MatchingServiceServer::new(Matching::new(state.clone())))
        .add_service(QueriesServiceServer::new(Queries::new(state.clone())))
        .add_service(GovernanceServiceServer::new(Governance::new(state.clone())))
        .add_service(AuditServiceServer::new(Audit::new(state.clone())))
        .add_service(
            arrow_flight::flight_service_server::FlightServiceServer::new(
                flight::FlightSqlEndpoint::new(state),
            ),
        );

    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stop_rx.await;
        let _ = drained_tx.send(());
    });
    tokio::pin!(server);
    // Serve until stopped; from then on everything ends by one deadline.
    let served = tokio::select! {
        result = &mut server => Some(result),
        _ = drained_rx => None,
    };
    let deadline = tokio::time::Instant::now() + options.drain_timeout;
    let result = match served {
        Some(result) => result.map_err(ServerError::from),
        None => match tokio::time::timeout_at(deadline, server).await {
            Ok(result) => result.map_err(ServerError::from),
            Err(_) => {
                tracing::warn!("in-flight calls did not finish in time; stopping anyway");
                Ok(())
            }
        },
    };
    // Calls still running past the drain commit nothing from here on; the
    // room itself is let go, so that only those calls still hold the store.
    room.close();
    drop(room);
    if tokio::time::timeout_at(deadline, background.stop())
        .await
        .is_err()
    {
        tracing::warn!("background work did not stop in time; stopping anyway");
    }
    let _ = metrics_stop.send(());
    if let Some(task) = metrics_task
        && tokio::time::timeout_at(deadline, task).await.is_err()
    {
        tracing::warn!("the metrics endpoint did not stop in time");
    }
    // Connections closing after the drain still hold the services, and
    // through them the store, for a moment: wait until it is free, so the
    // data directory is once `serve` returns.
    while held.handles() > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if held.handles() > 1 {
        tracing::warn!("the store is still in use at the drain deadline; stopping anyway");
    }
    drop(held);
    tracing::info!("stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every service of the contract (and the Flight service) is routed and
    /// so has health: the list is the descriptors reflection serves.
    #[test]
    fn every_service_of_the_contract_is_routed() {
        use prost::Message;
        let mut described = std::collections::BTreeSet::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            crate::proto::FLIGHT_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in set.file {
                for service in &file.service {
                    described.insert(format!("{}.{}", file.package(), service.name()));
                }
            }
        }
        let routed: std::collections::BTreeSet<String> =
            routed().iter().map(|s| s.to_string()).collect();
        assert_eq!(routed, described);
        assert_eq!(routed.len(), 7);
    }
}
