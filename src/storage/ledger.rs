//! The privacy budget ledger, in the metadata store.
//!
//! Each (agreement, querying organisation, window) has the epsilon spent so
//! far, in millionths, and the number of queries charged. A query is
//! charged in one write transaction that checks the remaining budget and
//! records the charge as pending under the query's id; redb serialises
//! write transactions, so concurrent queries can never spend more than the
//! total. When the query fails the charge is refunded; when its answer has
//! been audited the pending record is settled. A crash leaves at most some
//! pending charges, which stay spent (the answer may have left the server)
//! and are settled at the next start, once each.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{StorageError, Store, key_name};

/// "agreement/org/window" -> (spent micro-epsilon, queries charged).
pub(super) const BUDGET: TableDefinition<&str, (u64, u64)> = TableDefinition::new("budget");
/// query id -> pending Charge (JSON).
pub(super) const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("budget_pending");

/// One query's charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub query: String,
    pub agreement: String,
    pub org: String,
    pub window: String,
    pub micros: u64,
}

/// Spending in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub micros: u64,
    pub queries: u64,
}

impl Store {
    /// Charges `c` if the window's spending stays within `total_micros`.
    /// Returns the spending after the charge, or `Err(spent)` unchanged
    /// when the budget does not cover it.
    pub fn charge(
        &self,
        c: &Charge,
        total_micros: u64,
    ) -> Result<Result<Spent, Spent>, StorageError> {
        let tx = self.inner.db.begin_write()?;
        let key = key_name(&[&c.agreement, &c.org, &c.window]);
        let after = {
            let mut budget = tx.open_table(BUDGET)?;
            let (micros, queries) = budget
                .get(key.as_str())?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            let spent = Spent { micros, queries };
            if micros.saturating_add(c.micros) > total_micros {
                drop(budget);
                tx.abort()?;
                return Ok(Err(spent));
            }
            let after = Spent {
                micros: micros + c.micros,
                queries: queries + 1,
            };
            budget.insert(key.as_str(), (after.micros, after.queries))?;
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

    /// Gives a failed query's epsilon back. False if it was not pending.
    pub fn refund(&self, query: &str) -> Result<bool, StorageError> {
        let tx = self.inner.db.begin_write()?;
        {
            let mut pending = tx.open_table(PENDING)?;
            let Some(c) = pending.remove(query)? else {
                return Ok(false);
            };
            let c: Charge = serde_json::from_slice(c.value())?;
            let mut budget = tx.open_table(BUDGET)?;
            let key = key_name(&[&c.agreement, &c.org, &c.window]);
            let (micros, queries) = budget
                .get(key.as_str())?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            budget.insert(
                key.as_str(),
                (micros.saturating_sub(c.micros), queries.saturating_sub(1)),
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
        let table = tx.open_table(BUDGET)?;
        let key = key_name(&[agreement, org, window]);
        Ok(table
            .get(key.as_str())?
            .map(|v| {
                let (micros, queries) = v.value();
                Spent { micros, queries }
            })
            .unwrap_or_default())
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
        }
    }

    #[test]
    fn charges_refunds_and_settlements_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None).unwrap();
        assert_eq!(
            store
                .charge(&charge("q1", 400_000), 1_000_000)
                .unwrap()
                .unwrap()
                .micros,
            400_000
        );
        assert_eq!(
            store
                .charge(&charge("q2", 500_000), 1_000_000)
                .unwrap()
                .unwrap()
                .micros,
            900_000
        );
        // Over the total: nothing changes.
        let refused = store
            .charge(&charge("q3", 200_000), 1_000_000)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            refused,
            Spent {
                micros: 900_000,
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
                queries: 1
            }
        );
        assert_eq!(
            store.spent("a", "acme", "2026-12").unwrap(),
            Spent::default()
        );
        // Charges survive reopening; pending ones are listed.
        store
            .charge(&charge("q4", 100_000), 1_000_000)
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
                                .charge(&charge(&format!("q{t}-{i}"), 300_000), 5_000_000)
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
                queries: 16
            }
        );
    }
}
