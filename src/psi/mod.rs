//! Matching people across datasets by their keyed fingerprints.
//!
//! A person is a connected group of rows: two rows (in the same dataset or
//! in two datasets) belong to one person when they share a fingerprint of
//! the same identity kind. So someone who matches on email in one row and
//! on phone in another counts once, and duplicate rows of one person in a
//! dataset count once. The overlap is the number of people with rows in
//! both datasets. Plain functions over Arrow batches: no network, no store.

use arrow::array::FixedSizeBinaryArray;
use arrow::record_batch::RecordBatch;

mod index;

pub(crate) use index::Seeded;
use index::*;

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

/// Union-find over row numbers, with path halving and union by size.
pub(crate) struct People {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl People {
    pub(crate) fn new(n: usize) -> Self {
        People {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    pub(crate) fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    pub(crate) fn union(&mut self, a: u32, b: u32) {
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

/// The person number of every row of `sides`, in order: rows linked by a
/// shared fingerprint of one kind have equal numbers.
pub fn people(sides: &[Side<'_>]) -> Vec<u32> {
    people_and_keys(sides, false).0
}

/// As [`people`], and with `want_keys` the dense key of every identifier
/// column: fingerprints are only ever compared for equality, which 4 bytes
/// per distinct value keep in an eighth of the memory.
pub fn people_and_keys(sides: &[Side<'_>], want_keys: bool) -> (Vec<u32>, Vec<ColumnKeys>) {
    people_and_keys_under(sides, want_keys, || [Seeded::random(), Seeded::random()])
}

/// [`people_and_keys`] with each kind's digest keys from `digest_keys` (tests
/// choose keys under which they can make digests collide).
fn people_and_keys_under(
    sides: &[Side<'_>],
    want_keys: bool,
    digest_keys: impl Fn() -> [Seeded; 2],
) -> (Vec<u32>, Vec<ColumnKeys>) {
    let total: usize = sides.iter().map(Side::rows).sum();
    let mut kinds: Vec<&str> = sides
        .iter()
        .flat_map(|s| s.identifiers.iter().map(|(_, k)| *k))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let mut linking = Linking::new(total, want_keys);
    for kind in kinds {
        linking.add_kind_under(sides, kind, digest_keys());
    }
    linking.finish()
}

/// People numbered one identity kind at a time, so that only one kind's
/// fingerprints need be in memory at once: each [`Linking::add_kind`] is
/// given the same rows (the same batches, with at least that kind's
/// columns), and [`Linking::finish`] gives what [`people_and_keys`] gives
/// for all the kinds added.
pub struct Linking {
    people: People,
    keys: Vec<ColumnKeys>,
    /// The first key of the next kind: each kind's keys come after the
    /// kinds' before it, so no key of one kind equals a key of another.
    next_key: u32,
    want_keys: bool,
}

impl std::fmt::Debug for Linking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linking")
            .field("rows", &self.people.parent.len())
            .field("next_key", &self.next_key)
            .finish()
    }
}

impl Linking {
    /// For `rows` rows in all (numbered across the sides in order).
    pub fn new(rows: usize, want_keys: bool) -> Self {
        assert!(rows < u32::MAX as usize, "more rows than a u32 can number");
        Linking {
            people: People::new(rows),
            keys: Vec::new(),
            next_key: 0,
            want_keys,
        }
    }

    /// Links the rows of `sides` sharing a fingerprint of `kind`. The sides
    /// hold exactly the rows given to [`Linking::new`], in the same batches
    /// every time; None (and nothing linked) if their number differs.
    pub fn add_kind(&mut self, sides: &[Side<'_>], kind: &str) -> Option<()> {
        let rows: usize = sides.iter().map(Side::rows).sum();
        if rows != self.people.parent.len() {
            return None;
        }
        self.add_kind_under(sides, kind, [Seeded::random(), Seeded::random()]);
        Some(())
    }

    fn add_kind_under(&mut self, sides: &[Side<'_>], kind: &str, digest_keys: [Seeded; 2]) {
        let index = index_kind(sides, kind, self.want_keys, self.next_key, digest_keys);
        for (a, b) in index.links {
            self.people.union(a, b);
        }
        self.keys.extend(index.keys);
        self.next_key = self
            .next_key
            .checked_add(index.distinct)
            .expect("more distinct identifiers than a u32 can number");
    }

    /// The person number of every row, and (if wanted) the dense keys of
    /// every identifier column of the kinds added.
    pub fn finish(mut self) -> (Vec<u32>, Vec<ColumnKeys>) {
        let rows = self.people.parent.len() as u32;
        let persons = (0..rows).map(|row| self.people.find(row)).collect();
        (persons, self.keys)
    }
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
mod tests;
