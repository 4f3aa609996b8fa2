//! The partner side of an erasure or opt-out: fingerprint identifiers on
//! this machine, exactly as for an upload, and send only the fingerprints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use arrow::array::{Array, FixedSizeBinaryArray};

use super::{CsvOptions, InputFormat, Plan, PrepareError, Preparer, UploadError};
use crate::client::{Client, ClientError};
use crate::proto;
use crate::proto::datasets_service_client::DatasetsServiceClient;

/// Fingerprints per request: 100,000 x 32 bytes stays under gRPC's default
/// 4 MiB message limit.
const FINGERPRINTS_PER_REQUEST: usize = 100_000;

/// Whose rows to erase, and how to read them.
#[derive(Debug, Clone)]
pub struct EraseOptions {
    pub agreement: String,
    pub dataset: String,
    /// A file with one or more of the dataset's identifier columns.
    pub input: PathBuf,
    pub format: Option<InputFormat>,
    pub csv: CsvOptions,
    /// Policy column -> input column.
    pub mapping: BTreeMap<String, String>,
}

/// What an erasure did.
#[derive(Debug, Clone, Default)]
pub struct EraseReport {
    /// Distinct fingerprints sent.
    pub fingerprints: u64,
    /// Input values that were not valid identifiers (never sent).
    pub invalid: u64,
    pub rows_removed: u64,
    pub rows_kept: u64,
    pub versions_deleted: u64,
}

/// Fingerprints the identifiers in `options.input` and asks the server to
/// remove the rows carrying them from the caller's dataset.
pub async fn erase(
    client: &Client,
    keys: impl Into<super::Keys<'_>>,
    options: &EraseOptions,
) -> Result<EraseReport, UploadError> {
    let (agreement, policy_hash, reader) = super::send::open_input(
        client,
        &options.agreement,
        &options.input,
        options.format,
        options.csv,
    )
    .await?;
    let keys = keys.into();
    let plan = Plan::identifiers(
        &agreement,
        &options.dataset,
        keys,
        reader.header(),
        &options.mapping,
    )?;
    let kinds = plan.identity_kinds();
    let mut preparer = Preparer::new(plan);
    let mut sets: BTreeMap<String, BTreeSet<[u8; 32]>> = BTreeMap::new();
    preparer.prepare_all(reader, super::workers(), Ok, |_, batch, _| {
        for (i, kind) in kinds.iter().enumerate() {
            let Some(kind) = kind else { continue };
            let column = batch
                .column(i)
                .as_any()
                .downcast_ref::<FixedSizeBinaryArray>()
                .ok_or_else(|| PrepareError::Plan("fingerprints are not 32 bytes".into()))?;
            let set = sets.entry(kind.clone()).or_default();
            for row in 0..column.len() {
                if column.is_valid(row) {
                    let fp: [u8; 32] = column
                        .value(row)
                        .try_into()
                        .map_err(|_| PrepareError::Plan("fingerprints are not 32 bytes".into()))?;
                    set.insert(fp);
                }
            }
        }
        Ok(true)
    })?;
    let mut report = EraseReport {
        invalid: preparer.stats().invalid.values().sum(),
        ..EraseReport::default()
    };
    let all: Vec<(String, [u8; 32])> = sets
        .into_iter()
        .flat_map(|(kind, set)| set.into_iter().map(move |fp| (kind.clone(), fp)))
        .collect();
    report.fingerprints = all.len() as u64;
    if all.is_empty() {
        return Err(PrepareError::Plan(
            "the input holds no valid identifier: nothing to erase".into(),
        )
        .into());
    }
    let mut datasets = DatasetsServiceClient::new(client.channel());
    for part in all.chunks(FINGERPRINTS_PER_REQUEST) {
        let mut by_kind: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for (kind, fp) in part {
            by_kind.entry(kind).or_default().extend_from_slice(fp);
        }
        let response = datasets
            .erase(proto::EraseRequest {
                agreement_id: options.agreement.clone(),
                dataset: options.dataset.clone(),
                policy_hash: policy_hash.clone(),
                key_id: keys.key_id(),
                sets: by_kind
                    .into_iter()
                    .map(|(kind, fingerprints)| proto::FingerprintSet {
                        kind: kind.to_string(),
                        fingerprints,
                    })
                    .collect(),
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        report.rows_removed += response.rows_removed;
        report.rows_kept = response.rows_kept;
        report.versions_deleted += response.versions_deleted;
    }
    Ok(report)
}
