//! Own-party person numbers: each party's rows linked by the identifier
//! values they share among themselves, and by nothing another party holds.

use arrow::array::{Array, FixedSizeBinaryArray};
use arrow::buffer::ScalarBuffer;

use super::TableData;
use crate::policy::Policy;

/// `tables` with every row's own-party person: rows of one party's tables
/// linked by the identifier values they share (dense keys, so across its
/// datasets and identity kinds alike), and by nothing another party holds.
/// Numbers are dense per party and mean nothing across parties.
///
/// Dense keys are numbers below the count of distinct values, and the keys
/// of one kind never equal another kind's ([`crate::psi::ColumnKeys`]), so
/// the first row of each key is kept in an array indexed by key and every
/// later row with that key is linked to it: one pass, no sort.
pub fn with_own_people(policy: &Policy, mut tables: Vec<TableData>) -> Vec<TableData> {
    let mut owners: Vec<&str> = policy.datasets().iter().map(|d| d.owner()).collect();
    owners.sort_unstable();
    owners.dedup();
    for owner in owners {
        let theirs: Vec<usize> = (0..tables.len())
            .filter(|&i| tables[i].dataset.owner() == owner)
            .collect();
        let rows: usize = theirs.iter().map(|&i| tables[i].person_of_row.len()).sum();
        let columns = key_columns(&tables, &theirs);
        let most = columns
            .iter()
            .flat_map(KeyColumn::iter)
            .map(|(key, _)| key)
            .max();
        let mut people = crate::psi::People::new(rows);
        if let Some(most) = most {
            let mut first_row = vec![u32::MAX; most as usize + 1];
            for column in &columns {
                for (key, row) in column.iter() {
                    let first = &mut first_row[key as usize];
                    if *first == u32::MAX {
                        *first = row;
                    } else {
                        people.union(*first, row);
                    }
                }
            }
        }
        let own = ScalarBuffer::from(dense_numbers(&mut people, rows));
        let mut offset = 0;
        for &i in &theirs {
            let n = tables[i].person_of_row.len();
            tables[i].own_person_of_row = own.slice(offset, n);
            offset += n;
        }
    }
    tables
}

/// One identifier column of one batch: its dense keys and the number of
/// its first row among the party's rows.
struct KeyColumn<'a> {
    keys: &'a FixedSizeBinaryArray,
    first: u32,
}

impl KeyColumn<'_> {
    /// (key, row) of every non-null value.
    fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..self.keys.len())
            .filter(|&r| self.keys.is_valid(r))
            .map(move |r| {
                let key = u32::from_be_bytes(self.keys.value(r).try_into().unwrap_or([0; 4]));
                (key, self.first + r as u32)
            })
    }
}

/// The key columns of the tables `theirs`, their rows numbered across them
/// in order.
fn key_columns<'a>(tables: &'a [TableData], theirs: &[usize]) -> Vec<KeyColumn<'a>> {
    let mut out = Vec::new();
    let mut first = 0u32;
    for &i in theirs {
        let t = &tables[i];
        let mut row = first;
        for batch in &t.batches {
            for (column, _) in t.dataset.identifier_columns() {
                if let Some(keys) = batch
                    .column_by_name(column)
                    .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
                    .filter(|c| c.value_length() == 4)
                {
                    out.push(KeyColumn { keys, first: row });
                }
            }
            row += batch.num_rows() as u32;
        }
        first += t.person_of_row.len() as u32;
    }
    out
}

/// Every row's person numbered densely, in the order of each person's
/// first row.
fn dense_numbers(people: &mut crate::psi::People, rows: usize) -> Vec<u32> {
    let mut number = vec![u32::MAX; rows];
    let mut next = 0u32;
    let mut own = Vec::with_capacity(rows);
    for r in 0..rows as u32 {
        let root = people.find(r) as usize;
        if number[root] == u32::MAX {
            number[root] = next;
            next += 1;
        }
        own.push(number[root]);
    }
    own
}

#[cfg(test)]
mod tests;
