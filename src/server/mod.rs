//! The gRPC server: mutual TLS, organisation identity from the client
//! certificate, health, reflection and graceful shutdown. Handlers translate
//! between protobuf and domain types; rules live in the domain modules.

pub(crate) mod agreements;
mod audit;
mod auth;
mod blinding;
mod budget;
mod datasets;
pub mod flight;
pub mod governance;
mod matching;
pub mod metrics;
mod queries;
mod tls;
mod upkeep;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::audit::{AuditError, AuditLog, Event};
use crate::clock::Clock;
use crate::error::ServiceError;
use crate::policy::{PolicyError, PolicySet};
use crate::proto::agreements_server::AgreementsServer;
use crate::proto::audit_server::AuditServer;
use crate::proto::datasets_server::DatasetsServer;
use crate::proto::governance_server::GovernanceServer;
use crate::proto::matching_server::MatchingServer;
use crate::proto::queries_server::QueriesServer;
use crate::storage::{StorageError, Store};
use crate::upload::Limits;

pub use agreements::AgreementsService;
pub use audit::AuditService;
pub use datasets::DatasetsService;
pub use governance::GovernanceService;
pub use matching::MatchingService;
pub use queries::QueriesService;
pub use upkeep::{Deletion, Scrub};

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
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// State every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    policies: Arc<RwLock<Arc<PolicySet>>>,
    clock: Arc<dyn Clock>,
    store: Store,
    limits: Limits,
    query_limits: crate::query::QueryLimits,
    query_gate: Arc<queries::QueryGate>,
    audit: AuditLog,
    query_tables: queries::TableCache,
    blinding_jobs: blinding::Jobs,
    /// Agreements whose overlaps to match ahead of the next request, for
    /// the background matcher (none attached outside `serve`).
    match_queue: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>>,
    reload: Arc<std::sync::Mutex<ReloadStatus>>,
    /// One lock per dataset, held while a version is committed and for a
    /// whole erasure, so neither loses the other's version.
    dataset_locks:
        Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::Mutex<()>>>>>,
    metrics: Arc<metrics::Metrics>,
    deletion: Deletion,
    /// Set at the drain deadline: no upload or erasure commits after it.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The time at which deletion was last found paused for a clock
    /// jump, so each pause is audited once.
    paused_at: Arc<std::sync::Mutex<Option<i64>>>,
}

/// How the last re-reads of the policy folder went, for admins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Re-reads after a change in the folder.
    pub reloads: u64,
    /// Re-reads that refused at least one file.
    pub failures: u64,
    /// Unix seconds of the last re-read.
    pub last_at: Option<i64>,
    /// The last re-read's refusals, as `cleanroom policy check` prints them.
    pub last_errors: Vec<String>,
}

impl AppState {
    pub fn new(
        policies: PolicySet,
        clock: Arc<dyn Clock>,
        store: Store,
        limits: Limits,
        audit: AuditLog,
    ) -> Self {
        AppState {
            policies: Arc::new(RwLock::new(Arc::new(policies))),
            clock,
            store,
            limits,
            query_limits: crate::query::QueryLimits::default(),
            query_gate: Arc::new(queries::QueryGate::new(crate::query::QueryLimits::default())),
            audit,
            query_tables: queries::TableCache::default(),
            blinding_jobs: blinding::Jobs::default(),
            match_queue: Arc::default(),
            reload: Arc::default(),
            dataset_locks: Arc::default(),
            metrics: Arc::default(),
            deletion: Deletion::default(),
            closed: Arc::default(),
            paused_at: Arc::default(),
        }
    }

    /// The same state with these rules for deletion.
    pub fn with_deletion(mut self, deletion: Deletion) -> Self {
        self.deletion = deletion;
        self
    }

    /// The server's Prometheus metrics.
    /// Refuses once the server has passed its drain deadline: a call still
    /// running then commits nothing.
    pub(crate) fn still_open(&self) -> Result<(), ServiceError> {
        match self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(ServiceError::Stopping),
            false => Ok(()),
        }
    }

    pub(crate) fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// The same state with these query limits.
    pub fn with_query_limits(mut self, limits: crate::query::QueryLimits) -> Self {
        self.query_limits = limits;
        self.query_gate = Arc::new(queries::QueryGate::new(limits));
        self.query_tables = queries::TableCache::new(limits.table_cache_bytes);
        self
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the policy folder and puts the result in force: valid
    /// edits apply, broken files keep their last good policy, removed
    /// files suspend their agreement. Every change and refusal is logged
    /// and audited. Blocking: call off the async runtime.
    pub fn reload_policies(&self, dir: &Path) {
        let current = self.policies();
        let outcome = crate::policy::reload::reload(dir, &current);
        let now = self.clock.now().unix_timestamp();
        for c in &outcome.changes {
            tracing::info!(
                agreement = %c.id,
                change = c.kind.as_str(),
                old = c.old_hash.as_deref().unwrap_or("-"),
                new = c.new_hash.as_deref().unwrap_or("-"),
                "policy reloaded"
            );
            let event = Event {
                org: OPERATOR.into(),
                agreement: c.id.clone(),
                policy_hash: c
                    .new_hash
                    .clone()
                    .or(c.old_hash.clone())
                    .unwrap_or_default(),
                action: "policy_reload",
                accepted: true,
                subject: Some(format!(
                    "{} {} -> {}",
                    c.kind.as_str(),
                    c.old_hash.as_deref().unwrap_or("none"),
                    c.new_hash.as_deref().unwrap_or("none")
                )),
                ..Event::default()
            };
            if let Err(e) = self.audit.append(event, now) {
                tracing::error!(error = %e, "auditing a policy reload");
            }
        }
        let mut messages = Vec::new();
        for e in &outcome.errors {
            for line in e.to_string().lines() {
                tracing::warn!(problem = %line, "policy file refused; the last good policy stays in force");
                messages.push(line.to_string());
            }
            let agreement = e
                .file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let event = Event {
                org: OPERATOR.into(),
                policy_hash: current
                    .get(&agreement)
                    .map(|p| p.hash().to_hex())
                    .unwrap_or_default(),
                agreement,
                action: "policy_reload",
                accepted: false,
                rule: Some("policy.invalid".into()),
                subject: e.file.file_name().map(|n| n.to_string_lossy().into_owned()),
                ..Event::default()
            };
            if let Err(e) = self.audit.append(event, now) {
                tracing::error!(error = %e, "auditing a refused policy reload");
            }
        }
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(outcome.set);
        self.query_tables.clear();
        let mut status = self.reload.lock().unwrap_or_else(|e| e.into_inner());
        status.reloads += 1;
        if !outcome.errors.is_empty() {
            status.failures += 1;
        }
        status.last_at = Some(now);
        status.last_errors = messages;
    }

    /// The lock of one dataset's versions; blocking, for blocking threads.
    pub(crate) fn dataset_lock(&self, agreement: &str, dataset: &str) -> Arc<std::sync::Mutex<()>> {
        let key = format!("{agreement}/{dataset}");
        Arc::clone(
            self.dataset_locks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_default(),
        )
    }

    pub(crate) fn query_limits(&self) -> crate::query::QueryLimits {
        self.query_limits
    }

    pub(crate) fn query_gate(&self) -> &queries::QueryGate {
        &self.query_gate
    }

    pub(crate) fn blinding_jobs(&self) -> &blinding::Jobs {
        &self.blinding_jobs
    }

    pub(crate) fn query_tables(&self) -> &queries::TableCache {
        &self.query_tables
    }

    /// What follows a change of an agreement's current data (a commit, an
    /// erasure, a completed blinding): its tables leave memory at once, and
    /// the background matcher matches and loads the new versions.
    pub(crate) fn versions_changed(&self, agreement: &str) {
        self.query_tables.forget(agreement);
        self.match_soon(agreement);
    }

    /// Asks the background matcher to match the agreement's current
    /// versions now, after a commit, rather than at the next overlap.
    pub(crate) fn match_soon(&self, agreement: &str) {
        if let Some(tx) = self
            .match_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(agreement.to_string());
        }
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Appends to the audit log; a failure to audit is our fault and fails
    /// the call, so nothing happens unaudited.
    pub(crate) fn audit(&self, event: Event) -> Result<(), crate::error::ServiceError> {
        self.audit
            .append(event, self.clock.now().unix_timestamp())
            .map(|_| ())
            .map_err(Into::into)
    }

    /// Audits a call's outcome: `event` names who, what and where; this adds
    /// the policy hash, the decision and the rule, and `details` fills in
    /// what an accepted call produced.
    pub(crate) fn audit_outcome<T>(
        &self,
        mut event: Event,
        outcome: &Result<T, crate::error::ServiceError>,
        details: impl FnOnce(&T, &mut Event),
    ) -> Result<(), crate::error::ServiceError> {
        let policies = self.policies();
        let Some(policy) = policies
            .get(&event.agreement)
            .filter(|p| p.party(&event.org).is_some())
        else {
            // Not the agreement's business: an outsider must not be able
            // to grow a log the parties read. The operator sees it.
            tracing::info!(
                org = %event.org,
                agreement = %short(&event.agreement),
                action = event.action,
                rule = %outcome.as_ref().err().map(ServiceError::rule).unwrap_or_default(),
                "refused a caller who is not party to the agreement"
            );
            return Ok(());
        };
        event.policy_hash = policy.hash().to_hex();
        event.accepted = outcome.is_ok();
        match outcome {
            Ok(value) => details(value, &mut event),
            Err(e) => {
                event.rule = Some(e.rule());
                // A refused request's subject is kept only if it names a
                // dataset of the agreement, never as the caller typed it.
                event.subject = event.subject.filter(|s| policy.dataset(s).is_some());
            }
        }
        self.audit(event)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The policies in force now. A snapshot: a call sees one consistent set.
    pub fn policies(&self) -> Arc<PolicySet> {
        Arc::clone(&self.policies.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The agreement `id` if `org` is a party to it; NOT_FOUND otherwise,
    /// exactly as for an agreement that does not exist.
    pub(crate) fn agreement_for(
        &self,
        org: &str,
        id: &str,
    ) -> Result<Arc<crate::policy::Policy>, crate::error::ServiceError> {
        bounded_name("agreement_id", id)?;
        self.policies()
            .get(id)
            .filter(|p| p.party(org).is_some())
            .map(Arc::clone)
            .ok_or_else(|| crate::error::ServiceError::AgreementNotFound(id.to_string()))
    }
}

/// Longest agreement id, dataset name or other name a request may carry.
pub const MAX_NAME: usize = 128;

/// Refuses a name longer than [`MAX_NAME`], before anything is looked up,
/// logged or written; the refusal does not repeat it.
pub(crate) fn bounded_name(field: &'static str, value: &str) -> Result<(), ServiceError> {
    if value.len() > MAX_NAME {
        return Err(ServiceError::InvalidArgument {
            field,
            rule: format!("must be at most {MAX_NAME} bytes"),
        });
    }
    Ok(())
}

/// A caller's text as logs may carry it: at most 64 characters.
pub(crate) fn short(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// The organisation name audit entries carry for the server's own acts.
pub const OPERATOR: &str = "(operator)";

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
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Sets the health of the whole server ("") and of every service.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    use tonic::server::NamedService;
    for service in [
        "",
        <AgreementsServer<AgreementsService> as NamedService>::NAME,
        <DatasetsServer<DatasetsService> as NamedService>::NAME,
        <MatchingServer<MatchingService> as NamedService>::NAME,
        <QueriesServer<QueriesService> as NamedService>::NAME,
        <AuditServer<AuditService> as NamedService>::NAME,
        <GovernanceServer<GovernanceService> as NamedService>::NAME,
        <arrow_flight::flight_service_server::FlightServiceServer<flight::FlightSqlEndpoint> as NamedService>::NAME,
    ] {
        reporter.set_service_status(service, status).await;
    }
}

/// Settles the budget charges a crash left pending. Each stays spent (its
/// answer may have left the server). A charge without an audit entry first
/// gets one, decision "interrupted", so the audit log accounts for every
/// epsilon the ledger holds.
fn settle_interrupted(
    store: &Store,
    audit: &AuditLog,
    policies: &PolicySet,
    now: i64,
) -> Result<(), ServerError> {
    let pending = store.pending_charges()?;
    if pending.is_empty() {
        return Ok(());
    }
    let audited = audit.query_ids()?;
    for c in pending {
        if !audited.contains(&c.query) {
            let event = Event {
                org: c.org.clone(),
                agreement: c.agreement.clone(),
                policy_hash: policies
                    .get(&c.agreement)
                    .map(|p| p.hash().to_hex())
                    .unwrap_or_default(),
                action: "query",
                rule: Some("privacy.budget".into()),
                epsilon: Some(crate::privacy::from_micros(c.micros)),
                delta: (c.delta_units > 0).then(|| crate::storage::delta_from_units(c.delta_units)),
                query_id: Some(c.query.clone()),
                interrupted: true,
                ..Event::default()
            };
            audit.append(event, now)?;
        }
        store.settle(&c.query)?;
        tracing::warn!(
            agreement = %c.agreement,
            org = %c.org,
            "a query interrupted by a stop kept its budget charge"
        );
    }
    Ok(())
}

/// Runs the server on `listener` until `shutdown` resolves. Then health
/// turns NOT_SERVING, and after the grace period the server stops accepting
/// calls and waits for in-flight ones to finish.
pub async fn serve(
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let policies = crate::policy::load_dir(&options.policies_dir).map_err(ServerError::Policies)?;
    let tls = tls::server_config(&options.tls)?;
    let store = Store::open(&options.data_dir, options.master_key.as_deref())?;
    let local_addr: SocketAddr = listener.local_addr().map_err(|source| ServerError::Io {
        path: PathBuf::from("(listener)"),
        source,
    })?;
    let audit = AuditLog::open(&options.data_dir)?;
    settle_interrupted(
        &store,
        &audit,
        &policies,
        options.clock.now().unix_timestamp(),
    )?;
    let held = store.clone();
    let state = AppState::new(
        policies,
        Arc::clone(&options.clock),
        store,
        options.limits,
        audit,
    )
    .with_query_limits(options.query_limits)
    .with_deletion(options.deletion);

    let background = spawn_background(&state, &options);
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
    let closed = Arc::clone(&state.closed);
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
        .add_service(AgreementsServer::new(AgreementsService::new(state.clone())))
        .add_service(DatasetsServer::new(DatasetsService::new(state.clone())))
        .add_service(MatchingServer::new(MatchingService::new(state.clone())))
        .add_service(QueriesServer::new(QueriesService::new(state.clone())))
        .add_service(GovernanceServer::new(GovernanceService::new(state.clone())))
        .add_service(AuditServer::new(AuditService::new(state.clone())))
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
    // Calls still running past the drain commit nothing from here on.
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
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

/// The server's own work between calls: re-reading the policy folder when
/// it changes, and deleting data retention and expiry no longer allow.
fn spawn_background(state: &AppState, options: &ServerOptions) -> Background {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let maintenance = {
        let state = state.clone();
        let every = options.maintenance_interval;
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                // Run to the end even when asked to stop: the blocking work
                // holds the store, which must be free once `serve` returns.
                let s = state.clone();
                match tokio::task::spawn_blocking(move || s.run_maintenance()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "retention and expiry"),
                    Err(e) => tracing::error!(error = %e, "retention and expiry"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
            }
        })
    };
    let matcher = spawn_matcher(state, stop.subscribe());
    let scrub = {
        let state = state.clone();
        let Scrub {
            every,
            bytes_per_second,
        } = options.scrub;
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                let (s, flag) = (state.clone(), stopped.clone());
                let pass = tokio::task::spawn_blocking(move || {
                    s.run_scrub(bytes_per_second, &|| *flag.borrow())
                })
                .await;
                match pass {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => {
                        tracing::error!(versions = n, "scrub found damaged dataset versions")
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "scrub"),
                    Err(e) => tracing::error!(error = %e, "scrub"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
            }
        })
    };
    let state = state.clone();
    let dir = options.policies_dir.clone();
    let poll = options.policy_poll;
    let mut stopped = stopped;
    let reload = tokio::spawn(async move {
        let mut last = crate::policy::reload::folder_digest(&dir);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = stopped.changed() => break,
            }
            let digest = crate::policy::reload::folder_digest(&dir);
            if digest != last {
                last = digest;
                let (s, d) = (state.clone(), dir.clone());
                if let Err(e) = tokio::task::spawn_blocking(move || s.reload_policies(&d)).await {
                    tracing::error!(error = %e, "re-reading the policy folder");
                }
            }
        }
    });
    Background {
        stop,
        tasks: vec![maintenance, reload, matcher, scrub],
    }
}

/// How long the background matcher lets running queries go first before
/// it stores the tables it matched.
const STORE_TABLES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Matches agreements' current versions in the background as they are
/// committed, so that an overlap request finds its count recorded. Each run
/// finishes before the task stops: the store must be free once `serve`
/// returns.
fn spawn_matcher(
    state: &AppState,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    *state.match_queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                got = rx.recv() => match got {
                    Some(a) => a,
                    None => break,
                },
                _ = stopped.changed() => break,
            };
            let mut agreements = std::collections::BTreeSet::from([first]);
            while let Ok(more) = rx.try_recv() {
                agreements.insert(more);
            }
            for agreement in agreements {
                let s = state.clone();
                let run =
                    tokio::task::spawn_blocking(move || matching::match_agreement(&s, &agreement));
                let loaded = match run.await {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::error!(error = %e, "background matching");
                        None
                    }
                };
                let Some((policy, loaded)) = loaded else {
                    continue;
                };
                queries_first(&state, &stopped).await;
                let s = state.clone();
                let run = tokio::task::spawn_blocking(move || {
                    matching::save_tables(&s, &policy, &loaded)
                });
                match run.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "storing matched tables failed; the next start matches again")
                    }
                    Err(e) => tracing::error!(error = %e, "storing matched tables"),
                }
            }
        }
    })
}

/// Waits, before the matcher stores tables, until no query runs: storing
/// only spares the next start a matching, while a query waiting now (the
/// first after a commit) should have the cores. At most
/// [`STORE_TABLES_WAIT`], and not once the server stops.
async fn queries_first(state: &AppState, stopped: &tokio::sync::watch::Receiver<bool>) {
    let waited = tokio::time::Instant::now();
    while !state.query_gate().idle() && waited.elapsed() < STORE_TABLES_WAIT && !*stopped.borrow() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Background tasks, stopped with the server.
#[derive(Debug)]
struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Stops the tasks between two runs and waits until they are gone, so
    /// nothing holds the data directory once `serve` returns. (Aborting
    /// would not do: a blocking run goes on after its task is aborted.)
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
