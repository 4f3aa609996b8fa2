//! The `Governance` service: access reports for parties and the admin view.
//! The views are built by plain functions over the policies and the store,
//! so `cleanroom admin status` can build the same view locally.

use std::collections::BTreeMap;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::{AppState, ReloadStatus};
use crate::error::ServiceError;
use crate::policy::{Policy, PolicySet, Right};
use crate::privacy::window::describe;
use crate::privacy::{from_micros, to_micros, window};
use crate::proto;
use crate::storage::{StorageError, Store, delta_from_units, delta_to_units};

/// `org`'s privacy budget in `policy` at `now`.
pub fn budget_view(
    store: &Store,
    policy: &Policy,
    org: &str,
    now: OffsetDateTime,
) -> Result<proto::BudgetResponse, StorageError> {
    let Some(privacy) = policy.privacy() else {
        return Ok(proto::BudgetResponse::default());
    };
    let window = window(privacy.refresh(), now);
    let spent = store.spent(policy.id(), org, &window.id)?;
    let total = to_micros(privacy.epsilon_total());
    let delta_total = delta_to_units(privacy.delta_total());
    Ok(proto::BudgetResponse {
        enabled: true,
        epsilon_total: privacy.epsilon_total(),
        epsilon_spent: from_micros(spent.micros),
        epsilon_remaining: from_micros(total.saturating_sub(spent.micros)),
        epsilon_per_query_max: privacy.epsilon_per_query_max(),
        delta: privacy.delta(),
        window: window.id,
        next_refresh: describe(window.next_refresh),
        queries: spent.queries,
        epsilon_per_query_min: privacy.epsilon_per_query_min(),
        delta_total: delta_from_units(delta_total),
        delta_spent: delta_from_units(spent.delta_units),
        delta_remaining: delta_from_units(delta_total.saturating_sub(spent.delta_units)),
    })
}

/// One agreement's state, data and budgets, for its administrators.
pub fn agreement_status(
    set: &PolicySet,
    policy: &Policy,
    store: &Store,
    now: OffsetDateTime,
) -> Result<proto::AgreementStatus, StorageError> {
    let mut datasets = Vec::new();
    for d in policy.datasets() {
        let versions = store.versions(policy.id(), d.name())?;
        let current = store.current(policy.id(), d.name())?;
        datasets.push(proto::DatasetStatus {
            dataset: d.name().to_string(),
            owner: d.owner().to_string(),
            current_version: current
                .as_ref()
                .map(|v| v.version.clone())
                .unwrap_or_default(),
            rows: Some(current.as_ref().map_or(0, |v| v.rows)),
            versions: u32::try_from(versions.len()).unwrap_or(u32::MAX),
            uploaded_at: current.as_ref().map_or(0, |v| v.committed_at),
            needs_upload: current
                .as_ref()
                .is_some_and(|v| !policy.made_now(d, &v.form)),
            damaged: match &current {
                Some(v) => store.is_damaged(v)?,
                None => false,
            },
        });
    }
    let mut budgets = Vec::new();
    if policy.privacy().is_some() {
        for party in policy.parties().iter().filter(|p| p.has(Right::Query)) {
            let b = budget_view(store, policy, party.org(), now)?;
            budgets.push(proto::BudgetUse {
                organisation: party.org().to_string(),
                window: b.window,
                epsilon_spent: b.epsilon_spent,
                epsilon_total: b.epsilon_total,
                queries: b.queries,
                delta_spent: b.delta_spent,
                delta_total: b.delta_total,
            });
        }
    }
    Ok(proto::AgreementStatus {
        agreement_id: policy.id().to_string(),
        state: set.state_of(policy, now.date()).as_str().to_string(),
        policy_hash: policy.hash().to_hex(),
        datasets,
        budgets,
        data_key: store.has_data_key(policy.id())?,
    })
}

/// The reload record as admins of `agreements` may see it: counts, and the
/// refusals of their own agreements' files.
pub fn reload_view(status: &ReloadStatus, agreements: &[String]) -> proto::PolicyReloadStatus {
    proto::PolicyReloadStatus {
        reloads: status.reloads,
        failures: status.failures,
        last_at: status.last_at,
        last_errors: status
            .last_errors
            .iter()
            .filter(|line| {
                agreements.iter().any(|id| {
                    line.contains(&format!("/{id}.toml:"))
                        || line.starts_with(&format!("{id}.toml:"))
                })
            })
            .cloned()
            .collect(),
    }
}

/// Implements `cleanroom.v1.Governance`.
#[derive(Debug, Clone)]
pub struct GovernanceService {
    state: AppState,
}

impl GovernanceService {
    pub fn new(state: AppState) -> Self {
        GovernanceService { state }
    }

    fn access_report_for(
        &self,
        org: &str,
        id: &str,
    ) -> Result<proto::AccessReportResponse, ServiceError> {
        let policy = self.state.agreement_for(org, id)?;
        let set = self.state.policies();
        let store = self.state.store();
        let now = self.state.clock().now();
        let expires_end = policy
            .expires_on()
            .next_day()
            .map(|d| d.midnight().assume_utc().unix_timestamp())
            .unwrap_or(i64::MAX);
        let retention = i64::from(policy.retention_days()) * 86_400;
        let mut datasets = Vec::new();
        for d in policy.datasets().iter().filter(|d| d.owner() == org) {
            let current = store.current(policy.id(), d.name())?.map(|v| v.version);
            let versions = store
                .versions(policy.id(), d.name())?
                .into_iter()
                .map(|v| proto::HeldVersion {
                    current: current.as_deref() == Some(v.version.as_str()),
                    delete_by: (v.committed_at + retention).min(expires_end),
                    version: v.version,
                    rows: v.rows,
                    uploaded_at: v.committed_at,
                    uploaded_by: v.uploaded_by,
                })
                .collect();
            datasets.push(proto::DatasetHolding {
                dataset: d.name().to_string(),
                columns: d
                    .uploaded_columns()
                    .map(|c| format!("{} ({})", c.name(), c.role().name()))
                    .collect(),
                versions,
            });
        }
        let mut access: BTreeMap<(String, String), proto::AccessCount> = BTreeMap::new();
        for e in self.state.audit_log().entries_for(policy.id())? {
            let a = access
                .entry((e.org.clone(), e.action.clone()))
                .or_insert_with(|| proto::AccessCount {
                    organisation: e.org.clone(),
                    action: e.action.clone(),
                    ..proto::AccessCount::default()
                });
            if e.decision == "rejected" {
                a.rejected += 1;
            } else {
                a.accepted += 1;
            }
            a.epsilon += e.epsilon.unwrap_or(0.0);
            a.last_at = a.last_at.max(e.time);
        }
        let budget = policy
            .privacy()
            .map(|_| budget_view(store, &policy, org, now))
            .transpose()?;
        Ok(proto::AccessReportResponse {
            organisation: org.to_string(),
            agreement_id: policy.id().to_string(),
            purpose: policy.purpose().to_string(),
            generated_at: now.unix_timestamp(),
            policy_hash: policy.hash().to_hex(),
            state: set.state_of(&policy, now.date()).as_str().to_string(),
            retention_days: policy.retention_days(),
            expires: policy.expires_on().to_string(),
            datasets,
            access: access.into_values().collect(),
            budget,
        })
    }

    fn admin_status_for(&self, org: &str) -> Result<proto::AdminStatusResponse, ServiceError> {
        let set = self.state.policies();
        let mine: Vec<_> = set
            .for_org(org)
            .filter(|p| p.allows(org, Right::Admin))
            .collect();
        if mine.is_empty() {
            return Err(ServiceError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} has the admin right in no agreement"),
            });
        }
        let now = self.state.clock().now();
        let mut agreements = Vec::new();
        for p in &mine {
            let mut status = agreement_status(&set, p, self.state.store(), now)?;
            // Another party's exact row count is its data, not the admin's.
            for d in &mut status.datasets {
                if d.owner != org {
                    d.rows = None;
                }
            }
            agreements.push(status);
        }
        let ids: Vec<String> = mine.iter().map(|p| p.id().to_string()).collect();
        Ok(proto::AdminStatusResponse {
            generated_at: now.unix_timestamp(),
            agreements,
            reload: Some(reload_view(&self.state.reload_status(), &ids)),
        })
    }
}

#[tonic::async_trait]
impl proto::governance_server::Governance for GovernanceService {
    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn access_report(
        &self,
        request: Request<proto::AccessReportRequest>,
    ) -> Result<Response<proto::AccessReportResponse>, Status> {
        let org = caller(&request)?;
        let id = request.get_ref().agreement_id.clone();
        let this = self.clone();
        let report = tokio::task::spawn_blocking(move || this.access_report_for(&org, &id))
            .await
            .map_err(|e| ServiceError::Internal(format!("access report: {e}")))??;
        Ok(Response::new(report))
    }

    #[tracing::instrument(skip_all)]
    async fn admin_status(
        &self,
        request: Request<proto::AdminStatusRequest>,
    ) -> Result<Response<proto::AdminStatusResponse>, Status> {
        let org = caller(&request)?;
        let this = self.clone();
        let status = tokio::task::spawn_blocking(move || this.admin_status_for(&org))
            .await
            .map_err(|e| ServiceError::Internal(format!("admin status: {e}")))??;
        Ok(Response::new(status))
    }
}
