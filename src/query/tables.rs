//! The query tables: each dataset's rows in the form queries read them
//! (text dimensions as dictionaries, identifiers as dense keys), with the
//! person number of every row, and the same tables as stored once matched.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, NullArray, UInt32Array};
use arrow::buffer::ScalarBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;

use super::{PERSON_COLUMN, with_own_people};
use crate::policy::{Dataset, Policy};

/// One dataset's rows, with the person number of every row.
#[derive(Debug, Clone)]
pub struct TableData {
    pub dataset: Dataset,
    pub batches: Vec<RecordBatch>,
    /// One entry per row, across batches in order; shared with the query
    /// tables' person column, not copied per query.
    pub person_of_row: ScalarBuffer<u32>,
    /// The person of every row as its owner's rows alone link them (see
    /// [`with_own_people`]): what differential privacy bounds, so that no
    /// other party's rows can merge or split one person of the owner.
    pub own_person_of_row: ScalarBuffer<u32>,
    /// No person has two rows in this table.
    pub one_row_per_person: bool,
}

impl TableData {
    pub fn new(
        dataset: Dataset,
        batches: Vec<RecordBatch>,
        person_of_row: ScalarBuffer<u32>,
    ) -> Self {
        let mut seen = vec![false; person_of_row.iter().max().map_or(0, |m| *m as usize + 1)];
        let one_row_per_person = person_of_row
            .iter()
            .all(|p| !std::mem::replace(&mut seen[*p as usize], true));
        TableData {
            dataset,
            batches,
            own_person_of_row: person_of_row.clone(),
            person_of_row,
            one_row_per_person,
        }
    }
}

/// The name of the hidden column of own-party person numbers.
pub const OWN_PERSON_COLUMN: &str = "__own_person";

/// The name of the hidden column numbering a table's rows (from 0, per
/// query): with the rows it is joined to, it names a joined row.
pub const ROW_COLUMN: &str = "__row";

/// Every dataset of an agreement as a query table, people numbered across
/// all of them. `batches` holds each dataset's stored rows (empty if none).
pub fn agreement_tables(policy: &Policy, mut batches: Vec<Vec<RecordBatch>>) -> Vec<TableData> {
    use rayon::prelude::*;
    for (d, side) in policy.datasets().iter().zip(&mut batches) {
        side.par_iter_mut().for_each(|b| *b = table_form(d, b));
    }
    tables_of_table_form(policy, batches)
}

/// A stored batch of dataset `d` in the form the query tables keep: text
/// dimensions as dictionaries (a fresh copy), the other non-identifier
/// columns copied into buffers of their own. A decoded batch's columns
/// share their chunk's buffer, which would otherwise stay in memory whole.
/// Identifier columns are left as they are: fingerprints until they are
/// matched and replaced by dense keys, or the keys already (the server puts
/// them in before).
pub(crate) fn table_form(d: &Dataset, batch: &RecordBatch) -> RecordBatch {
    let identifiers: Vec<&str> = d.identifier_columns().into_iter().map(|(c, _)| c).collect();
    let schema = batch.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for (i, field) in schema.fields().iter().enumerate() {
        if identifiers.contains(&field.name().as_str()) {
            continue;
        }
        // Into the engine's type (a text dimension into a dictionary,
        // which is a fresh copy too) or copied.
        let engine_type = d
            .columns()
            .iter()
            .find(|c| c.name() == field.name())
            .and_then(|c| query_column_type(c.role()))
            .filter(|t| t != field.data_type() && caller_type(t) == *field.data_type());
        match engine_type.map(|t| (arrow::compute::cast(&columns[i], &t), t)) {
            Some((Ok(cast), t)) => {
                columns[i] = cast;
                fields[i] = Field::new(field.name(), t, true);
            }
            _ => columns[i] = owned(&columns[i]),
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap_or_else(|_| batch.clone())
}

/// [`agreement_tables`] of batches already in [`table_form`].
pub(crate) fn tables_of_table_form(
    policy: &Policy,
    batches: Vec<Vec<RecordBatch>>,
) -> Vec<TableData> {
    let identifiers: Vec<Vec<(&str, &str)>> = policy
        .datasets()
        .iter()
        .map(Dataset::identifier_columns)
        .collect();
    let sides: Vec<crate::psi::Side<'_>> = batches
        .iter()
        .zip(&identifiers)
        .map(|(b, ids)| crate::psi::Side {
            batches: b,
            identifiers: ids,
        })
        .collect();
    let (persons, keys) = crate::psi::people_and_keys(&sides, true);
    drop(sides);
    let batches = with_dense_keys(policy, batches, keys);
    tables_with_people(policy, batches, persons)
}

/// The agreement's tables of `batches` (per dataset, in the policy's order)
/// and the person number of every row across them, in the same order.
pub(crate) fn tables_with_people(
    policy: &Policy,
    batches: Vec<Vec<RecordBatch>>,
    persons: Vec<u32>,
) -> Vec<TableData> {
    let persons = ScalarBuffer::from(persons);
    let mut offset = 0;
    let tables = policy
        .datasets()
        .iter()
        .zip(batches)
        .map(|(d, b)| {
            let n: usize = b.iter().map(RecordBatch::num_rows).sum();
            let t = TableData::new(d.clone(), b, persons.slice(offset, n));
            offset += n;
            t
        })
        .collect();
    with_own_people(policy, tables)
}

/// A table's batches as kept among the matched tables in the store: its
/// rows, then the person number of every row in batches of one column of
/// their own (so that reading them back keeps no second copy of them).
pub fn matched_batches(t: &TableData) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
    let schema = person_schema();
    let mut out = t.batches.clone();
    let mut offset = 0usize;
    for batch in &t.batches {
        let n = batch.num_rows();
        if offset + n > t.person_of_row.len() {
            return Err(arrow::error::ArrowError::InvalidArgumentError(
                "person numbers do not cover the rows".into(),
            ));
        }
        let persons = UInt32Array::new(t.person_of_row.slice(offset, n), None);
        out.push(RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(persons)],
        )?);
        offset += n;
    }
    Ok(out)
}

/// The schema of the batches of person numbers among matched tables (no
/// policy column can be named like it: names start with a letter).
pub(super) fn person_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        PERSON_COLUMN,
        DataType::UInt32,
        false,
    )]))
}

/// The agreement's tables from matched tables read back from the store
/// (one entry per dataset with rows, as [`matched_batches`] wrote them);
/// None if any does not have that form.
pub fn tables_from_matched(
    policy: &Policy,
    mut stored: Vec<(String, Vec<RecordBatch>)>,
) -> Option<Vec<TableData>> {
    let person_schema = person_schema();
    let mut tables = Vec::with_capacity(policy.datasets().len());
    for d in policy.datasets() {
        let batches = match stored.iter().position(|(name, _)| name == d.name()) {
            Some(i) => stored.swap_remove(i).1,
            None => Vec::new(),
        };
        let (persons, rows): (Vec<RecordBatch>, Vec<RecordBatch>) = batches
            .into_iter()
            .partition(|b| b.schema() == person_schema);
        let total: usize = rows.iter().map(RecordBatch::num_rows).sum();
        let mut person_of_row = Vec::with_capacity(total);
        for batch in &persons {
            let column = batch.column(0).as_any().downcast_ref::<UInt32Array>()?;
            person_of_row.extend_from_slice(column.values());
        }
        if person_of_row.len() != total {
            return None;
        }
        tables.push(TableData::new(d.clone(), rows, person_of_row.into()));
    }
    stored.is_empty().then(|| with_own_people(policy, tables))
}

/// Batches in [`table_form`] with every identifier column replaced by its
/// dense key (a column the matcher could not read becomes all nulls): the
/// same equalities in 4 bytes per value instead of 32. Nothing a caller
/// sees changes: identifiers are only ever joined on.
pub(super) fn with_dense_keys(
    policy: &Policy,
    mut batches: Vec<Vec<RecordBatch>>,
    keys: Vec<crate::psi::ColumnKeys>,
) -> Vec<Vec<RecordBatch>> {
    let keys = KeysByPlace::new(keys);
    for ((side, d), side_batches) in policy.datasets().iter().enumerate().zip(&mut batches) {
        for (batch_no, batch) in side_batches.iter_mut().enumerate() {
            // Kept as it was if it cannot be rebuilt (it always can: the
            // keys have the batch's rows).
            if let Ok(keyed) = keys.put_in(d, side, batch_no, batch) {
                *batch = keyed;
            }
        }
    }
    batches
}

/// Dense keys by where they go: (side, batch, column).
pub(crate) struct KeysByPlace(HashMap<(usize, usize, String), ArrayRef>);

impl KeysByPlace {
    pub(crate) fn new(keys: Vec<crate::psi::ColumnKeys>) -> Self {
        KeysByPlace(
            keys.into_iter()
                .map(|k| ((k.side, k.batch, k.column), Arc::new(k.keys) as ArrayRef))
                .collect(),
        )
    }

    /// Batch `batch_no` of dataset `d` (side `side`) with every identifier
    /// column replaced by its dense key (all nulls for a column the matcher
    /// could not read).
    pub(crate) fn put_in(
        &self,
        d: &Dataset,
        side: usize,
        batch_no: usize,
        batch: &RecordBatch,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let identifiers: Vec<&str> = d.identifier_columns().into_iter().map(|(c, _)| c).collect();
        let schema = batch.schema();
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for (i, field) in schema.fields().iter().enumerate() {
            if !identifiers.contains(&field.name().as_str()) {
                continue;
            }
            columns[i] = self
                .0
                .get(&(side, batch_no, field.name().clone()))
                .map(Arc::clone)
                .unwrap_or_else(|| arrow::array::new_null_array(&KEY_TYPE, batch.num_rows()));
            fields[i] = Field::new(field.name(), KEY_TYPE, true);
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
    }
}

/// A copy of `array` in freshly allocated buffers (the array itself if it
/// cannot be copied: still correct, only larger in memory).
pub(crate) fn owned(array: &ArrayRef) -> ArrayRef {
    let data = array.to_data();
    let mut copy = arrow::array::MutableArrayData::new(vec![&data], false, data.len());
    match copy.try_extend(0, 0, data.len()) {
        Ok(()) => arrow::array::make_array(copy.freeze()),
        Err(_) => Arc::clone(array),
    }
}

/// The type of an identifier's dense key in the query tables.
pub(super) const KEY_TYPE: DataType = DataType::FixedSizeBinary(4);

/// A column's type in the query tables: as uploaded, but identifiers as
/// their dense keys and text dimensions as dictionaries (2-byte codes
/// instead of the text on every row) when their domain has at most 65,535
/// values. Callers never see a dictionary: [`caller_type`].
pub(super) fn query_column_type(role: &crate::policy::ColumnRole) -> Option<DataType> {
    use crate::policy::{ColumnRole, Domain, ValueType};
    match role {
        ColumnRole::Identifier { .. } => Some(KEY_TYPE),
        ColumnRole::Dimension {
            value_type: ValueType::String,
            domain,
        } => {
            let values = match domain {
                Domain::Values(v) => v.len() as u64,
                Domain::MaxCardinality(m) => u64::from(*m),
            };
            Some(if values <= u64::from(u16::MAX) {
                DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8))
            } else {
                DataType::Utf8
            })
        }
        other => crate::upload::column_type(other),
    }
}

/// The type a caller sees for a column the engine holds as `dt`: a
/// dictionary as its values.
pub fn caller_type(dt: &DataType) -> DataType {
    match dt {
        DataType::Dictionary(_, values) => caller_type(values),
        other => other.clone(),
    }
}

/// `batches` with every dictionary column as its values, and their schema.
pub(crate) fn for_caller(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<(SchemaRef, Vec<RecordBatch>), arrow::error::ArrowError> {
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Dictionary(..)))
    {
        return Ok((Arc::clone(schema), batches));
    }
    let shown: SchemaRef = Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .map(|f| {
                f.as_ref()
                    .clone()
                    .with_data_type(caller_type(f.data_type()))
            })
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ));
    let batches = batches
        .into_iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .zip(shown.fields())
                .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(Arc::clone(&shown), columns)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((shown, batches))
}

/// The table an analyst sees: the uploaded columns, the sensitive columns as
/// always-null placeholders (so naming them is refused by rule rather than
/// as an unknown column), and the hidden person column.
pub(crate) fn table_batches(
    t: &TableData,
) -> Result<(SchemaRef, Vec<RecordBatch>), DataFusionError> {
    let mut fields: Vec<Field> = Vec::new();
    for c in t.dataset.columns() {
        match query_column_type(c.role()) {
            Some(dt) => fields.push(Field::new(c.name(), dt, true)),
            None => fields.push(Field::new(c.name(), DataType::Null, true)),
        }
    }
    fields.push(Field::new(PERSON_COLUMN, DataType::UInt32, false));
    fields.push(Field::new(OWN_PERSON_COLUMN, DataType::UInt32, false));
    fields.push(Field::new(ROW_COLUMN, DataType::UInt32, false));
    let schema = Arc::new(Schema::new(fields));
    let mut out = Vec::with_capacity(t.batches.len());
    let mut offset = 0usize;
    for batch in &t.batches {
        let n = batch.num_rows();
        let stored = batch.schema();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for c in t.dataset.columns() {
            // By name and type in the stored schema: a policy edited since
            // the version was stored may list columns in another order or
            // declare one it does not hold, which then reads as NULL.
            let column = query_column_type(c.role()).map(|dt| match stored.index_of(c.name()) {
                Ok(i) if batch.column(i).data_type() == &dt => Arc::clone(batch.column(i)),
                // The same values held another way (text for a dictionary).
                Ok(i) if caller_type(batch.column(i).data_type()) == caller_type(&dt) => {
                    arrow::compute::cast(batch.column(i), &dt)
                        .unwrap_or_else(|_| arrow::array::new_null_array(&dt, n))
                }
                _ => arrow::array::new_null_array(&dt, n),
            });
            columns.push(column.unwrap_or_else(|| Arc::new(NullArray::new(n))));
        }
        if offset + n > t.person_of_row.len() {
            return Err(DataFusionError::Internal(
                "person numbers do not cover the rows".into(),
            ));
        }
        let persons = t.person_of_row.slice(offset, n);
        columns.push(Arc::new(UInt32Array::new(persons, None)));
        let own = t.own_person_of_row.slice(offset, n);
        columns.push(Arc::new(UInt32Array::new(own, None)));
        columns.push(Arc::new(UInt32Array::from_iter_values(
            offset as u32..(offset + n) as u32,
        )));
        offset += n;
        out.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
    }
    Ok((schema, out))
}
