//! One chunk of the partner's file made into an upload batch, on its own:
//! identifiers normalised and fingerprinted (or blinded), attribute cells
//! parsed into their declared types.

use super::*;

impl Plan {
    /// Normalises, fingerprints and types one chunk, on its own; its batch
    /// and what it adds to the counts.
    pub(super) fn prepare_chunk(
        &self,
        chunk: &Chunk,
    ) -> Result<(RecordBatch, Counts), PrepareError> {
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
pub(super) fn parse_cell<T: std::str::FromStr>(
    cell: Option<&str>,
    rule: &'static str,
    place: impl Fn() -> (u64, String),
) -> Result<Option<T>, PrepareError> {
    parse_with(cell, rule, |t| t.parse().ok(), place)
}

/// A cell read by `parse`: empty is missing; anything unparseable stops
/// the upload with its row and column (never its content).
pub(super) fn parse_with<T>(
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
pub(super) fn fingerprint_column(
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
