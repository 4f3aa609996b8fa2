//! The `Governance` service: access reports for parties and the admin view.

use tonic::{Request, Response, Status};

use super::auth::caller;
use crate::proto;
use crate::room::{Room, RoomError, short};

/// Implements `cleanroom.v1.GovernanceService`.
#[derive(Debug, Clone)]
pub(super) struct Governance {
    room: Room,
}

impl Governance {
    pub(super) fn new(room: Room) -> Self {
        Governance { room }
    }
}

#[tonic::async_trait]
impl proto::governance_service_server::GovernanceService for Governance {
    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn access_report(
        &self,
        request: Request<proto::AccessReportRequest>,
    ) -> Result<Response<proto::AccessReportResponse>, Status> {
        let org = caller(&request)?;
        let id = request.get_ref().agreement_id.clone();
        let room = self.room.clone();
        let report = tokio::task::spawn_blocking(move || room.access_report(&org, &id))
            .await
            .map_err(|e| RoomError::Internal(format!("access report: {e}")))??;
        Ok(Response::new(report.into()))
    }

    #[tracing::instrument(skip_all)]
    async fn admin_status(
        &self,
        request: Request<proto::AdminStatusRequest>,
    ) -> Result<Response<proto::AdminStatusResponse>, Status> {
        let org = caller(&request)?;
        let room = self.room.clone();
        let status = tokio::task::spawn_blocking(move || room.admin_status(&org))
            .await
            .map_err(|e| RoomError::Internal(format!("admin status: {e}")))??;
        Ok(Response::new(status.into()))
    }
}
