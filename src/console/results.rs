//! Answers the console has shown, kept in its memory so that a download
//! is the answer on the page and spends no budget again; and the cells of
//! an answer as text.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::Array;
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parking_lot::Mutex;

use crate::client::QueryAnswer;

/// Answers kept at once; the oldest leaves first.
const KEPT: usize = 32;

/// One answer, as released.
#[derive(Debug)]
pub(super) struct Kept {
    pub(super) agreement: String,
    pub(super) answer: QueryAnswer,
}

/// Kept answers by id, oldest first.
type Shelf = VecDeque<(String, Arc<Kept>)>;

#[derive(Debug, Default, Clone)]
pub(super) struct Results {
    kept: Arc<Mutex<Shelf>>,
}

impl Results {
    /// Keeps `answer` and gives its id.
    pub(super) fn keep(&self, agreement: &str, answer: QueryAnswer) -> (String, Arc<Kept>) {
        let id = super::random_hex(12);
        let kept = Arc::new(Kept {
            agreement: agreement.to_string(),
            answer,
        });
        let mut all = self.kept.lock();
        if all.len() == KEPT {
            all.pop_front();
        }
        all.push_back((id.clone(), Arc::clone(&kept)));
        (id, kept)
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Kept>> {
        self.kept
            .lock()
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, v)| Arc::clone(v))
    }
}

/// The answer's rows as text, column by column.
pub(super) fn cells(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("null");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect();
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| match f {
                        Ok(f) => f.value(row).to_string(),
                        Err(_) => String::new(),
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// A column's values as numbers, where it holds numbers.
pub(super) fn numbers(batches: &[RecordBatch], column: usize) -> Option<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for batch in batches {
        let array = batch.column(column);
        let as_f64 = arrow::compute::cast(array, &DataType::Float64).ok()?;
        let values = as_f64
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()?;
        out.extend((0..values.len()).map(|i| values.is_valid(i).then(|| values.value(i))));
    }
    Some(out)
}

/// The answer as CSV, with a header line.
pub(super) fn csv(kept: &Kept) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut out = Vec::new();
    {
        let mut writer = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut out);
        for b in &kept.answer.batches {
            writer.write(b)?;
        }
    }
    Ok(out)
}

/// The answer as a Parquet file.
pub(super) fn parquet(kept: &Kept) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let mut out = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut out, Arc::clone(&kept.answer.schema), None)?;
    for b in &kept.answer.batches {
        writer.write(b)?;
    }
    writer.close()?;
    Ok(out)
}
