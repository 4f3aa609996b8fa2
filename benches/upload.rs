//! Upload throughput over loopback mutual TLS, client and server in one
//! process on this machine.
//!
//! ```text
//! cargo bench --bench upload                      # 1M rows
//! cargo bench --bench upload -- --rows 10000000   # 10M rows
//! ```
//!
//! Prints rows/s for: client-side preparation alone (read CSV, normalise,
//! fingerprint, encode Arrow IPC); transfer plus server validation,
//! encryption and commit of already prepared batches; the commit step alone;
//! and the whole upload end to end.

mod common;

// The allocator of the `cleanroom` binary, so the client side here is what
// `cleanroom upload` does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::arg;

use std::time::{Duration, Instant};

use cleanroom::prepare::{
    CsvOptions, InputFormat, InputReader, Plan, Preparer, UploadOptions, upload,
};
use cleanroom::proto;
use cleanroom::proto::datasets_service_client::DatasetsServiceClient;
use cleanroom::proto::upload_request::Part;
use cleanroom::upload::{MAX_MESSAGE_BYTES, ROWS_PER_MESSAGE, encode_messages};

fn rate(rows: u64, d: Duration) -> String {
    format!(
        "{:>12.0} rows/s  ({:.2} s)",
        rows as f64 / d.as_secs_f64(),
        d.as_secs_f64()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = arg("--rows", 1_000_000);
    let work = tempfile::tempdir()?;
    let certs = common::pki(work.path())?;

    let t = Instant::now();
    let truth = cleanroom::synth::generate(&cleanroom::synth::SynthOptions {
        rows,
        overlap: 0.3,
        seed: 1,
        out: work.path().join("synth"),
    })?;
    common::flush_files(&work.path().join("synth"))?;
    let input = work.path().join("synth").join(cleanroom::synth::ACME_FILE);
    let size = std::fs::metadata(&input)?.len();
    println!(
        "generated {} rows ({:.0} MiB CSV) in {:.1} s",
        truth.acme_rows,
        size as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );

    let server = common::InProcess::start(
        &certs,
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        &work.path().join("data"),
    )
    .await?;
    let mut client = common::connect(&server.url, &certs, "acme").await?;
    let agreement = client.get_agreement("retail-media-demo").await?;
    let secret = cleanroom::identity::Secret::generate();

    // 1. Client-side preparation alone, on as many threads as an upload uses.
    let t = Instant::now();
    let reader = InputReader::open(
        &input,
        InputFormat::Csv,
        CsvOptions::default(),
        ROWS_PER_MESSAGE,
    )?;
    let plan = Plan::new(
        &agreement,
        "customers",
        (&secret).into(),
        reader.header(),
        &Default::default(),
    )?;
    let mut preparer = Preparer::new(plan);
    let mut messages = Vec::new();
    let mut bytes = 0usize;
    let encode = |batch: arrow::record_batch::RecordBatch| {
        encode_messages(&batch, MAX_MESSAGE_BYTES)
            .map_err(|e| cleanroom::prepare::PrepareError::Plan(e.to_string()))
    };
    preparer.prepare_all(
        reader,
        cleanroom::prepare::workers(),
        encode,
        |_, ipcs, _| {
            for ipc in ipcs {
                bytes += ipc.len();
                messages.push(ipc);
            }
            Ok(true)
        },
    )?;
    let prepare_time = t.elapsed();
    let sent_rows = preparer.stats().rows_sent;

    // 2. Transfer + server validation, encryption and commit of prepared batches.
    let hash = agreement
        .summary
        .as_ref()
        .map(|s| s.policy_hash.clone())
        .unwrap_or_default();
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::UploadRequest>(4);
    let batches = messages.len() as u64;
    let feeder = tokio::spawn(async move {
        let _ = tx
            .send(proto::UploadRequest {
                part: Some(Part::Header(proto::UploadHeader {
                    agreement_id: "retail-media-demo".into(),
                    dataset: "customers".into(),
                    upload_id: "bench-ingest".into(),
                    policy_hash: hash,
                    key_id: Vec::new(),
                })),
            })
            .await;
        for m in messages {
            let _ = tx
                .send(proto::UploadRequest {
                    part: Some(Part::Batch(m)),
                })
                .await;
        }
        let at = Instant::now();
        let _ = tx
            .send(proto::UploadRequest {
                part: Some(Part::Commit(proto::UploadCommit {
                    rows: sent_rows,
                    batches,
                })),
            })
            .await;
        at
    });
    let t = Instant::now();
    DatasetsServiceClient::new(client.channel())
        .max_encoding_message_size(8 << 20)
        .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    let ingest_time = t.elapsed();
    let commit_time = feeder.await?.elapsed();

    // 3. The whole upload, end to end.
    let options = UploadOptions {
        agreement: "retail-media-demo".into(),
        dataset: "customers".into(),
        input: input.clone(),
        format: None,
        csv: CsvOptions::default(),
        mapping: Default::default(),
        upload_id: Some("bench-end-to-end".into()),
        progress: false,
    };
    let t = Instant::now();
    let report = upload(&client, &secret, &options).await?;
    let total_time = t.elapsed();

    println!(
        "rows read {}, rows sent {sent_rows}, {batches} batches, {:.0} MiB Arrow IPC",
        truth.acme_rows,
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "client preparation (read, normalise, fingerprint, encode) {}",
        rate(truth.acme_rows, prepare_time)
    );
    println!(
        "transfer + server validate/encrypt/commit               {}",
        rate(sent_rows, ingest_time)
    );
    println!(
        "  of which the commit (fsync, rename, metadata)          {:.3} s",
        commit_time.as_secs_f64()
    );
    println!(
        "end to end (cleanroom upload)                            {}",
        rate(report.stats.rows_read, total_time)
    );
    server.stop().await?;
    Ok(())
}
