//! The `Matching` service: the overlap between two parties' datasets.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use super::blinding::{WorkStream, is_matchable, not_blinded, read_matchable};
use super::budget::{Charged, epsilon_for, no_epsilon, privacy_report};
use super::datasets::agreement_in_force;
use crate::audit::Event;
use crate::error::ServiceError;
use crate::policy::{Dataset, Policy, Right};
use crate::privacy::{Measure, NoiseSource, Plan, Settings};
use crate::proto;
use crate::psi::{Side, people_counts};
use crate::storage::VersionInfo;
use arrow::record_batch::RecordBatch;

/// Implements `cleanroom.v1.Matching`.
#[derive(Debug, Clone)]
pub struct MatchingService {
    state: AppState,
}

impl MatchingService {
    pub fn new(state: AppState) -> Self {
        MatchingService { state }
    }

    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }
}

/// The two datasets an overlap is about.
fn pick_datasets<'p>(
    policy: &'p Policy,
    names: &[String],
) -> Result<[&'p Dataset; 2], ServiceError> {
    let bad = |rule: String| ServiceError::InvalidArgument {
        field: "datasets",
        rule,
    };
    let chosen: Vec<&Dataset> = if names.is_empty() {
        if policy.datasets().len() != 2 {
            return Err(bad(format!(
                "the agreement has {} datasets; name the two to match",
                policy.datasets().len()
            )));
        }
        policy.datasets().iter().collect()
    } else {
        if names.len() > 2 {
            return Err(bad("name exactly two different datasets".into()));
        }
        for n in names {
            super::bounded_name("datasets", n)?;
        }
        names
            .iter()
            .map(|n| {
                policy
                    .dataset(n)
                    .ok_or_else(|| bad(format!("{n:?} is not a dataset of this agreement")))
            })
            .collect::<Result<_, _>>()?
    };
    match chosen.as_slice() {
        [a, b] if a.name() != b.name() => Ok([a, b]),
        _ => Err(bad("name exactly two different datasets".into())),
    }
}

impl MatchingService {
    async fn overlap_of(
        &self,
        org: &str,
        request: &proto::OverlapRequest,
    ) -> Result<(Arc<Policy>, proto::OverlapResponse, Option<Charged>), ServiceError> {
        let policy = agreement_in_force(&self.state, org, &request.agreement_id)?;
        if !policy.allows(org, Right::SeeOverlap) {
            return Err(ServiceError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} lacks \"see_overlap\" in agreement {}", policy.id()),
            });
        }
        let [a, b] = pick_datasets(&policy, &request.datasets)?;
        // Under differential privacy: the noise plan and the charge come
        // first, as for a query.
        let private = match policy.privacy() {
            Some(privacy) => {
                let epsilon = epsilon_for(privacy, request.epsilon)?;
                let plan = Plan::new(
                    Settings {
                        epsilon,
                        delta: privacy.delta(),
                        // A person is in the overlap once.
                        max_groups_per_person: 1,
                        max_rows_per_person: 1,
                        min_group_size: policy.query().min_group_size(),
                    },
                    &[Measure::People],
                )
                .map_err(|e| {
                    ServiceError::QueryRefused(crate::query::Violation::deny(e.rule, e.detail))
                })?;
                Some(plan)
            }
            None => {
                no_epsilon(&policy, request.epsilon)?;
                None
            }
        };
        let mut versions = Vec::new();
        for d in [a, b] {
            let store = self.state.store();
            let v = store
                .current(policy.id(), d.name())?
                .ok_or_else(|| ServiceError::NoData(d.name().to_string()))?;
            if !policy.made_now(d, &v.form) {
                return Err(ServiceError::NeedsUpload(d.name().to_string()));
            }
            if store.is_damaged(&v)? {
                return Err(ServiceError::DatasetDamaged(d.name().to_string()));
            }
            if !is_matchable(store, &policy, &v)? {
                return Err(not_blinded(&policy, d.name()));
            }
            versions.push(v);
        }
        let charged = match (&private, policy.privacy()) {
            (Some(plan), Some(privacy)) => Some(
                self.state
                    .charge_budget(org, &policy, privacy, plan.report().epsilon)
                    .await?,
            ),
            _ => None,
        };
        match self
            .count(&policy, [a, b], versions, private.as_ref())
            .await
        {
            Ok(mut response) => {
                if let (Some(plan), Some(c)) = (&private, &charged) {
                    let mut report = plan.report();
                    if let Some(col) = report.columns.first_mut() {
                        col.aggregate = "overlap".into();
                    }
                    response.privacy = Some(privacy_report(&report, c));
                }
                Ok((Arc::clone(&policy), response, charged))
            }
            Err(e) => {
                if let Some(c) = &charged {
                    self.state.refund_budget(&c.charge.query).await;
                }
                Err(e)
            }
        }
    }

    /// Matches the two datasets' `versions`; the count is noised under
    /// `private`.
    async fn count(
        &self,
        policy: &Arc<Policy>,
        [a, b]: [&Dataset; 2],
        versions: Vec<crate::storage::VersionInfo>,
        private: Option<&Plan>,
    ) -> Result<proto::OverlapResponse, ServiceError> {
        let names = [a.name(), b.name()];
        let matched_on = shared_kinds(a, b);
        let (state, da, db) = (self.state.clone(), a.clone(), b.clone());
        let p = Arc::clone(policy);
        let overlap = tokio::task::spawn_blocking(move || {
            matched_people(&state, &p, [&da, &db], [&versions[0], &versions[1]])
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("matching task: {e}")))??;
        let min = policy.query().min_group_size();
        let shown = match private {
            Some(plan) => {
                let mut rng = NoiseSource::from_os().map_err(|_| {
                    ServiceError::Internal("the system random source failed".into())
                })?;
                plan.release_people_count(overlap, &mut rng)
                    .map(|v| v.max(0) as u64)
            }
            None => (overlap >= u64::from(min)).then_some(overlap),
        };
        Ok(proto::OverlapResponse {
            overlap: shown,
            suppressed: shown.is_none(),
            min_group_size: min,
            datasets: names.map(str::to_string).to_vec(),
            matched_on,
            policy_hash: policy.hash().to_hex(),
            privacy: None,
        })
    }
}

/// The identity kinds two datasets are matched on: those both carry.
fn shared_kinds(a: &Dataset, b: &Dataset) -> Vec<String> {
    let kinds_b = b.identifier_columns();
    a.identifier_columns()
        .into_iter()
        .filter(|(_, k)| kinds_b.iter().any(|(_, kb)| kb == k))
        .map(|(_, k)| k.to_string())
        .collect()
}

/// The exact number of people two datasets' `versions` share: recorded
/// once per pair of versions and policy, matched only when not yet
/// recorded (one matching at a time per pair; a second caller waits for
/// the first's record). Blocking.
pub(crate) fn matched_people(
    state: &AppState,
    policy: &Policy,
    [a, b]: [&Dataset; 2],
    versions: [&VersionInfo; 2],
) -> Result<u64, ServiceError> {
    let store = state.store();
    let hash = policy.hash().to_hex();
    if let Some(people) = store.matched_overlap(versions, &hash)? {
        return Ok(people);
    }
    let mut pair = [a.name(), b.name()];
    pair.sort_unstable();
    let lock = state.dataset_lock(policy.id(), &format!("overlap {} {}", pair[0], pair[1]));
    let _one_at_a_time = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(people) = store.matched_overlap(versions, &hash)? {
        return Ok(people);
    }
    if let Some(people) = overlap_from_query_tables(state, policy, versions) {
        store.put_matched_overlap(versions, &hash, people)?;
        state.metrics().matched();
        return Ok(people);
    }
    // Linked kind by kind; only the person numbers are kept.
    let linked = link_versions(
        store,
        policy,
        &[(a, Some(versions[0])), (b, Some(versions[1]))],
        false,
    )?;
    let first_rows: usize = linked.shape.0[0].iter().sum();
    let (first, second) = linked.persons.split_at(first_rows);
    let [_, _, overlap] = people_counts(first, second)
        .ok_or_else(|| ServiceError::Internal("person numbers out of range".into()))?;
    store.put_matched_overlap(versions, &hash, overlap)?;
    state.metrics().matched();
    Ok(overlap)
}

/// Time spent reading versions (decrypting, decoding, copying) and matching
/// them (indexing, linking, keying).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LoadTimes {
    pub(super) read: std::time::Duration,
    pub(super) matching: std::time::Duration,
}

/// The rows of every batch of every side, as the first pass over the
/// versions read them: every later pass must read the same.
#[derive(Debug, Default)]
pub(super) struct Shape(Vec<Vec<usize>>);

impl Shape {
    fn of(batches: &[Vec<RecordBatch>]) -> Self {
        Shape(
            batches
                .iter()
                .map(|side| side.iter().map(RecordBatch::num_rows).collect())
                .collect(),
        )
    }

    /// An error if `batches` are not in this shape (a version read
    /// differently from one pass to the next).
    pub(super) fn check(&self, batches: &[Vec<RecordBatch>]) -> Result<(), ServiceError> {
        if Shape::of(batches).0 != self.0 {
            return Err(ServiceError::Internal(
                "a version read differently from one pass to the next".into(),
            ));
        }
        Ok(())
    }
}

/// What linking versions' identifier columns gave.
#[derive(Debug)]
pub(super) struct Linked {
    /// The person number of every row, the sides' rows in order.
    pub(super) persons: Vec<u32>,
    /// With keys wanted, the dense keys of every identifier column.
    pub(super) keys: Vec<crate::psi::ColumnKeys>,
    pub(super) shape: Shape,
    pub(super) took: LoadTimes,
}

/// Each side's batches, `read` side by side; `read` is given the side's
/// number and version (a side without a version has no batches).
pub(super) fn read_side_by_side(
    sides: &[(&Dataset, Option<&VersionInfo>)],
    read: &(impl Fn(usize, &VersionInfo) -> Result<Vec<RecordBatch>, ServiceError> + Sync),
) -> Result<Vec<Vec<RecordBatch>>, ServiceError> {
    std::thread::scope(|scope| {
        let reads: Vec<_> = sides
            .iter()
            .enumerate()
            .map(|(side, (_, v))| {
                scope.spawn(move || match v {
                    Some(v) => read(side, v),
                    None => Ok(Vec::new()),
                })
            })
            .collect();
        reads
            .into_iter()
            .map(|r| {
                r.join().unwrap_or_else(|_| {
                    Err(ServiceError::Internal("reading a version failed".into()))
                })
            })
            .collect()
    })
}

/// Links the rows of the `sides`' versions into people, one identity kind
/// at a time.
///
/// Fingerprints are the largest thing a matching holds (32 bytes each), so
/// each kind's identifier columns are read from the versions (side by side,
/// through one chunk's memory each), indexed and linked, then dropped,
/// keeping only their dense keys. Under `ecdh` every kind is read in one
/// pass, as the points are substituted on every read. Each version is
/// decrypted once per pass; the memory held is one kind's fingerprints, not
/// every kind's.
pub(super) fn link_versions(
    store: &crate::storage::Store,
    policy: &Policy,
    sides: &[(&Dataset, Option<&VersionInfo>)],
    want_keys: bool,
) -> Result<Linked, ServiceError> {
    let mut took = LoadTimes::default();
    let mut kinds: Vec<&str> = sides
        .iter()
        .flat_map(|(d, _)| d.identifier_columns().into_iter().map(|(_, k)| k))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let mut passes: Vec<Vec<&str>> = match policy.matching() {
        crate::policy::Matching::Keyed => kinds.iter().map(|k| vec![*k]).collect(),
        crate::policy::Matching::Ecdh => vec![kinds.clone()],
    };
    // Without any identifier column, one pass counts the rows: every row
    // is then a person of its own.
    if passes.is_empty() {
        passes.push(Vec::new());
    }
    let identifiers: Vec<Vec<(&str, &str)>> =
        sides.iter().map(|(d, _)| d.identifier_columns()).collect();
    let mut shape: Option<Shape> = None;
    let mut linking: Option<crate::psi::Linking> = None;
    for pass in &passes {
        let started = std::time::Instant::now();
        let batches = read_side_by_side(sides, &|side, v| {
            let wanted: Vec<&str> = identifiers[side]
                .iter()
                .filter(|(_, k)| pass.contains(k))
                .map(|(c, _)| *c)
                .collect();
            read_matchable(store, policy, v, &wanted)?
                .ok_or_else(|| not_blinded(policy, &v.dataset))
        })?;
        match &shape {
            Some(s) => s.check(&batches)?,
            None => shape = Some(Shape::of(&batches)),
        }
        took.read += started.elapsed();
        let started = std::time::Instant::now();
        let linking = linking.get_or_insert_with(|| {
            crate::psi::Linking::new(
                batches.iter().flatten().map(RecordBatch::num_rows).sum(),
                want_keys,
            )
        });
        let sides: Vec<Side<'_>> = batches
            .iter()
            .zip(&identifiers)
            .map(|(b, ids)| Side {
                batches: b,
                identifiers: ids,
            })
            .collect();
        for kind in pass {
            linking.add_kind(&sides, kind).ok_or_else(|| {
                ServiceError::Internal(
                    "a version read differently from one pass to the next".into(),
                )
            })?;
        }
        took.matching += started.elapsed();
    }
    let (Some(linking), Some(shape)) = (linking, shape) else {
        return Err(ServiceError::Internal("no pass over the versions".into()));
    };
    let started = std::time::Instant::now();
    let (persons, keys) = linking.finish();
    took.matching += started.elapsed();
    Ok(Linked {
        persons,
        keys,
        shape,
        took,
    })
}

/// Matches the agreement's current versions ahead of requests: loads its
/// query tables (when it is queried and every dataset is there) and
/// records the overlap of every pair of datasets that share an identity
/// kind. With two datasets the tables' matching gives the overlap too, so
/// the versions are matched once. Returns the tables to store for the next
/// start ([`save_tables`]), if any. For the background matcher; failures
/// are logged, the next request retries.
pub(crate) fn match_agreement(
    state: &AppState,
    agreement: &str,
) -> Option<(Arc<Policy>, super::queries::Loaded)> {
    let policy = state.policies().get(agreement).cloned()?;
    let store = state.store();
    let complete = || -> Result<bool, ServiceError> {
        for d in policy.datasets() {
            match store.current(policy.id(), d.name())? {
                Some(v)
                    if policy.made_now(d, &v.form)
                        && !store.is_damaged(&v)?
                        && is_matchable(store, &policy, &v)? => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    };
    // Until every dataset is there, a query loads what there is itself.
    let loaded = if is_queried(&policy) && complete().unwrap_or(false) {
        match state.query_tables().tables(state, &policy) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                tracing::warn!(error = %e, "loading query tables in the background failed; the next query retries");
                None
            }
        }
    } else {
        None
    };
    let datasets = policy.datasets();
    for (i, a) in datasets.iter().enumerate() {
        for b in &datasets[i + 1..] {
            if shared_kinds(a, b).is_empty() {
                continue;
            }
            let run = || -> Result<(), ServiceError> {
                let (Some(va), Some(vb)) = (
                    store.current(policy.id(), a.name())?,
                    store.current(policy.id(), b.name())?,
                ) else {
                    return Ok(());
                };
                if !policy.made_now(a, &va.form)
                    || !policy.made_now(b, &vb.form)
                    || store.is_damaged(&va)?
                    || store.is_damaged(&vb)?
                    || !is_matchable(store, &policy, &va)?
                    || !is_matchable(store, &policy, &vb)?
                {
                    return Ok(());
                }
                matched_people(state, &policy, [a, b], [&va, &vb])?;
                Ok(())
            };
            if let Err(e) = run() {
                tracing::warn!(error = %e, "background matching failed; the next overlap retries");
            }
        }
    }
    loaded.map(|l| (policy, l))
}

/// Whether any party may query the agreement (and so needs query tables).
fn is_queried(policy: &Policy) -> bool {
    policy
        .parties()
        .iter()
        .any(|p| policy.allows(p.org(), Right::Query))
}

/// Under a queried two-dataset agreement, the overlap of `versions` from
/// its query tables (in memory, in the store, or being loaded by another
/// caller, whose load this waits for), so that the versions are matched
/// once for both.
fn overlap_from_query_tables(
    state: &AppState,
    policy: &Policy,
    versions: [&VersionInfo; 2],
) -> Option<u64> {
    if policy.datasets().len() != 2 || !is_queried(policy) {
        return None;
    }
    let loaded = state.query_tables().tables(state, policy).ok()?;
    if loaded.matched_now {
        // The background matcher stores them for the next start.
        state.match_soon(policy.id());
    }
    overlap_in_tables(policy, &loaded, versions)
}

/// The overlap of a two-dataset agreement's `versions`, from query tables
/// matched from exactly those versions: the tables number people across
/// both datasets on every identifier column, as an overlap's matching
/// does. None for other agreements or other versions.
fn overlap_in_tables(
    policy: &Policy,
    loaded: &super::queries::Loaded,
    versions: [&VersionInfo; 2],
) -> Option<u64> {
    let [first, second] = loaded.tables.as_slice() else {
        return None;
    };
    let same = |held: &Option<VersionInfo>, v: &VersionInfo| {
        held.as_ref()
            .is_some_and(|h| h.dataset == v.dataset && h.version == v.version)
    };
    if policy.datasets().len() != 2
        || loaded.versions.len() != 2
        || !same(&loaded.versions[0], versions[0])
        || !same(&loaded.versions[1], versions[1])
    {
        return None;
    }
    let [_, _, both] = people_counts(&first.person_of_row, &second.person_of_row)?;
    Some(both)
}

/// Stores the agreement's loaded tables, unless the store already holds
/// them.
pub(crate) fn save_tables(
    state: &AppState,
    policy: &Policy,
    loaded: &super::queries::Loaded,
) -> Result<(), ServiceError> {
    let store = state.store();
    if store.matched_tables_built_from(policy.id())?.as_ref() == Some(&loaded.key) {
        return Ok(());
    }
    let versions: Vec<&VersionInfo> = loaded.versions.iter().flatten().collect();
    let mut tables = Vec::new();
    for (table, version) in loaded.tables.iter().zip(&loaded.versions) {
        if version.is_some() {
            let batches = crate::query::matched_batches(table)
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            tables.push((table.dataset.name(), batches));
        }
    }
    let tables: Vec<(&str, &[arrow::record_batch::RecordBatch])> =
        tables.iter().map(|(d, b)| (*d, b.as_slice())).collect();
    let started = std::time::Instant::now();
    if store.put_matched_tables(&loaded.key, &versions, &tables)? {
        state.metrics().matched_tables_saved();
        tracing::info!(
            agreement = policy.id(),
            write_ms = started.elapsed().as_millis() as u64,
            "matched tables stored"
        );
    }
    Ok(())
}

#[tonic::async_trait]
impl proto::matching_server::Matching for MatchingService {
    type BlindingWorkStream = WorkStream;

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn blinding_work(
        &self,
        request: Request<proto::BlindingWorkRequest>,
    ) -> Result<Response<WorkStream>, Status> {
        self.blinding_work_of(request).await
    }

    #[tracing::instrument(skip_all)]
    async fn submit_blinding(
        &self,
        request: Request<tonic::Streaming<proto::BlindingSubmission>>,
    ) -> Result<Response<proto::SubmitBlindingResponse>, Status> {
        self.submit_blinding_of(request).await
    }

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn overlap(
        &self,
        request: Request<proto::OverlapRequest>,
    ) -> Result<Response<proto::OverlapResponse>, Status> {
        let org = caller(&request)?;
        let outcome = self.overlap_of(&org, request.get_ref()).await;
        let event = Event {
            org,
            agreement: request.get_ref().agreement_id.clone(),
            action: "overlap",
            ..Event::default()
        };
        let audited = self.state.audit_outcome(event, &outcome, |(p, r, c), e| {
            e.policy_hash = p.hash().to_hex();
            e.subject = Some(r.datasets.join(" x "));
            match c {
                Some(c) => {
                    e.epsilon = Some(c.epsilon);
                    e.delta = Some(crate::storage::delta_from_units(c.charge.delta_units));
                    e.query_id = Some(c.charge.query.clone());
                }
                None => e.suppressed = Some(u64::from(r.suppressed)),
            }
        });
        let charged = outcome.as_ref().ok().and_then(|(_, _, c)| c.as_ref());
        self.state.finish_charge(charged, &audited).await;
        audited?;
        Ok(Response::new(outcome?.1))
    }
}
