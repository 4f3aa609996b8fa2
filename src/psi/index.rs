//! The matcher's index: every fingerprint of one identity kind, spread
//! over partitions by a keyed hash seeded afresh per matching, indexed and
//! linked into people, and dense keys for the query tables.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use arrow::array::{Array, FixedSizeBinaryArray};

use super::{ColumnKeys, Side};

/// Hashing seeded afresh for every matching. Fingerprints are uniformly
/// random only if the partner computed them honestly: one that uploads
/// crafted values sharing bits could otherwise pile them into one bucket
/// and make matching quadratic. A folded 64x64->128-bit multiply by a
/// secret odd key mixes every input bit into the result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seeded {
    pub(super) k0: u64,
    pub(super) k1: u64,
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
    pub(super) keys: Seeded,
    pub(super) state: u64,
}

pub(super) fn fold_multiply(a: u64, b: u64) -> u64 {
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
pub(super) fn word(value: &[u8], i: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&value[8 * i..8 * i + 8]);
    u64::from_le_bytes(word)
}

/// One identifier column of one kind, as the indexer reads it.
pub(super) struct KindColumn<'a> {
    /// Index of the side, of the batch in it, and the column's name.
    pub(super) side: usize,
    pub(super) batch: usize,
    pub(super) name: &'a str,
    /// Global number of the column's first row (rows are numbered across
    /// all sides in order).
    pub(super) first_row: u32,
    /// Number of the column's first value among the kind's values (every
    /// row of every column of the kind, column after column).
    pub(super) first_value: u32,
    pub(super) fps: &'a FixedSizeBinaryArray,
}

/// One fingerprint while it is indexed: its digest ([`Spread::digest`])
/// and its number among the kind's values. 12 bytes, so a partition's
/// entries stay small.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, packed(4))]
pub(super) struct Entry {
    pub(super) digest: u64,
    pub(super) value: u32,
}

/// Values per partition the indexer aims at: a partition's entries and
/// its table (about 36 bytes per value together) then stay in the cache,
/// where a table over all values would miss it on nearly every lookup.
/// (At 10M x 10M rows, 16,384 and 262,144 were both slower in the overlap
/// bench: more partitions make scattering miss instead.)
pub(super) const VALUES_PER_PARTITION: usize = 65_536;

/// How the kind's values are spread over partitions and table slots: by a
/// digest of the whole fingerprint under keys drawn afresh for every
/// matching (see [`Seeded`]), so crafted fingerprints (sharing their first
/// bytes, say) cannot pile into one partition or one run of slots.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spread {
    pub(super) keys: Seeded,
    pub(super) more: Seeded,
    /// log2 of the number of partitions.
    pub(super) bits: u32,
    /// Values per partition on average.
    pub(super) share: usize,
}

impl Spread {
    pub(super) fn new(values: usize, [keys, more]: [Seeded; 2]) -> Self {
        let wanted = values.div_ceil(VALUES_PER_PARTITION).max(1);
        let bits = wanted.next_power_of_two().trailing_zeros().min(12);
        Spread {
            keys,
            more,
            bits,
            share: values >> bits,
        }
    }

    pub(super) fn partitions(&self) -> usize {
        1 << self.bits
    }

    /// 64 bits of a 32-byte fingerprint, every input bit mixed in under
    /// this matching's keys: equal fingerprints give equal digests, and
    /// without the keys two different ones collide only by chance.
    pub(super) fn digest(&self, value: &[u8]) -> u64 {
        let low = fold_multiply(word(value, 0) ^ self.keys.k0, word(value, 1) ^ self.more.k0);
        let high = fold_multiply(word(value, 2) ^ self.keys.k1, word(value, 3) ^ self.more.k1);
        fold_multiply(low ^ self.more.k1, high ^ self.keys.k0)
    }

    /// The digest's partition: its top bits.
    pub(super) fn partition(&self, digest: u64) -> usize {
        match self.bits {
            0 => 0,
            bits => (digest >> (64 - bits)) as usize,
        }
    }
}

/// A run of columns' values scattered by partition, in column and row
/// order within each partition.
pub(super) struct Scattered {
    pub(super) entries: Vec<Entry>,
    /// Where each partition's entries start, and the end: partitions + 1.
    pub(super) starts: Vec<usize>,
}

impl Scattered {
    pub(super) fn new(columns: &[KindColumn<'_>], spread: Spread) -> Self {
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

    pub(super) fn partition(&self, p: usize) -> &[Entry] {
        &self.entries[self.starts[p]..self.starts[p + 1]]
    }
}

/// What indexing one partition found.
#[derive(Default)]
pub(super) struct PartitionIndex {
    /// Pairs of global row numbers that share a fingerprint.
    pub(super) links: Vec<(u32, u32)>,
    /// With keys wanted: the partition's own key of each of its entries
    /// (from 0, in the order the entries came).
    pub(super) keys: Vec<u32>,
    pub(super) distinct: u32,
}

/// The kind's columns and where each value lives.
pub(super) struct KindValues<'a> {
    pub(super) columns: Vec<KindColumn<'a>>,
    /// For every block of 2^[`BLOCK_BITS`] value numbers, the column that
    /// holds the block's first value: finding a value's column is then a
    /// step or two, not a search (batches hold thousands of rows).
    pub(super) block_column: Vec<u32>,
}

/// log2 of the value numbers per entry of [`KindValues::block_column`].
pub(super) const BLOCK_BITS: u32 = 12;

impl<'a> KindValues<'a> {
    pub(super) fn new(columns: Vec<KindColumn<'a>>, values: u32) -> Self {
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
    pub(super) fn locate(&self, v: u32) -> (&KindColumn<'_>, usize) {
        let mut i = self.block_column[(v >> BLOCK_BITS) as usize] as usize;
        while i + 1 < self.columns.len() && self.columns[i + 1].first_value <= v {
            i += 1;
        }
        let c = &self.columns[i];
        (c, (v - c.first_value) as usize)
    }

    pub(super) fn fingerprint(&self, v: u32) -> &[u8] {
        let (c, row) = self.locate(v);
        c.fps.value(row)
    }

    /// The fingerprint as an array (every indexed column holds 32 bytes),
    /// compared without a call.
    #[inline]
    pub(super) fn fingerprint32(&self, v: u32) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.fingerprint(v));
        out
    }

    pub(super) fn global_row(&self, v: u32) -> u32 {
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
pub(super) fn index_partition(
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
pub(super) fn index_entries(
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
pub(super) struct KindIndex {
    /// Pairs of row numbers (numbered across all sides in order) that share
    /// a fingerprint of this kind.
    pub(super) links: Vec<(u32, u32)>,
    /// With keys wanted: dense keys for every column of this kind, from
    /// `first_key`.
    pub(super) keys: Vec<ColumnKeys>,
    /// Distinct fingerprints of this kind.
    pub(super) distinct: u32,
}

/// Indexes the fingerprints of `kind`, on every core.
///
/// Values are first scattered into partitions by a seeded hash of their
/// first 8 bytes (runs of columns side by side), then each partition is
/// indexed on its own, side by side; a partition's index fits in a core's
/// cache. Keys are numbered per partition and offset by the partitions
/// before it, then gathered back into column order.
pub(super) fn index_kind(
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
pub(super) fn column_keys(
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
