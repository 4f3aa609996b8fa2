//! The `Agreements` service: who am I, which agreements, and one agreement
//! as the calling party may see it.

use tonic::{Request, Response, Status};

use super::auth::caller;
use crate::proto::{self, agreement_view, summary};
use crate::room::{Room, RoomError, short};

/// Implements `cleanroom.v1.AgreementsService`.
#[derive(Debug, Clone)]
pub(super) struct Agreements {
    room: Room,
}

impl Agreements {
    pub(super) fn new(room: Room) -> Self {
        Agreements { room }
    }
}

#[tonic::async_trait]
impl proto::agreements_service_server::AgreementsService for Agreements {
    #[tracing::instrument(skip_all)]
    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let org = caller(&request)?;
        let count = self.room.policies().for_org(&org).count();
        Ok(Response::new(proto::WhoAmIResponse {
            organisation: org,
            agreement_count: u32::try_from(count).unwrap_or(u32::MAX),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_agreements(
        &self,
        request: Request<proto::ListAgreementsRequest>,
    ) -> Result<Response<proto::ListAgreementsResponse>, Status> {
        let org = caller(&request)?;
        let today = self.room.clock().today();
        let policies = self.room.policies();
        let agreements = policies
            .for_org(&org)
            .map(|p| summary(p, &org, policies.state_of(p, today)))
            .collect();
        Ok(Response::new(proto::ListAgreementsResponse { agreements }))
    }

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn get_agreement(
        &self,
        request: Request<proto::GetAgreementRequest>,
    ) -> Result<Response<proto::GetAgreementResponse>, Status> {
        let org = caller(&request)?;
        let id = &request.get_ref().agreement_id;
        if id.is_empty() {
            return Err(RoomError::invalid("agreement_id", "must not be empty").into());
        }
        let policy = self.room.agreement_for(&org, id)?;
        let today = self.room.clock().today();
        Ok(Response::new(proto::GetAgreementResponse {
            agreement: Some(agreement_view(
                &policy,
                &org,
                self.room.policies().state_of(&policy, today),
            )),
        }))
    }
}
