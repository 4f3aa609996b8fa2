use super::*;
use arrow::array::Array;
use arrow::array::FixedSizeBinaryBuilder;
use arrow::datatypes::{DataType, Field, Schema};
use proptest::prelude::*;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;

fn fp(n: u64, kind: u8) -> [u8; 32] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&n.to_le_bytes());
    key[8] = kind;
    *blake3::hash(&key).as_bytes()
}

/// One batch with an email column and a phone column.
fn batch(rows: &[(Option<u64>, Option<u64>)]) -> RecordBatch {
    let mut email = FixedSizeBinaryBuilder::new(32);
    let mut phone = FixedSizeBinaryBuilder::new(32);
    for (e, p) in rows {
        match e {
            Some(n) => email.append_value(fp(*n, 0)).unwrap(),
            None => email.append_null(),
        }
        match p {
            Some(n) => phone.append_value(fp(*n, 1)).unwrap(),
            None => phone.append_null(),
        }
    }
    let schema = Schema::new(vec![
        Field::new("email", DataType::FixedSizeBinary(32), true),
        Field::new("phone", DataType::FixedSizeBinary(32), true),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![Arc::new(email.finish()), Arc::new(phone.finish())],
    )
    .unwrap()
}

const BOTH: &[(&str, &str)] = &[("email", "email"), ("phone", "phone")];

/// Two sides with the same identifier columns.
fn two_sides<'a>(
    a: &'a [RecordBatch],
    b: &'a [RecordBatch],
    identifiers: &'a [(&'a str, &'a str)],
) -> [Side<'a>; 2] {
    [
        Side {
            batches: a,
            identifiers,
        },
        Side {
            batches: b,
            identifiers,
        },
    ]
}

/// Person 1 matches on email, person 2 on phone, person 3 on both
/// through two different rows, person 4 only in the first dataset.
fn chained() -> ([RecordBatch; 1], [RecordBatch; 1]) {
    let a = [batch(&[
        (Some(1), None),
        (None, Some(2)),
        (Some(3), None),
        (None, Some(3)),
        (Some(4), Some(4)),
    ])];
    let b = [batch(&[
        (Some(1), Some(10)),
        (Some(20), Some(2)),
        (Some(3), Some(3)),
    ])];
    (a, b)
}

#[test]
fn email_or_phone_counts_a_person_once() {
    let (a, b) = chained();
    let [first, second] = two_sides(&a, &b, BOTH);
    let m = match_people(first, second);
    assert_eq!(m.overlap, 3);
    // a: rows 3 and 4 (email 3, phone 3) are one person only through b's row.
    assert_eq!(m.people, [4, 3]);
    assert_eq!(m.person_of_row[2], m.person_of_row[3]);
    assert_eq!(m.person_of_row[0], m.person_of_row[5]);
}

/// Linking one kind at a time, each from batches holding only that
/// kind's column, numbers people as linking every kind at once does;
/// batches of another number of rows are refused, linking nothing.
#[test]
fn kinds_linked_one_at_a_time_number_people_alike() {
    let (a, b) = chained();
    let [first, second] = two_sides(&a, &b, BOTH);
    let (all, _) = people_and_keys(&[first, second], false);
    let only = |batches: &[RecordBatch], column: usize| -> Vec<RecordBatch> {
        batches
            .iter()
            .map(|b| b.project(&[column]).unwrap())
            .collect()
    };
    let mut linking = Linking::new(8, false);
    for (column, kind) in [(1, "phone"), (0, "email")] {
        let (pa, pb) = (only(&a, column), only(&b, column));
        let [first, second] = two_sides(&pa, &pb, BOTH);
        assert_eq!(linking.add_kind(&[first, second], kind), Some(()));
    }
    let short = only(&a[..], 0);
    let [first, _] = two_sides(&short, &short, BOTH);
    assert_eq!(linking.add_kind(&[first], "email"), None);
    let (one_at_a_time, _) = linking.finish();
    let same = |x: &[u32]| -> Vec<Vec<bool>> {
        x.iter()
            .map(|p| x.iter().map(|q| p == q).collect())
            .collect()
    };
    assert_eq!(same(&one_at_a_time), same(&all));
    // Rows 2 and 3 of the first side meet only through the second
    // side's last row, one on email and one on phone.
    assert_eq!(one_at_a_time[2], one_at_a_time[3]);
}

#[test]
fn kinds_never_match_each_other() {
    let a = [batch(&[(Some(7), None)])];
    let b = [batch(&[(None, Some(7))])];
    let [first, second] = two_sides(&a, &b, BOTH);
    let m = match_people(first, second);
    assert_eq!(m.overlap, 0);
}

#[test]
fn fingerprints_sharing_a_prefix_are_told_apart() {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "email",
        DataType::FixedSizeBinary(32),
        true,
    )]));
    let mk = |tails: &[u8]| {
        let mut b = FixedSizeBinaryBuilder::new(32);
        for t in tails {
            let mut v = [7u8; 32];
            v[31] = *t;
            b.append_value(v).unwrap();
        }
        RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(b.finish())]).unwrap()
    };
    // Same first 8 bytes everywhere; full values 1, 2 and 3.
    let a = [mk(&[1, 2])];
    let b = [mk(&[2, 3, 3])];
    let [first, second] = two_sides(&a, &b, &[("email", "email")]);
    let m = match_people(first, second);
    assert_eq!(m.overlap, 1, "only the value 2 is in both");
    assert_eq!(m.people, [2, 2]);
    assert_eq!(
        m.person_of_row[3], m.person_of_row[4],
        "the two 3s are one person"
    );
    assert_ne!(m.person_of_row[0], m.person_of_row[1]);
}

/// Enough values for several partitions, some repeated within a side,
/// some made to share a digest (with its keys known, any fingerprint
/// whose first and third 8 bytes equal the first key's two words has
/// one digest): every 97th
/// (their partition is indexed again, confirming each hit) or every
/// one (one partition far above its share, confirmed at once). Keys and
/// people equal a plain map's.
#[test]
fn many_partitions_keep_exactly_the_equalities() {
    for crafted_every in [97, 1] {
        partitions_keep_exactly_the_equalities(crafted_every);
    }
}

fn partitions_keep_exactly_the_equalities(crafted_every: u64) {
    let rows = 3 * VALUES_PER_PARTITION as u64;
    let known = [Seeded::random(), Seeded::random()];
    let value = |n: u64| {
        let mut v = fp(n, 0);
        if n.is_multiple_of(crafted_every) {
            v[..8].copy_from_slice(&known[0].k0.to_le_bytes());
            v[16..24].copy_from_slice(&known[0].k1.to_le_bytes());
        }
        v
    };
    let make = |ids: &[u64]| {
        let mut email = FixedSizeBinaryBuilder::new(32);
        for n in ids {
            email.append_value(value(*n)).unwrap();
        }
        let schema = Schema::new(vec![Field::new(
            "email",
            DataType::FixedSizeBinary(32),
            true,
        )]);
        RecordBatch::try_new(Arc::new(schema), vec![Arc::new(email.finish())]).unwrap()
    };
    // Side a: 0..rows, with every 10th person twice; side b: the upper
    // half of a and as many others, in batches of uneven size.
    let a_ids: Vec<u64> = (0..rows).chain((0..rows).step_by(10)).collect();
    let b_ids: Vec<u64> = (rows / 2..rows + rows / 2).collect();
    let a: Vec<RecordBatch> = a_ids.chunks(40_000).map(make).collect();
    let b: Vec<RecordBatch> = b_ids.chunks(25_000).map(make).collect();
    let sides = two_sides(&a, &b, &[("email", "email")]);
    let spread = Spread::new(a_ids.len() + b_ids.len(), known);
    assert!(spread.partitions() > 2);
    assert_eq!(
        spread.digest(&value(0)),
        spread.digest(&value(crafted_every))
    );
    let (persons, keys) = people_and_keys_under(&sides, true, || known);
    let all: Vec<u64> = a_ids.iter().chain(&b_ids).copied().collect();
    let mut key_of: HashMap<u64, u32> = HashMap::new();
    let mut person_of: HashMap<u64, u32> = HashMap::new();
    let mut row = 0usize;
    for k in &keys {
        for i in 0..k.keys.len() {
            let key = u32::from_be_bytes(k.keys.value(i).try_into().unwrap());
            let n = all[row];
            assert_eq!(*key_of.entry(n).or_insert(key), key, "one value, one key");
            assert_eq!(*person_of.entry(n).or_insert(persons[row]), persons[row]);
            row += 1;
        }
    }
    assert_eq!(row, all.len(), "every row has a key, in order");
    let distinct_keys: HashSet<u32> = key_of.values().copied().collect();
    assert_eq!(
        distinct_keys.len(),
        key_of.len(),
        "different values, different keys"
    );
    assert!(distinct_keys.iter().all(|k| (*k as usize) < key_of.len()));
    let distinct_people: HashSet<u32> = persons.iter().copied().collect();
    assert_eq!(distinct_people.len(), key_of.len());
    let (pa, pb) = persons.split_at(a_ids.len());
    assert_eq!(people_counts(pa, pb).unwrap(), [rows, rows, rows / 2]);
}

proptest! {
    #[test]
    fn equals_a_plain_set_intersection(
        a in proptest::collection::hash_set(0u64..400, 0..200),
        b in proptest::collection::hash_set(0u64..400, 0..200),
    ) {
        let rows_a: Vec<_> = a.iter().map(|n| (Some(*n), None)).collect();
        let rows_b: Vec<_> = b.iter().map(|n| (Some(*n), None)).collect();
        let (ba, bb) = ([batch(&rows_a)], [batch(&rows_b)]);
        let m = match_people(
            Side { batches: &ba, identifiers: BOTH },
            Side { batches: &bb, identifiers: BOTH },
        );
        let expected = a.intersection(&b).count() as u64;
        prop_assert_eq!(m.overlap, expected);
        prop_assert_eq!(m.people, [a.len() as u64, b.len() as u64]);
        let distinct: HashSet<u32> = m.person_of_row.iter().copied().collect();
        prop_assert_eq!(distinct.len() as u64, (a.len() + b.len()) as u64 - expected);
    }

    /// Dense keys hold exactly the fingerprints' equalities: equal keys
    /// where (and only where) the same kind's fingerprints are equal,
    /// across sides, batches and kinds; null where they are null.
    #[test]
    fn dense_keys_keep_exactly_the_equalities(
        rows in proptest::collection::vec(
            (proptest::option::of(0u64..30), proptest::option::of(0u64..30)), 1..60),
        split in 0usize..60,
        shared_prefix in any::<bool>(),
    ) {
        let fp_of = |n: u64, kind: u8| {
            let mut v = fp(n, kind);
            if shared_prefix {
                // Crafted values that all share their first 8 bytes.
                v[..8].copy_from_slice(b"flooding");
            }
            v
        };
        let make = |rows: &[(Option<u64>, Option<u64>)]| {
            let mut email = FixedSizeBinaryBuilder::new(32);
            let mut phone = FixedSizeBinaryBuilder::new(32);
            for (e, p) in rows {
                match e { Some(n) => email.append_value(fp_of(*n, 0)).unwrap(), None => email.append_null() }
                match p { Some(n) => phone.append_value(fp_of(*n, 1)).unwrap(), None => phone.append_null() }
            }
            let schema = Schema::new(vec![
                Field::new("email", DataType::FixedSizeBinary(32), true),
                Field::new("phone", DataType::FixedSizeBinary(32), true),
            ]);
            RecordBatch::try_new(Arc::new(schema), vec![Arc::new(email.finish()), Arc::new(phone.finish())]).unwrap()
        };
        let split = split.min(rows.len());
        let (first, second) = rows.split_at(split);
        // The second side in two batches, so batch numbers matter too.
        let half = second.len() / 2;
        let a = [make(first)];
        let b = [make(&second[..half]), make(&second[half..])];
        let sides = [
            Side { batches: &a, identifiers: BOTH },
            Side { batches: &b, identifiers: BOTH },
        ];
        let (_, keys) = people_and_keys(&sides, true);
        // Every (kind, fingerprint number) in row order, with its key.
        let batches = [(0usize, 0usize, first), (1, 0, &second[..half]), (1, 1, &second[half..])];
        // ((kind, fingerprint number), key)
        type Seen = ((u8, Option<u64>), Option<u32>);
        let mut seen: Vec<Seen> = Vec::new();
        for (side, batch, rows) in batches {
            for (kind, column) in [(0u8, "email"), (1, "phone")] {
                let k = keys.iter().find(|k| k.side == side && k.batch == batch && k.column == column).unwrap();
                prop_assert_eq!(k.keys.len(), rows.len());
                for (i, (e, p)) in rows.iter().enumerate() {
                    let value = if kind == 0 { *e } else { *p };
                    let key = k.keys.is_valid(i).then(|| u32::from_be_bytes(k.keys.value(i).try_into().unwrap()));
                    prop_assert_eq!(value.is_some(), key.is_some());
                    seen.push(((kind, value), key));
                }
            }
        }
        for (x, kx) in &seen {
            for (y, ky) in &seen {
                if x.1.is_some() && y.1.is_some() {
                    prop_assert_eq!(x == y, kx == ky);
                }
            }
        }
    }
}
