//! Matching people across datasets by their keyed fingerprints.
//!
//! A person is a connected group of rows: two rows (in the same dataset or
//! in two datasets) belong to one person when they share a fingerprint of
//! the same identity kind. So someone who matches on email in one row and
//! on phone in another counts once, and duplicate rows of one person in a
//! dataset count once. The overlap is the number of people with rows in
//! both datasets. Plain functions over Arrow batches: no network, no store.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use arrow::array::{Array, FixedSizeBinaryArray};
use arrow::record_batch::RecordBatch;

/// One dataset's rows and which of its columns carry which identity kind.
/// Columns are found by name in each batch's own schema, so a policy that
/// lists them in another order, or a batch without one, matches alike; a
/// column that is not 32-byte fingerprints is ignored.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub batches: &'a [RecordBatch],
    /// (column name, identity kind)
    pub identifiers: &'a [(&'a str, &'a str)],
}

impl Side<'_> {
    fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// The outcome of matching two datasets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matching {
    /// People with rows in both datasets.
    pub overlap: u64,
    /// Distinct people in each dataset.
    pub people: [u64; 2],
    /// Person number of every row, first dataset's rows then the second's;
    /// equal numbers mean the same person.
    pub person_of_row: Vec<u32>,
}

/// Hashing seeded afresh for every matching. Fingerprints are uniformly
/// random only if the partner computed them honestly: one that uploads
/// crafted values sharing bits could otherwise pile them into one bucket
/// and make matching quadratic. A folded 64x64->128-bit multiply by a
/// secret odd key mixes every input bit into the result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seeded {
    k0: u64,
    k1: u64,
}

impl Seeded {
    pub(crate) fn random() -> Self {
        // std's RandomState is seeded from the operating system.
        let r = std::collections::hash_map::RandomState::new();
        let k0 = r.hash_one(0x5eed_u64);
        let k1 = r.hash_one(0x5eed_u64 + 1) | 1;
        Seeded { k0, k1 }
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher {
            keys: *self,
            state: self.k0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct SeededHasher {
    keys: Seeded,
    state: u64,
}

fn fold_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for SeededHasher {
    fn finish(&self) -> u64 {
        self.state
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.state = fold_multiply(self.state ^ n ^ self.keys.k0, self.keys.k1);
    }
}

/// The first 8 bytes of a fingerprint.
fn prefix(value: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&value[..8]);
    u64::from_le_bytes(word)
}

/// Union-find over row numbers, with path halving and union by size.
struct People {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl People {
    fn new(n: usize) -> Self {
        People {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return;
        }
        if self.size[a as usize] < self.size[b as usize] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b as usize] = a;
        self.size[a as usize] += self.size[b as usize];
    }
}

/// Dense keys of one identifier column of one batch: equal keys for equal
/// fingerprints of the same identity kind, across every side; a key is a
/// number below the count of distinct fingerprints of that kind.
#[derive(Debug, Clone)]
pub struct ColumnKeys {
    /// Index of the side in the `sides` given.
    pub side: usize,
    /// Index of the batch in that side.
    pub batch: usize,
    /// The column's name.
    pub column: String,
    /// 4 bytes each (a big-endian number), null where the fingerprint is
    /// null. Fixed-size binary like the fingerprints, so a query can do
    /// with keys exactly what it could with fingerprints (join on them)
    /// and nothing more (no cast to a number or to text is total).
    pub keys: FixedSizeBinaryArray,
}

/// One column's keys while kinds are numbered.
struct RawKeys {
    side: usize,
    batch: usize,
    column: String,
    keys: Vec<u32>,
    nulls: Option<arrow::buffer::NullBuffer>,
}

/// What indexing one identity kind found.
struct KindIndex {
    /// Pairs of row numbers (numbered across all sides in order) that share
    /// a fingerprint of this kind.
    links: Vec<(u32, u32)>,
    /// With `want_keys`: dense keys for every column of this kind, from 0.
    keys: Vec<RawKeys>,
    /// Distinct fingerprints of this kind (with `want_keys`).
    distinct: u32,
}

/// Indexes the fingerprints of `kind`.
///
/// The index is keyed by the fingerprint's first 8 bytes (16-byte entries
/// instead of 40, so far fewer cache misses); a prefix hit is confirmed on
/// the full 32 bytes, and the rare different fingerprint sharing a prefix
/// goes to an exact index.
fn index_kind(sides: &[Side<'_>], kind: &str, want_keys: bool) -> KindIndex {
    // Every column of this kind with the global number of its first row.
    let mut columns: Vec<(u32, &FixedSizeBinaryArray)> = Vec::new();
    let mut places: Vec<(usize, usize, &str)> = Vec::new();
    let mut offset = 0u32;
    for (side_no, side) in sides.iter().enumerate() {
        for (batch_no, batch) in side.batches.iter().enumerate() {
            for &(name, _) in side.identifiers.iter().filter(|(_, k)| *k == kind) {
                let fps = batch
                    .schema()
                    .index_of(name)
                    .ok()
                    .and_then(|i| {
                        batch
                            .column(i)
                            .as_any()
                            .downcast_ref::<FixedSizeBinaryArray>()
                    })
                    .filter(|f| f.value_length() == 32);
                if let Some(fps) = fps {
                    columns.push((offset, fps));
                    places.push((side_no, batch_no, name));
                }
            }
            offset += batch.num_rows() as u32;
        }
    }
    let seeded = Seeded::random();
    // Room for every value of this kind at once (not every row: a kind on
    // some rows only would otherwise reserve twice what it needs).
    let capacity = columns.iter().map(|(_, f)| f.len() - f.null_count()).sum();
    let mut first: HashMap<u64, u64, Seeded> = HashMap::with_capacity_and_hasher(capacity, seeded);
    let mut exact: HashMap<[u8; 32], u64, Seeded> = HashMap::with_hasher(seeded);
    let mut links = Vec::new();
    // Per column, the key of each row (when wanted): a new fingerprint takes
    // the next number, a seen one the number of its first row.
    let mut keys: Vec<Vec<u32>> = if want_keys {
        columns.iter().map(|(_, f)| vec![0; f.len()]).collect()
    } else {
        Vec::new()
    };
    let mut next_key = 0u32;
    let position = |here: u64| ((here >> 32) as usize, here as u32);
    for (entry, (offset, fps)) in columns.iter().enumerate() {
        for row in 0..fps.len() {
            if fps.is_null(row) {
                continue;
            }
            let value = fps.value(row);
            let prefix = prefix(value);
            let global = offset + row as u32;
            let here = ((entry as u64) << 32) | u64::from(global);
            // The first row with this fingerprint, if any came before.
            let earlier = match first.entry(prefix) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(here);
                    None
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    let seen = *o.get();
                    let (seen_entry, seen_global) = position(seen);
                    let (seen_offset, seen_fps) = columns[seen_entry];
                    if seen_fps.value((seen_global - seen_offset) as usize) == value {
                        Some(seen)
                    } else {
                        let mut fp = [0u8; 32];
                        fp.copy_from_slice(value);
                        match exact.entry(fp) {
                            std::collections::hash_map::Entry::Occupied(x) => Some(*x.get()),
                            std::collections::hash_map::Entry::Vacant(x) => {
                                x.insert(here);
                                None
                            }
                        }
                    }
                }
            };
            if let Some(seen) = earlier {
                links.push((global, position(seen).1));
            }
            if want_keys {
                keys[entry][row] = match earlier {
                    Some(seen) => {
                        let (seen_entry, seen_global) = position(seen);
                        keys[seen_entry][(seen_global - columns[seen_entry].0) as usize]
                    }
                    None => {
                        next_key += 1;
                        next_key - 1
                    }
                };
            }
        }
    }
    let keys = keys
        .into_iter()
        .zip(&columns)
        .zip(places)
        .map(|((k, (_, fps)), (side, batch, column))| RawKeys {
            side,
            batch,
            column: column.to_string(),
            keys: k,
            nulls: fps.nulls().cloned(),
        })
        .collect();
    KindIndex {
        links,
        keys,
        distinct: next_key,
    }
}

/// The person number of every row of `sides`, in order: rows linked by a
/// shared fingerprint of one kind have equal numbers. Identity kinds are
/// indexed side by side, one thread each.
pub fn people(sides: &[Side<'_>]) -> Vec<u32> {
    people_and_keys(sides, false).0
}

/// As [`people`], and with `want_keys` the dense key of every identifier
/// column: fingerprints are only ever compared for equality, which 4 bytes
/// per distinct value keep in an eighth of the memory.
pub fn people_and_keys(sides: &[Side<'_>], want_keys: bool) -> (Vec<u32>, Vec<ColumnKeys>) {
    let total: usize = sides.iter().map(Side::rows).sum();
    assert!(total < u32::MAX as usize, "more rows than a u32 can number");
    let mut kinds: Vec<&str> = sides
        .iter()
        .flat_map(|s| s.identifiers.iter().map(|(_, k)| *k))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let indexes: Vec<Option<KindIndex>> = std::thread::scope(|scope| {
        let handles: Vec<_> = kinds
            .iter()
            .map(|kind| scope.spawn(|| index_kind(sides, kind, want_keys)))
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    });
    // A thread that panicked while only counting left its links out, and
    // matching goes on with the others rather than taking the server down;
    // keys for queries cannot be left out, so there it stops.
    if want_keys {
        assert!(
            indexes.iter().all(Option::is_some),
            "indexing an identity kind failed"
        );
    }
    let mut uf = People::new(total);
    let mut keys = Vec::new();
    // Each kind's keys after the previous kinds': no key of one kind equals
    // a key of another, as no fingerprint of one equals one of another.
    let mut offset = 0u32;
    for index in indexes.into_iter().flatten() {
        for (a, b) in index.links {
            uf.union(a, b);
        }
        for k in index.keys {
            let bytes: Vec<u8> = k
                .keys
                .iter()
                .flat_map(|v| (v + offset).to_be_bytes())
                .collect();
            keys.push(ColumnKeys {
                side: k.side,
                batch: k.batch,
                column: k.column,
                keys: FixedSizeBinaryArray::new(4, bytes.into(), k.nulls),
            });
        }
        offset = offset
            .checked_add(index.distinct)
            .expect("more distinct identifiers than a u32 can number");
    }
    ((0..total as u32).map(|row| uf.find(row)).collect(), keys)
}

/// Matches two datasets. Rows without any fingerprint are people of their own.
pub fn match_people(first: Side<'_>, second: Side<'_>) -> Matching {
    let first_rows = first.rows();
    let person_of_row = people(&[first, second]);
    let (a, b) = person_of_row.split_at(first_rows);
    let [in_first, in_second, in_both] =
        people_counts(a, b).expect("person numbers are row numbers");
    Matching {
        overlap: in_both,
        people: [in_first, in_second],
        person_of_row,
    }
}

/// Distinct people among two sets of rows' person numbers (numbered below
/// the rows of both): [in the first, in the second, in both]. None if a
/// number is out of that range.
pub fn people_counts(first: &[u32], second: &[u32]) -> Option<[u64; 3]> {
    let mut seen = vec![0u8; first.len() + second.len()];
    for (persons, bit) in [(first, 1u8), (second, 2u8)] {
        for p in persons {
            *seen.get_mut(*p as usize)? |= bit;
        }
    }
    let count = |mask: u8| seen.iter().filter(|s| **s & mask == mask).count() as u64;
    Some([count(1), count(2), count(3)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::FixedSizeBinaryBuilder;
    use arrow::datatypes::{DataType, Field, Schema};
    use proptest::prelude::*;
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

    #[test]
    fn email_or_phone_counts_a_person_once() {
        // Person 1 matches on email, person 2 on phone, person 3 on both
        // through two different rows, person 4 only in the first dataset.
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
        let m = match_people(
            Side {
                batches: &a,
                identifiers: BOTH,
            },
            Side {
                batches: &b,
                identifiers: BOTH,
            },
        );
        assert_eq!(m.overlap, 3);
        // a: rows 3 and 4 (email 3, phone 3) are one person only through b's row.
        assert_eq!(m.people, [4, 3]);
        assert_eq!(m.person_of_row[2], m.person_of_row[3]);
        assert_eq!(m.person_of_row[0], m.person_of_row[5]);
    }

    #[test]
    fn kinds_never_match_each_other() {
        let a = [batch(&[(Some(7), None)])];
        let b = [batch(&[(None, Some(7))])];
        let m = match_people(
            Side {
                batches: &a,
                identifiers: BOTH,
            },
            Side {
                batches: &b,
                identifiers: BOTH,
            },
        );
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
        let ids: &[(&str, &str)] = &[("email", "email")];
        let m = match_people(
            Side {
                batches: &a,
                identifiers: ids,
            },
            Side {
                batches: &b,
                identifiers: ids,
            },
        );
        assert_eq!(m.overlap, 1, "only the value 2 is in both");
        assert_eq!(m.people, [2, 2]);
        assert_eq!(
            m.person_of_row[3], m.person_of_row[4],
            "the two 3s are one person"
        );
        assert_ne!(m.person_of_row[0], m.person_of_row[1]);
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
                    // Crafted values that all share the index's 8-byte prefix.
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
}
