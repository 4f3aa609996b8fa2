//! What a worker holds: partitions of placed tables, in memory only, within
//! a limit. Nothing is written to the worker's disk; a worker that restarts
//! holds nothing and is placed again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::record_batch::RecordBatch;
use datafusion::common::{Result, exec_err};
use parking_lot::RwLock;

/// One placement's partitions: `(dataset, index)` to its batches.
#[derive(Debug, Default)]
struct Placement {
    agreement: String,
    partitions: HashMap<(String, u32), Vec<RecordBatch>>,
    rows: u64,
    bytes: u64,
}

/// A worker's partitions, shared by its placement service and the scans
/// of the plans it runs.
#[derive(Debug)]
pub struct Held {
    placements: RwLock<HashMap<String, Placement>>,
    limit_bytes: u64,
    instance: String,
    reads: AtomicU64,
}

/// Why partitions were not kept.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("the worker's memory limit (max_memory_bytes = {limit}) cannot hold this placement")]
    Full { limit: u64 },
    #[error("placement {0} is already held; a placement is sent once")]
    Exists(String),
}

/// What a worker reports holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPlacement {
    pub placement: String,
    pub agreement: String,
    pub partitions: u32,
    pub rows: u64,
}

impl Held {
    /// Nothing held yet, at most `limit_bytes` of partitions at once.
    pub fn new(limit_bytes: u64) -> Arc<Self> {
        let mut id = [0u8; 8];
        // Only tells one process from the next; no secret.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        Arc::new(Held {
            placements: RwLock::new(HashMap::new()),
            limit_bytes,
            instance: hex::encode(id),
            reads: AtomicU64::new(0),
        })
    }

    /// This process's random name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Keeps a whole placement of `bytes` (as received), or nothing of it.
    pub fn put(
        &self,
        placement: &str,
        agreement: &str,
        partitions: HashMap<(String, u32), Vec<RecordBatch>>,
        bytes: u64,
    ) -> Result<(u64, u64), HeldError> {
        let rows: u64 = partitions
            .values()
            .flatten()
            .map(|b| b.num_rows() as u64)
            .sum();
        let mut held = self.placements.write();
        if held.contains_key(placement) {
            return Err(HeldError::Exists(placement.to_string()));
        }
        let in_use: u64 = held.values().map(|p| p.bytes).sum();
        if in_use.saturating_add(bytes) > self.limit_bytes {
            return Err(HeldError::Full {
                limit: self.limit_bytes,
            });
        }
        held.insert(
            placement.to_string(),
            Placement {
                agreement: agreement.to_string(),
                partitions,
                rows,
                bytes,
            },
        );
        Ok((rows, bytes))
    }

    /// Drops a placement; the number of partitions it had.
    pub fn forget(&self, placement: &str) -> u32 {
        self.placements
            .write()
            .remove(placement)
            .map_or(0, |p| p.partitions.len() as u32)
    }

    /// One partition's batches.
    pub(crate) fn partition(
        &self,
        placement: &str,
        dataset: &str,
        index: u32,
    ) -> Result<Vec<RecordBatch>> {
        let held = self.placements.read();
        match held
            .get(placement)
            .and_then(|p| p.partitions.get(&(dataset.to_string(), index)))
        {
            Some(batches) => Ok(batches.clone()),
            None => exec_err!("this worker does not hold the partition a plan asked for"),
        }
    }

    pub(crate) fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Partitions read by plans since the process started.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The placements held, and their bytes in all.
    pub fn describe(&self) -> (Vec<HeldPlacement>, u64) {
        let held = self.placements.read();
        let mut out: Vec<HeldPlacement> = held
            .iter()
            .map(|(id, p)| HeldPlacement {
                placement: id.clone(),
                agreement: p.agreement.clone(),
                partitions: p.partitions.len() as u32,
                rows: p.rows,
            })
            .collect();
        out.sort_by(|a, b| a.placement.cmp(&b.placement));
        (out, held.values().map(|p| p.bytes).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::UInt32Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(n: u32) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::UInt32, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(UInt32Array::from_iter_values(0..n))]).unwrap()
    }

    #[test]
    fn a_placement_is_kept_whole_or_not_at_all() {
        let held = Held::new(10_000);
        let mut parts = HashMap::new();
        parts.insert(("a".to_string(), 0), vec![batch(100)]);
        assert!(held.put("p1", "demo", parts.clone(), 400).is_ok());
        assert!(matches!(
            held.put("p1", "demo", parts, 400),
            Err(HeldError::Exists(_))
        ));
        let mut big = HashMap::new();
        big.insert(("a".to_string(), 0), vec![batch(10_000)]);
        assert!(matches!(
            held.put("p2", "demo", big, 40_000),
            Err(HeldError::Full { .. })
        ));
        let (placements, _) = held.describe();
        assert_eq!(placements.len(), 1);
        assert_eq!(held.partition("p1", "a", 0).unwrap()[0].num_rows(), 100);
        assert!(held.partition("p1", "a", 1).is_err());
        assert_eq!(held.forget("p1"), 1);
        assert!(held.partition("p1", "a", 0).is_err());
        assert_eq!(held.describe().0.len(), 0);
    }
}
