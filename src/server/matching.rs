//! The `Matching` service: the overlap between two parties' datasets, and
//! the blinding relay of matching without a shared secret.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::caller;
use crate::proto;
use crate::room::{Broken, OverlapAsk, Room, RoomError, short};

/// Implements `cleanroom.v1.MatchingService`.
#[derive(Debug, Clone)]
pub(super) struct Matching {
    room: Room,
}

impl Matching {
    pub(super) fn new(room: Room) -> Self {
        Matching { room }
    }
}

type WorkStream = Pin<Box<dyn Stream<Item = Result<proto::BlindingWorkResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::matching_service_server::MatchingService for Matching {
    type BlindingWorkStream = WorkStream;

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn blinding_work(
        &self,
        request: Request<proto::BlindingWorkRequest>,
    ) -> Result<Response<WorkStream>, Status> {
        let org = caller(&request)?;
        let r = request.get_ref();
        let work = self
            .room
            .blinding_work(&org, &r.agreement_id, &r.key_id)
            .await?;
        let messages = work.into_iter().flat_map(proto::blinding_chunks).map(Ok);
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    #[tracing::instrument(skip_all)]
    async fn submit_blinding(
        &self,
        request: Request<Streaming<proto::SubmitBlindingRequest>>,
    ) -> Result<Response<proto::SubmitBlindingResponse>, Status> {
        let org = caller(&request)?;
        let mut stream = request.into_inner();
        let Ok(Some(first)) = stream.message().await else {
            return Err(RoomError::invalid(
                "job_id",
                "the first message must name the agreement and the job",
            )
            .into());
        };
        let rest = stream.map(|m| match m {
            Ok(m) => Ok(m.points),
            Err(status) => {
                tracing::info!(code = ?status.code(), "a blinding stream broke");
                Err(Broken)
            }
        });
        let blinded = self
            .room
            .submit_blinding(&org, &first.agreement_id, &first.job_id, first.points, rest)
            .await?;
        Ok(Response::new(blinded.into()))
    }

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn overlap(
        &self,
        request: Request<proto::OverlapRequest>,
    ) -> Result<Response<proto::OverlapResponse>, Status> {
        let org = caller(&request)?;
        let r = request.into_inner();
        let ask = OverlapAsk {
            agreement: r.agreement_id,
            datasets: r.datasets,
            epsilon: r.epsilon,
        };
        let overlap = self.room.overlap(&org, &ask).await?;
        Ok(Response::new(overlap.into()))
    }
}
