//! The partner side of an upload: read the partner's own file, keep only the
//! columns the agreement names, normalise and fingerprint identifiers on
//! this machine, and turn rows into the Arrow batches the server expects.

mod blind;
mod erase;
mod input;
mod send;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Builder, FixedSizeBinaryBuilder, Float64Builder,
    Int64Builder, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::cast_utils::{self, Parser};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::identity::blinding::{BlindingKey, blind_values};
use crate::identity::{Fingerprinter, Invalid, Normaliser, Secret};
use crate::policy::Profile;
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
    match kind.profile.as_str() {
        "email" => Ok(Profile::Email {
            gmail_canonical: kind.gmail_canonical,
        }),
        "phone" => Ok(Profile::Phone {
            default_country: kind.default_country.clone(),
        }),
        "text" => Ok(Profile::Text),
        other => Err(PrepareError::Plan(format!(
            "identity kind {:?} uses profile {other:?}, which this client does not know; upgrade cleanroom",
            kind.name
        ))),
    }
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
    seen: HashSet<u64, crate::identity::PrefixHash>,
}

impl Preparer {
    pub fn new(plan: Plan) -> Self {
        Preparer {
            plan,
            stats: PrepareStats::default(),
            seen: HashSet::default(),
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
        let n = chunk.len();
        self.stats.rows_read += n as u64;
        // Fingerprinting is the costly part: identifier columns side by side.
        let mut fingerprinted: Vec<Option<(ArrayRef, u64)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .plan
                .columns
                .iter()
                .zip(&chunk.columns)
                .map(|(col, input)| match &col.kind {
                    Kind::Identifier { normaliser, keying } => {
                        Some(scope.spawn(move || fingerprint_column(input, normaliser, keying)))
                    }
                    _ => None,
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.map(|h| h.join().expect("a fingerprinting thread panicked")))
                .collect()
        });
        let mut has_identifier = vec![false; n];
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.plan.columns.len());
        let mut first_identifier: Option<usize> = None;
        for (ci, (col, input)) in self.plan.columns.iter().zip(&chunk.columns).enumerate() {
            let array: ArrayRef = match &col.kind {
                Kind::Identifier { .. } => {
                    first_identifier.get_or_insert(ci);
                    let (array, invalid) = fingerprinted[ci]
                        .take()
                        .expect("every identifier column was fingerprinted");
                    for (row, present) in has_identifier.iter_mut().enumerate() {
                        *present |= array.is_valid(row);
                    }
                    if invalid > 0 {
                        *self.stats.invalid.entry(col.name.clone()).or_default() += invalid;
                    }
                    array
                }
                Kind::Text => {
                    let mut b = StringBuilder::with_capacity(n, n * 8);
                    for v in input.iter() {
                        match v.map(str::trim).filter(|t| !t.is_empty()) {
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
                        if v.is_some_and(|t| !t.trim().is_empty()) && cell.is_none() {
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
        let batch = RecordBatch::try_new(Arc::clone(&self.plan.schema), arrays)
            .map_err(|e| PrepareError::Plan(format!("building a batch: {e}")))?;
        let kept = has_identifier.iter().filter(|k| **k).count();
        self.stats.rows_without_identifier += (n - kept) as u64;
        let batch = if kept == n {
            batch
        } else {
            filter_record_batch(&batch, &BooleanArray::from(has_identifier))
                .map_err(|e| PrepareError::Plan(format!("filtering a batch: {e}")))?
        };
        if let Some(ci) = first_identifier {
            let fps = batch
                .column(ci)
                .as_any()
                .downcast_ref::<arrow::array::FixedSizeBinaryArray>()
                .expect("identifier columns are fixed-size binary");
            for fp in fps.iter().flatten() {
                let prefix = u64::from_le_bytes(fp[..8].try_into().expect("32-byte fingerprint"));
                if !self.seen.insert(prefix) {
                    self.stats.duplicates += 1;
                }
            }
        }
        self.stats.rows_sent += batch.num_rows() as u64;
        Ok(batch)
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
    match cell.map(str::trim).filter(|t| !t.is_empty()) {
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
    let mut invalid = 0u64;
    let mut buf = String::with_capacity(64);
    let mut b = FixedSizeBinaryBuilder::with_capacity(input.len(), crate::upload::FINGERPRINT_LEN);
    let mut normalise = |v: Option<&str>, buf: &mut String| match v
        .map(|raw| normaliser.normalise_into(raw, buf))
    {
        Some(Ok(())) => true,
        Some(Err(Invalid::Empty)) | None => false,
        Some(Err(_)) => {
            invalid += 1;
            false
        }
    };
    match keying {
        Keying::Fingerprint(f) => {
            for v in input.iter() {
                if normalise(v, &mut buf) {
                    b.append_value(f.fingerprint(&buf))
                        .expect("fingerprints are 32 bytes");
                } else {
                    b.append_null();
                }
            }
        }
        Keying::Blind { key, salt, kind } => {
            // Points are computed in parallel batches, then put in place.
            let mut values: Vec<Option<String>> = Vec::with_capacity(input.len());
            for v in input.iter() {
                values.push(normalise(v, &mut buf).then(|| buf.clone()));
            }
            let present: Vec<&str> = values.iter().flatten().map(String::as_str).collect();
            let mut points = blind_values(key, salt, kind, &present).into_iter();
            for v in &values {
                match v.as_ref().and_then(|_| points.next()) {
                    Some(p) => b.append_value(p).expect("points are 32 bytes"),
                    None => b.append_null(),
                }
            }
        }
    }
    (Arc::new(b.finish()), invalid)
}
