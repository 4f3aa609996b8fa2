//! The table cache: an agreement's datasets decrypted, matched into people
//! and keyed, held in memory while their versions stay current, and stored
//! matched for the next start. Matching links the rows of every version
//! kind by kind (`docs/matching.md`).

use std::sync::Arc;

use arrow::record_batch::RecordBatch;

use super::blinding::{is_matchable, not_blinded, read_matchable};
use super::{Room, RoomError};
use crate::policy::{Dataset, Policy};
use crate::psi::Side;
use crate::query::{QueryLimits, TableData};
use crate::storage::VersionInfo;

/// One agreement's tables and the versions (and policy) they were built from.
#[derive(Debug)]
struct Cached {
    key: Vec<String>,
    tables: Arc<Vec<TableData>>,
    /// Memory the tables hold, for the cache's budget.
    bytes: u64,
    /// Whether the versions were still current once loaded.
    current: bool,
}

impl Loaded {
    /// The datasets with data.
    pub(crate) fn present(&self) -> Vec<&str> {
        self.versions
            .iter()
            .flatten()
            .map(|v| v.dataset.as_str())
            .collect()
    }
}

/// The form of the query tables, part of what stored tables were built
/// from: tables stored in another form are matched again, never misread.
const TABLES_FORMAT: &str = "query tables v2: dense keys, dictionary dimensions";

/// An agreement's query tables and what they were built from.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) tables: Arc<Vec<TableData>>,
    /// The versions (in the policy's dataset order, "" where none), the
    /// policy hash and the tables' form.
    pub(crate) key: Vec<String>,
    /// The versions the tables hold rows of, in the policy's dataset order.
    pub(crate) versions: Vec<Option<crate::storage::VersionInfo>>,
    /// This call matched them from the versions (rather than finding them
    /// in memory or in the store).
    pub(crate) matched_now: bool,
}

/// Decrypted and matched tables per agreement, kept while the datasets'
/// current versions stay the same, within a memory budget (least recently
/// used agreements leave first). An agreement is loaded once at a time: a
/// caller arriving during a load waits for it instead of decrypting the
/// same data again.
#[derive(Clone)]
pub(crate) struct TableCache {
    inner: moka::sync::Cache<String, Arc<Cached>>,
}

impl std::fmt::Debug for TableCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableCache")
            .field("agreements", &self.len())
            .finish()
    }
}

impl Default for TableCache {
    fn default() -> Self {
        TableCache::new(QueryLimits::default().table_cache_bytes, None)
    }
}

impl TableCache {
    /// A cache holding at most `budget` bytes of tables. Whatever lets an
    /// agreement's tables go (an erasure, a new version, a retention run, a
    /// reload, the budget) drops their placement on `cluster`'s workers too.
    pub(crate) fn new(budget: u64, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        // Weights in KiB, so one entry can weigh up to 4 TiB.
        let mut builder = moka::sync::Cache::builder()
            .max_capacity((budget / 1024).max(1))
            .weigher(|_: &String, c: &Arc<Cached>| {
                u32::try_from(c.bytes / 1024).unwrap_or(u32::MAX).max(1)
            });
        if let Some(cluster) = cluster {
            builder =
                builder.eviction_listener(move |agreement: Arc<String>, c: Arc<Cached>, _| {
                    cluster.forget(&agreement, Some(&c.key));
                });
        }
        let inner = builder.build();
        TableCache { inner }
    }

    /// The agreement's tables for its current versions, loading and
    /// matching them if they changed. Blocking: call off the async runtime.
    pub(crate) fn tables(&self, room: &Room, policy: &Policy) -> Result<Loaded, RoomError> {
        let store = room.store();
        let (versions, key) = current_versions(room, policy)?;
        let matched_now = std::cell::Cell::new(false);
        let loaded = |tables: &Arc<Vec<TableData>>| Loaded {
            tables: Arc::clone(tables),
            key: key.clone(),
            versions: versions.clone(),
            matched_now: matched_now.get(),
        };
        match self.inner.get(policy.id()) {
            Some(cached) if cached.key == key => return Ok(loaded(&cached.tables)),
            Some(_) => self.inner.invalidate(policy.id()),
            None => {}
        }
        let load = || -> Result<Arc<Cached>, RoomError> {
            let tables = match self.stored(room, policy, &key) {
                Some(tables) => tables,
                None => {
                    matched_now.set(true);
                    self.matched(room, policy, &versions)?
                }
            };
            let bytes = tables.iter().map(held_bytes).sum();
            // An erasure or a new version committed while these were
            // loading has already dropped the agreement's entry; these rows
            // must not come back into memory with it.
            let mut current = true;
            for (d, v) in policy.datasets().iter().zip(&versions) {
                let now = store.current(policy.id(), d.name())?;
                current &= now.map(|n| n.version) == v.as_ref().map(|v| v.version.clone());
            }
            Ok(Arc::new(Cached {
                key: key.clone(),
                tables: Arc::new(tables),
                bytes,
                current,
            }))
        };
        let cached = match self.inner.try_get_with(policy.id().to_string(), load) {
            Ok(cached) => cached,
            Err(shared) => match Arc::try_unwrap(shared) {
                // This caller's own load failed: its own error.
                Ok(e) => return Err(e),
                // Another caller's load failed while this one waited for it
                // (the background matcher, or a query under the policy
                // before a reload): this caller loads for itself, so that
                // it answers or fails for its own reason, never for
                // another's.
                Err(_) => load()?,
            },
        };
        // Evict now, not at some later call, if the budget is exceeded.
        self.inner.run_pending_tasks();
        if !cached.current || cached.key != key {
            // Not kept: stale, or another caller's load of other versions.
            self.inner.invalidate(policy.id());
            if cached.key != key {
                return Ok(loaded(&load()?.tables));
            }
        }
        Ok(loaded(&cached.tables))
    }

    /// The tables stored by an earlier matching of exactly `key`, if any.
    fn stored(&self, room: &Room, policy: &Policy, key: &[String]) -> Option<Vec<TableData>> {
        let store = room.store();
        let started = std::time::Instant::now();
        let tables = match store.matched_tables(policy.id(), key) {
            Ok(stored) => crate::query::tables_from_matched(policy, stored?),
            Err(e) => {
                tracing::warn!(error = %e, "reading matched tables failed");
                None
            }
        };
        match &tables {
            Some(t) => {
                room.metrics().matched_tables_read();
                tracing::info!(
                    agreement = policy.id(),
                    rows = t.iter().map(|t| t.person_of_row.len()).sum::<usize>(),
                    read_ms = started.elapsed().as_millis() as u64,
                    "query tables read from the store"
                );
            }
            None => {
                // Damaged, gone or of another form: matched again, and
                // stored afresh by the background matcher.
                tracing::warn!("stored matched tables are not usable; matching again");
                if let Err(e) = store.drop_matched_tables(policy.id()) {
                    tracing::warn!(error = %e, "removing unusable matched tables failed");
                }
            }
        }
        tables
    }

    /// The tables of `versions`, read and matched ([`read_and_match`]).
    fn matched(
        &self,
        room: &Room,
        policy: &Policy,
        versions: &[Option<VersionInfo>],
    ) -> Result<Vec<TableData>, RoomError> {
        let (tables, took) = read_and_match(room.store(), policy, versions)?;
        room.metrics().tables_loaded();
        tracing::info!(
            agreement = policy.id(),
            rows = tables.iter().map(|t| t.person_of_row.len()).sum::<usize>(),
            read_ms = took.read.as_millis() as u64,
            match_ms = took.matching.as_millis() as u64,
            "query tables matched"
        );
        Ok(tables)
    }

    /// Drops an agreement's tables from memory at once: after an erasure,
    /// a retention run or a new version, what they hold is stale.
    pub(crate) fn forget(&self, agreement: &str) {
        self.inner.invalidate(agreement);
        self.inner.run_pending_tasks();
    }

    /// Drops every agreement's tables (after a policy reload).
    pub(crate) fn clear(&self) {
        let agreements: Vec<Arc<String>> = self.inner.iter().map(|(k, _)| k).collect();
        for a in agreements {
            self.inner.invalidate(a.as_str());
        }
        self.inner.run_pending_tasks();
    }

    /// Agreements whose tables are in memory.
    pub(crate) fn len(&self) -> usize {
        self.inner.iter().count()
    }

    /// Rows of the tables in memory.
    pub(crate) fn rows(&self) -> u64 {
        self.inner
            .iter()
            .map(|(_, c)| {
                c.tables
                    .iter()
                    .map(|t| t.person_of_row.len() as u64)
                    .sum::<u64>()
            })
            .sum()
    }
}

/// The bytes a table's rows take, for the cache's budget: what each
/// column's values use. (An Arrow array's own memory size counts the whole
/// allocation it points into, which columns decoded from one stored chunk
/// share; summed over columns, it would count that chunk once per column.)
fn held_bytes(t: &TableData) -> u64 {
    let columns: u64 = t
        .batches
        .iter()
        .flat_map(|b| b.columns())
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size()) as u64
        })
        .sum();
    // Two person numbers per row: across parties, and the owner's own.
    columns + 8 * t.person_of_row.len() as u64
}

/// The query tables of `versions` (in the policy's dataset order; None
/// where a dataset has none), matched and keyed: the identifier columns are
/// linked kind by kind ([`link_versions`]), then a last pass reads the
/// other columns into the tables' form and puts the keys in, each chunk as
/// it is read, so the reader goes on in the same chunk buffer.
fn read_and_match(
    store: &crate::storage::Store,
    policy: &Policy,
    versions: &[Option<VersionInfo>],
) -> Result<(Vec<TableData>, LoadTimes), RoomError> {
    let sides: Vec<(&crate::policy::Dataset, Option<&VersionInfo>)> = policy
        .datasets()
        .iter()
        .zip(versions)
        .map(|(d, v)| (d, v.as_ref()))
        .collect();
    let linked = link_versions(store, policy, &sides, true)?;
    let mut took = linked.took;
    let started = std::time::Instant::now();
    let keys = crate::query::KeysByPlace::new(linked.keys);
    let batches = read_side_by_side(&sides, &|side, v| {
        let d = sides[side].0;
        let mut batch_no = 0usize;
        store.read_with(v, |batch| {
            let keyed = keys
                .put_in(d, side, batch_no, &batch)
                .map_err(|e| RoomError::Internal(format!("putting keys in: {e}")))?;
            batch_no += 1;
            Ok::<_, RoomError>(crate::query::table_form(d, &keyed))
        })
    })?;
    linked.shape.check(&batches)?;
    took.read += started.elapsed();
    // Each party's own people, linked by the keys just put in.
    let started = std::time::Instant::now();
    let tables = crate::query::tables_with_people(policy, batches, linked.persons);
    took.matching += started.elapsed();
    Ok((tables, took))
}

/// Time spent reading versions (decrypting, decoding, copying) and matching
/// them (indexing, linking, keying).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LoadTimes {
    pub(crate) read: std::time::Duration,
    pub(crate) matching: std::time::Duration,
}

/// The rows of every batch of every side, as the first pass over the
/// versions read them: every later pass must read the same.
#[derive(Debug, Default)]
pub(crate) struct Shape(pub(crate) Vec<Vec<usize>>);

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
    pub(crate) fn check(&self, batches: &[Vec<RecordBatch>]) -> Result<(), RoomError> {
        if Shape::of(batches).0 != self.0 {
            return Err(RoomError::Internal(
                "a version read differently from one pass to the next".into(),
            ));
        }
        Ok(())
    }
}

/// What linking versions' identifier columns gave.
#[derive(Debug)]
pub(crate) struct Linked {
    /// The person number of every row, the sides' rows in order.
    pub(crate) persons: Vec<u32>,
    /// With keys wanted, the dense keys of every identifier column.
    pub(crate) keys: Vec<crate::psi::ColumnKeys>,
    pub(crate) shape: Shape,
    pub(crate) took: LoadTimes,
}

/// Each side's batches, `read` side by side; `read` is given the side's
/// number and version (a side without a version has no batches).
pub(crate) fn read_side_by_side(
    sides: &[(&Dataset, Option<&VersionInfo>)],
    read: &(impl Fn(usize, &VersionInfo) -> Result<Vec<RecordBatch>, RoomError> + Sync),
) -> Result<Vec<Vec<RecordBatch>>, RoomError> {
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
                r.join()
                    .unwrap_or_else(|_| Err(RoomError::Internal("reading a version failed".into())))
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
pub(crate) fn link_versions(
    store: &crate::storage::Store,
    policy: &Policy,
    sides: &[(&Dataset, Option<&VersionInfo>)],
    want_keys: bool,
) -> Result<Linked, RoomError> {
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
                RoomError::Internal("a version read differently from one pass to the next".into())
            })?;
        }
        took.matching += started.elapsed();
    }
    let (Some(linking), Some(shape)) = (linking, shape) else {
        return Err(RoomError::Internal("no pass over the versions".into()));
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

/// The versions an agreement's tables are built from now (in the policy's
/// dataset order; None where a dataset has no usable version) and the key
/// naming them with the policy and the tables' form.
pub(crate) fn current_versions(
    room: &Room,
    policy: &Policy,
) -> Result<(Vec<Option<VersionInfo>>, Vec<String>), RoomError> {
    let store = room.store();
    let mut versions = Vec::new();
    for d in policy.datasets() {
        let v = store.current(policy.id(), d.name())?;
        // Never compare rows made under two salts.
        if let Some(v) = &v
            && !policy.made_now(d, &v.form)
        {
            return Err(RoomError::NeedsUpload(d.name().to_string()));
        }
        versions.push(v);
    }
    // Under matching = "ecdh" a version the partner has not blinded yet
    // cannot be matched: it is left out, as if not uploaded. So is a
    // damaged one: queries that do not read it still answer.
    for v in versions.iter_mut() {
        if let Some(info) = v
            && (store.is_damaged(info)? || !is_matchable(store, policy, info)?)
        {
            *v = None;
        }
    }
    let key: Vec<String> = versions
        .iter()
        .map(|v| v.as_ref().map(|v| v.version.clone()).unwrap_or_default())
        .chain([policy.hash().to_hex(), TABLES_FORMAT.to_string()])
        .collect();
    Ok((versions, key))
}

#[cfg(test)]
mod tests;
