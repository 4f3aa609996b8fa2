//! How often the commonest value of a column repeats, told by a small
//! blocked count sketch rather than by holding every value.

use arrow::array::FixedSizeBinaryArray;

/// Counts of fingerprints in an upload, in fixed memory (4 MiB): a
/// count-min sketch, which never counts a value short, so a fingerprint past
/// the cap is always caught. It may count long when unrelated values share
/// every counter. The sketch is blocked: a value's 4 counters lie in one
/// 64-byte block (one cache miss per value instead of four), one in each
/// quarter of the block, so they are always 4 different counters. With
/// 2^16 blocks of 32 counters, 20M values put about 40 on a counter (the
/// largest upload, 100M rows, about 190), and passing a cap of 1,000 by
/// accident needs several times that on all 4. Small enough to stay in
/// the cache: at 16 MiB, the miss on every value was most of the server's
/// side of an upload (upload bench at 2M rows, server side 2.75M rows/s at
/// 16 MiB, 3.46M to 3.87M at 4 MiB). The hashing is seeded per upload.
#[derive(Debug, Clone)]
pub(super) struct RepeatCounter {
    pub(super) blocks: Vec<Block>,
    seeds: [u64; 2],
}

/// 32 counters on one cache line.
#[derive(Debug, Clone, Copy)]
#[repr(align(64))]
pub(super) struct Block(pub(super) [u16; 32]);

const BLOCK_BITS: u32 = 16;

impl RepeatCounter {
    pub(super) fn new() -> Self {
        let mut seed_bytes = [0u8; 16];
        // Without the system's randomness the seeds are fixed: counts stay
        // exact as ever, only crafted collisions get easier, and they can
        // only refuse the crafter's own upload.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed_bytes);
        let mut seeds = [0u64; 2];
        for (i, s) in seeds.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&seed_bytes[i * 8..i * 8 + 8]);
            *s = u64::from_le_bytes(b) | 1;
        }
        RepeatCounter {
            blocks: vec![Block([0; 32]); 1 << BLOCK_BITS],
            seeds,
        }
    }

    /// Where `value` of identifier column `column` is counted: its block,
    /// and the bits that choose its counters there.
    fn place(&self, column: usize, value: &[u8]) -> (usize, u64) {
        // The value folded to one word, 8 bytes at a time (each word turned
        // by its place, so equal words in two places do not cancel).
        let mut folded = 0u64;
        for (i, chunk) in value.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            folded ^= u64::from_le_bytes(word).rotate_left(i as u32 * 23);
        }
        let key = folded ^ (column as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mix = |seed: u64| {
            let h = (key ^ seed).wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^ (h >> 29)
        };
        (
            (mix(self.seeds[0]) >> (64 - BLOCK_BITS)) as usize,
            mix(self.seeds[1]),
        )
    }

    /// Counts one more row at `place`; the estimate of its rows so far.
    fn bump(&mut self, (block, within): (usize, u64)) -> u16 {
        let block = &mut self.blocks[block].0;
        let mut estimate = u16::MAX;
        for d in 0..4 {
            let slot = d * 8 + ((within >> (d * 3)) & 7) as usize;
            let c = &mut block[slot];
            *c = c.saturating_add(1);
            estimate = estimate.min(*c);
        }
        estimate
    }

    /// Counts one more row of `value` in identifier column `column`; the
    /// estimate of its rows so far.
    #[cfg(test)]
    pub(super) fn add(&mut self, column: usize, value: &[u8]) -> u16 {
        self.bump(self.place(column, value))
    }

    /// Counts one more row of every value of identifier column `column` in
    /// one batch; the highest estimate among them. Same counts as adding
    /// the values one by one, but the blocks are asked for ahead: while an
    /// upload streams through the server the sketch does not stay in the
    /// cache, and one miss after another was most of the check's time
    /// (upload bench, 2M rows).
    pub(super) fn add_all(&mut self, column: usize, values: &FixedSizeBinaryArray) -> u16 {
        /// How many values ahead a block is asked for.
        const AHEAD: usize = 16;
        let places: Vec<(usize, u64)> = values
            .iter()
            .flatten()
            .map(|v| self.place(column, v))
            .collect();
        let mut highest = 0;
        for (i, &place) in places.iter().enumerate() {
            if let Some(&(ahead, _)) = places.get(i + AHEAD) {
                crate::prefetch::prefetch(&self.blocks[ahead]);
            }
            highest = highest.max(self.bump(place));
        }
        highest
    }
}
