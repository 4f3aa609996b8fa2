//! Quote-free CSV lines, read straight from the file.
//!
//! Most partner files quote nothing. For those lines a record is a line and
//! a field is what lies between delimiters, so one vectorised scan for the
//! delimiter and the line end splits a whole block at once. [`Lines`] reads
//! blocks of whole lines and hands out their rows while a block holds no
//! quote character and no carriage return other than in a CRLF line end;
//! at the first block that does, it stops at that block's first line, a
//! record boundary, and the csv crate reads the rest of the file from
//! there. Empty lines are skipped and lines are numbered as the csv crate
//! numbers them.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes read at a time.
const BLOCK: usize = 256 << 10;

/// What [`Lines::rows`] stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// It gave the rows asked for; more may follow.
    Full,
    /// The file ended.
    End,
    /// The next line is in a block with a quote or a lone carriage return:
    /// the csv crate reads on from [`Lines::position`].
    Quoted,
}

/// A row with a field count other than the header's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unequal {
    pub line: u64,
    pub fields: usize,
}

/// Reads quote-free lines of a CSV file from a byte offset on.
pub(super) struct Lines {
    file: File,
    buf: Vec<u8>,
    /// The next line starts at `buf[start]`; `buf[start..checked]` holds
    /// whole lines checked to be quote-free; `buf[..end]` was read.
    start: usize,
    checked: usize,
    end: usize,
    /// File offset of `buf[0]`.
    offset: u64,
    eof: bool,
    /// Line number of `buf[start]` (1-based, as the csv crate counts).
    line: u64,
    /// Records read so far, the header included.
    records: u64,
    fields: usize,
    delimiter: u8,
    quote: u8,
    /// End of each field of the current line.
    ends: Vec<usize>,
}

impl Lines {
    /// Lines of `file` from byte `offset`, which starts line `line` after
    /// `records` records; rows must have `fields` fields.
    pub(super) fn new(
        file: File,
        [offset, line, records]: [u64; 3],
        fields: usize,
        delimiter: u8,
        quote: u8,
    ) -> Self {
        Lines {
            file,
            buf: vec![0; BLOCK],
            start: 0,
            checked: 0,
            end: 0,
            offset,
            eof: false,
            line,
            records,
            fields,
            delimiter,
            quote,
            ends: Vec::with_capacity(fields + 1),
        }
    }

    /// Byte offset, line and record number of the next line: where the
    /// csv crate reads on after [`Stop::Quoted`].
    pub(super) fn position(&self) -> csv::Position {
        let mut p = csv::Position::new();
        p.set_byte(self.offset + self.start as u64)
            .set_line(self.line)
            .set_record(self.records);
        p
    }

    /// Bytes of the file consumed so far.
    pub(super) fn bytes_read(&self) -> u64 {
        self.offset + self.start as u64
    }

    /// Up to `max` rows, each given to `row` as its line (without the line
    /// end), the end of each of its fields in the line, and its line number.
    pub(super) fn rows(
        &mut self,
        max: usize,
        mut row: impl FnMut(&[u8], &[usize], u64),
    ) -> std::io::Result<Result<Stop, Unequal>> {
        let mut taken = 0;
        while taken < max {
            if self.start == self.checked {
                match self.fill()? {
                    Some(stop) => return Ok(Ok(stop)),
                    None => continue,
                }
            }
            let region = &self.buf[self.start..self.checked];
            let mut consumed = 0usize;
            self.ends.clear();
            for at in memchr::memchr2_iter(self.delimiter, b'\n', region) {
                if region[at] == self.delimiter {
                    self.ends.push(at - consumed);
                    continue;
                }
                let line = &region[consumed..at];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.is_empty() {
                    if let Err(u) = give(line, &mut self.ends, self.fields, self.line, &mut row) {
                        return Ok(Err(u));
                    }
                    self.records += 1;
                    taken += 1;
                }
                self.ends.clear();
                self.line += 1;
                consumed = at + 1;
                if taken == max {
                    break;
                }
            }
            if taken < max && consumed < region.len() {
                // The file's last line, without a line end.
                let line = &region[consumed..];
                if let Err(u) = give(line, &mut self.ends, self.fields, self.line, &mut row) {
                    return Ok(Err(u));
                }
                self.records += 1;
                taken += 1;
                consumed = region.len();
            }
            self.ends.clear();
            self.start += consumed;
        }
        Ok(Ok(Stop::Full))
    }

    /// Makes `buf[start..checked]` whole lines that are quote-free: None
    /// when it did, or where to stop.
    fn fill(&mut self) -> std::io::Result<Option<Stop>> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.offset += self.start as u64;
            self.end -= self.start;
            self.start = 0;
            self.checked = 0;
        }
        let complete = loop {
            if let Some(last) = memchr::memrchr(b'\n', &self.buf[..self.end]) {
                break last + 1;
            }
            if self.eof {
                if self.end == 0 {
                    return Ok(Some(Stop::End));
                }
                break self.end;
            }
            if self.end == self.buf.len() {
                // A line longer than the buffer.
                self.buf.resize(2 * self.buf.len(), 0);
            }
            let n = self
                .file
                .read_at(&mut self.buf[self.end..], self.offset + self.end as u64)?;
            if n == 0 {
                self.eof = true;
            }
            self.end += n;
        };
        let region = &self.buf[..complete];
        let lone_cr = memchr::memchr_iter(b'\r', region).any(|i| region.get(i + 1) != Some(&b'\n'));
        if lone_cr || memchr::memchr(self.quote, region).is_some() {
            return Ok(Some(Stop::Quoted));
        }
        self.checked = complete;
        Ok(None)
    }
}

/// Ends line `number` with its last field and gives it to `row`, if it has
/// the header's `fields`.
fn give(
    line: &[u8],
    ends: &mut Vec<usize>,
    fields: usize,
    number: u64,
    row: &mut impl FnMut(&[u8], &[usize], u64),
) -> Result<(), Unequal> {
    ends.push(line.len());
    if ends.len() != fields {
        return Err(Unequal {
            line: number,
            fields: ends.len(),
        });
    }
    row(line, ends, number);
    Ok(())
}
