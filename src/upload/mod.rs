//! The upload contract shared by the partner's client and the server: the
//! Arrow schema a dataset is sent in, the IPC framing of batches, and the
//! server's validation of what arrives.

mod validate;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
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

/// The batches of one Arrow IPC stream.
pub fn decode_batches(bytes: &[u8]) -> Result<Vec<RecordBatch>, ArrowError> {
    StreamReader::try_new(bytes, None)?.collect()
}
