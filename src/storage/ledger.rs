//! The privacy budget ledger, in the metadata store.
//!
//! Each (agreement, querying organisation, window) has the epsilon spent so
//! far, in millionths, the delta spent, in units of 10^-18, and the number
//! of queries charged. A query is charged in one write transaction that
//! checks what remains of both and records the charge as pending under the
//! query's id; redb serialises write transactions, so concurrent queries
//! can never spend more than either total. When the query fails the charge
//! is refunded; when its answer has been audited the pending record is
//! settled. A crash leaves at most some pending charges, which stay spent
//! (the answer may have left the server) and are settled at the next
//! start, once each.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{StorageError, Store, key_name};

/// "agreement/org/window" -> (spent micro-epsilon, queries charged).
pub(super) const BUDGET: TableDefinition<&str, (u64, u64)> = TableDefinition::new("budget");
/// "agreement/org/window" -> spent delta, in units of 10^-18.
pub(super) const BUDGET_DELTA: TableDefinition<&str, u64> = TableDefinition::new("budget_delta");
/// query id -> pending Charge (JSON).
pub(super) const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("budget_pending");

/// Delta is kept in the ledger as whole units of 10^-18.
pub const DELTA_UNITS: f64 = 1e18;

/// Delta in ledger units, rounded up (a charge never covers less than the
/// delta spent) and at least one.
pub fn delta_to_units(delta: f64) -> u64 {
    let mut units = (delta * DELTA_UNITS).ceil().max(1.0);
    // Past 2^53 adding one would not move the value: step to the next
    // float instead.
    while units / DELTA_UNITS < delta {
        units = units.next_up();
    }
    units as u64
}

/// Ledger units back to delta.
pub fn delta_from_units(units: u64) -> f64 {
    units as f64 / DELTA_UNITS
}

/// One query's charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub query: String,
    pub agreement: String,
    pub org: String,
    pub window: String,
    pub micros: u64,
    /// Delta, in units of 10^-18 (absent from charges written before
    /// delta was charged: those charged none).
    #[serde(default)]
    pub delta_units: u64,
}

/// Spending in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub micros: u64,
    pub delta_units: u64,
    pub queries: u64,
}

/// What a window may spend in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub micros: u64,
    pub delta_units: u64,
}

impl Spent {
    /// Whether `c` fits in what `totals` leaves.
    fn covers(&self, c: &Charge, totals: Totals) -> bool {
        self.micros.saturating_add(c.micros) <= totals.micros
            && self.delta_units.saturating_add(c.delta_units) <= totals.delta_units
    }
}

fn read_spent(
    budget: &impl ReadableTable<&'static str, (u64, u64)>,
    delta: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<Spent, StorageError> {
    let (micros, queries) = budget.get(key)?.map(|v| v.value()).unwrap_or((0, 0));
    let delta_units = delta.get(key)?.map(|v| v.value()).unwrap_or(0);
    Ok(Spent {
        micros,
        delta_units,
        queries,
    })
}

impl Store {
    /// Charges `c` if the window's spending stays within both `totals`.
    /// Returns the spending after the charge, or `Err(spent)` unchanged
    /// when the budget does not cover it.
    pub fn charge(&self, c: &Charge, totals: Totals) -> Result<Result<Spent, Spent>, StorageError> {
        let tx = self.inner.db.begin_write()?;
        let key = key_name(&[&c.agreement, &c.org, &c.window]);
        let after = {
            let mut budget = tx.open_table(BUDGET)?;
            let mut delta = tx.open_table(BUDGET_DELTA)?;
            let spent = read_spent(&budget, &delta, &key)?;
            if !spent.covers(c, totals) {
                drop((budget, delta));
                tx.abort()?;
                return Ok(Err(spent));
            }
            let after = Spent {
                micros: spent.micros + c.micros,
                delta_units: spent.delta_units + c.delta_units,
                queries: spent.queries + 1,
            };
            budget.insert(key.as_str(), (after.micros, after.queries))?;
            delta.insert(key.as_str(), after.delta_units)?;
            let mut pending = tx.open_table(PENDING)?;
            if pending.get(c.query.as_str())?.is_some() {
                return Err(StorageError::Db("a query id was charged twice".into()));
            }
            pending.insert(c.query.as_str(), serde_json::to_vec(c)?.as_slice())?;
            after
        };
        tx.commit()?;
        Ok(Ok(after))
    }

    /// Gives a failed query's epsilon and delta back. False if it was not
    /// pending.
    pub fn refund(&self, query: &str) -> Result<bool, StorageError> {
        let tx = self.inner.db.begin_write()?;
        {
            let mut pending = tx.open_table(PENDING)?;
            let Some(c) = pending.remove(query)? else {
                return Ok(false);
            };
            let c: Charge = serde_json::from_slice(c.value())?;
            let mut budget = tx.open_table(BUDGET)?;
            let mut delta = tx.open_table(BUDGET_DELTA)?;
            let key = key_name(&[&c.agreement, &c.org, &c.window]);
            let spent = read_spent(&budget, &delta, &key)?;
            budget.insert(
                key.as_str(),
                (
                    spent.micros.saturating_sub(c.micros),
                    spent.queries.saturating_sub(1),
                ),
            )?;
            delta.insert(
                key.as_str(),
                spent.delta_units.saturating_sub(c.delta_units),
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Makes a charge final. False if it was not pending.
    pub fn settle(&self, query: &str) -> Result<bool, StorageError> {
        let tx = self.inner.db.begin_write()?;
        let removed = tx.open_table(PENDING)?.remove(query)?.is_some();
        tx.commit()?;
        Ok(removed)
    }

    /// Charges not yet settled or refunded: queries a crash interrupted.
    pub fn pending_charges(&self) -> Result<Vec<Charge>, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let table = tx.open_table(PENDING)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// What `org` spent in `window` of `agreement`.
    pub fn spent(&self, agreement: &str, org: &str, window: &str) -> Result<Spent, StorageError> {
        let tx = self.inner.db.begin_read()?;
        let budget = tx.open_table(BUDGET)?;
        let delta = tx.open_table(BUDGET_DELTA)?;
        read_spent(&budget, &delta, &key_name(&[agreement, org, window]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(query: &str, micros: u64) -> Charge {
        Charge {
            query: query.into(),
            agreement: "a".into(),
            org: "acme".into(),
            window: "2026-11".into(),
            micros,
            delta_units: 100,
        }
    }

    fn totals(micros: u64) -> Totals {
        Totals {
            micros,
            delta_units: u64::MAX,
        }
    }

    #[test]
    fn charges_refunds_and_settlements_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        assert_eq!(
            store
                .charge(&charge("q1", 400_000), totals(1_000_000))
                .unwrap()
                .unwrap()
                .micros,
            400_000
        );
        assert_eq!(
            store
                .charge(&charge("q2", 500_000), totals(1_000_000))
                .unwrap()
                .unwrap()
                .micros,
            900_000
        );
        // Over the total: nothing changes.
        let refused = store
            .charge(&charge("q3", 200_000), totals(1_000_000))
            .unwrap()
            .unwrap_err();
        assert_eq!(
            refused,
            Spent {
                micros: 900_000,
                delta_units: 200,
                queries: 2
            }
        );
        assert!(store.refund("q2").unwrap());
        assert!(!store.refund("q2").unwrap(), "a refund happens once");
        assert!(store.settle("q1").unwrap());
        assert!(!store.refund("q1").unwrap(), "a settled charge stays");
        assert_eq!(
            store.spent("a", "acme", "2026-11").unwrap(),
            Spent {
                micros: 400_000,
                delta_units: 100,
                queries: 1
            }
        );
        assert_eq!(
            store.spent("a", "acme", "2026-12").unwrap(),
            Spent::default()
        );
        // Charges survive reopening; pending ones are listed.
        store
            .charge(&charge("q4", 100_000), totals(1_000_000))
            .unwrap()
            .unwrap();
        drop(store);
        let store = Store::open(dir.path(), None).unwrap();
        assert_eq!(
            store.pending_charges().unwrap(),
            vec![charge("q4", 100_000)]
        );
        assert_eq!(store.spent("a", "acme", "2026-11").unwrap().micros, 500_000);
    }

    #[test]
    fn concurrent_charges_never_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .filter(|i| {
                            store
                                .charge(&charge(&format!("q{t}-{i}"), 300_000), totals(5_000_000))
                                .unwrap()
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 16);
        assert_eq!(
            store.spent("a", "acme", "2026-11").unwrap(),
            Spent {
                micros: 4_800_000,
                delta_units: 1_600,
                queries: 16
            }
        );
    }

    #[test]
    fn delta_is_a_budget_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        // Epsilon for 100 queries, delta for 3.
        let totals = Totals {
            micros: 1_000_000,
            delta_units: 300,
        };
        for q in ["q1", "q2", "q3"] {
            store.charge(&charge(q, 10_000), totals).unwrap().unwrap();
        }
        let refused = store.charge(&charge("q4", 10_000), totals).unwrap();
        assert_eq!(
            refused,
            Err(Spent {
                micros: 30_000,
                delta_units: 300,
                queries: 3
            }),
            "past the delta total with epsilon to spare"
        );
        assert!(store.refund("q3").unwrap());
        assert_eq!(
            store.spent("a", "acme", "2026-11").unwrap().delta_units,
            200
        );
        store
            .charge(&charge("q4", 10_000), totals)
            .unwrap()
            .unwrap();
        // A charge written before delta was charged reads as none.
        let old: Charge = serde_json::from_str(
            r#"{"query":"q","agreement":"a","org":"acme","window":"w","micros":5}"#,
        )
        .unwrap();
        assert_eq!(old.delta_units, 0);
    }

    #[test]
    fn delta_is_charged_rounded_up() {
        for delta in [
            1e-7,
            1e-6,
            3.3e-9,
            1e-18,
            1e-20,
            0.000_999,
            0.05,
            0.1,
            0.3,
            0.099_999_9,
        ] {
            let units = delta_to_units(delta);
            assert!(delta_from_units(units) >= delta, "{delta}");
            assert!(units >= 1);
        }
        assert_eq!(delta_to_units(1e-7), 100_000_000_000);
    }
}
