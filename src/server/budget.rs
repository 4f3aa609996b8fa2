//! Charging the privacy budget around a private answer: shared by queries
//! and overlaps.

use super::AppState;
use crate::error::ServiceError;
use crate::policy::{Policy, Privacy};
use crate::privacy::window::describe;
use crate::privacy::{Report, from_micros, to_micros, window};
use crate::proto;
use crate::storage::{Charge, Totals, delta_from_units, delta_to_units};

/// A charge taken for one answer.
#[derive(Debug, Clone)]
pub(super) struct Charged {
    pub(super) charge: Charge,
    pub(super) epsilon: f64,
    /// Budget left in the window after this charge.
    pub(super) remaining: f64,
    /// RFC 3339, or "never".
    pub(super) next_refresh: String,
}

/// The epsilon a request spends: what it asks for (or the agreement's
/// per-query maximum), rounded up to whole millionths as it is charged.
/// Below the agreement's floor it is refused: many queries at a tiny
/// epsilon would each still spend a whole delta.
pub(super) fn epsilon_for(privacy: &Privacy, requested: Option<f64>) -> Result<f64, ServiceError> {
    let max = privacy.epsilon_per_query_max();
    let min = privacy.epsilon_per_query_min();
    let epsilon = requested.unwrap_or(max);
    if !(epsilon.is_finite() && epsilon >= min && epsilon <= max) {
        return Err(ServiceError::InvalidArgument {
            field: "epsilon",
            rule: format!(
                "must be at least {min} (privacy.epsilon_per_query_min) and at most {max} (privacy.epsilon_per_query_max)"
            ),
        });
    }
    Ok(crate::privacy::charged_epsilon(epsilon, max))
}

/// Refuses an epsilon for an agreement without differential privacy.
pub(super) fn no_epsilon(policy: &Policy, requested: Option<f64>) -> Result<(), ServiceError> {
    match requested {
        Some(_) => Err(ServiceError::InvalidArgument {
            field: "epsilon",
            rule: format!(
                "agreement {} has no differential privacy; leave epsilon unset",
                policy.id()
            ),
        }),
        None => Ok(()),
    }
}

/// A fresh random id for the budget ledger and the audit log.
fn new_query_id() -> Result<String, ServiceError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| ServiceError::Internal("the system random source failed".into()))?;
    Ok(hex::encode(id))
}

impl AppState {
    /// Charges `epsilon` and the agreement's delta to `org`'s budget in the
    /// current window, or says which of the two is short, how much of it
    /// is left and when it refreshes.
    pub(super) async fn charge_budget(
        &self,
        org: &str,
        policy: &Policy,
        privacy: &Privacy,
        epsilon: f64,
    ) -> Result<Charged, ServiceError> {
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
            .map_err(|e| ServiceError::Internal(format!("charging the budget: {e}")))??;
        crate::crash::point("ledger.charged");
        match spent {
            Ok(after) => Ok(Charged {
                charge,
                epsilon,
                remaining: from_micros(total.saturating_sub(after.micros)),
                next_refresh: describe(window.next_refresh),
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
                Err(ServiceError::BudgetExhausted {
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
        audited: &Result<(), ServiceError>,
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

/// The privacy report an answer carries.
pub(super) fn privacy_report(r: &Report, charged: &Charged) -> proto::PrivacyReport {
    proto::PrivacyReport {
        mechanism: r.mechanism.to_string(),
        epsilon: r.epsilon,
        delta: r.delta,
        threshold: r.threshold,
        threshold_scale: r.threshold_scale,
        max_groups_per_person: r.max_groups_per_person,
        max_rows_per_person: r.max_rows_per_person,
        columns: r
            .columns
            .iter()
            .map(|c| proto::ColumnNoise {
                aggregate: c.aggregate.clone(),
                epsilon: c.epsilon,
                scale: c.scale,
                count_scale: c.count_scale,
                half_width_95: c.half_width_95,
            })
            .collect(),
        epsilon_remaining: charged.remaining,
        next_refresh: charged.next_refresh.clone(),
    }
}
