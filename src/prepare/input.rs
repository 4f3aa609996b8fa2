//! Reading the partner's own file, CSV or Parquet, in chunks of rows, as
//! text columns. Errors name the file and line, never a value.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray, StringBuilder};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::PrepareError;

/// The input file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    Csv,
    Parquet,
}

impl InputFormat {
    /// Parquet for `.parquet`/`.pq`, CSV otherwise.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet" | "pq") => InputFormat::Parquet,
            _ => InputFormat::Csv,
        }
    }
}

/// CSV dialect.
#[derive(Debug, Clone, Copy)]
pub struct CsvOptions {
    pub delimiter: u8,
    pub quote: u8,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: b',',
            quote: b'"',
        }
    }
}

/// Some rows of the chosen input columns, as text.
#[derive(Debug)]
pub struct Chunk {
    pub columns: Vec<StringArray>,
    /// 1-based number of the chunk's first data row.
    pub first_row: u64,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, Array::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum Source {
    Csv {
        reader: csv::Reader<File>,
        record: csv::ByteRecord,
    },
    Parquet {
        reader: ParquetRecordBatchReader,
        pending: Option<arrow::record_batch::RecordBatch>,
    },
}

/// A streaming reader over the input file.
pub struct InputReader {
    path: PathBuf,
    header: Vec<String>,
    source: Source,
    rows: u64,
    bytes_total: u64,
}

impl std::fmt::Debug for InputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputReader")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl InputReader {
    pub fn open(
        path: &Path,
        format: InputFormat,
        csv_options: CsvOptions,
        batch_rows: usize,
    ) -> Result<Self, PrepareError> {
        let io = |e: std::io::Error| PrepareError::Input {
            file: path.to_path_buf(),
            detail: e.to_string(),
        };
        let file = File::open(path).map_err(io)?;
        let bytes_total = file.metadata().map_err(io)?.len();
        let (header, source) = match format {
            InputFormat::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .delimiter(csv_options.delimiter)
                    .quote(csv_options.quote)
                    .has_headers(true)
                    .from_reader(file);
                let header = reader
                    .byte_headers()
                    .map_err(|e| csv_error(path, &e))?
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).trim().to_string())
                    .collect();
                (
                    header,
                    Source::Csv {
                        reader,
                        record: csv::ByteRecord::new(),
                    },
                )
            }
            InputFormat::Parquet => {
                let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
                    PrepareError::Input {
                        file: path.to_path_buf(),
                        detail: format!("not a readable Parquet file ({e})"),
                    }
                })?;
                let header = builder
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                let reader = builder.with_batch_size(batch_rows).build().map_err(|e| {
                    PrepareError::Input {
                        file: path.to_path_buf(),
                        detail: format!("not a readable Parquet file ({e})"),
                    }
                })?;
                (
                    header,
                    Source::Parquet {
                        reader,
                        pending: None,
                    },
                )
            }
        };
        Ok(InputReader {
            path: path.to_path_buf(),
            header,
            source,
            rows: 0,
            bytes_total,
        })
    }

    /// Column names in file order.
    pub fn header(&self) -> &[String] {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the input file.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    /// Bytes read so far (CSV), or an estimate from rows (Parquet is read by row group).
    pub fn bytes_read(&self) -> u64 {
        match &self.source {
            Source::Csv { reader, .. } => reader.position().byte(),
            Source::Parquet { .. } => 0,
        }
    }

    /// Up to `max_rows` rows of the columns at `indices` (header positions).
    pub fn next_chunk(
        &mut self,
        max_rows: usize,
        indices: &[usize],
    ) -> Result<Option<Chunk>, PrepareError> {
        let first_row = self.rows + 1;
        let columns = match &mut self.source {
            Source::Csv { reader, record } => {
                let mut builders: Vec<StringBuilder> = indices
                    .iter()
                    .map(|_| StringBuilder::with_capacity(max_rows, max_rows * 24))
                    .collect();
                let mut n = 0;
                while n < max_rows {
                    match reader.read_byte_record(record) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => return Err(csv_error(&self.path, &e)),
                    }
                    for (b, &i) in builders.iter_mut().zip(indices) {
                        let field = record.get(i).unwrap_or_default();
                        let text = std::str::from_utf8(field).map_err(|_| PrepareError::Input {
                            file: self.path.clone(),
                            detail: format!(
                                "line {}: column {:?} is not valid UTF-8",
                                record.position().map_or(0, |p| p.line()),
                                self.header.get(i).map(String::as_str).unwrap_or("?")
                            ),
                        })?;
                        if text.is_empty() {
                            b.append_null();
                        } else {
                            b.append_value(text);
                        }
                    }
                    n += 1;
                }
                if n == 0 {
                    return Ok(None);
                }
                builders.iter_mut().map(|b| b.finish()).collect()
            }
            Source::Parquet { reader, pending } => {
                let batch = match pending.take() {
                    Some(b) => b,
                    None => match reader.next() {
                        None => return Ok(None),
                        Some(Ok(b)) => b,
                        Some(Err(e)) => {
                            return Err(PrepareError::Input {
                                file: self.path.clone(),
                                detail: format!(
                                    "unreadable Parquet data near row {first_row} ({e})"
                                ),
                            });
                        }
                    },
                };
                let batch = if batch.num_rows() > max_rows {
                    *pending = Some(batch.slice(max_rows, batch.num_rows() - max_rows));
                    batch.slice(0, max_rows)
                } else {
                    batch
                };
                let mut out = Vec::with_capacity(indices.len());
                for &i in indices {
                    let col: ArrayRef = Arc::clone(batch.column(i));
                    let text = if col.data_type() == &DataType::Utf8 {
                        col
                    } else {
                        cast(&col, &DataType::Utf8).map_err(|_| PrepareError::Input {
                            file: self.path.clone(),
                            detail: format!(
                                "column {:?} of type {} cannot be read as text",
                                self.header[i],
                                col.data_type()
                            ),
                        })?
                    };
                    out.push(text.as_string::<i32>().clone());
                }
                out
            }
        };
        let chunk = Chunk { columns, first_row };
        self.rows += chunk.len() as u64;
        Ok(Some(chunk))
    }
}

/// A CSV error with its line, without the offending content.
fn csv_error(path: &Path, e: &csv::Error) -> PrepareError {
    let detail = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => format!(
            "line {}: malformed CSV: {len} fields where the header has {expected_len}",
            pos.as_ref().map_or(0, |p| p.line())
        ),
        csv::ErrorKind::Io(io) => format!("read error: {io}"),
        _ => format!(
            "line {}: malformed CSV",
            e.position().map_or(0, |p| p.line())
        ),
    };
    PrepareError::Input {
        file: path.to_path_buf(),
        detail,
    }
}
