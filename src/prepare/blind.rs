//! The party side of matching without a shared secret (`matching = "ecdh"`):
//! fetch the partner's points the server relays, blind each once more with
//! this party's key, and send them back in the order they came.

use futures::StreamExt;

use super::{PrepareError, UploadError};
use crate::client::{Client, ClientError};
use crate::identity::blinding::{BlindingKey, POINT_LEN, POINTS_PER_MESSAGE, reblind};
use crate::proto;
use crate::proto::matching_service_client::MatchingServiceClient;

/// One job the server handed out: a partner dataset's distinct points, in
/// a shuffled order.
#[derive(Debug, Clone)]
pub struct Job {
    pub header: proto::BlindingJob,
    /// Concatenated 32-byte compressed points.
    pub points: Vec<u8>,
}

/// One job done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindingDone {
    pub dataset: String,
    pub owner: String,
    pub version: String,
    pub points: u64,
}

/// What `cleanroom match` did and what is left.
#[derive(Debug, Clone)]
pub struct MatchReport {
    pub done: Vec<BlindingDone>,
    /// The caller's own datasets with their states afterwards.
    pub own: Vec<proto::DatasetVersion>,
}

fn malformed(detail: String) -> UploadError {
    UploadError::Server(ClientError::Status(tonic::Status::internal(detail)))
}

/// Every job the server has for the caller in `agreement` and its `key`
/// (only the key id, a public point, is sent), received whole.
/// These are the only points a party ever receives, and they are its
/// partner's.
pub async fn fetch_work(
    client: &Client,
    key: &BlindingKey,
    agreement: &str,
) -> Result<Vec<Job>, UploadError> {
    let mut stream = MatchingServiceClient::new(client.channel())
        .blinding_work(proto::BlindingWorkRequest {
            agreement_id: agreement.to_string(),
            key_id: key.key_id().to_vec(),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let mut jobs: Vec<Job> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ClientError::from)?;
        match (chunk.job, jobs.last_mut()) {
            (Some(header), _) => jobs.push(Job {
                header,
                points: chunk.points,
            }),
            (None, Some(job)) => job.points.extend_from_slice(&chunk.points),
            (None, None) => {
                return Err(malformed(
                    "the server sent points before naming their job".into(),
                ));
            }
        }
    }
    for job in &jobs {
        if job.points.len() as u64 != job.header.points * POINT_LEN as u64 {
            return Err(malformed(format!(
                "the server announced {} points for dataset {:?} and sent {} bytes",
                job.header.points,
                job.header.dataset,
                job.points.len()
            )));
        }
    }
    Ok(jobs)
}

/// Blinds one job's points with `key` and returns them.
pub async fn complete_job(
    client: &Client,
    key: &BlindingKey,
    agreement: &str,
    job: Job,
) -> Result<BlindingDone, UploadError> {
    let points: Vec<[u8; POINT_LEN]> = job
        .points
        .chunks_exact(POINT_LEN)
        .map(|c| c.try_into().expect("32-byte chunks"))
        .collect();
    let key = key.clone();
    let blinded = tokio::task::spawn_blocking(move || reblind(&key, &points))
        .await
        .map_err(|e| PrepareError::Plan(format!("blinding: {e}")))?
        .map_err(|e| {
            PrepareError::Plan(format!(
                "the partner's dataset {:?} holds a malformed point: {e}; nothing was sent",
                job.header.dataset
            ))
        })?;
    let bytes: Vec<u8> = blinded.concat();
    let mut messages: Vec<proto::SubmitBlindingRequest> = bytes
        .chunks(POINTS_PER_MESSAGE * POINT_LEN)
        .map(|c| proto::SubmitBlindingRequest {
            points: c.to_vec(),
            ..Default::default()
        })
        .collect();
    if messages.is_empty() {
        messages.push(proto::SubmitBlindingRequest::default());
    }
    messages[0].agreement_id = agreement.to_string();
    messages[0].job_id = job.header.job_id.clone();
    let response = MatchingServiceClient::new(client.channel())
        .submit_blinding(futures::stream::iter(messages))
        .await
        .map_err(ClientError::from)?
        .into_inner();
    Ok(BlindingDone {
        dataset: response.dataset,
        owner: job.header.owner,
        version: response.version,
        points: response.points,
    })
}

/// Does every blinding the caller owes its partner in `agreement`, then
/// reports the state of the caller's own datasets.
pub async fn match_pending(
    client: &Client,
    key: &BlindingKey,
    agreement: &str,
) -> Result<MatchReport, UploadError> {
    let mut done = Vec::new();
    for job in fetch_work(client, key, agreement).await? {
        done.push(complete_job(client, key, agreement, job).await?);
    }
    let own = client.clone().list_datasets(agreement).await?;
    Ok(MatchReport { done, own })
}
