//! The `Audit` service: a party reads the audit entries of its agreements.

use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use crate::error::ServiceError;
use crate::proto;

/// Most entries in one page.
pub(super) const MAX_PAGE: usize = 1_000;

/// Implements `cleanroom.v1.Audit`.
#[derive(Debug, Clone)]
pub struct AuditService {
    state: AppState,
}

impl AuditService {
    pub fn new(state: AppState) -> Self {
        AuditService { state }
    }
}

#[tonic::async_trait]
impl proto::audit_server::Audit for AuditService {
    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn list_entries(
        &self,
        request: Request<proto::ListAuditEntriesRequest>,
    ) -> Result<Response<proto::ListAuditEntriesResponse>, Status> {
        let org = caller(&request)?;
        let policy = self
            .state
            .agreement_for(&org, &request.get_ref().agreement_id)?;
        let size = match request.get_ref().page_size {
            0 => MAX_PAGE,
            n if n as usize <= MAX_PAGE => n as usize,
            _ => {
                return Err(ServiceError::InvalidArgument {
                    field: "page_size",
                    rule: format!("at most {MAX_PAGE}"),
                }
                .into());
            }
        };
        let after: u64 = match request.get_ref().page_token.as_str() {
            "" => 0,
            token => token.parse().map_err(|_| ServiceError::InvalidArgument {
                field: "page_token",
                rule: "must be a next_page_token this service returned".into(),
            })?,
        };
        let log = self.state.audit_log().clone();
        let id = policy.id().to_string();
        let owners: std::collections::HashMap<String, String> = policy
            .datasets()
            .iter()
            .map(|d| (d.name().to_string(), d.owner().to_string()))
            .collect();
        let reader = org.clone();
        let entries = tokio::task::spawn_blocking(move || {
            log.page_seen_by(&id, after, size, &reader, |d| {
                owners.get(d).map(String::as_str)
            })
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("audit read task: {e}")))?
        .map_err(ServiceError::from)?;
        let next_page_token = match entries.last() {
            Some(e) if entries.len() == size => e.seq.to_string(),
            _ => String::new(),
        };
        let entries = entries
            .into_iter()
            .map(|e| proto::AuditEntry {
                seq: e.seq,
                time: e.time,
                organisation: e.org,
                agreement_id: e.agreement,
                policy_hash: e.policy_hash,
                action: e.action,
                decision: e.decision,
                rule: e.rule,
                subject: e.subject,
                sql_hash: e.sql_hash,
                rows: e.rows,
                suppressed: e.suppressed,
                epsilon: e.epsilon,
                delta: e.delta,
                query_id: e.query_id,
                template: e.template,
                params_hash: e.params_hash,
                prev: e.prev,
                hash: e.hash,
            })
            .collect();
        Ok(Response::new(proto::ListAuditEntriesResponse {
            entries,
            next_page_token,
        }))
    }
}
