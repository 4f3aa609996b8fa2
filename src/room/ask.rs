//! Governed questions: an agreement, SQL or an approved template with its
//! parameters, and under differential privacy an epsilon. Resolved,
//! checked, run against the table cache, released, charged and audited;
//! every transport asks here.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::blinding::not_blinded;
use super::budget::{Charged, Spent, epsilon_for, no_epsilon, spent};
use super::{Room, RoomError, bounded_name};
use crate::audit::Event;
use crate::policy::{Policy, QueryMode, Right};
use crate::privacy::NoiseSource;
use crate::query::{QueryError, QueryLimits, QueryOutcome};

/// A question to the room, as every transport puts it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ask {
    /// The agreement asked.
    pub agreement: String,
    /// Free SQL; empty when a template is named.
    pub sql: String,
    /// An approved template's name, or empty for free SQL.
    pub template: String,
    /// The template's parameters by name.
    pub params: BTreeMap<String, String>,
    /// The epsilon to spend under differential privacy; the agreement's
    /// per-query maximum if unset.
    pub epsilon: Option<f64>,
}

impl Room {
    /// The answer, and the budget charge it keeps: under differential
    /// privacy a query is charged once its data has been read, whether it
    /// then succeeds or fails.
    async fn answer(
        &self,
        org: &str,
        ask: &Ask,
        resolved: &Resolved,
    ) -> (Result<Answer, RoomError>, Option<Charged>) {
        let limits = self.query_limits();
        let deadline = tokio::time::Instant::now() + limits.timeout;
        // Queries at once: refused before anything is read, so never charged.
        let _permits = match self.query_gate().enter(org) {
            Ok(p) => p,
            Err(e) => return (Err(e), None),
        };
        let _running = self.metrics().query_running();
        let planned = match tokio::time::timeout_at(deadline, self.plan(org, ask, resolved)).await {
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
        let epsilon = match epsilon_for(privacy, ask.epsilon) {
            Ok(e) => e,
            Err(e) => return (Err(e), None),
        };
        let noise_plan = match crate::query::private::plan(&policy, &checked, epsilon) {
            Ok(p) => p,
            Err(v) => return (Err(RoomError::QueryRefused(v)), None),
        };
        let unit = match crate::query::private::bounding_unit(&policy, org, &plan) {
            Ok(u) => u,
            Err(v) => return (Err(RoomError::QueryRefused(v)), None),
        };
        let rng = match NoiseSource::from_os() {
            Ok(rng) => rng,
            Err(_) => {
                let e = RoomError::Internal("the system random source failed".into());
                return (Err(e), None);
            }
        };
        let charged = match self.charge_budget(org, &policy, privacy, epsilon).await {
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
                self.refund_budget(&charged.charge.query).await;
                (Err(query_error(e)), None)
            }
            Err(e) => (Err(query_error(e)), Some(charged)),
        }
    }

    /// Runs one governed question of `org` and audits it: every transport
    /// (the `Query` RPC, Flight SQL) comes here, so all answer and refuse
    /// alike.
    pub async fn governed(&self, org: &str, ask: &Ask) -> Result<Governed, RoomError> {
        let (resolved, (outcome, charge)) = match resolve(self, org, ask) {
            Ok(r) => {
                let answered = self.answer(org, ask, &r).await;
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
            ..query_event(org, ask, resolved.as_ref())
        };
        let sql_hash = event.sql_hash.clone().unwrap_or_default();
        let audited = self.audit_outcome(event, &outcome, |a, e| {
            // The policy the query ran under, even if a reload replaced it since.
            e.policy_hash = a.policy.hash().to_hex();
            e.subject = Some(a.outcome.checked.datasets.join(" x "));
            e.rows = Some(a.outcome.rows());
        });
        self.finish_charge(charge.as_ref(), &audited).await;
        audited?;
        if let Err(e) = &outcome {
            self.metrics().refused(e.rule());
        }
        let Answer { policy, outcome } = outcome?;
        let privacy = match (&outcome.privacy, &charge) {
            (Some(r), Some(c)) => Some(spent(r, c)),
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
    pub async fn dry_run(&self, org: &str, ask: &Ask) -> Result<DryRun, RoomError> {
        let (resolved, checked) = match resolve(self, org, ask) {
            Ok(r) => {
                let checked = self.describe(org, ask, &r).await;
                (Some(r), checked)
            }
            Err(e) => (None, Err(e)),
        };
        if let Err(e) = &checked {
            self.metrics().refused(e.rule());
            let event = query_event(org, ask, resolved.as_ref());
            self.audit_outcome(event, &checked, |_, _| {})?;
        }
        checked
    }

    /// The schema and noise of a resolved query, planned and checked.
    async fn describe(
        &self,
        org: &str,
        ask: &Ask,
        resolved: &Resolved,
    ) -> Result<DryRun, RoomError> {
        let planned = self.plan(org, ask, resolved).await?;
        let noise = match planned.policy.privacy() {
            Some(privacy) => {
                let epsilon = epsilon_for(privacy, ask.epsilon)?;
                let plan = crate::query::private::plan(&planned.policy, &planned.checked, epsilon)
                    .map_err(RoomError::QueryRefused)?;
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
    async fn plan(&self, org: &str, ask: &Ask, resolved: &Resolved) -> Result<Planned, RoomError> {
        let (policy, sql) = (Arc::clone(&resolved.policy), resolved.sql.as_str());
        for right in [Right::Query, Right::ReceiveResults] {
            if !policy.allows(org, right) {
                return Err(RoomError::PermissionDenied {
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
            return Err(RoomError::invalid("sql", "must be at most 64 KiB"));
        }
        if policy.privacy().is_none() {
            no_epsilon(&policy, ask.epsilon)?;
        }
        let (room, p) = (self.clone(), Arc::clone(&policy));
        let loaded = tokio::task::spawn_blocking(move || room.query_tables().tables(&room, &p))
            .await
            .map_err(|e| RoomError::Internal(format!("loading tables: {e}")))??;
        if loaded.matched_now {
            // The background matcher stores them for the next start.
            self.match_soon(policy.id());
        }
        let present = loaded.present();
        let tables = Arc::clone(&loaded.tables);
        let limits = self.query_limits();
        let placement = match self.cluster() {
            Some(cluster) => match cluster.place(policy.id(), &loaded.key, &tables).await {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "tables not placed on workers; the query runs on the server");
                    None
                }
            },
            None => None,
        };
        let placed = placement
            .as_deref()
            .map(|p| p as &dyn crate::query::Placement);
        let (ctx, plan, checked) =
            crate::query::plan_and_check_with(&policy, org, &tables, sql, &limits, placed)
                .await
                .map_err(query_error)?;
        for name in &checked.datasets {
            if !present.contains(&name.as_str()) {
                let store = self.store();
                return Err(match store.current(policy.id(), name)? {
                    Some(v) if store.is_damaged(&v)? => RoomError::DatasetDamaged(name.clone()),
                    Some(_) => not_blinded(&policy, name),
                    None => RoomError::NoData(name.clone()),
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
fn query_event(org: &str, ask: &Ask, resolved: Option<&Resolved>) -> Event {
    Event {
        org: org.to_string(),
        agreement: ask.agreement.clone(),
        action: "query",
        sql_hash: resolved.map(|r| blake3::hash(r.sql.as_bytes()).to_hex().to_string()),
        template: resolved.and_then(|r| r.template.clone()),
        params_hash: resolved.and_then(|r| r.params_hash.clone()),
        ..Event::default()
    }
}

/// Longest parameter value, in bytes.
const MAX_PARAM_VALUE: usize = 4096;

fn resolve(room: &Room, org: &str, ask: &Ask) -> Result<Resolved, RoomError> {
    let policy = room.agreement_in_force(org, &ask.agreement)?;
    if ask.template.is_empty() {
        if policy.query().mode() == QueryMode::Templates {
            return Err(RoomError::PermissionDenied {
                rule: "query.mode",
                detail: format!(
                    "agreement {} answers its approved templates only (`cleanroom templates` lists them)",
                    policy.id()
                ),
            });
        }
        if !ask.params.is_empty() {
            return Err(RoomError::invalid("params", "apply to templates only"));
        }
        return Ok(Resolved {
            policy,
            sql: ask.sql.clone(),
            template: None,
            params_hash: None,
        });
    }
    bounded_name("template", &ask.template)?;
    if !ask.sql.is_empty() {
        return Err(RoomError::invalid(
            "sql",
            "must be empty when a template is named",
        ));
    }
    let mut given = std::collections::BTreeMap::new();
    for (name, value) in &ask.params {
        bounded_name("params", name)?;
        if value.len() > MAX_PARAM_VALUE {
            return Err(RoomError::invalid(
                "params",
                format!("a value must be at most {MAX_PARAM_VALUE} bytes"),
            ));
        }
        given.insert(name.clone(), value.clone());
    }
    let template = policy
        .template(&ask.template)
        .filter(|t| t.runnable_by(org))
        .ok_or_else(|| {
            let runnable = policy.templates().iter().filter(|t| t.runnable_by(org));
            let suggestion = crate::names::nearest(&ask.template, runnable.map(|t| t.name()));
            RoomError::QueryRefused(
                crate::query::Violation::deny(
                    "template.unknown",
                    format!(
                        "agreement {} has no template of that name that {org} may run{}",
                        policy.id(),
                        crate::names::did_you_mean(suggestion.as_deref())
                    ),
                )
                .about(&ask.template, suggestion),
            )
        })?;
    let bound = template.bind(&given).map_err(|e| {
        let declared = template.params().iter().map(|p| p.name());
        let suggestion = match template.params().iter().any(|p| p.name() == e.param) {
            true => None,
            false => crate::names::nearest(&e.param, declared),
        };
        RoomError::QueryRefused(
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
fn timed_out(limits: &QueryLimits) -> RoomError {
    match past_time(limits) {
        QueryError::Limit { rule, detail } => RoomError::LimitExceeded { rule, detail },
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
pub struct Governed {
    pub policy: Arc<Policy>,
    pub outcome: QueryOutcome,
    pub privacy: Option<Spent>,
    pub sql_hash: String,
    pub template: Option<String>,
    pub params_hash: Option<String>,
}

/// What a check says of a query before it runs.
#[derive(Debug)]
pub struct DryRun {
    pub policy: Arc<Policy>,
    pub schema: arrow::datatypes::SchemaRef,
    pub noise: Option<crate::privacy::Report>,
}

/// A query's answer and the policy it ran under.
#[derive(Debug)]
struct Answer {
    policy: Arc<Policy>,
    outcome: QueryOutcome,
}

fn query_error(e: QueryError) -> RoomError {
    match e {
        QueryError::Refused(v) => RoomError::QueryRefused(v),
        QueryError::Engine(detail) => RoomError::Internal(format!("query engine: {detail}")),
        QueryError::Output => RoomError::QueryRefused(crate::query::output_violation()),
        QueryError::Limit { rule, detail } => RoomError::LimitExceeded { rule, detail },
    }
}
