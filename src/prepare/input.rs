//! Reading the partner's own file, CSV or Parquet, in chunks of rows, as
//! text columns. Errors name the file and line, never a value.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryBuilder, StringArray};
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
        /// Bytes of text each column held in the last chunk: room enough
        /// for the next one without growing (and copying) as it fills.
        text_bytes: Vec<usize>,
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
                // Reads of 256 KiB: the default 8 KiB made a system call per
                // 80 rows.
                let mut reader = csv::ReaderBuilder::new()
                    .buffer_capacity(256 << 10)
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
                        text_bytes: Vec::new(),
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
            Source::Csv {
                reader,
                record,
                text_bytes,
            } => {
                // Fields go in as bytes and each column is checked as UTF-8
                // once, whole; only a column that fails is looked at row by
                // row, for the line to name.
                text_bytes.resize(indices.len(), max_rows * 24);
                let mut builders: Vec<BinaryBuilder> = text_bytes
                    .iter()
                    .map(|&bytes| BinaryBuilder::with_capacity(max_rows, bytes + bytes / 8))
                    .collect();
                let mut lines = Vec::with_capacity(max_rows);
                while lines.len() < max_rows {
                    match reader.read_byte_record(record) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => return Err(csv_error(&self.path, &e)),
                    }
                    lines.push(record.position().map_or(0, |p| p.line()));
                    for (b, &i) in builders.iter_mut().zip(indices) {
                        match record.get(i).unwrap_or_default() {
                            b"" => b.append_null(),
                            field => b.append_value(field),
                        }
                    }
                }
                if lines.is_empty() {
                    return Ok(None);
                }
                let mut columns = Vec::with_capacity(indices.len());
                for (b, &i) in builders.iter_mut().zip(indices) {
                    let bytes = b.finish();
                    let text = StringArray::try_from_binary(bytes.clone()).map_err(|_| {
                        let row = (0..bytes.len())
                            .find(|&r| {
                                bytes.is_valid(r) && std::str::from_utf8(bytes.value(r)).is_err()
                            })
                            .unwrap_or(0);
                        PrepareError::Input {
                            file: self.path.clone(),
                            detail: format!(
                                "line {}: column {:?} is not valid UTF-8",
                                lines[row],
                                self.header.get(i).map(String::as_str).unwrap_or("?")
                            ),
                        }
                    })?;
                    columns.push(text);
                }
                for (bytes, column) in text_bytes.iter_mut().zip(&columns) {
                    *bytes = column.value_data().len();
                }
                columns
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8], max_rows: usize) -> Result<Vec<Chunk>, PrepareError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.csv");
        std::fs::write(&path, bytes).unwrap();
        let mut reader =
            InputReader::open(&path, InputFormat::Csv, CsvOptions::default(), max_rows).unwrap();
        let mut chunks = Vec::new();
        while let Some(chunk) = reader.next_chunk(max_rows, &[0, 2])? {
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    /// Text, empty cells and a quoted field over two lines read back as
    /// they were, chunk by chunk.
    #[test]
    fn cells_read_back_as_text() {
        let input = "a,b,c\nx1,skip,\"y\n1\"\n,skip,é\nx3,skip,y3\n";
        let chunks = read_all(input.as_bytes(), 2).unwrap();
        assert_eq!(chunks.len(), 2);
        let cells: Vec<Vec<Option<&str>>> = chunks
            .iter()
            .flat_map(|c| {
                (0..c.len()).map(move |r| {
                    c.columns
                        .iter()
                        .map(|col| col.is_valid(r).then(|| col.value(r)))
                        .collect()
                })
            })
            .collect();
        assert_eq!(
            cells,
            vec![
                vec![Some("x1"), Some("y\n1")],
                vec![None, Some("é")],
                vec![Some("x3"), Some("y3")],
            ]
        );
        assert_eq!(chunks[1].first_row, 3);
    }

    /// A cell that is not UTF-8 is refused with its line (not its row: a
    /// quoted field spans two lines before it) and column, never its bytes;
    /// so is a character split over two cells of a column, which whole
    /// would read as valid.
    #[test]
    fn a_cell_that_is_not_utf8_is_named_by_line_and_column() {
        let mut input = b"a,b,c\nx1,skip,\"y\n1\"\nx2,skip,y2\nx3,skip,ok\n".to_vec();
        input.extend_from_slice(b"x4,skip,bad\xff\n");
        let detail = |e: PrepareError| match e {
            PrepareError::Input { detail, .. } => detail,
            other => panic!("{other}"),
        };
        let e = detail(read_all(&input, 2).unwrap_err());
        assert_eq!(e, "line 6: column \"c\" is not valid UTF-8");

        // "é" is C3 A9: its first byte ends one cell, its second starts the
        // next cell of the same column.
        let mut input = b"a,b,c\nx1,skip,one\n".to_vec();
        input.extend_from_slice(b"x2,skip,two\xc3\n");
        input.extend_from_slice(b"x3,skip,\xa9three\n");
        let e = detail(read_all(&input, 8).unwrap_err());
        assert_eq!(e, "line 3: column \"c\" is not valid UTF-8");
    }
}
