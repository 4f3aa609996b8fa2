//! Matching: the overlap between two parties' datasets, recorded once per
//! pair of versions, and the background matching of an agreement's current
//! versions ahead of requests.

use std::sync::Arc;

use super::blinding::{is_matchable, not_blinded};
use super::budget::{Charged, Spent, epsilon_for, no_epsilon, spent};
use super::tables::{Loaded, link_versions};
use super::{Room, RoomError, bounded_name};
use crate::audit::Event;
use crate::policy::{Dataset, Policy, Right};
use crate::privacy::{Measure, NoiseSource, Plan, Settings};
use crate::psi::people_counts;
use crate::storage::VersionInfo;

/// An overlap asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverlapAsk {
    pub agreement: String,
    /// The two datasets, or none for an agreement of two.
    pub datasets: Vec<String>,
    /// The epsilon to spend under differential privacy.
    pub epsilon: Option<f64>,
}

/// An overlap as released.
#[derive(Debug, Clone)]
pub struct Overlap {
    /// The people both datasets hold; None when under the minimum group
    /// size.
    pub overlap: Option<u64>,
    pub min_group_size: u32,
    pub datasets: Vec<String>,
    /// The identity kinds the two were matched on.
    pub matched_on: Vec<String>,
    pub policy_hash: String,
    /// Under differential privacy, the noise and the budget left.
    pub privacy: Option<Spent>,
}

/// The two datasets an overlap is about.
fn pick_datasets<'p>(policy: &'p Policy, names: &[String]) -> Result<[&'p Dataset; 2], RoomError> {
    let bad = |rule: String| RoomError::invalid("datasets", rule);
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
            bounded_name("datasets", n)?;
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

impl Room {
    /// The number of people two datasets of agreement `ask.agreement` share,
    /// as `org` may see it: at least the minimum group size, or under
    /// differential privacy noised and charged. Audited.
    pub async fn overlap(&self, org: &str, ask: &OverlapAsk) -> Result<Overlap, RoomError> {
        let outcome = self.overlap_of(org, ask).await;
        let event = Event {
            org: org.to_string(),
            agreement: ask.agreement.clone(),
            action: "overlap",
            ..Event::default()
        };
        let audited = self.audit_outcome(event, &outcome, |(p, r, c), e| {
            e.policy_hash = p.hash().to_hex();
            e.subject = Some(r.datasets.join(" x "));
            match c {
                Some(c) => {
                    e.epsilon = Some(c.epsilon);
                    e.delta = Some(crate::storage::delta_from_units(c.charge.delta_units));
                    e.query_id = Some(c.charge.query.clone());
                }
                None => e.suppressed = Some(u64::from(r.overlap.is_none())),
            }
        });
        let charged = outcome.as_ref().ok().and_then(|(_, _, c)| c.as_ref());
        self.finish_charge(charged, &audited).await;
        audited?;
        Ok(outcome?.1)
    }

    async fn overlap_of(
        &self,
        org: &str,
        ask: &OverlapAsk,
    ) -> Result<(Arc<Policy>, Overlap, Option<Charged>), RoomError> {
        let policy = self.agreement_in_force(org, &ask.agreement)?;
        if !policy.allows(org, Right::SeeOverlap) {
            return Err(RoomError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} lacks \"see_overlap\" in agreement {}", policy.id()),
            });
        }
        let [a, b] = pick_datasets(&policy, &ask.datasets)?;
        // Under differential privacy: the noise plan and the charge come
        // first, as for a query.
        let private = match policy.privacy() {
            Some(privacy) => {
                let epsilon = epsilon_for(privacy, ask.epsilon)?;
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
                    RoomError::QueryRefused(crate::query::Violation::deny(e.rule, e.detail))
                })?;
                Some(plan)
            }
            None => {
                no_epsilon(&policy, ask.epsilon)?;
                None
            }
        };
        let mut versions = Vec::new();
        for d in [a, b] {
            let store = self.store();
            let v = store
                .current(policy.id(), d.name())?
                .ok_or_else(|| RoomError::NoData(d.name().to_string()))?;
            if !policy.made_now(d, &v.form) {
                return Err(RoomError::NeedsUpload(d.name().to_string()));
            }
            if store.is_damaged(&v)? {
                return Err(RoomError::DatasetDamaged(d.name().to_string()));
            }
            if !is_matchable(store, &policy, &v)? {
                return Err(not_blinded(&policy, d.name()));
            }
            versions.push(v);
        }
        let charged = match (&private, policy.privacy()) {
            (Some(plan), Some(privacy)) => Some(
                self.charge_budget(org, &policy, privacy, plan.report().epsilon)
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
                    response.privacy = Some(spent(&report, c));
                }
                Ok((Arc::clone(&policy), response, charged))
            }
            Err(e) => {
                if let Some(c) = &charged {
                    self.refund_budget(&c.charge.query).await;
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
    ) -> Result<Overlap, RoomError> {
        let names = [a.name(), b.name()];
        let matched_on = shared_kinds(a, b);
        let (room, da, db) = (self.clone(), a.clone(), b.clone());
        let p = Arc::clone(policy);
        let overlap = tokio::task::spawn_blocking(move || {
            matched_people(&room, &p, [&da, &db], [&versions[0], &versions[1]])
        })
        .await
        .map_err(|e| RoomError::Internal(format!("matching task: {e}")))??;
        let min = policy.query().min_group_size();
        let shown = match private {
            Some(plan) => {
                let mut rng = NoiseSource::from_os()
                    .map_err(|_| RoomError::Internal("the system random source failed".into()))?;
                plan.release_people_count(overlap, &mut rng)
                    .map(|v| v.max(0) as u64)
            }
            None => (overlap >= u64::from(min)).then_some(overlap),
        };
        Ok(Overlap {
            overlap: shown,
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
    room: &Room,
    policy: &Policy,
    [a, b]: [&Dataset; 2],
    versions: [&VersionInfo; 2],
) -> Result<u64, RoomError> {
    let store = room.store();
    let hash = policy.hash().to_hex();
    if let Some(people) = store.matched_overlap(versions, &hash)? {
        return Ok(people);
    }
    let mut pair = [a.name(), b.name()];
    pair.sort_unstable();
    let lock = room.dataset_lock(policy.id(), &format!("overlap {} {}", pair[0], pair[1]));
    let _one_at_a_time = lock.lock();
    if let Some(people) = store.matched_overlap(versions, &hash)? {
        return Ok(people);
    }
    if let Some(people) = overlap_from_query_tables(room, policy, versions) {
        store.put_matched_overlap(versions, &hash, people)?;
        room.metrics().matched();
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
        .ok_or_else(|| RoomError::Internal("person numbers out of range".into()))?;
    store.put_matched_overlap(versions, &hash, overlap)?;
    room.metrics().matched();
    Ok(overlap)
}

/// Matches the agreement's current versions ahead of requests: loads its
/// query tables (when it is queried and every dataset is there) and
/// records the overlap of every pair of datasets that share an identity
/// kind. With two datasets the tables' matching gives the overlap too, so
/// the versions are matched once. Returns the tables to store for the next
/// start ([`save_tables`]), if any. For the background matcher; failures
/// are logged, the next request retries.
pub(crate) fn match_agreement(room: &Room, agreement: &str) -> Option<(Arc<Policy>, Loaded)> {
    let policy = room.policies().get(agreement).cloned()?;
    let store = room.store();
    let complete = || -> Result<bool, RoomError> {
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
    // Tables the store already holds for these versions are not loaded
    // again only to be found stored (a query that matched them asks for a
    // run too).
    let stored_already = || -> Result<bool, RoomError> {
        let (_, key) = super::tables::current_versions(room, &policy)?;
        Ok(store.matched_tables_built_from(policy.id())?.as_ref() == Some(&key))
    };
    let loaded = if is_queried(&policy)
        && complete().unwrap_or(false)
        && !stored_already().unwrap_or(false)
    {
        match room.query_tables().tables(room, &policy) {
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
            let run = || -> Result<(), RoomError> {
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
                matched_people(room, &policy, [a, b], [&va, &vb])?;
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
    room: &Room,
    policy: &Policy,
    versions: [&VersionInfo; 2],
) -> Option<u64> {
    if policy.datasets().len() != 2 || !is_queried(policy) {
        return None;
    }
    let loaded = room.query_tables().tables(room, policy).ok()?;
    if loaded.matched_now {
        // The background matcher stores them for the next start.
        room.match_soon(policy.id());
    }
    overlap_in_tables(policy, &loaded, versions)
}

/// The overlap of a two-dataset agreement's `versions`, from query tables
/// matched from exactly those versions: the tables number people across
/// both datasets on every identifier column, as an overlap's matching
/// does. None for other agreements or other versions.
fn overlap_in_tables(policy: &Policy, loaded: &Loaded, versions: [&VersionInfo; 2]) -> Option<u64> {
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
pub(crate) fn save_tables(room: &Room, policy: &Policy, loaded: &Loaded) -> Result<(), RoomError> {
    let store = room.store();
    if store.matched_tables_built_from(policy.id())?.as_ref() == Some(&loaded.key) {
        return Ok(());
    }
    let versions: Vec<&VersionInfo> = loaded.versions.iter().flatten().collect();
    let mut tables = Vec::new();
    for (table, version) in loaded.tables.iter().zip(&loaded.versions) {
        if version.is_some() {
            let batches = crate::query::matched_batches(table)
                .map_err(|e| RoomError::Internal(e.to_string()))?;
            tables.push((table.dataset.name(), batches));
        }
    }
    let tables: Vec<(&str, &[arrow::record_batch::RecordBatch])> =
        tables.iter().map(|(d, b)| (*d, b.as_slice())).collect();
    let started = std::time::Instant::now();
    if store.put_matched_tables(&loaded.key, &versions, &tables)? {
        room.metrics().matched_tables_saved();
        tracing::info!(
            agreement = policy.id(),
            write_ms = started.elapsed().as_millis() as u64,
            "matched tables stored"
        );
    }
    Ok(())
}
