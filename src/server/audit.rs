//! The `Audit` service: a party reads the audit entries of its agreements.

use tonic::{Request, Response, Status};

use super::auth::caller;
use crate::proto;
use crate::room::{Room, short};

/// Implements `cleanroom.v1.AuditService`.
#[derive(Debug, Clone)]
pub(super) struct Audit {
    room: Room,
}

impl Audit {
    pub(super) fn new(room: Room) -> Self {
        Audit { room }
    }
}

#[tonic::async_trait]
impl proto::audit_service_server::AuditService for Audit {
    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn list_audit_entries(
        &self,
        request: Request<proto::ListAuditEntriesRequest>,
    ) -> Result<Response<proto::ListAuditEntriesResponse>, Status> {
        let org = caller(&request)?;
        let r = request.get_ref();
        let (entries, next_page_token) = self
            .room
            .audit_page(&org, &r.agreement_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(proto::ListAuditEntriesResponse {
            entries: entries.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
