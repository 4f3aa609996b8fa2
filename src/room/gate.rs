//! How many queries run at once, in all and per organisation: a query past
//! either limit is refused before anything is read, so never charged.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::RoomError;
use crate::query::QueryLimits;

/// How many queries run at once, in all and per organisation.
#[derive(Debug)]
pub(crate) struct QueryGate {
    total: Arc<tokio::sync::Semaphore>,
    per_org: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    limits: QueryLimits,
}

/// A query's places in the gate, given back when it ends.
#[derive(Debug)]
pub(crate) struct Permits {
    _total: tokio::sync::OwnedSemaphorePermit,
    _org: tokio::sync::OwnedSemaphorePermit,
}

impl QueryGate {
    pub(crate) fn new(limits: QueryLimits) -> Self {
        QueryGate {
            total: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent)),
            per_org: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Whether no query runs now.
    pub(crate) fn idle(&self) -> bool {
        self.total.available_permits() == self.limits.max_concurrent
    }

    /// A place for one more query of `org`, or the limit it would pass.
    pub(crate) fn enter(&self, org: &str) -> Result<Permits, RoomError> {
        let full = |detail: String| RoomError::LimitExceeded {
            rule: "query.concurrency",
            detail,
        };
        let org_gate = Arc::clone(self.per_org.lock().entry(org.to_string()).or_insert_with(
            || {
                Arc::new(tokio::sync::Semaphore::new(
                    self.limits.max_concurrent_per_org,
                ))
            },
        ));
        let org_permit = org_gate.try_acquire_owned().map_err(|_| {
            full(format!(
                "{org} already runs {} queries, the most one organisation may run at once (max_concurrent_queries_per_org); try again when one ends",
                self.limits.max_concurrent_per_org
            ))
        })?;
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| {
            full(format!(
                "the server already runs {} queries, the most it runs at once (max_concurrent_queries); try again shortly",
                self.limits.max_concurrent
            ))
        })?;
        Ok(Permits {
            _total: total,
            _org: org_permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_holds_queries_per_organisation_and_in_all() {
        let gate = QueryGate::new(QueryLimits {
            max_concurrent: 3,
            max_concurrent_per_org: 2,
            ..QueryLimits::default()
        });
        assert!(gate.idle());
        let a1 = gate.enter("acme").unwrap();
        assert!(!gate.idle());
        let a2 = gate.enter("acme").unwrap();
        let err = gate.enter("acme").unwrap_err();
        assert_eq!(err.rule(), "query.concurrency");
        let _g1 = gate.enter("globex").unwrap();
        let err = gate.enter("globex").unwrap_err();
        assert!(err.to_string().contains("max_concurrent_queries"), "{err}");
        drop(a1);
        let a3 = gate.enter("acme").unwrap();
        drop((a2, a3, _g1));
        assert!(gate.idle(), "every place given back");
    }
}
