//! Datasets: streamed, validated, atomic uploads, erasure by fingerprint,
//! and what the room holds of a party's own datasets.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{Stream, StreamExt};

use super::blinding::{carry_over, is_matchable, key_id_of, other_key, partner_of};
use super::{Broken, Room, RoomError, bounded_name};
use crate::audit::Event;
use crate::policy::{Policy, Right};
use crate::storage::KeyId;
use crate::upload::{Rejection, RejectionKind, Validator, decode_batches};

/// What an upload begins with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadHeader {
    pub agreement: String,
    pub dataset: String,
    /// The client's id of this upload: sent again, it stores nothing twice.
    pub upload_id: String,
    /// The policy the client prepared its data under.
    pub policy_hash: String,
    /// Under `ecdh`, the id of the key the points were blinded with.
    pub key_id: Vec<u8>,
}

/// One message of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upload {
    Header(UploadHeader),
    /// Arrow IPC stream bytes of one or more record batches.
    Batch(Vec<u8>),
    /// The end: what the client sent, to be checked against what arrived.
    Commit {
        rows: u64,
        batches: u64,
    },
    /// A message that carries nothing.
    Empty,
}

/// A committed upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub version: String,
    pub rows: u64,
    /// This upload id had already committed; nothing was stored again.
    pub already_committed: bool,
    pub committed_at: i64,
}

/// An erasure asked for: per identity kind, the fingerprints whose rows go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EraseAsk {
    pub agreement: String,
    pub dataset: String,
    pub policy_hash: String,
    pub key_id: Vec<u8>,
    /// (identity kind, concatenated 32-byte fingerprints).
    pub sets: Vec<(String, Vec<u8>)>,
}

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erased {
    pub rows_removed: u64,
    pub rows_kept: u64,
    /// The new version; empty when no row matched.
    pub version: String,
    pub versions_deleted: u64,
}

/// Where a party's dataset stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldState {
    /// Matchable now.
    Matched,
    /// Waiting for the partner's blinding.
    Waiting,
    /// Made under identity settings the policy no longer has.
    NeedsUpload,
    /// Damaged on the server.
    Damaged,
}

/// The current version of one of a party's datasets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub dataset: String,
    pub version: String,
    pub upload_id: String,
    pub rows: u64,
    pub committed_at: i64,
    pub policy_hash: String,
    /// Versions held, the current one included.
    pub versions: u32,
    pub state: HeldState,
    /// The partner whose blinding it waits for, if it waits.
    pub waiting_for: String,
}

fn bad(field: &'static str, detail: impl Into<String>) -> RoomError {
    RoomError::invalid(field, detail)
}

fn valid_upload_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Room {
    /// The current versions of `org`'s own datasets in agreement `id`.
    pub fn held(&self, org: &str, id: &str) -> Result<Vec<Held>, RoomError> {
        let policy = self.agreement_for(org, id)?;
        let store = self.store();
        let mut datasets = Vec::new();
        for d in policy.datasets().iter().filter(|d| d.owner() == org) {
            let versions = store.versions(policy.id(), d.name())?;
            let current = store.current(policy.id(), d.name())?;
            if let Some(v) = current {
                let matchable = is_matchable(store, &policy, &v)?;
                let damaged = store.is_damaged(&v)?;
                let (state, waiting_for) = if damaged {
                    (HeldState::Damaged, String::new())
                } else if !policy.made_now(d, &v.form) {
                    (HeldState::NeedsUpload, String::new())
                } else if matchable {
                    (HeldState::Matched, String::new())
                } else {
                    let partner = partner_of(&policy, org).unwrap_or_default();
                    (HeldState::Waiting, partner.to_string())
                };
                datasets.push(Held {
                    dataset: v.dataset,
                    version: v.version,
                    upload_id: v.upload_id,
                    rows: v.rows,
                    committed_at: v.committed_at,
                    policy_hash: v.policy_hash,
                    versions: u32::try_from(versions.len()).unwrap_or(u32::MAX),
                    state,
                    waiting_for,
                });
            }
        }
        Ok(datasets)
    }
}

impl Room {
    /// Erases from `org`'s dataset every row carrying one of the given
    /// fingerprints: the current version is written again without them and
    /// every older version is deleted. Audited.
    pub async fn erase(&self, org: &str, ask: &EraseAsk) -> Result<Erased, RoomError> {
        let outcome = self.erase_of(org, ask).await;
        let event = Event {
            org: org.to_string(),
            agreement: ask.agreement.clone(),
            action: "erase",
            subject: Some(ask.dataset.clone()),
            ..Event::default()
        };
        self.audit_outcome(event, &outcome, |r, e| {
            e.subject = Some(format!(
                "{}: {} row(s) removed, {} older version(s) deleted",
                ask.dataset, r.rows_removed, r.versions_deleted
            ));
            e.rows = Some(r.rows_removed);
        })?;
        outcome
    }

    async fn erase_of(&self, org: &str, request: &EraseAsk) -> Result<Erased, RoomError> {
        let policy = self.agreement_in_force(org, &request.agreement)?;
        bounded_name("dataset", &request.dataset)?;
        let Some(dataset) = policy.dataset(&request.dataset) else {
            return Err(bad(
                "dataset",
                format!("{:?} is not a dataset of this agreement", request.dataset),
            ));
        };
        if dataset.owner() != org || !policy.allows(org, Right::Upload) {
            return Err(RoomError::PermissionDenied {
                rule: "party.rights",
                detail: format!(
                    "{org} may not erase from dataset {:?}: only its owner, with the upload right",
                    dataset.name()
                ),
            });
        }
        if request.policy_hash != policy.hash().to_hex() {
            return Err(RoomError::PolicyChanged(policy.id().to_string()));
        }
        let key = key_id_of(&policy, &request.key_id)?;
        // Fingerprints per identifier column of the dataset.
        let columns = dataset.identifier_columns();
        let mut wanted: Vec<(String, HashSet<[u8; 32]>)> = Vec::new();
        for (set_kind, set_fingerprints) in &request.sets {
            bounded_name("sets.kind", set_kind)?;
            if !columns.iter().any(|(_, kind)| kind == set_kind) {
                return Err(bad(
                    "sets.kind",
                    format!(
                        "{:?} is not an identity kind of dataset {:?}",
                        set_kind,
                        dataset.name()
                    ),
                ));
            }
            if set_fingerprints.is_empty() || set_fingerprints.len() % 32 != 0 {
                return Err(bad(
                    "sets.fingerprints",
                    "must be a non-empty concatenation of 32-byte fingerprints",
                ));
            }
            let fps: HashSet<[u8; 32]> = set_fingerprints
                .chunks_exact(32)
                .map(|c| <[u8; 32]>::try_from(c).unwrap_or([0; 32]))
                .collect();
            for (name, kind) in &columns {
                if kind == set_kind {
                    wanted.push((name.to_string(), fps.clone()));
                }
            }
        }
        if wanted.is_empty() {
            return Err(bad("sets", "no fingerprints to erase"));
        }
        let (room, policy, org) = (self.clone(), Arc::clone(&policy), org.to_string());
        let dataset = dataset.name().to_string();
        tokio::task::spawn_blocking(move || {
            erase_rows(&room, &policy, &dataset, &org, &wanted, key.as_ref())
        })
        .await
        .map_err(|e| RoomError::Internal(format!("erasing: {e}")))?
    }
}

/// Writes the dataset's current version again without the rows carrying
/// one of the `wanted` fingerprints, then deletes every older version.
/// Under `ecdh`, `key` is the id of the key the wanted points were blinded
/// with; it must be the current version's.
fn erase_rows(
    room: &Room,
    policy: &Policy,
    dataset: &str,
    org: &str,
    wanted: &[(String, HashSet<[u8; 32]>)],
    key: Option<&KeyId>,
) -> Result<Erased, RoomError> {
    use arrow::array::{Array, BooleanArray, FixedSizeBinaryArray};
    let lock = room.dataset_lock(policy.id(), dataset);
    let _serialised = lock.lock();
    let store = room.store();
    let Some(current) = store.current(policy.id(), dataset)? else {
        return Err(RoomError::NoData(dataset.to_string()));
    };
    // The fingerprints to erase were made under today's settings: against
    // rows made otherwise they would find no one and report success.
    if policy
        .dataset(dataset)
        .is_some_and(|d| !policy.made_now(d, &current.form))
    {
        return Err(RoomError::NeedsUpload(dataset.to_string()));
    }
    let owner_key = store.owner_key(&current)?;
    if key.is_some() && owner_key.as_ref() != key {
        return Err(other_key(dataset));
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
            .map_err(|e| RoomError::Internal(format!("filtering rows: {e}")))?;
        kept += filtered.num_rows() as u64;
        kept_batches.push(filtered);
    }
    if removed == 0 {
        return Ok(Erased {
            rows_removed: 0,
            rows_kept: kept,
            version: String::new(),
            versions_deleted: 0,
        });
    }
    let mut staged = store.stage(policy.id(), dataset)?;
    for b in kept_batches.iter().filter(|b| b.num_rows() > 0) {
        let ipc = crate::upload::encode_batch(b)
            .map_err(|e| RoomError::Internal(format!("encoding rows: {e}")))?;
        staged.append(&ipc, b.num_rows() as u64)?;
    }
    let mut id = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| RoomError::Internal("the system random source failed".into()))?;
    room.still_open()?;
    let info = store.commit(
        staged,
        crate::storage::Commit {
            base: Some(&current.version),
            upload_id: &format!("{}{}", crate::storage::ERASURE_ID_PREFIX, hex::encode(id)),
            uploaded_by: org,
            policy_hash: &policy.hash().to_hex(),
            // The rows kept are as they were made.
            form: &current.form,
            committed_at: room.clock().now().unix_timestamp(),
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
    carry_over(store, policy, &current, &info, &kept_batches)?;
    crate::crash::point("erase.committed");
    store.delete_versions(&older)?;
    room.versions_changed(policy.id());
    Ok(Erased {
        rows_removed: removed,
        rows_kept: kept,
        version: info.version,
        versions_deleted: older.len() as u64,
    })
}

impl Room {
    /// Stores one upload of `org`: a header first, then batches, then a
    /// commit. Every batch is validated and encoded again as it arrives;
    /// the version commits atomically, or nothing is stored. Audited.
    pub async fn upload(
        &self,
        org: &str,
        mut parts: impl Stream<Item = Result<Upload, Broken>> + Unpin,
    ) -> Result<Uploaded, RoomError> {
        let header = match parts.next().await {
            Some(Ok(Upload::Header(h))) => Ok(h),
            Some(Ok(_)) | None => Err(RoomError::invalid(
                "header",
                "the first message must be the upload header",
            )),
            Some(Err(Broken)) => Err(RoomError::invalid(
                "header",
                "the upload stream broke before its header",
            )),
        };
        let (agreement, dataset) = header
            .as_ref()
            .map(|h| (h.agreement.clone(), h.dataset.clone()))
            .unwrap_or_default();
        let outcome = match header {
            Ok(header) => self.upload_of(org.to_string(), header, parts).await,
            Err(e) => Err(e),
        };
        let event = Event {
            org: org.to_string(),
            agreement,
            action: "upload",
            subject: Some(dataset.clone()),
            ..Event::default()
        };
        self.audit_outcome(event, &outcome, |r, e| {
            e.subject = Some(format!("{dataset} {}", r.version));
            e.rows = Some(r.rows);
        })?;
        outcome
    }

    async fn upload_of(
        &self,
        org: String,
        header: UploadHeader,
        mut stream: impl Stream<Item = Result<Upload, Broken>> + Unpin,
    ) -> Result<Uploaded, RoomError> {
        let policy = self.agreement_in_force(&org, &header.agreement)?;
        bounded_name("dataset", &header.dataset)?;
        let Some(dataset) = policy.dataset(&header.dataset) else {
            return Err(bad(
                "dataset",
                format!("{:?} is not a dataset of this agreement", header.dataset),
            ));
        };
        if dataset.owner() != org || !policy.allows(&org, Right::Upload) {
            return Err(RoomError::PermissionDenied {
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
            return Err(RoomError::PolicyChanged(policy.id().to_string()));
        }
        let owner_key = key_id_of(&policy, &header.key_id)?;
        let store = self.store();
        if let Some(done) = store.find_upload(policy.id(), dataset.name(), &header.upload_id)? {
            tracing::info!(version = %done.version, "upload id already committed; nothing stored again");
            return Ok(Uploaded {
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
        let limits = self.limits();
        let started = tokio::time::Instant::now();
        let mut validator = Validator::new(dataset, limits);
        let mut staged = store.stage(policy.id(), dataset.name())?;
        let mut messages = 0u64;
        loop {
            let left = limits.max_duration.saturating_sub(started.elapsed());
            let wait = limits.idle_timeout.min(left);
            let next = match tokio::time::timeout(wait, stream.next()).await {
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
                    return Err(RoomError::LimitExceeded { rule, detail });
                }
            };
            let message = match next {
                Some(Ok(m)) => m,
                None => {
                    return Err(bad(
                        "commit",
                        "the upload ended without a commit; nothing was stored",
                    ));
                }
                Some(Err(Broken)) => {
                    return Err(bad("batch", "the upload stream broke; nothing was stored"));
                }
            };
            match message {
                Upload::Batch(bytes) => {
                    let batches = decode_batches(&bytes).map_err(|_| {
                        bad(
                            "batch",
                            format!("message {} is not an Arrow IPC stream", messages + 1),
                        )
                    })?;
                    if batches.is_empty() {
                        return Err(RoomError::UploadRejected(Rejection {
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
                            .map_err(RoomError::UploadRejected)?;
                        // What is stored is what was validated, encoded
                        // again by the server: the upload schema exactly,
                        // without the sender's metadata or extra buffers.
                        let clean = validator.restate(batch).map_err(|e| {
                            RoomError::Internal(format!("re-encoding a batch: {e}"))
                        })?;
                        let ipc = crate::upload::encode_batch(&clean).map_err(|e| {
                            RoomError::Internal(format!("re-encoding a batch: {e}"))
                        })?;
                        staged.append(&ipc, clean.num_rows() as u64)?;
                    }
                    messages += 1;
                }
                Upload::Commit { rows, batches } => {
                    if rows != validator.rows() || batches != messages {
                        return Err(bad(
                            "commit",
                            format!(
                                "the client sent {} rows in {} batches but the server received {} in {}; nothing was stored",
                                rows,
                                batches,
                                validator.rows(),
                                messages
                            ),
                        ));
                    }
                    if validator.rows() == 0 {
                        return Err(RoomError::UploadRejected(Rejection {
                            kind: RejectionKind::Invalid,
                            rule: "upload.empty",
                            column: None,
                            detail: "an upload holds at least one row; nothing was stored".into(),
                            row: None,
                        }));
                    }
                    if staged.rows() != validator.rows() {
                        return Err(RoomError::Internal(format!(
                            "staged {} rows but validated {}",
                            staged.rows(),
                            validator.rows()
                        )));
                    }
                    let upload_id = header.upload_id.clone();
                    let hash = policy.hash().to_hex();
                    let form = policy.data_form(dataset);
                    let now = self.clock().now().unix_timestamp();
                    let store = store.clone();
                    let org = org.clone();
                    let lock = self.dataset_lock(policy.id(), dataset.name());
                    let room = self.clone();
                    let info = tokio::task::spawn_blocking(move || {
                        let _serialised = lock.lock();
                        room.still_open()?;
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
                            .map_err(RoomError::from)
                    })
                    .await
                    .map_err(|e| RoomError::Internal(format!("commit task: {e}")))??;
                    tracing::info!(
                        agreement = %info.agreement,
                        dataset = %info.dataset,
                        version = %info.version,
                        rows = info.rows,
                        bytes = info.bytes,
                        "upload committed"
                    );
                    self.metrics().uploaded(info.rows, info.bytes);
                    self.versions_changed(policy.id());
                    return Ok(Uploaded {
                        already_committed: info.upload_id != header.upload_id,
                        version: info.version,
                        rows: info.rows,
                        committed_at: info.committed_at,
                    });
                }
                Upload::Header(_) | Upload::Empty => {
                    return Err(bad("header", "an upload has exactly one header, first"));
                }
            }
        }
    }
}
