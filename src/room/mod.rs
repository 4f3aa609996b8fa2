//! The application: what the clean room does, whatever the wire.
//!
//! Every use case lives here: access to an agreement, uploads and
//! erasures, blinding jobs, matching, the table cache, governed questions,
//! the budget, the governance views, and the work between calls. Nothing
//! here names gRPC or the protobuf types; the transport in `server/`
//! decodes a call, asks the room, and encodes the answer
//! (`docs/architecture.md`).

mod ask;
mod background;
mod blinding;
mod budget;
mod datasets;
mod error;
mod gate;
pub mod governance;
mod locks;
mod matching;
pub(crate) mod metrics;
mod tables;
mod upkeep;

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::audit::{AuditLog, Event};
use crate::clock::Clock;
use crate::policy::{AgreementState, Policy, PolicySet};
use crate::storage::Store;
use crate::upload::Limits;

pub use ask::{Ask, DryRun, Governed};
pub(crate) use background::{Every, spawn_background};
pub use blinding::{Blinded, Work};
pub use budget::{SettleError, Spent, settle_interrupted};
pub use datasets::{EraseAsk, Erased, Held, HeldState, Upload, UploadHeader, Uploaded};
pub use error::RoomError;
pub use matching::{Overlap, OverlapAsk};
pub use upkeep::{Deletion, Scrub};

/// A stream from the caller (an upload, a blinding) that broke before its
/// end; the transport logs why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Broken;

/// The clean room: the agreements in force, the store, the audit log and
/// everything the use cases share. Cheap to clone; clones share all.
#[derive(Debug, Clone)]
pub struct Room {
    policies: Arc<RwLock<Arc<PolicySet>>>,
    clock: Arc<dyn Clock>,
    store: Store,
    limits: Limits,
    query_limits: crate::query::QueryLimits,
    query_gate: Arc<gate::QueryGate>,
    audit: AuditLog,
    query_tables: tables::TableCache,
    blinding_jobs: blinding::Jobs,
    /// Agreements whose overlaps to match ahead of the next request, for
    /// the background matcher (none attached outside `serve`).
    match_queue: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<String>>>>,
    reload: Arc<Mutex<ReloadStatus>>,
    /// One lock per dataset, held while a version is committed and for a
    /// whole erasure, so neither loses the other's version.
    dataset_locks: locks::DatasetLocks,
    metrics: Arc<metrics::Metrics>,
    deletion: Deletion,
    /// Set at the drain deadline: no upload or erasure commits after it.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The time at which deletion was last found paused for a clock
    /// jump, so each pause is audited once.
    paused_at: Arc<Mutex<Option<i64>>>,
    /// Workers the private stage may run on, if any.
    cluster: Option<Arc<crate::cluster::Cluster>>,
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

impl Room {
    pub fn new(
        policies: PolicySet,
        clock: Arc<dyn Clock>,
        store: Store,
        limits: Limits,
        audit: AuditLog,
    ) -> Self {
        Room {
            policies: Arc::new(RwLock::new(Arc::new(policies))),
            clock,
            store,
            limits,
            query_limits: crate::query::QueryLimits::default(),
            query_gate: Arc::new(gate::QueryGate::new(crate::query::QueryLimits::default())),
            audit,
            query_tables: tables::TableCache::default(),
            blinding_jobs: blinding::Jobs::default(),
            match_queue: Arc::default(),
            reload: Arc::default(),
            dataset_locks: locks::DatasetLocks::default(),
            metrics: Arc::default(),
            deletion: Deletion::default(),
            closed: Arc::default(),
            paused_at: Arc::default(),
            cluster: None,
        }
    }

    /// The same room running the private stage of queries on `cluster`'s
    /// workers.
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Self {
        self.query_tables = tables::TableCache::new(
            self.query_limits.table_cache_bytes,
            Some(Arc::clone(&cluster)),
        );
        self.cluster = Some(cluster);
        self
    }

    /// The workers, if any.
    pub(crate) fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// The same room with these rules for deletion.
    pub fn with_deletion(mut self, deletion: Deletion) -> Self {
        self.deletion = deletion;
        self
    }

    /// Refuses once the server has passed its drain deadline: a call still
    /// running then commits nothing.
    pub(crate) fn still_open(&self) -> Result<(), RoomError> {
        match self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(RoomError::Stopping),
            false => Ok(()),
        }
    }

    /// Closes the room at the server's drain deadline: a call still running
    /// then commits nothing.
    pub(crate) fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// What the room counts for the operator's metrics.
    pub(crate) fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// The metrics as Prometheus text, with the values kept elsewhere
    /// read now. Blocking (it sizes the data directory).
    pub(crate) fn metrics_text(&self) -> String {
        let tables = self.query_tables();
        self.metrics.render(
            self.reload_status().failures,
            self.store().root(),
            (tables.len(), tables.rows()),
            self.cluster.as_ref().map(|c| c.figures()),
        )
    }

    /// The same room with these query limits.
    pub fn with_query_limits(mut self, limits: crate::query::QueryLimits) -> Self {
        self.query_limits = limits;
        self.query_gate = Arc::new(gate::QueryGate::new(limits));
        self.query_tables = tables::TableCache::new(limits.table_cache_bytes, self.cluster.clone());
        self
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload.lock().clone()
    }

    /// The lock of one dataset's versions; blocking, for blocking threads.
    pub(crate) fn dataset_lock(&self, agreement: &str, dataset: &str) -> locks::Lock {
        self.dataset_locks.of(agreement, dataset)
    }

    pub(crate) fn query_limits(&self) -> crate::query::QueryLimits {
        self.query_limits
    }

    pub(crate) fn query_gate(&self) -> &gate::QueryGate {
        &self.query_gate
    }

    pub(crate) fn blinding_jobs(&self) -> &blinding::Jobs {
        &self.blinding_jobs
    }

    pub(crate) fn query_tables(&self) -> &tables::TableCache {
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
        if let Some(tx) = self.match_queue.lock().as_ref() {
            let _ = tx.send(agreement.to_string());
        }
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Appends to the audit log; a failure to audit is our fault and fails
    /// the call, so nothing happens unaudited.
    pub(crate) fn audit(&self, event: Event) -> Result<(), RoomError> {
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
        outcome: &Result<T, RoomError>,
        details: impl FnOnce(&T, &mut Event),
    ) -> Result<(), RoomError> {
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
                rule = %outcome.as_ref().err().map(RoomError::rule).unwrap_or_default(),
                "refused a caller who is not party to the agreement"
            );
            return Ok(());
        };
        event.policy_hash = policy.hash().to_hex();
        event.accepted = outcome.is_ok();
        match outcome {
            Ok(value) => details(value, &mut event),
            Err(e) => {
                event.rule = Some(e.rule().into());
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
        Arc::clone(&self.policies.read())
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The agreement `id` if `org` is a party to it; NOT_FOUND otherwise,
    /// exactly as for an agreement that does not exist.
    pub(crate) fn agreement_for(&self, org: &str, id: &str) -> Result<Arc<Policy>, RoomError> {
        bounded_name("agreement_id", id)?;
        self.policies()
            .get(id)
            .filter(|p| p.party(org).is_some())
            .map(Arc::clone)
            .ok_or_else(|| RoomError::AgreementNotFound(id.to_string()))
    }

    /// The agreement, if `org` is a party to it, and only while it is in
    /// force.
    pub(crate) fn agreement_in_force(&self, org: &str, id: &str) -> Result<Arc<Policy>, RoomError> {
        let policy = self.agreement_for(org, id)?;
        match self.policies().state_of(&policy, self.clock().today()) {
            AgreementState::Active => Ok(policy),
            other => Err(RoomError::NotInForce {
                id: id.to_string(),
                state: other.as_str(),
            }),
        }
    }
}

/// Longest agreement id, dataset name or other name a request may carry.
pub const MAX_NAME: usize = 128;

/// Refuses a name longer than [`MAX_NAME`], before anything is looked up,
/// logged or written; the refusal does not repeat it.
pub(crate) fn bounded_name(field: &'static str, value: &str) -> Result<(), RoomError> {
    if value.len() > MAX_NAME {
        return Err(RoomError::invalid(
            field,
            format!("must be at most {MAX_NAME} bytes"),
        ));
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
