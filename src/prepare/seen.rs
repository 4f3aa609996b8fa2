//! The first-identifier prefixes an upload has shown so far, to count its
//! duplicate rows.

use crate::prefetch::prefetch;

/// A set of 64-bit values: open addressing with linear probing, at most
/// three quarters full, doubled when it would be fuller. Zero marks an
/// empty slot, so the value zero is kept aside. A batch is added at once
/// with each slot asked for some values ahead: at millions of rows the
/// table is far larger than the cache, and one miss after another made a
/// general hash set most of the taking thread's work.
#[derive(Debug, Default)]
pub(super) struct Seen {
    slots: Vec<u64>,
    len: usize,
    zero: bool,
}

/// How many values ahead a slot is asked for.
const AHEAD: usize = 16;
/// The smallest table: 512 KiB.
const MIN_SLOTS: usize = 1 << 16;

impl Seen {
    /// Adds every value; how many were already there, counting repeats
    /// within `values`.
    pub(super) fn insert_all(&mut self, values: &[u64]) -> u64 {
        self.reserve(values.len());
        let mut repeats = 0;
        for (i, &value) in values.iter().enumerate() {
            if let Some(&ahead) = values.get(i + AHEAD) {
                prefetch(&self.slots[self.home(ahead)]);
            }
            if !self.insert(value) {
                repeats += 1;
            }
        }
        repeats
    }

    /// Adds `value`; whether it was new.
    fn insert(&mut self, value: u64) -> bool {
        if value == 0 {
            return !std::mem::replace(&mut self.zero, true);
        }
        let mask = self.slots.len() - 1;
        let mut at = self.home(value);
        loop {
            match self.slots[at] {
                0 => {
                    self.slots[at] = value;
                    self.len += 1;
                    return true;
                }
                held if held == value => return false,
                _ => at = (at + 1) & mask,
            }
        }
    }

    /// The first slot `value` may sit in: the top bits of its product with
    /// an odd constant, so values alike in their low bits spread too.
    fn home(&self, value: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (value.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// Room for `total` values in all, made at once: a table doubled step
    /// by step touches twice the memory, and each step moves every value
    /// held to a slot the cache does not hold.
    pub(super) fn expect(&mut self, total: usize) {
        self.reserve(total.saturating_sub(self.len));
    }

    /// Room for `more` values at most three quarters full.
    fn reserve(&mut self, more: usize) {
        let needed = (self.len + more) * 4 / 3 + 1;
        if needed <= self.slots.len() {
            return;
        }
        let size = needed.next_power_of_two().max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![0; size]);
        self.len = 0;
        for value in old.into_iter().filter(|&v| v != 0) {
            self.insert(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a standard set, over batches that grow the table several
    /// times, with zero, repeats inside one batch and repeats across
    /// batches, and values alike in their low bits.
    #[test]
    fn counts_what_a_standard_set_counts() {
        for expected in [None, Some(100_000), Some(400_000)] {
            counts_as_a_standard_set(expected);
        }
    }

    /// With `expected` values announced after the first batch: the table
    /// made then holds them all without growing again.
    fn counts_as_a_standard_set(expected_total: Option<usize>) {
        let mut seen = Seen::default();
        let mut reference = std::collections::HashSet::new();
        let mut next = 1u64;
        for batch in 0..40u64 {
            let values: Vec<u64> = (0..10_000u64)
                .map(|i| {
                    next = next.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    match i % 7 {
                        0 => 0,
                        1 => i << 32,
                        2 => (next >> 40) % 50_000,
                        _ => next,
                    }
                })
                .collect();
            let expected = values.iter().filter(|v| !reference.insert(**v)).count() as u64;
            assert_eq!(seen.insert_all(&values), expected, "batch {batch}");
            if batch == 0
                && let Some(total) = expected_total
            {
                seen.expect(total);
            }
        }
        if let Some(total) = expected_total {
            let made = (total * 4 / 3 + 1).next_power_of_two();
            if seen.len <= total {
                assert_eq!(seen.slots.len(), made, "grown after the announcement");
            }
        }
        assert_eq!(seen.len + usize::from(seen.zero), reference.len());
        assert!(seen.slots.len() > MIN_SLOTS);
        assert!(seen.len * 4 <= seen.slots.len() * 3);
    }
}
