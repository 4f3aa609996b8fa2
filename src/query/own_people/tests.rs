use super::*;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

fn policy() -> Policy {
    crate::policy::unit_policy(
        r#"
[identity.loyalty]
profile = "text"

[[dataset]]
name = "customers"
owner = "acme"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "card"
role = "identifier"
kind = "loyalty"

[[dataset]]
name = "audience"
owner = "globex"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset]]
name = "orders"
owner = "acme"

[[dataset.column]]
name = "card"
role = "identifier"
kind = "loyalty"

[query]
aggregates = ["count"]
min_group_size = 5
"#,
    )
}

/// A small random generator, so the test needs no crate and repeats.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One table of `rows` rows in batches of at most 7, its identifier
/// columns holding keys from `range` (a kind's own keys) or null.
fn table(
    policy: &Policy,
    dataset: usize,
    rows: usize,
    ranges: &[(u32, u32)],
    rng: &mut Rng,
) -> TableData {
    let d = policy.datasets()[dataset].clone();
    let ids = d.identifier_columns();
    let schema = Arc::new(Schema::new(
        ids.iter()
            .map(|(c, _)| Field::new(*c, DataType::FixedSizeBinary(4), true))
            .collect::<Vec<_>>(),
    ));
    let mut batches = Vec::new();
    let mut left = rows;
    while left > 0 {
        let n = left.min(1 + rng.below(7) as usize);
        left -= n;
        let columns = ranges
            .iter()
            .map(|&(low, count)| {
                let values: Vec<Option<[u8; 4]>> = (0..n)
                    .map(|_| {
                        (rng.below(4) != 0)
                            .then(|| (low + rng.below(u64::from(count)) as u32).to_be_bytes())
                    })
                    .collect();
                Arc::new(
                    FixedSizeBinaryArray::try_from_sparse_iter_with_size(values.into_iter(), 4)
                        .unwrap(),
                ) as arrow::array::ArrayRef
            })
            .collect();
        batches.push(RecordBatch::try_new(Arc::clone(&schema), columns).unwrap());
    }
    // Cross-party numbers are not what this computes; any will do.
    TableData::new(d, batches, vec![0u32; rows].into())
}

/// The reference: two rows of one owner are one person when a chain of
/// rows of that owner, each sharing a (kind, key) with the next, joins
/// them. Found by a search over every pair of rows, numbered in the order
/// of each person's first row.
fn reference(policy: &Policy, tables: &[TableData], owner: &str) -> Vec<u32> {
    let mut values: Vec<Vec<(&str, u32)>> = Vec::new();
    for t in tables.iter().filter(|t| t.dataset.owner() == owner) {
        for batch in &t.batches {
            for r in 0..batch.num_rows() {
                let mut row = Vec::new();
                for (column, kind) in t.dataset.identifier_columns() {
                    let keys = batch
                        .column_by_name(column)
                        .unwrap()
                        .as_any()
                        .downcast_ref::<FixedSizeBinaryArray>()
                        .unwrap();
                    if keys.is_valid(r) {
                        row.push((kind, u32::from_be_bytes(keys.value(r).try_into().unwrap())));
                    }
                }
                values.push(row);
            }
        }
    }
    let _ = policy;
    let n = values.len();
    let mut number = vec![u32::MAX; n];
    let mut next = 0;
    for start in 0..n {
        if number[start] != u32::MAX {
            continue;
        }
        let mut stack = vec![start];
        number[start] = next;
        while let Some(a) = stack.pop() {
            for b in 0..n {
                if number[b] == u32::MAX && values[a].iter().any(|v| values[b].contains(v)) {
                    number[b] = next;
                    stack.push(b);
                }
            }
        }
        next += 1;
    }
    number
}

/// Own-party people as the one-pass linking numbers them equal a search
/// over every pair of rows, for random tables of two parties: one party
/// with two datasets sharing the loyalty-card kind, keys dense across kinds (as
/// the matching gives them), nulls, rows of one value and of none.
#[test]
fn own_people_equal_a_search_over_every_pair_of_rows() {
    let policy = policy();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..40 {
        // email keys below `emails`, card keys after them.
        let emails = 1 + rng.below(60) as u32;
        let phones = 1 + rng.below(60) as u32;
        let tables = vec![
            table(
                &policy,
                0,
                1 + rng.below(90) as usize,
                &[(0, emails), (emails, phones)],
                &mut rng,
            ),
            table(
                &policy,
                1,
                1 + rng.below(90) as usize,
                &[(0, emails)],
                &mut rng,
            ),
            table(
                &policy,
                2,
                rng.below(60) as usize,
                &[(emails, phones)],
                &mut rng,
            ),
        ];
        let linked = with_own_people(&policy, tables.clone());
        for owner in ["acme", "globex"] {
            let ours: Vec<u32> = linked
                .iter()
                .filter(|t| t.dataset.owner() == owner)
                .flat_map(|t| t.own_person_of_row.iter().copied())
                .collect();
            assert_eq!(
                ours,
                reference(&policy, &tables, owner),
                "round {round}, {owner}"
            );
        }
    }
}
