//! Matching without a shared secret (`matching = "ecdh"`, `docs/matching.md`).
//!
//! A version arrives holding its owner's singly blinded points. The server
//! relays the distinct ones, shuffled afresh, to the partner
//! (blinding work), which multiplies each by its own scalar and sends them
//! back in the same order (a submission). The server undoes the shuffle
//! it kept and seals the pairs beside the version. From then on matching,
//! overlaps and queries read the version with each identifier replaced by
//! its doubly blinded point, exactly as they read fingerprints.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, FixedSizeBinaryArray, FixedSizeBinaryBuilder};
use arrow::record_batch::RecordBatch;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::{Broken, Room, RoomError};
use crate::audit::Event;
use crate::identity::blinding::POINT_LEN;
use crate::policy::{Matching, Policy};
use crate::storage::{Blinding, KeyId, Store, VersionInfo};

type Point = [u8; POINT_LEN];

/// A version relayed to the partner for blinding, and the shuffle it went
/// out in. Kept in memory only: a restart makes the partner fetch again.
#[derive(Debug)]
struct Job {
    agreement: String,
    /// The party asked to blind.
    partner: String,
    version: VersionInfo,
    /// The id of the key the partner said it blinds with.
    blinder: KeyId,
    /// The version's distinct singly blinded points, sorted.
    singles: Vec<Point>,
    /// Position i of the relayed order holds `singles[order[i]]`.
    order: Vec<u32>,
}

/// Blinding jobs handed out and not yet returned.
#[derive(Debug, Default, Clone)]
pub(crate) struct Jobs {
    inner: Arc<Mutex<HashMap<String, Job>>>,
}

impl Jobs {
    /// Hands out `job`; one handed out earlier for the same dataset is
    /// withdrawn, so only the latest shuffle of a version is answerable.
    fn insert(&self, id: String, job: Job) {
        let mut jobs = self.inner.lock();
        jobs.retain(|_, j| {
            !(j.agreement == job.agreement && j.version.dataset == job.version.dataset)
        });
        jobs.insert(id, job);
    }

    /// Takes the job `id` if `org` was given it in `agreement`.
    fn take(&self, id: &str, agreement: &str, org: &str) -> Option<Job> {
        let mut jobs = self.inner.lock();
        let theirs = jobs
            .get(id)
            .is_some_and(|j| j.agreement == agreement && j.partner == org);
        if theirs { jobs.remove(id) } else { None }
    }
}

/// The party of a two-party agreement that is not `org`.
pub(crate) fn partner_of<'p>(policy: &'p Policy, org: &str) -> Option<&'p str> {
    policy.parties().iter().map(|p| p.org()).find(|o| *o != org)
}

/// The identifier `columns` of a version as matching sees them, read
/// through one chunk buffer ([`Store::read_with`]): each batch holds those
/// of `columns` that are identifier columns of the dataset, in buffers of
/// their own: the fingerprints copied out of the decrypted chunk, or under
/// `ecdh` the doubly blinded points substituted for them. None while the
/// partner has not yet blinded this version.
pub(crate) fn read_matchable(
    store: &Store,
    policy: &Policy,
    info: &VersionInfo,
    columns: &[&str],
) -> Result<Option<Vec<RecordBatch>>, RoomError> {
    let wanted: Vec<&str> = policy
        .dataset(&info.dataset)
        .map(|d| {
            d.identifier_columns()
                .into_iter()
                .map(|(c, _)| c)
                .filter(|c| columns.contains(c))
                .collect()
        })
        .unwrap_or_default();
    // Only the wanted columns are copied or substituted.
    let project = |batch: &RecordBatch| -> Result<RecordBatch, RoomError> {
        let schema = batch.schema();
        let kept: Vec<usize> = (0..batch.num_columns())
            .filter(|i| wanted.contains(&schema.field(*i).name().as_str()))
            .collect();
        batch
            .project(&kept)
            .map_err(|e| RoomError::Internal(format!("identifier columns: {e}")))
    };
    // A batch may keep no column (a kind this dataset lacks): its rows
    // still count.
    let rows = |batch: &RecordBatch| {
        arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()))
    };
    if policy.matching() == Matching::Keyed {
        let owned = |batch: RecordBatch| -> Result<RecordBatch, RoomError> {
            let batch = project(&batch)?;
            let columns = batch.columns().iter().map(crate::query::owned).collect();
            RecordBatch::try_new_with_options(batch.schema(), columns, &rows(&batch))
                .map_err(|e| RoomError::Internal(format!("copying identifiers: {e}")))
        };
        return Ok(Some(store.read_with(info, owned)?));
    }
    if !is_matchable(store, policy, info)? {
        return Ok(None);
    }
    let Some(blinding) = store.blinding(info)? else {
        return Ok(None);
    };
    let index = blinding.index();
    let doubled = |batch: RecordBatch| -> Result<RecordBatch, RoomError> {
        let batch = project(&batch)?;
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for column in columns.iter_mut() {
            let Some(singles) = column.as_any().downcast_ref::<FixedSizeBinaryArray>() else {
                continue;
            };
            let mut doubles =
                FixedSizeBinaryBuilder::with_capacity(singles.len(), POINT_LEN as i32);
            for row in 0..singles.len() {
                if singles.is_null(row) {
                    doubles.append_null();
                    continue;
                }
                let double = <&Point>::try_from(singles.value(row))
                    .ok()
                    .and_then(|s| index.get(s).copied())
                    .ok_or_else(|| {
                        RoomError::Internal(format!(
                            "a point of {} {} has no blinding",
                            info.dataset, info.version
                        ))
                    })?;
                doubles
                    .append_value(double)
                    .map_err(|e| RoomError::Internal(format!("building points: {e}")))?;
            }
            *column = Arc::new(doubles.finish());
        }
        RecordBatch::try_new_with_options(batch.schema(), columns, &rows(&batch))
            .map_err(|e| RoomError::Internal(format!("substituting points: {e}")))
    };
    Ok(Some(store.read_with(info, doubled)?))
}

/// Why a dataset with a current version cannot be matched yet.
pub(crate) fn not_blinded(policy: &Policy, dataset: &str) -> RoomError {
    let owner = policy
        .dataset(dataset)
        .map(|d| d.owner())
        .unwrap_or_default();
    let partner = partner_of(policy, owner).unwrap_or_default();
    RoomError::NotBlinded {
        dataset: dataset.to_string(),
        partner: partner.to_string(),
    }
}

/// Whether the dataset's current version is matchable: keyed, or blinded by
/// the partner with the key the partner's own current data was made with
/// (a partner that changed keys must blind it again).
pub(crate) fn is_matchable(
    store: &Store,
    policy: &Policy,
    info: &VersionInfo,
) -> Result<bool, RoomError> {
    if policy.matching() == Matching::Keyed {
        return Ok(true);
    }
    let Some(blinder) = store.blinder_key(info)? else {
        return Ok(false);
    };
    let owner = policy
        .dataset(&info.dataset)
        .map(|d| d.owner())
        .unwrap_or_default();
    let partner = partner_of(policy, owner).unwrap_or_default();
    Ok(match own_key(store, policy, partner)? {
        Some((_, key)) => key == blinder,
        None => true,
    })
}

/// The key id `org`'s current versions in the agreement were made with,
/// and a dataset that has it; None before its first upload.
fn own_key(
    store: &Store,
    policy: &Policy,
    org: &str,
) -> Result<Option<(String, KeyId)>, RoomError> {
    for d in policy.datasets().iter().filter(|d| d.owner() == org) {
        if let Some(v) = store.current(policy.id(), d.name())?
            && let Some(key) = store.owner_key(&v)?
        {
            return Ok(Some((v.dataset, key)));
        }
    }
    Ok(None)
}

/// The id of a party's blinding key, as sent with an upload, an erasure or
/// a request for work: required and a valid point under `ecdh`, absent
/// under `keyed`.
pub(crate) fn key_id_of(policy: &Policy, bytes: &[u8]) -> Result<Option<KeyId>, RoomError> {
    if policy.matching() == Matching::Keyed {
        if !bytes.is_empty() {
            return Err(RoomError::invalid(
                "key_id",
                format!(
                    "agreement {} matches keyed fingerprints; a blinding key id has no place here",
                    policy.id()
                ),
            ));
        }
        return Ok(None);
    }
    let id = KeyId::try_from(bytes)
        .ok()
        .filter(|id| crate::identity::blinding::decompress(id).is_some())
        .ok_or_else(|| RoomError::invalid("key_id", format!(
                "agreement {} matches without a shared secret: send the 32-byte id of your blinding key",
                policy.id()
            )))?;
    Ok(Some(id))
}

/// The refusal when points come blinded with another key than the one the
/// caller's current upload of `dataset` was made with.
pub(crate) fn other_key(dataset: &str) -> RoomError {
    RoomError::Blinding {
        rule: "blinding.key",
        detail: format!(
            "this is not the blinding key your current upload of dataset {dataset:?} was made with; use that key, or upload again with this one"
        ),
    }
}

/// The distinct identifier points of a version, sorted.
fn singles_of(batches: &[RecordBatch], identifiers: &[&str]) -> Vec<Point> {
    let mut points = Vec::new();
    for batch in batches {
        for name in identifiers {
            let Some(col) = batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
            else {
                continue;
            };
            points.extend(
                col.iter()
                    .flatten()
                    .filter_map(|v| <Point>::try_from(v).ok()),
            );
        }
    }
    points.sort_unstable();
    points.dedup();
    points
}

/// After an erasure: the new version keeps the blinding of the points it
/// still carries, and nothing of the erased rows.
pub(crate) fn carry_over(
    store: &Store,
    policy: &Policy,
    from: &VersionInfo,
    to: &VersionInfo,
    kept: &[RecordBatch],
) -> Result<(), RoomError> {
    if policy.matching() == Matching::Keyed {
        return Ok(());
    }
    let Some(mut blinding) = store.blinding(from)? else {
        return Ok(());
    };
    let identifiers: Vec<&str> = policy
        .dataset(&to.dataset)
        .map(|d| d.identifier_columns().into_iter().map(|(c, _)| c).collect())
        .unwrap_or_default();
    let singles = singles_of(kept, &identifiers);
    blinding.retain(|s| singles.binary_search(s).is_ok());
    store.put_blinding(to, &blinding)?;
    Ok(())
}

fn random_id() -> Result<String, RoomError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| RoomError::Internal("the system random source failed".into()))?;
    Ok(hex::encode(id))
}

fn shuffled(n: usize) -> Result<Vec<u32>, RoomError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| RoomError::Internal("the system random source failed".into()))?;
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut rng);
    Ok(order)
}

fn require_ecdh(policy: &Policy) -> Result<(), RoomError> {
    if policy.matching() != Matching::Ecdh {
        return Err(RoomError::PermissionDenied {
            rule: "agreement.matching",
            detail: format!(
                "agreement {} matches keyed fingerprints; there is nothing to blind",
                policy.id()
            ),
        });
    }
    Ok(())
}

/// One version for the partner to blind: its distinct points, shuffled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    pub job_id: String,
    pub dataset: String,
    pub owner: String,
    /// The points, 32 bytes each, in the relayed order.
    pub points: Vec<u8>,
}

/// A returned job, sealed beside its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blinded {
    pub dataset: String,
    pub version: String,
    pub points: u64,
}

/// The partner's versions `org` has still to blind with `key`, each made a
/// job.
fn issue_jobs(room: &Room, policy: &Policy, org: &str, key: KeyId) -> Result<Vec<Work>, RoomError> {
    let store = room.store();
    if let Some((dataset, own)) = own_key(store, policy, org)?
        && own != key
    {
        return Err(other_key(&dataset));
    }
    let mut work = Vec::new();
    for d in policy.datasets().iter().filter(|d| d.owner() != org) {
        let Some(version) = store.current(policy.id(), d.name())? else {
            continue;
        };
        if store.blinder_key(&version)? == Some(key) {
            continue;
        }
        let identifiers: Vec<&str> = d.identifier_columns().into_iter().map(|(c, _)| c).collect();
        let singles = singles_of(&store.read(&version)?, &identifiers);
        let order = shuffled(singles.len())?;
        let id = random_id()?;
        work.push(Work {
            job_id: id.clone(),
            dataset: d.name().to_string(),
            owner: d.owner().to_string(),
            points: order.iter().flat_map(|&i| singles[i as usize]).collect(),
        });
        room.blinding_jobs().insert(
            id,
            Job {
                agreement: policy.id().to_string(),
                partner: org.to_string(),
                version,
                blinder: key,
                singles,
                order,
            },
        );
    }
    Ok(work)
}

/// Checks a returned job and seals its pairs beside the version, if that
/// version is still current.
fn complete(room: &Room, job: Job, returned: Vec<u8>) -> Result<Blinded, RoomError> {
    let n = job.singles.len();
    if returned.len() != n * POINT_LEN {
        return Err(RoomError::invalid(
            "points",
            format!(
                "the job holds {n} points; {} bytes is not {n} 32-byte points",
                returned.len()
            ),
        ));
    }
    let mut doubles: Vec<Point> = vec![[0; POINT_LEN]; n];
    for (i, chunk) in returned.chunks_exact(POINT_LEN).enumerate() {
        doubles[job.order[i] as usize] = chunk.try_into().expect("32-byte chunks");
    }
    // Distinct points stay distinct under any scalar: a party that
    // collapses them would merge people who are not the same.
    let mut sorted = doubles.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(RoomError::invalid(
            "points",
            "distinct points must stay distinct once blinded",
        ));
    }
    let info = &job.version;
    let lock = room.dataset_lock(&info.agreement, &info.dataset);
    let _serialised = lock.lock();
    let store = room.store();
    let current = store.current(&info.agreement, &info.dataset)?;
    if current.as_ref().map(|c| &c.version) != Some(&info.version) {
        return Err(RoomError::Blinding {
            rule: "blinding.job",
            detail: format!(
                "dataset {:?} has a newer version since this job was issued; run `cleanroom match` again",
                info.dataset
            ),
        });
    }
    let pairs = job.singles.into_iter().zip(doubles).collect();
    store.put_blinding(info, &Blinding::new(job.blinder, pairs))?;
    room.versions_changed(&info.agreement);
    Ok(Blinded {
        dataset: info.dataset.clone(),
        version: info.version.clone(),
        points: n as u64,
    })
}

impl Room {
    /// The versions `org` has still to blind in agreement `id` with the key
    /// `key_id`, each a job that lasts until answered, a newer fetch or a
    /// restart.
    pub async fn blinding_work(
        &self,
        org: &str,
        id: &str,
        key_id: &[u8],
    ) -> Result<Vec<Work>, RoomError> {
        let policy = self.agreement_in_force(org, id)?;
        require_ecdh(&policy)?;
        let key = key_id_of(&policy, key_id)?
            .ok_or_else(|| RoomError::Internal("no key id under ecdh".into()))?;
        let (room, org) = (self.clone(), org.to_string());
        tokio::task::spawn_blocking(move || issue_jobs(&room, &policy, &org, key))
            .await
            .map_err(|e| RoomError::Internal(format!("issuing blinding jobs: {e}")))?
    }

    /// Takes back job `job_id` of agreement `id`, its points `first` and
    /// then `rest`, checks them and seals them beside the version. Audited.
    pub async fn submit_blinding(
        &self,
        org: &str,
        id: &str,
        job_id: &str,
        first: Vec<u8>,
        rest: impl Stream<Item = Result<Vec<u8>, Broken>> + Unpin,
    ) -> Result<Blinded, RoomError> {
        let outcome = self.receive(org, id, job_id, first, rest).await;
        let event = Event {
            org: org.to_string(),
            agreement: id.to_string(),
            action: "blinding",
            ..Event::default()
        };
        self.audit_outcome(event, &outcome, |r, e| {
            e.subject = Some(format!("{} {}", r.dataset, r.version));
            e.rows = Some(r.points);
        })?;
        outcome
    }

    async fn receive(
        &self,
        org: &str,
        id: &str,
        job_id: &str,
        first: Vec<u8>,
        mut rest: impl Stream<Item = Result<Vec<u8>, Broken>> + Unpin,
    ) -> Result<Blinded, RoomError> {
        let policy = self.agreement_in_force(org, id)?;
        require_ecdh(&policy)?;
        let job = self
            .blinding_jobs()
            .take(job_id, policy.id(), org)
            .ok_or_else(|| RoomError::invalid("job_id", "is not a blinding job handed to you in this agreement (jobs last until answered, a newer fetch or a restart)"))?;
        let expected = job.singles.len() * POINT_LEN;
        let mut returned = first;
        loop {
            if returned.len() > expected {
                return Err(RoomError::invalid(
                    "points",
                    format!("the job holds {} points; more came back", job.singles.len()),
                ));
            }
            match rest.next().await {
                Some(Ok(points)) => returned.extend_from_slice(&points),
                None => break,
                Some(Err(Broken)) => {
                    return Err(RoomError::invalid(
                        "points",
                        "the stream broke before its end; nothing was stored",
                    ));
                }
            }
        }
        let room = self.clone();
        tokio::task::spawn_blocking(move || complete(&room, job, returned))
            .await
            .map_err(|e| RoomError::Internal(format!("storing a blinding: {e}")))?
    }
}
