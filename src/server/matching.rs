//! The `Matching` service: the overlap between two parties' datasets.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use super::datasets::agreement_in_force;
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{Dataset, Policy, Right};
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
    ) -> Result<(Arc<Policy>, proto::OverlapResponse), ServiceError> {
        let policy = agreement_in_force(&self.state, org, &request.agreement_id)?;
        if !policy.allows(org, Right::SeeOverlap) {
            return Err(ServiceError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} lacks \"see_overlap\" in agreement {}", policy.id()),
            });
        }
        let [a, b] = pick_datasets(&policy, &request.datasets)?;
        let store = self.state.store();
        let mut versions = Vec::new();
        for d in [a, b] {
            let v = store
                .current(policy.id(), d.name())?
                .ok_or_else(|| ServiceError::NoData(d.name().to_string()))?;
            versions.push(v);
        }
        let (kinds_b, names) = (b.identifier_columns(), [a.name(), b.name()]);
        let matched_on: Vec<String> = a
            .identifier_columns()
            .into_iter()
            .filter(|(_, k)| kinds_b.iter().any(|(_, kb)| kb == k))
            .map(|(_, k)| k.to_string())
            .collect();
        let (store, da, db) = (store.clone(), a.clone(), b.clone());
        let overlap = tokio::task::spawn_blocking(move || -> Result<u64, ServiceError> {
            let batches_a = store.read(&versions[0])?;
            let batches_b = store.read(&versions[1])?;
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
        let suppressed = overlap < u64::from(min);
        Ok((
            Arc::clone(&policy),
            proto::OverlapResponse {
                overlap: (!suppressed).then_some(overlap),
                suppressed,
                min_group_size: min,
                datasets: names.map(str::to_string).to_vec(),
                matched_on,
                policy_hash: policy.hash().to_hex(),
            },
        ))
    }
}

#[tonic::async_trait]
impl proto::matching_server::Matching for MatchingService {
    #[tracing::instrument(skip_all, fields(agreement = %request.get_ref().agreement_id))]
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
        self.state.audit_outcome(event, &outcome, |(_, r), e| {
            e.subject = Some(r.datasets.join(" x "));
            e.suppressed = Some(u64::from(r.suppressed));
        })?;
        Ok(Response::new(outcome?.1))
    }
}
