//! The `Queries` service: governed aggregate SQL and the caller's budget.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::caller;
use crate::proto;
use crate::proto::query_response::Part;
use crate::room::{Governed, Room, RoomError, short};

/// Implements `cleanroom.v1.QueriesService`.
#[derive(Debug, Clone)]
pub(super) struct Queries {
    room: Room,
}

impl Queries {
    pub(super) fn new(room: Room) -> Self {
        Queries { room }
    }
}

/// A governed answer as the `Query` stream sends it: a header, the rows
/// as Arrow IPC messages, a summary.
fn answer_messages(governed: Governed) -> Result<Vec<proto::QueryResponse>, RoomError> {
    let Governed {
        policy,
        outcome,
        privacy,
        sql_hash,
        template,
        params_hash,
    } = governed;
    let mut parts = vec![Part::Header(proto::QueryHeader {
        policy_hash: policy.hash().to_hex(),
        min_group_size: policy.query().min_group_size(),
        datasets: outcome.checked.datasets.clone(),
        privacy: privacy.map(Into::into),
    })];
    let mut batches = outcome.batches.clone();
    if batches.is_empty() {
        batches.push(arrow::record_batch::RecordBatch::new_empty(Arc::clone(
            &outcome.schema,
        )));
    }
    for b in &batches {
        for ipc in crate::upload::encode_messages(b, crate::upload::MAX_MESSAGE_BYTES)
            .map_err(|e| RoomError::Internal(format!("encoding a result: {e}")))?
        {
            parts.push(Part::Batch(ipc));
        }
    }
    parts.push(Part::Summary(proto::QuerySummary {
        rows: outcome.rows(),
        sql_hash,
        template: template.unwrap_or_default(),
        params_hash: params_hash.unwrap_or_default(),
    }));
    Ok(parts
        .into_iter()
        .map(|part| proto::QueryResponse { part: Some(part) })
        .collect())
}

#[tonic::async_trait]
impl proto::queries_service_server::QueriesService for Queries {
    type QueryStream = ReceiverStream<Result<proto::QueryResponse, Status>>;

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let org = caller(&request)?;
        let governed = self
            .room
            .governed(&org, &request.into_inner().into())
            .await?;
        let messages = answer_messages(governed)?;
        let (tx, rx) = tokio::sync::mpsc::channel(messages.len().max(1));
        for message in messages {
            let _ = tx.try_send(Ok(message));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(agreement = %short(&request.get_ref().agreement_id)))]
    async fn budget(
        &self,
        request: Request<proto::BudgetRequest>,
    ) -> Result<Response<proto::BudgetResponse>, Status> {
        let org = caller(&request)?;
        let id = request.get_ref().agreement_id.clone();
        let room = self.room.clone();
        let budget = tokio::task::spawn_blocking(move || room.budget(&org, &id))
            .await
            .map_err(|e| RoomError::Internal(format!("reading the budget: {e}")))??;
        Ok(Response::new(budget.map(Into::into).unwrap_or_default()))
    }
}
