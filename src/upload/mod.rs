//! The upload contract shared by the partner's client and the server: the
//! Arrow schema a dataset is sent in, the IPC framing of batches, and the
//! server's validation of what arrives.

mod validate;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;

use crate::policy::{ColumnRole, Dataset, ValueType};

pub use validate::{Limits, Rejection, RejectionKind, Validator};

/// Width of a fingerprint: BLAKE3's 32 bytes.
pub const FINGERPRINT_LEN: i32 = 32;

/// Rows per upload message: keeps every message near 1 MiB, far below
/// gRPC's default 4 MiB limit, for the widest demo dataset.
pub const ROWS_PER_MESSAGE: usize = 8_192;

/// The Arrow type of one dataset column on the wire and at rest.
pub fn column_type(role: &ColumnRole) -> Option<DataType> {
    match role {
        ColumnRole::Identifier { .. } => Some(DataType::FixedSizeBinary(FINGERPRINT_LEN)),
        ColumnRole::Dimension { value_type, .. } | ColumnRole::Metric { value_type, .. } => {
            Some(match value_type {
                ValueType::String => DataType::Utf8,
                ValueType::Integer => DataType::Int64,
                ValueType::Float => DataType::Float64,
                ValueType::Date => DataType::Date32,
                ValueType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            })
        }
        ColumnRole::Sensitive => None,
    }
}

/// The exact schema a dataset is uploaded in: its declared columns in policy
/// order, sensitive ones left out, every column nullable.
pub fn upload_schema(dataset: &Dataset) -> SchemaRef {
    let fields: Vec<Field> = dataset
        .columns()
        .iter()
        .filter_map(|c| column_type(c.role()).map(|t| Field::new(c.name(), t, true)))
        .collect();
    Arc::new(Schema::new(fields))
}

/// One batch as a self-contained Arrow IPC stream.
pub fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    {
        let mut writer = StreamWriter::try_new(&mut out, batch.schema_ref())?;
        writer.write(batch)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Largest upload message the client sends; gRPC's default limit is 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 2 << 20;

/// One batch as IPC messages of at most `max_bytes` each (a single row is
/// never split), halving the batch until every piece fits.
pub fn encode_messages(batch: &RecordBatch, max_bytes: usize) -> Result<Vec<Vec<u8>>, ArrowError> {
    let ipc = encode_batch(batch)?;
    if ipc.len() <= max_bytes || batch.num_rows() <= 1 {
        return Ok(vec![ipc]);
    }
    let half = batch.num_rows() / 2;
    let mut out = encode_messages(&batch.slice(0, half), max_bytes)?;
    out.extend(encode_messages(
        &batch.slice(half, batch.num_rows() - half),
        max_bytes,
    )?);
    Ok(out)
}

/// The batches of one Arrow IPC stream. The bytes come from a caller:
/// Arrow's reader asserts on some malformed lengths instead of returning an
/// error, so a panic while decoding is caught and reported as an error.
pub fn decode_batches(bytes: &[u8]) -> Result<Vec<RecordBatch>, ArrowError> {
    check_framing(bytes)?;
    std::panic::catch_unwind(|| StreamReader::try_new(bytes, None)?.collect()).unwrap_or_else(
        |_| {
            Err(ArrowError::ParseError(
                "malformed Arrow IPC stream".to_string(),
            ))
        },
    )
}

/// Walks the messages of an IPC stream and checks that every declared
/// length (metadata and body) lies within `bytes`, before Arrow's reader
/// allocates buffers of those lengths: a few mutated bytes could otherwise
/// make it allocate gigabytes for a kilobyte message.
fn check_framing(bytes: &[u8]) -> Result<(), ArrowError> {
    let bad = |what: &str| ArrowError::ParseError(format!("malformed Arrow IPC stream: {what}"));
    let word = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut pos = 0usize;
    let mut layouts: Option<Vec<Layout>> = None;
    while pos < bytes.len() {
        let mut len = word(pos).ok_or_else(|| bad("truncated length"))?;
        pos += 4;
        if len == 0xFFFF_FFFF {
            len = word(pos).ok_or_else(|| bad("truncated length"))?;
            pos += 4;
        }
        if len == 0 {
            return Ok(());
        }
        let len = len as usize;
        let meta = bytes
            .get(pos..pos.saturating_add(len))
            .ok_or_else(|| bad("metadata past the end"))?;
        let message = arrow::ipc::root_as_message(meta).map_err(|_| bad("metadata"))?;
        let body = usize::try_from(message.bodyLength()).map_err(|_| bad("body length"))?;
        if let Some(schema) = message.header_as_schema() {
            if layouts.is_some() {
                return Err(bad("a second schema"));
            }
            layouts = Some(check_schema_message(schema).map_err(&bad)?);
        } else if message.header_as_record_batch().is_none() {
            return Err(bad("a message that is neither a schema nor a record batch"));
        }
        if let Some(batch) = message.header_as_record_batch() {
            let layouts = layouts
                .as_deref()
                .ok_or_else(|| bad("a batch before its schema"))?;
            check_batch_sizes(batch, layouts).map_err(&bad)?;
            let fits = |offset: i64, length: i64| {
                usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(length).ok())
                    .and_then(|(o, l)| o.checked_add(l))
                    .is_some_and(|end| end <= body)
            };
            if batch.length() < 0
                || batch
                    .buffers()
                    .is_some_and(|b| b.iter().any(|b| !fits(b.offset(), b.length())))
                || batch
                    .nodes()
                    .is_some_and(|n| n.iter().any(|n| n.length() < 0 || n.null_count() < 0))
            {
                return Err(bad("a buffer or array length"));
            }
        }
        pos = pos
            .checked_add(len)
            .and_then(|p| p.checked_add(body))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| bad("body past the end"))?;
    }
    Ok(())
}

/// How one flat column is laid out in a record batch's buffers.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Validity, then values of this many bytes each.
    Fixed(usize),
    /// Validity, 32-bit offsets, then the bytes of the strings.
    Utf8,
}

/// Upload schemas hold flat columns of the types datasets are made of; anything else is refused before Arrow converts the schema (its
/// converter panics on some malformed ones).
fn check_schema_message(schema: arrow::ipc::Schema<'_>) -> Result<Vec<Layout>, &'static str> {
    use arrow::ipc::{Precision, Type};
    let fields = schema.fields().ok_or("a schema without fields")?;
    let mut layouts = Vec::with_capacity(fields.len());
    for field in fields {
        if field.children().is_some_and(|c| !c.is_empty()) || field.dictionary().is_some() {
            return Err("a column type no dataset has");
        }
        let width = match field.type_type() {
            Type::Utf8 if field.type_as_utf_8().is_some() => None,
            Type::Int => field
                .type_as_int()
                .filter(|t| matches!(t.bitWidth(), 8 | 16 | 32 | 64))
                .map(|t| t.bitWidth() as usize / 8),
            Type::FloatingPoint => {
                field
                    .type_as_floating_point()
                    .and_then(|t| match t.precision() {
                        Precision::HALF => Some(2),
                        Precision::SINGLE => Some(4),
                        Precision::DOUBLE => Some(8),
                        _ => None,
                    })
            }
            Type::FixedSizeBinary => field
                .type_as_fixed_size_binary()
                .map(|t| t.byteWidth().max(0) as usize),
            Type::Date => field
                .type_as_date()
                .filter(|t| t.unit() == arrow::ipc::DateUnit::DAY)
                .map(|_| 4),
            Type::Timestamp => field.type_as_timestamp().map(|_| 8),
            _ => return Err("a column type no dataset has"),
        };
        layouts.push(match (field.type_type(), width) {
            (Type::Utf8, _) => Layout::Utf8,
            (_, Some(w)) if (1..=64).contains(&w) => Layout::Fixed(w),
            _ => return Err("a column type no dataset has"),
        });
    }
    Ok(layouts)
}

/// Every column's buffers are large enough for the rows the batch declares:
/// Arrow builds arrays from them before it validates, and asserts on some
/// that are too short.
fn check_batch_sizes(
    batch: arrow::ipc::RecordBatch<'_>,
    layouts: &[Layout],
) -> Result<(), &'static str> {
    if batch.compression().is_some() {
        return Err("compressed batches are not accepted");
    }
    let rows = usize::try_from(batch.length()).map_err(|_| "a negative row count")?;
    let nodes = batch.nodes().ok_or("a batch without columns")?;
    let buffers = batch.buffers().ok_or("a batch without buffers")?;
    let expected: usize = layouts
        .iter()
        .map(|l| match l {
            Layout::Fixed(_) => 2,
            Layout::Utf8 => 3,
        })
        .sum();
    if nodes.len() != layouts.len() || buffers.len() != expected {
        return Err("columns that do not match the schema");
    }
    // The format aligns every buffer to 8 bytes; Arrow asserts on typed
    // views of misaligned or ragged ones.
    if buffers.iter().any(|b| b.offset() % 8 != 0) {
        return Err("a buffer off the 8-byte alignment");
    }
    let mut b = 0;
    for (node, layout) in nodes.iter().zip(layouts) {
        let buffer = |i: usize| usize::try_from(buffers.get(i).length()).unwrap_or(0);
        if usize::try_from(node.length()).ok() != Some(rows) || node.null_count() < 0 {
            return Err("a column whose length is not the batch's");
        }
        let validity = buffer(b);
        if (node.null_count() > 0 || validity > 0) && validity < rows.div_ceil(8) {
            return Err("a validity buffer too short for its rows");
        }
        let values = buffer(b + 1);
        let enough = match layout {
            Layout::Fixed(width) => {
                values % width == 0 && rows.checked_mul(*width).is_some_and(|n| values >= n)
            }
            Layout::Utf8 => {
                values % 4 == 0
                    && (rows == 0 || (rows + 1).checked_mul(4).is_some_and(|n| values >= n))
            }
        };
        if !enough {
            return Err("a value buffer too short for its rows");
        }
        b += match layout {
            Layout::Fixed(_) => 2,
            Layout::Utf8 => 3,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    #[test]
    fn large_batches_are_split_to_fit_a_message() {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
        let values: Vec<String> = (0..10_000).map(|i| format!("{i:0>200}")).collect();
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(values))]).unwrap();
        let messages = encode_messages(&batch, 256 << 10).unwrap();
        assert!(messages.len() >= 8);
        assert!(messages.iter().all(|m| m.len() <= 256 << 10));
        let rows: usize = messages
            .iter()
            .map(|m| {
                decode_batches(m)
                    .unwrap()
                    .iter()
                    .map(RecordBatch::num_rows)
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(rows, 10_000);
    }
}
