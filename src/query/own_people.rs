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
pub fn with_own_people(policy: &Policy, mut tables: Vec<TableData>) -> Vec<TableData> {
    use rayon::prelude::*;
    let mut owners: Vec<&str> = policy.datasets().iter().map(|d| d.owner()).collect();
    owners.sort_unstable();
    owners.dedup();
    let kinds: Vec<&str> = {
        let mut k: Vec<&str> = policy
            .datasets()
            .iter()
            .flat_map(|d| d.identifier_columns().into_iter().map(|(_, k)| k))
            .collect();
        k.sort_unstable();
        k.dedup();
        k
    };
    for owner in owners {
        let theirs: Vec<usize> = (0..tables.len())
            .filter(|&i| tables[i].dataset.owner() == owner)
            .collect();
        let rows: usize = theirs.iter().map(|&i| tables[i].person_of_row.len()).sum();
        // (kind, key) of every identifier value, with its row.
        let mut values: Vec<(u64, u32)> = Vec::new();
        let mut first = 0u32;
        for &i in &theirs {
            let t = &tables[i];
            let mut row = first;
            for batch in &t.batches {
                for (column, kind) in t.dataset.identifier_columns() {
                    let k = kinds.iter().position(|x| *x == kind).unwrap_or(0) as u64;
                    let Some(keys) = batch
                        .column_by_name(column)
                        .and_then(|c| c.as_any().downcast_ref::<FixedSizeBinaryArray>())
                        .filter(|c| c.value_length() == 4)
                    else {
                        continue;
                    };
                    for r in 0..keys.len() {
                        if keys.is_valid(r) {
                            let key =
                                u32::from_be_bytes(keys.value(r).try_into().unwrap_or([0; 4]));
                            values.push(((k << 32) | u64::from(key), row + r as u32));
                        }
                    }
                }
                row += batch.num_rows() as u32;
            }
            first += t.person_of_row.len() as u32;
        }
        values.par_sort_unstable();
        let mut people = crate::psi::People::new(rows);
        for pair in values.windows(2) {
            if pair[0].0 == pair[1].0 {
                people.union(pair[0].1, pair[1].1);
            }
        }
        drop(values);
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
        let own = ScalarBuffer::from(own);
        let mut offset = 0;
        for &i in &theirs {
            let n = tables[i].person_of_row.len();
            tables[i].own_person_of_row = own.slice(offset, n);
            offset += n;
        }
    }
    tables
}
