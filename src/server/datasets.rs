//! The `Datasets` service: streamed, validated, atomic uploads, and what the
//! server holds of the caller's own datasets.

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::AppState;
use super::auth::caller;
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{AgreementState, Policy, Right};
use crate::proto;
use crate::proto::upload_request::Part;
use crate::storage::KeyId;
use crate::upload::{Rejection, RejectionKind, Validator, decode_batches};

/// Implements `cleanroom.v1.Datasets`.
#[derive(Debug, Clone)]
pub struct DatasetsService {
    state: AppState,
}

impl DatasetsService {
    pub fn new(state: AppState) -> Self {
        DatasetsService { state }
    }
}

fn bad(field: &'static str, rule: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument {
        field,
        rule: rule.into(),
    }
}

fn valid_upload_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The agreement, if `org` is a party to it, and only while it is in force.
pub(super) fn agreement_in_force(
    state: &AppState,
    org: &str,
    id: &str,
) -> Result<Arc<Policy>, ServiceError> {
    let policy = state.agreement_for(org, id)?;
    match state.policies().state_of(&policy, state.clock().today()) {
        AgreementState::Active => Ok(policy),
        other => Err(ServiceError::NotInForce {
            id: id.to_string(),
            state: other.as_str(),
        }),
    }
}

impl DatasetsService {
    async fn run_erase(
        &self,
        org: &str,
        request: &proto::EraseRequest,
    ) -> Result<proto::EraseResponse, ServiceError> {
        let policy = agreement_in_force(&self.state, org, &request.agreement_id)?;
        super::bounded_name("dataset", &request.dataset)?;
        let Some(dataset) = policy.dataset(&request.dataset) else {
            return Err(bad(
                "dataset",
                format!("{:?} is not a dataset of this agreement", request.dataset),
            ));
        };
        if dataset.owner() != org || !policy.allows(org, Right::Upload) {
            return Err(ServiceError::PermissionDenied {
                rule: "party.rights",
                detail: format!(
                    "{org} may not erase from dataset {:?}: only its owner, with the upload right",
                    dataset.name()
                ),
            });
        }
        if request.policy_hash != policy.hash().to_hex() {
            return Err(ServiceError::PolicyChanged(policy.id().to_string()));
        }
        let key = super::blinding::key_id_of(&policy, &request.key_id)?;
        // Fingerprints per identifier column of the dataset.
        let columns = dataset.identifier_columns();
        let mut wanted: Vec<(String, HashSet<[u8; 32]>)> = Vec::new();
        for set in &request.sets {
            super::bounded_name("sets.kind", &set.kind)?;
            if !columns.iter().any(|(_, kind)| *kind == set.kind) {
                return Err(bad(
                    "sets.kind",
                    format!(
                        "{:?} is not an identity kind of dataset {:?}",
                        set.kind,
                        dataset.name()
                    ),
                ));
            }
            if set.fingerprints.is_empty() || set.fingerprints.len() % 32 != 0 {
                return Err(bad(
                    "sets.fingerprints",
                    "must be a non-empty concatenation of 32-byte fingerprints",
                ));
            }
            let fps: HashSet<[u8; 32]> = set
                .fingerprints
                .chunks_exact(32)
                .map(|c| <[u8; 32]>::try_from(c).unwrap_or([0; 32]))
                .collect();
            for (name, kind) in &columns {
                if *kind == set.kind {
                    wanted.push((name.to_string(), fps.clone()));
                }
            }
        }
        if wanted.is_empty() {
            return Err(bad("sets", "no fingerprints to erase"));
        }
        let (state, policy, org) = (self.state.clone(), Arc::clone(&policy), org.to_string());
        let dataset = dataset.name().to_string();
        tokio::task::spawn_blocking(move || {
            erase_rows(&state, &policy, &dataset, &org, &wanted, key.as_ref())
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("erasing: {e}")))?
    }
}

/// Writes the dataset's current version again without the rows carrying
/// one of the `wanted` fingerprints, then deletes every older version.
/// Under `ecdh`, `key` is the id of the key the wanted points were blinded
/// with; it must be the current version's.
fn erase_rows(
    state: &AppState,
    policy: &Policy,
    dataset: &str,
    org: &str,
    wanted: &[(String, HashSet<[u8; 32]>)],
    key: Option<&KeyId>,
) -> Result<proto::EraseResponse, ServiceError> {
    use arrow::array::{Array, BooleanArray, FixedSizeBinaryArray};
    let lock = state.dataset_lock(policy.id(), dataset);
    let _serialised = lock.lock().unwrap_or_else(|e| e.into_inner());
    let store = state.store();
    let Some(current) = store.current(policy.id(), dataset)? else {
        return Err(ServiceError::NoData(dataset.to_string()));
    };
    // The fingerprints to erase were made under today's settings: against
    // rows made otherwise they would find no one and report success.
    if policy
        .dataset(dataset)
        .is_some_and(|d| !policy.made_now(d, &current.form))
    {
        return Err(ServiceError::NeedsUpload(dataset.to_string()));
    }
    let owner_key = store.owner_key(&current)?;
    if key.is_some() && owner_key.as_ref() != key {
        return Err(super::blinding::other_key(dataset));
    }
    let batches = store.read(&current)?;
    let mut kept_batches = Vec::with_capacity(batches.len());
    let (mut removed, mut kept) = (0u64, 0u64);
    for batch in &batches {
        let mut keep = vec![true; batch.num_rows()];
        for (name, fps) in wanted {
            // By name in the stored schema: the policy may list its columns
            // in another order than the version was stored in.
            let Some(column) = batch.schema().index_of(name).ok().and_then(|i| {
                batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<FixedSizeBinaryArray>()
            }) else {
                continue;
            };
            for (row, k) in keep.iter_mut().enumerate() {
                if *k
                    && column.is_valid(row)
                    && <[u8; 32]>::try_from(column.value(row)).is_ok_and(|fp| fps.contains(&fp))
                {
                    *k = false;
                }
            }
        }
        let mask = BooleanArray::from(keep);
        removed += (mask.len() - mask.true_count()) as u64;
        let filtered = arrow::compute::filter_record_batch(batch, &mask)
            .map_err(|e| ServiceError::Internal(format!("filtering rows: {e}")))?;
        kept += filtered.num_rows() as u64;
        kept_batches.push(filtered);
    }
    if removed == 0 {
        return Ok(proto::EraseResponse {
            rows_removed: 0,
            rows_kept: kept,
            version: String::new(),
            versions_deleted: 0,
        });
    }
    let mut staged = store.stage(policy.id(), dataset)?;
    for b in kept_batches.iter().filter(|b| b.num_rows() > 0) {
        let ipc = crate::upload::encode_batch(b)
            .map_err(|e| ServiceError::Internal(format!("encoding rows: {e}")))?;
        staged.append(&ipc, b.num_rows() as u64)?;
    }
    let mut id = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| ServiceError::Internal("the system random source failed".into()))?;
    state.still_open()?;
    let info = store.commit(
        staged,
        crate::storage::Commit {
            base: Some(&current.version),
            upload_id: &format!("{}{}", crate::storage::ERASURE_ID_PREFIX, hex::encode(id)),
            uploaded_by: org,
            policy_hash: &policy.hash().to_hex(),
            // The rows kept are as they were made.
            form: &current.form,
            committed_at: state.clock().now().unix_timestamp(),
            owner_key: owner_key.as_ref(),
        },
    )?;
    let older: Vec<_> = store
        .versions(policy.id(), dataset)?
        .into_iter()
        .filter(|v| v.version != info.version)
        .collect();
    // Under ecdh the new version keeps the partner's blinding of the points
    // it still holds: nothing of the erased rows, and no wait for the partner.
    super::blinding::carry_over(store, policy, &current, &info, &kept_batches)?;
    crate::crash::point("erase.committed");
    store.delete_versions(&older)?;
    state.versions_changed(policy.id());
    Ok(proto::EraseResponse {
        rows_removed: removed,
        rows_kept: kept,
        version: info.version,
        versions_deleted: older.len() as u64,
    })
}

async fn read_header(
    stream: &mut Streaming<proto::UploadRequest>,
) -> Result<proto::UploadHeader, ServiceError> {
    match stream.message().await {
        Ok(Some(proto::UploadRequest {
            part: Some(Part::Header(h)),
        })) => Ok(h),
        Ok(_) => Err(bad("header", "the first message must be the upload header")),
        Err(status) => {
            tracing::info!(code = ?status.code(), "upload stream broke before its header");
            Err(bad("header", "the upload stream broke before its header"))
        }
    }
}

impl DatasetsService {
    async fn run_upload(
        &self,
        org: String,
        header: proto::UploadHeader,
        mut stream: Streaming<proto::UploadRequest>,
    ) -> Result<proto::UploadResponse, ServiceError> {
        let policy = agreement_in_force(&self.state, &org, &header.agreement_id)?;
        super::bounded_name("dataset", &header.dataset)?;
        let Some(dataset) = policy.dataset(&header.dataset) else {
            return Err(bad(
                "dataset",
                format!("{:?} is not a dataset of this agreement", header.dataset),
            ));
        };
        if dataset.owner() != org || !policy.allows(&org, Right::Upload) {
            return Err(ServiceError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} may not upload dataset {:?}", dataset.name()),
            });
        }
        if !valid_upload_id(&header.upload_id) {
            return Err(bad(
                "upload_id",
                "must be 1-64 characters of A-Z, a-z, 0-9, '-' and '_'",
            ));
        }
        if header.policy_hash != policy.hash().to_hex() {
            return Err(ServiceError::PolicyChanged(policy.id().to_string()));
        }
        let owner_key = super::blinding::key_id_of(&policy, &header.key_id)?;
        let store = self.state.store();
        if let Some(done) = store.find_upload(policy.id(), dataset.name(), &header.upload_id)? {
            tracing::info!(version = %done.version, "upload id already committed; nothing stored again");
            return Ok(proto::UploadResponse {
                version: done.version,
                rows: done.rows,
                already_committed: true,
                committed_at: done.committed_at,
            });
        }

        // The version this upload replaces: if another commits first (an
        // upload or an erasure), this one is refused at its commit.
        let base = store
            .current(policy.id(), dataset.name())?
            .map(|v| v.version);
        let limits = self.state.limits();
        let started = tokio::time::Instant::now();
        let mut validator = Validator::new(dataset, limits);
        let mut staged = store.stage(policy.id(), dataset.name())?;
        let mut messages = 0u64;
        loop {
            let left = limits.max_duration.saturating_sub(started.elapsed());
            let wait = limits.idle_timeout.min(left);
            let next = match tokio::time::timeout(wait, stream.message()).await {
                Ok(next) => next,
                Err(_) => {
                    let (rule, detail) = if wait < limits.idle_timeout {
                        (
                            "upload.duration",
                            format!(
                                "the upload ran longer than {} s (upload_max_seconds); nothing was stored",
                                limits.max_duration.as_secs()
                            ),
                        )
                    } else {
                        (
                            "upload.idle",
                            format!(
                                "no message for {} s (upload_idle_timeout_seconds); nothing was stored",
                                limits.idle_timeout.as_secs()
                            ),
                        )
                    };
                    tracing::info!(rule, "upload stream timed out; nothing stored");
                    return Err(ServiceError::LimitExceeded { rule, detail });
                }
            };
            let message = match next {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(bad(
                        "commit",
                        "the upload ended without a commit; nothing was stored",
                    ));
                }
                Err(status) => {
                    tracing::info!(code = ?status.code(), "upload stream broke; nothing stored");
                    return Err(bad("batch", "the upload stream broke; nothing was stored"));
                }
            };
            match message.part {
                Some(Part::Batch(bytes)) => {
                    let batches = decode_batches(&bytes).map_err(|_| {
                        bad(
                            "batch",
                            format!("message {} is not an Arrow IPC stream", messages + 1),
                        )
                    })?;
                    if batches.is_empty() {
                        return Err(ServiceError::UploadRejected(Rejection {
                            kind: RejectionKind::Invalid,
                            rule: "upload.batch",
                            column: None,
                            detail: format!(
                                "message {} holds no record batch; nothing was stored",
                                messages + 1
                            ),
                            row: None,
                        }));
                    }
                    for (i, batch) in batches.iter().enumerate() {
                        let len = if i == 0 { bytes.len() } else { 0 };
                        validator
                            .check(batch, len)
                            .map_err(ServiceError::UploadRejected)?;
                        // What is stored is what was validated, encoded
                        // again by the server: the upload schema exactly,
                        // without the sender's metadata or extra buffers.
                        let clean = validator.restate(batch).map_err(|e| {
                            ServiceError::Internal(format!("re-encoding a batch: {e}"))
                        })?;
                        let ipc = crate::upload::encode_batch(&clean).map_err(|e| {
                            ServiceError::Internal(format!("re-encoding a batch: {e}"))
                        })?;
                        staged.append(&ipc, clean.num_rows() as u64)?;
                    }
                    messages += 1;
                }
                Some(Part::Commit(commit)) => {
                    if commit.rows != validator.rows() || commit.batches != messages {
                        return Err(bad(
                            "commit",
                            format!(
                                "the client sent {} rows in {} batches but the server received {} in {}; nothing was stored",
                                commit.rows,
                                commit.batches,
                                validator.rows(),
                                messages
                            ),
                        ));
                    }
                    if validator.rows() == 0 {
                        return Err(ServiceError::UploadRejected(Rejection {
                            kind: RejectionKind::Invalid,
                            rule: "upload.empty",
                            column: None,
                            detail: "an upload holds at least one row; nothing was stored".into(),
                            row: None,
                        }));
                    }
                    if staged.rows() != validator.rows() {
                        return Err(ServiceError::Internal(format!(
                            "staged {} rows but validated {}",
                            staged.rows(),
                            validator.rows()
                        )));
                    }
                    let upload_id = header.upload_id.clone();
                    let hash = policy.hash().to_hex();
                    let form = policy.data_form(dataset);
                    let now = self.state.clock().now().unix_timestamp();
                    let store = store.clone();
                    let org = org.clone();
                    let lock = self.state.dataset_lock(policy.id(), dataset.name());
                    let state = self.state.clone();
                    let info = tokio::task::spawn_blocking(move || {
                        let _serialised = lock.lock().unwrap_or_else(|e| e.into_inner());
                        state.still_open()?;
                        crate::crash::point("upload.staged");
                        store
                            .commit(
                                staged,
                                crate::storage::Commit {
                                    base: base.as_deref(),
                                    upload_id: &upload_id,
                                    uploaded_by: &org,
                                    policy_hash: &hash,
                                    form: &form,
                                    committed_at: now,
                                    owner_key: owner_key.as_ref(),
                                },
                            )
                            .map_err(ServiceError::from)
                    })
                    .await
                    .map_err(|e| ServiceError::Internal(format!("commit task: {e}")))??;
                    tracing::info!(
                        agreement = %info.agreement,
                        dataset = %info.dataset,
                        version = %info.version,
                        rows = info.rows,
                        bytes = info.bytes,
                        "upload committed"
                    );
                    self.state.metrics().uploaded(info.rows, info.bytes);
                    self.state.versions_changed(policy.id());
                    return Ok(proto::UploadResponse {
                        already_committed: info.upload_id != header.upload_id,
                        version: info.version,
                        rows: info.rows,
                        committed_at: info.committed_at,
                    });
                }
                Some(Part::Header(_)) | None => {
                    return Err(bad("header", "an upload has exactly one header, first"));
                }
            }
        }
    }
}

#[tonic::async_trait]
impl proto::datasets_server::Datasets for DatasetsService {
    #[tracing::instrument(skip_all)]
    async fn upload(
        &self,
        request: Request<Streaming<proto::UploadRequest>>,
    ) -> Result<Response<proto::UploadResponse>, Status> {
        let org = caller(&request)?;
        let mut stream = request.into_inner();
        let header = read_header(&mut stream).await;
        let (agreement, dataset) = header
            .as_ref()
            .map(|h| (h.agreement_id.clone(), h.dataset.clone()))
            .unwrap_or_default();
        let outcome = match header {
            Ok(header) => self.run_upload(org.clone(), header, stream).await,
            Err(e) => Err(e),
        };
        let event = Event {
            org,
            agreement,
            action: "upload",
            subject: Some(dataset.clone()),
            ..Event::default()
        };
        self.state.audit_outcome(event, &outcome, |r, e| {
            e.subject = Some(format!("{dataset} {}", r.version));
            e.rows = Some(r.rows);
        })?;
        Ok(Response::new(outcome?))
    }

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn erase(
        &self,
        request: Request<proto::EraseRequest>,
    ) -> Result<Response<proto::EraseResponse>, Status> {
        let org = caller(&request)?;
        let request = request.into_inner();
        let outcome = self.run_erase(&org, &request).await;
        let event = Event {
            org,
            agreement: request.agreement_id.clone(),
            action: "erase",
            subject: Some(request.dataset.clone()),
            ..Event::default()
        };
        self.state.audit_outcome(event, &outcome, |r, e| {
            e.subject = Some(format!(
                "{}: {} row(s) removed, {} older version(s) deleted",
                request.dataset, r.rows_removed, r.versions_deleted
            ));
            e.rows = Some(r.rows_removed);
        })?;
        Ok(Response::new(outcome?))
    }

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn list_datasets(
        &self,
        request: Request<proto::ListDatasetsRequest>,
    ) -> Result<Response<proto::ListDatasetsResponse>, Status> {
        let org = caller(&request)?;
        let id = &request.get_ref().agreement_id;
        let policy = self.state.agreement_for(&org, id)?;
        let store = self.state.store();
        let mut datasets = Vec::new();
        for d in policy.datasets().iter().filter(|d| d.owner() == org) {
            let versions = store
                .versions(policy.id(), d.name())
                .map_err(ServiceError::from)?;
            let current = store
                .current(policy.id(), d.name())
                .map_err(ServiceError::from)?;
            if let Some(v) = current {
                let matchable = super::blinding::is_matchable(self.state.store(), &policy, &v)?;
                let damaged = store.is_damaged(&v).map_err(ServiceError::from)?;
                let (state, waiting_for) = if damaged {
                    (proto::DatasetState::Damaged, String::new())
                } else if !policy.made_now(d, &v.form) {
                    (proto::DatasetState::NeedsUpload, String::new())
                } else if matchable {
                    (proto::DatasetState::Matched, String::new())
                } else {
                    let partner = super::blinding::partner_of(&policy, &org).unwrap_or_default();
                    (proto::DatasetState::Waiting, partner.to_string())
                };
                datasets.push(proto::DatasetVersion {
                    dataset: v.dataset,
                    version: v.version,
                    upload_id: v.upload_id,
                    rows: v.rows,
                    committed_at: v.committed_at,
                    policy_hash: v.policy_hash,
                    versions: u32::try_from(versions.len()).unwrap_or(u32::MAX),
                    state: state as i32,
                    waiting_for,
                });
            }
        }
        Ok(Response::new(proto::ListDatasetsResponse { datasets }))
    }
}
