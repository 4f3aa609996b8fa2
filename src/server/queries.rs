//! The `Queries` service: governed aggregate SQL over the agreement's data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use super::budget::{Charged, epsilon_for, no_epsilon, privacy_report};
use super::datasets::agreement_in_force;
use super::matching::{LoadTimes, link_versions, read_side_by_side};
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{Policy, QueryMode, Right};
use crate::privacy::NoiseSource;
use crate::proto;
use crate::proto::query_response::Part;
use crate::query::{QueryError, QueryLimits, QueryOutcome, TableData};
use crate::storage::VersionInfo;

/// One agreement's tables and the versions (and policy) they were built from.
#[derive(Debug)]
struct Cached {
    key: Vec<String>,
    tables: Arc<Vec<TableData>>,
    /// Memory the tables hold, for the cache's budget.
    bytes: u64,
    /// Whether the versions were still current once loaded.
    current: bool,
}

impl Loaded {
    /// The datasets with data.
    pub(crate) fn present(&self) -> Vec<&str> {
        self.versions
            .iter()
            .flatten()
            .map(|v| v.dataset.as_str())
            .collect()
    }
}

/// The form of the query tables, part of what stored tables were built
/// from: tables stored in another form are matched again, never misread.
const TABLES_FORMAT: &str = "query tables v2: dense keys, dictionary dimensions";

/// An agreement's query tables and what they were built from.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) tables: Arc<Vec<TableData>>,
    /// The versions (in the policy's dataset order, "" where none), the
    /// policy hash and the tables' form.
    pub(crate) key: Vec<String>,
    /// The versions the tables hold rows of, in the policy's dataset order.
    pub(crate) versions: Vec<Option<crate::storage::VersionInfo>>,
    /// This call matched them from the versions (rather than finding them
    /// in memory or in the store).
    pub(crate) matched_now: bool,
}

/// Decrypted and matched tables per agreement, kept while the datasets'
/// current versions stay the same, within a memory budget (least recently
/// used agreements leave first). An agreement is loaded once at a time: a
/// caller arriving during a load waits for it instead of decrypting the
/// same data again.
#[derive(Clone)]
pub(crate) struct TableCache {
    inner: moka::sync::Cache<String, Arc<Cached>>,
}

impl std::fmt::Debug for TableCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableCache")
            .field("agreements", &self.len())
            .finish()
    }
}

impl Default for TableCache {
    fn default() -> Self {
        TableCache::new(QueryLimits::default().table_cache_bytes)
    }
}

impl TableCache {
    /// A cache holding at most `budget` bytes of tables.
    pub(crate) fn new(budget: u64) -> Self {
        // Weights in KiB, so one entry can weigh up to 4 TiB.
        let inner = moka::sync::Cache::builder()
            .max_capacity((budget / 1024).max(1))
            .weigher(|_: &String, c: &Arc<Cached>| {
                u32::try_from(c.bytes / 1024).unwrap_or(u32::MAX).max(1)
            })
            .build();
        TableCache { inner }
    }

    /// The agreement's tables for its current versions, loading and
    /// matching them if they changed. Blocking: call off the async runtime.
    pub(crate) fn tables(&self, state: &AppState, policy: &Policy) -> Result<Loaded, ServiceError> {
        let store = state.store();
        let mut versions = Vec::new();
        for d in policy.datasets() {
            let v = store.current(policy.id(), d.name())?;
            // Never compare rows made under two salts.
            if let Some(v) = &v
                && !policy.made_now(d, &v.form)
            {
                return Err(ServiceError::NeedsUpload(d.name().to_string()));
            }
            versions.push(v);
        }
        // Under matching = "ecdh" a version the partner has not blinded yet
        // cannot be matched: it is left out, as if not uploaded. So is a
        // damaged one: queries that do not read it still answer.
        for v in versions.iter_mut() {
            if let Some(info) = v
                && (store.is_damaged(info)? || !super::blinding::is_matchable(store, policy, info)?)
            {
                *v = None;
            }
        }
        let key: Vec<String> = versions
            .iter()
            .map(|v| v.as_ref().map(|v| v.version.clone()).unwrap_or_default())
            .chain([policy.hash().to_hex(), TABLES_FORMAT.to_string()])
            .collect();
        let matched_now = std::cell::Cell::new(false);
        let loaded = |tables: &Arc<Vec<TableData>>| Loaded {
            tables: Arc::clone(tables),
            key: key.clone(),
            versions: versions.clone(),
            matched_now: matched_now.get(),
        };
        match self.inner.get(policy.id()) {
            Some(cached) if cached.key == key => return Ok(loaded(&cached.tables)),
            Some(_) => self.inner.invalidate(policy.id()),
            None => {}
        }
        let load = || -> Result<Arc<Cached>, ServiceError> {
            let tables = match self.stored(state, policy, &key) {
                Some(tables) => tables,
                None => {
                    matched_now.set(true);
                    self.matched(state, policy, &versions)?
                }
            };
            let bytes = tables.iter().map(held_bytes).sum();
            // An erasure or a new version committed while these were
            // loading has already dropped the agreement's entry; these rows
            // must not come back into memory with it.
            let mut current = true;
            for (d, v) in policy.datasets().iter().zip(&versions) {
                let now = store.current(policy.id(), d.name())?;
                current &= now.map(|n| n.version) == v.as_ref().map(|v| v.version.clone());
            }
            Ok(Arc::new(Cached {
                key: key.clone(),
                tables: Arc::new(tables),
                bytes,
                current,
            }))
        };
        let cached = self
            .inner
            .try_get_with(policy.id().to_string(), load)
            .map_err(|e| {
                Arc::try_unwrap(e).unwrap_or_else(|e| ServiceError::Internal(e.to_string()))
            })?;
        // Evict now, not at some later call, if the budget is exceeded.
        self.inner.run_pending_tasks();
        if !cached.current || cached.key != key {
            // Not kept: stale, or another caller's load of other versions.
            self.inner.invalidate(policy.id());
            if cached.key != key {
                return Ok(loaded(&load()?.tables));
            }
        }
        Ok(loaded(&cached.tables))
    }

    /// The tables stored by an earlier matching of exactly `key`, if any.
    fn stored(&self, state: &AppState, policy: &Policy, key: &[String]) -> Option<Vec<TableData>> {
        let store = state.store();
        let started = std::time::Instant::now();
        let tables = match store.matched_tables(policy.id(), key) {
            Ok(stored) => crate::query::tables_from_matched(policy, stored?),
            Err(e) => {
                tracing::warn!(error = %e, "reading matched tables failed");
                None
            }
        };
        match &tables {
            Some(t) => {
                state.metrics().matched_tables_read();
                tracing::info!(
                    agreement = policy.id(),
                    rows = t.iter().map(|t| t.person_of_row.len()).sum::<usize>(),
                    read_ms = started.elapsed().as_millis() as u64,
                    "query tables read from the store"
                );
            }
            None => {
                // Damaged, gone or of another form: matched again, and
                // stored afresh by the background matcher.
                tracing::warn!("stored matched tables are not usable; matching again");
                if let Err(e) = store.drop_matched_tables(policy.id()) {
                    tracing::warn!(error = %e, "removing unusable matched tables failed");
                }
            }
        }
        tables
    }

    /// The tables of `versions`, read and matched ([`read_and_match`]).
    fn matched(
        &self,
        state: &AppState,
        policy: &Policy,
        versions: &[Option<VersionInfo>],
    ) -> Result<Vec<TableData>, ServiceError> {
        let (tables, took) = read_and_match(state.store(), policy, versions)?;
        state.metrics().tables_loaded();
        tracing::info!(
            agreement = policy.id(),
            rows = tables.iter().map(|t| t.person_of_row.len()).sum::<usize>(),
            read_ms = took.read.as_millis() as u64,
            match_ms = took.matching.as_millis() as u64,
            "query tables matched"
        );
        Ok(tables)
    }

    /// Drops an agreement's tables from memory at once: after an erasure,
    /// a retention run or a new version, what they hold is stale.
    pub(crate) fn forget(&self, agreement: &str) {
        self.inner.invalidate(agreement);
        self.inner.run_pending_tasks();
    }

    /// Drops every agreement's tables (after a policy reload).
    pub(crate) fn clear(&self) {
        let agreements: Vec<Arc<String>> = self.inner.iter().map(|(k, _)| k).collect();
        for a in agreements {
            self.inner.invalidate(a.as_str());
        }
        self.inner.run_pending_tasks();
    }

    /// Agreements whose tables are in memory.
    pub(crate) fn len(&self) -> usize {
        self.inner.iter().count()
    }

    /// Rows of the tables in memory.
    pub(crate) fn rows(&self) -> u64 {
        self.inner
            .iter()
            .map(|(_, c)| {
                c.tables
                    .iter()
                    .map(|t| t.person_of_row.len() as u64)
                    .sum::<u64>()
            })
            .sum()
    }
}

/// The bytes a table's rows take, for the cache's budget: what each
/// column's values use. (An Arrow array's own memory size counts the whole
/// allocation it points into, which columns decoded from one stored chunk
/// share; summed over columns, it would count that chunk once per column.)
fn held_bytes(t: &TableData) -> u64 {
    let columns: u64 = t
        .batches
        .iter()
        .flat_map(|b| b.columns())
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size()) as u64
        })
        .sum();
    // Two person numbers per row: across parties, and the owner's own.
    columns + 8 * t.person_of_row.len() as u64
}

/// Implements `cleanroom.v1.Queries`.
#[derive(Debug, Clone)]
pub struct QueriesService {
    state: AppState,
}

impl QueriesService {
    pub fn new(state: AppState) -> Self {
        QueriesService { state }
    }

    /// The answer, and the budget charge it keeps: under differential
    /// privacy a query is charged once its data has been read, whether it
    /// then succeeds or fails.
    async fn answer(
        &self,
        org: &str,
        request: &proto::QueryRequest,
        resolved: &Resolved,
    ) -> (Result<Answer, ServiceError>, Option<Charged>) {
        let limits = self.state.query_limits();
        let deadline = tokio::time::Instant::now() + limits.timeout;
        // Queries at once: refused before anything is read, so never charged.
        let _permits = match self.state.query_gate().enter(org) {
            Ok(p) => p,
            Err(e) => return (Err(e), None),
        };
        let _running = self.state.metrics().query_running();
        let planned =
            match tokio::time::timeout_at(deadline, self.plan(org, request, resolved)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return (Err(e), None),
                Err(_) => return (Err(timed_out(&limits)), None),
            };
        let Planned {
            policy,
            ctx,
            plan,
            checked,
            one_row_per_person,
        } = planned;
        let Some(privacy) = policy.privacy() else {
            let run = crate::query::execute(&policy, ctx, plan, checked, one_row_per_person);
            let run = by_deadline(deadline, &limits, run)
                .await
                .map(|outcome| Answer {
                    policy: Arc::clone(&policy),
                    outcome,
                })
                .map_err(query_error);
            return (run, None);
        };
        let epsilon = match epsilon_for(privacy, request.epsilon) {
            Ok(e) => e,
            Err(e) => return (Err(e), None),
        };
        let noise_plan = match crate::query::private::plan(&policy, &checked, epsilon) {
            Ok(p) => p,
            Err(v) => return (Err(ServiceError::QueryRefused(v)), None),
        };
        let unit = match crate::query::private::bounding_unit(&policy, org, &plan) {
            Ok(u) => u,
            Err(v) => return (Err(ServiceError::QueryRefused(v)), None),
        };
        let rng = match NoiseSource::from_os() {
            Ok(rng) => rng,
            Err(_) => {
                let e = ServiceError::Internal("the system random source failed".into());
                return (Err(e), None);
            }
        };
        let charged = match self
            .state
            .charge_budget(org, &policy, privacy, epsilon)
            .await
        {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        };
        let run = crate::query::private::execute(
            ctx,
            plan,
            checked,
            &noise_plan,
            unit,
            one_row_per_person,
            rng,
        );
        // Past the deadline the data has been read: the charge stays.
        let run = by_deadline(deadline, &limits, run).await;
        match run {
            Ok(outcome) => (
                Ok(Answer {
                    policy: Arc::clone(&policy),
                    outcome,
                }),
                Some(charged),
            ),
            Err(e) if e.before_data() => {
                self.state.refund_budget(&charged.charge.query).await;
                (Err(query_error(e)), None)
            }
            Err(e) => (Err(query_error(e)), Some(charged)),
        }
    }

    /// Runs one governed query of `org` and audits it: the `Query` RPC and
    /// Flight SQL both come here, so both answer and refuse alike.
    pub(crate) async fn governed(
        &self,
        org: &str,
        request: &proto::QueryRequest,
    ) -> Result<Governed, ServiceError> {
        let (resolved, (outcome, charge)) = match resolve(&self.state, org, request) {
            Ok(r) => {
                let answered = self.answer(org, request, &r).await;
                (Some(r), answered)
            }
            Err(e) => (None, (Err(e), None)),
        };
        let event = Event {
            // A charge stays with the query whether it answered or failed
            // after reading data; the audit log records it either way.
            epsilon: charge.as_ref().map(|c| c.epsilon),
            delta: charge
                .as_ref()
                .map(|c| crate::storage::delta_from_units(c.charge.delta_units)),
            query_id: charge.as_ref().map(|c| c.charge.query.clone()),
            ..query_event(org, request, resolved.as_ref())
        };
        let sql_hash = event.sql_hash.clone().unwrap_or_default();
        let audited = self.state.audit_outcome(event, &outcome, |a, e| {
            // The policy the query ran under, even if a reload replaced it since.
            e.policy_hash = a.policy.hash().to_hex();
            e.subject = Some(a.outcome.checked.datasets.join(" x "));
            e.rows = Some(a.outcome.rows());
        });
        self.state.finish_charge(charge.as_ref(), &audited).await;
        audited?;
        if let Err(e) = &outcome {
            self.state.metrics().refused(e.rule());
        }
        let Answer { policy, outcome } = outcome?;
        let privacy = match (&outcome.privacy, &charge) {
            (Some(r), Some(c)) => Some(privacy_report(r, c)),
            _ => None,
        };
        let (template, params_hash) = resolved
            .map(|r| (r.template, r.params_hash))
            .unwrap_or_default();
        Ok(Governed {
            policy,
            outcome,
            privacy,
            sql_hash,
            template,
            params_hash,
        })
    }

    /// Checks a query of `org` without reading any row: the schema its
    /// answer will have, and under privacy the noise it will carry. A
    /// refusal is audited as the `Query` RPC audits it; an accepted check
    /// is not (the run that follows is).
    pub(crate) async fn dry_run(
        &self,
        org: &str,
        request: &proto::QueryRequest,
    ) -> Result<DryRun, ServiceError> {
        let (resolved, checked) = match resolve(&self.state, org, request) {
            Ok(r) => {
                let checked = self.describe(org, request, &r).await;
                (Some(r), checked)
            }
            Err(e) => (None, Err(e)),
        };
        if let Err(e) = &checked {
            self.state.metrics().refused(e.rule());
            let event = query_event(org, request, resolved.as_ref());
            self.state.audit_outcome(event, &checked, |_, _| {})?;
        }
        checked
    }

    /// The schema and noise of a resolved query, planned and checked.
    async fn describe(
        &self,
        org: &str,
        request: &proto::QueryRequest,
        resolved: &Resolved,
    ) -> Result<DryRun, ServiceError> {
        let planned = self.plan(org, request, resolved).await?;
        let noise = match planned.policy.privacy() {
            Some(privacy) => {
                let epsilon = epsilon_for(privacy, request.epsilon)?;
                let plan = crate::query::private::plan(&planned.policy, &planned.checked, epsilon)
                    .map_err(ServiceError::QueryRefused)?;
                Some(plan.report())
            }
            None => None,
        };
        Ok(DryRun {
            schema: Arc::new(planned.plan.schema().as_arrow().clone()),
            policy: planned.policy,
            noise,
        })
    }

    /// Everything before any data is read: rights, the SQL's size, the
    /// check, and that every dataset it reads has an upload.
    async fn plan(
        &self,
        org: &str,
        request: &proto::QueryRequest,
        resolved: &Resolved,
    ) -> Result<Planned, ServiceError> {
        let (policy, sql) = (Arc::clone(&resolved.policy), resolved.sql.as_str());
        for right in [Right::Query, Right::ReceiveResults] {
            if !policy.allows(org, right) {
                return Err(ServiceError::PermissionDenied {
                    rule: "party.rights",
                    detail: format!(
                        "{org} lacks {:?} in agreement {}",
                        right.as_str(),
                        policy.id()
                    ),
                });
            }
        }
        if sql.len() > 64 * 1024 {
            return Err(ServiceError::InvalidArgument {
                field: "sql",
                rule: "must be at most 64 KiB".into(),
            });
        }
        if policy.privacy().is_none() {
            no_epsilon(&policy, request.epsilon)?;
        }
        let (state, p) = (self.state.clone(), Arc::clone(&policy));
        let loaded = tokio::task::spawn_blocking(move || state.query_tables().tables(&state, &p))
            .await
            .map_err(|e| ServiceError::Internal(format!("loading tables: {e}")))??;
        if loaded.matched_now {
            // The background matcher stores them for the next start.
            self.state.match_soon(policy.id());
        }
        let present = loaded.present();
        let tables = Arc::clone(&loaded.tables);
        let limits = self.state.query_limits();
        let (ctx, plan, checked) =
            crate::query::plan_and_check_with(&policy, org, &tables, sql, &limits)
                .await
                .map_err(query_error)?;
        for name in &checked.datasets {
            if !present.contains(&name.as_str()) {
                let store = self.state.store();
                return Err(match store.current(policy.id(), name)? {
                    Some(v) if store.is_damaged(&v)? => ServiceError::DatasetDamaged(name.clone()),
                    Some(_) => super::blinding::not_blinded(&policy, name),
                    None => ServiceError::NoData(name.clone()),
                });
            }
        }
        let one_row_per_person = crate::query::one_row_per_person(&tables, &checked);
        Ok(Planned {
            policy,
            ctx,
            plan,
            checked,
            one_row_per_person,
        })
    }
}

/// The SQL a request runs: its own, or an approved template's with its
/// parameters bound.
#[derive(Debug)]
struct Resolved {
    /// The agreement as it stood when the request was resolved; the query
    /// is planned under this same policy.
    policy: Arc<Policy>,
    sql: String,
    template: Option<String>,
    params_hash: Option<String>,
}

/// The audit event of a query request: what was resolved of it, if anything.
fn query_event(org: &str, request: &proto::QueryRequest, resolved: Option<&Resolved>) -> Event {
    Event {
        org: org.to_string(),
        agreement: request.agreement_id.clone(),
        action: "query",
        sql_hash: resolved.map(|r| blake3::hash(r.sql.as_bytes()).to_hex().to_string()),
        template: resolved.and_then(|r| r.template.clone()),
        params_hash: resolved.and_then(|r| r.params_hash.clone()),
        ..Event::default()
    }
}

/// Longest parameter value, in bytes.
const MAX_PARAM_VALUE: usize = 4096;

fn resolve(
    state: &AppState,
    org: &str,
    request: &proto::QueryRequest,
) -> Result<Resolved, ServiceError> {
    let policy = agreement_in_force(state, org, &request.agreement_id)?;
    if request.template.is_empty() {
        if policy.query().mode() == QueryMode::Templates {
            return Err(ServiceError::PermissionDenied {
                rule: "query.mode",
                detail: format!(
                    "agreement {} answers its approved templates only (`cleanroom templates` lists them)",
                    policy.id()
                ),
            });
        }
        if !request.params.is_empty() {
            return Err(ServiceError::InvalidArgument {
                field: "params",
                rule: "apply to templates only".into(),
            });
        }
        return Ok(Resolved {
            policy,
            sql: request.sql.clone(),
            template: None,
            params_hash: None,
        });
    }
    super::bounded_name("template", &request.template)?;
    if !request.sql.is_empty() {
        return Err(ServiceError::InvalidArgument {
            field: "sql",
            rule: "must be empty when a template is named".into(),
        });
    }
    let mut given = std::collections::BTreeMap::new();
    for (name, value) in &request.params {
        super::bounded_name("params", name)?;
        if value.len() > MAX_PARAM_VALUE {
            return Err(ServiceError::InvalidArgument {
                field: "params",
                rule: format!("a value must be at most {MAX_PARAM_VALUE} bytes"),
            });
        }
        given.insert(name.clone(), value.clone());
    }
    let template = policy
        .template(&request.template)
        .filter(|t| t.runnable_by(org))
        .ok_or_else(|| {
            let runnable = policy.templates().iter().filter(|t| t.runnable_by(org));
            let suggestion = crate::names::nearest(&request.template, runnable.map(|t| t.name()));
            ServiceError::QueryRefused(
                crate::query::Violation::deny(
                    "template.unknown",
                    format!(
                        "agreement {} has no template of that name that {org} may run{}",
                        policy.id(),
                        crate::names::did_you_mean(suggestion.as_deref())
                    ),
                )
                .about(&request.template, suggestion),
            )
        })?;
    let bound = template.bind(&given).map_err(|e| {
        let declared = template.params().iter().map(|p| p.name());
        let suggestion = match template.params().iter().any(|p| p.name() == e.param) {
            true => None,
            false => crate::names::nearest(&e.param, declared),
        };
        ServiceError::QueryRefused(
            crate::query::Violation::invalid(
                e.rule,
                format!(
                    "parameter {}: {}{}",
                    e.param,
                    e.detail,
                    crate::names::did_you_mean(suggestion.as_deref())
                ),
            )
            .about(&e.param, suggestion),
        )
    })?;
    Ok(Resolved {
        policy: Arc::clone(&policy),
        sql: bound.sql,
        template: Some(template.name().to_string()),
        params_hash: Some(bound.params_hash),
    })
}

/// The refusal of a query past its time.
fn timed_out(limits: &QueryLimits) -> ServiceError {
    match past_time(limits) {
        QueryError::Limit { rule, detail } => ServiceError::LimitExceeded { rule, detail },
        other => query_error(other),
    }
}

fn past_time(limits: &QueryLimits) -> QueryError {
    QueryError::Limit {
        rule: "query.timeout",
        detail: format!(
            "the query ran longer than {} s (query_timeout_seconds)",
            limits.timeout.as_secs_f64()
        ),
    }
}

/// Runs `work` until `deadline`, then gives it up as past its time.
async fn by_deadline<T>(
    deadline: tokio::time::Instant,
    limits: &QueryLimits,
    work: impl std::future::Future<Output = Result<T, QueryError>>,
) -> Result<T, QueryError> {
    tokio::time::timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| Err(past_time(limits)))
}

/// How many queries run at once, in all and per organisation.
#[derive(Debug)]
pub(crate) struct QueryGate {
    total: Arc<tokio::sync::Semaphore>,
    per_org: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    limits: QueryLimits,
}

/// A query's places in the gate, given back when it ends.
#[derive(Debug)]
pub(crate) struct Permits {
    _total: tokio::sync::OwnedSemaphorePermit,
    _org: tokio::sync::OwnedSemaphorePermit,
}

impl QueryGate {
    pub(crate) fn new(limits: QueryLimits) -> Self {
        QueryGate {
            total: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
            per_org: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Whether no query runs now.
    pub(crate) fn idle(&self) -> bool {
        self.total.available_permits() == self.limits.max_concurrent
    }

    /// A place for one more query of `org`, or the limit it would pass.
    pub(crate) fn enter(&self, org: &str) -> Result<Permits, ServiceError> {
        let full = |detail: String| ServiceError::LimitExceeded {
            rule: "query.concurrency",
            detail,
        };
        let org_gate = Arc::clone(
            self.per_org
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(org.to_string())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(
                        self.limits.max_concurrent_per_org,
                    ))
                }),
        );
        let org_permit = org_gate.try_acquire_owned().map_err(|_| {
            full(format!(
                "{org} already runs {} queries, the most one organisation may run at once (max_concurrent_queries_per_org); try again when one ends",
                self.limits.max_concurrent_per_org
            ))
        })?;
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| {
            full(format!(
                "the server already runs {} queries, the most it runs at once (max_concurrent_queries); try again shortly",
                self.limits.max_concurrent
            ))
        })?;
        Ok(Permits {
            _total: total,
            _org: org_permit,
        })
    }
}

/// A checked query, ready to run; nothing read yet.
struct Planned {
    policy: Arc<Policy>,
    ctx: datafusion::prelude::SessionContext,
    plan: datafusion::logical_expr::LogicalPlan,
    checked: crate::query::Checked,
    one_row_per_person: bool,
}

/// A governed query answered and audited.
#[derive(Debug)]
pub(crate) struct Governed {
    pub(crate) policy: Arc<Policy>,
    pub(crate) outcome: QueryOutcome,
    pub(crate) privacy: Option<proto::PrivacyReport>,
    pub(crate) sql_hash: String,
    pub(crate) template: Option<String>,
    pub(crate) params_hash: Option<String>,
}

/// What a check says of a query before it runs.
#[derive(Debug)]
pub(crate) struct DryRun {
    pub(crate) policy: Arc<Policy>,
    pub(crate) schema: arrow::datatypes::SchemaRef,
    pub(crate) noise: Option<crate::privacy::Report>,
}

/// A query's answer and the policy it ran under.
#[derive(Debug)]
struct Answer {
    policy: Arc<Policy>,
    outcome: QueryOutcome,
}

fn query_error(e: QueryError) -> ServiceError {
    match e {
        QueryError::Refused(v) => ServiceError::QueryRefused(v),
        QueryError::Engine(detail) => ServiceError::Internal(format!("query engine: {detail}")),
        QueryError::Output => ServiceError::QueryRefused(crate::query::output_violation()),
        QueryError::Limit { rule, detail } => ServiceError::LimitExceeded { rule, detail },
    }
}

type QueryStream = ReceiverStream<Result<proto::QueryResponse, Status>>;

#[tonic::async_trait]
impl proto::queries_server::Queries for QueriesService {
    type QueryStream = QueryStream;

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let org = caller(&request)?;
        let Governed {
            policy,
            outcome,
            privacy,
            sql_hash,
            template,
            params_hash,
        } = self.governed(&org, request.get_ref()).await?;
        let mut messages = vec![Part::Header(proto::QueryHeader {
            policy_hash: policy.hash().to_hex(),
            min_group_size: policy.query().min_group_size(),
            datasets: outcome.checked.datasets.clone(),
            privacy,
        })];
        let mut batches = outcome.batches.clone();
        if batches.is_empty() {
            batches.push(arrow::record_batch::RecordBatch::new_empty(Arc::clone(
                &outcome.schema,
            )));
        }
        for b in &batches {
            for ipc in crate::upload::encode_messages(b, crate::upload::MAX_MESSAGE_BYTES)
                .map_err(|e| ServiceError::Internal(format!("encoding a result: {e}")))?
            {
                messages.push(Part::Batch(ipc));
            }
        }
        messages.push(Part::Summary(proto::QuerySummary {
            rows: outcome.rows(),
            sql_hash,
            template: template.unwrap_or_default(),
            params_hash: params_hash.unwrap_or_default(),
        }));
        let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
        for part in messages {
            let _ = tx.try_send(Ok(proto::QueryResponse { part: Some(part) }));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn budget(
        &self,
        request: Request<proto::BudgetRequest>,
    ) -> Result<Response<proto::BudgetResponse>, Status> {
        let org = caller(&request)?;
        let policy = self
            .state
            .agreement_for(&org, &request.get_ref().agreement_id)?;
        let (store, now) = (self.state.store().clone(), self.state.clock().now());
        let view = tokio::task::spawn_blocking(move || {
            super::governance::budget_view(&store, &policy, &org, now)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("reading the budget: {e}")))?
        .map_err(ServiceError::from)?;
        Ok(Response::new(view))
    }
}

/// The query tables of `versions` (in the policy's dataset order; None
/// where a dataset has none), matched and keyed: the identifier columns are
/// linked kind by kind ([`link_versions`]), then a last pass reads the
/// other columns into the tables' form and puts the keys in, each chunk as
/// it is read, so the reader goes on in the same chunk buffer.
fn read_and_match(
    store: &crate::storage::Store,
    policy: &Policy,
    versions: &[Option<VersionInfo>],
) -> Result<(Vec<TableData>, LoadTimes), ServiceError> {
    let sides: Vec<(&crate::policy::Dataset, Option<&VersionInfo>)> = policy
        .datasets()
        .iter()
        .zip(versions)
        .map(|(d, v)| (d, v.as_ref()))
        .collect();
    let linked = link_versions(store, policy, &sides, true)?;
    let mut took = linked.took;
    let started = std::time::Instant::now();
    let keys = crate::query::KeysByPlace::new(linked.keys);
    let batches = read_side_by_side(&sides, &|side, v| {
        let d = sides[side].0;
        let mut batch_no = 0usize;
        store.read_with(v, |batch| {
            let keyed = keys
                .put_in(d, side, batch_no, &batch)
                .map_err(|e| ServiceError::Internal(format!("putting keys in: {e}")))?;
            batch_no += 1;
            Ok::<_, ServiceError>(crate::query::table_form(d, &keyed))
        })
    })?;
    linked.shape.check(&batches)?;
    took.read += started.elapsed();
    Ok((
        crate::query::tables_with_people(policy, batches, linked.persons),
        took,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;

    /// Tables read back from the store weigh what the tables they were
    /// stored from weigh: columns decoded from one chunk share its buffer,
    /// which must not count once per column (a 20M-row agreement once
    /// weighed 10 GB that way and never stayed in an 8 GiB cache).
    #[test]
    fn stored_tables_weigh_what_their_values_take() {
        let policy = crate::policy::unit_policy(
            r#"
[[dataset]]
name = "visits"
owner = "acme"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "region"
role = "dimension"
max_cardinality = 10

[[dataset.column]]
name = "spend"
role = "metric"
type = "float"
min = 0
max = 100

[[dataset.column]]
name = "visits"
role = "metric"
type = "integer"
min = 0
max = 100

[[dataset]]
name = "other"
owner = "globex"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[query]
aggregates = ["count"]
min_group_size = 5
"#,
        );
        let rows = 50_000usize;
        let schema = Arc::new(Schema::new(vec![
            Field::new("email", DataType::FixedSizeBinary(4), true),
            Field::new("region", DataType::Utf8, true),
            Field::new("spend", DataType::Float64, true),
            Field::new("visits", DataType::Int64, true),
        ]));
        let keys: Vec<[u8; 4]> = (0..rows as u32).map(u32::to_be_bytes).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(arrow::array::FixedSizeBinaryArray::try_from_iter(keys.into_iter()).unwrap()),
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| ["north", "south"][i % 2]),
            )),
            Arc::new(Float64Array::from_iter_values((0..rows).map(|i| i as f64))),
            Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i as i64))),
        ];
        let batch = RecordBatch::try_new(schema, columns).unwrap();
        let table = TableData::new(
            policy.datasets()[0].clone(),
            vec![batch],
            (0..rows as u32).collect::<Vec<_>>().into(),
        );
        // Through the stored form and Arrow IPC, as the store reads it.
        let decoded: Vec<RecordBatch> = crate::query::matched_batches(&table)
            .unwrap()
            .iter()
            .flat_map(|b| {
                let ipc = crate::upload::encode_batch(b).unwrap();
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect::<Vec<_>>()
            })
            .collect();
        let back =
            crate::query::tables_from_matched(&policy, vec![("visits".to_string(), decoded)])
                .unwrap();
        let (before, after) = (held_bytes(&table), held_bytes(&back[0]));
        // 4 bytes of key, 5 + 4 of region, 8 of spend, 8 of visits, 4 + 4
        // of person numbers (across parties and the owner's own).
        assert!(
            before >= 37 * rows as u64 && before <= 40 * rows as u64,
            "{before}"
        );
        assert!(after <= before + 1024, "{after} against {before}");
    }

    /// A fingerprint of identity `kind` (0 or 1) for person-ish number `n`:
    /// equal for equal (kind, n), never equal across kinds.
    fn fp(kind: u8, n: u64) -> [u8; 32] {
        let mut out = [kind; 32];
        out[..8].copy_from_slice(&n.to_le_bytes());
        out
    }

    /// Reading and matching one identity kind at a time gives the tables a
    /// plain computation gives: rows joined into people by label
    /// propagation over shared (kind, fingerprint) pairs, keys equal exactly
    /// where fingerprints of one kind are, and every other value as stored.
    #[test]
    fn tables_read_kind_by_kind_equal_a_plain_matching() {
        tables_read_kind_by_kind(true);
    }

    /// As above with a kind only one dataset has: the other's rows are
    /// still numbered in that kind's pass.
    #[test]
    fn a_kind_of_one_dataset_only_is_read_alike() {
        tables_read_kind_by_kind(false);
    }

    fn tables_read_kind_by_kind(audience_phone: bool) {
        let text = r#"
[identity.phone]
profile = "phone"
default_country = "US"
metadata = "9.0.42"

[[dataset]]
name = "customers"
owner = "acme"

[[dataset.column]]
name = "region"
role = "dimension"
values = ["north", "south"]

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "spend"
role = "metric"
type = "float"
min = 0
max = 100

[[dataset.column]]
name = "phone"
role = "identifier"
kind = "phone"

[[dataset]]
name = "audience"
owner = "globex"

[[dataset.column]]
name = "phone"
role = "identifier"
kind = "phone"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "visits"
role = "metric"
type = "integer"
min = 0
max = 100

[query]
aggregates = ["count"]
min_group_size = 5
"#;
        let audience = "name = \"audience\"\nowner = \"globex\"\n";
        let text = match audience_phone {
            true => text.to_string(),
            false => text.replace(
                &format!("{audience}\n[[dataset.column]]\nname = \"phone\"\nrole = \"identifier\"\nkind = \"phone\"\n"),
                audience,
            ),
        };
        let policy = crate::policy::unit_policy(&text);
        assert_eq!(
            policy.datasets()[1].identifier_columns().len(),
            1 + usize::from(audience_phone)
        );
        use arrow::array::{Array, FixedSizeBinaryArray};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::Store::open(dir.path(), None).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        // (email, phone) numbers per row, both datasets, rows in order.
        let mut given: Vec<(Option<u64>, Option<u64>)> = Vec::new();
        let mut stored_values: Vec<(Option<&str>, Option<f64>, Option<i64>)> = Vec::new();
        let mut versions = Vec::new();
        for (d, chunks) in policy.datasets().iter().zip([
            vec![1usize, 700, 1_300, 97, 0, 2_048],
            vec![1_500usize, 3, 900, 1],
        ]) {
            let mut staged = store.stage(policy.id(), d.name()).unwrap();
            for rows in chunks {
                let mut emails = Vec::new();
                let mut phones = Vec::new();
                let mut other_a = Vec::new();
                let mut other_b = Vec::new();
                for _ in 0..rows {
                    // Small pools, so that rows share values within and
                    // across datasets and chain email to phone.
                    let e = (next(10) != 0).then(|| next(1_500));
                    let p = (next(4) != 0 || e.is_none()).then(|| next(900));
                    let p = p.filter(|_| audience_phone || d.name() == "customers");
                    emails.push(e.map(|n| fp(0, n)));
                    phones.push(p.map(|n| fp(1, n)));
                    given.push((e, p));
                    if d.name() == "customers" {
                        let r = ["north", "south"][next(2) as usize];
                        let spend = next(100) as f64 / 4.0;
                        other_a.push((next(7) != 0).then_some(r));
                        other_b.push(spend);
                        stored_values.push((other_a.last().copied().flatten(), Some(spend), None));
                    } else {
                        let v = next(100) as i64;
                        other_b.push(v as f64);
                        stored_values.push((None, None, Some(v)));
                    }
                }
                let fps = |v: &Vec<Option<[u8; 32]>>| -> ArrayRef {
                    Arc::new(
                        FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                            v.iter().map(|f| f.as_ref().map(|f| f.to_vec())),
                            32,
                        )
                        .unwrap(),
                    )
                };
                let batch = if d.name() == "customers" {
                    RecordBatch::try_new(
                        Arc::new(Schema::new(vec![
                            Field::new("region", DataType::Utf8, true),
                            Field::new("email", DataType::FixedSizeBinary(32), true),
                            Field::new("spend", DataType::Float64, true),
                            Field::new("phone", DataType::FixedSizeBinary(32), true),
                        ])),
                        vec![
                            Arc::new(StringArray::from(other_a)),
                            fps(&emails),
                            Arc::new(Float64Array::from(other_b)),
                            fps(&phones),
                        ],
                    )
                } else {
                    let visits: ArrayRef = Arc::new(Int64Array::from_iter_values(
                        other_b.iter().map(|v| *v as i64),
                    ));
                    let mut fields = vec![
                        Field::new("phone", DataType::FixedSizeBinary(32), true),
                        Field::new("email", DataType::FixedSizeBinary(32), true),
                        Field::new("visits", DataType::Int64, true),
                    ];
                    let mut columns = vec![fps(&phones), fps(&emails), visits];
                    if !audience_phone {
                        fields.remove(0);
                        columns.remove(0);
                    }
                    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
                }
                .unwrap();
                staged
                    .append(&crate::upload::encode_batch(&batch).unwrap(), rows as u64)
                    .unwrap();
            }
            versions.push(Some(
                store
                    .commit(
                        staged,
                        crate::storage::Commit {
                            base: None,
                            upload_id: "u",
                            uploaded_by: d.owner(),
                            policy_hash: "h",
                            form: &policy.data_form(d),
                            committed_at: 1,
                            owner_key: None,
                        },
                    )
                    .unwrap(),
            ));
        }
        let (tables, _) = read_and_match(&store, &policy, &versions).unwrap();

        // The plain computation: every row starts as its own label; rows
        // sharing a (kind, number) take the smallest label among them,
        // until nothing changes.
        let mut label: Vec<usize> = (0..given.len()).collect();
        let mut groups: HashMap<(u8, u64), Vec<usize>> = HashMap::new();
        for (row, (e, p)) in given.iter().enumerate() {
            for (kind, v) in [(0u8, e), (1u8, p)] {
                if let Some(n) = v {
                    groups.entry((kind, *n)).or_default().push(row);
                }
            }
        }
        loop {
            let mut changed = false;
            for rows in groups.values() {
                let least = rows.iter().map(|r| label[*r]).min().unwrap();
                for r in rows {
                    changed |= label[*r] != least;
                    label[*r] = least;
                }
            }
            if !changed {
                break;
            }
        }
        let persons: Vec<u32> = tables
            .iter()
            .flat_map(|t| t.person_of_row.iter().copied())
            .collect();
        assert_eq!(persons.len(), given.len());
        // Same partition of the rows: a bijection between labels and persons.
        let mut to_person: HashMap<usize, u32> = HashMap::new();
        let mut to_label: HashMap<u32, usize> = HashMap::new();
        for (l, p) in label.iter().zip(&persons) {
            assert_eq!(
                *to_person.entry(*l).or_insert(*p),
                *p,
                "one label, two persons"
            );
            assert_eq!(
                *to_label.entry(*p).or_insert(*l),
                *l,
                "one person, two labels"
            );
        }
        assert!(
            to_person.len() < given.len() / 2,
            "the pools make people share rows"
        );

        // Keys: a bijection with (kind, number), null where none.
        let mut key_of: HashMap<(u8, u64), Vec<u8>> = HashMap::new();
        let mut value_of: HashMap<Vec<u8>, (u8, u64)> = HashMap::new();
        let mut row = 0usize;
        let mut values = Vec::new();
        for t in &tables {
            for batch in &t.batches {
                let (schema, shown) =
                    crate::query::for_caller(&batch.schema(), vec![batch.clone()]).unwrap();
                let shown = &shown[0];
                for r in 0..batch.num_rows() {
                    for (kind, name, v) in [
                        (0u8, "email", given[row + r].0),
                        (1u8, "phone", given[row + r].1),
                    ] {
                        let Ok(at) = schema.index_of(name) else {
                            assert_eq!(v, None, "a value without its column");
                            continue;
                        };
                        let keys = batch
                            .column(at)
                            .as_any()
                            .downcast_ref::<FixedSizeBinaryArray>()
                            .unwrap();
                        assert_eq!(keys.value_length(), 4);
                        match v {
                            None => assert!(keys.is_null(r)),
                            Some(n) => {
                                let k = keys.value(r).to_vec();
                                assert_eq!(*key_of.entry((kind, n)).or_insert(k.clone()), k);
                                assert_eq!(*value_of.entry(k).or_insert((kind, n)), (kind, n));
                            }
                        }
                    }
                    let text = |name: &str| {
                        schema.index_of(name).ok().and_then(|i| {
                            let c = shown.column(i).as_any().downcast_ref::<StringArray>()?;
                            c.is_valid(r).then(|| c.value(r).to_string())
                        })
                    };
                    let float = |name: &str| {
                        schema.index_of(name).ok().map(|i| {
                            shown
                                .column(i)
                                .as_any()
                                .downcast_ref::<Float64Array>()
                                .unwrap()
                                .value(r)
                        })
                    };
                    let int = |name: &str| {
                        schema.index_of(name).ok().map(|i| {
                            shown
                                .column(i)
                                .as_any()
                                .downcast_ref::<Int64Array>()
                                .unwrap()
                                .value(r)
                        })
                    };
                    values.push((text("region"), float("spend"), int("visits")));
                }
                row += batch.num_rows();
            }
        }
        assert_eq!(row, given.len());
        let expected: Vec<(Option<String>, Option<f64>, Option<i64>)> = stored_values
            .iter()
            .map(|(r, s, v)| (r.map(str::to_string), *s, *v))
            .collect();
        assert_eq!(values, expected);
    }

    #[test]
    fn the_gate_holds_queries_per_organisation_and_in_all() {
        let gate = QueryGate::new(QueryLimits {
            max_concurrent: 3,
            max_concurrent_per_org: 2,
            ..QueryLimits::default()
        });
        assert!(gate.idle());
        let a1 = gate.enter("acme").unwrap();
        assert!(!gate.idle());
        let a2 = gate.enter("acme").unwrap();
        let err = gate.enter("acme").unwrap_err();
        assert_eq!(err.rule(), "query.concurrency");
        let _g1 = gate.enter("globex").unwrap();
        let err = gate.enter("globex").unwrap_err();
        assert!(err.to_string().contains("max_concurrent_queries"), "{err}");
        drop(a1);
        let a3 = gate.enter("acme").unwrap();
        drop((a2, a3, _g1));
        assert!(gate.idle(), "every place given back");
    }
}
