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

/// The `i`th 8 bytes of a fingerprint.
fn word(value: &[u8], i: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&value[8 * i..8 * i + 8]);
    u64::from_le_bytes(word)
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

/// One identifier column of one kind, as the indexer reads it.
struct KindColumn<'a> {
    /// Index of the side, of the batch in it, and the column's name.
    side: usize,
    batch: usize,
    name: &'a str,
    /// Global number of the column's first row (rows are numbered across
    /// all sides in order).
    first_row: u32,
    /// Number of the column's first value among the kind's values (every
    /// row of every column of the kind, column after column).
    first_value: u32,
    fps: &'a FixedSizeBinaryArray,
}

/// One fingerprint while it is indexed: its digest ([`Spread::digest`])
/// and its number among the kind's values. 12 bytes, so a partition's
/// entries stay small.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, packed(4))]
struct Entry {
    digest: u64,
    value: u32,
}

/// Values per partition the indexer aims at: a partition's entries and
/// its table (about 36 bytes per value together) then stay in the cache,
/// where a table over all values would miss it on nearly every lookup.
/// (At 10M x 10M rows, 16,384 and 262,144 were both slower in the overlap
/// bench: more partitions make scattering miss instead.)
const VALUES_PER_PARTITION: usize = 65_536;

/// How the kind's values are spread over partitions and table slots: by a
/// digest of the whole fingerprint under keys drawn afresh for every
/// matching (see [`Seeded`]), so crafted fingerprints (sharing their first
/// bytes, say) cannot pile into one partition or one run of slots.
#[derive(Debug, Clone, Copy)]
struct Spread {
    keys: Seeded,
    more: Seeded,
    /// log2 of the number of partitions.
    bits: u32,
    /// Values per partition on average.
    share: usize,
}

impl Spread {
    fn new(values: usize, [keys, more]: [Seeded; 2]) -> Self {
        let wanted = values.div_ceil(VALUES_PER_PARTITION).max(1);
        let bits = wanted.next_power_of_two().trailing_zeros().min(12);
        Spread {
            keys,
            more,
            bits,
            share: values >> bits,
        }
    }

    fn partitions(&self) -> usize {
        1 << self.bits
    }

    /// 64 bits of a 32-byte fingerprint, every input bit mixed in under
    /// this matching's keys: equal fingerprints give equal digests, and
    /// without the keys two different ones collide only by chance.
    fn digest(&self, value: &[u8]) -> u64 {
        let low = fold_multiply(word(value, 0) ^ self.keys.k0, word(value, 1) ^ self.more.k0);
        let high = fold_multiply(word(value, 2) ^ self.keys.k1, word(value, 3) ^ self.more.k1);
        fold_multiply(low ^ self.more.k1, high ^ self.keys.k0)
    }

    /// The digest's partition: its top bits.
    fn partition(&self, digest: u64) -> usize {
        match self.bits {
            0 => 0,
            bits => (digest >> (64 - bits)) as usize,
        }
    }
}

/// A run of columns' values scattered by partition, in column and row
/// order within each partition.
struct Scattered {
    entries: Vec<Entry>,
    /// Where each partition's entries start, and the end: partitions + 1.
    starts: Vec<usize>,
}

impl Scattered {
    fn new(columns: &[KindColumn<'_>], spread: Spread) -> Self {
        let mut starts = vec![0usize; spread.partitions() + 1];
        for c in columns {
            for row in (0..c.fps.len()).filter(|r| c.fps.is_valid(*r)) {
                starts[spread.partition(spread.digest(c.fps.value(row))) + 1] += 1;
            }
        }
        for p in 1..starts.len() {
            starts[p] += starts[p - 1];
        }
        let mut entries = vec![Entry::default(); starts[spread.partitions()]];
        let mut cursor = starts.clone();
        for c in columns {
            for row in (0..c.fps.len()).filter(|r| c.fps.is_valid(*r)) {
                let digest = spread.digest(c.fps.value(row));
                let p = spread.partition(digest);
                entries[cursor[p]] = Entry {
                    digest,
                    value: c.first_value + row as u32,
                };
                cursor[p] += 1;
            }
        }
        Scattered { entries, starts }
    }

    fn partition(&self, p: usize) -> &[Entry] {
        &self.entries[self.starts[p]..self.starts[p + 1]]
    }
}

/// What indexing one partition found.
#[derive(Default)]
struct PartitionIndex {
    /// Pairs of global row numbers that share a fingerprint.
    links: Vec<(u32, u32)>,
    /// With keys wanted: the partition's own key of each of its entries
    /// (from 0, in the order the entries came).
    keys: Vec<u32>,
    distinct: u32,
}

/// The kind's columns and where each value lives.
struct KindValues<'a> {
    columns: Vec<KindColumn<'a>>,
    /// For every block of 2^[`BLOCK_BITS`] value numbers, the column that
    /// holds the block's first value: finding a value's column is then a
    /// step or two, not a search (batches hold thousands of rows).
    block_column: Vec<u32>,
}

/// log2 of the value numbers per entry of [`KindValues::block_column`].
const BLOCK_BITS: u32 = 12;

impl<'a> KindValues<'a> {
    fn new(columns: Vec<KindColumn<'a>>, values: u32) -> Self {
        let mut block_column = Vec::new();
        let mut column = 0usize;
        for block in 0..(values as usize).div_ceil(1 << BLOCK_BITS) {
            let first = (block << BLOCK_BITS) as u32;
            while column + 1 < columns.len() && columns[column + 1].first_value <= first {
                column += 1;
            }
            block_column.push(column as u32);
        }
        KindValues {
            columns,
            block_column,
        }
    }

    /// The column holding value `v`, and the value's row in it.
    fn locate(&self, v: u32) -> (&KindColumn<'_>, usize) {
        let mut i = self.block_column[(v >> BLOCK_BITS) as usize] as usize;
        while i + 1 < self.columns.len() && self.columns[i + 1].first_value <= v {
            i += 1;
        }
        let c = &self.columns[i];
        (c, (v - c.first_value) as usize)
    }

    fn fingerprint(&self, v: u32) -> &[u8] {
        let (c, row) = self.locate(v);
        c.fps.value(row)
    }

    /// The fingerprint as an array (every indexed column holds 32 bytes),
    /// compared without a call.
    #[inline]
    fn fingerprint32(&self, v: u32) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.fingerprint(v));
        out
    }

    fn global_row(&self, v: u32) -> u32 {
        let (c, row) = self.locate(v);
        c.first_row + row as u32
    }
}

/// Indexes one partition's entries (the runs' pieces of it, in order): an
/// open-addressing table keyed by the fingerprints' digests.
///
/// A digest hit is confirmed on all 32 bytes. Each hit is first taken for a
/// match, and all are confirmed at the end in one pass whose loads do not
/// wait on each other; only if some pair differs (a 1 in 2^64 accident) is
/// the partition indexed again confirming each hit at once, the different
/// fingerprint sharing a digest going to an exact index. A partition far
/// above its share, which only many rows of equal fingerprints or sharing a
/// digest make, is indexed that way at once.
fn index_partition(
    values: &KindValues<'_>,
    pieces: &[&[Entry]],
    spread: Spread,
    want_keys: bool,
) -> PartitionIndex {
    // Far above its share: confirmed at once.
    let n: usize = pieces.iter().map(|p| p.len()).sum();
    if n > 4 * spread.share + 1024 {
        return index_entries(values, pieces, spread, want_keys, None);
    }
    let mut hits = Vec::new();
    let assumed = index_entries(values, pieces, spread, want_keys, Some(&mut hits));
    let confirmed = hits.iter().fold(true, |all, (value, seen)| {
        all & (values.fingerprint32(*value) == values.fingerprint32(*seen))
    });
    if confirmed {
        assumed
    } else {
        index_entries(values, pieces, spread, want_keys, None)
    }
}

/// [`index_partition`]'s one pass: with `assume`, digest hits are taken
/// as matches and pushed there as (value, earlier value) for confirming;
/// without, each is confirmed at once.
fn index_entries(
    values: &KindValues<'_>,
    pieces: &[&[Entry]],
    spread: Spread,
    want_keys: bool,
    mut assume: Option<&mut Vec<(u32, u32)>>,
) -> PartitionIndex {
    let n: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = PartitionIndex {
        keys: Vec::with_capacity(if want_keys { n } else { 0 }),
        ..PartitionIndex::default()
    };
    let size = (2 * n).next_power_of_two().max(16);
    let mask = size - 1;
    // Slot -> 1 + index into `firsts`; 0 is empty.
    let mut slots = vec![0u32; size];
    // (digest, value, key) of each first fingerprint with a new digest.
    let mut firsts: Vec<(u64, u32, u32)> = Vec::new();
    let mut exact: HashMap<&[u8], (u32, u32), Seeded> = HashMap::with_hasher(spread.keys);
    for e in pieces.iter().flat_map(|p| p.iter()) {
        let (digest, value) = (e.digest, e.value);
        let mut slot = digest as usize & mask;
        let earlier = loop {
            let at = slots[slot];
            if at == 0 {
                firsts.push((digest, value, out.distinct));
                slots[slot] = firsts.len() as u32;
                break None;
            }
            let (seen_digest, seen_value, seen_key) = firsts[at as usize - 1];
            if seen_digest == digest {
                if let Some(hits) = assume.as_deref_mut() {
                    hits.push((value, seen_value));
                    break Some((seen_value, seen_key));
                }
                let full = values.fingerprint(value);
                if values.fingerprint(seen_value) == full {
                    break Some((seen_value, seen_key));
                }
                match exact.entry(full) {
                    std::collections::hash_map::Entry::Occupied(o) => break Some(*o.get()),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert((value, out.distinct));
                        break None;
                    }
                }
            }
            slot = (slot + 1) & mask;
        };
        let key = match earlier {
            Some((seen_value, seen_key)) => {
                out.links
                    .push((values.global_row(value), values.global_row(seen_value)));
                seen_key
            }
            None => {
                out.distinct += 1;
                out.distinct - 1
            }
        };
        if want_keys {
            out.keys.push(key);
        }
    }
    out
}

/// What indexing one identity kind found.
struct KindIndex {
    /// Pairs of row numbers (numbered across all sides in order) that share
    /// a fingerprint of this kind.
    links: Vec<(u32, u32)>,
    /// With keys wanted: dense keys for every column of this kind, from
    /// `first_key`.
    keys: Vec<ColumnKeys>,
    /// Distinct fingerprints of this kind.
    distinct: u32,
}

/// Indexes the fingerprints of `kind`, on every core.
///
/// Values are first scattered into partitions by a seeded hash of their
/// first 8 bytes (runs of columns side by side), then each partition is
/// indexed on its own, side by side; a partition's index fits in a core's
/// cache. Keys are numbered per partition and offset by the partitions
/// before it, then gathered back into column order.
fn index_kind(
    sides: &[Side<'_>],
    kind: &str,
    want_keys: bool,
    first_key: u32,
    keys: [Seeded; 2],
) -> KindIndex {
    use rayon::prelude::*;
    let mut columns = Vec::new();
    let (mut first_row, mut first_value) = (0u32, 0u32);
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
                    columns.push(KindColumn {
                        side: side_no,
                        batch: batch_no,
                        name,
                        first_row,
                        first_value,
                        fps,
                    });
                    first_value = u32::try_from(first_value as usize + fps.len())
                        .expect("more identifier values than a u32 can number");
                }
            }
            first_row += batch.num_rows() as u32;
        }
    }
    let values = KindValues::new(columns, first_value);
    let present: usize = values
        .columns
        .iter()
        .map(|c| c.fps.len() - c.fps.null_count())
        .sum();
    let spread = Spread::new(present, keys);
    // Runs of whole columns, about equal in values, one per core.
    let total = first_value as usize;
    let runs = rayon::current_num_threads().max(1);
    let mut bounds = vec![0usize];
    let mut taken = 0usize;
    for (i, c) in values.columns.iter().enumerate() {
        taken += c.fps.len();
        if taken * runs >= bounds.len() * total && i + 1 < values.columns.len() {
            bounds.push(i + 1);
        }
    }
    bounds.push(values.columns.len());
    bounds.dedup();
    let scattered: Vec<Scattered> = bounds
        .par_windows(2)
        .map(|w| Scattered::new(&values.columns[w[0]..w[1]], spread))
        .collect();
    let partitions: Vec<PartitionIndex> = (0..spread.partitions())
        .into_par_iter()
        .map(|p| {
            let pieces: Vec<&[Entry]> = scattered.iter().map(|s| s.partition(p)).collect();
            index_partition(&values, &pieces, spread, want_keys)
        })
        .collect();
    // Where each run's share of each partition's keys starts: after the
    // earlier runs' shares.
    let mut cursors = Vec::with_capacity(scattered.len());
    let mut before = vec![0usize; spread.partitions()];
    for run in &scattered {
        cursors.push(before.clone());
        for (p, b) in before.iter_mut().enumerate() {
            *b += run.partition(p).len();
        }
    }
    drop(scattered);
    // Partition p's keys start after those of the partitions before it.
    let mut base = Vec::with_capacity(partitions.len());
    let mut distinct = 0u32;
    for part in &partitions {
        base.push(
            first_key
                .checked_add(distinct)
                .expect("more distinct identifiers than a u32 can number"),
        );
        distinct += part.distinct;
    }
    let keys = if want_keys {
        // Each run walks its columns in the order it scattered them, so a
        // partition's keys come back in the order its entries were given.
        let gathered: Vec<Vec<ColumnKeys>> = bounds
            .par_windows(2)
            .zip(cursors)
            .map(|(w, mut cursor)| {
                values.columns[w[0]..w[1]]
                    .iter()
                    .map(|c| column_keys(c, spread, &base, &partitions, &mut cursor))
                    .collect()
            })
            .collect();
        gathered.into_iter().flatten().collect()
    } else {
        Vec::new()
    };
    KindIndex {
        links: partitions.into_iter().flat_map(|p| p.links).collect(),
        keys,
        distinct,
    }
}

/// One column's keys, its rows in order: a row's key is the next of its
/// partition's keys from `cursor` on, offset by the partition's `base`.
fn column_keys(
    c: &KindColumn<'_>,
    spread: Spread,
    base: &[u32],
    partitions: &[PartitionIndex],
    cursor: &mut [usize],
) -> ColumnKeys {
    let mut bytes = Vec::with_capacity(4 * c.fps.len());
    for row in 0..c.fps.len() {
        let key = if c.fps.is_valid(row) {
            let p = spread.partition(spread.digest(c.fps.value(row)));
            let k = base[p] + partitions[p].keys[cursor[p]];
            cursor[p] += 1;
            k
        } else {
            0
        };
        bytes.extend_from_slice(&key.to_be_bytes());
    }
    ColumnKeys {
        side: c.side,
        batch: c.batch,
        column: c.name.to_string(),
        keys: FixedSizeBinaryArray::new(4, bytes.into(), c.fps.nulls().cloned()),
    }
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
}
