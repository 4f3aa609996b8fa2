//! The `Matching` service: the overlap between two parties' datasets.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use super::blinding::{WorkStream, is_matchable, not_blinded, read_matchable};
use super::budget::{Charged, epsilon_for, no_epsilon, privacy_report};
use super::datasets::agreement_in_force;
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{Dataset, Policy, Right};
use crate::privacy::{Measure, NoiseSource, Plan, Settings};
use crate::proto;
use crate::psi::{Side, match_people};

/// Implements `cleanroom.v1.Matching`.
#[derive(Debug, Clone)]
pub struct MatchingService {
    state: AppState,
}

impl MatchingService {
    pub fn new(state: AppState) -> Self {
        MatchingService { state }
    }

    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }
}

/// The two datasets an overlap is about.
fn pick_datasets<'p>(
    policy: &'p Policy,
    names: &[String],
) -> Result<[&'p Dataset; 2], ServiceError> {
    let bad = |rule: String| ServiceError::InvalidArgument {
        field: "datasets",
        rule,
    };
    let chosen: Vec<&Dataset> = if names.is_empty() {
        if policy.datasets().len() != 2 {
            return Err(bad(format!(
                "the agreement has {} datasets; name the two to match",
                policy.datasets().len()
            )));
        }
        policy.datasets().iter().collect()
    } else {
        if names.len() > 2 {
            return Err(bad("name exactly two different datasets".into()));
        }
        for n in names {
            super::bounded_name("datasets", n)?;
        }
        names
            .iter()
            .map(|n| {
                policy
                    .dataset(n)
                    .ok_or_else(|| bad(format!("{n:?} is not a dataset of this agreement")))
            })
            .collect::<Result<_, _>>()?
    };
    match chosen.as_slice() {
        [a, b] if a.name() != b.name() => Ok([a, b]),
        _ => Err(bad("name exactly two different datasets".into())),
    }
}

impl MatchingService {
    async fn overlap_of(
        &self,
        org: &str,
        request: &proto::OverlapRequest,
    ) -> Result<(Arc<Policy>, proto::OverlapResponse, Option<Charged>), ServiceError> {
        let policy = agreement_in_force(&self.state, org, &request.agreement_id)?;
        if !policy.allows(org, Right::SeeOverlap) {
            return Err(ServiceError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} lacks \"see_overlap\" in agreement {}", policy.id()),
            });
        }
        let [a, b] = pick_datasets(&policy, &request.datasets)?;
        // Under differential privacy: the noise plan and the charge come
        // first, as for a query.
        let private = match policy.privacy() {
            Some(privacy) => {
                let epsilon = epsilon_for(privacy, request.epsilon)?;
                let plan = Plan::new(
                    Settings {
                        epsilon,
                        delta: privacy.delta(),
                        // A person is in the overlap once.
                        max_groups_per_person: 1,
                        max_rows_per_person: 1,
                        min_group_size: policy.query().min_group_size(),
                    },
                    &[Measure::People],
                )
                .map_err(|e| {
                    ServiceError::QueryRefused(crate::query::Violation {
                        policy: true,
                        rule: e.rule,
                        detail: e.detail,
                    })
                })?;
                Some(plan)
            }
            None => {
                no_epsilon(&policy, request.epsilon)?;
                None
            }
        };
        let mut versions = Vec::new();
        for d in [a, b] {
            let store = self.state.store();
            let v = store
                .current(policy.id(), d.name())?
                .ok_or_else(|| ServiceError::NoData(d.name().to_string()))?;
            if !is_matchable(store, &policy, &v)? {
                return Err(not_blinded(&policy, d.name()));
            }
            versions.push(v);
        }
        let charged = match (&private, policy.privacy()) {
            (Some(plan), Some(privacy)) => Some(
                self.state
                    .charge_budget(org, &policy, privacy, plan.report().epsilon)
                    .await?,
            ),
            _ => None,
        };
        match self
            .count(&policy, [a, b], versions, private.as_ref())
            .await
        {
            Ok(mut response) => {
                if let (Some(plan), Some(c)) = (&private, &charged) {
                    let mut report = plan.report();
                    if let Some(col) = report.columns.first_mut() {
                        col.aggregate = "overlap".into();
                    }
                    response.privacy = Some(privacy_report(&report, c));
                }
                Ok((Arc::clone(&policy), response, charged))
            }
            Err(e) => {
                if let Some(c) = &charged {
                    self.state.refund_budget(&c.charge.query).await;
                }
                Err(e)
            }
        }
    }

    /// Matches the two datasets' `versions`; the count is noised under
    /// `private`.
    async fn count(
        &self,
        policy: &Arc<Policy>,
        [a, b]: [&Dataset; 2],
        versions: Vec<crate::storage::VersionInfo>,
        private: Option<&Plan>,
    ) -> Result<proto::OverlapResponse, ServiceError> {
        let store = self.state.store();
        let (kinds_b, names) = (b.identifier_columns(), [a.name(), b.name()]);
        let matched_on: Vec<String> = a
            .identifier_columns()
            .into_iter()
            .filter(|(_, k)| kinds_b.iter().any(|(_, kb)| kb == k))
            .map(|(_, k)| k.to_string())
            .collect();
        let (store, da, db) = (store.clone(), a.clone(), b.clone());
        let p = Arc::clone(policy);
        let overlap = tokio::task::spawn_blocking(move || -> Result<u64, ServiceError> {
            let read = |v: &crate::storage::VersionInfo| {
                read_matchable(&store, &p, v)?.ok_or_else(|| not_blinded(&p, &v.dataset))
            };
            let (batches_a, batches_b) = (read(&versions[0])?, read(&versions[1])?);
            let (ids_a, ids_b) = (da.identifier_columns(), db.identifier_columns());
            let m = match_people(
                Side {
                    batches: &batches_a,
                    identifiers: &ids_a,
                },
                Side {
                    batches: &batches_b,
                    identifiers: &ids_b,
                },
            );
            Ok(m.overlap)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("matching task: {e}")))??;
        let min = policy.query().min_group_size();
        let shown = match private {
            Some(plan) => {
                let mut rng = NoiseSource::from_os().map_err(|_| {
                    ServiceError::Internal("the system random source failed".into())
                })?;
                plan.release_people_count(overlap, &mut rng)
                    .map(|v| v.max(0) as u64)
            }
            None => (overlap >= u64::from(min)).then_some(overlap),
        };
        Ok(proto::OverlapResponse {
            overlap: shown,
            suppressed: shown.is_none(),
            min_group_size: min,
            datasets: names.map(str::to_string).to_vec(),
            matched_on,
            policy_hash: policy.hash().to_hex(),
            privacy: None,
        })
    }
}

#[tonic::async_trait]
impl proto::matching_server::Matching for MatchingService {
    type BlindingWorkStream = WorkStream;

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn blinding_work(
        &self,
        request: Request<proto::BlindingWorkRequest>,
    ) -> Result<Response<WorkStream>, Status> {
        self.blinding_work_of(request).await
    }

    #[tracing::instrument(skip_all)]
    async fn submit_blinding(
        &self,
        request: Request<tonic::Streaming<proto::BlindingSubmission>>,
    ) -> Result<Response<proto::SubmitBlindingResponse>, Status> {
        self.submit_blinding_of(request).await
    }

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn overlap(
        &self,
        request: Request<proto::OverlapRequest>,
    ) -> Result<Response<proto::OverlapResponse>, Status> {
        let org = caller(&request)?;
        let outcome = self.overlap_of(&org, request.get_ref()).await;
        let event = Event {
            org,
            agreement: request.get_ref().agreement_id.clone(),
            action: "overlap",
            ..Event::default()
        };
        let audited = self.state.audit_outcome(event, &outcome, |(p, r, c), e| {
            e.policy_hash = p.hash().to_hex();
            e.subject = Some(r.datasets.join(" x "));
            match c {
                Some(c) => {
                    e.epsilon = Some(c.epsilon);
                    e.query_id = Some(c.charge.query.clone());
                }
                None => e.suppressed = Some(u64::from(r.suppressed)),
            }
        });
        let charged = outcome.as_ref().ok().and_then(|(_, _, c)| c.as_ref());
        self.state.finish_charge(charged, &audited).await;
        audited?;
        Ok(Response::new(outcome?.1))
    }
}
