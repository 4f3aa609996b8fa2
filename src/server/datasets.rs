//! The `Datasets` service: uploads and erasures, and what the server holds
//! of the caller's own datasets.

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::caller;
use crate::proto;
use crate::proto::upload_request::Part;
use crate::room::{Broken, EraseAsk, Room, Upload, UploadHeader, short};

/// Implements `cleanroom.v1.DatasetsService`.
#[derive(Debug, Clone)]
pub(super) struct Datasets {
    room: Room,
}

impl Datasets {
    pub(super) fn new(room: Room) -> Self {
        Datasets { room }
    }
}

/// An upload's messages as the room reads them; a broken stream is logged
/// with its status code and ends the upload.
fn upload_parts(
    stream: Streaming<proto::UploadRequest>,
) -> impl Stream<Item = Result<Upload, Broken>> + Unpin {
    stream.map(|message| match message {
        Ok(m) => Ok(match m.part {
            Some(Part::Header(h)) => Upload::Header(UploadHeader {
                agreement: h.agreement_id,
                dataset: h.dataset,
                upload_id: h.upload_id,
                policy_hash: h.policy_hash,
                key_id: h.key_id,
            }),
            Some(Part::Batch(bytes)) => Upload::Batch(bytes),
            Some(Part::Commit(c)) => Upload::Commit {
                rows: c.rows,
                batches: c.batches,
            },
            None => Upload::Empty,
        }),
        Err(status) => {
            tracing::info!(code = ?status.code(), "upload stream broke; nothing stored");
            Err(Broken)
        }
    })
}

#[tonic::async_trait]
impl proto::datasets_service_server::DatasetsService for Datasets {
    #[tracing::instrument(skip_all)]
    async fn upload(
        &self,
        request: Request<Streaming<proto::UploadRequest>>,
    ) -> Result<Response<proto::UploadResponse>, Status> {
        let org = caller(&request)?;
        let parts = upload_parts(request.into_inner());
        let uploaded = self.room.upload(&org, parts).await?;
        Ok(Response::new(uploaded.into()))
    }

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn erase(
        &self,
        request: Request<proto::EraseRequest>,
    ) -> Result<Response<proto::EraseResponse>, Status> {
        let org = caller(&request)?;
        let r = request.into_inner();
        let ask = EraseAsk {
            agreement: r.agreement_id,
            dataset: r.dataset,
            policy_hash: r.policy_hash,
            key_id: r.key_id,
            sets: r
                .sets
                .into_iter()
                .map(|s| (s.kind, s.fingerprints))
                .collect(),
        };
        let erased = self.room.erase(&org, &ask).await?;
        Ok(Response::new(erased.into()))
    }

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn list_datasets(
        &self,
        request: Request<proto::ListDatasetsRequest>,
    ) -> Result<Response<proto::ListDatasetsResponse>, Status> {
        let org = caller(&request)?;
        let held = self.room.held(&org, &request.get_ref().agreement_id)?;
        Ok(Response::new(proto::ListDatasetsResponse {
            datasets: held.into_iter().map(Into::into).collect(),
        }))
    }
}
