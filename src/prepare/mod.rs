//! The partner side of an upload: read the partner's own file, keep only the
//! columns the agreement names, normalise and fingerprint identifiers on
//! this machine, and turn rows into the Arrow batches the server expects.

mod blind;
mod columns;
mod erase;
mod input;
mod lines;
mod seen;
mod send;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Builder, Float64Builder, Int64Builder, StringArray,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::cast_utils::{self, Parser};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::identity::blinding::{BlindingKey, blind_values};
use crate::identity::{Fingerprinter, Invalid, Normaliser, PHONE_METADATA, Secret};
use crate::policy::{Profile, Standard};
use crate::proto;

pub use blind::{BlindingDone, Job, MatchReport, complete_job, fetch_work, match_pending};
pub use erase::{EraseOptions, EraseReport, erase};
pub use input::{Chunk, CsvOptions, InputFormat, InputReader};
pub use send::{UploadError, UploadOptions, UploadReport, upload};

/// Why the partner's file could not be prepared. Never carries a value.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{file}: {detail}")]
    Input { file: PathBuf, detail: String },
    #[error("{0}")]
    Plan(String),
    #[error("row {row}: column {column:?} {rule}")]
    Value {
        row: u64,
        column: String,
        rule: &'static str,
    },
}

/// What makes a party's identifiers comparable, as its agreement's
/// `matching` calls for: the partners' shared secret (`keyed`), or the
/// party's own blinding key (`ecdh`).
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    Shared(&'a Secret),
    Blinding(&'a BlindingKey),
}

impl Keys<'_> {
    /// What the server is told of the key: under `ecdh` the id of the
    /// blinding key (a public point), under `keyed` nothing.
    pub fn key_id(&self) -> Vec<u8> {
        match self {
            Keys::Shared(_) => Vec::new(),
            Keys::Blinding(key) => key.key_id().to_vec(),
        }
    }
}

impl<'a> From<&'a Secret> for Keys<'a> {
    fn from(secret: &'a Secret) -> Self {
        Keys::Shared(secret)
    }
}

impl<'a> From<&'a BlindingKey> for Keys<'a> {
    fn from(key: &'a BlindingKey) -> Self {
        Keys::Blinding(key)
    }
}

/// How one identifier column's normalised values become 32 bytes.
#[derive(Debug, Clone)]
enum Keying {
    Fingerprint(Fingerprinter),
    Blind {
        key: BlindingKey,
        salt: [u8; 32],
        kind: String,
    },
}

#[derive(Debug, Clone)]
enum Kind {
    Identifier {
        normaliser: Normaliser,
        keying: Keying,
    },
    Text,
    Integer,
    Float,
    Date,
    Timestamp,
}

#[derive(Debug, Clone)]
struct PlanColumn {
    name: String,
    input_index: usize,
    kind: Kind,
    /// The identity kind of an identifier column.
    identity: Option<String>,
}

/// What to send, column by column, and what is left behind.
#[derive(Debug, Clone)]
pub struct Plan {
    dataset: String,
    columns: Vec<PlanColumn>,
    schema: SchemaRef,
    dropped: Vec<String>,
}

fn profile_of(kind: &proto::IdentityKind) -> Result<Profile, PrepareError> {
    let upgrade = |what: String| {
        PrepareError::Plan(format!(
            "identity kind {:?} {what}, which this client does not know; upgrade cleanroom",
            kind.name
        ))
    };
    // None sent: ours.
    let standard = match proto::IdentityStandard::try_from(kind.standard) {
        Ok(proto::IdentityStandard::Unspecified | proto::IdentityStandard::Cleanroom) => {
            Standard::Cleanroom
        }
        Ok(proto::IdentityStandard::Google) => Standard::Google,
        Ok(proto::IdentityStandard::Meta) => Standard::Meta,
        Ok(proto::IdentityStandard::Uid2) => Standard::Uid2,
        Err(_) => return Err(upgrade(format!("follows standard {}", kind.standard))),
    };
    let profile = proto::IdentityProfile::try_from(kind.profile)
        .ok()
        .filter(|p| *p != proto::IdentityProfile::Unspecified)
        .ok_or_else(|| upgrade(format!("uses profile {}", kind.profile)))?;
    match profile {
        proto::IdentityProfile::Email => Ok(Profile::Email {
            gmail_canonical: kind.gmail_canonical,
            standard,
        }),
        proto::IdentityProfile::Phone if kind.phone_metadata != PHONE_METADATA => {
            Err(PrepareError::Plan(format!(
                "identity kind {:?} reads phone numbers by libphonenumber metadata {:?} and this client has {PHONE_METADATA:?}: both parties must read numbers alike; use the cleanroom release the server runs",
                kind.name, kind.phone_metadata
            )))
        }
        proto::IdentityProfile::Phone => Ok(Profile::Phone {
            default_country: kind.default_country.clone(),
            standard,
        }),
        proto::IdentityProfile::Text | proto::IdentityProfile::Unspecified => Ok(Profile::Text),
    }
}

/// What is wrong with a header as a whole, if that is the problem rather
/// than a column's name: an empty file, or a file separated by another
/// character than the one it was read with. Names only separators, never
/// a column name or value.
fn header_problem(header: &[String]) -> Option<String> {
    if header.iter().all(|h| h.trim().is_empty()) {
        return Some("the input is empty: it has no header line naming its columns".into());
    }
    if let [only] = header {
        for (c, shown) in [(';', ";"), ('\t', "\\t"), ('|', "|")] {
            if only.contains(c) {
                return Some(format!(
                    "the header reads as one column holding {shown:?}: the file looks {shown:?}-separated; pass --delimiter '{shown}'"
                ));
            }
        }
    }
    None
}

impl Plan {
    /// Plans the upload of `dataset` from a file whose header is `header`.
    /// `mapping` maps policy column names to input column names; unmapped
    /// columns are looked up under their policy name.
    pub fn new(
        agreement: &proto::Agreement,
        dataset: &str,
        keys: Keys<'_>,
        header: &[String],
        mapping: &BTreeMap<String, String>,
    ) -> Result<Self, PrepareError> {
        Self::build(agreement, dataset, keys, header, mapping, false)
    }

    /// Plans fingerprinting only the identifier columns the input has (at
    /// least one), as an erasure request needs.
    pub fn identifiers(
        agreement: &proto::Agreement,
        dataset: &str,
        keys: Keys<'_>,
        header: &[String],
        mapping: &BTreeMap<String, String>,
    ) -> Result<Self, PrepareError> {
        let plan = Self::build(agreement, dataset, keys, header, mapping, true)?;
        if plan.columns.is_empty() {
            if let Some(hint) = header_problem(header) {
                return Err(PrepareError::Plan(hint));
            }
            return Err(PrepareError::Plan(format!(
                "the input has none of dataset {dataset:?}'s identifier columns (input columns: {}); map one with --map POLICY_COLUMN=INPUT_COLUMN",
                header.join(", ")
            )));
        }
        Ok(plan)
    }

    /// The identity kind of each planned identifier column, in plan order
    /// (None for other columns).
    pub fn identity_kinds(&self) -> Vec<Option<String>> {
        self.columns.iter().map(|c| c.identity.clone()).collect()
    }

    fn build(
        agreement: &proto::Agreement,
        dataset: &str,
        keys: Keys<'_>,
        header: &[String],
        mapping: &BTreeMap<String, String>,
        identifiers_only: bool,
    ) -> Result<Self, PrepareError> {
        let ecdh = agreement.matching == proto::MatchingMode::Ecdh as i32;
        match (ecdh, keys) {
            (true, Keys::Shared(_)) => {
                return Err(PrepareError::Plan(
                    "this agreement matches without a shared secret (matching = \"ecdh\"): give your own blinding key with --key-file (`cleanroom key new` makes one)".into(),
                ));
            }
            (false, Keys::Blinding(_)) => {
                return Err(PrepareError::Plan(
                    "this agreement matches keyed fingerprints (matching = \"keyed\"): give the partners' shared secret with --secret-file".into(),
                ));
            }
            _ => {}
        }
        let d = agreement
            .datasets
            .iter()
            .find(|d| d.name == dataset)
            .ok_or_else(|| {
                PrepareError::Plan(format!(
                    "dataset {dataset:?} is not one of your datasets in this agreement"
                ))
            })?;
        let salt: [u8; 32] = hex::decode(&agreement.salt)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| PrepareError::Plan("the server sent a malformed salt".into()))?;
        for policy_name in mapping.keys() {
            if !d.columns.iter().any(|c| &c.name == policy_name) {
                return Err(PrepareError::Plan(format!(
                    "--map names {policy_name:?}, which is not a column of dataset {dataset:?}"
                )));
            }
        }
        let mut columns = Vec::new();
        let mut fields = Vec::new();
        let mut used = HashSet::new();
        for c in &d.columns {
            let role =
                proto::ColumnRole::try_from(c.role).unwrap_or(proto::ColumnRole::Unspecified);
            let input_name = mapping.get(&c.name).unwrap_or(&c.name);
            if role == proto::ColumnRole::Sensitive
                || (identifiers_only && role != proto::ColumnRole::Identifier)
            {
                continue;
            }
            if identifiers_only && !header.iter().any(|h| h == input_name) {
                continue;
            }
            let input_index = header.iter().position(|h| h == input_name).ok_or_else(|| {
                if let Some(hint) = header_problem(header) {
                    return PrepareError::Plan(hint);
                }
                PrepareError::Plan(format!(
                    "the input has no column {input_name:?} for policy column {:?} (input columns: {}); map one with --map {}=INPUT_COLUMN",
                    c.name,
                    header.join(", "),
                    c.name
                ))
            })?;
            used.insert(input_index);
            let value_type =
                proto::ValueType::try_from(c.value_type).unwrap_or(proto::ValueType::Unspecified);
            let (kind, data_type) = match role {
                proto::ColumnRole::Identifier => {
                    let kind = agreement
                        .identity_kinds
                        .iter()
                        .find(|k| k.name == c.identity_kind)
                        .ok_or_else(|| {
                            PrepareError::Plan(format!(
                                "column {:?} uses identity kind {:?}, which the agreement does not declare",
                                c.name, c.identity_kind
                            ))
                        })?;
                    (
                        Kind::Identifier {
                            normaliser: Normaliser::new(&profile_of(kind)?).ok_or_else(|| {
                                PrepareError::Plan(format!(
                                    "identity kind {:?} names country {:?}, which this client does not support; upgrade cleanroom",
                                    kind.name, kind.default_country
                                ))
                            })?,
                            keying: match keys {
                                Keys::Shared(secret) => {
                                    Keying::Fingerprint(Fingerprinter::new(secret, &salt, &kind.name))
                                }
                                Keys::Blinding(key) => Keying::Blind {
                                    key: key.clone(),
                                    salt,
                                    kind: kind.name.clone(),
                                },
                            },
                        },
                        DataType::FixedSizeBinary(crate::upload::FINGERPRINT_LEN),
                    )
                }
                _ => match value_type {
                    proto::ValueType::String => (Kind::Text, DataType::Utf8),
                    proto::ValueType::Integer => (Kind::Integer, DataType::Int64),
                    proto::ValueType::Float => (Kind::Float, DataType::Float64),
                    proto::ValueType::Date => (Kind::Date, DataType::Date32),
                    proto::ValueType::Timestamp => (
                        Kind::Timestamp,
                        DataType::Timestamp(TimeUnit::Microsecond, None),
                    ),
                    proto::ValueType::Unspecified => {
                        return Err(PrepareError::Plan(format!(
                            "column {:?} has no value type; upgrade cleanroom",
                            c.name
                        )));
                    }
                },
            };
            fields.push(Field::new(&c.name, data_type, true));
            columns.push(PlanColumn {
                name: c.name.clone(),
                input_index,
                kind,
                identity: (role == proto::ColumnRole::Identifier).then(|| c.identity_kind.clone()),
            });
        }
        let dropped = header
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(_, h)| h.clone())
            .collect();
        Ok(Plan {
            dataset: dataset.to_string(),
            columns,
            schema: Arc::new(Schema::new(fields)),
            dropped,
        })
    }

    /// Input columns that stay on this machine.
    pub fn dropped(&self) -> &[String] {
        &self.dropped
    }

    /// Header positions of the input columns to read, in plan order.
    pub fn input_indices(&self) -> Vec<usize> {
        self.columns.iter().map(|c| c.input_index).collect()
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn dataset(&self) -> &str {
        &self.dataset
    }
}

/// Counts gathered while preparing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareStats {
    pub rows_read: u64,
    pub rows_sent: u64,
    /// Identifier values that could not be normalised, by column.
    pub invalid: BTreeMap<String, u64>,
    /// Rows dropped because no identifier column had a valid value.
    pub rows_without_identifier: u64,
    /// Rows whose first identifier fingerprint was already seen.
    pub duplicates: u64,
}

/// Turns chunks of the partner's file into upload batches.
#[derive(Debug)]
pub struct Preparer {
    plan: Plan,
    stats: PrepareStats,
    seen: seen::Seen,
}

impl Preparer {
    pub fn new(plan: Plan) -> Self {
        Preparer {
            plan,
            stats: PrepareStats::default(),
            seen: seen::Seen::default(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn stats(&self) -> &PrepareStats {
        &self.stats
    }

    /// Normalises, fingerprints and types one chunk; rows without any valid
    /// identifier are left out and counted.
    pub fn prepare(&mut self, chunk: &Chunk) -> Result<RecordBatch, PrepareError> {
        let (batch, counts) = self.plan.prepare_chunk(chunk)?;
        account(&self.plan, &mut self.stats, &mut self.seen, counts);
        Ok(batch)
    }

    /// Reads, prepares and hands over every chunk of `reader`, as
    /// [`Preparer::prepare`] would one by one: reading runs on a thread of
    /// its own, preparing and then `finish` (encoding, say) on `workers`
    /// threads that take the chunks in turn, and `take` on the calling
    /// thread in input order, with the reader's position in the file.
    /// Stops at the first error in input order, or when `take` says false;
    /// returns whether every chunk was taken.
    pub fn prepare_all<T: Send>(
        &mut self,
        mut reader: InputReader,
        workers: usize,
        finish: impl Fn(RecordBatch) -> Result<T, PrepareError> + Sync,
        mut take: impl FnMut(&PrepareStats, T, u64) -> Result<bool, PrepareError>,
    ) -> Result<bool, PrepareError> {
        let Preparer { plan, stats, seen } = self;
        let plan = &*plan;
        let indices = plan.input_indices();
        let file_bytes = reader.bytes_total();
        let mut failed = false;
        let chunks = std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = reader.next_chunk(crate::upload::ROWS_PER_MESSAGE, &indices);
            failed = next.is_err();
            next.map(|c| c.map(|c| (c, reader.bytes_read())))
                .transpose()
        });
        let mut outcome = Ok(true);
        in_turn(
            chunks,
            workers,
            |item| {
                let (chunk, position) = item?;
                let (batch, counts) = plan.prepare_chunk(&chunk)?;
                Ok((counts, finish(batch)?, position))
            },
            |item: Result<(Counts, T, u64), PrepareError>| {
                let step = item.and_then(|(counts, finished, position)| {
                    if stats.rows_read == 0 {
                        seen.expect(expected_values(counts.prefixes.len(), position, file_bytes));
                    }
                    account(plan, stats, seen, counts);
                    take(stats, finished, position)
                });
                match step {
                    Ok(true) => true,
                    Ok(false) => {
                        outcome = Ok(false);
                        false
                    }
                    Err(e) => {
                        outcome = Err(e);
                        false
                    }
                }
            },
        );
        outcome
    }
}

/// Most values the duplicate count's table is made for ahead of them
/// (a 256 MiB table); past that it grows as values come.
const MOST_EXPECTED: usize = 1 << 24;

/// The values a file of `file_bytes` will give, as many per byte as its
/// first `values` gave in `position` bytes, with 2% to spare; at most
/// [`MOST_EXPECTED`], so a file whose first rows are unlike the rest
/// cannot make the client reserve more than that.
fn expected_values(values: usize, position: u64, file_bytes: u64) -> usize {
    if position == 0 {
        return 0;
    }
    let total = file_bytes as f64 * (values as f64 / position as f64) * 1.02;
    total.min(MOST_EXPECTED as f64) as usize
}

/// Threads [`Preparer::prepare_all`] prepares on: one per core.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// What one prepared chunk adds to the upload's counts.
#[derive(Debug)]
struct Counts {
    rows_read: u64,
    rows_sent: u64,
    /// Invalid identifier values, by plan column.
    invalid: Vec<(usize, u64)>,
    rows_without_identifier: u64,
    /// The first 8 bytes of each row's first identifier fingerprint, where
    /// it has one: what duplicates are counted by.
    prefixes: Vec<u64>,
}

/// Adds one prepared chunk to the upload's counts, in input order.
fn account(plan: &Plan, stats: &mut PrepareStats, seen: &mut seen::Seen, counts: Counts) {
    stats.rows_read += counts.rows_read;
    for (ci, invalid) in counts.invalid {
        *stats
            .invalid
            .entry(plan.columns[ci].name.clone())
            .or_default() += invalid;
    }
    stats.rows_without_identifier += counts.rows_without_identifier;
    stats.duplicates += seen.insert_all(&counts.prefixes);
    stats.rows_sent += counts.rows_sent;
}

/// Runs `work` over `inputs` on `workers` threads and gives `take` the
/// results in input order, until `take` says false. The inputs are drawn on
/// a thread of their own and dealt to the workers in turn, so each worker
/// holds at most one input waiting and one result waiting.
fn in_turn<I: Send, O: Send>(
    inputs: impl Iterator<Item = I> + Send,
    workers: usize,
    work: impl Fn(I) -> O + Sync,
    mut take: impl FnMut(O) -> bool,
) {
    use std::sync::mpsc::sync_channel;
    let workers = workers.max(1);
    std::thread::scope(|scope| {
        let mut to_workers = Vec::with_capacity(workers);
        let mut from_workers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (input_tx, input_rx) = sync_channel::<I>(1);
            let (output_tx, output_rx) = sync_channel::<O>(1);
            let work = &work;
            scope.spawn(move || {
                for input in input_rx {
                    if output_tx.send(work(input)).is_err() {
                        break;
                    }
                }
            });
            to_workers.push(input_tx);
            from_workers.push(output_rx);
        }
        scope.spawn(move || {
            for (i, input) in inputs.enumerate() {
                if to_workers[i % workers].send(input).is_err() {
                    break;
                }
            }
        });
        // Ends when a worker has no more (the inputs ran out) or `take`
        // stops; dropping the receivers then stops the workers, and
        // through them the reader.
        for i in 0.. {
            let Ok(output) = from_workers[i % workers].recv() else {
                break;
            };
            if !take(output) {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests;
