//! One lock per dataset, held while a version is committed and for a whole
//! erasure, so that neither loses the other's version. The map keeps a
//! dataset's lock only while someone holds or waits for it: it shrinks back
//! as calls end, whatever names callers sent.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// A dataset's lock: `lock()` it to hold it.
pub(crate) type Lock = Arc<Mutex<()>>;

#[derive(Debug, Default, Clone)]
pub(crate) struct DatasetLocks {
    held: Arc<Mutex<HashMap<String, Weak<Mutex<()>>>>>,
}

impl DatasetLocks {
    /// The lock of `dataset` in `agreement`: the same one every caller gets
    /// while any of them still has it.
    pub(crate) fn of(&self, agreement: &str, dataset: &str) -> Lock {
        let key = format!("{agreement}/{dataset}");
        let mut held = self.held.lock();
        if let Some(lock) = held.get(&key).and_then(Weak::upgrade) {
            return lock;
        }
        // Locks no one has any more go, so the map holds at most the
        // datasets in use now (plus this one).
        held.retain(|_, lock| lock.strong_count() > 0);
        let lock = Lock::default();
        held.insert(key, Arc::downgrade(&lock));
        lock
    }

    /// Datasets whose lock someone has now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.held
            .lock()
            .values()
            .filter(|l| l.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_dataset_while_held_and_none_kept_after() {
        let locks = DatasetLocks::default();
        let a = locks.of("ag", "customers");
        let b = locks.of("ag", "customers");
        assert!(
            Arc::ptr_eq(&a, &b),
            "two callers of one dataset share its lock"
        );
        {
            let _held = a.lock();
            assert!(b.try_lock().is_none(), "the second caller waits");
            let other = locks.of("ag", "orders");
            assert!(other.try_lock().is_some(), "another dataset does not wait");
        }
        drop((a, b));
        // A thousand names sent once each leave nothing behind.
        for i in 0..1000 {
            let lock = locks.of("ag", &format!("d{i}"));
            drop(lock.lock());
        }
        assert!(locks.len() <= 1, "{} locks kept", locks.len());
        assert!(locks.held.lock().len() <= 2);
    }
}
