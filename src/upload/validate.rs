//! Server-side validation of an upload, batch by batch. A rejection names
//! the column and the rule and counts the offending rows; it never carries a
//! value.

use std::collections::HashSet;
use std::fmt;

use arrow::array::{Array, AsArray, FixedSizeBinaryArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{
    DataType, Date32Type, Float64Type, Int64Type, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use arrow::record_batch::RecordBatch;

use super::upload_schema;
use crate::policy::{ColumnRole, Dataset, Domain};
use crate::psi::Seeded;

mod repeats;

use repeats::RepeatCounter;

/// Dimension values, hashed under a key drawn per upload: a sender cannot
/// craft values that collide, and a lookup costs a few multiplications
/// rather than a SipHash round per row.
type ValueSet = HashSet<String, Seeded>;

/// Most columns an upload's schema may have before it is refused unread.
const MAX_COLUMNS: usize = 256;
/// Longest column name an upload's schema may carry.
const MAX_COLUMN_NAME: usize = 128;

/// Size limits of one upload.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_rows: u64,
    /// Arrow IPC bytes received.
    pub max_bytes: u64,
    /// Rows one fingerprint may appear in, per identifier column. This
    /// caps every join: joined on an identifier, each row meets at most
    /// this many rows of the other side, so a join's output is at most
    /// this many times its larger input.
    pub max_rows_per_identifier: u32,
    /// Longest wait for the next message of an upload stream.
    pub idle_timeout: std::time::Duration,
    /// Longest an upload stream may run from its header to its commit.
    pub max_duration: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rows: 100_000_000,
            max_bytes: 16 << 30,
            max_rows_per_identifier: 1_000,
            idle_timeout: std::time::Duration::from_secs(60),
            max_duration: std::time::Duration::from_secs(6 * 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    /// The data breaks a rule: INVALID_ARGUMENT.
    Invalid,
    /// The upload is too large: RESOURCE_EXHAUSTED.
    TooLarge,
}

/// Why an upload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub rule: &'static str,
    pub column: Option<String>,
    pub detail: String,
    /// The first row (1-based, counted over the rows uploaded, in the
    /// order sent) that breaks the rule, when one row does.
    pub row: Option<u64>,
}

impl Rejection {
    /// The same rejection, naming the first uploaded row that breaks it.
    fn first_at(mut self, row: Option<u64>) -> Rejection {
        if let Some(row) = row {
            self.detail = format!("{}; the first is uploaded row {row}", self.detail);
            self.row = Some(row);
        }
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "column {c:?}: rule {}: {}", self.rule, self.detail),
            None => write!(f, "rule {}: {}", self.rule, self.detail),
        }
    }
}

fn invalid(rule: &'static str, column: &str, detail: String) -> Rejection {
    Rejection {
        kind: RejectionKind::Invalid,
        rule,
        column: Some(column.to_string()),
        detail,
        row: None,
    }
}

#[derive(Debug)]
enum Check {
    Identifier,
    Values(ValueSet),
    Cap { max: u32, seen: ValueSet },
    Metric { min: f64, max: f64 },
}

/// Checks an upload as it streams in.
#[derive(Debug)]
pub struct Validator {
    schema: SchemaRef,
    /// Columns the policy bars as sensitive.
    sensitive: Vec<String>,
    checks: Vec<(String, Check)>,
    limits: Limits,
    repeats: RepeatCounter,
    rows: u64,
    bytes: u64,
}

/// Every byte a printable ASCII character: a random 32-byte fingerprint
/// looks like this with probability (95/256)^32, about 2e-14.
fn looks_like_text(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| (0x20..0x7f).contains(b))
}

/// A value that looks like an email address or a phone number.
fn looks_like_identifier(v: &str) -> bool {
    let email = v
        .split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'));
    let digits = v.chars().filter(char::is_ascii_digit).count();
    let phone = digits >= 7
        && v.chars()
            .all(|c| c.is_ascii_digit() || " +-().".contains(c));
    email || phone
}

impl Validator {
    pub fn new(dataset: &Dataset, limits: Limits) -> Self {
        let checks = dataset
            .uploaded_columns()
            .map(|c| {
                let check = match c.role() {
                    ColumnRole::Identifier { .. } => Check::Identifier,
                    ColumnRole::Dimension { domain, .. } => match domain {
                        Domain::Values(values) => {
                            let mut set = ValueSet::with_hasher(Seeded::random());
                            set.extend(values.iter().cloned());
                            Check::Values(set)
                        }
                        Domain::MaxCardinality(max) => Check::Cap {
                            max: *max,
                            seen: ValueSet::with_hasher(Seeded::random()),
                        },
                    },
                    ColumnRole::Metric { min, max, .. } => Check::Metric {
                        min: *min,
                        max: *max,
                    },
                    ColumnRole::Sensitive => unreachable!("sensitive columns are not uploaded"),
                };
                (c.name().to_string(), check)
            })
            .collect();
        Validator {
            schema: upload_schema(dataset),
            sensitive: dataset
                .columns()
                .iter()
                .filter(|c| matches!(c.role(), ColumnRole::Sensitive))
                .map(|c| c.name().to_string())
                .collect(),
            checks,
            limits,
            repeats: RepeatCounter::new(),
            rows: 0,
            bytes: 0,
        }
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// A checked batch rebuilt from its values under the exact upload
    /// schema: the sender's schema and field metadata are dropped, and so
    /// is anything its buffers held beyond the values (bytes under null
    /// slots, padding, unused buffer space).
    pub fn restate(&self, batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
        let columns = batch
            .columns()
            .iter()
            .map(|c| rebuild(c.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(std::sync::Arc::clone(&self.schema), columns)
    }

    /// Checks one batch that arrived as `encoded_len` bytes of Arrow IPC.
    pub fn check(&mut self, batch: &RecordBatch, encoded_len: usize) -> Result<(), Rejection> {
        self.bytes += encoded_len as u64;
        if self.bytes > self.limits.max_bytes {
            return Err(Rejection {
                kind: RejectionKind::TooLarge,
                rule: "upload.max_bytes",
                column: None,
                detail: format!("the upload exceeds {} bytes", self.limits.max_bytes),
                row: None,
            });
        }
        self.check_schema(batch)?;
        self.rows += batch.num_rows() as u64;
        if self.rows > self.limits.max_rows {
            return Err(Rejection {
                kind: RejectionKind::TooLarge,
                rule: "upload.max_rows",
                column: None,
                detail: format!("the upload exceeds {} rows", self.limits.max_rows),
                row: None,
            });
        }
        // Uploaded row numbers, 1-based, of this batch's rows.
        let first_row = self.rows - batch.num_rows() as u64 + 1;
        let row_of = |found: Found| found.first.map(|r| first_row + r as u64);
        let mut no_identifier = vec![true; batch.num_rows()];
        for (i, (name, check)) in self.checks.iter_mut().enumerate() {
            let col = batch.column(i);
            match check {
                Check::Identifier => {
                    let fps: &FixedSizeBinaryArray = col.as_fixed_size_binary();
                    let mut plaintext = Found::default();
                    let cap = self.limits.max_rows_per_identifier;
                    for (row, v) in fps.iter().enumerate() {
                        if let Some(v) = v {
                            no_identifier[row] = false;
                            if looks_like_text(v) {
                                plaintext.add(row);
                            }
                        }
                    }
                    if u32::from(self.repeats.add_all(i, fps)) > cap {
                        return Err(invalid(
                            "identifier.repeats",
                            name,
                            format!(
                                "a fingerprint appears in more than {cap} rows (max_rows_per_identifier); joins on it would multiply rows"
                            ),
                        ));
                    }
                    if plaintext.count > 0 {
                        return Err(invalid(
                            "identifier.plaintext",
                            name,
                            format!(
                                "{} row(s) hold readable text, not a fingerprint; fingerprint identifiers with `cleanroom upload`",
                                plaintext.count
                            ),
                        )
                        .first_at(row_of(plaintext)));
                    }
                }
                Check::Values(allowed) => {
                    let bad = count_strings(col.as_ref(), |v| !allowed.contains(v));
                    if bad.count > 0 {
                        return Err(invalid(
                            "dimension.values",
                            name,
                            format!(
                                "{} row(s) hold a value outside the agreement's list",
                                bad.count
                            ),
                        )
                        .first_at(row_of(bad)));
                    }
                }
                Check::Cap { max, seen } => {
                    let plaintext = count_strings(col.as_ref(), looks_like_identifier);
                    if plaintext.count > 0 {
                        return Err(invalid(
                            "dimension.plaintext",
                            name,
                            format!(
                                "{} row(s) look like an email address or phone number",
                                plaintext.count
                            ),
                        )
                        .first_at(row_of(plaintext)));
                    }
                    for_each_string(col.as_ref(), |_, v| {
                        if seen.len() <= *max as usize && !seen.contains(v) {
                            seen.insert(v.to_string());
                        }
                    });
                    if seen.len() > *max as usize {
                        return Err(invalid(
                            "dimension.max_cardinality",
                            name,
                            format!("more than {max} distinct values"),
                        ));
                    }
                }
                Check::Metric { min, max } => {
                    let out = count_metric(col.as_ref(), *min, *max);
                    if out.count > 0 {
                        return Err(invalid(
                            "metric.bounds",
                            name,
                            format!("{} row(s) outside [{min}, {max}]", out.count),
                        )
                        .first_at(row_of(out)));
                    }
                }
            }
        }
        let orphans = Found::of(no_identifier.iter().copied());
        if orphans.count > 0 {
            return Err(Rejection {
                kind: RejectionKind::Invalid,
                rule: "upload.identifier_required",
                column: None,
                detail: format!("{} row(s) have no identifier at all", orphans.count),
                row: None,
            }
            .first_at(row_of(orphans)));
        }
        Ok(())
    }

    fn check_schema(&self, batch: &RecordBatch) -> Result<(), Rejection> {
        let got = batch.schema();
        let expected = &self.schema;
        // Before any name is repeated in a message: bounded names, and not
        // more columns than the policy could declare.
        if got.fields().len() > MAX_COLUMNS
            || got
                .fields()
                .iter()
                .any(|f| f.name().len() > MAX_COLUMN_NAME)
        {
            return Err(Rejection {
                kind: RejectionKind::Invalid,
                rule: "upload.schema",
                column: None,
                detail: format!(
                    "at most {MAX_COLUMNS} columns with names of at most {MAX_COLUMN_NAME} bytes; columns must be exactly [{}]",
                    self.schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                row: None,
            });
        }
        if let Some(barred) = got
            .fields()
            .iter()
            .find(|f| self.sensitive.iter().any(|s| s == f.name()))
        {
            return Err(invalid(
                "column.sensitive",
                barred.name(),
                "is a sensitive attribute the agreement bars; it is never uploaded".into(),
            ));
        }
        let names = |s: &arrow::datatypes::Schema| {
            s.fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if got.fields().len() != expected.fields().len()
            || got
                .fields()
                .iter()
                .zip(expected.fields())
                .any(|(g, e)| g.name() != e.name())
        {
            return Err(Rejection {
                kind: RejectionKind::Invalid,
                rule: "upload.schema",
                column: None,
                detail: format!(
                    "columns must be exactly [{}] in that order; got [{}]",
                    names(expected),
                    names(&got)
                ),
                row: None,
            });
        }
        for (g, e) in got.fields().iter().zip(expected.fields()) {
            if g.data_type() != e.data_type() {
                return Err(invalid(
                    "upload.schema",
                    e.name(),
                    format!(
                        "must be {}, got {}",
                        type_name(e.data_type()),
                        type_name(g.data_type())
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A column rebuilt from its values alone, in buffers of its own: zeros
/// under null slots (text: no bytes), nothing before the first value or
/// after the last. Copied a buffer at a time, not value by value.
fn rebuild(col: &dyn Array) -> Result<arrow::array::ArrayRef, arrow::error::ArrowError> {
    use arrow::array::{ArrowPrimitiveType, PrimitiveArray};
    use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
    use std::sync::Arc;
    // The validity, in a buffer of its own; None without nulls.
    let validity = col
        .nulls()
        .filter(|n| n.null_count() > 0)
        .map(|n| NullBuffer::new(BooleanBuffer::collect_bool(n.len(), |i| n.is_valid(i))));
    // The null slots, row by row.
    fn null_rows(validity: &Option<NullBuffer>) -> impl Iterator<Item = usize> + '_ {
        validity
            .iter()
            .flat_map(|n| (0..n.len()).filter(|i| n.is_null(*i)))
    }
    fn primitive<T: ArrowPrimitiveType>(
        a: &PrimitiveArray<T>,
        validity: Option<NullBuffer>,
    ) -> Arc<PrimitiveArray<T>> {
        let mut values = a.values().to_vec();
        for i in null_rows(&validity) {
            values[i] = T::Native::default();
        }
        Arc::new(PrimitiveArray::<T>::new(
            ScalarBuffer::from(values),
            validity,
        ))
    }
    Ok(match col.data_type() {
        DataType::Utf8 => {
            let s = col.as_string::<i32>();
            let offsets = s.value_offsets();
            let (first, last) = (offsets[0] as usize, offsets[s.len()] as usize);
            if validity.is_none() {
                // One copy of the values' bytes, offsets from zero.
                let ends: Vec<i32> = offsets.iter().map(|o| o - offsets[0]).collect();
                return Ok(Arc::new(StringArray::try_new(
                    OffsetBuffer::new(ScalarBuffer::from(ends)),
                    Buffer::from_vec(s.value_data()[first..last].to_vec()),
                    None,
                )?));
            }
            let mut ends = Vec::with_capacity(s.len() + 1);
            let mut data = Vec::with_capacity(last - first);
            ends.push(0i32);
            for i in 0..s.len() {
                if s.is_valid(i) {
                    let (from, to) = (offsets[i] as usize, offsets[i + 1] as usize);
                    data.extend_from_slice(&s.value_data()[from..to]);
                }
                ends.push(i32::try_from(data.len()).map_err(|_| {
                    arrow::error::ArrowError::InvalidArgumentError("text over 2 GiB".into())
                })?);
            }
            Arc::new(StringArray::try_new(
                OffsetBuffer::new(ScalarBuffer::from(ends)),
                Buffer::from_vec(data),
                validity,
            )?)
        }
        DataType::Int64 => primitive(col.as_primitive::<Int64Type>(), validity),
        DataType::Float64 => primitive(col.as_primitive::<Float64Type>(), validity),
        DataType::Date32 => primitive(col.as_primitive::<Date32Type>(), validity),
        DataType::Timestamp(TimeUnit::Microsecond, None) => {
            primitive(col.as_primitive::<TimestampMicrosecondType>(), validity)
        }
        DataType::FixedSizeBinary(width) => {
            let values = col.as_fixed_size_binary();
            let w = usize::try_from(*width).unwrap_or(0);
            let mut bytes = values.value_data()[..values.len() * w].to_vec();
            for i in null_rows(&validity) {
                bytes[i * w..(i + 1) * w].fill(0);
            }
            Arc::new(FixedSizeBinaryArray::try_new(
                *width,
                Buffer::from_vec(bytes),
                validity,
            )?)
        }
        other => {
            return Err(arrow::error::ArrowError::InvalidArgumentError(format!(
                "no column of type {other} is stored"
            )));
        }
    })
}

fn type_name(t: &DataType) -> String {
    match t {
        DataType::FixedSizeBinary(32) => "a 32-byte fingerprint".to_string(),
        DataType::Utf8 => "a string".to_string(),
        DataType::Int64 => "a 64-bit integer".to_string(),
        DataType::Float64 => "a 64-bit float".to_string(),
        DataType::Date32 => "a date (days)".to_string(),
        DataType::Timestamp(TimeUnit::Microsecond, None) => {
            "a timestamp (microseconds, no time zone)".to_string()
        }
        other => format!("{other}"),
    }
}

/// Dimension values as text, with their row in the batch: strings as they
/// are, integers in decimal.
fn for_each_string(col: &dyn Array, mut f: impl FnMut(usize, &str)) {
    if let Some(s) = col.as_any().downcast_ref::<StringArray>() {
        for (row, v) in s.iter().enumerate() {
            if let Some(v) = v {
                f(row, v);
            }
        }
    } else if let Some(ints) = col.as_any().downcast_ref::<Int64Array>() {
        let mut buf = String::new();
        for (row, v) in ints.iter().enumerate() {
            if let Some(v) = v {
                buf.clear();
                use std::fmt::Write;
                let _ = write!(buf, "{v}");
                f(row, &buf);
            }
        }
    }
}

/// Rows of a batch that break a check: how many, and the first.
#[derive(Debug, Default, Clone, Copy)]
struct Found {
    count: u64,
    first: Option<usize>,
}

impl Found {
    fn add(&mut self, row: usize) {
        self.count += 1;
        self.first.get_or_insert(row);
    }

    fn of(flags: impl Iterator<Item = bool>) -> Found {
        let mut found = Found::default();
        for (row, bad) in flags.enumerate() {
            if bad {
                found.add(row);
            }
        }
        found
    }
}

fn count_strings(col: &dyn Array, mut pred: impl FnMut(&str) -> bool) -> Found {
    let mut found = Found::default();
    for_each_string(col, |row, v| {
        if pred(v) {
            found.add(row);
        }
    });
    found
}

fn count_metric(col: &dyn Array, min: f64, max: f64) -> Found {
    let outside = |v: Option<f64>| v.is_some_and(|v| !(v >= min && v <= max));
    match col.data_type() {
        DataType::Float64 => {
            let a: &Float64Array = col.as_primitive::<Float64Type>();
            Found::of(a.iter().map(outside))
        }
        DataType::Int64 => {
            let a: &Int64Array = col.as_primitive::<Int64Type>();
            Found::of(a.iter().map(|v| outside(v.map(|v| v as f64))))
        }
        DataType::Date32 => {
            let a = col.as_primitive::<Date32Type>();
            Found::of(a.iter().map(|v| outside(v.map(f64::from))))
        }
        DataType::Timestamp(TimeUnit::Microsecond, None) => {
            let a = col.as_primitive::<TimestampMicrosecondType>();
            Found::of(a.iter().map(|v| outside(v.map(|v| v as f64))))
        }
        // The schema check admits no other metric type; count every value
        // as outside rather than pass one unchecked.
        _ => Found::of((0..col.len()).map(|row| col.is_valid(row))),
    }
}

#[cfg(test)]
mod tests;
