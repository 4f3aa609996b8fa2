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
use super::lines::Stop;
use std::fmt::Display;

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
        /// Quote-free lines read directly, until the first block that is
        /// not; then None, and `reader` reads on.
        lines: Option<super::lines::Lines>,
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
                let header: Vec<String> = reader
                    .byte_headers()
                    .map_err(|e| csv_error(path, &e))?
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).trim().to_string())
                    .collect();
                let at = reader.position();
                // A dialect whose delimiter or quote is a line end byte is
                // left to the csv crate.
                let plain = |b: u8| b != b'\n' && b != b'\r';
                let lines = (plain(csv_options.delimiter) && plain(csv_options.quote))
                    .then(|| File::open(path).map_err(io))
                    .transpose()?
                    .map(|file| {
                        super::lines::Lines::new(
                            file,
                            [at.byte(), at.line(), at.record()],
                            header.len(),
                            csv_options.delimiter,
                            csv_options.quote,
                        )
                    });
                (
                    header,
                    Source::Csv {
                        reader,
                        lines,
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
            Source::Csv {
                lines: Some(lines), ..
            } => lines.bytes_read(),
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
                lines: fast,
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
                // Each row's line, and where the csv crate placed it (see
                // exact_line), or EXACT.
                let mut lines: Vec<(u64, u64)> = Vec::with_capacity(max_rows);
                while let Some(direct) = fast.as_mut() {
                    let wanted = max_rows - lines.len();
                    let stop = direct
                        .rows(wanted, |line, ends, number| {
                            lines.push((number, EXACT));
                            for (b, &i) in builders.iter_mut().zip(indices) {
                                let from = if i == 0 { 0 } else { ends[i - 1] + 1 };
                                match &line[from..ends[i]] {
                                    b"" => b.append_null(),
                                    field => b.append_value(field),
                                }
                            }
                        })
                        .map_err(|e| PrepareError::Input {
                            file: self.path.clone(),
                            detail: format!("read error: {e}"),
                        })?;
                    match stop {
                        Ok(Stop::Full | Stop::End) => break,
                        Ok(Stop::Quoted) => {
                            reader
                                .seek(direct.position())
                                .map_err(|e| csv_error(&self.path, &e))?;
                            *fast = None;
                        }
                        Err(u) => {
                            return Err(unequal(&self.path, u.line, u.fields, self.header.len()));
                        }
                    }
                }
                while fast.is_none() && lines.len() < max_rows {
                    match reader.read_byte_record(record) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => return Err(csv_error(&self.path, &e)),
                    }
                    lines.push(
                        record
                            .position()
                            .map_or((0, EXACT), |p| (p.line(), p.byte())),
                    );
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
                                exact_line(&self.path, lines[row]),
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

/// Marks a row's line as exact (read directly, not placed by the csv crate).
const EXACT: u64 = u64::MAX;

/// The line a record starts on, from its (line, byte) as the csv crate
/// placed it. The csv crate places a record where the one before it ended:
/// before the line feed of a CRLF line end and before any empty lines,
/// counted only once it is past them. The record's own line is that line
/// plus the line feeds before its first byte.
fn exact_line(path: &Path, (line, byte): (u64, u64)) -> u64 {
    use std::os::unix::fs::FileExt;
    if byte == EXACT {
        return line;
    }
    let Ok(file) = File::open(path) else {
        return line;
    };
    let (mut line, mut offset) = (line, byte);
    let mut buf = [0u8; 4096];
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) | Err(_) => return line,
            Ok(n) => n,
        };
        for b in &buf[..n] {
            match b {
                b'\n' => line += 1,
                b'\r' => {}
                _ => return line,
            }
        }
        offset += n as u64;
    }
}

/// A row whose field count is not the header's.
fn unequal(path: &Path, line: u64, len: impl Display, expected: impl Display) -> PrepareError {
    PrepareError::Input {
        file: path.to_path_buf(),
        detail: format!("line {line}: malformed CSV: {len} fields where the header has {expected}"),
    }
}

/// A CSV error with its line, without the offending content.
fn csv_error(path: &Path, e: &csv::Error) -> PrepareError {
    let detail = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => {
            let line = pos
                .as_ref()
                .map_or(0, |p| exact_line(path, (p.line(), p.byte())));
            return unequal(path, line, len, expected_len);
        }
        csv::ErrorKind::Io(io) => format!("read error: {io}"),
        _ => format!(
            "line {}: malformed CSV",
            e.position()
                .map_or(0, |p| exact_line(path, (p.line(), p.byte())))
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

    /// Every chunk's cells and first row, or the error's text, reading
    /// columns `indices`; with `direct` false only the csv crate reads.
    fn outcome(path: &Path, max_rows: usize, indices: &[usize], direct: bool) -> String {
        outcome_in(path, CsvOptions::default(), max_rows, indices, direct)
    }

    fn outcome_in(
        path: &Path,
        options: CsvOptions,
        max_rows: usize,
        indices: &[usize],
        direct: bool,
    ) -> String {
        let mut reader = InputReader::open(path, InputFormat::Csv, options, max_rows).unwrap();
        if !direct && let Source::Csv { lines, .. } = &mut reader.source {
            *lines = None;
        }
        let mut out = String::new();
        loop {
            match reader.next_chunk(max_rows, indices) {
                Ok(Some(chunk)) => {
                    out.push_str(&format!("chunk from row {}\n", chunk.first_row));
                    for r in 0..chunk.len() {
                        for col in &chunk.columns {
                            match col.is_valid(r) {
                                true => out.push_str(&format!("[{}]", col.value(r))),
                                false => out.push_str("null"),
                            }
                        }
                        out.push('\n');
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    out.push_str(&format!("error: {e}"));
                    break;
                }
            }
        }
        out
    }

    /// Files read line by line where they quote nothing give exactly what
    /// the csv crate alone gives: the same cells, chunks, line numbers in
    /// errors and the same refusals, over many blocks, with CRLF and LF
    /// line ends, empty lines, empty cells, a last line with or without its
    /// end, and a quoted field, a lone CR, a short row or a bad byte
    /// somewhere (the csv crate then reads on from that block).
    #[test]
    fn lines_read_directly_equal_the_csv_crate() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.csv");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for case in 0..40 {
            let rows = [3usize, 900, 30_000][case % 3];
            let crlf = case % 4 == 1;
            // Another dialect in a third of the cases.
            let options = match case % 3 {
                2 => CsvOptions {
                    delimiter: b';',
                    quote: b'\'',
                },
                _ => CsvOptions::default(),
            };
            let (sep, q) = (options.delimiter, options.quote);
            let mut text: Vec<u8> = [&b"email"[..], &[sep], b"phone", &[sep], b"region"].concat();
            text.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            // Where something other than plain cells goes, if anywhere.
            let odd_row = if case % 5 == 0 {
                usize::MAX
            } else {
                rng.random_range(0..rows)
            };
            let odd = case % 6;
            for row in 0..rows {
                if rng.random_range(0..50) == 0 {
                    text.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
                }
                for field in 0..3 {
                    if field > 0 {
                        text.push(sep);
                    }
                    if row == odd_row && field == 1 {
                        match odd {
                            0 => text.extend_from_slice(
                                &[&[q][..], b"quoted", &[sep], b" with\nlines", &[q]].concat(),
                            ),
                            1 => text.extend_from_slice(b"lone\rcr"),
                            2 => text.extend_from_slice(b"short"),
                            3 => text.extend_from_slice(b"bad\xff"),
                            4 => text.extend_from_slice(&[b'x', sep, b'y']),
                            _ => text.extend_from_slice("é".as_bytes()),
                        }
                        if odd == 2 {
                            break;
                        }
                        continue;
                    }
                    match rng.random_range(0..8) {
                        0 => {}
                        1 => text.extend_from_slice("zoë".as_bytes()),
                        _ => {
                            let n = rng.random_range(1..24);
                            text.extend((0..n).map(|_| rng.random_range(b'a'..=b'z')));
                        }
                    }
                }
                let last = row + 1 == rows;
                if !last || case % 2 == 0 {
                    text.extend_from_slice(if crlf && row % 3 != 0 { b"\r\n" } else { b"\n" });
                }
            }
            std::fs::write(&path, &text).unwrap();
            for (max_rows, indices) in [(8192, &[0usize, 1, 2][..]), (7, &[2, 0][..])] {
                let direct = outcome_in(&path, options, max_rows, indices, true);
                let csv_only = outcome_in(&path, options, max_rows, indices, false);
                assert!(direct == csv_only, "case {case}, {max_rows} rows a chunk");
            }
        }
    }

    /// A line longer than a block (the buffer grows for it), with short
    /// lines before and after, reads as the csv crate reads it.
    #[test]
    fn a_line_longer_than_a_block_reads_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.csv");
        let mut text = b"a,b,c\nx,y,z\n".to_vec();
        text.extend_from_slice(b"long,");
        text.extend(std::iter::repeat_n(b'q', 700_000));
        text.extend_from_slice(b",end\nx2,y2,z2\n");
        std::fs::write(&path, &text).unwrap();
        for indices in [&[0usize, 1, 2][..], &[1][..]] {
            let direct = outcome(&path, 8, indices, true);
            assert_eq!(direct, outcome(&path, 8, indices, false));
            assert!(direct.contains(&"q".repeat(700_000)));
        }
    }

    /// Errors name the line a row is on, past CRLF line ends and empty
    /// lines, whether the row was read directly or by the csv crate (which
    /// places a row where the one before it ended).
    #[test]
    fn errors_name_the_line_the_row_is_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.csv");
        let cases: [(&[u8], &str); 4] = [
            (
                b"a,b,c\r\n\r\nx,y,z\r\nx,bad\xff,z\r\n",
                "line 4: column \"b\" is not valid UTF-8",
            ),
            (
                b"a,b,c\r\n\"q\",y,z\r\n\r\n\r\nx,bad\xff,z\r\n",
                "line 5: column \"b\" is not valid UTF-8",
            ),
            (
                b"a,b,c\n\n\nx,y\n",
                "line 4: malformed CSV: 2 fields where the header has 3",
            ),
            (
                b"a,b,c\r\n\"q\",y,z\r\n\r\nx,y\r\n",
                "line 4: malformed CSV: 2 fields where the header has 3",
            ),
        ];
        for (text, expected) in cases {
            std::fs::write(&path, text).unwrap();
            for direct in [true, false] {
                let got = outcome(&path, 8, &[0, 1], direct);
                assert!(got.ends_with(expected), "{got} (direct: {direct})");
            }
        }
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
