//! The `Matching` service: the overlap between two parties' datasets.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use super::datasets::agreement_in_force;
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{ColumnRole, Dataset, Policy, Right};
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

fn identifier_columns(d: &Dataset) -> Vec<(usize, String)> {
    d.uploaded_columns()
        .enumerate()
        .filter_map(|(i, c)| match c.role() {
            ColumnRole::Identifier { kind } => Some((i, kind.clone())),
            _ => None,
        })
        .collect()
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
        let (cols_a, cols_b) = (identifier_columns(a), identifier_columns(b));
        let matched_on: Vec<String> = cols_a
            .iter()
            .filter(|(_, k)| cols_b.iter().any(|(_, kb)| kb == k))
            .map(|(_, k)| k.clone())
            .collect();
        let store = store.clone();
        let overlap = tokio::task::spawn_blocking(move || -> Result<u64, ServiceError> {
            let batches_a = store.read(&versions[0])?;
            let batches_b = store.read(&versions[1])?;
            let ids_a: Vec<(usize, &str)> = cols_a.iter().map(|(i, k)| (*i, k.as_str())).collect();
            let ids_b: Vec<(usize, &str)> = cols_b.iter().map(|(i, k)| (*i, k.as_str())).collect();
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
                datasets: vec![a.name().to_string(), b.name().to_string()],
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
        let agreement = request.get_ref().agreement_id.clone();
        self.state.audit(Event {
            policy_hash: self.state.policy_hash(&agreement),
            org,
            agreement,
            action: "overlap",
            accepted: outcome.is_ok(),
            rule: outcome.as_ref().err().map(ServiceError::rule),
            subject: outcome.as_ref().ok().map(|(_, r)| r.datasets.join(" x ")),
            suppressed: outcome.as_ref().ok().map(|(_, r)| u64::from(r.suppressed)),
            ..Event::default()
        })?;
        Ok(Response::new(outcome?.1))
    }
}
