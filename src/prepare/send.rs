//! Streaming a prepared file to the server: header, batches, commit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_stream::wrappers::ReceiverStream;

use arrow::record_batch::RecordBatch;

use super::{CsvOptions, InputFormat, InputReader, Plan, PrepareError, PrepareStats, Preparer};
use crate::client::{Client, ClientError};
use crate::proto;
use crate::proto::datasets_service_client::DatasetsServiceClient;
use crate::proto::upload_request::Part;
use crate::upload::{MAX_MESSAGE_BYTES, ROWS_PER_MESSAGE, encode_messages};

/// What to upload and how to read it.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub agreement: String,
    pub dataset: String,
    pub input: PathBuf,
    /// Detected from the file name when unset.
    pub format: Option<InputFormat>,
    pub csv: CsvOptions,
    /// Policy column -> input column.
    pub mapping: BTreeMap<String, String>,
    /// Reuse an id to retry an upload idempotently; random when unset.
    pub upload_id: Option<String>,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct UploadReport {
    pub upload_id: String,
    pub response: proto::UploadResponse,
    pub stats: PrepareStats,
    /// Input columns that never left this machine.
    pub dropped: Vec<String>,
    pub batches: u64,
    /// Arrow IPC bytes sent.
    pub bytes_sent: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Server(#[from] ClientError),
}

impl UploadError {
    /// The gRPC status code, when the server refused the upload.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            UploadError::Server(e) => e.code(),
            UploadError::Prepare(_) => None,
        }
    }
}

fn random_upload_id() -> String {
    let mut bytes = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source failed");
    hex::encode(bytes)
}

fn progress_bar(total_bytes: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .expect("valid progress template"),
    );
    bar
}

struct Produced {
    stats: PrepareStats,
    dropped: Vec<String>,
    batches: u64,
    bytes: u64,
}

/// Reads, prepares and sends on blocking threads; the gRPC call consumes
/// the channel. Ends early, without a commit, if the server stops listening.
fn produce(
    reader: InputReader,
    plan: Plan,
    tx: tokio::sync::mpsc::Sender<proto::UploadRequest>,
    bar: ProgressBar,
) -> Result<Produced, PrepareError> {
    let started = Instant::now();
    let dropped = plan.dropped().to_vec();
    let mut preparer = Preparer::new(plan);
    let (mut batches, mut bytes) = (0u64, 0u64);
    let encode = |batch: RecordBatch| {
        if batch.num_rows() == 0 {
            return Ok(Vec::new());
        }
        encode_messages(&batch, MAX_MESSAGE_BYTES)
            .map_err(|e| PrepareError::Plan(format!("encoding a batch: {e}")))
    };
    let complete = preparer.prepare_all(
        reader,
        super::workers(),
        encode,
        |stats, messages, position| {
            for ipc in messages {
                bytes += ipc.len() as u64;
                let message = proto::UploadRequest {
                    part: Some(Part::Batch(ipc)),
                };
                if tx.blocking_send(message).is_err() {
                    // The server ended the call; its answer says why.
                    return Ok(false);
                }
                batches += 1;
            }
            let rows = stats.rows_read;
            let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(position);
            bar.set_message(format!("{rows} rows, {rate:.0} rows/s"));
            Ok(true)
        },
    )?;
    let stats = preparer.stats().clone();
    if complete {
        let _ = tx.blocking_send(proto::UploadRequest {
            part: Some(Part::Commit(proto::UploadCommit {
                rows: stats.rows_sent,
                batches,
            })),
        });
    }
    bar.finish_and_clear();
    Ok(Produced {
        stats,
        dropped,
        batches,
        bytes,
    })
}

/// Prepares `options.input` on this machine and uploads it.
/// The agreement as the caller sees it, the hash of the policy it was read
/// under, and a reader over the partner's file.
pub(super) async fn open_input(
    client: &Client,
    agreement: &str,
    input: &std::path::Path,
    format: Option<InputFormat>,
    csv: super::CsvOptions,
) -> Result<(proto::Agreement, String, InputReader), UploadError> {
    let agreement = client.clone().get_agreement(agreement).await?;
    let policy_hash = agreement
        .summary
        .as_ref()
        .map(|s| s.policy_hash.clone())
        .unwrap_or_default();
    let format = format.unwrap_or_else(|| InputFormat::from_path(input));
    let reader = InputReader::open(input, format, csv, ROWS_PER_MESSAGE)?;
    Ok((agreement, policy_hash, reader))
}

pub async fn upload(
    client: &Client,
    keys: impl Into<super::Keys<'_>>,
    options: &UploadOptions,
) -> Result<UploadReport, UploadError> {
    let started = Instant::now();
    let (agreement, policy_hash, reader) = open_input(
        client,
        &options.agreement,
        &options.input,
        options.format,
        options.csv,
    )
    .await?;
    let keys = keys.into();
    let plan = Plan::new(
        &agreement,
        &options.dataset,
        keys,
        reader.header(),
        &options.mapping,
    )?;
    let upload_id = options.upload_id.clone().unwrap_or_else(random_upload_id);

    let (tx, rx) = tokio::sync::mpsc::channel::<proto::UploadRequest>(4);
    let header = proto::UploadRequest {
        part: Some(Part::Header(proto::UploadHeader {
            agreement_id: options.agreement.clone(),
            dataset: options.dataset.clone(),
            upload_id: upload_id.clone(),
            policy_hash,
            key_id: keys.key_id(),
        })),
    };
    tx.send(header)
        .await
        .expect("the receiver is held until the call starts");
    let bar = progress_bar(reader.bytes_total(), options.progress);
    let producer = tokio::task::spawn_blocking(move || produce(reader, plan, tx, bar));
    let answer = DatasetsServiceClient::new(client.channel())
        .upload(ReceiverStream::new(rx))
        .await;
    let produced = producer
        .await
        .map_err(|e| PrepareError::Plan(format!("preparation thread failed: {e}")))?;
    // A local failure explains a server refusal of the truncated stream.
    let produced = produced?;
    let response = answer.map_err(ClientError::from)?.into_inner();
    Ok(UploadReport {
        upload_id,
        response,
        stats: produced.stats,
        dropped: produced.dropped,
        batches: produced.batches,
        bytes_sent: produced.bytes,
        elapsed: started.elapsed(),
    })
}
