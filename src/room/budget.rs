//! Charging the privacy budget around a private answer: shared by
//! questions and overlaps.

use super::{Room, RoomError};
use crate::audit::{AuditError, AuditLog, Event};
use crate::policy::PolicySet;
use crate::policy::{Policy, Privacy};
use crate::privacy::window::describe;
use crate::privacy::{Report, from_micros, to_micros, window};
use crate::storage::{Charge, Totals, delta_from_units, delta_to_units};
use crate::storage::{StorageError, Store};

/// A charge taken for one answer.
#[derive(Debug, Clone)]
pub(super) struct Charged {
    pub(super) charge: Charge,
    pub(super) epsilon: f64,
    /// Budget left in the window after this charge.
    pub(super) remaining: f64,
    /// Unix seconds of the next refresh; None for never.
    pub(super) next_refresh: Option<i64>,
}

/// The epsilon a request spends: what it asks for (or the agreement's
/// per-query maximum), rounded up to whole millionths as it is charged.
/// Below the agreement's floor it is refused: many queries at a tiny
/// epsilon would each still spend a whole delta.
pub(super) fn epsilon_for(privacy: &Privacy, requested: Option<f64>) -> Result<f64, RoomError> {
    let max = privacy.epsilon_per_query_max();
    let min = privacy.epsilon_per_query_min();
    let epsilon = requested.unwrap_or(max);
    if !(epsilon.is_finite() && epsilon >= min && epsilon <= max) {
        return Err(RoomError::invalid(
            "epsilon",
            format!(
                "must be at least {min} (privacy.epsilon_per_query_min) and at most {max} (privacy.epsilon_per_query_max)"
            ),
        ));
    }
    Ok(crate::privacy::charged_epsilon(epsilon, max))
}

/// Refuses an epsilon for an agreement without differential privacy.
pub(super) fn no_epsilon(policy: &Policy, requested: Option<f64>) -> Result<(), RoomError> {
    match requested {
        Some(_) => Err(RoomError::invalid(
            "epsilon",
            format!(
                "agreement {} has no differential privacy; leave epsilon unset",
                policy.id()
            ),
        )),
        None => Ok(()),
    }
}

/// A fresh random id for the budget ledger and the audit log.
fn new_query_id() -> Result<String, RoomError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| RoomError::Internal("the system random source failed".into()))?;
    Ok(hex::encode(id))
}

impl Room {
    /// Charges `epsilon` and the agreement's delta to `org`'s budget in the
    /// current window, or says which of the two is short, how much of it
    /// is left and when it refreshes.
    pub(super) async fn charge_budget(
        &self,
        org: &str,
        policy: &Policy,
        privacy: &Privacy,
        epsilon: f64,
    ) -> Result<Charged, RoomError> {
        let window = window(privacy.refresh(), self.clock().now());
        let charge = Charge {
            query: new_query_id()?,
            agreement: policy.id().to_string(),
            org: org.to_string(),
            window: window.id.clone(),
            micros: to_micros(epsilon),
            delta_units: delta_to_units(privacy.delta()),
        };
        let totals = Totals {
            micros: to_micros(privacy.epsilon_total()),
            delta_units: delta_to_units(privacy.delta_total()),
        };
        let total = totals.micros;
        let (store, c) = (self.store().clone(), charge.clone());
        let spent = tokio::task::spawn_blocking(move || store.charge(&c, totals))
            .await
            .map_err(|e| RoomError::Internal(format!("charging the budget: {e}")))??;
        crate::crash::point("ledger.charged");
        match spent {
            Ok(after) => Ok(Charged {
                charge,
                epsilon,
                remaining: from_micros(total.saturating_sub(after.micros)),
                next_refresh: window.next_refresh.map(|t| t.unix_timestamp()),
            }),
            Err(before) => {
                let epsilon_short = before.micros.saturating_add(charge.micros) > total;
                let (measure, needed, remaining, total) = if epsilon_short {
                    (
                        "epsilon",
                        epsilon,
                        from_micros(total.saturating_sub(before.micros)),
                        privacy.epsilon_total(),
                    )
                } else {
                    (
                        "delta",
                        privacy.delta(),
                        delta_from_units(totals.delta_units.saturating_sub(before.delta_units)),
                        privacy.delta_total(),
                    )
                };
                Err(RoomError::BudgetExhausted {
                    agreement: policy.id().to_string(),
                    measure,
                    needed,
                    remaining,
                    total,
                    window: window.id,
                    next_refresh: match window.next_refresh {
                        Some(t) => format!("at {}", describe(Some(t))),
                        None => "never".into(),
                    },
                })
            }
        }
    }

    /// Gives a failed answer's epsilon back.
    pub(super) async fn refund_budget(&self, query: &str) {
        let (store, q) = (self.store().clone(), query.to_string());
        match tokio::task::spawn_blocking(move || store.refund(&q)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "refunding a failed answer's budget"),
            Err(e) => tracing::warn!(error = %e, "refunding a failed answer's budget"),
        }
    }

    /// Makes an audited answer's charge final.
    pub(super) async fn settle_budget(&self, query: &str) {
        let (store, q) = (self.store().clone(), query.to_string());
        match tokio::task::spawn_blocking(move || store.settle(&q)).await {
            Ok(Ok(_)) => {}
            // Left pending; the next start settles it against the audit log.
            Ok(Err(e)) => tracing::warn!(error = %e, "settling a budget charge"),
            Err(e) => tracing::warn!(error = %e, "settling a budget charge"),
        }
    }

    /// After auditing a charged answer: settle if the audit succeeded,
    /// refund if not (an unaudited answer is not given).
    pub(super) async fn finish_charge(
        &self,
        charged: Option<&Charged>,
        audited: &Result<(), RoomError>,
    ) {
        if let Some(c) = charged {
            match audited {
                Ok(()) => {
                    self.metrics().spent(&c.charge.agreement, c.epsilon);
                    self.settle_budget(&c.charge.query).await
                }
                Err(_) => self.refund_budget(&c.charge.query).await,
            }
        }
    }
}

/// What a private answer spent and what it carries: its noise, and the
/// caller's budget after it.
#[derive(Debug, Clone)]
pub struct Spent {
    pub report: Report,
    /// Epsilon left in the window after this answer.
    pub epsilon_remaining: f64,
    /// Unix seconds of the next refresh; None for never.
    pub next_refresh: Option<i64>,
}

/// The privacy report an answer carries.
pub(super) fn spent(r: &Report, charged: &Charged) -> Spent {
    Spent {
        report: r.clone(),
        epsilon_remaining: charged.remaining,
        next_refresh: charged.next_refresh,
    }
}

/// Why the charges a crash left could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("data directory: {0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Audit(#[from] AuditError),
}

/// Settles the budget charges a crash left pending. Each stays spent (its
/// answer may have left the server). A charge without an audit entry first
/// gets one, decision "interrupted", so the audit log accounts for every
/// epsilon the ledger holds.
pub fn settle_interrupted(
    store: &Store,
    audit: &AuditLog,
    policies: &PolicySet,
    now: i64,
) -> Result<(), SettleError> {
    let pending = store.pending_charges()?;
    if pending.is_empty() {
        return Ok(());
    }
    let audited = audit.query_ids()?;
    for c in pending {
        if !audited.contains(&c.query) {
            let event = Event {
                org: c.org.clone(),
                agreement: c.agreement.clone(),
                policy_hash: policies
                    .get(&c.agreement)
                    .map(|p| p.hash().to_hex())
                    .unwrap_or_default(),
                action: "query",
                rule: Some("privacy.budget".into()),
                epsilon: Some(crate::privacy::from_micros(c.micros)),
                delta: (c.delta_units > 0).then(|| crate::storage::delta_from_units(c.delta_units)),
                query_id: Some(c.query.clone()),
                interrupted: true,
                ..Event::default()
            };
            audit.append(event, now)?;
        }
        store.settle(&c.query)?;
        tracing::warn!(
            agreement = %c.agreement,
            org = %c.org,
            "a query interrupted by a stop kept its budget charge"
        );
    }
    Ok(())
}
