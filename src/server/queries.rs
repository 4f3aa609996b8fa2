//! The `Queries` service: governed aggregate SQL over the agreement's data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use super::budget::{Charged, epsilon_for, no_epsilon, privacy_report};
use super::datasets::agreement_in_force;
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{Policy, Right};
use crate::privacy::NoiseSource;
use crate::proto;
use crate::proto::query_response::Part;
use crate::query::{QueryError, QueryOutcome, TableData, agreement_tables};

/// One agreement's tables and the versions (and policy) they were built from.
#[derive(Debug)]
struct Cached {
    key: Vec<String>,
    tables: Arc<Vec<TableData>>,
}

/// The agreement's tables, and for each dataset its name if it has data.
type Loaded = (Vec<Option<String>>, Arc<Vec<TableData>>);

/// Decrypted and matched tables per agreement, kept while the datasets'
/// current versions stay the same.
#[derive(Debug, Default, Clone)]
pub(crate) struct TableCache {
    inner: Arc<Mutex<HashMap<String, Cached>>>,
}

impl TableCache {
    /// The agreement's tables for its current versions, loading and
    /// matching them if they changed. Blocking: call off the async runtime.
    pub(crate) fn tables(&self, state: &AppState, policy: &Policy) -> Result<Loaded, ServiceError> {
        let store = state.store();
        let mut versions = Vec::new();
        for d in policy.datasets() {
            versions.push(store.current(policy.id(), d.name())?);
        }
        let key: Vec<String> = versions
            .iter()
            .map(|v| v.as_ref().map(|v| v.version.clone()).unwrap_or_default())
            .chain(std::iter::once(policy.hash().to_hex()))
            .collect();
        let present: Vec<Option<String>> = versions
            .iter()
            .map(|v| v.as_ref().map(|v| v.dataset.clone()))
            .collect();
        if let Some(cached) = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(policy.id())
            && cached.key == key
        {
            return Ok((present, Arc::clone(&cached.tables)));
        }
        let mut batches = Vec::new();
        for v in &versions {
            batches.push(match v {
                Some(v) => store.read(v)?,
                None => Vec::new(),
            });
        }
        let tables = Arc::new(agreement_tables(policy, batches));
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).insert(
            policy.id().to_string(),
            Cached {
                key,
                tables: Arc::clone(&tables),
            },
        );
        Ok((present, tables))
    }
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

    async fn answer(
        &self,
        org: &str,
        request: &proto::QueryRequest,
    ) -> Result<Answer, ServiceError> {
        let policy = agreement_in_force(&self.state, org, &request.agreement_id)?;
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
        if request.sql.len() > 64 * 1024 {
            return Err(ServiceError::InvalidArgument {
                field: "sql",
                rule: "must be at most 64 KiB".into(),
            });
        }
        let (state, p) = (self.state.clone(), Arc::clone(&policy));
        let (present, tables) =
            tokio::task::spawn_blocking(move || state.query_tables().tables(&state, &p))
                .await
                .map_err(|e| ServiceError::Internal(format!("loading tables: {e}")))??;
        let (ctx, plan, checked) = crate::query::plan_and_check(&policy, &tables, &request.sql)
            .await
            .map_err(query_error)?;
        for name in &checked.datasets {
            if !present.iter().flatten().any(|p| p == name) {
                return Err(ServiceError::NoData(name.clone()));
            }
        }
        let single = crate::query::one_row_per_person(&tables, &checked);
        if let Some(privacy) = policy.privacy() {
            return self
                .answer_privately(org, request, &policy, privacy, (ctx, plan, checked), single)
                .await;
        }
        no_epsilon(&policy, request.epsilon)?;
        let outcome = crate::query::execute(&policy, ctx, plan, checked, single)
            .await
            .map_err(query_error)?;
        Ok(Answer {
            policy,
            outcome,
            charge: None,
        })
    }

    /// Plans the noise, charges the budget, runs; refunds if the run fails.
    async fn answer_privately(
        &self,
        org: &str,
        request: &proto::QueryRequest,
        policy: &Arc<Policy>,
        privacy: &crate::policy::Privacy,
        (ctx, plan, checked): Planned,
        one_row_per_person: bool,
    ) -> Result<Answer, ServiceError> {
        let epsilon = epsilon_for(privacy, request.epsilon)?;
        let noise_plan = crate::query::private::plan(policy, &checked, epsilon)
            .map_err(ServiceError::QueryRefused)?;
        let charged = self
            .state
            .charge_budget(org, policy, privacy, epsilon)
            .await?;
        let run = match NoiseSource::from_os() {
            Ok(rng) => crate::query::private::execute(
                ctx,
                plan,
                checked,
                &noise_plan,
                one_row_per_person,
                rng,
            )
            .await
            .map_err(query_error),
            Err(_) => Err(ServiceError::Internal(
                "the system random source failed".into(),
            )),
        };
        match run {
            Ok(outcome) => Ok(Answer {
                policy: Arc::clone(policy),
                outcome,
                charge: Some(charged),
            }),
            Err(e) => {
                self.state.refund_budget(&charged.charge.query).await;
                Err(e)
            }
        }
    }
}

/// A checked query, ready to run.
type Planned = (
    datafusion::prelude::SessionContext,
    datafusion::logical_expr::LogicalPlan,
    crate::query::Checked,
);

/// A query's answer, and its budget charge under differential privacy.
#[derive(Debug)]
struct Answer {
    policy: Arc<Policy>,
    outcome: QueryOutcome,
    charge: Option<Charged>,
}

fn query_error(e: QueryError) -> ServiceError {
    match e {
        QueryError::Refused(v) => ServiceError::QueryRefused(v),
        QueryError::Engine(detail) => ServiceError::Internal(format!("query engine: {detail}")),
    }
}

type QueryStream = ReceiverStream<Result<proto::QueryResponse, Status>>;

#[tonic::async_trait]
impl proto::queries_server::Queries for QueriesService {
    type QueryStream = QueryStream;

    #[tracing::instrument(skip_all, fields(agreement = %request.get_ref().agreement_id))]
    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let org = caller(&request)?;
        let sql_hash = blake3::hash(request.get_ref().sql.as_bytes())
            .to_hex()
            .to_string();
        let outcome = self.answer(&org, request.get_ref()).await;
        let event = Event {
            org,
            agreement: request.get_ref().agreement_id.clone(),
            action: "query",
            sql_hash: Some(sql_hash.clone()),
            ..Event::default()
        };
        let audited = self.state.audit_outcome(event, &outcome, |a, e| {
            // The policy the query ran under, even if a reload replaced it since.
            e.policy_hash = a.policy.hash().to_hex();
            e.subject = Some(a.outcome.checked.datasets.join(" x "));
            e.rows = Some(a.outcome.rows());
            if let Some(c) = &a.charge {
                e.epsilon = Some(c.epsilon);
                e.query_id = Some(c.charge.query.clone());
            } else {
                e.suppressed = Some(a.outcome.suppressed);
            }
        });
        let charged = outcome.as_ref().ok().and_then(|a| a.charge.as_ref());
        self.state.finish_charge(charged, &audited).await;
        audited?;
        let Answer {
            policy,
            outcome,
            charge,
        } = outcome?;

        let privacy = match (&outcome.privacy, &charge) {
            (Some(r), Some(c)) => Some(privacy_report(r, c)),
            _ => None,
        };
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
            suppressed: outcome.suppressed,
            sql_hash,
        }));
        let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
        for part in messages {
            let _ = tx.try_send(Ok(proto::QueryResponse { part: Some(part) }));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(agreement = %request.get_ref().agreement_id))]
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
