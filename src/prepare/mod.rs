//! The partner side of an upload: read the partner's own file, keep only the
//! columns the agreement names, normalise and fingerprint identifiers on
//! this machine, and turn rows into the Arrow batches the server expects.

mod blind;
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
    // A server before standards sends none: ours.
    let standard = match kind.standard.as_str() {
        "" => Standard::Cleanroom,
        s => Standard::parse(s).ok_or_else(|| upgrade(format!("follows the standard {s:?}")))?,
    };
    match kind.profile.as_str() {
        "email" => Ok(Profile::Email {
            gmail_canonical: kind.gmail_canonical,
            standard,
        }),
        "phone" if kind.phone_metadata != PHONE_METADATA => Err(PrepareError::Plan(format!(
            "identity kind {:?} reads phone numbers by libphonenumber metadata {:?} and this client has {PHONE_METADATA:?}: both parties must read numbers alike; use the cleanroom release the server runs",
            kind.name, kind.phone_metadata
        ))),
        "phone" => Ok(Profile::Phone {
            default_country: kind.default_country.clone(),
            standard,
        }),
        "text" => Ok(Profile::Text),
        other => Err(upgrade(format!("uses profile {other:?}"))),
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

impl Plan {
    /// Normalises, fingerprints and types one chunk, on its own; its batch
    /// and what it adds to the counts.
    fn prepare_chunk(&self, chunk: &Chunk) -> Result<(RecordBatch, Counts), PrepareError> {
        let n = chunk.len();
        let mut has_identifier = vec![false; n];
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
        let mut first_identifier: Option<usize> = None;
        let mut invalid_values = Vec::new();
        for (ci, (col, input)) in self.columns.iter().zip(&chunk.columns).enumerate() {
            let array: ArrayRef = match &col.kind {
                Kind::Identifier { normaliser, keying } => {
                    first_identifier.get_or_insert(ci);
                    let (array, invalid) = fingerprint_column(input, normaliser, keying);
                    for (row, present) in has_identifier.iter_mut().enumerate() {
                        *present |= array.is_valid(row);
                    }
                    if invalid > 0 {
                        invalid_values.push((ci, invalid));
                    }
                    array
                }
                Kind::Text => {
                    let mut b = StringBuilder::with_capacity(n, n * 8);
                    for v in input.iter() {
                        match v.map(crate::identity::trim).filter(|t| !t.is_empty()) {
                            Some(t) => b.append_value(t),
                            None => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                Kind::Integer => {
                    let mut b = Int64Builder::with_capacity(n);
                    for (row, v) in input.iter().enumerate() {
                        let cell = parse_cell::<i64>(v, "is not an integer", || {
                            (chunk.first_row + row as u64, col.name.clone())
                        })?;
                        b.append_option(cell);
                    }
                    Arc::new(b.finish())
                }
                Kind::Date => {
                    let mut b = Date32Builder::with_capacity(n);
                    for (row, v) in input.iter().enumerate() {
                        let cell =
                            parse_with(v, "is not a date (YYYY-MM-DD)", Date32Type::parse, || {
                                (chunk.first_row + row as u64, col.name.clone())
                            })?;
                        b.append_option(cell);
                    }
                    Arc::new(b.finish())
                }
                Kind::Timestamp => {
                    let mut b = TimestampMicrosecondBuilder::with_capacity(n);
                    let micros = |t: &str| {
                        cast_utils::string_to_timestamp_nanos(t)
                            .ok()
                            .map(|ns| ns.div_euclid(1_000))
                    };
                    for (row, v) in input.iter().enumerate() {
                        let cell = parse_with(
                            v,
                            "is not a timestamp (RFC 3339, or YYYY-MM-DD HH:MM:SS in UTC)",
                            micros,
                            || (chunk.first_row + row as u64, col.name.clone()),
                        )?;
                        b.append_option(cell);
                    }
                    Arc::new(b.finish())
                }
                Kind::Float => {
                    let mut b = Float64Builder::with_capacity(n);
                    for (row, v) in input.iter().enumerate() {
                        let cell = parse_cell::<f64>(v, "is not a finite number", || {
                            (chunk.first_row + row as u64, col.name.clone())
                        })?
                        .filter(|x| x.is_finite());
                        // A cell that held a number but not a finite one
                        // (trimmed again only then).
                        if cell.is_none() && v.is_some_and(|t| !crate::identity::trim(t).is_empty())
                        {
                            return Err(PrepareError::Value {
                                row: chunk.first_row + row as u64,
                                column: col.name.clone(),
                                rule: "is not a finite number",
                            });
                        }
                        b.append_option(cell);
                    }
                    Arc::new(b.finish())
                }
            };
            arrays.push(array);
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .map_err(|e| PrepareError::Plan(format!("building a batch: {e}")))?;
        let kept = has_identifier.iter().filter(|k| **k).count();
        let batch = if kept == n {
            batch
        } else {
            filter_record_batch(&batch, &BooleanArray::from(has_identifier))
                .map_err(|e| PrepareError::Plan(format!("filtering a batch: {e}")))?
        };
        let prefixes = first_identifier.map_or_else(Vec::new, |ci| {
            batch
                .column(ci)
                .as_any()
                .downcast_ref::<arrow::array::FixedSizeBinaryArray>()
                .expect("identifier columns are fixed-size binary")
                .iter()
                .flatten()
                .map(|fp| u64::from_le_bytes(fp[..8].try_into().expect("32-byte fingerprint")))
                .collect()
        });
        let counts = Counts {
            rows_read: n as u64,
            rows_sent: batch.num_rows() as u64,
            invalid: invalid_values,
            rows_without_identifier: (n - kept) as u64,
            prefixes,
        };
        Ok((batch, counts))
    }
}

/// A number cell: empty is missing; anything unparseable stops the upload
/// with its row and column (never its content).
fn parse_cell<T: std::str::FromStr>(
    cell: Option<&str>,
    rule: &'static str,
    place: impl Fn() -> (u64, String),
) -> Result<Option<T>, PrepareError> {
    parse_with(cell, rule, |t| t.parse().ok(), place)
}

/// A cell read by `parse`: empty is missing; anything unparseable stops
/// the upload with its row and column (never its content).
fn parse_with<T>(
    cell: Option<&str>,
    rule: &'static str,
    parse: impl Fn(&str) -> Option<T>,
    place: impl Fn() -> (u64, String),
) -> Result<Option<T>, PrepareError> {
    match cell.map(crate::identity::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => parse(t).map(Some).ok_or_else(|| {
            let (row, column) = place();
            PrepareError::Value { row, column, rule }
        }),
    }
}

/// Fingerprints (or blinds) one identifier column; invalid values become
/// nulls and are counted, empty ones are simply missing.
fn fingerprint_column(
    input: &StringArray,
    normaliser: &Normaliser,
    keying: &Keying,
) -> (ArrayRef, u64) {
    const LEN: usize = crate::upload::FINGERPRINT_LEN as usize;
    let mut invalid = 0u64;
    let mut buf = String::with_capacity(64);
    // Valid values normalised end to end (normalising may add a little, a
    // phone's country code), then keyed together.
    let mut text = String::with_capacity(input.value_data().len() + input.len() * 4);
    let mut ends = Vec::with_capacity(input.len());
    let mut valid = Vec::with_capacity(input.len());
    for v in input.iter() {
        let ok = match v.map(|raw| normaliser.normalise_into(raw, &mut buf)) {
            Some(Ok(())) => true,
            Some(Err(Invalid::Empty)) | None => false,
            Some(Err(_)) => {
                invalid += 1;
                false
            }
        };
        if ok {
            text.push_str(&buf);
            ends.push(text.len());
        }
        valid.push(ok);
    }
    let present = ends.iter().scan(0, |start, &end| {
        let value = &text[*start..end];
        *start = end;
        Some(value)
    });
    let mut keyed = Vec::with_capacity(ends.len() * LEN);
    match keying {
        Keying::Fingerprint(f) => f.fingerprint_all(present, &mut keyed),
        Keying::Blind { key, salt, kind } => {
            let present: Vec<&str> = present.collect();
            keyed.extend(
                blind_values(key, salt, kind, &present)
                    .into_iter()
                    .flatten(),
            );
        }
    }
    // Each row's 32 bytes in place; a missing value's are zero.
    let bytes = if ends.len() == input.len() {
        keyed
    } else {
        let mut bytes = vec![0u8; input.len() * LEN];
        let mut next = keyed.chunks_exact(LEN);
        for (slot, _) in bytes
            .chunks_exact_mut(LEN)
            .zip(&valid)
            .filter(|(_, ok)| **ok)
        {
            slot.copy_from_slice(next.next().expect("one keyed value per valid row"));
        }
        bytes
    };
    let nulls = arrow::buffer::NullBuffer::from(valid);
    let array = arrow::array::FixedSizeBinaryArray::try_new(
        crate::upload::FINGERPRINT_LEN,
        arrow::buffer::Buffer::from_vec(bytes),
        (nulls.null_count() > 0).then_some(nulls),
    )
    .expect("32 bytes per row");
    (Arc::new(array), invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{AgreementState, Profile};
    use arrow::array::AsArray;

    /// The demo agreement as acme's client sees it, a secret, and a demo
    /// customer file of `rows` rows (several chunks, with duplicates,
    /// invalid identifiers and rows without any).
    fn demo(rows: u64, dir: &std::path::Path) -> (proto::Agreement, Secret, PathBuf) {
        let policy = crate::policy::parse_policy(
            include_str!("../../policies/retail-media-demo.toml"),
            std::path::Path::new("retail-media-demo.toml"),
        )
        .unwrap();
        let agreement =
            crate::server::agreements::agreement_view(&policy, "acme", AgreementState::Active);
        crate::synth::generate(&crate::synth::SynthOptions {
            rows,
            overlap: 0.3,
            seed: 5,
            out: dir.to_path_buf(),
        })
        .unwrap();
        // The first 500 customers again at the end: duplicates in another
        // chunk than their first rows.
        let path = dir.join(crate::synth::ACME_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let again: String = text
            .lines()
            .skip(1)
            .take(500)
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, text + &again).unwrap();
        (agreement, Secret::generate(), path)
    }

    #[test]
    fn an_empty_or_otherwise_separated_file_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let (agreement, secret, _) = demo(10, dir.path());
        let plan = |header: &[&str]| {
            let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
            Plan::new(
                &agreement,
                "customers",
                Keys::Shared(&secret),
                &header,
                &BTreeMap::new(),
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
        };
        let semicolons = plan(&["email;phone;region;age_band;lifetime_value"]);
        assert!(semicolons.contains("--delimiter ';'"), "{semicolons}");
        assert!(!semicolons.contains("email"), "{semicolons}");
        let empty = plan(&[]);
        assert!(empty.contains("the input is empty"), "{empty}");
        let tabs = plan(&["email\tphone"]);
        assert!(tabs.contains("--delimiter"), "{tabs}");
        // A real header with a missing column still names the column.
        let missing = plan(&["email", "phone"]);
        assert!(missing.contains("--map"), "{missing}");
    }

    fn open(path: &std::path::Path) -> InputReader {
        InputReader::open(
            path,
            InputFormat::Csv,
            CsvOptions::default(),
            crate::upload::ROWS_PER_MESSAGE,
        )
        .unwrap()
    }

    fn plan(agreement: &proto::Agreement, secret: &Secret, reader: &InputReader) -> Plan {
        Plan::new(
            agreement,
            "customers",
            secret.into(),
            reader.header(),
            &BTreeMap::new(),
        )
        .unwrap()
    }

    /// Chunks prepared on 1 to 3 threads come out in input order with the
    /// same batches and counts as chunk by chunk, and each fingerprint is
    /// the one the single-value fingerprinter gives the normalised input.
    /// The duplicate table is made for the file's rows as its first chunk
    /// predicts, and never for more than MOST_EXPECTED values, however
    /// short the first rows are next to the file's size.
    #[test]
    fn the_expected_values_are_predicted_and_capped() {
        // 8,192 values in 800 KiB of a 1 GiB file.
        let n = expected_values(8_192, 800 << 10, 1 << 30);
        assert!((10_900_000..11_000_000).contains(&n), "{n}");
        assert_eq!(expected_values(8_192, 8_192, u64::MAX / 2), MOST_EXPECTED);
        assert_eq!(expected_values(8_192, 1, 1 << 40), MOST_EXPECTED);
        assert_eq!(expected_values(0, 0, 1 << 30), 0);
        assert_eq!(expected_values(0, 4_096, 1 << 30), 0);
    }

    #[test]
    fn preparing_on_several_threads_keeps_order_values_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (agreement, secret, path) = demo(30_000, dir.path());
        let mut reader = open(&path);
        let mut one_by_one = Preparer::new(plan(&agreement, &secret, &reader));
        let indices = one_by_one.plan().input_indices();
        let mut expected = Vec::new();
        let mut inputs = Vec::new();
        while let Some(chunk) = reader
            .next_chunk(crate::upload::ROWS_PER_MESSAGE, &indices)
            .unwrap()
        {
            expected.push(one_by_one.prepare(&chunk).unwrap());
            inputs.push(chunk);
        }
        assert!(expected.len() >= 4, "{} chunks", expected.len());
        let stats = one_by_one.stats().clone();
        assert!(stats.duplicates > 0 && stats.rows_without_identifier > 0);
        assert!(!stats.invalid.is_empty());

        // Each row's identifiers fingerprinted one value at a time from the
        // raw input; rows with neither are left out.
        let salt: [u8; 32] = hex::decode(&agreement.salt).unwrap().try_into().unwrap();
        let identifiers = [
            (
                "email",
                Profile::Email {
                    gmail_canonical: true,
                    standard: Standard::Cleanroom,
                },
            ),
            (
                "phone",
                Profile::Phone {
                    default_country: "US".into(),
                    standard: Standard::Cleanroom,
                },
            ),
        ]
        .map(|(kind, profile)| {
            let at = one_by_one
                .plan()
                .columns
                .iter()
                .position(|c| c.name == kind)
                .unwrap();
            let normaliser = Normaliser::new(&profile).unwrap();
            (at, normaliser, Fingerprinter::new(&secret, &salt, kind))
        });
        let mut buf = String::new();
        for (chunk, batch) in inputs.iter().zip(&expected) {
            let mut want: Vec<[Option<[u8; 32]>; 2]> = Vec::new();
            for i in 0..chunk.len() {
                let row = identifiers.each_ref().map(|(at, normaliser, f)| {
                    let raw = &chunk.columns[*at];
                    (raw.is_valid(i) && normaliser.normalise_into(raw.value(i), &mut buf).is_ok())
                        .then(|| f.fingerprint(&buf))
                });
                if row.iter().any(Option::is_some) {
                    want.push(row);
                }
            }
            let got: Vec<[Option<[u8; 32]>; 2]> = (0..batch.num_rows())
                .map(|r| {
                    identifiers.each_ref().map(|(at, _, _)| {
                        let column = batch.column(*at).as_fixed_size_binary();
                        column
                            .is_valid(r)
                            .then(|| column.value(r).try_into().unwrap())
                    })
                })
                .collect();
            assert_eq!(got, want);
        }

        for workers in 1..=3 {
            let mut preparer = Preparer::new(plan(&agreement, &secret, &open(&path)));
            let mut got = Vec::new();
            let complete = preparer
                .prepare_all(open(&path), workers, Ok, |_, batch, _| {
                    got.push(batch);
                    Ok(true)
                })
                .unwrap();
            assert!(complete);
            assert_eq!(got, expected, "{workers} workers");
            assert_eq!(preparer.stats(), &stats, "{workers} workers");
        }
    }

    /// A bad cell stops the preparation with the first bad row in input
    /// order, whichever thread reached it first; a taker that stops early
    /// ends it without a hang.
    #[test]
    fn the_first_bad_row_in_input_order_is_the_one_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (agreement, secret, path) = demo(30_000, dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
        let purchases = header.iter().position(|h| *h == "purchases").unwrap();
        // Data rows 20,000 and 9,000 (a later chunk first, then an earlier
        // one) get a purchases cell that is not a number.
        let broken: String = text
            .lines()
            .enumerate()
            .map(|(line, l)| {
                if line == 20_000 || line == 9_000 {
                    let mut cells: Vec<&str> = l.split(',').collect();
                    cells[purchases] = "lots";
                    cells.join(",") + "\n"
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let broken_path = dir.path().join("broken.csv");
        std::fs::write(&broken_path, broken).unwrap();
        for workers in 1..=3 {
            let mut preparer = Preparer::new(plan(&agreement, &secret, &open(&broken_path)));
            let mut taken = 0;
            let e = preparer
                .prepare_all(open(&broken_path), workers, Ok, |_, _, _| {
                    taken += 1;
                    Ok(true)
                })
                .unwrap_err();
            match e {
                PrepareError::Value { row, column, rule } => {
                    assert_eq!((row, column.as_str()), (9_000, "purchases"));
                    assert_eq!(rule, "is not an integer");
                }
                other => panic!("{other}"),
            }
            assert_eq!(taken, 1, "only the chunk before the bad one was taken");

            let mut preparer = Preparer::new(plan(&agreement, &secret, &open(&path)));
            let complete = preparer
                .prepare_all(open(&path), workers, Ok, |_, _, _| Ok(false))
                .unwrap();
            assert!(!complete);
            assert_eq!(
                preparer.stats().rows_read,
                crate::upload::ROWS_PER_MESSAGE as u64
            );
        }
    }
}
